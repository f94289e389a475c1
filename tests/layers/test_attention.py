"""MultiHeadAttention against a float64 numpy reference, and its properties: causality, sliding
windows, ALiBi, additive biases, cached decoding, grouped-query attention, RoPE, both computation
paths (``jax.nn.dot_product_attention`` and the explicit einsum one), dropout on the attention
weights, fully masked rows, errors; the module's pieces (masks, ``dot_product_attention``, the
cache write); and ``attention_weights``.

The reference loops over every (example, head, query) and is written independently of fnn; the
layer gets float32 inputs and is compared with float32 tolerances. Calls are jitted (one
compilation per layer and input structure) to keep the file fast on a small CPU.
"""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnn
from fnn import Seq
from fnn.layers.attention import (MultiHeadAttention, attention_probs, attention_weights,
                                  causal_mask, combine_masks, dot_product_attention, init_cache,
                                  length_mask, window_mask, write_cache, zero_empty_rows)
from helpers import f64, make_params, rand, run

TOL = dict(rtol=2e-5, atol=2e-5)
IMPLEMENTATIONS = [pytest.param(None, id="dot_product_attention"),
                   pytest.param("einsum", id="einsum")]


# ============================================================================= reference

def rope_ref(x, positions, base=10000.0):
    """x: [B, T, H, D] float64; positions: [B, T]; rotate-half pairs (x[i], x[i + D/2])."""
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


def alibi_slope_ref(h, n):
    """ALiBi's slope of head ``h`` of ``n`` (a power of two): 2 ** (-8 (h + 1) / n)."""
    assert n & (n - 1) == 0
    return 2.0 ** (-8.0 * (h + 1) / n)


def band_ref(t, s, left, right, causal=False):
    """bool[t, s]: key j within [i - left, i + right] of query i (and j <= i with causal)."""
    out = np.zeros((t, s), bool)
    for i in range(t):
        for j in range(s):
            out[i, j] = i - left <= j <= i + right and (not causal or j <= i)
    return out


def mha_ref(params, x, *, memory=None, mask=None, memory_mask=None, bias=None, lengths=None,
            memory_lengths=None, positions=None, causal=False, window=None, alibi=False,
            rope=False):
    """Naive multi-head attention in float64. x: [B, T, F]; memory: [B, S, Fm] (cross-attention,
    which reads memory_mask and memory_lengths), else self-attention (mask, bias, lengths as
    query and key lengths, positions for RoPE and ALiBi). A query row with nothing to attend to
    (or past ``lengths``) gives a zero attention result."""
    p = jax.tree.map(f64, params)
    x = f64(x)
    cross = memory is not None
    kv = f64(memory) if cross else x
    (bsz, t, _), s = x.shape, kv.shape[1]
    n, d = p["query"]["w"].shape[1:]
    kvh = p["key"]["w"].shape[1]
    q = np.einsum("btf,fnd->btnd", x, p["query"]["w"])
    k = np.einsum("bsf,fnd->bsnd", kv, p["key"]["w"])
    v = np.einsum("bsf,fnd->bsnd", kv, p["value"]["w"])
    if "b" in p["query"]:
        q, k, v = q + p["query"]["b"], k + p["key"]["b"], v + p["value"]["b"]
    pos = np.broadcast_to(np.arange(t) if positions is None else np.asarray(positions), (bsz, t))
    if rope:
        q, k = rope_ref(q, pos), rope_ref(k, pos)
    allowed = np.ones((bsz, n, t, s), bool)
    m = memory_mask if cross else mask
    if m is not None:
        allowed &= np.broadcast_to(np.asarray(m), (bsz, n, t, s))
    extra = np.zeros((bsz, n, t, s))
    if bias is not None and not cross:
        extra = extra + np.broadcast_to(f64(bias), (bsz, n, t, s))
    key_lengths = memory_lengths if cross else lengths
    left, right = (None, None) if window is None else (
        (window, window) if isinstance(window, int) else window)
    out = np.zeros((bsz, t, n, d))
    for b in range(bsz):
        for h in range(n):
            kv_head = h // (n // kvh)
            for i in range(t):
                ok = allowed[b, h, i].copy()
                for j in range(s):
                    if causal and j > i:
                        ok[j] = False
                    if window is not None and not i - left <= j <= i + right:
                        ok[j] = False
                    if key_lengths is not None and j >= np.asarray(key_lengths)[b]:
                        ok[j] = False
                if lengths is not None and i >= np.asarray(lengths)[b]:
                    ok[:] = False
                if not ok.any():
                    continue
                logits = k[b, :, kv_head] @ q[b, i, h] / math.sqrt(d) + extra[b, h, i]
                if alibi:
                    logits = logits - alibi_slope_ref(h, n) * np.abs(pos[b, i] - pos[b, :s])
                logits = np.where(ok, logits, -np.inf)
                w = np.exp(logits - logits.max())
                out[b, i, h] = (w / w.sum()) @ v[b, :, kv_head]
    y = np.einsum("btnd,ndo->bto", out, p["out"]["w"])
    if "b" in p["out"]:
        y = y + p["out"]["b"]
    return y


def as_seq(fields):
    """A Seq of jax arrays from a dict of numpy fields (x included)."""
    return Seq(**{name: jnp.asarray(value) for name, value in fields.items()})


SETTINGS = ("causal", "window", "alibi", "rope")


def ref_of(params, fields, kwargs):
    """The reference for a layer built with ``kwargs`` applied to ``Seq(**fields)``."""
    return mha_ref(params, **fields, **{k: kwargs[k] for k in SETTINGS if k in kwargs})


# ============================================================================= against the reference

B, T, S, F = 2, 5, 7, 8
_rng = np.random.default_rng(7)
X = rand((B, T, F), 1)
MEMORY = rand((B, S, 6), 2)
HEAD_MASK = _rng.random((B, 4, T, T)) < 0.7  # per example and head
CROSS_MASK = _rng.random((B, 1, T, S)) < 0.6  # per example, shared by the heads
SHARED_MASK = _rng.random((T, S)) < 0.6  # shared by the batch and the heads
SHARED_BIAS = rand((T, T), 3)  # shared by the batch and the heads
HEAD_BIAS = rand((B, 4, T, T), 4)  # per example and head
POSITIONS = np.array([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]], np.int32)
LENGTHS = np.array([5, 3], np.int32)
CASES = {
    # id: (factory kwargs, Seq fields besides x)
    "bias": (dict(), {}),
    "no_bias": (dict(use_bias=False), {}),
    "causal_head_mask": (dict(causal=True), dict(mask=HEAD_MASK)),
    "causal_lengths": (dict(causal=True), dict(lengths=LENGTHS)),
    "cross_mask_lengths": (dict(cross=True, out_features=3, head_dim=3),
                           dict(memory=MEMORY, memory_mask=CROSS_MASK, lengths=LENGTHS,
                                memory_lengths=np.array([7, 4], np.int32))),
    "cross_shared_mask": (dict(cross=True), dict(memory=MEMORY, memory_mask=SHARED_MASK)),
    "gqa_rope": (dict(num_kv_heads=2, rope=True, causal=True), dict(mask=HEAD_MASK)),
    "mqa_cross": (dict(num_kv_heads=1, cross=True), dict(memory=MEMORY, memory_mask=CROSS_MASK)),
    "rope_positions": (dict(rope=True), dict(positions=POSITIONS)),
    "window": (dict(window=(1, 2)), {}),
    "causal_window_int": (dict(causal=True, window=2), {}),
    "alibi_causal": (dict(alibi=True, causal=True), {}),
    "alibi_positions": (dict(alibi=True), dict(positions=POSITIONS)),
    "shared_bias": (dict(causal=True), dict(bias=SHARED_BIAS)),
    "head_bias_mask": (dict(), dict(bias=HEAD_BIAS, mask=HEAD_MASK)),
    "gqa_window_alibi_bias_lengths": (
        dict(num_kv_heads=2, window=(2, 1), alibi=True, rope=True),
        dict(bias=SHARED_BIAS, lengths=LENGTHS, positions=POSITIONS)),
}
# The explicit (einsum) path on the cases with masks, lengths and the new options;
# test_both_paths_agree_with_gradients compares both paths on everything at once.
# (windows on both paths: test_window_equals_masked_softmax_with_the_band)
EINSUM_CASES = ["causal_head_mask", "causal_lengths", "cross_mask_lengths", "gqa_rope",
                "alibi_positions", "head_bias_mask", "gqa_window_alibi_bias_lengths"]
REFERENCE_RUNS = [pytest.param(*CASES[name], None, id=f"{name}-dot_product_attention")
                  for name in CASES]
REFERENCE_RUNS += [pytest.param(*CASES[name], "einsum", id=f"{name}-einsum")
                   for name in EINSUM_CASES]


@pytest.mark.parametrize("kwargs,extras,implementation", REFERENCE_RUNS)
def test_matches_numpy_reference(kwargs, extras, implementation):
    layer = MultiHeadAttention(4, implementation=implementation, **kwargs)
    fields = dict(x=X, **extras)
    seq = as_seq(fields)
    params = make_params(layer, seq)
    y, state = run(layer, params, seq)
    assert state == {}
    assert isinstance(y, Seq)  # the side inputs are passed on
    for name, value in extras.items():
        np.testing.assert_array_equal(np.asarray(getattr(y, name)), value)
    expected = ref_of(params, fields, kwargs)
    assert y.x.shape == expected.shape and y.x.dtype == jnp.float32
    np.testing.assert_allclose(f64(y.x), expected, **TOL)


def test_plain_array_is_self_attention_and_init_params(key):
    layer = MultiHeadAttention(2)  # use_bias=True by default
    x = jnp.asarray(rand((B, T, F), 3))
    params, state = jax.jit(layer.init)(key, x)
    assert state == {}
    assert jax.tree.map(jnp.shape, params) == {
        "query": {"w": (8, 2, 4), "b": (2, 4)}, "key": {"w": (8, 2, 4), "b": (2, 4)},
        "value": {"w": (8, 2, 4), "b": (2, 4)}, "out": {"w": (2, 4, 8), "b": (8,)}}
    assert all(np.all(np.asarray(params[name]["b"]) == 0) for name in params)
    params = make_params(layer, x)
    y, _ = run(layer, params, x)
    assert isinstance(y, jax.Array)  # a plain array in, a plain array out
    np.testing.assert_allclose(f64(y), mha_ref(params, x), **TOL)
    no_bias, _ = jax.eval_shape(MultiHeadAttention(2, use_bias=False).init, key, x)
    assert jax.tree.map(lambda a: a.shape, no_bias) == {
        "query": {"w": (8, 2, 4)}, "key": {"w": (8, 2, 4)}, "value": {"w": (8, 2, 4)},
        "out": {"w": (2, 4, 8)}}
    # cross-attention: key and value project the memory's features
    cross, _ = jax.eval_shape(MultiHeadAttention(2, cross=True).init, key,
                              Seq(x, memory=jnp.zeros((B, S, 6))))
    assert cross["key"]["w"].shape == cross["value"]["w"].shape == (6, 2, 4)
    assert cross["query"]["w"].shape == (8, 2, 4)
    # w_init sees the 2-D fan-in: LeCun-normal variance 1 / 32 (query), 1 / (4 * 64) (out)
    big, _ = jax.jit(MultiHeadAttention(4, head_dim=64).init)(key, jnp.zeros((1, 1, 32)))
    assert abs(float(jnp.var(big["query"]["w"])) - 1 / 32) < 0.1 / 32
    assert abs(float(jnp.var(big["out"]["w"])) - 1 / 256) < 0.1 / 256


def test_leading_batch_axes_and_vmap(key):
    """Two batch axes and jax.vmap over single examples (mask and lengths mapped too) give the
    reference's result on the flattened batch."""
    layer = MultiHeadAttention(4, num_kv_heads=2, causal=True, rope=True)
    x = rand((2, 3, T, F), 4)
    mask = np.random.default_rng(5).random((2, 3, 4, T, T)) < 0.8
    lengths = np.array([[5, 4, 3], [2, 1, 0]], np.int32)
    params = make_params(layer, jnp.asarray(x))
    expected = mha_ref(params, x.reshape(6, T, F), mask=mask.reshape(6, 4, T, T), causal=True,
                       rope=True, lengths=lengths.reshape(6))
    seq = Seq(jnp.asarray(x), mask=jnp.asarray(mask), lengths=jnp.asarray(lengths))
    y, _ = run(layer, params, seq)
    assert y.x.shape == (2, 3, T, F)
    np.testing.assert_allclose(f64(y.x).reshape(6, T, F), expected, **TOL)
    flat = jax.tree.map(lambda a: a.reshape((6,) + a.shape[2:]), seq)
    per_example = jax.jit(jax.vmap(lambda s: layer.apply(params, {}, s)[0].x))(flat)
    np.testing.assert_allclose(f64(per_example), expected, **TOL)


def test_no_batch_axis(key):
    layer = MultiHeadAttention(2, window=1, alibi=True)
    x = rand((T, F), 5)
    params = make_params(layer, jnp.asarray(x))
    y, _ = run(layer, params, jnp.asarray(x))
    assert y.shape == (T, F)
    np.testing.assert_allclose(f64(y), mha_ref(params, x[None], window=1, alibi=True)[0], **TOL)


# ============================================================================= causality

@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_causal_attention_never_looks_ahead(key, implementation):
    layer = MultiHeadAttention(4, num_kv_heads=2, causal=True, rope=True,
                               implementation=implementation)
    x = rand((B, 6, F), 6)
    params = make_params(layer, x)
    y, _ = run(layer, params, jnp.asarray(x))
    changed = x.copy()
    changed[:, 3:] = rand((B, 3, F), 7)
    y2, _ = run(layer, params, jnp.asarray(changed))
    np.testing.assert_array_equal(np.asarray(y2[:, :3]), np.asarray(y[:, :3]))
    assert not np.allclose(np.asarray(y2[:, 3:]), np.asarray(y[:, 3:]))


# ============================================================================= sliding window

@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("window,causal", [((1, 2), False), ((2, 0), False), (1, False),
                                           ((2, 3), True), (1, True)])
def test_window_equals_masked_softmax_with_the_band(implementation, window, causal):
    """The layer with a window equals the reference with an explicit band mask (and no window),
    and keys outside the band do not reach a query."""
    left, right = (window, window) if isinstance(window, int) else window
    t = 6
    layer = MultiHeadAttention(2, window=window, causal=causal, implementation=implementation)
    x = rand((B, t, F), 8)
    params = make_params(layer, jnp.asarray(x))
    y, _ = run(layer, params, jnp.asarray(x))
    band = band_ref(t, t, left, right, causal)
    np.testing.assert_allclose(f64(y), mha_ref(params, x, mask=band), **TOL)
    # changing the token at position 0 changes exactly the rows whose band holds key 0
    changed = x.copy()
    changed[:, 0] = rand((B, F), 9)
    y2, _ = run(layer, params, jnp.asarray(changed))
    reached = np.any(np.abs(np.asarray(y2) - np.asarray(y)) > 1e-6, axis=(0, 2))
    np.testing.assert_array_equal(reached, band[:, 0])


def test_fused_path_passes_the_window_to_jax_and_einsum_builds_the_mask(monkeypatch):
    calls = []
    original = jax.nn.dot_product_attention

    def spy(*args, **kwargs):
        calls.append(dict(kwargs, mask=kwargs.get("mask", args[4] if len(args) > 4 else None)))
        return original(*args, **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
    x = jnp.asarray(rand((B, T, F), 10))
    fused = MultiHeadAttention(2, window=(2, 1), causal=True)
    params = make_params(fused, x)
    y_fused = jax.jit(lambda p, x: fused.apply(p, {}, x)[0])(params, x)
    assert len(calls) == 1
    assert calls[0]["local_window_size"] == (2, 1) and calls[0]["is_causal"] is True
    assert calls[0]["mask"] is None  # jax builds the band; fnn passes no mask of its own
    explicit = MultiHeadAttention(2, window=(2, 1), causal=True, implementation="einsum")
    y_explicit = jax.jit(lambda p, x: explicit.apply(p, {}, x)[0])(params, x)
    assert len(calls) == 1  # the einsum path does not call jax's attention
    np.testing.assert_allclose(f64(y_fused), f64(y_explicit), **TOL)
    np.testing.assert_allclose(f64(y_fused), mha_ref(params, x, causal=True, window=(2, 1)),
                               **TOL)


def test_a_window_covering_everything_changes_nothing():
    x = jnp.asarray(rand((B, T, F), 11))
    for implementation in (None, "einsum"):
        plain, causal = (MultiHeadAttention(2, causal=c, implementation=implementation)
                         for c in (False, True))
        params = make_params(plain, x)
        y, _ = run(plain, params, x)
        y_causal, _ = run(causal, params, x)
        for layer, expected in [
                (MultiHeadAttention(2, window=(T + 3, T), implementation=implementation), y),
                (MultiHeadAttention(2, window=(T - 1, 2), causal=True,
                                    implementation=implementation), y_causal)]:
            np.testing.assert_allclose(f64(run(layer, params, x)[0]), f64(expected), **TOL)
    # but a window narrower than the sequence changes the output
    for layer, other in [(MultiHeadAttention(2, window=(T - 2, T)), y),
                         (MultiHeadAttention(2, window=(T, 0)), y),
                         (MultiHeadAttention(2, window=(T - 2, 0), causal=True), y_causal)]:
        assert not np.allclose(f64(run(layer, params, x)[0]), f64(other), atol=1e-4)


# ============================================================================= ALiBi and biases

@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_alibi_equals_reference_and_an_explicit_bias(implementation):
    """ALiBi equals the reference's -slope[h] |i - j| and the layer given that bias as a Seq
    bias; with positions it uses |p_i - p_j|."""
    x = jnp.asarray(rand((B, T, F), 12))
    layer = MultiHeadAttention(4, alibi=True, causal=True, implementation=implementation)
    plain = MultiHeadAttention(4, causal=True, implementation=implementation)
    params = make_params(layer, x)
    y, _ = run(layer, params, x)
    np.testing.assert_allclose(f64(y), mha_ref(params, x, alibi=True, causal=True), **TOL)
    bias = np.array([[[-alibi_slope_ref(h, 4) * abs(i - j) for j in range(T)] for i in range(T)]
                     for h in range(4)], np.float32)
    y_bias, _ = run(plain, params, Seq(x, bias=jnp.asarray(bias)))
    np.testing.assert_allclose(f64(y), f64(y_bias.x), **TOL)
    assert not np.allclose(f64(y), f64(run(plain, params, x)[0]), atol=1e-4)
    # with a Seq bias too, the two add up
    y_both, _ = run(layer, params, Seq(x, bias=jnp.asarray(SHARED_BIAS)))
    np.testing.assert_allclose(f64(y_both.x), mha_ref(params, x, alibi=True, causal=True,
                                                      bias=SHARED_BIAS), **TOL)
    # with positions: distances between the given positions
    pos = jnp.asarray(POSITIONS)
    y_pos, _ = run(layer, params, Seq(x, positions=pos))
    np.testing.assert_allclose(f64(y_pos.x), mha_ref(params, x, alibi=True, causal=True,
                                                     positions=POSITIONS), **TOL)


BIAS_SHAPES = [(T, T), (1, 1, T, T), (B, 1, T, T), (4, T, T), (B, 4, T, T), (4, 1, T), (1, T)]


@pytest.mark.parametrize("implementation,shape", [
    pytest.param(None, shape, id="x".join(map(str, shape))) for shape in BIAS_SHAPES] + [
    pytest.param("einsum", shape, id="x".join(map(str, shape)) + "-einsum")
    for shape in [(B, 1, T, T), (4, T, T)]])
def test_seq_bias_broadcasts_over_batch_and_heads(implementation, shape):
    layer = MultiHeadAttention(4, num_kv_heads=2, causal=True, implementation=implementation)
    x = jnp.asarray(rand((B, T, F), 13))
    bias = 2.0 * rand(shape, 14)
    params = make_params(layer, x)
    y, _ = run(layer, params, Seq(x, bias=jnp.asarray(bias)))
    np.testing.assert_allclose(f64(y.x), mha_ref(params, x, causal=True, bias=bias), **TOL)


def test_bias_of_the_wrong_kind_or_shape_is_an_error():
    layer = MultiHeadAttention(2)
    x = jnp.zeros((B, T, F))
    params = make_params(layer, x)
    for bad in (jnp.zeros((3, T, T)), jnp.zeros((T, T + 1)), jnp.zeros((B, 2, T, T, 1)),
                jnp.zeros((T, T), jnp.int32), jnp.zeros((T, T), bool)):
        with pytest.raises(fnn.ShapeError,
                           match=r"^MultiHeadAttention: expected bias float broadcastable to "
                                 r"\[\.\.\., heads, q_time, kv_time\] = \[2, 2, 5, 5\], got "
                                 + r"\w+\[" + ", ".join(map(str, bad.shape)) + r"\]$"):
            layer.apply(params, {}, Seq(x, bias=bad))


# ============================================================================= decoding

def decode(layer, params, seq_of, chunks, max_length, batch=B, cache_dtype=jnp.float32):
    """Runs ``layer`` in decode mode on consecutive chunks: ``seq_of(start, stop)`` gives the
    input for positions [start, stop). Returns the outputs concatenated and the last state."""
    step = jax.jit(lambda state, x: layer.apply(params, state, x))
    state = {"cache": init_cache(params, batch, max_length, dtype=cache_dtype)}
    outputs, start = [], 0
    for size in chunks:
        y, state = step(state, seq_of(start, start + size))
        outputs.append(fnn.core.array_of(y))
        start += size
    return jnp.concatenate(outputs, axis=-2), state, step


@pytest.mark.parametrize("kwargs", [dict(num_kv_heads=2, rope=True),
                                    dict(num_kv_heads=1),
                                    dict(num_kv_heads=2, use_bias=False)],
                         ids=["gqa_rope", "mqa_bias", "gqa_no_bias"])
def test_cached_decoding_equals_full_causal_pass(key, kwargs):
    layer = MultiHeadAttention(4, causal=True, **kwargs)
    total, max_length = 7, 9
    x = jnp.asarray(rand((B, total, F), 8))
    params = make_params(layer, x)
    full = mha_ref(params, x, causal=True, rope=kwargs.get("rope", False))
    kv_heads = kwargs.get("num_kv_heads", 4)
    assert jax.tree.map(jnp.shape, init_cache(params, B, max_length)) == {
        "k": (B, max_length, kv_heads, 2), "v": (B, max_length, kv_heads, 2), "index": ()}
    # a prompt of 3 tokens at once, then one token at a time
    y, state, step = decode(layer, params, lambda a, b: x[:, a:b], [3, 1, 1, 1, 1], max_length)
    assert step._cache_size() == 2  # the index is traced: one compilation per chunk length
    assert int(state["cache"]["index"]) == total
    np.testing.assert_allclose(f64(y), full, **TOL)


DECODE_CASES = {  # (rope with GQA: test_cached_decoding_equals_full_causal_pass)
    "window_int": dict(causal=True, window=2),
    "window_pair_gqa": dict(causal=True, window=(1, 3), num_kv_heads=2),
    "alibi": dict(causal=True, alibi=True),
    "everything_mqa": dict(causal=True, window=(2, 0), alibi=True, rope=True, num_kv_heads=1),
}


@pytest.mark.parametrize("name,implementation", [
    pytest.param(name, None, id=name) for name in sorted(DECODE_CASES)] + [
    pytest.param("everything_mqa", "einsum", id="everything_mqa-einsum")])
def test_decoding_token_by_token_and_in_chunks_equals_full_pass(name, implementation):
    kwargs = DECODE_CASES[name]
    layer = MultiHeadAttention(4, implementation=implementation, **kwargs)
    total, max_length = 6, 8
    x = jnp.asarray(rand((B, total, F), 15))
    params = make_params(layer, x)
    full, _ = run(layer, params, x)
    np.testing.assert_allclose(f64(full), ref_of(params, dict(x=x), kwargs), **TOL)
    for chunks in ([1] * total, [3, 2, 1]):
        y, state, _ = decode(layer, params, lambda a, b: x[:, a:b], chunks, max_length)
        assert int(state["cache"]["index"]) == total
        np.testing.assert_allclose(f64(y), f64(full), **TOL)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_decoding_with_a_seq_mask_and_bias_of_the_cache_length(implementation):
    """In decode mode a Seq's mask and bias have max_length as their last axis (slot j =
    position j): the rows of the full pass's [T, T] mask and bias, padded to max_length, give
    the full pass; what the padding slots hold does not matter."""
    total, max_length = 6, 8
    layer = MultiHeadAttention(4, num_kv_heads=2, causal=True, alibi=True,
                               implementation=implementation)
    x = jnp.asarray(rand((B, total, F), 16))
    rng = np.random.default_rng(17)
    mask = (rng.random((B, 1, total, total)) < 0.6) | np.eye(total, dtype=bool)
    bias = rand((4, total, total), 18)
    params = make_params(layer, x)
    full, _ = run(layer, params, Seq(x, mask=jnp.asarray(mask), bias=jnp.asarray(bias)))
    np.testing.assert_allclose(f64(full.x), mha_ref(params, x, mask=mask, bias=bias, causal=True,
                                                    alibi=True), **TOL)
    pad = max_length - total
    mask_slots = np.concatenate([mask, rng.random((B, 1, total, pad)) < 0.5], axis=-1)
    bias_slots = np.concatenate([bias, 50 * rand((4, total, pad), 19)], axis=-1)

    def seq_of(a, b):
        return Seq(x[:, a:b], mask=jnp.asarray(mask_slots[..., a:b, :]),
                   bias=jnp.asarray(bias_slots[..., a:b, :]))

    for chunks in ([1] * total, [2, 3, 1]):
        y, _, _ = decode(layer, params, seq_of, chunks, max_length)
        np.testing.assert_allclose(f64(y), f64(full.x), **TOL)
    # the mask's and bias's last axis must be the cache's length
    state = {"cache": init_cache(params, B, max_length)}
    with pytest.raises(fnn.ShapeError, match=r"expected mask bool broadcastable to \[\.\.\., "
                                             r"heads, q_time, kv_time\] = \[2, 4, 1, 8\], got "
                                             r"bool\[2, 1, 1, 6\]$"):
        layer.apply(params, state, Seq(x[:, :1], mask=jnp.asarray(mask[..., :1, :])))


def test_cached_decoding_with_the_explicit_path_and_rope(key):
    layer = MultiHeadAttention(4, num_kv_heads=2, causal=True, rope=True, implementation="einsum")
    x = jnp.asarray(rand((B, 8, F), 9))
    params = make_params(layer, x)
    full = mha_ref(params, x, causal=True, rope=True)
    state = {"cache": init_cache(params, (B,), 10)}
    y, state = run(layer, params, x[:, :4], state)
    y2, state = run(layer, params, x[:, 4:], state)
    np.testing.assert_allclose(f64(jnp.concatenate([y, y2], axis=1)), full, **TOL)


def test_decoding_inside_serial_threads_the_cache(key):
    model = fnn.serial(attn=MultiHeadAttention(2, causal=True, rope=True), head=fnn.Dense(3))
    x = jnp.asarray(rand((4, F), 10))  # no batch axis
    params, state = jax.eval_shape(model.init, key, x)
    assert state == {}
    params = make_params(model, x)
    full = (mha_ref(params["attn"], x[None], causal=True, rope=True)[0]
            @ f64(params["head"]["w"]) + f64(params["head"]["b"]))
    state = {"attn": {"cache": init_cache(params["attn"], (), 4, dtype=jnp.bfloat16)}}
    ys = []
    for t in range(4):
        y, state = run(model, params, x[t:t + 1], state)
        ys.append(y)
    assert state["attn"]["cache"]["k"].dtype == jnp.bfloat16
    assert int(state["attn"]["cache"]["index"]) == 4
    np.testing.assert_allclose(f64(jnp.concatenate(ys)), full, atol=0.05, rtol=0.05)


def test_non_causal_decoding_attends_to_the_written_prefix(key):
    layer = MultiHeadAttention(2)
    x = jnp.asarray(rand((B, 6, F), 11))
    params = make_params(layer, x)
    state = {"cache": init_cache(params, (B,), 8)}
    _, state = run(layer, params, x[:, :3], state)
    y, state = run(layer, params, x[:, 3:], state)
    # the last three tokens see all six, not the two empty slots
    np.testing.assert_allclose(f64(y), mha_ref(params, x)[:, 3:], **TOL)


def test_decoding_with_positions_uses_them_for_rope():
    """Positions given in decode mode replace index, index + 1, ...: shifting them all (queries
    and cached keys alike) leaves a RoPE layer's output unchanged."""
    layer = MultiHeadAttention(2, causal=True, rope=True)
    x = jnp.asarray(rand((B, 4, F), 12))
    params = make_params(layer, x)
    plain, _, _ = decode(layer, params, lambda a, b: x[:, a:b], [2, 1, 1], 4)
    shifted, _, _ = decode(layer, params, lambda a, b: Seq(
        x[:, a:b], positions=jnp.arange(a, b, dtype=jnp.int32) + 20), [2, 1, 1], 4)
    np.testing.assert_allclose(f64(shifted), f64(plain), rtol=1e-4, atol=1e-4)


# ============================================================================= GQA / MQA

@pytest.mark.parametrize("kv_heads", [2, 1], ids=["gqa", "mqa"])
def test_grouped_query_attention_equals_mha_with_repeated_kv_heads(key, kv_heads):
    x = rand((B, T, F), 11)
    layer = MultiHeadAttention(4, num_kv_heads=kv_heads, causal=True)
    params = make_params(layer, jnp.asarray(x))
    y, _ = run(layer, params, jnp.asarray(x))
    repeat = 4 // kv_heads  # query head h reads kv head h // repeat
    mha_params = {**params, **{name: {"w": np.repeat(params[name]["w"], repeat, axis=1),
                                      "b": np.repeat(params[name]["b"], repeat, axis=0)}
                               for name in ("key", "value")}}
    np.testing.assert_allclose(f64(y), mha_ref(mha_params, x, causal=True), **TOL)


def test_num_kv_heads_equal_to_num_heads_is_ordinary_mha(key):
    x = jnp.asarray(rand((B, T, F), 12))
    gqa, mha = MultiHeadAttention(4, num_kv_heads=4), MultiHeadAttention(4)
    params = make_params(mha, x)
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(
        jnp.shape, jax.eval_shape(gqa.init, key, x)[0])
    np.testing.assert_array_equal(np.asarray(run(gqa, params, x)[0]),
                                  np.asarray(run(mha, params, x)[0]))


# ============================================================================= RoPE in the layer

def test_rope_layer_is_invariant_to_shifting_all_positions(key):
    layer = MultiHeadAttention(2, rope=True, causal=True)
    x = jnp.asarray(rand((B, T, F), 15))
    params = make_params(layer, x)
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    y, _ = run(layer, params, Seq(x, positions=pos))
    np.testing.assert_allclose(f64(y.x), mha_ref(params, x, causal=True, rope=True), **TOL)
    y_shift, _ = run(layer, params, Seq(x, positions=pos + 11))
    np.testing.assert_allclose(f64(y_shift.x), f64(y.x), rtol=1e-4, atol=1e-4)
    # relative positions matter: spreading the positions apart changes the output
    y_spread, _ = run(layer, params, Seq(x, positions=3 * pos))
    assert not np.allclose(f64(y_spread.x), f64(y.x), atol=1e-3)
    np.testing.assert_allclose(f64(y_spread.x), mha_ref(params, x, causal=True, rope=True,
                                                        positions=3 * np.asarray(pos)), **TOL)


# ============================================================================= both paths

def _value_and_grad(layer, params, seq):
    def loss(p):
        y, _ = layer.apply(p, {}, seq)
        return jnp.sum(y.x ** 2), y.x
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_both_paths_agree_with_gradients(key, cross):
    x = jnp.asarray(X)
    if cross:
        kwargs = dict(num_kv_heads=2, cross=True)
        seq = Seq(x, memory=jnp.asarray(MEMORY), memory_mask=jnp.asarray(CROSS_MASK),
                  lengths=jnp.array([4, 5]), memory_lengths=jnp.array([6, 3]))
    else:
        kwargs = dict(num_kv_heads=2, rope=True, causal=True, window=(2, 1), alibi=True)
        seq = Seq(x, mask=jnp.asarray(HEAD_MASK), bias=jnp.asarray(HEAD_BIAS),
                  lengths=jnp.array([4, 5]), positions=jnp.arange(T) + 2)
    fused, explicit = (MultiHeadAttention(4, implementation=i, **kwargs) for i in ("xla", "einsum"))
    params = make_params(fused, seq)
    (_, y_fused), g_fused = _value_and_grad(fused, params, seq)
    (_, y_explicit), g_explicit = _value_and_grad(explicit, params, seq)
    np.testing.assert_allclose(f64(y_fused), f64(y_explicit), **TOL)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(f64(a), f64(b), rtol=1e-4, atol=1e-4),
                 g_fused, g_explicit)
    fields = {name: value for name, value in seq._asdict().items() if value is not None}
    np.testing.assert_allclose(f64(y_fused), ref_of(params, fields, kwargs), **TOL)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_bfloat16_runs_with_float32_softmax(key, implementation):
    layer = MultiHeadAttention(4, num_kv_heads=2, causal=True, rope=True, window=3, alibi=True,
                               implementation=implementation)
    x = rand((B, T, F), 18)
    params = make_params(layer, jnp.asarray(x))
    x16 = jnp.asarray(x).astype(jnp.bfloat16)
    y16, _ = run(layer, params, x16)
    assert y16.dtype == jnp.bfloat16
    expected = mha_ref(params, x, causal=True, rope=True, window=3, alibi=True)
    np.testing.assert_allclose(f64(y16), expected, atol=0.05, rtol=0.05)
    jaxpr = jax.make_jaxpr(lambda x: layer.apply(params, {}, x)[0])(x16)

    def eqns(jaxpr):
        for eqn in jaxpr.eqns:
            yield eqn
            for sub in eqn.params.values():
                sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's jaxpr
                if hasattr(sub, "eqns"):
                    yield from eqns(sub)

    exps = [e for e in eqns(jaxpr.jaxpr) if e.primitive.name == "exp"]
    assert exps and all(e.outvars[0].aval.dtype == jnp.float32 for e in exps)


# ============================================================================= dropout

def test_dropout_needs_a_key_and_is_unbiased(key):
    layer = MultiHeadAttention(2, dropout=0.3, causal=True)
    x = jnp.asarray(rand((1, 4, F), 19))
    params = make_params(layer, x)
    with pytest.raises(fnn.MissingKeyError,
                       match=r"^MultiHeadAttention is stochastic and needs a random key when "
                             r"train=True; call apply\(params, state, x, "
                             r"key=jax.random.key\(0\), train=True\)$"):
        layer.apply(params, {}, x, train=True)
    # without dropout, training needs no key
    jax.eval_shape(lambda p: MultiHeadAttention(2).apply(p, {}, x, train=True), params)
    # evaluation is deterministic: the layer without dropout
    y_eval, _ = run(layer, params, x)
    expected = mha_ref(params, x, causal=True)
    np.testing.assert_allclose(f64(y_eval), expected, **TOL)
    # training: random in the key, reproducible for one key, right on average
    keys = jax.random.split(jax.random.key(5), 2000)
    keys = jnp.concatenate([keys[:1], keys])  # the first key twice
    ys = np.asarray(jax.jit(jax.vmap(
        lambda k: layer.apply(params, {}, x, key=k, train=True)[0]))(keys), np.float64)
    np.testing.assert_array_equal(ys[0], ys[1])
    assert not np.allclose(ys[0], ys[2])
    stderr = ys.std(axis=0) / math.sqrt(len(keys))
    assert ys.std(axis=0).max() > 0.01
    assert np.all(np.abs(ys.mean(axis=0) - expected) < 5 * stderr + 1e-5)


def test_dropout_drops_weights_at_the_rate_and_rescales(key):
    """One head whose mask keeps only the diagonal: each row's single weight (1) is either
    dropped (output = the output bias) or scaled to 1 / (1 - rate)."""
    rate, t = 0.25, 16
    layer = MultiHeadAttention(1, dropout=rate, head_dim=4, use_bias=False)
    x = rand((64, t, F), 20)
    mask = np.eye(t, dtype=bool)
    params = make_params(layer, jnp.asarray(x))
    y, _ = run(layer, params, Seq(jnp.asarray(x), mask=jnp.asarray(mask)),
               key=jax.random.key(3), train=True)
    dropped = np.all(np.asarray(y.x) == 0, axis=-1)
    assert abs(dropped.mean() - rate) < 0.04
    expected = mha_ref(params, x, mask=mask) / (1 - rate)
    np.testing.assert_allclose(f64(y.x)[~dropped], expected[~dropped], **TOL)


# ============================================================================= masked rows

def _masked_rows_check(layer, params, seq, empty, reference):
    """Rows ``empty`` (bool [B, T]) output exactly the output bias; the output matches the
    reference; gradients are finite, and zero for everything but the output bias when the loss
    reads the empty rows only."""
    b_out = f64(params["out"]["b"])

    def loss(p, rows):
        y, _ = layer.apply(p, {}, seq)
        return jnp.sum(jnp.where(rows[..., None], y.x, 0.0) ** 2), y.x

    grad = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (_, y), grads = grad(params, jnp.ones(empty.shape, bool))
    y = f64(y)
    np.testing.assert_array_equal(y[empty], np.broadcast_to(b_out, y[empty].shape))
    assert not np.any(np.all(np.isclose(y[~empty], b_out, atol=1e-3), axis=-1))
    np.testing.assert_allclose(y, reference, **TOL)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))
    _, grads = grad(params, jnp.asarray(empty))
    for name in ("query", "key", "value", "out"):
        for leaf, g in grads[name].items():
            if (name, leaf) != ("out", "b"):
                np.testing.assert_array_equal(np.asarray(g), 0.0, err_msg=f"{name}/{leaf}")
    assert np.all(np.asarray(grads["out"]["b"]) != 0)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_fully_masked_rows_give_zero_attention(key, implementation):
    """Cross-attention: example 0 has memory_lengths 0; in example 1 query 1 is masked for every
    head, query 2 for head 0 only, and query 4 is past lengths. Rows with nothing to attend to
    output the output bias (a zero attention result), and gradients stay finite."""
    layer = MultiHeadAttention(2, cross=True, implementation=implementation)
    memory = rand((B, S, F), 22)
    x = rand((B, T, F), 23)
    mask = np.ones((B, 2, T, S), bool)
    mask[1, :, 1] = False
    mask[1, 0, 2] = False
    fields = dict(x=x, memory=memory, memory_mask=mask, lengths=np.array([5, 4], np.int32),
                  memory_lengths=np.array([0, 7], np.int32))
    seq = as_seq(fields)
    params = make_params(layer, seq)
    empty = np.zeros((B, T), bool)
    empty[0], empty[1, 1], empty[1, 4] = True, True, True
    _masked_rows_check(layer, params, seq, empty, mha_ref(params, **fields))
    # head 1 still attends in row 2 of example 1: not the output bias
    y, _ = run(layer, params, seq)
    assert not np.allclose(f64(y.x[1, 2]), f64(params["out"]["b"]), atol=1e-3)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_fully_masked_rows_with_bias_and_window(key, implementation):
    """Self-attention with a window, ALiBi and a per-head Seq bias: example 0 has lengths 0;
    in example 1 row 1 is masked for every head, row 3 may attend only to key 0, which is
    outside its window, and row 4 is past lengths."""
    layer = MultiHeadAttention(2, window=(1, 1), alibi=True, implementation=implementation)
    x = rand((B, T, F), 24)
    mask = np.ones((B, 1, T, T), bool)
    mask[1, :, 1] = False
    mask[1, :, 3] = False
    mask[1, :, 3, 0] = True
    fields = dict(x=x, mask=mask, bias=3.0 * rand((B, 2, T, T), 25),
                  lengths=np.array([0, 4], np.int32))
    seq = as_seq(fields)
    params = make_params(layer, seq)
    empty = np.zeros((B, T), bool)
    empty[0], empty[1, 1], empty[1, 3], empty[1, 4] = True, True, True, True
    _masked_rows_check(layer, params, seq, empty,
                       mha_ref(params, **fields, window=(1, 1), alibi=True))


# ============================================================================= the pieces

def test_causal_and_window_masks_match_construction():
    for t, s, offset in [(4, 4, 0), (2, 6, 3), (3, 5, 0), (1, 8, 7)]:
        expected = np.tril(np.ones((t, s), bool), k=offset)  # j <= offset + i
        np.testing.assert_array_equal(np.asarray(causal_mask(t, s, offset)), expected)
        for left, right in [(0, 0), (1, 0), (2, 1), (0, 3), (10, 10)]:
            expected = np.zeros((t, s), bool)
            for i in range(t):
                for j in range(s):
                    expected[i, j] = offset + i - left <= j <= offset + i + right
            got = window_mask(t, s, (left, right), offset)
            assert got.dtype == jnp.bool_ and got.shape == (t, s)
            np.testing.assert_array_equal(np.asarray(got), expected, err_msg=str((left, right)))
    # a traced offset (the cache index) works under jit
    traced = jax.jit(lambda o: window_mask(2, 6, (1, 0), o))(jnp.int32(3))
    np.testing.assert_array_equal(np.asarray(traced), np.asarray(window_mask(2, 6, (1, 0), 3)))


def test_length_and_combined_masks():
    lengths = jnp.array([0, 2, 5], jnp.int32)
    got = np.asarray(length_mask(lengths, 4))
    np.testing.assert_array_equal(got, [[j < n for j in range(4)] for n in (0, 2, 5)])
    assert combine_masks() is None and combine_masks(None, None) is None
    a = np.random.default_rng(0).random((3, 4)) < 0.5
    np.testing.assert_array_equal(np.asarray(combine_masks(None, jnp.asarray(a))), a)
    per_example = np.random.default_rng(1).random((2, 1, 3, 4)) < 0.5
    combined = combine_masks(jnp.asarray(a), None, jnp.asarray(per_example),
                             causal_mask(3, 4))
    assert combined.shape == (2, 1, 3, 4)
    np.testing.assert_array_equal(np.asarray(combined),
                                  a[None, None] & per_example & np.tril(np.ones((3, 4), bool)))


def test_dot_product_attention_grouped_query_shapes_and_values():
    bsz, t, s, n, k, d = 2, 3, 4, 4, 2, 5
    q, keys, v = rand((bsz, t, n, d), 30), rand((bsz, s, k, d), 31), rand((bsz, s, k, d), 32)
    mask = np.random.default_rng(33).random((bsz, 1, t, s)) < 0.7
    mask[..., 0] = True
    bias = rand((1, n, t, s), 34)
    out = jax.jit(dot_product_attention)(jnp.asarray(q), jnp.asarray(keys), jnp.asarray(v),
                                         mask=jnp.asarray(mask), bias=jnp.asarray(bias))
    assert out.shape == (bsz, t, n, d) and out.dtype == jnp.float32
    probs = attention_probs(jnp.asarray(q), jnp.asarray(keys), jnp.asarray(mask),
                            jnp.asarray(bias))
    assert probs.shape == (bsz, k, n // k, t, s)
    expected, expected_probs = np.zeros((bsz, t, n, d)), np.zeros((bsz, n, t, s))
    for b in range(bsz):
        for h in range(n):
            g = h // (n // k)
            for i in range(t):
                logits = keys[b, :, g] @ q[b, i, h] / math.sqrt(d) + bias[0, h, i]
                logits = np.where(mask[b, 0, i], logits, -np.inf)
                w = np.exp(logits - logits.max())
                expected_probs[b, h, i] = w / w.sum()
                expected[b, i, h] = expected_probs[b, h, i] @ v[b, :, g]
    np.testing.assert_allclose(f64(out), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(f64(probs).reshape(bsz, n, t, s), expected_probs, rtol=1e-5,
                               atol=1e-6)
    # a row that may attend to nothing is uniform (finite) before zero_empty_rows zeroes it
    none = attention_probs(jnp.asarray(q), jnp.asarray(keys), jnp.zeros((1, 1, t, s), bool))
    np.testing.assert_allclose(f64(none), np.full(none.shape, 1 / s), rtol=1e-6)
    valid = np.array([[True, False, True], [False, True, True]])[:, :, None, None]
    zeroed = zero_empty_rows(out, jnp.asarray(valid))
    np.testing.assert_array_equal(np.asarray(zeroed), np.where(valid, np.asarray(out), 0.0))
    assert zero_empty_rows(out, None) is out


@pytest.mark.parametrize("batch_shape", [(2,), (2, 3), ()], ids=str)
def test_write_cache_advances_the_index_and_fills_the_slots(batch_shape):
    layer = MultiHeadAttention(4, num_kv_heads=2)
    params = make_params(layer, jnp.zeros((1, 1, F)))
    cache = init_cache(params, batch_shape, 6)
    assert cache["k"].shape == cache["v"].shape == batch_shape + (6, 2, 2)
    assert np.all(np.asarray(cache["k"]) == 0) and int(cache["index"]) == 0
    flat = math.prod(batch_shape)
    k1, v1 = rand((flat, 2, 2, 2), 40), rand((flat, 2, 2, 2), 41)
    k2, v2 = rand((flat, 3, 2, 2), 42), rand((flat, 3, 2, 2), 43)
    write = jax.jit(write_cache)
    cache, k_all, v_all = write(cache, jnp.asarray(k1), jnp.asarray(v1))
    assert int(cache["index"]) == 2 and k_all.shape == (flat, 6, 2, 2)
    cache, k_all, v_all = write(cache, jnp.asarray(k2), jnp.asarray(v2))
    assert int(cache["index"]) == 5
    for got, first, second in [(k_all, k1, k2), (v_all, v1, v2)]:
        expected = np.concatenate([first, second, np.zeros((flat, 1, 2, 2), np.float32)], 1)
        np.testing.assert_array_equal(np.asarray(got), expected)
    # the cache keeps the batch axes: example (i, j) is flat row i * 3 + j
    np.testing.assert_array_equal(np.asarray(cache["k"]).reshape(flat, 6, 2, 2),
                                  np.asarray(k_all))
    np.testing.assert_array_equal(np.asarray(cache["v"]).reshape(flat, 6, 2, 2),
                                  np.asarray(v_all))
    # a bfloat16 cache stores bfloat16 and gives the slots back in the new keys' dtype
    low = init_cache(params, batch_shape, 6, dtype=jnp.bfloat16)
    low, k_low, _ = write(low, jnp.asarray(k1), jnp.asarray(v1))
    assert low["k"].dtype == jnp.bfloat16 and k_low.dtype == jnp.float32
    np.testing.assert_allclose(f64(k_low[:, :2]), k1, rtol=1e-2, atol=1e-2)


# ============================================================================= errors

def test_bad_hyper_parameters_are_rejected():
    with pytest.raises(ValueError, match=r"num_heads must be a multiple of num_kv_heads .*"
                                         r"got num_heads=6, num_kv_heads=4"):
        MultiHeadAttention(6, num_kv_heads=4)
    with pytest.raises(ValueError, match=r"num_heads must be a positive integer, got 0"):
        MultiHeadAttention(0)
    with pytest.raises(ValueError, match=r"dropout .* must be in \[0, 1\), got 1.0"):
        MultiHeadAttention(2, dropout=1.0)
    with pytest.raises(ValueError, match=r"implementation must be one of .*got 'flash'"):
        MultiHeadAttention(2, implementation="flash")
    with pytest.raises(ValueError, match=r"rope needs an even head_dim, got head_dim=3"):
        MultiHeadAttention(2, head_dim=3, rope=True)
    with pytest.raises(TypeError, match="unexpected keyword argument 'heads'"):
        MultiHeadAttention(2, heads=4)
    for bad in (-1, (1,), (1, 2, 3), (1, -2), (1.5, 1), True, "2"):
        with pytest.raises(ValueError, match=r"window must be an int >= 0 or a \(left, right\) "
                                             r"pair of them, got " + re.escape(repr(bad))):
            MultiHeadAttention(2, window=bad)


@pytest.mark.parametrize("option", [dict(causal=True), dict(window=2), dict(window=(1, 0)),
                                    dict(rope=True), dict(alibi=True)],
                         ids=["causal", "window", "window_pair", "rope", "alibi"])
def test_cross_refuses_the_options_of_one_sequence(option):
    with pytest.raises(ValueError, match=r"^MultiHeadAttention: causal, window, rope and alibi "
                                         r"order the positions of one sequence and apply to "
                                         r"self-attention only, not to cross=True$"):
        MultiHeadAttention(2, cross=True, **option)


def test_init_errors(key):
    with pytest.raises(fnn.ShapeError,
                       match=r"^MultiHeadAttention: expected input \[\.\.\., time, features\] "
                             r"with features divisible by num_heads=3 \(or pass head_dim\), "
                             r"got float32\[2, 5, 8\]$"):
        MultiHeadAttention(3).init(key, jnp.zeros((2, 5, 8)))
    jax.eval_shape(MultiHeadAttention(3, head_dim=4).init, key, jnp.zeros((2, 5, 8)))  # fine
    with pytest.raises(fnn.ShapeError, match=r"even head_dim .* head_dim would be 1"):
        MultiHeadAttention(8, rope=True).init(key, jnp.zeros((2, 5, 8)))
    with pytest.raises(fnn.ShapeError, match=r"^MultiHeadAttention: expected input "
                                             r"\[\.\.\., time, features\], got float32\[8\]$"):
        MultiHeadAttention(2).init(key, jnp.zeros((8,)))
    model = fnn.serial(fnn.Dense(8), attn=MultiHeadAttention(2))
    with pytest.raises(fnn.ShapeError, match=r"^MultiHeadAttention at attn: expected input "
                                             r"\[\.\.\., time, features\], got float32\[8\]"):
        jax.eval_shape(model.init, key, jnp.zeros((4,)))


def test_cross_attention_without_memory_names_the_layer_and_memory(key):
    x = jnp.zeros((B, T, F))
    layer = MultiHeadAttention(2, cross=True)
    params = make_params(layer, Seq(x, memory=jnp.zeros((B, S, 6))))
    message = (r"^MultiHeadAttention{}: a cross-attention layer attends to a memory: call it on "
               r"Seq\(x, memory=\.\.\.\), got {}$")
    with pytest.raises(fnn.LayerError, match=message.format("", r"float32\[2, 5, 8\]")):
        layer.init(key, x)
    with pytest.raises(fnn.LayerError, match=message.format("", r"float32\[2, 5, 8\]")):
        layer.apply(params, {}, x)
    with pytest.raises(fnn.LayerError, match=message.format(
            "", r"Seq\(x=float32\[2, 5, 8\], lengths=int32\[2\]\)")):
        layer.apply(params, {}, Seq(x, lengths=jnp.array([5, 4])))
    with pytest.raises(fnn.LayerError, match=message.format(" at cross", r"float32\[2, 5, 8\]")):
        fnn.serial(cross=layer).apply({"cross": params}, {}, x)


def test_apply_errors_name_the_field_and_expected_versus_got(key):
    layer = MultiHeadAttention(2, cross=True)
    x = jnp.zeros((2, 5, 8))
    memory = jnp.zeros((2, 7, 6))
    seq = Seq(x, memory=memory)
    params, state = make_params(layer, seq), {}
    with pytest.raises(fnn.ShapeError, match=r"^MultiHeadAttention: expected input "
                                             r"\[\.\.\., time, 8\], got float32\[2, 5, 4\]$"):
        layer.apply(params, state, Seq(jnp.zeros((2, 5, 4)), memory=memory))
    with pytest.raises(fnn.ShapeError, match=r"^MultiHeadAttention: expected memory "
                                             r"\[\.\.\., memory_time, 6\], got "
                                             r"float32\[2, 7, 5\]$"):
        layer.apply(params, state, Seq(x, memory=jnp.zeros((2, 7, 5))))
    for other in (jnp.zeros((3, 7, 6)), jnp.zeros((7, 6)), jnp.zeros((1, 2, 7, 6))):
        with pytest.raises(fnn.ShapeError,
                           match=r"^MultiHeadAttention: expected memory \[2, memory_time, "
                                 r"memory_features\] \(the batch axes of x float32\[2, 5, 8\]\), "
                                 r"got float32\[" + ", ".join(map(str, other.shape)) + r"\]$"):
            layer.apply(params, state, Seq(x, memory=other))
    with pytest.raises(fnn.ShapeError, match=r"^MultiHeadAttention: expected mask bool "
                                             r"broadcastable to \[\.\.\., heads, q_time, "
                                             r"kv_time\] = \[2, 2, 5, 7\], got float32\[5, 7\]$"):
        layer.apply(params, state, seq._replace(memory_mask=jnp.ones((5, 7))))
    with pytest.raises(fnn.ShapeError, match=r"expected mask .* got bool\[2, 5, 5\]$"):
        layer.apply(params, state, seq._replace(memory_mask=jnp.ones((2, 5, 5), bool)))
    with pytest.raises(fnn.ShapeError, match=r"^MultiHeadAttention: expected memory_lengths "
                                             r"int\[2\] \(the batch axes of x\), got "
                                             r"float32\[2\]$"):
        layer.apply(params, state, seq._replace(memory_lengths=jnp.ones(2)))
    with pytest.raises(fnn.ShapeError, match=r"^MultiHeadAttention: expected lengths int\[2\] "
                                             r"\(the batch axes of x float32\[2, 5, 8\]\), got "
                                             r"int32\[3\]$"):
        layer.apply(params, state, seq._replace(lengths=jnp.ones(3, jnp.int32)))
    with pytest.raises(fnn.ShapeError, match=r"expected input \[\.\.\., time, 8\]"):
        jax.jit(layer.apply)(params, state, Seq(jnp.zeros((2, 5, 3)), memory=memory))
    # self-attention: its own fields
    self_attention = MultiHeadAttention(2)
    self_params = make_params(self_attention, x)
    with pytest.raises(fnn.ShapeError, match=r"expected mask bool broadcastable to \[\.\.\., "
                                             r"heads, q_time, kv_time\] = \[2, 2, 5, 5\], got "
                                             r"bool\[5, 7\]$"):
        self_attention.apply(self_params, state, Seq(x, mask=jnp.ones((5, 7), bool)))
    with pytest.raises(fnn.ShapeError, match=r"expected lengths int\[2\] .*got float32\[2\]$"):
        self_attention.apply(self_params, state, Seq(x, lengths=jnp.ones(2)))
    with pytest.raises(fnn.ShapeError, match=r"expected positions int broadcastable to "
                                             r"\[\.\.\., time\] = \[2, 5\], got int32\[3, 5\]$"):
        self_attention.apply(self_params, state, Seq(x, positions=jnp.ones((3, 5), jnp.int32)))


def test_decode_errors(key):
    layer = MultiHeadAttention(2, causal=True, rope=True)
    x = jnp.zeros((2, 5, 8))
    params = make_params(layer, x)
    state = {"cache": init_cache(params, (2,), 4)}
    with pytest.raises(fnn.ShapeError, match=r"^MultiHeadAttention: expected input "
                                             r"\[2, new, features\] with new <= 4 \(the cache's "
                                             r"batch shape and length\), got "
                                             r"float32\[2, 5, 8\]$"):
        layer.apply(params, state, x)
    with pytest.raises(fnn.ShapeError,
                       match=r"expected input \[2, new, features\].*got float32\[3, 1, 8\]"):
        layer.apply(params, state, jnp.zeros((3, 1, 8)))
    with pytest.raises(fnn.LayerError, match=r"^MultiHeadAttention: decode mode \(a cache in the "
                                             r"state\) takes no lengths"):
        layer.apply(params, state, Seq(x[:, :1], lengths=jnp.array([1, 1])))
    with pytest.raises(fnn.LayerError, match=r"decode mode .* takes no lengths"):
        jax.jit(layer.apply)(params, state, Seq(x[:, :2], lengths=jnp.array([2, 1])))
    cross = MultiHeadAttention(2, cross=True)
    seq = Seq(x[:, :1], memory=jnp.zeros((2, 3, 8)))
    cross_params = make_params(cross, seq)
    with pytest.raises(fnn.LayerError, match=r"^MultiHeadAttention: decode mode \(a cache in the "
                                             r"state\) is self-attention only"):
        cross.apply(cross_params, {"cache": init_cache(cross_params, (2,), 4)}, seq)


# ============================================================================= attention_weights

# jitted: one compilation instead of many small eager dispatches keeps the file fast
weights_of = jax.jit(attention_weights,
                     static_argnames=("causal", "window", "rope", "rope_base", "alibi"))


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


WEIGHT_CASES = {
    "plain": (dict(num_heads=2), (2, 6, 8)),
    "causal": (dict(num_heads=2, causal=True), (2, 6, 8)),
    "rope": (dict(num_heads=2, rope=True, rope_base=100.0), (2, 6, 8)),
    "causal_rope_gqa_bias": (dict(num_heads=4, num_kv_heads=2, causal=True, rope=True),
                             (2, 6, 8)),
    "mqa_no_batch": (dict(num_heads=4, num_kv_heads=1, causal=True, use_bias=False), (5, 8)),
    "two_batch_axes": (dict(num_heads=2, num_kv_heads=1), (2, 3, 4, 8)),
    "window": (dict(num_heads=2, window=(1, 2)), (2, 6, 8)),
    "causal_window_int_alibi": (dict(num_heads=4, causal=True, window=2, alibi=True), (2, 6, 8)),
    "alibi_gqa": (dict(num_heads=4, num_kv_heads=2, alibi=True), (2, 6, 8)),
}
_WEIGHT_OPTIONS = dict(causal=False, window=None, rope=False, rope_base=10000.0, alibi=False)


@pytest.mark.parametrize("name", sorted(WEIGHT_CASES))
def test_weights_reproduce_layer_output(name):
    kwargs, shape = WEIGHT_CASES[name]
    layer = MultiHeadAttention(**kwargs)
    x = jnp.asarray(rand(shape, seed=1))
    params = make_params(layer, x)
    weights = weights_of(params, x, **{k: kwargs.get(k, v) for k, v in _WEIGHT_OPTIONS.items()})
    heads, t = kwargs["num_heads"], shape[-2]
    assert weights.shape == shape[:-2] + (heads, t, t) and weights.dtype == jnp.float32
    assert bool(jnp.all(weights >= 0))
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-6)
    if "window" in kwargs:  # outside the band: exactly 0
        left, right = (kwargs["window"],) * 2 if isinstance(kwargs["window"], int) \
            else kwargs["window"]
        band = band_ref(t, t, left, right, kwargs.get("causal", False))
        assert np.all(np.asarray(weights)[..., ~band] == 0.0)
        assert np.all(np.asarray(weights)[..., band] > 0.0)
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
    keys), i.e. 1 / t without a mask and 1 / (i + 1) in row i with ``causal``; with a window,
    uniform over the band; with ALiBi, softmax(-slope[h] |i - j|)."""
    layer = MultiHeadAttention(2, num_kv_heads=1)
    x = jnp.asarray(rand((4, 8), seed=3))
    params = make_params(layer, x)
    params["query"] = jax.tree.map(jnp.zeros_like, params["query"])
    np.testing.assert_allclose(weights_of(params, x), np.full((2, 4, 4), 0.25), rtol=1e-6)
    causal = np.tril(np.ones((4, 4))) / np.arange(1, 5)[:, None]
    np.testing.assert_allclose(weights_of(params, x, causal=True),
                               np.broadcast_to(causal, (2, 4, 4)), rtol=1e-6)
    band = band_ref(4, 4, 1, 0).astype(np.float64)
    np.testing.assert_allclose(weights_of(params, x, window=(1, 0)),
                               np.broadcast_to(band / band.sum(-1, keepdims=True), (2, 4, 4)),
                               rtol=1e-6)
    alibi = np.exp(np.array([[[-alibi_slope_ref(h, 2) * abs(i - j) for j in range(4)]
                              for i in range(4)] for h in range(2)]))
    np.testing.assert_allclose(weights_of(params, x, alibi=True),
                               alibi / alibi.sum(-1, keepdims=True), rtol=1e-6)


def test_mask_and_fully_masked_row():
    layer = MultiHeadAttention(2)
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
    y, _ = run(layer, params, Seq(x, mask=jnp.asarray(mask)))
    np.testing.assert_allclose(output_from_weights(params, x, weights), y.x, **TOL)
    # a mask combines with causal
    both = np.asarray(weights_of(params, x, causal=True, mask=jnp.asarray(mask)))
    assert np.all(both[..., np.triu(np.ones((4, 4), bool), k=1)] == 0.0)
    np.testing.assert_allclose(both[0, :, 3, :3], w[0, :, 3, :3], rtol=1e-6)
    # and with a window: row 3 of example 0 may only attend to key 3 (masked) in window (0, 0)
    windowed = np.asarray(weights_of(params, x, window=0, mask=jnp.asarray(mask)))
    np.testing.assert_array_equal(windowed[0, :, 3], 0.0)
    np.testing.assert_array_equal(windowed[0, :, :3], np.broadcast_to(np.eye(4)[:3], (2, 3, 4)))


def test_jit_bfloat16_and_float64():
    layer = MultiHeadAttention(2, num_kv_heads=1, causal=True, rope=True)
    x = jnp.asarray(rand((2, 5, 8), seed=5))
    params = make_params(layer, x)
    eager = attention_weights(params, x, causal=True, rope=True)
    jitted = jax.jit(functools.partial(attention_weights, causal=True, rope=True))(params, x)
    np.testing.assert_allclose(jitted, eager, **TOL)
    # bfloat16 input: computed and returned in float32, close to the float32 weights
    low = weights_of(params, x.astype(jnp.bfloat16), causal=True, rope=True)
    assert low.dtype == jnp.float32
    np.testing.assert_allclose(low, eager, atol=3e-2)
    with jax.enable_x64(True):
        x64 = jnp.asarray(np.asarray(x, np.float64))
        w64 = weights_of(params, x64, causal=True, rope=True)
        assert w64.dtype == jnp.float64
        np.testing.assert_allclose(w64, eager, **TOL)


def test_attention_weights_errors():
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
    cross = MultiHeadAttention(2, cross=True)
    cross_params = make_params(cross, Seq(x, memory=jnp.zeros((2, 3, 6))))
    with pytest.raises(fnn.LayerError, match=r"key w \[8, kv_heads, 4\].*got key w "
                                             r"float32\[6, 2, 4\]"):
        attention_weights(cross_params, x)
    odd = MultiHeadAttention(2, head_dim=3)
    odd_params = make_params(odd, x)
    with pytest.raises(fnn.LayerError, match="rope needs an even head_dim, got head_dim=3"):
        attention_weights(odd_params, x, rope=True)
