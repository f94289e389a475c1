"""Dropout: the drop rate, the scaling of kept values, the identity in evaluation, keys; a
``Seq`` passes through."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnn
from helpers import f32, f64, rand, run


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.75])
def test_dropout_rate_and_scaling(rate):
    n = 1_000_000
    x = jnp.ones((1000, 1000), jnp.float32)
    y, _ = fnn.Dropout(rate).apply({}, {}, x, key=jax.random.key(3), train=True)
    y = np.asarray(y)
    assert y.dtype == np.float32 and y.shape == x.shape
    zero = y == 0
    # the fraction of zeros is binomial: five standard deviations
    bound = 5 * math.sqrt(rate * (1 - rate) / n)
    assert abs(zero.mean() - rate) < bound, (zero.mean(), rate, bound)
    np.testing.assert_allclose(y[~zero], 1 / (1 - rate), rtol=1e-6)


def test_dropout_keeps_values_scaled():
    x = f32(rand((50, 40), 1))
    y, _ = fnn.Dropout(0.3).apply({}, {}, x, key=jax.random.key(1), train=True)
    kept = np.asarray(y) != 0
    assert 0 < kept.mean() < 1
    np.testing.assert_allclose(f64(y)[kept], f64(x)[kept] / 0.7, rtol=1e-6)


def test_dropout_eval_is_identity():
    x = f32(rand((4, 5), 1))
    for key in (None, jax.random.key(0)):
        y, state = fnn.Dropout(0.5).apply({}, {}, x, key=key, train=False)
        np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
        assert state == {}


def test_dropout_rate_zero_and_one():
    x = f32(rand((4, 5), 1))
    y0, _ = fnn.Dropout(0.0).apply({}, {}, x, key=jax.random.key(0), train=True)
    np.testing.assert_array_equal(np.asarray(y0), np.asarray(x))
    y1, _ = fnn.Dropout(1.0).apply({}, {}, x, key=jax.random.key(0), train=True)
    assert y1.dtype == x.dtype and y1.shape == x.shape
    np.testing.assert_array_equal(np.asarray(y1), np.zeros((4, 5)))
    y_int_rate, _ = fnn.Dropout(1).apply({}, {}, x, key=jax.random.key(0), train=True)
    np.testing.assert_array_equal(np.asarray(y_int_rate), np.zeros((4, 5)))


def test_dropout_same_key_same_mask():
    x = jnp.ones((64, 64), jnp.float32)
    layer = fnn.Dropout(0.5)
    a, _ = layer.apply({}, {}, x, key=jax.random.key(5), train=True)
    b, _ = layer.apply({}, {}, x, key=jax.random.key(5), train=True)
    c, _ = layer.apply({}, {}, x, key=jax.random.key(6), train=True)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    # the same key under jit gives the same mask too
    d, _ = jax.jit(lambda k: layer.apply({}, {}, x, key=k, train=True))(jax.random.key(5))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(d))


@pytest.mark.parametrize("rate", [-0.1, 1.5, True, "0.5"])
def test_dropout_rate_checked(rate):
    with pytest.raises(ValueError, match=re.escape(
            f"Dropout: rate is the drop probability and must be in [0, 1], got {rate!r}")):
        fnn.Dropout(rate)


def test_dropout_needs_a_key_in_training():
    with pytest.raises(fnn.MissingKeyError, match=re.escape(
            "Dropout is stochastic and needs a random key when train=True")):
        fnn.Dropout(0.5).apply({}, {}, jnp.ones((2, 3), jnp.float32), train=True)


DROPOUT = fnn.Dropout(0.5)


@pytest.mark.parametrize("train", [True, False])
def test_dropout_passes_a_seq_through(train):
    """Position-wise: the array dropped as in the plain call with the same key, the side inputs
    unchanged (and nothing left out at padded positions: dropout does not read lengths)."""
    x = f32(rand((2, 6, 8), 1))
    seq = fnn.Seq(x, lengths=jnp.array([6, 3], jnp.int32), positions=jnp.arange(6, dtype=jnp.int32),
                  memory=f32(rand((2, 4, 8), 2)))
    key = jax.random.key(9)
    y, state = run(DROPOUT, {}, seq, key=key, train=train)
    plain, _ = run(DROPOUT, {}, x, key=key, train=train)
    assert isinstance(y, fnn.Seq) and state == {}
    for name in ("lengths", "positions", "memory"):
        np.testing.assert_array_equal(np.asarray(getattr(y, name)),
                                      np.asarray(getattr(seq, name)), err_msg=name)
    assert y.mask is None and y.bias is None and y.memory_lengths is None
    np.testing.assert_array_equal(np.asarray(y.x), np.asarray(plain))
    if train:
        dropped = np.asarray(y.x) == 0
        assert 0.3 < dropped.mean() < 0.7  # the memory is not dropped: only the array is
    else:
        np.testing.assert_array_equal(np.asarray(y.x), np.asarray(x))
