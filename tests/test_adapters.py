"""LoRA: where the adapters go and their shapes (Dense, attention, repeat-stacked blocks), the
start equal to the base, the merge against the model and a numpy reference, pass-through of
state, keys and Seq inputs, jit and vmap, freezing, errors, and fine-tuning under 2% of the
parameters that undoes a domain shift."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import rand

import fnn
from fnn.data import Split, load_digits
from fnn.adapters import lora, lora_adapters, lora_frozen, merge_lora
from fnn.losses import softmax_cross_entropy
from fnn.train import fit, make_eval_step, evaluate, param_groups, take
from fnn.train.step import make_train_step
from fnn.train.state import create_train_state

IDS = jnp.zeros((2, 6), jnp.int32)


def _gpt():
    return fnn.models.GPT(11, features=8, num_heads=2, num_layers=3, hidden_features=16,
                          max_length=6)


def _shapes(tree):
    return jax.tree.map(jnp.shape, tree)


def _randomised(params, seed=0, scale=0.3):
    """``params`` with every adapter leaf drawn from numpy (``lora_b`` is zeros at init, which
    would hide any mistake in the merge)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    drawn = [jnp.asarray(scale * rand(leaf.shape, seed + i))
             if str(path[-1].key).startswith("lora_") else leaf
             for i, (path, leaf) in enumerate(leaves)]
    return jax.tree.unflatten(treedef, drawn)


def _base_part(params):
    """The base leaves of LoRA params (the adapters left out)."""
    return {k: _base_part(v) if isinstance(v, dict) else v for k, v in params.items()
            if k not in ("lora_a", "lora_b")}


# ----------------------------------------------------------------------------- shapes

def test_adapters_sit_next_to_every_dense_weight_and_the_base_is_the_models(key):
    model = fnn.models.MLP([16, 12], 3)
    params, state = lora(model, rank=2).init(key, jnp.zeros((4, 5)))
    assert _shapes(lora_adapters(params)) == {
        "dense1": {"lora_a": (5, 2), "lora_b": (2, 16)},
        "dense2": {"lora_a": (16, 2), "lora_b": (2, 12)},
        "head": {"lora_a": (12, 2), "lora_b": (2, 3)}}
    assert not any(jnp.any(params[name]["lora_b"]) for name in ("dense1", "dense2", "head"))
    base, base_state = model.init(key, jnp.zeros((4, 5)))  # the same key: the same base
    jax.tree.map(np.testing.assert_array_equal, _base_part(params), base)
    assert state == base_state


def test_stacked_gpt_blocks_get_stacked_adapters_of_the_projections_true_sizes(key):
    # w: query/key/value [L, F, N, D] (out N * D), out [L, N, D, F] (in N * D), up [L, F, H]
    params, _ = lora(_gpt(), ["**/attention/*", "blocks/**/ffn/up"], rank=3).init(key, IDS)
    layers = lora_adapters(params)["blocks"]["layers"]
    expected = {name: {"lora_a": (3, 8, 3), "lora_b": (3, 3, 8)}
                for name in ("query", "key", "value")}
    expected["out"] = {"lora_a": (3, 8, 3), "lora_b": (3, 3, 8)}
    assert _shapes(layers) == {"attention": expected,
                               "ffn": {"up": {"lora_a": (3, 8, 3), "lora_b": (3, 3, 16)}}}
    assert params["blocks"]["layers"]["attention"]["query"]["w"].shape == (3, 8, 2, 4)
    # every stacked copy draws its own lora_a
    a = params["blocks"]["layers"]["attention"]["query"]["lora_a"]
    assert not np.array_equal(a[0], a[1])


def test_attention_projections_flatten_heads_and_targets_match_paths_or_weights(key):
    # grouped-query attention whose head size differs from features // heads: every size shows
    layer = fnn.MultiHeadAttention(4, num_kv_heads=2, head_dim=3)
    params, _ = lora(layer, ["key", "out/w"], rank=2).init(key, jnp.zeros((2, 5, 8)))
    assert _shapes(lora_adapters(params)) == {
        "key": {"lora_a": (8, 2), "lora_b": (2, 6)},  # w [8, 2, 3]: out = 2 * 3
        "out": {"lora_a": (12, 2), "lora_b": (2, 8)}}  # w [4, 3, 8]: in = 4 * 3


def test_a_lora_model_nested_in_another_finds_its_targets_below_itself(key):
    model = fnn.serial(lora(fnn.serial(fnn.Dense(6), fnn.Relu(), out=fnn.Dense(4)), "out"),
                       head=fnn.Dense(2))
    params, state = model.init(key, jnp.zeros((3, 5)))
    assert _shapes(lora_adapters(params)) == {"0": {"out": {"lora_a": (6, 8),
                                                            "lora_b": (8, 4)}}}
    assert model.apply(_randomised(params), state, jnp.ones((3, 5)))[0].shape == (3, 2)


# ----------------------------------------------------------------------------- values

def test_the_adapted_model_starts_exactly_as_the_base(key):
    model = _gpt()
    ids = jnp.asarray(np.arange(12).reshape(2, 6) % 11, jnp.int32)
    params, state = lora(model, rank=4).init(key, ids)
    base, _ = model.init(key, ids)
    y = lora(model, rank=4).apply(params, state, ids)[0]
    np.testing.assert_array_equal(y, model.apply(base, state, ids)[0])


def test_merged_params_give_the_base_model_the_adapted_output(key):
    model = _gpt()
    ids = jnp.asarray(np.arange(12).reshape(2, 6) % 11, jnp.int32)
    adapted = lora(model, rank=4, alpha=16.0)
    params, state = adapted.init(key, ids)
    params = _randomised(params)
    merged = merge_lora(params, alpha=16.0)
    assert jax.tree.structure(merged) == jax.tree.structure(model.init(key, ids)[0])
    y = adapted.apply(params, state, ids)[0]
    np.testing.assert_allclose(model.apply(merged, state, ids)[0], y, atol=1e-5, rtol=1e-5)
    # the adapters matter: the base alone is far off
    assert float(jnp.max(jnp.abs(y - model.apply(_base_part(params), state, ids)[0]))) > 0.1


def test_a_dense_adapter_against_numpy(key):
    x = rand((3, 5), 1)
    adapted = lora(fnn.Dense(4), rank=2, alpha=3.0)
    params = _randomised(adapted.init(key, x)[0])
    w, b, a, bb = (np.asarray(params[n], np.float64) for n in ("w", "b", "lora_a", "lora_b"))
    expected = x.astype(np.float64) @ (w + 1.5 * a @ bb) + b  # scale alpha / rank = 3 / 2
    np.testing.assert_allclose(adapted.apply(params, {}, x)[0], expected, atol=1e-5)


def test_attention_deltas_are_reshaped_to_the_weights_layout_against_numpy(key):
    layer = fnn.MultiHeadAttention(4, num_kv_heads=2, head_dim=3)
    x = rand((2, 5, 8), 2)
    params = _randomised(lora(layer, ["query", "out"], rank=2).init(key, x)[0])
    merged = merge_lora(params, alpha=None)
    q, o = params["query"], params["out"]
    np.testing.assert_allclose(merged["query"]["w"], np.asarray(q["w"]) + (
        np.asarray(q["lora_a"]) @ np.asarray(q["lora_b"])).reshape(8, 4, 3), atol=1e-6)
    np.testing.assert_allclose(merged["out"]["w"], np.asarray(o["w"]) + (
        np.asarray(o["lora_a"]) @ np.asarray(o["lora_b"])).reshape(4, 3, 8), atol=1e-6)
    np.testing.assert_array_equal(merged["key"]["w"], params["key"]["w"])
    y = lora(layer, ["query", "out"], rank=2).apply(params, {}, x)[0]
    np.testing.assert_allclose(y, layer.apply(merged, {}, x)[0], atol=1e-6)


def test_state_keys_train_and_seq_inputs_pass_through(key):
    model = fnn.serial(fnn.Dense(8), fnn.LayerNorm(), fnn.Dropout(0.5), fnn.Dense(4))
    x = fnn.Seq(jnp.asarray(rand((2, 5, 3))), lengths=jnp.array([5, 2]))
    adapted = lora(model, rank=2)
    params, state = adapted.init(key, x)
    params = _randomised(params)
    y, _ = adapted.apply(params, state, x, key=jax.random.key(3), train=True)
    reference, _ = model.apply(merge_lora(params, alpha=None), state, x, key=jax.random.key(3),
                               train=True)
    assert isinstance(y, fnn.Seq) and y.lengths is x.lengths
    np.testing.assert_array_equal(y.x, reference.x)
    with pytest.raises(fnn.MissingKeyError, match="needs a random key when train=True"):
        adapted.apply(params, state, x, train=True)
    # a BatchNorm's running statistics come back as the base model's do
    norm = fnn.serial(fnn.Dense(6), fnn.BatchNorm(), fnn.Dense(2))
    p, s = lora(norm, rank=2).init(key, jnp.zeros((4, 3)))
    _, new_state = lora(norm, rank=2).apply(_randomised(p), s, rand((4, 3)), train=True)
    _, expected = norm.apply(merge_lora(_randomised(p), alpha=None), s, rand((4, 3)), train=True)
    jax.tree.map(np.testing.assert_array_equal, new_state, expected)


def test_jit_and_vmap_over_inputs_and_over_sets_of_adapters(key):
    adapted = lora(fnn.models.MLP([8], 3), rank=2)
    x = jnp.asarray(rand((4, 5)))
    params, state = adapted.init(key, x)
    sets = [_randomised(params, seed) for seed in (0, 10, 20)]
    eager = [adapted.apply(p, state, x)[0] for p in sets]
    np.testing.assert_allclose(jax.jit(adapted.apply)(sets[0], state, x)[0], eager[0],
                               atol=1e-6)
    per_row = jax.vmap(lambda row: adapted.apply(sets[0], state, row)[0])(x)
    np.testing.assert_allclose(per_row, eager[0], atol=1e-6)
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *sets)
    batched = jax.jit(jax.vmap(lambda p: adapted.apply(p, state, x)[0]))(stacked)
    np.testing.assert_allclose(batched, jnp.stack(eager), atol=1e-6)


def test_a_summary_and_a_capture_list_each_layer_once(key):
    model = fnn.models.MLP([8], 3)
    x = jnp.zeros((2, 5))
    rows = fnn.summary(lora(model, rank=2), x, flops=False).splitlines()
    assert len(rows) == len(fnn.summary(model, x, flops=False).splitlines())
    params, state = lora(model, rank=2).init(key, x)
    _, _, outputs = fnn.capture_intermediates(lora(model, rank=2), params, state, x)
    assert sorted(outputs) == ["act1", "dense1", "head"]


# ----------------------------------------------------------------------------- freezing

def test_frozen_base_gets_no_update_and_the_adapters_train(key):
    adapted = lora(fnn.models.MLP([8], 3), rank=2)
    x, y = jnp.asarray(rand((16, 5))), jnp.asarray(np.arange(16) % 3, jnp.int32)
    params, state = adapted.init(key, x)
    frozen = lora_frozen(params)
    assert frozen == ["dense1/b", "dense1/w", "head/b", "head/w"]
    optimizer = param_groups(optax.sgd(0.5), frozen=frozen)
    ts = create_train_state(adapted, optimizer, key, x, params=params, state=state)
    step = make_train_step(adapted, optimizer, softmax_cross_entropy, donate=False)
    first, _ = step(ts, x, y)
    # lora_b starts at zero, so only lora_b moves in the first step (lora_a's gradient is
    # lora_b-weighted); both move after it
    after, _ = step(first, x, y)
    for path in ("dense1", "head"):
        for name in ("w", "b"):
            np.testing.assert_array_equal(after.params[path][name], params[path][name])
        np.testing.assert_array_equal(first.params[path]["lora_a"], params[path]["lora_a"])
        assert jnp.any(first.params[path]["lora_b"] != 0)
        assert jnp.any(after.params[path]["lora_a"] != params[path]["lora_a"])
    # a new head trained as well
    optimizer = param_groups(optax.sgd(0.5), frozen=lora_frozen(params, trainable="head/**"))
    ts = create_train_state(adapted, optimizer, key, x, params=params, state=state)
    moved, _ = make_train_step(adapted, optimizer, softmax_cross_entropy, donate=False)(ts, x, y)
    np.testing.assert_array_equal(moved.params["dense1"]["w"], params["dense1"]["w"])
    assert jnp.any(moved.params["head"]["w"] != params["head"]["w"])


def test_adapters_saved_alone_and_put_back_give_the_same_model(key):
    adapted = lora(fnn.models.MLP([8], 3), rank=2)
    x = jnp.asarray(rand((4, 5)))
    params, state = adapted.init(key, x)
    trained = _randomised(params)
    fresh, _ = adapted.init(jax.random.key(9), x)
    restored = take(take(fresh, params, lora_frozen(fresh)), lora_adapters(trained),
                    "**/lora_*")
    np.testing.assert_array_equal(adapted.apply(restored, state, x)[0],
                                  adapted.apply(trained, state, x)[0])


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("kwargs, message", [
    (dict(rank=0), r"^lora: rank must be a positive integer, got 0$"),
    (dict(rank=-2), r"^lora: rank must be a positive integer, got -2$"),
    (dict(rank=2.5), r"^lora: rank must be a positive integer, got 2.5$"),
    (dict(rank=True), r"^lora: rank must be a positive integer, got True$"),
    (dict(alpha=0), r"^lora: alpha must be a positive number \(the scale is alpha / rank\)"),
    (dict(alpha="8"), r"^lora: alpha must be a positive number"),
    (dict(targets=""), r"^lora: targets are path patterns like '\*\*'"),
    (dict(targets=[]), r"^lora: targets are path patterns like '\*\*'"),
    (dict(targets="/head"), r"^lora: targets are path patterns like '\*\*'"),
    (dict(targets=3), r"^lora: targets are path patterns like '\*\*'"),
])
def test_bad_arguments_are_refused_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lora(fnn.Dense(3), **kwargs)
    with pytest.raises(TypeError, match=r"^lora: model must be a Layer"):
        lora(lambda x: x)


def test_a_pattern_that_matches_no_weight_names_itself_and_lists_those_there_are(key):
    with pytest.raises(fnn.LayerError, match=(
            r"^LoRA\(GPT\): the target pattern '\*\*/attention/qkv' matches no Dense or "
            r"MultiHeadAttention weight; the model's are blocks/layers/attention/query, "
            r"blocks/layers/attention/key, .*, blocks/layers/ffn/down, head$")):
        lora(_gpt(), ["**/attention/*", "**/attention/qkv"]).init(key, IDS)
    # a norm or an embedding is no target
    with pytest.raises(fnn.LayerError, match=r"'norm' matches no Dense"):
        lora(_gpt(), "norm").init(key, IDS)


def test_params_without_adapters_are_refused_by_path(key):
    model = _gpt()
    adapted = lora(model, "**/attention/*", rank=4)
    params, state = adapted.init(key, IDS)
    with pytest.raises(fnn.ParamError, match=(
            r"^LoRA\(GPT\): expected params at blocks/layers/attention/query to hold lora_a "
            r"\[3, 8, 4\] and lora_b \[3, 4, 8\] next to w float32\[3, 8, 2, 4\], got lora_a "
            r"missing, lora_b missing; params without adapters are the base model's")):
        adapted.apply(merge_lora(params, alpha=None), state, IDS)
    with pytest.raises(fnn.ParamError, match=r"lora_a \[3, 8, 2\] and lora_b \[3, 2, 8\] .* "
                                             r"got lora_a float32\[3, 8, 4\]"):
        lora(model, "**/attention/*", rank=2).apply(params, state, IDS)
    everything, _ = lora(model, rank=4).init(key, IDS)
    with pytest.raises(fnn.ParamError, match=r"^LoRA\(GPT\): unexpected adapters at "
                                             r"blocks/layers/ffn/down, blocks/layers/ffn/up, "
                                             r"head; this model adapts blocks/layers/attention"):
        adapted.apply(everything, state, IDS)
    with pytest.raises(fnn.ParamError, match=r"^MultiHeadAttention at blocks/layers/attention: "
                                             r"expected params .*: unexpected query/lora_a"):
        model.apply(everything, state, IDS)  # adapters given to the base model


def test_merge_and_frozen_refuse_what_is_not_lora_params():
    w = jnp.zeros((4, 6))
    with pytest.raises(fnn.ParamError, match=r"^merge_lora: params at head hold lora_a but no "
                                             r"lora_b"):
        merge_lora({"head": {"w": w, "lora_a": jnp.zeros((4, 2))}}, alpha=None)
    with pytest.raises(fnn.ParamError, match=r"^merge_lora: params at the top: expected lora_a "
                                             r"\[\*stack, in, rank\] .* got w float32\[4, 6\], "
                                             r"lora_a float32\[4, 2\], lora_b float32\[2, 5\]$"):
        merge_lora({"w": w, "lora_a": jnp.zeros((4, 2)), "lora_b": jnp.zeros((2, 5))},
                   alpha=None)
    with pytest.raises(ValueError, match=r"^lora_frozen: the params hold no adapters \(lora_a, "
                                         r"lora_b\); expected the params of a lora\(...\) model, "
                                         r"got leaves head/w$"):
        lora_frozen({"head": {"w": w}})
    with pytest.raises(ValueError, match=r"^lora_frozen \(trainable\): the pattern 'heads/\*\*' "
                                         r"matches no parameter"):
        lora_frozen({"head": {"w": w, "lora_a": w, "lora_b": w}}, trainable="heads/**")


# ----------------------------------------------------------------------------- fine-tuning

def test_lora_on_under_2_percent_of_the_parameters_undoes_a_domain_shift():
    """An MLP learns the digits; mirrored left-right, they fool it; rank-2 adapters on its
    three Dense layers, 1.4% of the parameters, trained alone, win the accuracy back."""
    start = time.perf_counter()
    digits = load_digits()
    model = fnn.models.MLP([512, 512], 10, flatten_axes=3)
    base, _ = fit(model, optax.adam(1e-3), digits, softmax_cross_entropy, epochs=10,
                  batch_size=64, progress=False)
    mirrored = Split(digits.x_train[:, :, ::-1], digits.y_train, digits.x_test[:, :, ::-1],
                     digits.y_test)
    evaluate_model = make_eval_step(model, softmax_cross_entropy)

    def accuracy(data):
        return evaluate(evaluate_model, base.params, base.state, data.x_test, data.y_test,
                        512)["accuracy"]

    before = accuracy(digits), accuracy(mirrored)
    adapted = lora(model, rank=2)
    params, state = adapted.init(jax.random.key(1), digits.x_train[:1])
    params = take(params, base.params, lora_frozen(params))  # the trained base
    fraction = fnn.param_count(lora_adapters(params)) / fnn.param_count(params)
    tuned, history = fit(adapted, param_groups(optax.adam(1e-2), frozen=lora_frozen(params)),
                         mirrored, softmax_cross_entropy, epochs=10, batch_size=64,
                         progress=False, params=params, state=state)
    after = history[-1]["test_accuracy"]
    print(f"base {before[0]:.4f}, mirrored {before[1]:.4f} -> {after:.4f} with {fraction:.2%} "
          f"of the parameters trained, {time.perf_counter() - start:.1f} s")
    assert before[0] > 0.95 and before[1] < 0.6
    assert fraction < 0.02
    assert after > 0.9
    jax.tree.map(np.testing.assert_array_equal, _base_part(tuned.params), base.params)
    # merged, the base model itself reads mirrored digits
    merged = merge_lora(tuned.params, alpha=None)
    np.testing.assert_allclose(
        evaluate(evaluate_model, merged, state, mirrored.x_test, mirrored.y_test,
                 512)["accuracy"], after, atol=1e-6)
