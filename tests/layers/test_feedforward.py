"""The transformer's position-wise feed-forward network (fnn/layers/feedforward.py): values
against float64 numpy references written independently of fnn, dropout on the hidden units (the
mask drawn from the key of the child ``drop``), a ``Seq`` passing through, and errors.

References take the params the layer itself creates (names and shapes from ``init``, values drawn
by numpy), never stored numbers.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnn
from fnn.core import Seq
from fnn.layers.feedforward import GATED, FeedForward
from helpers import f64, make_params, rand, run

TOL = dict(rtol=2e-5, atol=2e-5)
B, T, F = 2, 5, 8

_erf = np.vectorize(math.erf)


def gelu_ref(v):
    return 0.5 * v * (1.0 + _erf(v / math.sqrt(2.0)))


def gelu_tanh_ref(v):
    return 0.5 * v * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v ** 3)))


def silu_ref(v):
    return v / (1.0 + np.exp(-v))


def relu_ref(v):
    return np.maximum(v, 0)


ACTS = {"gelu": gelu_ref, "gelu_tanh": gelu_tanh_ref, "relu": relu_ref}
GATES = {"swiglu": silu_ref, "geglu": gelu_ref, "reglu": relu_ref}


def dense_ref(p, x):
    y = x @ f64(p["w"])
    return y + f64(p["b"]) if "b" in p else y


def hidden_ref(p, x, activation="gelu"):
    x = f64(x)
    if activation in GATES:
        return GATES[activation](dense_ref(p["gate"], x)) * dense_ref(p["up"], x)
    return ACTS[activation](dense_ref(p["up"], x))


def ffn_ref(p, x, activation="gelu"):
    return dense_ref(p["down"], hidden_ref(p, x, activation))


@pytest.mark.parametrize("activation,use_bias", [("gelu", True), ("relu", False),
                                                 ("gelu_tanh", True), ("swiglu", False),
                                                 ("swiglu", True), ("geglu", True),
                                                 ("reglu", False)])
def test_feed_forward_matches_numpy_reference(key, activation, use_bias):
    ffn = FeedForward(12, activation=activation, use_bias=use_bias, out_features=3)
    x = jnp.asarray(rand((B, T, F), 6))
    params, state = ffn.init(key, x)
    names = {"gate", "up", "down"} if activation in GATED else {"up", "down"}
    assert set(params) == names and state == {}
    assert params["up"]["w"].shape == (F, 12) and params["down"]["w"].shape == (12, 3)
    assert ("b" in params["down"]) == use_bias
    params = make_params(ffn, x)
    y, _ = run(ffn, params, x)
    assert y.shape == (B, T, 3)
    np.testing.assert_allclose(f64(y), ffn_ref(params, x, activation), **TOL)


def test_gelu_is_exact_and_gelu_tanh_the_approximation():
    x = jnp.asarray(3 * rand((B, T, F), 1))
    exact, approx = FeedForward(16, activation="gelu"), FeedForward(16, activation="gelu_tanh")
    params = make_params(exact, x)
    y_exact, _ = run(exact, params, x)
    y_approx, _ = run(approx, params, x)
    np.testing.assert_allclose(f64(y_exact), ffn_ref(params, x, "gelu"), **TOL)
    np.testing.assert_allclose(f64(y_approx), ffn_ref(params, x, "gelu_tanh"), **TOL)
    assert not np.allclose(f64(y_exact), f64(y_approx), rtol=0, atol=1e-4)  # they do differ


def test_an_activation_layer_is_accepted():
    x = jnp.asarray(rand((B, F), 2))
    ffn = FeedForward(10, activation=fnn.Tanh())
    params = make_params(ffn, x)
    assert set(params) == {"up", "down"}
    y, _ = run(ffn, params, x)
    np.testing.assert_allclose(f64(y), dense_ref(params["down"], np.tanh(
        dense_ref(params["up"], f64(x)))), **TOL)


def test_feed_forward_dropout(key):
    ffn = FeedForward(64, dropout=0.5)
    x = jnp.asarray(rand((4, F), 7))
    params, state = ffn.init(key, x)
    y_eval, _ = run(ffn, params, x)
    np.testing.assert_allclose(f64(y_eval), ffn_ref(params, x), **TOL)
    y1, _ = run(ffn, params, x, key=jax.random.key(1), train=True)
    y2, _ = run(ffn, params, x, key=jax.random.key(2), train=True)
    assert not np.allclose(f64(y1), f64(y_eval)) and not np.allclose(f64(y1), f64(y2))
    # the mask: the hidden units are dropped with the key of the child "drop", declared third
    # (up, act, drop, down), i.e. fold_in(key, 2), and the kept ones scaled by 1 / (1 - rate)
    h = hidden_ref(params, x)
    keep = np.asarray(jax.random.bernoulli(jax.random.fold_in(jax.random.key(1), 2), 0.5,
                                           h.shape))
    assert 0.3 < keep.mean() < 0.7
    np.testing.assert_allclose(f64(y1), dense_ref(params["down"], np.where(keep, h / 0.5, 0)),
                               **TOL)
    with pytest.raises(fnn.MissingKeyError, match="^FeedForward is stochastic"):
        ffn.apply(params, state, x, train=True)
    with pytest.raises(fnn.MissingKeyError, match="^FeedForward at ffn is stochastic"):
        fnn.serial(ffn=ffn).apply({"ffn": params}, {}, x, train=True)
    # without dropout no key is needed in training
    y, _ = FeedForward(64).apply(params, state, x, train=True)
    np.testing.assert_allclose(f64(y), f64(y_eval), **TOL)


def test_a_seq_passes_through(key):
    ffn = FeedForward(12, activation="swiglu", out_features=3)
    x = jnp.asarray(rand((B, T, F), 8))
    lengths, positions = jnp.asarray([5, 2], jnp.int32), jnp.arange(T, dtype=jnp.int32)
    seq = Seq(x, lengths=lengths, positions=positions)
    params, state = ffn.init(key, seq)
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, ffn.init(key, x)[0])
    params = make_params(ffn, x)
    y, _ = run(ffn, params, seq)
    assert isinstance(y, Seq) and y.x.shape == (B, T, 3)
    np.testing.assert_allclose(f64(y.x), ffn_ref(params, x, "swiglu"), **TOL)
    np.testing.assert_array_equal(y.lengths, lengths)
    np.testing.assert_array_equal(y.positions, positions)
    assert y.mask is None and y.memory is None


def test_bad_hyper_parameters_and_inputs_are_rejected(key):
    with pytest.raises(ValueError, match="^FeedForward: unknown activation 'swish'"):
        FeedForward(8, activation="swish")
    with pytest.raises(ValueError, match="^FeedForward: hidden_features must be a positive"):
        FeedForward(0)
    with pytest.raises(ValueError, match="^FeedForward: out_features must be a positive"):
        FeedForward(8, out_features=0)
    with pytest.raises(ValueError, match="^FeedForward: dropout is a drop probability"):
        FeedForward(8, dropout=1.0)
    with pytest.raises(fnn.ShapeError, match=r"^FeedForward: expected input \[\.\.\., "
                                             r"features\], got float32\[\]$"):
        FeedForward(8).init(key, jnp.zeros(()))
