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
