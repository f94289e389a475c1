"""The MLP and LeNet: their param trees, names and values by construction."""

import jax
import jax.numpy as jnp
import numpy as np

from fnn.models import MLP, LeNet


def _shapes(tree):
    return jax.tree.map(jnp.shape, tree)


def test_mlp_is_dense_activation_pairs_then_a_head(key):
    model = MLP([6, 4], 3, activation="tanh", flatten_axes=2)
    x = jnp.linspace(-1, 1, 2 * 3 * 5).reshape(2, 3, 5)
    params, state = model.init(key, x)
    assert model.name == "MLP" and state == {}
    assert _shapes(params) == {"dense1": {"b": (6,), "w": (15, 6)},
                               "dense2": {"b": (4,), "w": (6, 4)},
                               "head": {"b": (3,), "w": (4, 3)}}
    y, _ = model.apply(params, state, x)
    p = jax.tree.map(np.asarray, params)
    h = np.tanh(np.asarray(x).reshape(2, 15) @ p["dense1"]["w"] + p["dense1"]["b"])
    h = np.tanh(h @ p["dense2"]["w"] + p["dense2"]["b"])
    np.testing.assert_allclose(y, h @ p["head"]["w"] + p["head"]["b"], rtol=1e-5, atol=1e-6)


def test_lenet_layers_and_shapes(key):
    model = LeNet(7, features=(4, 8), kernel_size=3, hidden_features=16, dropout=0.5)
    spec = jax.ShapeDtypeStruct((2, 8, 8, 1), jnp.float32)
    params, _ = jax.eval_shape(model.init, key, spec)
    assert model.name == "LeNet"
    assert _shapes(params) == {"conv1": {"b": (4,), "w": (3, 3, 1, 4)},
                               "conv2": {"b": (8,), "w": (3, 3, 4, 8)},
                               "fc": {"b": (16,), "w": (2 * 2 * 8, 16)},
                               "head": {"b": (7,), "w": (16, 7)}}
    y, _ = jax.eval_shape(model.apply, params, {}, spec)
    assert y.shape == (2, 7)
