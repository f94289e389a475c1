"""``attention_weights``: the self-attention weights of a MultiHeadAttention's params.

Checked by construction (zero queries give uniform weights over the allowed keys), by their
properties (rows sum to 1, the causal upper triangle is exactly 0) and against the layer itself:
the weights times the value projection, through the output projection, give
``MultiHeadAttention.apply``'s output for causal, RoPE, grouped-query, biased and masked layers.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnn
from refutil import make_params, rand, run
from fnn.layers.attention import AttentionInput, MultiHeadAttention, attention_weights

TOL = dict(rtol=2e-5, atol=2e-5)
# jitted: one compilation instead of many small eager dispatches keeps the file fast
weights_of = jax.jit(attention_weights, static_argnames=("causal", "rope", "rope_base"))


@jax.jit
def output_from_weights(params, x, weights):
    """The layer's output rebuilt from ``weights: [..., N, T, T]``: ``weights @ v`` per head
    (key/value head ``h // group`` for query head ``h``), then the output projection."""
    heads, kv_heads = params["query"]["w"].shape[1], params["value"]["w"].shape[1]
    v = jnp.einsum("...tf,fkd->...tkd", x, params["value"]["w"])
    if "b" in params["value"]:
        v = v + params["value"]["b"].reshape((1,) * (v.ndim - 2) + v.shape[-2:])
    v = jnp.repeat(v, heads // kv_heads, axis=-2)  # [..., T, N, D]
    out = jnp.einsum("...hts,...shd->...thd", weights, v)
    y = jnp.einsum("...thd,hdo->...to", out, params["out"]["w"])
    if "b" in params["out"]:
        y = y + params["out"]["b"].reshape((1,) * (y.ndim - 1) + y.shape[-1:])
    return y


CASES = {
    "plain": (dict(num_heads=2), (2, 6, 8)),
    "causal": (dict(num_heads=2, causal=True), (2, 6, 8)),
    "rope": (dict(num_heads=2, rope=True, rope_base=100.0), (2, 6, 8)),
    "causal_rope_gqa_bias": (dict(num_heads=4, num_kv_heads=2, causal=True, rope=True,
                                  use_bias=True), (2, 6, 8)),
    "mqa_no_batch": (dict(num_heads=4, num_kv_heads=1, causal=True), (5, 8)),
    "two_batch_axes": (dict(num_heads=2, num_kv_heads=1, use_bias=True), (2, 3, 4, 8)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_weights_reproduce_layer_output(name):
    kwargs, shape = CASES[name]
    layer = MultiHeadAttention(**kwargs)
    x = jnp.asarray(rand(shape, seed=1))
    params = make_params(layer, x)
    weights = weights_of(params, x, causal=kwargs.get("causal", False),
                                rope=kwargs.get("rope", False),
                                rope_base=kwargs.get("rope_base", 10000.0))
    heads, t = kwargs["num_heads"], shape[-2]
    assert weights.shape == shape[:-2] + (heads, t, t) and weights.dtype == jnp.float32
    assert bool(jnp.all(weights >= 0))
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-6)
    y, _ = run(layer, params, x)
    np.testing.assert_allclose(output_from_weights(params, x, weights), y, **TOL)


def test_causal_upper_triangle_is_exactly_zero():
    layer = MultiHeadAttention(2, causal=True)
    x = jnp.asarray(rand((3, 7, 8), seed=2))
    params = make_params(layer, x)
    weights = np.asarray(weights_of(params, x, causal=True))
    upper = np.triu(np.ones((7, 7), bool), k=1)
    assert np.all(weights[..., upper] == 0.0)
    assert np.all(weights[..., ~upper] > 0.0)
    # the first query sees only itself
    np.testing.assert_array_equal(weights[..., 0, 0], 1.0)


def test_zero_queries_give_uniform_weights():
    """With the query projection zero every logit is 0: weights are 1 / (number of allowed
    keys), i.e. 1 / t without a mask and 1 / (i + 1) in row i with ``causal``."""
    layer = MultiHeadAttention(2, num_kv_heads=1, use_bias=True)
    x = jnp.asarray(rand((4, 8), seed=3))
    params = make_params(layer, x)
    params["query"] = jax.tree.map(jnp.zeros_like, params["query"])
    np.testing.assert_allclose(weights_of(params, x), np.full((2, 4, 4), 0.25), rtol=1e-6)
    causal = np.tril(np.ones((4, 4))) / np.arange(1, 5)[:, None]
    np.testing.assert_allclose(weights_of(params, x, causal=True),
                               np.broadcast_to(causal, (2, 4, 4)), rtol=1e-6)


def test_mask_and_fully_masked_row():
    layer = MultiHeadAttention(2, use_bias=True)
    x = jnp.asarray(rand((2, 4, 8), seed=4))
    params = make_params(layer, x)
    # [B, 1, T, T]: example 0 may not attend to key 3; query row 1 of example 1 sees nothing
    mask = np.ones((2, 1, 4, 4), bool)
    mask[0, :, :, 3] = False
    mask[1, :, 1, :] = False
    weights = weights_of(params, x, mask=jnp.asarray(mask))
    w = np.asarray(weights)
    assert np.all(w[0, :, :, 3] == 0.0)
    np.testing.assert_allclose(w[0].sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(w[1, :, 1], 0.0)  # as the layer's zero attention result
    np.testing.assert_allclose(np.delete(w[1], 1, axis=1).sum(-1), 1.0, rtol=1e-6)
    y, _ = run(layer, params, AttentionInput(q=x, mask=jnp.asarray(mask)))
    np.testing.assert_allclose(output_from_weights(params, x, weights), y, **TOL)
    # a mask combines with causal
    both = np.asarray(weights_of(params, x, causal=True, mask=jnp.asarray(mask)))
    assert np.all(both[..., np.triu(np.ones((4, 4), bool), k=1)] == 0.0)
    np.testing.assert_allclose(both[0, :, 3, :3], w[0, :, 3, :3], rtol=1e-6)


def test_jit_bfloat16_and_float64():
    layer = MultiHeadAttention(2, num_kv_heads=1, causal=True, rope=True)
    x = jnp.asarray(rand((2, 5, 8), seed=5))
    params = make_params(layer, x)
    eager = attention_weights(params, x, causal=True, rope=True)
    jitted = jax.jit(functools.partial(attention_weights, causal=True, rope=True))(params, x)
    np.testing.assert_allclose(jitted, eager, **TOL)
    # bfloat16 input: computed and returned in float32, close to the float32 weights
    low = attention_weights(params, x.astype(jnp.bfloat16), causal=True, rope=True)
    assert low.dtype == jnp.float32
    np.testing.assert_allclose(low, eager, atol=3e-2)
    with jax.enable_x64(True):
        x64 = jnp.asarray(np.asarray(x, np.float64))
        w64 = attention_weights(params, x64, causal=True, rope=True)
        assert w64.dtype == jnp.float64
        np.testing.assert_allclose(w64, eager, **TOL)


def test_errors():
    layer = MultiHeadAttention(2, causal=True)
    x = jnp.zeros((2, 5, 8))
    params = make_params(layer, x)
    with pytest.raises(fnn.ShapeError, match=r"expected x float\[\.\.\., time, 8\].*got "
                                             r"float32\[2, 5, 6\]"):
        attention_weights(params, jnp.zeros((2, 5, 6)))
    with pytest.raises(fnn.ShapeError, match=r"got int32\[2, 5, 8\]"):
        attention_weights(params, jnp.zeros((2, 5, 8), jnp.int32))
    with pytest.raises(fnn.ShapeError, match=r"got float32\[8\]"):
        attention_weights(params, jnp.zeros((8,)))
    with pytest.raises(fnn.ShapeError, match=r"mask bool broadcastable to \[\.\.\., heads, "
                                             r"time, time\] = \[2, 2, 5, 5\], got bool\[3, 5\]"):
        attention_weights(params, x, mask=jnp.ones((3, 5), bool))
    with pytest.raises(fnn.ShapeError, match=r"got float32\[5, 5\]"):
        attention_weights(params, x, mask=jnp.ones((5, 5)))
    with pytest.raises(fnn.LayerError, match=r"entries 'query' and 'key'.*got \['w'\]"):
        attention_weights({"w": jnp.zeros((8, 8))}, x)
    cross = MultiHeadAttention(2)
    cross_params, _ = cross.init(jax.random.key(0), AttentionInput(q=x, kv=jnp.zeros((2, 3, 6))))
    with pytest.raises(fnn.LayerError, match=r"key w \[8, kv_heads, 4\].*got key w "
                                             r"float32\[6, 2, 4\]"):
        attention_weights(cross_params, x)
    odd = MultiHeadAttention(2, head_dim=3)
    odd_params, _ = odd.init(jax.random.key(0), x)
    with pytest.raises(fnn.LayerError, match="rope needs an even head_dim, got head_dim=3"):
        attention_weights(odd_params, x, rope=True)
