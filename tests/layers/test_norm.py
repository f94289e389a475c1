"""BatchNorm, LayerNorm, RMSNorm and GroupNorm against numpy references in float64; BatchNorm's
statistics over the valid positions of a ``Seq``; the checks of params and state."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnn
from helpers import f32, f64, init_apply, rand, run

TOL = dict(rtol=1e-5, atol=1e-5)


def normalize_ref(x, mean, var, eps, scale=None, b=None):
    y = (f64(x) - mean) / np.sqrt(var + eps)
    if scale is not None:
        y = y * f64(scale)
    if b is not None:
        y = y + f64(b)
    return y


def group_norm_ref(x, num_groups, start, scale, b, eps):
    """Loops over every leading index and group; normalises that block of spatial positions and
    channels with its own mean and biased variance."""
    x = f64(x)
    c_g = x.shape[-1] // num_groups
    y = np.empty_like(x)
    for lead in np.ndindex(*x.shape[:start]):
        for g in range(num_groups):
            idx = lead + (Ellipsis, slice(g * c_g, (g + 1) * c_g))
            block = x[idx]
            y[idx] = (block - block.mean()) / np.sqrt(block.var() + eps)
    return y * f64(scale) + f64(b)


def _message(text):
    return f"^{re.escape(text)}$"


def assert_same_side_inputs(y, seq):
    """``y`` is a Seq with the side inputs of ``seq`` (equal values; jit returns new arrays)."""
    assert isinstance(y, fnn.Seq), type(y)
    for name in seq._fields[1:]:
        given, out = getattr(seq, name), getattr(y, name)
        assert (given is None) == (out is None), name
        if given is not None:
            assert out.dtype == given.dtype, name
            np.testing.assert_array_equal(np.asarray(out), np.asarray(given), err_msg=name)


# ============================================================================= BatchNorm

def _bn_params_state(features, seed):
    params = {"scale": rand((features,), seed, low=0.5), "b": rand((features,), seed + 1)}
    state = {"mean": f32(rand((features,), seed + 2)),
             "var": f32(rand((features,), seed + 3, low=0.5))}
    return params, state


@pytest.mark.parametrize("shape", [(8, 5), (4, 3, 5), (2, 3, 4, 5)])
@pytest.mark.parametrize("momentum", [0.9, 0.99, 0.0])
def test_batch_norm_train(shape, momentum):
    x = f32(rand(shape, 1) * 3 + 1)
    layer = fnn.BatchNorm(momentum=momentum, epsilon=1e-3)
    params, state = _bn_params_state(shape[-1], 10)
    y, new_state = run(layer, {k: f32(v) for k, v in params.items()}, x, state, train=True)
    axes = tuple(range(len(shape) - 1))
    mean, var = f64(x).mean(axes), f64(x).var(axes)  # biased variance
    np.testing.assert_allclose(f64(y), normalize_ref(x, mean, var, 1e-3, params["scale"],
                                                     params["b"]), **TOL)
    assert new_state["mean"].dtype == jnp.float32 and new_state["var"].dtype == jnp.float32
    np.testing.assert_allclose(f64(new_state["mean"]),
                               momentum * f64(state["mean"]) + (1 - momentum) * mean, **TOL)
    np.testing.assert_allclose(f64(new_state["var"]),
                               momentum * f64(state["var"]) + (1 - momentum) * var, **TOL)


def test_batch_norm_eval_uses_running_statistics():
    x = f32(rand((4, 3, 5), 1) * 2)
    layer = fnn.BatchNorm()
    params, state = _bn_params_state(5, 20)
    y, new_state = run(layer, {k: f32(v) for k, v in params.items()}, x, state, train=False)
    np.testing.assert_allclose(
        f64(y), normalize_ref(x, f64(state["mean"]), f64(state["var"]), 1e-5, params["scale"],
                              params["b"]), **TOL)
    np.testing.assert_array_equal(np.asarray(new_state["mean"]), np.asarray(state["mean"]))
    np.testing.assert_array_equal(np.asarray(new_state["var"]), np.asarray(state["var"]))


def test_batch_norm_init_state_and_defaults():
    x = f32(rand((6, 4), 1) * 2 + 3)
    layer = fnn.BatchNorm()
    params, state = layer.init(jax.random.key(0), x)
    assert set(params) == {"scale", "b"} and set(state) == {"mean", "var"}
    np.testing.assert_array_equal(np.asarray(params["scale"]), np.ones(4))
    np.testing.assert_array_equal(np.asarray(params["b"]), np.zeros(4))
    np.testing.assert_array_equal(np.asarray(state["mean"]), np.zeros(4))
    np.testing.assert_array_equal(np.asarray(state["var"]), np.ones(4))
    y, _ = run(layer, params, x, state, train=True)
    np.testing.assert_allclose(f64(y), normalize_ref(x, f64(x).mean(0), f64(x).var(0), 1e-5),
                               **TOL)


def test_batch_norm_running_statistics_accumulate():
    layer = fnn.BatchNorm(momentum=0.8)
    batches = [f32(rand((6, 2, 3), seed) * (seed + 1) + seed) for seed in range(4)]
    params, state = layer.init(jax.random.key(0), batches[0])
    mean_ref, var_ref = np.zeros(3), np.ones(3)
    for x in batches:
        _, state = run(layer, params, x, state, train=True)
        mean_ref = 0.8 * mean_ref + 0.2 * f64(x).mean((0, 1))
        var_ref = 0.8 * var_ref + 0.2 * f64(x).var((0, 1))
        np.testing.assert_allclose(f64(state["mean"]), mean_ref, **TOL)
        np.testing.assert_allclose(f64(state["var"]), var_ref, **TOL)
    x = batches[0]
    y, after = run(layer, params, x, state, train=False)
    np.testing.assert_allclose(f64(y), normalize_ref(x, mean_ref, var_ref, 1e-5), **TOL)
    np.testing.assert_array_equal(np.asarray(after["mean"]), np.asarray(state["mean"]))


def test_batch_norm_without_scale_and_bias():
    x = f32(rand((5, 4), 1))
    layer = fnn.BatchNorm(use_scale=False, use_bias=False)
    params, state = layer.init(jax.random.key(0), x)
    assert params == {}
    y, _ = run(layer, params, x, state, train=True)
    np.testing.assert_allclose(f64(y), normalize_ref(x, f64(x).mean(0), f64(x).var(0), 1e-5),
                               **TOL)


# ----------------------------------------------------------------------------- BatchNorm on a Seq

BN_SEQ = fnn.BatchNorm(momentum=0.75, epsilon=1e-3)
LENGTHS = np.array([5, 2, 0, 4], np.int32)


def _valid_rows(x, lengths):
    """The valid positions of x [B, T, F] as rows [N, F] (a Python loop over the sequences)."""
    return np.concatenate([f64(x)[i, :n] for i, n in enumerate(lengths)], axis=0)


def test_batch_norm_seq_statistics_over_valid_positions():
    """Training on Seq(x [B, T, F], lengths): the mean and biased variance over the valid
    positions only, the running statistics updated with them; the output is the Seq with the
    same side inputs and every position normalised with those statistics."""
    x = rand((4, 5, 3), 1) * 2 + 1
    params, state = _bn_params_state(3, 30)
    params = {k: f32(v) for k, v in params.items()}
    positions = jnp.arange(5, dtype=jnp.int32)
    seq = fnn.Seq(f32(x), lengths=jnp.asarray(LENGTHS), positions=positions)
    y, new_state = run(BN_SEQ, params, seq, state, train=True)
    rows = _valid_rows(x, LENGTHS)
    assert rows.shape == (11, 3)
    mean, var = rows.mean(0), rows.var(0)
    np.testing.assert_allclose(f64(new_state["mean"]), 0.75 * f64(state["mean"]) + 0.25 * mean,
                               **TOL)
    np.testing.assert_allclose(f64(new_state["var"]), 0.75 * f64(state["var"]) + 0.25 * var,
                               **TOL)
    assert_same_side_inputs(y, seq)
    assert y.x.shape == (4, 5, 3) and y.x.dtype == jnp.float32
    np.testing.assert_allclose(f64(y.x), normalize_ref(x, mean, var, 1e-3, params["scale"],
                                                       params["b"]), rtol=1e-5, atol=1e-4)
    # the statistics differ from those of all positions: the lengths were used
    assert not np.allclose(mean, f64(x).reshape(-1, 3).mean(0), atol=1e-2)


@pytest.mark.parametrize("junk", [1e30, -1e30, np.inf, np.nan])
def test_batch_norm_seq_statistics_ignore_padded_values(junk):
    x = rand((4, 5, 3), 2)
    params, state = _bn_params_state(3, 40)
    params = {k: f32(v) for k, v in params.items()}
    lengths = jnp.asarray(LENGTHS)
    padded = (np.arange(5) >= LENGTHS[:, None])[..., None]
    x_junk = np.where(padded, np.float32(junk), x)
    y, clean = run(BN_SEQ, params, fnn.Seq(f32(x), lengths=lengths), state, train=True)
    y_junk, dirty = run(BN_SEQ, params, fnn.Seq(f32(x_junk), lengths=lengths), state, train=True)
    np.testing.assert_array_equal(np.asarray(dirty["mean"]), np.asarray(clean["mean"]))
    np.testing.assert_array_equal(np.asarray(dirty["var"]), np.asarray(clean["var"]))
    valid = ~np.broadcast_to(padded, x.shape)
    np.testing.assert_array_equal(np.asarray(y_junk.x)[valid], np.asarray(y.x)[valid])


def test_batch_norm_seq_eval_uses_running_statistics():
    x = rand((4, 5, 3), 3)
    params, state = _bn_params_state(3, 50)
    params = {k: f32(v) for k, v in params.items()}
    seq = fnn.Seq(f32(x), lengths=jnp.asarray(LENGTHS))
    y, new_state = run(BN_SEQ, params, seq, state, train=False)
    assert_same_side_inputs(y, seq)
    np.testing.assert_allclose(f64(y.x), normalize_ref(x, f64(state["mean"]), f64(state["var"]),
                                                       1e-3, params["scale"], params["b"]), **TOL)
    np.testing.assert_array_equal(np.asarray(new_state["mean"]), np.asarray(state["mean"]))
    np.testing.assert_array_equal(np.asarray(new_state["var"]), np.asarray(state["var"]))


def test_batch_norm_seq_without_lengths_uses_every_position():
    x = f32(rand((4, 5, 3), 4))
    params, state = _bn_params_state(3, 60)
    params = {k: f32(v) for k, v in params.items()}
    y_seq, s_seq = run(BN_SEQ, params, fnn.Seq(x), state, train=True)
    y, s = run(BN_SEQ, params, x, state, train=True)
    assert_same_side_inputs(y_seq, fnn.Seq(x))
    np.testing.assert_array_equal(np.asarray(y_seq.x), np.asarray(y))
    np.testing.assert_array_equal(np.asarray(s_seq["mean"]), np.asarray(s["mean"]))
    np.testing.assert_array_equal(np.asarray(s_seq["var"]), np.asarray(s["var"]))


def test_batch_norm_seq_lengths_checked():
    params, state = BN_SEQ.init(jax.random.key(0), jnp.zeros((4, 5, 3), jnp.float32))
    seq = fnn.Seq(jnp.zeros((4, 5, 3), jnp.float32), lengths=jnp.zeros((5,), jnp.int32))
    with pytest.raises(fnn.ShapeError, match=_message(
            "BatchNorm: expected lengths int[4] (the batch axes of x float32[4, 5, 3]), "
            "got int32[5]")):
        BN_SEQ.apply(params, state, seq, train=True)


# ============================================================================= LayerNorm, RMSNorm

@pytest.mark.parametrize("use_scale,use_bias", [(True, True), (True, False), (False, True),
                                                (False, False)])
def test_layer_norm(use_scale, use_bias):
    x = f32(rand((3, 4, 6), 1) * 2 + 1)
    scale, b = rand((6,), 2, low=0.5), rand((6,), 3)
    params = {}
    if use_scale:
        params["scale"] = scale
    if use_bias:
        params["b"] = b
    y, _, _ = init_apply(fnn.LayerNorm(use_scale=use_scale, use_bias=use_bias), x, params)
    xd = f64(x)
    expected = normalize_ref(xd, xd.mean(-1, keepdims=True), xd.var(-1, keepdims=True), 1e-5,
                             params.get("scale"), params.get("b"))
    np.testing.assert_allclose(f64(y), expected, **TOL)


def test_layer_norm_epsilon_and_no_batch_axis():
    x = f32(rand((5,), 1) * 0.01)  # small variance: epsilon matters
    y, _, _ = init_apply(fnn.LayerNorm(epsilon=1e-3), x, {"scale": rand((5,), 2),
                                                          "b": rand((5,), 3)})
    xd = f64(x)
    expected = normalize_ref(xd, xd.mean(), xd.var(), 1e-3, rand((5,), 2), rand((5,), 3))
    np.testing.assert_allclose(f64(y), expected, **TOL)


@pytest.mark.parametrize("shape", [(6,), (3, 6), (2, 3, 6)])
@pytest.mark.parametrize("epsilon", [1e-6, 1e-1])
def test_rms_norm(shape, epsilon):
    x = f32(rand(shape, 1) + 0.5)
    scale = rand((6,), 2, low=0.5)
    y, _, _ = init_apply(fnn.RMSNorm(epsilon=epsilon), x, {"scale": scale})
    xd = f64(x)
    expected = xd / np.sqrt(np.mean(xd ** 2, -1, keepdims=True) + epsilon) * f64(scale)
    np.testing.assert_allclose(f64(y), expected, **TOL)


def test_rms_norm_without_scale():
    x = f32(rand((3, 4), 1))
    y, _, _ = init_apply(fnn.RMSNorm(use_scale=False), x, {})
    xd = f64(x)
    np.testing.assert_allclose(f64(y), xd / np.sqrt(np.mean(xd ** 2, -1, keepdims=True) + 1e-6),
                               **TOL)


@pytest.mark.parametrize("layer", [fnn.LayerNorm(), fnn.RMSNorm()], ids=["LayerNorm", "RMSNorm"])
def test_feature_norms_pass_a_seq_through(layer):
    """Position-wise: the array normalised as in the plain call, the side inputs unchanged."""
    x = f32(rand((2, 5, 4), 1))
    params = {k: f32(rand(v.shape, 7 + i)) for i, (k, v) in
              enumerate(layer.init(jax.random.key(0), x)[0].items())}
    seq = fnn.Seq(x, lengths=jnp.array([5, 2], jnp.int32), mask=jnp.ones((5, 5), bool))
    assert layer.init(jax.random.key(0), seq)[0].keys() == params.keys()
    y, _ = run(layer, params, seq)
    plain, _ = run(layer, params, x)
    assert_same_side_inputs(y, seq)
    np.testing.assert_array_equal(np.asarray(y.x), np.asarray(plain))


# ============================================================================= GroupNorm

@pytest.mark.parametrize("shape,num_groups,start_axis", [
    ((2, 4, 5, 6), 2, -3),
    ((2, 4, 5, 6), 3, 1),
    ((2, 4, 5, 6), 1, 1),    # one group: layer norm over H, W, C
    ((2, 4, 5, 6), 6, -3),   # one channel per group: instance norm
    ((2, 3, 4, 6), 2, 2),    # two leading axes, one spatial axis
    ((2, 3, 4, 6), 3, -2),
    ((3, 8), 4, 1),          # no spatial axes
    ((5, 6), 2, -1),
    ((4, 5, 6), 3, 0),       # a single example without a batch axis
])
def test_group_norm(shape, num_groups, start_axis):
    x = f32(rand(shape, 1) * 2 + 1)
    c = shape[-1]
    scale, b = rand((c,), 2, low=0.5), rand((c,), 3)
    layer = fnn.GroupNorm(num_groups, start_axis=start_axis, epsilon=1e-3)
    y, _, _ = init_apply(layer, x, {"scale": scale, "b": b})
    start = start_axis + len(shape) if start_axis < 0 else start_axis
    expected = group_norm_ref(x, num_groups, start, scale, b, 1e-3)
    np.testing.assert_allclose(f64(y), expected, **TOL)


def test_group_norm_negative_start_axis_matches_vmap():
    x = f32(rand((2, 3, 4, 5, 6), 1))
    params = {"scale": f32(rand((6,), 2, low=0.5)), "b": f32(rand((6,), 3))}
    layer = fnn.GroupNorm(3, start_axis=-3)
    y, _ = run(layer, params, x)
    y_vmap = jax.jit(jax.vmap(jax.vmap(lambda v: layer.apply(params, {}, v)[0])))(x)
    np.testing.assert_allclose(f64(y), f64(y_vmap), **TOL)
    expected = group_norm_ref(x, 3, 2, params["scale"], params["b"], 1e-5)
    np.testing.assert_allclose(f64(y), expected, **TOL)


def test_group_norm_refuses_a_seq():
    """GroupNorm's statistics span the time axis, padding included: a Seq is refused."""
    layer = fnn.GroupNorm(3, start_axis=1)
    x = jnp.zeros((2, 5, 6), jnp.float32)
    params, _ = jax.eval_shape(layer.init, jax.random.key(0), x)
    seq = fnn.Seq(x, lengths=jnp.array([5, 2], jnp.int32))
    message = _message("GroupNorm: expected input [..., features], got "
                       "Seq(x=float32[2, 5, 6], lengths=int32[2])")
    with pytest.raises(fnn.ShapeError, match=message):
        layer.apply(params, {}, seq)
    with pytest.raises(fnn.ShapeError, match=message):
        layer.init(jax.random.key(0), seq)


# ============================================================================= params checked

def _zeros(shapes):
    return {k: jnp.zeros(s, jnp.float32) for k, s in shapes.items()}


NORM_PARAM_CASES = {
    # id: (layer, input shape, params shapes, the message)
    "layer_norm_scale": (fnn.LayerNorm(), (2, 4), {"scale": (5,), "b": (4,)},
                         "LayerNorm: expected params {scale: [4], b: [4]}, got "
                         "{scale: float32[5], b: float32[4]}: scale is float32[5], expected [4]"),
    "layer_norm_old_bias_name": (fnn.LayerNorm(), (2, 4), {"scale": (4,), "bias": (4,)},
                                 "LayerNorm: expected params {scale: [4], b: [4]}, got "
                                 "{scale: float32[4], bias: float32[4]}: missing b; "
                                 "unexpected bias"),
    "layer_norm_no_bias": (fnn.LayerNorm(use_bias=False), (2, 4), {"scale": (4,), "b": (4,)},
                           "LayerNorm: expected params {scale: [4]}, got "
                           "{scale: float32[4], b: float32[4]}: unexpected b"),
    "rms_norm_scale": (fnn.RMSNorm(), (3, 2, 4), {"scale": (2,)},
                       "RMSNorm: expected params {scale: [4]}, got {scale: float32[2]}: "
                       "scale is float32[2], expected [4]"),
    "rms_norm_has_no_b": (fnn.RMSNorm(), (2, 4), {"scale": (4,), "b": (4,)},
                          "RMSNorm: expected params {scale: [4]}, got "
                          "{scale: float32[4], b: float32[4]}: unexpected b"),
    "rms_norm_missing_scale": (fnn.RMSNorm(), (2, 4), {},
                               "RMSNorm: expected params {scale: [4]}, got {}: missing scale"),
    "group_norm_b": (fnn.GroupNorm(2, start_axis=1), (2, 3, 4), {"scale": (4,), "b": (2,)},
                     "GroupNorm: expected params {scale: [4], b: [4]}, got "
                     "{scale: float32[4], b: float32[2]}: b is float32[2], expected [4]"),
    "group_norm_per_group_scale": (fnn.GroupNorm(2, start_axis=1), (2, 3, 4),
                                   {"scale": (2, 2), "b": (4,)},
                                   "GroupNorm: expected params {scale: [4], b: [4]}, got "
                                   "{scale: float32[2, 2], b: float32[4]}: scale is "
                                   "float32[2, 2], expected [4]"),
}


@pytest.mark.parametrize("layer,shape,shapes,message", list(NORM_PARAM_CASES.values()),
                         ids=list(NORM_PARAM_CASES))
def test_norm_params_checked(layer, shape, shapes, message):
    with pytest.raises(fnn.ParamError, match=_message(message)):
        layer.apply(_zeros(shapes), {}, jnp.zeros(shape, jnp.float32))


BN_STATE = {"mean": (4,), "var": (4,)}
BN_PARAMS = {"scale": (4,), "b": (4,)}
BN_CASES = {
    # id: (layer, params shapes, state shapes, the message)
    "missing_var": (fnn.BatchNorm(), BN_PARAMS, {"mean": (4,)},
                    "BatchNorm: expected state {mean: [features], var: [features]}, got "
                    "{mean: float32[4]}: missing var"),
    "unexpected_state": (fnn.BatchNorm(), BN_PARAMS, BN_STATE | {"count": ()},
                         "BatchNorm: expected state {mean: [features], var: [features]}, got "
                         "{mean: float32[4], var: float32[4], count: float32[]}: "
                         "unexpected count"),
    "state_rank": (fnn.BatchNorm(), BN_PARAMS, {"mean": (1, 4), "var": (4,)},
                   "BatchNorm: expected state {mean: [features], var: [features]}, got "
                   "{mean: float32[1, 4], var: float32[4]}: mean is float32[1, 4], "
                   "expected [features]"),
    "var_unlike_mean": (fnn.BatchNorm(), BN_PARAMS, {"mean": (4,), "var": (5,)},
                        "BatchNorm: expected state {mean: [4], var: [4]}, got "
                        "{mean: float32[4], var: float32[5]}: var is float32[5], expected [4]"),
    "scale_unlike_state": (fnn.BatchNorm(), {"scale": (3,), "b": (4,)}, BN_STATE,
                           "BatchNorm: expected params {scale: [4], b: [4]}, got "
                           "{scale: float32[3], b: float32[4]}: scale is float32[3], "
                           "expected [4]"),
    "old_bias_name": (fnn.BatchNorm(), {"scale": (4,), "bias": (4,)}, BN_STATE,
                      "BatchNorm: expected params {scale: [4], b: [4]}, got "
                      "{scale: float32[4], bias: float32[4]}: missing b; unexpected bias"),
    "no_scale": (fnn.BatchNorm(use_scale=False), BN_PARAMS, BN_STATE,
                 "BatchNorm: expected params {b: [4]}, got {scale: float32[4], b: float32[4]}: "
                 "unexpected scale"),
}


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("layer,params,state,message", list(BN_CASES.values()),
                         ids=list(BN_CASES))
def test_batch_norm_params_and_state_checked(layer, params, state, message, train):
    with pytest.raises(fnn.ParamError, match=_message(message)):
        layer.apply(_zeros(params), _zeros(state), jnp.zeros((3, 4), jnp.float32), train=train)


def test_batch_norm_input_features_blamed_on_the_input():
    with pytest.raises(fnn.ShapeError, match=_message(
            "BatchNorm: expected input [..., 4], got float32[3, 5]")):
        fnn.BatchNorm().apply(_zeros(BN_PARAMS), _zeros(BN_STATE),
                              jnp.zeros((3, 5), jnp.float32), train=True)


def test_norm_param_error_names_its_path():
    model = fnn.serial(fnn.Dense(4), fnn.LayerNorm(), fnn.Dense(2))
    x = jnp.zeros((2, 3), jnp.float32)
    params = {"0": _zeros({"w": (3, 4), "b": (4,)}), "1": _zeros({"scale": (4,), "bias": (4,)})}
    with pytest.raises(fnn.ParamError, match=_message(
            "LayerNorm at 1: expected params {scale: [4], b: [4]}, got "
            "{scale: float32[4], bias: float32[4]}: missing b; unexpected bias")):
        model.apply(params, {}, x)


def test_batchnorm_averages_over_the_bound_batch_axis_and_names_an_unbound_one():
    x = jnp.asarray(rand((8, 3), seed=4))
    params, state = fnn.BatchNorm(momentum=0.0).init(jax.random.key(0), x)
    # the batch axis of fnn's data-parallel step, for a BatchNorm without an axis of its own
    with fnn.core.batch_axis("devices"):
        y = jax.pmap(lambda v: fnn.BatchNorm(momentum=0.0).apply(
            params, state, v, train=True)[0], axis_name="devices", devices=jax.devices()[:4])(
            x.reshape(4, 2, 3))
    whole, _ = fnn.BatchNorm(momentum=0.0).apply(params, state, x, train=True)
    np.testing.assert_allclose(np.asarray(y).reshape(8, 3), whole, rtol=1e-5, atol=1e-6)
    with pytest.raises(fnn.UnboundAxisError, match=r"^BatchNorm: averages its batch "
                                                   r"statistics over the mapped axis 'devices'"):
        fnn.BatchNorm(axis_name="devices").apply(params, state, x, train=True)


@pytest.mark.parametrize("make", [fnn.LayerNorm, fnn.RMSNorm, lambda: fnn.BatchNorm(),
                                  lambda: fnn.GroupNorm(2, start_axis=1)],
                         ids=["LayerNorm", "RMSNorm", "BatchNorm", "GroupNorm"])
def test_a_float64_numpy_input_computes_in_float32_without_a_warning(make):
    import warnings

    layer = make()
    x = np.linspace(-1.0, 1.0, 16).reshape(2, 2, 4)  # numpy's default: float64
    params, state = layer.init(jax.random.key(0), jnp.zeros((2, 2, 4)))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*requested dtype.*float64")
        y, _ = layer.apply(params, state, x, train=True)
    assert y.dtype == jnp.float32


# ============================================================================= InstanceNorm

@pytest.fixture
def torch():
    return pytest.importorskip("torch", reason="torch is the reference (pip install torch)")


@pytest.mark.parametrize("shape,start_axis", [((2, 7, 3), -2), ((2, 5, 6, 4), -3),
                                              ((2, 5, 6, 4), 1), ((2, 3, 4, 5, 2), -4)],
                         ids=["1d", "2d", "2d_start_axis_1", "3d"])
def test_instance_norm_matches_torch_with_gradients(torch, shape, start_axis):
    """nn.InstanceNorm1d/2d/3d(affine=True), no running statistics: values and the gradients
    with respect to the input, scale and b."""
    n = len(shape) - 2
    c = shape[-1]
    x = rand(shape, 1) * 2 + 1
    g = rand(shape, 2)
    scale, b = rand((c,), 3, low=0.5), rand((c,), 4)
    module = getattr(torch.nn, f"InstanceNorm{n}d")(c, affine=True, track_running_stats=False)
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(scale))
        module.bias.copy_(torch.from_numpy(b))
    xt = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1))).requires_grad_()
    yt = module(xt)
    yt.backward(torch.from_numpy(np.ascontiguousarray(np.moveaxis(g, -1, 1))))

    layer = fnn.InstanceNorm(start_axis=start_axis)
    params = {"scale": f32(scale), "b": f32(b)}

    def loss(p, v):
        return jnp.sum(layer.apply(p, {}, v)[0] * f32(g))

    y, _ = run(layer, params, f32(x))
    dp, dx = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, f32(x))
    np.testing.assert_allclose(f64(y), np.moveaxis(yt.detach().numpy(), 1, -1), **TOL)
    np.testing.assert_allclose(f64(dx), np.moveaxis(xt.grad.numpy(), 1, -1), **TOL)
    np.testing.assert_allclose(f64(dp["scale"]), module.weight.grad.numpy(), **TOL)
    np.testing.assert_allclose(f64(dp["b"]), module.bias.grad.numpy(), **TOL)
    # the same as GroupNorm with one channel per group
    same, _ = run(fnn.GroupNorm(c, start_axis=start_axis), params, f32(x))
    np.testing.assert_allclose(f64(y), f64(same), **TOL)


def test_instance_norm_init_without_affine_and_batch_axes():
    layer = fnn.InstanceNorm(start_axis=-3)
    params, state = layer.init(jax.random.key(0), jnp.zeros((2, 4, 4, 3)))
    assert jax.tree.map(jnp.shape, params) == {"scale": (3,), "b": (3,)} and state == {}
    np.testing.assert_array_equal(np.asarray(params["scale"]), 1.0)
    np.testing.assert_array_equal(np.asarray(params["b"]), 0.0)
    bare = fnn.InstanceNorm(start_axis=-3, use_scale=False, use_bias=False, epsilon=1e-3)
    assert bare.init(jax.random.key(0), jnp.zeros((2, 4, 4, 3))) == ({}, {})
    x = f32(rand((2, 3, 4, 5, 6), 1) * 3)
    y, _ = run(bare, {}, x)
    xf = f64(x)
    mean, var = xf.mean((2, 3), keepdims=True), xf.var((2, 3), keepdims=True)
    np.testing.assert_allclose(f64(y), (xf - mean) / np.sqrt(var + 1e-3), **TOL)
    single, _ = run(bare, {}, x[1, 2])  # no batch axis at all
    np.testing.assert_allclose(f64(single), f64(y[1, 2]), **TOL)
    y16, _ = run(bare, {}, x.astype(jnp.bfloat16))
    assert y16.dtype == jnp.bfloat16


def test_instance_norm_errors():
    with pytest.raises(TypeError, match="start_axis"):
        fnn.InstanceNorm()
    with pytest.raises(TypeError, match=re.escape(
            "InstanceNorm: start_axis must be an int (-3 for [..., H, W, C]), got None")):
        fnn.InstanceNorm(start_axis=None)
    layer = fnn.InstanceNorm(start_axis=-3)
    with pytest.raises(fnn.ShapeError, match=_message(
            "InstanceNorm: expected input [..., 2 spatial axes, features], got float32[4, 3]")):
        layer.init(jax.random.key(0), jnp.zeros((4, 3)))
    with pytest.raises(fnn.ShapeError, match=_message(
            "InstanceNorm: expected input [*lead, *spatial, features] with the spatial axes "
            "from axis 2, got float32[4, 3]")):
        fnn.InstanceNorm(start_axis=2).apply({}, {}, jnp.zeros((4, 3)))
    params = {"scale": jnp.ones(3), "b": jnp.zeros(3)}
    with pytest.raises(fnn.ParamError, match=_message(
            "InstanceNorm: expected params {scale: [4], b: [4]}, got {scale: float32[3], "
            "b: float32[3]}: scale is float32[3], expected [4]")):
        layer.apply(params, {}, jnp.zeros((2, 5, 5, 4)))
    with pytest.raises(fnn.ShapeError, match=_message(
            "InstanceNorm: expected input [..., 2 spatial axes, features], got "
            "Seq(x=float32[2, 5, 5, 3])")):
        layer.apply(params, {}, fnn.Seq(jnp.zeros((2, 5, 5, 3))))
    with pytest.raises(fnn.ShapeError, match=_message(
            "InstanceNorm: expected a floating-point input [..., 2 spatial axes, features], "
            "got int32[2, 5, 5, 3]")):
        layer.apply(params, {}, jnp.zeros((2, 5, 5, 3), jnp.int32))
