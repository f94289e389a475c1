"""Dense against a numpy matmul; its params checked against its hyper-parameters; a ``Seq``
passes through."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnn
from helpers import f32, f64, init_apply, rand, run

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(5,), (3, 5), (2, 3, 5)])
@pytest.mark.parametrize("use_bias", [True, False])
def test_dense(shape, use_bias):
    x = f32(rand(shape, 1))
    params = {"w": rand((5, 4), 2)}
    if use_bias:
        params["b"] = rand((4,), 3)
    y, _, _ = init_apply(fnn.Dense(4, use_bias=use_bias), x, params)
    expected = f64(x) @ f64(params["w"]) + (f64(params["b"]) if use_bias else 0.0)
    assert y.shape == shape[:-1] + (4,)
    np.testing.assert_allclose(f64(y), expected, **TOL)


DENSE = fnn.Dense(4)


def test_dense_passes_a_seq_through():
    """Position-wise: the same params as for the array, the array as in the plain call, the side
    inputs unchanged."""
    x = f32(rand((2, 5, 3), 1))
    seq = fnn.Seq(x, lengths=jnp.array([5, 1], jnp.int32), positions=jnp.arange(5, dtype=jnp.int32),
                  bias=f32(rand((1, 1, 5, 5), 2)))
    params, state = DENSE.init(jax.random.key(0), seq)
    assert jax.tree.map(jnp.shape, params) == {"w": (3, 4), "b": (4,)} and state == {}
    params = {"w": f32(rand((3, 4), 3)), "b": f32(rand((4,), 4))}
    y, _ = run(DENSE, params, seq)
    plain, _ = run(DENSE, params, x)
    assert isinstance(y, fnn.Seq)
    for name in ("lengths", "positions", "bias"):
        given = getattr(seq, name)
        assert getattr(y, name).dtype == given.dtype
        np.testing.assert_array_equal(np.asarray(getattr(y, name)), np.asarray(given))
    assert y.mask is None and y.memory is None
    np.testing.assert_array_equal(np.asarray(y.x), np.asarray(plain))
    np.testing.assert_allclose(f64(y.x), f64(x) @ f64(params["w"]) + f64(params["b"]), **TOL)


# ============================================================================= params checked

def _message(text):
    return f"^{re.escape(text)}$"


def _zeros(shapes):
    return {k: jnp.zeros(s, jnp.float32) for k, s in shapes.items()}


DENSE_PARAM_CASES = {
    # id: (layer, input shape, params shapes, the message)
    "params_of_another_width": (
        fnn.Dense(5), (2, 3), {"w": (3, 4), "b": (4,)},
        "Dense: expected params {w: [in_features, 5], b: [5]}, got "
        "{w: float32[3, 4], b: float32[4]}: w is float32[3, 4], expected [in_features, 5]"),
    "missing_b": (
        fnn.Dense(4), (2, 3), {"w": (3, 4)},
        "Dense: expected params {w: [in_features, 4], b: [4]}, got {w: float32[3, 4]}: "
        "missing b"),
    "unexpected_entry": (
        fnn.Dense(4), (2, 3), {"w": (3, 4), "b": (4,), "scale": (4,)},
        "Dense: expected params {w: [in_features, 4], b: [4]}, got "
        "{w: float32[3, 4], b: float32[4], scale: float32[4]}: unexpected scale"),
    "unexpected_b_without_bias": (
        fnn.Dense(4, use_bias=False), (2, 3), {"w": (3, 4), "b": (4,)},
        "Dense: expected params {w: [in_features, 4]}, got "
        "{w: float32[3, 4], b: float32[4]}: unexpected b"),
    "missing_and_unexpected": (
        fnn.Dense(4), (2, 3), {"kernel": (3, 4), "bias": (4,)},
        "Dense: expected params {w: [in_features, 4], b: [4]}, got "
        "{kernel: float32[3, 4], bias: float32[4]}: missing w, b; unexpected kernel, bias"),
    "transposed_w": (  # w [4, 3] on x [..., 4]: blamed on w, not on the input
        fnn.Dense(3), (2, 4), {"w": (3, 4), "b": (3,)},
        "Dense: expected params {w: [in_features, 3], b: [3]}, got "
        "{w: float32[3, 4], b: float32[3]}: w is float32[3, 4], expected [in_features, 3]"),
    "b_shape": (
        fnn.Dense(4), (2, 3), {"w": (3, 4), "b": (1, 4)},
        "Dense: expected params {w: [in_features, 4], b: [4]}, got "
        "{w: float32[3, 4], b: float32[1, 4]}: b is float32[1, 4], expected [4]"),
    "w_rank": (
        fnn.Dense(4), (2, 3), {"w": (4,), "b": (4,)},
        "Dense: expected params {w: [in_features, 4], b: [4]}, got "
        "{w: float32[4], b: float32[4]}: w is float32[4], expected [in_features, 4]"),
}


@pytest.mark.parametrize("layer,shape,shapes,message", list(DENSE_PARAM_CASES.values()),
                         ids=list(DENSE_PARAM_CASES))
def test_dense_params_checked_against_hyper_parameters(layer, shape, shapes, message):
    with pytest.raises(fnn.ParamError, match=_message(message)):
        layer.apply(_zeros(shapes), {}, jnp.zeros(shape, jnp.float32))


def test_dense_params_not_a_dict():
    with pytest.raises(fnn.ParamError, match=_message(
            "Dense: expected params {w: [in_features, 4], b: [4]}, got list: "
            "params is a list, not a dict")):
        fnn.Dense(4).apply([jnp.zeros((3, 4))], {}, jnp.zeros((2, 3), jnp.float32))


def test_dense_input_blamed_when_params_fit_the_layer():
    """Params that fit Dense(4) but an input of another width: a ShapeError about the input."""
    with pytest.raises(fnn.ShapeError, match=_message(
            "Dense: expected input [..., 3], got float32[2, 5]")):
        fnn.Dense(4).apply(_zeros({"w": (3, 4), "b": (4,)}), {}, jnp.zeros((2, 5), jnp.float32))


def test_dense_param_error_names_its_path():
    """Inside serial, the message names the layer's position: Dense(5) at 1 given the params of a
    Dense(4)."""
    model = fnn.serial(fnn.Dense(3), fnn.Dense(5))
    x = jnp.zeros((2, 3), jnp.float32)
    params = {"0": _zeros({"w": (3, 3), "b": (3,)}), "1": _zeros({"w": (3, 4), "b": (4,)})}
    with pytest.raises(fnn.ParamError, match=_message(
            "Dense at 1: expected params {w: [in_features, 5], b: [5]}, got "
            "{w: float32[3, 4], b: float32[4]}: w is float32[3, 4], expected [in_features, 5]")):
        model.apply(params, {}, x)
    nested = fnn.serial(fnn.Relu(), fnn.serial(fnn.Dense(3), fnn.Dense(5)))
    params = {"1": {"0": _zeros({"w": (3, 3)}), "1": _zeros({"w": (3, 5), "b": (5,)})}}
    with pytest.raises(fnn.ParamError, match=_message(
            "Dense at 1/0: expected params {w: [in_features, 3], b: [3]}, got "
            "{w: float32[3, 3]}: missing b")):
        nested.apply(params, {}, x)


def test_a_float64_numpy_input_computes_in_float32_without_a_warning():
    import warnings

    layer = fnn.Dense(3)
    params, state = layer.init(jax.random.key(0), jnp.zeros((2, 4)))
    with warnings.catch_warnings():
        # JAX warns "Explicitly requested dtype float64 ... is not available" without x64
        warnings.filterwarnings("error", message=".*requested dtype.*float64")
        y, _ = layer.apply(params, state, np.ones((2, 4)))  # numpy's default dtype
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(y, np.ones((2, 4)) @ np.asarray(params["w"]), rtol=1e-6)
