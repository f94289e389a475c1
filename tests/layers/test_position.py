"""Positional encodings (fnn/layers/position.py): rotary embedding against a loop reference and
its relative-position property, ALiBi's slopes against the paper's rule and its biases against
the formula, and the learned and sinusoidal position embeddings against construction and the
formula of "Attention Is All You Need"."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnn
from fnn import Seq
from fnn.layers.position import (LearnedPositionEmbedding, SinusoidalPositionEmbedding,
                                 alibi_bias, alibi_slopes, apply_rope, sinusoidal_table)
from helpers import f64, make_params, rand, run

TOL = dict(rtol=2e-5, atol=2e-5)
B, T = 2, 5


# ============================================================================= RoPE

def rope_ref(x, positions, base=10000.0):
    """x: [..., T, H, D] float64; positions: [..., T]; rotate-half pairs (x[i], x[i + D/2])."""
    x = f64(x)
    d = x.shape[-1]
    half = d // 2
    out = np.empty_like(x)
    pos = np.broadcast_to(f64(positions), x.shape[:-2])
    for idx in np.ndindex(*x.shape[:-2]):
        for i in range(half):
            angle = pos[idx] * base ** (-2.0 * i / d)
            c, s = math.cos(angle), math.sin(angle)
            a, b = x[idx][:, i], x[idx][:, half + i]
            out[idx][:, i] = a * c - b * s
            out[idx][:, half + i] = b * c + a * s
    return out


def test_apply_rope_matches_reference_and_keeps_norms():
    x = rand((2, 6, 3, 8), 12)
    pos = np.array([[0, 1, 2, 3, 4, 5], [7, 3, 100, 2, 1, 0]], np.int32)
    rope = jax.jit(apply_rope, static_argnames="base")
    y = rope(jnp.asarray(x), jnp.asarray(pos))
    np.testing.assert_allclose(f64(y), rope_ref(x, pos), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(f64(y), axis=-1), np.linalg.norm(f64(x), axis=-1),
                               rtol=1e-5)
    np.testing.assert_allclose(f64(rope(jnp.asarray(x), jnp.zeros((2, 6), jnp.int32))), x)
    # positions shared by the batch, and another base
    shared = np.arange(6, dtype=np.int32) * 3
    np.testing.assert_allclose(f64(rope(jnp.asarray(x), jnp.asarray(shared), base=100.0)),
                               rope_ref(x, shared, base=100.0), rtol=1e-4, atol=1e-4)
    y16 = jax.eval_shape(apply_rope, jnp.asarray(x).astype(jnp.bfloat16), jnp.asarray(pos))
    assert y16.dtype == jnp.bfloat16


def test_rope_scores_depend_only_on_relative_positions():
    q, k = jnp.asarray(rand((5, 2, 8), 13)), jnp.asarray(rand((5, 2, 8), 14))
    pos = jnp.arange(5, dtype=jnp.int32)

    @jax.jit
    def scores(q_shift, k_shift):
        return jnp.einsum("thd,shd->hts", apply_rope(q, pos + q_shift),
                          apply_rope(k, pos + k_shift))

    np.testing.assert_allclose(f64(scores(37, 37)), f64(scores(0, 0)), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(f64(scores(1000, 1000)), f64(scores(0, 0)), rtol=1e-3, atol=1e-3)
    # but relative positions matter: shifting only the keys changes the scores
    assert not np.allclose(f64(scores(0, 2)), f64(scores(0, 0)), atol=1e-2)


def test_apply_rope_errors():
    for bad in (jnp.zeros((4, 2, 3)), jnp.zeros((4, 6))):
        with pytest.raises(fnn.ShapeError, match=r"^apply_rope: expected input \[\.\.\., time, "
                                                 r"heads, head_dim\] with an even head_dim, got "
                                                 r"float32\["):
            apply_rope(bad, jnp.arange(4))


# ============================================================================= ALiBi

def paper_slopes(n):
    """The slopes of the ALiBi paper's reference code (Press et al., 2022, ofirpress/attention_
    with_linear_biases): a geometric sequence starting at 2 ** (-8 / n) with that ratio for n a
    power of two; otherwise the closest power of two's, then every other slope of twice as
    many heads."""
    def power_of_2(n):
        start = 2 ** (-2 ** -(math.log2(n) - 3))
        return [start * start ** i for i in range(n)]

    if math.log2(n).is_integer():
        return power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_2(closest) + paper_slopes(2 * closest)[0::2][:n - closest]


@pytest.mark.parametrize("n", [1, 2, 4, 8, 3, 6, 12])
def test_alibi_slopes_follow_the_paper(n):
    slopes = alibi_slopes(n)
    assert slopes.shape == (n,) and slopes.dtype == np.float64
    np.testing.assert_allclose(slopes, paper_slopes(n), rtol=1e-12)
    if n & (n - 1) == 0:  # a power of two: 2 ** (-8 (h + 1) / n)
        np.testing.assert_allclose(slopes, [2.0 ** (-8 * (h + 1) / n) for h in range(n)],
                                   rtol=1e-12)


def test_alibi_slopes_values_for_4_8_and_6_heads():
    np.testing.assert_array_equal(alibi_slopes(4), [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8])
    np.testing.assert_array_equal(alibi_slopes(8), [2.0 ** -k for k in range(1, 9)])
    # 6 heads: the 4 of n = 4, then the 1st and 3rd of n = 8 (2 ** -1, 2 ** -3)
    np.testing.assert_array_equal(alibi_slopes(6), [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8,
                                                    2 ** -1, 2 ** -3])
    with pytest.raises(ValueError, match=r"num_heads must be a positive integer, got 0"):
        alibi_slopes(0)


def test_alibi_bias_shape_and_values():
    q_pos, kv_pos = np.array([0, 1, 4]), np.array([0, 2, 3, 7])
    bias = jax.jit(alibi_bias, static_argnums=0)(4, jnp.asarray(q_pos), jnp.asarray(kv_pos))
    assert bias.shape == (4, 3, 4) and bias.dtype == jnp.float32
    expected = np.array([[[-2.0 ** (-8 * (h + 1) / 4) * abs(i - j) for j in kv_pos]
                          for i in q_pos] for h in range(4)])
    np.testing.assert_allclose(f64(bias), expected, rtol=1e-6)
    # per-example positions give per-example biases [B, heads, q_time, kv_time]
    batch_q = np.array([[0, 1, 2], [5, 3, 9]])
    batched = alibi_bias(6, jnp.asarray(batch_q), jnp.asarray(kv_pos), jnp.float32)
    assert batched.shape == (2, 6, 3, 4)
    slopes = paper_slopes(6)
    for b in range(2):
        for h in range(6):
            np.testing.assert_allclose(
                f64(batched[b, h]), -slopes[h] * np.abs(batch_q[b][:, None] - kv_pos[None]),
                rtol=1e-6)
    assert alibi_bias(2, jnp.arange(3), jnp.arange(3), jnp.bfloat16).dtype == jnp.bfloat16
    # the diagonal (a query and its own key) is never penalised
    assert np.all(np.diagonal(f64(alibi_bias(8, jnp.arange(5), jnp.arange(5))), axis1=-2,
                              axis2=-1) == 0)


# ============================================================================= position embeddings

def test_learned_position_embedding_adds_table_rows(key):
    layer = LearnedPositionEmbedding(8)
    x = jnp.asarray(rand((B, T, 4), 20))
    params, state = layer.init(key, x)
    assert jax.tree.map(jnp.shape, params) == {"table": (8, 4)} and state == {}
    params = make_params(layer, x)
    y, _ = run(layer, params, x)
    np.testing.assert_allclose(f64(y), f64(x) + f64(params["table"])[:T], **TOL)
    # decoding from an offset: positions pick the rows; the Seq passes through
    positions = np.array([[3], [6]], np.int32)
    lengths = jnp.array([1, 1])
    y, _ = run(layer, params, Seq(x[:, :1], positions=jnp.asarray(positions), lengths=lengths))
    assert isinstance(y, Seq)
    np.testing.assert_array_equal(np.asarray(y.lengths), np.asarray(lengths))
    np.testing.assert_allclose(f64(y.x), f64(x[:, :1]) + f64(params["table"])[positions], **TOL)
    with pytest.raises(fnn.ShapeError, match=r"^LearnedPositionEmbedding: expected input "
                                             r"\[\.\.\., time, features\] with time <= "
                                             r"max_length=8, got float32\[2, 9, 4\]$"):
        layer.apply(params, state, jnp.zeros((B, 9, 4)))
    with pytest.raises(fnn.ShapeError, match=r"LearnedPositionEmbedding at pos: expected input"):
        fnn.named("pos", layer).init(key, jnp.zeros((2, 9, 4)))


def test_sinusoidal_position_embedding_matches_formula():
    features, base = 6, 10000.0
    x = rand((B, T, features), 21)
    y, _ = SinusoidalPositionEmbedding().apply({}, {}, jnp.asarray(x))
    pe = np.zeros((T, features))
    for pos in range(T):
        for i in range(features // 2):  # interleaved: sin at 2i, cos at 2i + 1
            pe[pos, 2 * i] = math.sin(pos / base ** (2 * i / features))
            pe[pos, 2 * i + 1] = math.cos(pos / base ** (2 * i / features))
    np.testing.assert_allclose(f64(y), f64(x) + pe, **TOL)
    # positions give the same rows as the full table
    np.testing.assert_allclose(f64(sinusoidal_table(jnp.arange(3, 5), features)), pe[3:5],
                               **TOL)
    y, _ = SinusoidalPositionEmbedding(base=base).apply(
        {}, {}, Seq(jnp.asarray(x[:, :2]), positions=jnp.arange(3, 5)))
    assert isinstance(y, Seq)
    np.testing.assert_allclose(f64(y.x), f64(x[:, :2]) + pe[3:5], **TOL)
    with pytest.raises(fnn.ShapeError, match=r"^SinusoidalPositionEmbedding: expected input "
                                             r"\[\.\.\., time, features\] with time <= "
                                             r"max_length=4"):
        SinusoidalPositionEmbedding(4).apply({}, {}, jnp.asarray(x))
