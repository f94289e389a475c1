"""Transformer blocks (fnn/layers/transformer.py): ``EncoderBlock`` and ``DecoderBlock`` against a
float64 numpy pre-norm reference written independently of fnn (masks, lengths, windows, ALiBi,
norm epsilons, activations, cross-attention), the residual dropouts and their keys, ``Seq`` in and
out, cached decoding (``init_block_cache``) through a block and through ``repeat`` of blocks
against the full causal pass, causality, and errors.

References take the params the layer itself creates (names and shapes from ``init``, values drawn
by numpy), never stored numbers. Sizes are tiny and calls are jitted (one compilation per layer and
input structure) to keep the file fast on a small CPU.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnn
from fnn.combinators import repeat
from fnn.core import Seq
from fnn.layers.transformer import DecoderBlock, EncoderBlock, init_block_cache
from helpers import f64, make_params, rand, run

TOL = dict(rtol=2e-5, atol=2e-5)
B, T, F = 2, 5, 8


def layer_slice(stacked, i):
    return jax.tree.map(lambda a: a[i], stacked)


# ============================================================================= references

_erf = np.vectorize(math.erf)
ACTS = {"gelu": lambda v: 0.5 * v * (1.0 + _erf(v / math.sqrt(2.0))),
        "gelu_tanh": lambda v: 0.5 * v * (1.0 + np.tanh(math.sqrt(2.0 / math.pi)
                                                        * (v + 0.044715 * v ** 3))),
        "relu": lambda v: np.maximum(v, 0)}


def silu_ref(v):
    return v / (1.0 + np.exp(-v))


def dense_ref(p, x):
    y = x @ f64(p["w"])
    return y + f64(p["b"]) if "b" in p else y


def ffn_ref(p, x, activation="gelu"):
    x = f64(x)
    if activation == "swiglu":
        h = silu_ref(dense_ref(p["gate"], x)) * dense_ref(p["up"], x)
    else:
        h = ACTS[activation](dense_ref(p["up"], x))
    return dense_ref(p["down"], h)


def norm_ref(p, x, kind, epsilon=None):
    """LayerNorm (params {"scale", "b"}, default epsilon 1e-5) or RMSNorm ({"scale"}, 1e-6)."""
    x = f64(x)
    if kind == "layer":
        eps = 1e-5 if epsilon is None else epsilon
        mean = x.mean(-1, keepdims=True)
        y = (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps)
        return y * f64(p["scale"]) + f64(p["b"])
    eps = 1e-6 if epsilon is None else epsilon
    return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * f64(p["scale"])


def mha_ref(p, xq, xkv=None, *, causal=False, window=None, alibi=False, allowed=None,
            q_lengths=None, kv_lengths=None, q_positions=None, kv_positions=None):
    """Naive attention in float64. xq: [B, T, F], xkv: [B, S, Fkv]; ``allowed``: bool
    broadcastable to [B, T, S] or [B, N, T, S]; ``window``: int or (left, right); ALiBi's bias
    ``-2 ** (-8 (h + 1) / N) * |i - j|`` (N a power of two). A query row that may attend to no
    key, or lies past ``q_lengths``, gets a zero attention result (the output bias)."""
    xq = f64(xq)
    xkv = xq if xkv is None else f64(xkv)
    q = np.einsum("btf,fnd->btnd", xq, f64(p["query"]["w"]))
    k = np.einsum("bsf,fnd->bsnd", xkv, f64(p["key"]["w"]))
    v = np.einsum("bsf,fnd->bsnd", xkv, f64(p["value"]["w"]))
    if "b" in p["query"]:
        q, k, v = q + f64(p["query"]["b"]), k + f64(p["key"]["b"]), v + f64(p["value"]["b"])
    batch, t, n, _ = q.shape
    s, kvh = k.shape[1], k.shape[2]
    k, v = np.repeat(k, n // kvh, axis=2), np.repeat(v, n // kvh, axis=2)
    qi = np.arange(t) if q_positions is None else np.asarray(q_positions)
    kj = np.arange(s) if kv_positions is None else np.asarray(kv_positions)
    i, j = qi[:, None], kj[None, :]
    ok = np.ones((batch, n, t, s), bool)
    if causal:
        ok &= j <= i
    if window is not None:
        left, right = (window, window) if isinstance(window, int) else window
        ok &= (j >= i - left) & (j <= i + right)
    if allowed is not None:
        allowed = np.asarray(allowed)
        ok &= allowed[:, None] if allowed.ndim == 3 else allowed
    if kv_lengths is not None:
        ok &= np.arange(s)[None, None, None, :] < np.asarray(kv_lengths)[:, None, None, None]
    logits = np.einsum("btnd,bsnd->bnts", q, k) / math.sqrt(q.shape[-1])
    if alibi:
        slopes = 2.0 ** (-8.0 * np.arange(1, n + 1) / n)
        logits = logits - slopes[:, None, None] * np.abs(i - j)
    logits = np.where(ok, logits, -np.inf)
    any_ok = ok.any(-1, keepdims=True)
    logits = np.where(any_ok, logits, 0.0)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w = np.where(ok, w, 0.0)
    w = np.where(any_ok, w / np.where(any_ok, w.sum(-1, keepdims=True), 1.0), 0.0)
    out = np.einsum("bnts,bsnd->btnd", w, v)
    if q_lengths is not None:
        out = np.where((np.arange(t)[None, :] < np.asarray(q_lengths)[:, None])[..., None, None],
                       out, 0.0)
    y = np.einsum("btnd,ndo->bto", out, f64(p["out"]["w"]))
    return y + f64(p["out"]["b"]) if "b" in p["out"] else y


def block_ref(p, x, *, norm="layer", norm_epsilon=None, activation="gelu", causal=False,
              window=None, alibi=False, lengths=None, mask=None, memory=None,
              memory_lengths=None, memory_mask=None):
    """The pre-norm block: x + attention(norm1(x)), [+ cross_attention(cross_norm(x), memory)],
    + ffn(norm2(x))."""
    x = f64(x)
    x = x + mha_ref(p["attention"], norm_ref(p["norm1"], x, norm, norm_epsilon), causal=causal,
                    window=window, alibi=alibi, allowed=mask, q_lengths=lengths,
                    kv_lengths=lengths)
    if memory is not None:
        x = x + mha_ref(p["cross_attention"], norm_ref(p["cross_norm"], x, norm, norm_epsilon),
                        memory, allowed=memory_mask, q_lengths=lengths,
                        kv_lengths=memory_lengths)
    return x + ffn_ref(p["ffn"], norm_ref(p["norm2"], x, norm, norm_epsilon), activation)


# ============================================================================= encoder block

@pytest.mark.parametrize("kwargs", [dict(),
                                    dict(norm="rms", activation="swiglu", causal=True,
                                         num_kv_heads=1, use_bias=False)],
                         ids=["layernorm_gelu", "rms_swiglu_causal_mqa"])
def test_encoder_block_matches_pre_norm_reference(key, kwargs):
    block = EncoderBlock(2, 16, **kwargs)
    x = jnp.asarray(rand((B, T, F), 8))
    params, state = block.init(key, jax.ShapeDtypeStruct(x.shape, x.dtype))
    assert set(params) == {"norm1", "attention", "norm2", "ffn"} and state == {}
    if kwargs.get("norm", "layer") == "layer":
        assert set(params["norm1"]) == {"scale", "b"}
    params = make_params(block, x)
    y, new_state = run(block, params, x)
    assert new_state == {}
    ref = block_ref(params, x, norm=kwargs.get("norm", "layer"),
                    activation=kwargs.get("activation", "gelu"), causal=kwargs.get("causal", False))
    np.testing.assert_allclose(f64(y), ref, **TOL)


@pytest.mark.parametrize("make", [EncoderBlock, DecoderBlock])
def test_post_norm_blocks_match_the_post_norm_reference(key, make):
    """``norm_first=False``: ``norm1(x + attention(x))``, then ``norm2(h + ffn(h))``, with the
    same params as the pre-norm block, which gives another output."""
    block = make(2, 16, norm_first=False)
    x = jnp.asarray(rand((B, T, F), 9))
    params = make_params(block, x)
    y, _ = run(block, params, x)
    causal = make is DecoderBlock
    h = norm_ref(params["norm1"], f64(x) + mha_ref(params["attention"], x, causal=causal),
                 "layer")
    ref = norm_ref(params["norm2"], h + ffn_ref(params["ffn"], h), "layer")
    np.testing.assert_allclose(f64(y), ref, **TOL)
    pre, _ = run(make(2, 16), params, x)
    assert not np.allclose(f64(pre), ref, atol=1e-3)
    with pytest.raises(TypeError, match="norm_first must be True or False, got 'post'"):
        make(2, 16, norm_first="post")


# every option at once: (block, its options, the reference's options)
OPTIONS = {
    "encoder_window_alibi_eps_gelu_tanh": (
        EncoderBlock(4, 16, window=1, alibi=True, norm_epsilon=0.5, activation="gelu_tanh"),
        dict(window=1, alibi=True, norm_epsilon=0.5, activation="gelu_tanh")),
    "decoder_window_alibi_rms_eps_gelu_tanh": (
        DecoderBlock(4, 16, window=(2, 5), alibi=True, norm="rms", norm_epsilon=0.3,
                     activation="gelu_tanh"),
        dict(causal=True, window=(2, 5), alibi=True, norm="rms", norm_epsilon=0.3,
             activation="gelu_tanh")),
}


@pytest.mark.parametrize("case", OPTIONS)
def test_window_alibi_norm_epsilon_and_gelu_tanh_match_the_reference(case):
    """Each option changes the output (the reference without it differs) and the block matches
    the reference with it."""
    block, options = OPTIONS[case]
    x = jnp.asarray(rand((B, 6, F), 50))
    params = make_params(block, x)
    y, _ = run(block, params, x)
    np.testing.assert_allclose(f64(y), block_ref(params, x, **options), **TOL)
    defaults = dict(window=None, alibi=False, norm_epsilon=None, activation="gelu")
    for option, default in defaults.items():
        other = block_ref(params, x, **(options | {option: default}))
        assert not np.allclose(f64(y), other, rtol=0, atol=1e-4), option  # the option acts


def test_encoder_block_passes_lengths_and_masks_to_attention(key):
    block = EncoderBlock(2, 16)
    x = rand((B, T, F), 9)
    params = make_params(block, jnp.asarray(x))
    lengths = jnp.asarray([5, 3], jnp.int32)
    changed = x.copy()
    changed[1, 3:] = rand((2, F), 10)  # only padding of the second example changes
    y, _ = run(block, params, Seq(jnp.asarray(x), lengths=lengths))
    y2, _ = run(block, params, Seq(jnp.asarray(changed), lengths=lengths))
    np.testing.assert_allclose(f64(y2.x[1, :3]), f64(y.x[1, :3]), **TOL)
    np.testing.assert_array_equal(np.asarray(y2.x[0]), np.asarray(y.x[0]))
    # the valid rows equal the block on the unpadded sequence alone
    short, _ = run(block, params, jnp.asarray(x[1:, :3]))
    np.testing.assert_allclose(f64(y.x[1:, :3]), f64(short), **TOL)
    # lengths are query and key lengths: padded rows get no attention (x + out bias + ffn)
    np.testing.assert_allclose(f64(y.x), block_ref(params, x, lengths=lengths), **TOL)
    # a mask: no query may attend to key 4, so rows 0..3 do not depend on x[:, 4]
    mask = np.ones((T, T), bool)
    mask[:, 4] = False
    changed = x.copy()
    changed[:, 4] = rand((B, F), 11)
    y, _ = run(block, params, Seq(jnp.asarray(x), mask=jnp.asarray(mask)))
    y2, _ = run(block, params, Seq(jnp.asarray(changed), mask=jnp.asarray(mask)))
    np.testing.assert_allclose(f64(y2.x[:, :4]), f64(y.x[:, :4]), **TOL)
    np.testing.assert_allclose(f64(y.x), block_ref(params, x, mask=mask[None]), **TOL)
    assert not np.allclose(f64(y.x), block_ref(params, x), atol=1e-3)  # the mask did act


# ============================================================================= decoder block

def test_decoder_block_is_causal(key):
    block = DecoderBlock(2, 16, rope=True)
    x = rand((B, 6, F), 12)
    params = make_params(block, jnp.asarray(x))
    assert set(params) == {"norm1", "attention", "norm2", "ffn"}
    y, _ = run(block, params, jnp.asarray(x))
    changed = x.copy()
    changed[:, 3:] = rand((B, 3, F), 13)
    y2, _ = run(block, params, jnp.asarray(changed))
    np.testing.assert_array_equal(np.asarray(y2[:, :3]), np.asarray(y[:, :3]))
    assert not np.allclose(np.asarray(y2[:, 3:]), np.asarray(y[:, 3:]))


def test_decoder_block_with_cross_attention_matches_reference(key):
    block = DecoderBlock(2, 16, cross=True)
    x, memory = jnp.asarray(rand((B, T, F), 14)), jnp.asarray(rand((B, 7, 6), 15))
    params, _ = block.init(key, Seq(x, memory=memory))
    assert set(params) == {"norm1", "attention", "cross_norm", "cross_attention", "norm2", "ffn"}
    assert params["cross_attention"]["key"]["w"].shape == (6, 2, 4)
    params = make_params(block, Seq(x, memory=memory))
    y, _ = run(block, params, Seq(x, memory=memory))
    np.testing.assert_allclose(f64(y.x), block_ref(params, x, causal=True, memory=memory), **TOL)
    # changing the memory changes the output ...
    other = memory.at[:, 2].set(jnp.asarray(rand((B, 6), 16)))
    y2, _ = run(block, params, Seq(x, memory=other))
    assert not np.allclose(f64(y2.x), f64(y.x))
    # ... but not memory positions that are masked out, by lengths or by a mask
    memory_lengths = jnp.asarray([2, 2], jnp.int32)
    y, _ = run(block, params, Seq(x, memory=memory, memory_lengths=memory_lengths))
    y2, _ = run(block, params, Seq(x, memory=other, memory_lengths=memory_lengths))
    np.testing.assert_allclose(f64(y2.x), f64(y.x), **TOL)
    np.testing.assert_allclose(f64(y.x), block_ref(params, x, causal=True, memory=memory,
                                                   memory_lengths=memory_lengths), **TOL)
    mask = np.ones((T, 7), bool)
    mask[:, 2] = False
    y, _ = run(block, params, Seq(x, memory=memory, memory_mask=jnp.asarray(mask)))
    y2, _ = run(block, params, Seq(x, memory=other, memory_mask=jnp.asarray(mask)))
    np.testing.assert_allclose(f64(y2.x), f64(y.x), **TOL)
    np.testing.assert_allclose(f64(y.x), block_ref(params, x, causal=True, memory=memory,
                                                   memory_mask=mask[None]), **TOL)
    # query lengths: padded rows get neither self- nor cross-attention
    lengths = jnp.asarray([5, 2], jnp.int32)
    y, _ = run(block, params, Seq(x, lengths=lengths, memory=memory,
                                  memory_lengths=jnp.asarray([7, 3], jnp.int32)))
    np.testing.assert_allclose(f64(y.x), block_ref(params, x, causal=True, lengths=lengths,
                                                   memory=memory, memory_lengths=[7, 3]), **TOL)


def test_decoder_block_in_training_applies_each_residual_dropout_with_its_key():
    """The block equals its sublayers applied by hand, child ``i`` (in declaration order norm1,
    attention, drop1, cross_norm, cross_attention, cross_drop, norm2, ffn, drop2) given
    ``fold_in(key, i)``. (The attention's own dropout is MultiHeadAttention's, tested there.)"""
    block = DecoderBlock(2, 16, cross=True, dropout=0.3)
    x, memory = jnp.asarray(rand((B, T, F), 60)), jnp.asarray(rand((B, 3, 6), 61))
    seq = Seq(x, memory=memory)
    params = make_params(block, seq)
    drop_key = jax.random.key(3)
    y, _ = run(block, params, seq, key=drop_key, train=True)
    branches = [("norm1", fnn.MultiHeadAttention(2, causal=True), "attention", 0),
                ("cross_norm", fnn.MultiHeadAttention(2, cross=True), "cross_attention", 3),
                ("norm2", fnn.FeedForward(16, dropout=0.3), "ffn", 6)]

    @jax.jit
    def by_hand(params, seq, key):
        def apply(layer, name, h, i):
            return layer.apply(params.get(name, {}), {}, h, key=jax.random.fold_in(key, i),
                               train=True)[0]

        h = seq.x
        for norm_name, body, body_name, i in branches:
            u = apply(fnn.LayerNorm(), norm_name, seq.with_x(h), i)
            u = apply(body, body_name, u, i + 1)
            h = h + apply(fnn.Dropout(0.3), "", u, i + 2).x
        return h

    np.testing.assert_allclose(f64(y.x), f64(by_hand(params, seq, drop_key)), **TOL)
    y_eval, _ = run(block, params, seq)
    assert not np.allclose(f64(y.x), f64(y_eval.x), atol=1e-3)  # dropout acted in training


def test_blocks_return_what_they_are_given():
    """A plain array gives a plain array; a Seq gives the Seq with its array replaced and the
    same side inputs. A block without cross-attention does not read a memory (it only passes it
    on)."""
    x = jnp.asarray(rand((B, T, F), 70))
    lengths = jnp.asarray([5, 4], jnp.int32)
    positions = jnp.asarray([[0, 1, 2, 3, 4], [2, 3, 4, 5, 6]], jnp.int32)
    mask = jnp.asarray(np.tril(np.ones((T, T), bool)) | np.eye(T, k=1, dtype=bool))
    memory = jnp.asarray(rand((B, 3, 6), 71))
    memory_lengths = jnp.asarray([3, 1], jnp.int32)
    encoder, decoder = EncoderBlock(2, 16, rope=True), DecoderBlock(2, 16, cross=True)
    for block, seq in ((encoder, Seq(x, lengths=lengths, positions=positions, mask=mask)),
                       (decoder, Seq(x, lengths=lengths, memory=memory,
                                     memory_lengths=memory_lengths))):
        params = make_params(block, seq)
        y, _ = run(block, params, seq)
        assert isinstance(y, Seq) and y.x.shape == x.shape
        for field, given in zip(seq._fields[1:], seq[1:]):
            if given is None:
                assert getattr(y, field) is None, field
            else:
                np.testing.assert_array_equal(getattr(y, field), given, err_msg=field)
    params = make_params(encoder, x)
    y, _ = run(encoder, params, x)
    assert isinstance(y, jax.Array) and y.shape == x.shape
    y_seq, _ = run(encoder, params, Seq(x))
    np.testing.assert_array_equal(y_seq.x, y)
    plain = DecoderBlock(2, 16)
    params = make_params(plain, x)
    y, _ = run(plain, params, x)
    y_mem, _ = run(plain, params, Seq(x, memory=memory))
    np.testing.assert_array_equal(y_mem.x, y)
    np.testing.assert_array_equal(y_mem.memory, memory)


# ============================================================================= cached decoding

def test_cached_decoding_through_decoder_block_equals_full_pass(key):
    block = DecoderBlock(4, 16, cross=True, num_kv_heads=2, rope=True)
    total, max_length = 6, 8
    x, memory = jnp.asarray(rand((B, total, F), 17)), jnp.asarray(rand((B, 3, 5), 18))
    params = make_params(block, Seq(x, memory=memory))
    full, _ = run(block, params, Seq(x, memory=memory))
    state = init_block_cache(params, B, max_length)
    assert jax.tree.map(jnp.shape, state) == {"attention": {"cache": {
        "k": (B, max_length, 2, 2), "v": (B, max_length, 2, 2), "index": ()}}}
    y, state = run(block, params, Seq(x[:, :2], memory=memory), state)  # a prompt of two
    outputs = [y.x]
    for t in range(2, total):  # then one token at a time
        y, state = run(block, params, Seq(x[:, t:t + 1], memory=memory), state)
        outputs.append(y.x)
    assert int(state["attention"]["cache"]["index"]) == total
    np.testing.assert_allclose(f64(jnp.concatenate(outputs, axis=1)), f64(full.x), **TOL)
    # decode mode takes no lengths: the cache's index says which positions are valid
    with pytest.raises(fnn.LayerError, match=r"^MultiHeadAttention at attention: decode mode"):
        block.apply(params, init_block_cache(params, B, max_length),
                    Seq(x[:, :1], memory=memory, lengths=jnp.ones((B,), jnp.int32)))


def test_cached_decoding_through_repeated_blocks(key):
    model = repeat(DecoderBlock(2, 16, rope=True), 2)
    x = jnp.asarray(rand((B, 4, F), 19))
    params = make_params(model, x)
    full, _ = run(model, params, x)
    state = init_block_cache(params, (B,), 4)
    assert jax.tree.map(jnp.shape, state["layers"]["attention"]["cache"]) == {
        "k": (2, B, 4, 2, 4), "v": (2, B, 4, 2, 4), "index": (2,)}
    outputs = []
    for t in range(4):
        y, state = run(model, params, x[:, t:t + 1], state)
        outputs.append(y)
    np.testing.assert_array_equal(np.asarray(state["layers"]["attention"]["cache"]["index"]),
                                  [4, 4])
    np.testing.assert_allclose(f64(jnp.concatenate(outputs, axis=1)), f64(full), **TOL)


def test_cached_decoding_through_repeated_window_alibi_blocks_equals_the_full_pass():
    """repeat(DecoderBlock(window=2, alibi=True), 2): the full pass equals the reference applied
    copy after copy, and decoding a prompt then one token at a time (into a cache longer than
    the sequence) equals the full pass."""
    model = repeat(DecoderBlock(4, 16, window=2, alibi=True), 2)
    total, max_length = 7, 9
    x = jnp.asarray(rand((B, total, F), 80))
    params = make_params(model, x)
    full, _ = run(model, params, x)
    h = f64(x)
    for i in range(2):
        h = block_ref(layer_slice(params["layers"], i), h, causal=True, window=2, alibi=True)
    np.testing.assert_allclose(f64(full), h, **TOL)
    unwindowed = f64(x)
    for i in range(2):
        unwindowed = block_ref(layer_slice(params["layers"], i), unwindowed, causal=True,
                               alibi=True)
    assert not np.allclose(f64(full), unwindowed, atol=1e-4)  # the window acts on 7 steps
    state = init_block_cache(params, B, max_length)
    y, state = run(model, params, x[:, :3], state)  # a prompt of three
    outputs = [y]
    for t in range(3, total):
        y, state = run(model, params, x[:, t:t + 1], state)
        outputs.append(y)
    np.testing.assert_array_equal(np.asarray(state["layers"]["attention"]["cache"]["index"]),
                                  [total, total])
    np.testing.assert_allclose(f64(jnp.concatenate(outputs, axis=1)), f64(full), **TOL)


# ============================================================================= errors

def test_a_cross_attention_block_without_a_memory_is_refused(key):
    block = DecoderBlock(2, 8, cross=True)
    x = jnp.zeros((B, T, F))
    message = r"DecoderBlock{}: a block with cross=True attends to a memory: call it on " \
              r"Seq\(x, memory=\.\.\.\), got {}$"
    with pytest.raises(fnn.LayerError, match="^" + message.format("", r"float32\[2, 5, 8\]")):
        block.init(key, x)
    with pytest.raises(fnn.LayerError, match="^" + message.format(
            "", r"Seq\(x=float32\[2, 5, 8\], lengths=int32\[2\]\)")):
        block.init(key, Seq(x, lengths=jnp.asarray([5, 3], jnp.int32)))
    params, state = block.init(key, Seq(x, memory=jnp.zeros((B, 3, 4))))
    with pytest.raises(fnn.LayerError, match="^" + message.format("", r"float32\[2, 5, 8\]")):
        block.apply(params, state, x)
    with pytest.raises(fnn.LayerError, match="^" + message.format(" at dec",
                                                                  r"float32\[2, 5, 8\]")):
        fnn.serial(dec=block).apply({"dec": params}, {}, x)


def test_bad_hyper_parameters_and_inputs_are_rejected(key):
    with pytest.raises(ValueError, match="^EncoderBlock: norm must be one of"):
        EncoderBlock(2, 8, norm="batch")
    with pytest.raises(ValueError, match="^DecoderBlock: dropout is a drop probability"):
        DecoderBlock(2, 8, dropout=1.0)
    with pytest.raises(ValueError, match="^EncoderBlock: attention_dropout is a drop "
                                         "probability"):
        EncoderBlock(2, 8, attention_dropout=-0.1)
    with pytest.raises(ValueError, match="^DecoderBlock: num_heads must be a positive integer"):
        DecoderBlock(0, 8)
    with pytest.raises(ValueError, match="^FeedForward: unknown activation 'swish'"):
        EncoderBlock(2, 8, activation="swish")
    x = jnp.zeros((B, T, F))
    with pytest.raises(fnn.ShapeError, match=r"^EncoderBlock: expected input \[\.\.\., time, "
                                             r"features\], got float32\[8\]$"):
        EncoderBlock(2, 8).init(key, jnp.zeros((F,)))
    with pytest.raises(fnn.ShapeError, match=r"^DecoderBlock: expected a floating-point input "
                                             r"\[\.\.\., time, features\], got int32\[2, 5, 8\]$"):
        DecoderBlock(2, 8).init(key, jnp.zeros((B, T, F), jnp.int32))
    model = fnn.serial(block=EncoderBlock(2, 8))
    params, state = model.init(key, x)
    with pytest.raises(fnn.ParamError, match=r"^LayerNorm at block/norm1: expected params "
                                             r"\{scale: \[6\], b: \[6\]\}, got \{scale: "
                                             r"float32\[8\], b: float32\[8\]\}"):
        model.apply(params, state, jnp.zeros((B, T, 6)))
    with pytest.raises(fnn.MissingKeyError, match="^EncoderBlock at block is stochastic"):
        fnn.serial(block=EncoderBlock(2, 8, dropout=0.1)).apply(params, state, x, train=True)
    with pytest.raises(fnn.MissingKeyError, match="^DecoderBlock is stochastic"):
        DecoderBlock(2, 8, attention_dropout=0.1).apply(params["block"], {}, x, train=True)
    with pytest.raises(fnn.LayerError, match=r"^init_block_cache: expected the params of a "
                                             r"DecoderBlock .*got entries \['ffn'\]$"):
        init_block_cache({"ffn": {}}, B, 4)
