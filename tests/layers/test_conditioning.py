"""timestep_features, TimestepEmbedding and FiLM against numpy formulas; their errors."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnn
from helpers import f32, f64, make_params, rand, run

TOL = dict(rtol=1e-5, atol=1e-5)


def timestep_features_ref(t, features, max_period=10000.0):
    """guided-diffusion's ``timestep_embedding``, in float64: cosines, then sines."""
    half = features // 2
    freqs = np.exp(-np.log(max_period) * np.arange(half) / half)
    angles = np.asarray(t, np.float64)[..., None] * freqs
    return np.concatenate([np.cos(angles), np.sin(angles)], axis=-1)


# ============================================================================= timesteps

@pytest.mark.parametrize("t", [np.array([0, 1, 7, 999]), np.array([[0.5, 3.25], [10.0, 250.0]]),
                               np.array(42)])
@pytest.mark.parametrize("features, max_period", [(8, 10000.0), (6, 100.0)])
def test_timestep_features_match_the_formula(t, features, max_period):
    y = fnn.timestep_features(jnp.asarray(t), features, max_period=max_period)
    assert y.shape == t.shape + (features,) and y.dtype == jnp.float32
    np.testing.assert_allclose(f64(y), timestep_features_ref(t, features, max_period),
                               rtol=1e-5, atol=1e-4)


def test_timestep_features_errors():
    with pytest.raises(ValueError, match=r"^timestep_features: features must be even"):
        fnn.timestep_features(jnp.zeros(3), 5)
    with pytest.raises(fnn.ShapeError, match=r"^timestep_features: expected input timesteps "
                                             r"int\[\.\.\.\] or float\[\.\.\.\], got bool\[3\]$"):
        fnn.timestep_features(jnp.zeros(3, bool), 4)


def test_timestep_embedding_is_features_then_an_mlp():
    layer = fnn.TimestepEmbedding(6, hidden_features=10, frequency_features=4)
    t = jnp.array([0, 5, 999])
    params = make_params(layer, t)
    assert jax.tree.map(jnp.shape, params) == {"dense1": {"b": (10,), "w": (4, 10)},
                                               "dense2": {"b": (6,), "w": (10, 6)}}
    y, _ = run(layer, params, t)
    p = jax.tree.map(f64, params)
    h = timestep_features_ref(np.asarray(t), 4) @ p["dense1"]["w"] + p["dense1"]["b"]
    h = h / (1 + np.exp(-h))  # silu
    np.testing.assert_allclose(f64(y), h @ p["dense2"]["w"] + p["dense2"]["b"], **TOL)
    assert y.dtype == jnp.float32
    # float timesteps give the same as the int ones; bfloat16 ones compute in bfloat16
    np.testing.assert_allclose(f64(run(layer, params, t.astype(jnp.float32))[0]), f64(y), **TOL)
    assert run(layer, params, t.astype(jnp.bfloat16))[0].dtype == jnp.bfloat16


def test_timestep_embedding_defaults_and_errors():
    params, _ = fnn.TimestepEmbedding(8).init(jax.random.key(0), jnp.zeros((2,), jnp.int32))
    assert jax.tree.map(jnp.shape, params) == {"dense1": {"b": (8,), "w": (8, 8)},
                                               "dense2": {"b": (8,), "w": (8, 8)}}
    with pytest.raises(ValueError, match=r"frequency_features must be even"):
        fnn.TimestepEmbedding(7)
    with pytest.raises(ValueError, match=r"unknown activation 'swish'"):
        fnn.TimestepEmbedding(8, activation="swish")
    with pytest.raises(fnn.ShapeError, match=r"^TimestepEmbedding: expected input timesteps"):
        fnn.TimestepEmbedding(8).init(jax.random.key(0), fnn.Seq(jnp.zeros((2, 3))))


# ============================================================================= FiLM

@pytest.mark.parametrize("x_shape, c_shape", [((2, 4, 5, 3), (2, 6)), ((2, 7, 3), (2, 6)),
                                              ((3, 2, 4, 4, 3), (3, 2, 6)), ((4, 3), (4, 6)),
                                              ((4, 4, 3), (6,))])
def test_film_matches_the_formula(x_shape, c_shape):
    x, condition = f32(rand(x_shape, 1)), f32(rand(c_shape, 2))
    layer = fnn.FiLM()
    params = make_params(layer, (x, condition))
    y, _ = run(layer, params, (x, condition))
    film = f64(condition) @ f64(params["w"]) + f64(params["b"])
    spatial = len(x_shape) - len(c_shape)
    film = film.reshape(film.shape[:-1] + (1,) * spatial + film.shape[-1:])
    scale, shift = film[..., :3], film[..., 3:]
    np.testing.assert_allclose(f64(y), f64(x) * (1 + scale) + shift, **TOL)


def test_film_starts_as_the_identity_and_without_bias():
    x, condition = f32(rand((2, 4, 4, 3), 1)), f32(rand((2, 5), 2))
    params, state = fnn.FiLM().init(jax.random.key(0), (x, condition))
    assert jax.tree.map(jnp.shape, params) == {"b": (6,), "w": (5, 6)}
    np.testing.assert_array_equal(np.asarray(run(fnn.FiLM(), params, (x, condition))[0]),
                                  np.asarray(x))
    params, _ = fnn.FiLM(use_bias=False).init(jax.random.key(0), (x, condition))
    assert sorted(params) == ["w"]


def test_film_errors():
    layer = fnn.FiLM()
    x, condition = jnp.zeros((2, 4, 4, 3)), jnp.zeros((2, 5))
    params, _ = layer.init(jax.random.key(0), (x, condition))
    expected = "(x [..., *spatial, C], condition [..., D]) with the same batch axes [...]"
    with pytest.raises(fnn.ShapeError, match="^" + re.escape(
            f"FiLM: expected input {expected}, got (float32[2, 4, 4, 3], float32[3, 5])") + "$"):
        layer.apply(params, {}, (x, jnp.zeros((3, 5))))
    with pytest.raises(fnn.ShapeError, match="^" + re.escape(
            f"FiLM: expected input {expected}, got float32[2, 4, 4, 3]") + "$"):
        layer.apply(params, {}, x)
    with pytest.raises(fnn.ShapeError, match=re.escape(
            "FiLM: expected condition [..., 5] (the rows of w), got float32[2, 4]")):
        layer.apply(params, {}, (x, jnp.zeros((2, 4))))
    with pytest.raises(fnn.ParamError, match=r"^FiLM at film: expected params"):
        fnn.serial(film=layer).apply({"film": params}, {}, (jnp.zeros((2, 4, 4, 2)), condition))
