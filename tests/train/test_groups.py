"""Parameter groups: path patterns, freezing (bit-identical, no optimizer state, no gradient
computed), learning-rate groups, the weight-decay mask, take, and the same under data parallel."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fnn
from fnn.losses import softmax_cross_entropy
from fnn.train import (create_train_state, decay_mask, leaf_paths, param_groups, select, take)
from fnn.train.groups import labels, matches
from fnn.train.parallel import data_parallel
from fnn.train.step import make_train_step, train_step_fn

PARAMS = {"trunk": {"conv": {"w": jnp.ones((3, 3, 1, 4)), "b": jnp.zeros(4)},
                    "norm": {"scale": jnp.ones(4), "b": jnp.zeros(4)}},
          "head": {"w": jnp.ones((4, 2)), "b": jnp.zeros(2)},
          "blocks": [{"w": jnp.ones((2, 2))}, {"w": jnp.ones((2, 2))}]}


@pytest.mark.parametrize("pattern, path, expected", [
    ("trunk/**", "trunk/conv/w", True), ("trunk/**", "trunk", True), ("trunk/**", "head/w", False),
    ("**/b", "head/b", True), ("**/b", "trunk/norm/b", True), ("**/b", "b", True),
    ("**/b", "head/bias", False), ("head/*", "head/w", True), ("head/*", "head/x/w", False),
    ("*/w", "head/w", True), ("blocks/1/w", "blocks/1/w", True),
    ("blocks/1/w", "blocks/0/w", False),
    ("**", "a/b/c", True), ("trunk/**/w", "trunk/conv/w", True), ("trunk/**/w", "trunk/w", True),
    ("tr*k/conv/?", "trunk/conv/b", True), ("trunk", "trunk/conv/w", False),
])
def test_patterns(pattern, path, expected):
    assert matches(pattern, path) is expected


def test_paths_and_select():
    assert leaf_paths(PARAMS) == ["blocks/0/w", "blocks/1/w", "head/b", "head/w", "trunk/conv/b",
                                  "trunk/conv/w", "trunk/norm/b", "trunk/norm/scale"]
    mask = select(PARAMS, ["**/b", "blocks/1/**"])
    assert [path for path, hit in zip(leaf_paths(PARAMS), jax.tree.leaves(mask)) if hit] == [
        "blocks/1/w", "head/b", "trunk/conv/b", "trunk/norm/b"]
    with pytest.raises(ValueError, match=r"^select: the pattern 'trunk/conv/bias' matches no "
                                         r"parameter; the parameters are blocks/0/w, "):
        select(PARAMS, ["**/b", "trunk/conv/bias"])
    assert not any(jax.tree.leaves(select(PARAMS, "nothing/**", strict=False)))
    for bad in ("", "/trunk", 3):
        with pytest.raises(ValueError, match="a parameter pattern is a path like"):
            select(PARAMS, [bad])


def test_decay_mask_leaves_out_biases_and_norm_parameters(key):
    mask = decay_mask(PARAMS)
    assert [p for p, hit in zip(leaf_paths(PARAMS), jax.tree.leaves(mask)) if hit] == [
        "blocks/0/w", "blocks/1/w", "head/w", "trunk/conv/w"]
    # a real model: attention biases [heads, head_dim] and repeat-stacked norms [layers, F]
    model = fnn.models.TransformerClassifier(20, 3, features=8, num_heads=2, num_layers=2,
                                             hidden_features=16, max_length=8)
    params, _ = model.init(key, jnp.zeros((1, 8), jnp.int32))
    decayed = {p for p, hit in zip(leaf_paths(params), jax.tree.leaves(decay_mask(params)))
               if hit}
    for path in leaf_paths(params):
        name = path.rsplit("/", 1)[-1]
        assert (path in decayed) == (name not in ("b", "scale")), path
    assert any(p.endswith("query/w") for p in decayed)
    assert not any(p.endswith("query/b") or p.endswith("norm1/scale") for p in decayed)


def test_labels_and_overlaps():
    got = labels(PARAMS, frozen="trunk/**", groups=[["head/**"], ["blocks/0/*"]])
    assert got["trunk"]["conv"]["w"] == "frozen" and got["head"]["b"] == "group0"
    assert got["blocks"][0]["w"] == "group1" and got["blocks"][1]["w"] == "default"
    with pytest.raises(ValueError, match=r"param_groups: head/b is in group 0 and in group 1"):
        labels(PARAMS, groups=[["head/**"], ["**/b"]])
    # frozen wins over a group
    assert labels(PARAMS, frozen="**/b", groups=[["head/**"]])["head"]["b"] == "frozen"


def test_param_groups_updates_and_state():
    opt = param_groups(optax.sgd(0.1), frozen="trunk/**",
                       groups={"head/b": optax.sgd(1.0), ("blocks/0/*",): optax.adam(0.5)})
    grads = jax.tree.map(lambda p: jnp.full_like(p, 2.0), PARAMS)
    with jax.numpy_dtype_promotion("standard"):  # optax's own arithmetic, as in the train step
        opt_state = opt.init(PARAMS)
        updates, _ = opt.update(grads, opt_state, PARAMS)
    np.testing.assert_allclose(updates["head"]["w"], -0.2 * np.ones((4, 2)), rtol=1e-6)
    np.testing.assert_allclose(updates["head"]["b"], -2.0 * np.ones(2), rtol=1e-6)
    # adam's first step is -lr * sign(g), up to its float32 bias correction
    np.testing.assert_allclose(updates["blocks"][0]["w"], -0.5 * np.ones((2, 2)), rtol=1e-5)
    np.testing.assert_allclose(updates["blocks"][1]["w"], -0.2 * np.ones((2, 2)), rtol=1e-6)
    for leaf in jax.tree.leaves(updates["trunk"]):
        assert np.all(np.signbit(leaf)) and not np.any(leaf)  # -0.0: p + u is p, bit for bit
    # adam's moments exist for its group only
    adam_state = opt_state.inner_states["group1"].inner_state[0]
    assert [np.shape(x) for x in jax.tree.leaves(adam_state.mu)] == [(2, 2)]
    assert opt.frozen == ("trunk/**",)
    assert opt._replace().frozen == () and fnn.train.groups.frozen_mask(opt._replace(),
                                                                         PARAMS) is None
    with pytest.raises(TypeError, match="groups maps patterns to optax optimizers"):
        param_groups(optax.sgd(0.1), groups=[("head/**", 0.1)])
    with pytest.raises(ValueError, match=r"param_groups \(frozen\): the pattern 'trunc/\*\*' "
                                         r"matches no parameter"):
        param_groups(optax.sgd(0.1), frozen="trunc/**").init(PARAMS)


def _trunk():
    return fnn.serial(fnn.Conv(4, (3, 3)), fnn.BatchNorm(), fnn.Relu(), fnn.Flatten(1),
                      fnn.Dense(16), fnn.Relu())


def _cnn():
    return fnn.serial(trunk=_trunk(), head=fnn.Dense(3))


def _data(seed=0, n=16):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, 6, 6, 1)).astype(np.float32),
            rng.integers(0, 3, n).astype(np.int32))


def test_frozen_params_stay_bit_identical_in_the_train_step(key):
    model, (x, _) = _cnn(), _data()
    opt = param_groups(optax.adamw(1e-2, mask=decay_mask), frozen="trunk/**")
    ts = create_train_state(model, opt, key, x)
    # a -0.0 in the trunk: p + 0.0 would turn it into +0.0
    params = ts.params
    params["trunk"]["4"]["b"] = params["trunk"]["4"]["b"].at[0].set(-0.0)
    ts = create_train_state(model, opt, key, x, params=params)
    before = jax.tree.map(np.asarray, ts.params)
    state_before = jax.tree.map(np.asarray, ts.state)
    assert jax.tree.leaves(state_before)  # the trunk's BatchNorm has running statistics
    step = make_train_step(model, opt, softmax_cross_entropy)
    for i in range(5):
        ts, metrics = step(ts, *_data(i))
    assert int(metrics["skipped"]) == 0
    for path, old, new in zip(leaf_paths(before), jax.tree.leaves(before),
                              jax.tree.leaves(ts.params)):
        if path.startswith("trunk/"):
            assert np.asarray(new).tobytes() == old.tobytes(), path
        else:
            assert not np.array_equal(new, old), path  # the head trains
    # the frozen trunk's BatchNorm statistics stay as they were too
    for old, new in zip(jax.tree.leaves(state_before), jax.tree.leaves(ts.state)):
        assert np.asarray(new).tobytes() == old.tobytes()
    # no optimizer state for the frozen leaves: adam's moments hold the head only
    moments = ts.opt_state.inner_states["default"].inner_state[0].mu
    assert [np.shape(m) for m in jax.tree.leaves(moments)] == [(3,), (16, 3)]


def test_a_frozen_trunk_costs_no_gradient_computation(key):
    model, (x, y) = _cnn(), _data()
    flops = {}
    for name, opt in (("all", optax.sgd(0.1)),
                      ("frozen", param_groups(optax.sgd(0.1), frozen="trunk/**"))):
        ts = jax.eval_shape(lambda: create_train_state(model, opt, key, x))
        flops[name] = fnn.flops(train_step_fn(model, opt, softmax_cross_entropy), ts, x, y)
    # the conv's and the trunk Dense's weight gradients and the backward through the trunk
    # are gone: the frozen step does far less work
    assert flops["frozen"] < 0.6 * flops["all"], flops


def test_frozen_training_equals_training_the_head_alone(key):
    """Freezing the trunk is training the head on the trunk's (fixed) features."""
    model, (x, _) = _cnn(), _data()
    opt = param_groups(optax.sgd(0.1), frozen="trunk/**")
    ts = create_train_state(model, opt, key, x)
    trunk, trunk_state = ts.params["trunk"], ts.state["trunk"]
    head = ts.params["head"]
    head_opt = optax.sgd(0.1)
    head_state = head_opt.init(head)
    step = make_train_step(model, opt, softmax_cross_entropy, donate=False)
    for i in range(3):
        xb, yb = _data(i)
        ts, _ = step(ts, xb, yb)
        features, trunk_state = _trunk().apply(trunk, trunk_state, xb, train=True)

        def loss(h):
            logits, _ = fnn.Dense(3).apply(h, {}, features)
            return softmax_cross_entropy(logits, yb)

        updates, head_state = head_opt.update(jax.grad(loss)(head), head_state)
        head = optax.apply_updates(head, updates)
    np.testing.assert_allclose(ts.params["head"]["w"], head["w"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ts.params["head"]["b"], head["b"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("inner", ["sgd", "adam"])  # sgd: a gradient off by N would show
@pytest.mark.parametrize("mode", ["pmap", "sharded"])
def test_frozen_under_data_parallel_equals_one_device(mode, inner, key):
    model = fnn.serial(trunk=fnn.serial(fnn.Dense(8), fnn.Relu()), head=fnn.Dense(3))
    opt = param_groups({"sgd": optax.sgd(0.5), "adam": optax.adam(1e-2)}[inner],
                       frozen="trunk/**")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 5)).astype(np.float32)
    y = rng.integers(0, 3, 16).astype(np.int32)
    results = {}
    for name in ("none", mode):
        runner = data_parallel(model, opt, softmax_cross_entropy, mode=name)
        pts = runner.put_state(create_train_state(model, opt, key, x))
        for _ in range(3):
            pts, _ = runner.step(pts, *runner.put_batch(x, y))
        results[name] = runner.get_state(pts).params
    start = create_train_state(model, opt, key, x).params
    assert np.asarray(results[mode]["trunk"]["0"]["w"]).tobytes() == \
        np.asarray(start["trunk"]["0"]["w"]).tobytes()
    np.testing.assert_allclose(results[mode]["head"]["w"], results["none"]["head"]["w"],
                               rtol=1e-5, atol=1e-6)
    assert not np.allclose(results[mode]["head"]["w"], start["head"]["w"])


def test_take_copies_the_matched_leaves():
    fresh = jax.tree.map(jnp.zeros_like, PARAMS)
    merged = take(fresh, PARAMS, "trunk/**")
    np.testing.assert_array_equal(merged["trunk"]["conv"]["w"], PARAMS["trunk"]["conv"]["w"])
    np.testing.assert_array_equal(merged["head"]["w"], np.zeros((4, 2)))
    other = {"trunk": {"conv": {"w": jnp.ones((3, 3, 1, 8))}}}
    with pytest.raises(ValueError) as info:
        take(fresh, other, "trunk/**")
    assert str(info.value) == (
        "take: 4 of the parameters to take do not fit: trunk/conv/b: not in the source; "
        "trunk/conv/w: expected float32[3, 3, 1, 4], the source has float32[3, 3, 1, 8]; "
        "trunk/norm/b: not in the source; trunk/norm/scale: not in the source")
    with pytest.raises(ValueError, match="take: the pattern 'neck/\\*\\*' matches no parameter"):
        take(fresh, PARAMS, "neck/**")
    assert take({}, PARAMS, "neck/**", strict=False) == {}


def test_create_train_state_from_given_params(key):
    model, (x, _) = _cnn(), _data()
    ts = create_train_state(model, optax.sgd(0.1), key, x)
    given = jax.tree.map(lambda p: p + 1.0, ts.params)
    started = create_train_state(model, optax.sgd(0.1), jax.random.key(9), x, params=given)
    np.testing.assert_array_equal(started.params["head"]["w"], given["head"]["w"])
    assert started.params["head"]["w"] is not given["head"]["w"]  # a copy: donation-safe
    step = make_train_step(model, optax.sgd(0.1), softmax_cross_entropy)
    step(started, *_data())
    np.asarray(given["head"]["w"])  # still alive after the donating step
    bad = dict(given, head={"w": jnp.zeros((16, 4)), "b": jnp.zeros(4)})
    with pytest.raises(fnn.ParamError, match=r"params\['head'\]\['w'\]: expected float32\[16, "
                                             r"3\], got float32\[16, 4\]"):
        create_train_state(model, optax.sgd(0.1), key, x, params=bad)


def test_fit_starts_from_given_params(key):
    digits = fnn.data.load_digits()
    model = fnn.models.MLP([32], 10, flatten_axes=3)
    opt = optax.adam(1e-2)
    first, _ = fnn.train.fit(model, opt, digits, softmax_cross_entropy, epochs=2, batch_size=64,
                             progress=False)
    # one more epoch from the first run's params is far better than one epoch from scratch
    _, warm = fnn.train.fit(model, opt, digits, softmax_cross_entropy, epochs=1, batch_size=64,
                            progress=False, params=first.params, state=first.state, seed=1)
    _, cold = fnn.train.fit(model, opt, digits, softmax_cross_entropy, epochs=1, batch_size=64,
                            progress=False, seed=1)
    assert warm[-1]["test_accuracy"] > cold[-1]["test_accuracy"] + 0.02, (warm, cold)
