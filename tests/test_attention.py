"""MultiHeadAttention against a float64 numpy reference, and its properties: causality, cached
decoding, grouped-query attention, RoPE, both computation paths (``jax.nn.dot_product_attention``
and the explicit einsum one), dropout on the attention weights, masks and errors.

The reference loops over every (example, head, query) and is written independently of fnn; the
layer gets float32 inputs and is compared with float32 tolerances. Calls are jitted (one
compilation per layer and input structure) to keep the file fast on a small CPU.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnn
from refutil import f64, make_params, rand, run
from fnn.layers.attention import AttentionInput, MultiHeadAttention, apply_rope, init_cache

TOL = dict(rtol=2e-5, atol=2e-5)
IMPLEMENTATIONS = [None, "einsum"]


# ============================================================================= helpers

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


def mha_ref(params, xq, xkv=None, *, mask=None, causal=False, q_lengths=None, kv_lengths=None,
            rope=False, q_pos=None, kv_pos=None):
    """Naive multi-head attention in float64. xq: [B, T, F], xkv: [B, S, Fkv]; params as the
    layer's. A query row with nothing to attend to gives a zero attention result."""
    p = jax.tree.map(f64, params)
    xq = f64(xq)
    xkv = xq if xkv is None else f64(xkv)
    (bsz, t, _), s = xq.shape, xkv.shape[1]
    n, d = p["query"]["w"].shape[1:]
    kvh = p["key"]["w"].shape[1]
    q = np.einsum("btf,fnd->btnd", xq, p["query"]["w"])
    k = np.einsum("bsf,fnd->bsnd", xkv, p["key"]["w"])
    v = np.einsum("bsf,fnd->bsnd", xkv, p["value"]["w"])
    if "b" in p["query"]:
        q, k, v = q + p["query"]["b"], k + p["key"]["b"], v + p["value"]["b"]
    if rope:
        q = rope_ref(q, np.arange(t) if q_pos is None else q_pos)
        k = rope_ref(k, np.arange(s) if kv_pos is None else kv_pos)
    allowed = np.ones((bsz, n, t, s), bool)
    if mask is not None:
        allowed &= np.broadcast_to(np.asarray(mask), (bsz, n, t, s))
    out = np.zeros((bsz, t, n, d))
    for b in range(bsz):
        for h in range(n):
            kv_head = h // (n // kvh)
            for i in range(t):
                ok = allowed[b, h, i].copy()
                if causal:
                    ok &= np.arange(s) <= i
                if kv_lengths is not None:
                    ok &= np.arange(s) < np.asarray(kv_lengths)[b]
                if q_lengths is not None and i >= np.asarray(q_lengths)[b]:
                    ok[:] = False
                if not ok.any():
                    continue
                logits = k[b, :, kv_head] @ q[b, i, h] / math.sqrt(d)
                logits = np.where(ok, logits, -np.inf)
                w = np.exp(logits - logits.max())
                out[b, i, h] = (w / w.sum()) @ v[b, :, kv_head]
    y = np.einsum("btnd,ndo->bto", out, p["out"]["w"])
    if "b" in p["out"]:
        y = y + p["out"]["b"]
    return y


# ============================================================================= reference

B, T, S, F = 2, 5, 7, 8
_rng = np.random.default_rng(7)
HEAD_MASK = _rng.random((B, 4, T, T)) < 0.7  # per example and head
CROSS_MASK = _rng.random((B, 1, T, S)) < 0.6  # per example, shared by the heads
SHARED_MASK = _rng.random((T, S)) < 0.6  # shared by the batch and the heads
POSITIONS = np.array([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]], np.int32)
CASES = {
    # id: (factory kwargs, has kv, AttentionInput extras, reference kwargs)
    "bias": (dict(use_bias=True), False, {}, {}),
    "causal_head_mask": (dict(causal=True), False, dict(mask=HEAD_MASK),
                         dict(causal=True, mask=HEAD_MASK)),
    "causal_lengths": (dict(causal=True), False, dict(q_lengths=np.array([5, 3], np.int32),
                                                      kv_lengths=np.array([2, 4], np.int32)),
                       dict(causal=True, q_lengths=[5, 3], kv_lengths=[2, 4])),
    "cross_mask_lengths": (dict(out_features=3, head_dim=3, use_bias=True), True,
                           dict(mask=CROSS_MASK, kv_lengths=np.array([7, 4], np.int32)),
                           dict(mask=CROSS_MASK, kv_lengths=[7, 4])),
    "cross_causal_shared_mask": (dict(causal=True), True, dict(mask=SHARED_MASK),
                                 dict(causal=True, mask=SHARED_MASK)),
    "gqa_rope": (dict(num_kv_heads=2, rope=True, causal=True), False, dict(mask=HEAD_MASK),
                 dict(rope=True, causal=True, mask=HEAD_MASK)),
    "mqa_cross": (dict(num_kv_heads=1), True, dict(mask=CROSS_MASK), dict(mask=CROSS_MASK)),
    "rope_positions": (dict(rope=True), False, dict(q_positions=POSITIONS),
                       dict(rope=True, q_pos=POSITIONS, kv_pos=POSITIONS)),
}
# The explicit (einsum) path on the cases with masks and lengths;
# test_dot_product_attention_path_equals_explicit_path compares both paths on everything at once.
EINSUM_CASES = ["causal_head_mask", "causal_lengths", "cross_mask_lengths", "gqa_rope"]
REFERENCE_RUNS = [pytest.param(*CASES[name], None, id=f"{name}-dot_product_attention")
                  for name in CASES]
REFERENCE_RUNS += [pytest.param(*CASES[name], "einsum", id=f"{name}-einsum")
                   for name in EINSUM_CASES]


@pytest.mark.parametrize("kwargs,cross,extras,ref_kwargs,implementation", REFERENCE_RUNS)
def test_matches_numpy_reference(kwargs, cross, extras, ref_kwargs, implementation):
    layer = MultiHeadAttention(4, implementation=implementation, **kwargs)
    xq = rand((B, T, F), 1)
    xkv = rand((B, S, 6), 2) if cross else None
    inp = AttentionInput(q=jnp.asarray(xq), kv=None if xkv is None else jnp.asarray(xkv),
                         **{k: jnp.asarray(v) for k, v in extras.items()})
    params = make_params(layer, inp)
    y, state = run(layer, params, inp)
    assert state == {}
    expected = mha_ref(params, xq, xkv, **ref_kwargs)
    assert y.shape == expected.shape and y.dtype == jnp.float32
    np.testing.assert_allclose(f64(y), expected, **TOL)


def test_plain_array_is_self_attention_and_init_params(key):
    layer = MultiHeadAttention(2, use_bias=True)
    x = jnp.asarray(rand((B, T, F), 3))
    params, state = jax.jit(layer.init)(key, x)
    assert state == {}
    assert jax.tree.map(jnp.shape, params) == {
        "query": {"w": (8, 2, 4), "b": (2, 4)}, "key": {"w": (8, 2, 4), "b": (2, 4)},
        "value": {"w": (8, 2, 4), "b": (2, 4)}, "out": {"w": (2, 4, 8), "b": (8,)}}
    assert all(np.all(np.asarray(params[name]["b"]) == 0) for name in params)
    y, _ = run(layer, params, x)
    np.testing.assert_allclose(f64(y), mha_ref(params, x), **TOL)
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
                       rope=True, kv_lengths=lengths.reshape(6))
    inp = AttentionInput(jnp.asarray(x), mask=jnp.asarray(mask), kv_lengths=jnp.asarray(lengths))
    y, _ = run(layer, params, inp)
    assert y.shape == (2, 3, T, F)
    np.testing.assert_allclose(f64(y).reshape(6, T, F), expected, **TOL)
    flat = jax.tree.map(lambda a: a.reshape((6,) + a.shape[2:]), inp)
    per_example = jax.jit(jax.vmap(lambda i: layer.apply(params, {}, i)[0]))(flat)
    np.testing.assert_allclose(f64(per_example), expected, **TOL)


# ============================================================================= causality

@pytest.mark.parametrize("implementation", IMPLEMENTATIONS, ids=["dot_product_attention",
                                                                 "einsum"])
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


# ============================================================================= decoding

@pytest.mark.parametrize("kwargs", [dict(num_kv_heads=2, rope=True),
                                    dict(num_kv_heads=1, use_bias=True)],
                         ids=["gqa_rope", "mqa_bias"])
def test_cached_decoding_equals_full_causal_pass(key, kwargs):
    layer = MultiHeadAttention(4, causal=True, **kwargs)
    total, max_length = 7, 9
    x = jnp.asarray(rand((B, total, F), 8))
    params = make_params(layer, x)
    full = mha_ref(params, x, causal=True, rope=kwargs.get("rope", False))

    step = jax.jit(lambda state, xt: layer.apply(params, state, xt))
    state = {"cache": init_cache(params, B, max_length)}
    kv_heads = kwargs.get("num_kv_heads", 4)
    assert jax.tree.map(jnp.shape, state) == {"cache": {
        "k": (B, max_length, kv_heads, 2), "v": (B, max_length, kv_heads, 2), "index": ()}}
    # a prompt of 3 tokens at once, then one token at a time
    y, state = step(state, x[:, :3])
    outputs = [y]
    for t in range(3, total):
        y, state = step(state, x[:, t:t + 1])
        outputs.append(y)
    assert step._cache_size() == 2  # the index is traced: one compilation per chunk length
    assert int(state["cache"]["index"]) == total
    np.testing.assert_allclose(f64(jnp.concatenate(outputs, axis=1)), full, **TOL)


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


# ============================================================================= GQA / MQA

@pytest.mark.parametrize("kv_heads", [2, 1], ids=["gqa", "mqa"])
def test_grouped_query_attention_equals_mha_with_repeated_kv_heads(key, kv_heads):
    x = rand((B, T, F), 11)
    layer = MultiHeadAttention(4, num_kv_heads=kv_heads, causal=True)
    params = make_params(layer, jnp.asarray(x))
    y, _ = run(layer, params, jnp.asarray(x))
    repeat = 4 // kv_heads  # query head h reads kv head h // repeat
    mha_params = {**params, "key": {"w": np.repeat(params["key"]["w"], repeat, axis=1)},
                  "value": {"w": np.repeat(params["value"]["w"], repeat, axis=1)}}
    np.testing.assert_allclose(f64(y), mha_ref(mha_params, x, causal=True), **TOL)


def test_num_kv_heads_equal_to_num_heads_is_ordinary_mha(key):
    x = jnp.asarray(rand((B, T, F), 12))
    gqa, mha = MultiHeadAttention(4, num_kv_heads=4), MultiHeadAttention(4)
    params = make_params(mha, x)
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(
        jnp.shape, jax.eval_shape(gqa.init, key, x)[0])
    np.testing.assert_array_equal(np.asarray(run(gqa, params, x)[0]),
                                  np.asarray(run(mha, params, x)[0]))


# ============================================================================= RoPE

def test_apply_rope_matches_reference_and_keeps_norms():
    x = rand((2, 6, 3, 8), 12)
    pos = np.array([[0, 1, 2, 3, 4, 5], [7, 3, 100, 2, 1, 0]], np.int32)
    rope = jax.jit(apply_rope)
    y = rope(jnp.asarray(x), jnp.asarray(pos))
    np.testing.assert_allclose(f64(y), rope_ref(x, pos), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(f64(y), axis=-1), np.linalg.norm(f64(x), axis=-1),
                               rtol=1e-5)
    np.testing.assert_allclose(f64(rope(jnp.asarray(x), jnp.zeros((2, 6), jnp.int32))), x)
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


def test_rope_layer_is_invariant_to_shifting_all_positions(key):
    layer = MultiHeadAttention(2, rope=True, causal=True)
    x = jnp.asarray(rand((B, T, F), 15))
    params = make_params(layer, x)
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    y, _ = run(layer, params, AttentionInput(x, q_positions=pos, kv_positions=pos))
    np.testing.assert_allclose(f64(y), mha_ref(params, x, causal=True, rope=True), **TOL)
    y_shift, _ = run(layer, params, AttentionInput(x, q_positions=pos + 11,
                                                   kv_positions=pos + 11))
    np.testing.assert_allclose(f64(y_shift), f64(y), rtol=1e-4, atol=1e-4)
    y_kv, _ = run(layer, params, AttentionInput(x, q_positions=pos + 11, kv_positions=pos))
    assert not np.allclose(f64(y_kv), f64(y), atol=1e-3)


# ============================================================================= both paths

def test_dot_product_attention_path_equals_explicit_path(key):
    kv = jnp.asarray(rand((B, S, 6), 16))
    x = jnp.asarray(rand((B, T, F), 17))
    inp = AttentionInput(x, kv, mask=jnp.asarray(CROSS_MASK), q_lengths=jnp.array([4, 5]),
                         kv_lengths=jnp.array([6, 3]), q_positions=jnp.arange(T) + 2)
    kwargs = dict(num_kv_heads=2, rope=True, causal=True, use_bias=True)
    fused, explicit = (MultiHeadAttention(4, implementation=i, **kwargs)
                       for i in ("xla", "einsum"))
    params = make_params(fused, inp)

    def value_and_grad(layer):
        def loss(p):
            y, _ = layer.apply(p, {}, inp)
            return jnp.sum(y ** 2), y
        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    (_, y_fused), g_fused = value_and_grad(fused)
    (_, y_explicit), g_explicit = value_and_grad(explicit)
    np.testing.assert_allclose(f64(y_fused), f64(y_explicit), **TOL)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(f64(a), f64(b), rtol=1e-4, atol=1e-4),
                 g_fused, g_explicit)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS, ids=["dot_product_attention",
                                                                 "einsum"])
def test_bfloat16_runs_with_float32_softmax(key, implementation):
    layer = MultiHeadAttention(4, num_kv_heads=2, causal=True, rope=True,
                               implementation=implementation)
    x = rand((B, T, F), 18)
    params = make_params(layer, jnp.asarray(x))
    x16 = jnp.asarray(x).astype(jnp.bfloat16)
    y16, _ = run(layer, params, x16)
    assert y16.dtype == jnp.bfloat16
    expected = mha_ref(params, x, causal=True, rope=True)
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
    dropped (output 0) or scaled to 1 / (1 - rate)."""
    rate, t = 0.25, 16
    layer = MultiHeadAttention(1, dropout=rate, head_dim=4)
    x = rand((64, t, F), 20)
    mask = np.eye(t, dtype=bool)
    params = make_params(layer, jnp.asarray(x))
    y, _ = run(layer, params, AttentionInput(jnp.asarray(x), mask=jnp.asarray(mask)),
               key=jax.random.key(3), train=True)
    dropped = np.all(np.asarray(y) == 0, axis=-1)
    assert abs(dropped.mean() - rate) < 0.04
    expected = mha_ref(params, x, mask=mask) / (1 - rate)
    np.testing.assert_allclose(f64(y)[~dropped], expected[~dropped], **TOL)


# ============================================================================= masked rows

@pytest.mark.parametrize("implementation", IMPLEMENTATIONS, ids=["dot_product_attention",
                                                                 "einsum"])
def test_fully_masked_rows_give_zero_attention(key, implementation):
    """Example 0 has kv_lengths 0; in example 1 query 1 is masked for every head, query 2 for
    head 0 only, and query 4 is past q_lengths. Rows with nothing to attend to output the
    output bias (a zero attention result), and gradients stay finite."""
    layer = MultiHeadAttention(2, use_bias=True, implementation=implementation)
    kv = rand((B, S, F), 22)
    x = rand((B, T, F), 23)
    mask = np.ones((B, 2, T, S), bool)
    mask[1, :, 1] = False
    mask[1, 0, 2] = False
    inp = AttentionInput(jnp.asarray(x), jnp.asarray(kv), mask=jnp.asarray(mask),
                         q_lengths=jnp.array([5, 4]), kv_lengths=jnp.array([0, 7]))
    params = make_params(layer, inp)

    def loss(p):
        y, _ = layer.apply(p, {}, inp)
        return jnp.sum(y ** 2), y

    (_, y), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    b_out = np.asarray(params["out"]["b"], np.float64)
    np.testing.assert_allclose(f64(y[0]), np.broadcast_to(b_out, (T, F)), atol=1e-6)
    np.testing.assert_allclose(f64(y[1, 1]), b_out, atol=1e-6)
    np.testing.assert_allclose(f64(y[1, 4]), b_out, atol=1e-6)
    assert not np.allclose(f64(y[1, 2]), b_out, atol=1e-3)  # head 1 still attends
    np.testing.assert_allclose(
        f64(y), mha_ref(params, x, kv, mask=mask, q_lengths=[5, 4], kv_lengths=[0, 7]), **TOL)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))


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


def test_apply_errors_name_the_field_and_expected_versus_got(key):
    layer = MultiHeadAttention(2)
    x = jnp.zeros((2, 5, 8))
    kv = jnp.zeros((2, 7, 6))
    inp = AttentionInput(x, kv)
    params, state = make_params(layer, inp), {}
    with pytest.raises(fnn.ShapeError, match=r"^MultiHeadAttention: expected input "
                                             r"\[\.\.\., time, 8\], got float32\[2, 5, 4\]$"):
        layer.apply(params, state, AttentionInput(jnp.zeros((2, 5, 4)), kv))
    with pytest.raises(fnn.ShapeError, match=r"^MultiHeadAttention: expected kv "
                                             r"\[\.\.\., kv_time, 6\], got float32\[2, 7, 5\]$"):
        layer.apply(params, state, AttentionInput(x, jnp.zeros((2, 7, 5))))
    with pytest.raises(fnn.ShapeError, match=r"^MultiHeadAttention: expected kv \[2, kv_time, "
                                             r"kv_features\] \(the batch axes of q "
                                             r"float32\[2, 5, 8\]\), got float32\[3, 7, 6\]$"):
        layer.apply(params, state, AttentionInput(x, jnp.zeros((3, 7, 6))))
    with pytest.raises(fnn.ShapeError, match=r"^MultiHeadAttention: expected mask bool "
                                             r"broadcastable to \[\.\.\., heads, q_time, "
                                             r"kv_time\] = \[2, 2, 5, 7\], got float32\[5, 7\]$"):
        layer.apply(params, state, AttentionInput(x, kv, mask=jnp.ones((5, 7))))
    with pytest.raises(fnn.ShapeError, match=r"expected mask .* got bool\[2, 5, 5\]$"):
        layer.apply(params, state, AttentionInput(x, kv, mask=jnp.ones((2, 5, 5), bool)))
    with pytest.raises(fnn.ShapeError, match=r"^MultiHeadAttention: expected kv_lengths int "
                                             r"broadcastable to \[2\], got float32\[2\]$"):
        layer.apply(params, state, AttentionInput(x, kv, kv_lengths=jnp.ones(2)))
    with pytest.raises(fnn.ShapeError, match=r"expected q_lengths int broadcastable to \[2\], "
                                             r"got int32\[3\]$"):
        layer.apply(params, state, AttentionInput(x, kv, q_lengths=jnp.ones(3, jnp.int32)))
    with pytest.raises(fnn.ShapeError, match=r"expected input \[\.\.\., time, 8\]"):
        jax.jit(layer.apply)(params, state, AttentionInput(jnp.zeros((2, 5, 3)), kv))


def test_decode_errors(key):
    layer = MultiHeadAttention(2, causal=True, rope=True)
    x = jnp.zeros((2, 5, 8))
    params = make_params(layer, x)
    state = {"cache": init_cache(params, (2,), 4)}
    with pytest.raises(fnn.ShapeError, match=r"^MultiHeadAttention: expected input "
                                             r"\[2, new, 8\] with new <= 4 \(the cache's batch "
                                             r"shape and length\), got float32\[2, 5, 8\]$"):
        layer.apply(params, state, x)
    with pytest.raises(fnn.ShapeError,
                       match=r"expected input \[2, new, 8\].*got float32\[3, 1, 8\]"):
        layer.apply(params, state, jnp.zeros((3, 1, 8)))
    with pytest.raises(fnn.LayerError, match=r"decode mode \(a cache in state\) is "
                                             r"self-attention only"):
        layer.apply(params, state, AttentionInput(x[:, :1], kv=x))
