"""Activation layers: every name in ``fnn.layers.ACTIVATIONS`` maps to the right ``jax.nn``
function ("gelu" the exact erf GELU, "gelu_tanh" the tanh approximation, checked against their
float64 formulas); the activations pass a ``Seq`` through."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnn
from helpers import f32, f64, rand, run

VALUES = np.array([-7.0, -3.0, -1.5, -0.5, -0.01, 0.0, 0.3, 1.0, 2.5, 8.0], np.float32)

# the function each name stands for, with its default arguments
EXPECTED = {
    "identity": lambda x: x,
    "relu": jax.nn.relu,
    "relu6": jax.nn.relu6,
    "leaky_relu": lambda x: jax.nn.leaky_relu(x, negative_slope=0.01),
    "elu": lambda x: jax.nn.elu(x, alpha=1.0),
    "celu": lambda x: jax.nn.celu(x, alpha=1.0),
    "selu": jax.nn.selu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
    "mish": jax.nn.mish,
    "tanh": jnp.tanh,
    "hard_tanh": jax.nn.hard_tanh,
    "sigmoid": jax.nn.sigmoid,
    "softplus": jax.nn.softplus,
}


def test_activation_names():
    """Every name is tested below: a new name must be added here with its function."""
    assert set(fnn.layers.ACTIVATIONS) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_activation_maps_to_its_jax_function(name):
    layer = fnn.layers.activation(name)
    assert isinstance(layer, fnn.Layer)
    params, state = layer.init(jax.random.key(0), f32(VALUES))
    assert params == {} and state == {}
    y, _ = run(layer, {}, f32(VALUES))
    expected = np.asarray(EXPECTED[name](f32(VALUES)))
    assert y.dtype == jnp.float32 and y.shape == VALUES.shape
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-6, atol=1e-7)
    assert fnn.layers.ACTIVATIONS[name]().name == layer.name


def _gelu_erf(x):
    x = f64(x)
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def _gelu_tanh(x):
    x = f64(x)
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def test_gelu_is_exact_and_gelu_tanh_approximate():
    """The two formulas differ by up to 4e-4 on these values, far above float32 rounding."""
    x = np.array([-3.0, -2.0, -1.5, 1.5, 3.0], np.float32)
    exact, approx = _gelu_erf(x), _gelu_tanh(x)
    assert np.min(np.abs(exact - approx)) > 9e-5
    y_exact, _ = run(fnn.layers.activation("gelu"), {}, f32(x))
    y_tanh, _ = run(fnn.layers.activation("gelu_tanh"), {}, f32(x))
    np.testing.assert_allclose(f64(y_exact), exact, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(f64(y_tanh), approx, rtol=1e-6, atol=1e-6)
    y_default, _ = run(fnn.Gelu(), {}, f32(x))
    np.testing.assert_array_equal(np.asarray(y_default), np.asarray(y_exact))


def test_unknown_activation():
    with pytest.raises(ValueError, match=re.escape(
            f"unknown activation 'gelu_exact'; expected one of {sorted(EXPECTED)}")):
        fnn.layers.activation("gelu_exact")


@pytest.mark.parametrize("layer", [fnn.layers.activation(name) for name in sorted(EXPECTED)]
                         + [fnn.Softmax(), fnn.LogSoftmax(), fnn.Lambda(lambda x: 2.0 * x)],
                         ids=sorted(EXPECTED) + ["softmax", "log_softmax", "lambda"])
def test_activations_pass_a_seq_through(layer):
    """Position-wise: the array as in the plain call, the side inputs unchanged."""
    x = f32(rand((2, 4, 3), 1) * 3)
    seq = fnn.Seq(x, lengths=jnp.array([4, 1], jnp.int32),
                  mask=jnp.tril(jnp.ones((4, 4), bool)))
    assert layer.init(jax.random.key(0), seq) == ({}, {})
    y, _ = run(layer, {}, seq)
    plain, _ = run(layer, {}, x)
    assert isinstance(y, fnn.Seq)
    np.testing.assert_array_equal(np.asarray(y.lengths), [4, 1])
    np.testing.assert_array_equal(np.asarray(y.mask), np.tril(np.ones((4, 4), bool)))
    assert y.positions is None and y.memory is None
    np.testing.assert_array_equal(np.asarray(y.x), np.asarray(plain))


# ============================================================================= PReLU

@pytest.fixture
def torch():
    return pytest.importorskip("torch", reason="torch is the reference (pip install torch)")


@pytest.mark.parametrize("per_channel", [False, True], ids=["shared", "per_channel"])
def test_prelu_matches_torch_with_the_slope_gradient(torch, per_channel):
    """Values, and the gradients with respect to the input and to the slope(s), against
    torch's nn.PReLU on NCHW images (channels on axis 1, fnn's on the last); zeros included,
    where both take the slope's side."""
    channels = 3
    x = rand((2, 4, 5, channels), 1)
    x[0, 0, :2] = 0.0
    g = rand(x.shape, 2)
    slope = rand((channels,) if per_channel else (), 3) * 0.3
    module = torch.nn.PReLU(channels if per_channel else 1)
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(np.asarray(slope, np.float32).reshape(-1)))
    xt = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1))).requires_grad_()
    yt = module(xt)
    yt.backward(torch.from_numpy(np.ascontiguousarray(np.moveaxis(g, -1, 1))))

    layer = fnn.PReLU(per_channel=per_channel)
    params, _ = layer.init(jax.random.key(0), f32(x))
    assert jax.tree.map(jnp.shape, params) == {"slope": (channels,) if per_channel else ()}
    np.testing.assert_array_equal(np.asarray(params["slope"]), 0.25)

    def loss(p, v):
        return jnp.sum(layer.apply(p, {}, v)[0] * f32(g))

    y, _ = run(layer, {"slope": f32(slope)}, f32(x))
    dp, dx = jax.grad(loss, argnums=(0, 1))({"slope": f32(slope)}, f32(x))
    np.testing.assert_allclose(f64(y), np.moveaxis(yt.detach().numpy(), 1, -1), rtol=1e-6,
                               atol=1e-6)
    np.testing.assert_allclose(f64(dx), np.moveaxis(xt.grad.numpy(), 1, -1), rtol=1e-6,
                               atol=1e-6)
    np.testing.assert_allclose(f64(dp["slope"]).reshape(-1), module.weight.grad.numpy(),
                               rtol=1e-5, atol=1e-5)


def test_prelu_dtypes_and_seq():
    layer = fnn.PReLU(per_channel=True, init=0.1, param_dtype=jnp.bfloat16)
    x = f32(rand((2, 4, 3), 1))
    params, _ = layer.init(jax.random.key(0), x)
    assert params["slope"].dtype == jnp.bfloat16
    y, _ = run(layer, params, x.astype(jnp.bfloat16))
    assert y.dtype == jnp.bfloat16
    seq = fnn.Seq(x, lengths=jnp.array([4, 1], jnp.int32))
    y, _ = run(layer, params, seq)
    assert isinstance(y, fnn.Seq)
    np.testing.assert_array_equal(np.asarray(y.lengths), [4, 1])
    np.testing.assert_array_equal(np.asarray(y.x), np.asarray(run(layer, params, x)[0]))


def test_prelu_errors_name_the_layer_and_expected_versus_got():
    layer = fnn.PReLU(per_channel=True)
    params = {"slope": jnp.zeros((3,))}
    with pytest.raises(fnn.ShapeError, match=re.escape(
            "PReLU: expected input [..., 3], got float32[2, 4]")):
        layer.apply(params, {}, jnp.zeros((2, 4)))
    with pytest.raises(fnn.ParamError, match=re.escape(
            "PReLU: expected params {slope: [channels]}, got {slope: float32[]}: slope is "
            "float32[], expected [channels]")):
        layer.apply({"slope": jnp.zeros(())}, {}, jnp.zeros((2, 3)))
    with pytest.raises(fnn.ParamError, match=re.escape(
            "PReLU: expected params {slope: []}, got {slope: float32[3]}: slope is float32[3], "
            "expected []")):
        fnn.PReLU().apply(params, {}, jnp.zeros((2, 3)))
    with pytest.raises(fnn.ShapeError, match=re.escape(
            "PReLU: expected a floating-point input [...], got int32[2, 3]")):
        fnn.PReLU().apply({"slope": jnp.zeros(())}, {}, jnp.zeros((2, 3), jnp.int32))
    with pytest.raises(fnn.ShapeError, match=re.escape(
            "PReLU: expected input [..., channels], got float32[]")):
        layer.init(jax.random.key(0), jnp.zeros(()))
