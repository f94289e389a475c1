"""Transformer building blocks and ``repeat``: values against float64 numpy references written
independently of fnn, equivalences (``repeat`` versus copies applied one after another, cached
decoding versus the full causal pass), causality, masks, and errors.

Sizes are tiny and calls are jitted (one compilation per layer and input structure) to keep the
file fast on a small CPU.
"""

import math

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

import fnn
from refutil import f64, make_params, rand, run
from fnn.combinators import repeat
from fnn.layers.attention import AttentionInput
from fnn.layers.transformer import (DecoderBlock, DecoderInput, EncoderBlock, FeedForward,
                                    LearnedPositionEmbedding, SinusoidalPositionEmbedding,
                                    init_block_cache, sinusoidal_table)

TOL = dict(rtol=2e-5, atol=2e-5)
B, T, F = 2, 5, 8


# ============================================================================= helpers

def layer_slice(stacked, i):
    return jax.tree.map(lambda a: a[i], stacked)


def count_eqns(jaxpr) -> int:
    """Equations in a jaxpr, including those of nested jaxprs (scan bodies, checkpoints)."""
    total = 0
    for eqn in jaxpr.eqns:
        total += 1
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    total += count_eqns(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    total += count_eqns(sub)
    return total


# ----------------------------------------------------------------------------- references

_erf = np.vectorize(math.erf)


def gelu_ref(v):
    return 0.5 * v * (1.0 + _erf(v / math.sqrt(2.0)))


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
        act = {"gelu": gelu_ref, "relu": lambda v: np.maximum(v, 0)}[activation]
        h = act(dense_ref(p["up"], x))
    return dense_ref(p["down"], h)


def norm_ref(p, x, kind):
    x = f64(x)
    if kind == "layer":
        mean = x.mean(-1, keepdims=True)
        y = (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + 1e-5)
        return y * f64(p["scale"]) + f64(p["bias"])
    return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-6) * f64(p["scale"])


def mha_ref(p, xq, xkv=None, *, causal=False, allowed=None):
    """Naive attention in float64. xq: [B, T, F], xkv: [B, S, Fkv]; ``allowed``: bool
    broadcastable to [B, T, S]."""
    xq = f64(xq)
    xkv = xq if xkv is None else f64(xkv)
    q = np.einsum("btf,fnd->btnd", xq, f64(p["query"]["w"]))
    k = np.einsum("bsf,fnd->bsnd", xkv, f64(p["key"]["w"]))
    v = np.einsum("bsf,fnd->bsnd", xkv, f64(p["value"]["w"]))
    if "b" in p["query"]:
        q, k, v = q + f64(p["query"]["b"]), k + f64(p["key"]["b"]), v + f64(p["value"]["b"])
    n, kvh = q.shape[2], k.shape[2]
    k, v = np.repeat(k, n // kvh, axis=2), np.repeat(v, n // kvh, axis=2)
    t, s = q.shape[1], k.shape[1]
    ok = np.ones((q.shape[0], t, s), bool)
    if causal:
        ok &= np.tril(np.ones((t, s), bool))
    if allowed is not None:
        ok &= np.broadcast_to(allowed, ok.shape)
    logits = np.einsum("btnd,bsnd->bnts", q, k) / math.sqrt(q.shape[-1])
    logits = np.where(ok[:, None], logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w = w / w.sum(-1, keepdims=True)
    out = np.einsum("bnts,bsnd->btnd", w, v)
    y = np.einsum("btnd,ndo->bto", out, f64(p["out"]["w"]))
    return y + f64(p["out"]["b"]) if "b" in p["out"] else y


def block_ref(p, x, *, norm="layer", activation="gelu", causal=False, memory=None):
    x = f64(x)
    x = x + mha_ref(p["attention"], norm_ref(p["norm1"], x, norm), causal=causal)
    if memory is not None:
        x = x + mha_ref(p["cross_attention"], norm_ref(p["cross_norm"], x, norm), memory)
    return x + ffn_ref(p["ffn"], norm_ref(p["norm2"], x, norm), activation)


# ============================================================================= repeat

def test_repeat_equals_copies_applied_in_turn(key):
    block = fnn.serial(fnn.Dense(F), fnn.Relu())
    model = repeat(block, 3)
    x = jnp.asarray(rand((B, F), 1))
    params, state = model.init(key, x)
    assert jax.tree.map(jnp.shape, params) == {"layers": {"0": {"w": (3, F, F), "b": (3, F)}}}
    assert state == {}
    # copies are initialised with different keys
    assert not np.allclose(params["layers"]["0"]["w"][0], params["layers"]["0"]["w"][1])
    y, new_state = run(model, params, x)
    assert new_state == {}
    h = f64(x)
    for i in range(3):
        p = layer_slice(params["layers"], i)["0"]
        h = np.maximum(h @ f64(p["w"]) + f64(p["b"]), 0)
    np.testing.assert_allclose(f64(y), h, **TOL)
    # unroll changes the loop, not the result
    y2, _ = repeat(block, 3, unroll=2).apply(params, state, x)
    np.testing.assert_allclose(f64(y2), f64(y), **TOL)


def test_repeat_of_encoder_blocks_with_dropout_keys(key):
    block = EncoderBlock(2, 16, dropout=0.2)
    model = repeat(block, 3)
    x = jnp.asarray(rand((B, T, F), 2))
    params = make_params(model, x)
    assert params["layers"]["attention"]["query"]["w"].shape == (3, F, 2, 4)
    drop_key = jax.random.key(5)
    y, _ = run(model, params, x, key=drop_key, train=True)
    h = x
    for i in range(3):  # copy i gets fold_in(key, i)
        h, _ = run(block, layer_slice(params["layers"], i), h,
                   key=jax.random.fold_in(drop_key, i), train=True)
    np.testing.assert_allclose(f64(y), f64(h), **TOL)


def test_repeat_passes_side_inputs_to_every_copy(key):
    # masks and lengths of an AttentionInput, the memory of a DecoderInput: only the first entry
    # is carried from copy to copy
    x = jnp.asarray(rand((B, T, F), 30))
    lengths = np.array([5, 3], np.int32)
    cases = [(EncoderBlock(2, 16), AttentionInput(x, q_lengths=lengths, kv_lengths=lengths)),
             (DecoderBlock(2, 16, cross=True),
              DecoderInput(x, jnp.asarray(rand((B, 3, 6), 31)), memory_lengths=lengths - 2))]
    for block, inp in cases:
        model = repeat(block, 2, remat=True)
        params = make_params(model, inp)
        y, _ = run(model, params, inp)
        h = inp
        for i in range(2):
            out, _ = run(block, layer_slice(params["layers"], i), h)
            h = h._replace(**{h._fields[0]: out})
        np.testing.assert_allclose(f64(y), f64(out), **TOL)


def test_repeat_remat_gives_equal_values_and_gradients(key):
    block = EncoderBlock(2, 16, norm="rms", activation="swiglu")
    x = jnp.asarray(rand((B, T, F), 3))
    plain, remat = repeat(block, 2), repeat(block, 2, remat=True)
    params = make_params(plain, x)

    def loss(model):
        return lambda p, x: jnp.sum(jnp.sin(model.apply(p, {}, x)[0]))

    v1, g1 = jax.jit(jax.value_and_grad(loss(plain), argnums=(0, 1)))(params, x)
    v2, g2 = jax.jit(jax.value_and_grad(loss(remat), argnums=(0, 1)))(params, x)
    np.testing.assert_allclose(float(v1), float(v2), rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(f64(a), f64(b), **TOL), g1, g2)
    assert "remat" in str(jax.make_jaxpr(loss(remat))(params, x))  # jax.checkpoint's primitive
    assert "remat" not in str(jax.make_jaxpr(loss(plain))(params, x))
    # a jax.checkpoint policy is accepted as well
    dense = fnn.serial(fnn.Dense(F), fnn.Tanh())
    small = [repeat(dense, 2, remat=r) for r in (False, jax.checkpoint_policies.dots_saveable)]
    p = make_params(small[0], x)
    g1, g2 = (jax.jit(jax.grad(loss(model)))(p, x) for model in small)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(f64(a), f64(b), **TOL), g1, g2)


def test_repeat_stacks_state_per_copy(key):
    block = fnn.serial(fnn.Dense(3), fnn.BatchNorm(momentum=0.5))
    model = repeat(block, 2)
    x = jnp.asarray(rand((6, 3), 4))
    params, state = model.init(key, x)
    assert jax.tree.map(jnp.shape, state) == {"layers": {"1": {"mean": (2, 3), "var": (2, 3)}}}
    y, new_state = run(model, params, x, state, train=True)
    h = x
    for i in range(2):
        h, s = block.apply(layer_slice(params["layers"], i), layer_slice(state["layers"], i), h,
                           train=True)
        for name in ("mean", "var"):
            np.testing.assert_allclose(f64(new_state["layers"]["1"][name][i]), f64(s["1"][name]),
                                       **TOL)
    np.testing.assert_allclose(f64(y), f64(h), **TOL)
    # the copies see different inputs, so their statistics differ
    assert not np.allclose(new_state["layers"]["1"]["mean"][0], new_state["layers"]["1"]["mean"][1])
    # evaluation mode leaves the statistics alone
    _, eval_state = run(model, params, x, new_state)
    jax.tree.map(np.testing.assert_array_equal, eval_state, new_state)


def test_repeat_traces_the_block_once_whatever_the_depth(key):
    block = EncoderBlock(2, 16)
    x = jax.ShapeDtypeStruct((B, T, F), jnp.float32)
    counts = []
    for num in (2, 24):
        model = repeat(block, num)
        params, state = jax.eval_shape(model.init, key, x)
        jaxpr = jax.make_jaxpr(lambda p, x: model.apply(p, state, x)[0])(params, x)
        counts.append((len(jaxpr.jaxpr.eqns), count_eqns(jaxpr.jaxpr)))
    assert counts[0] == counts[1]


def test_repeat_errors(key):
    with pytest.raises(fnn.LayerError, match=r"^repeat: the repeated layer Dense must map its "
                                             r"input .* to an output of the same shape.*maps "
                                             r"float32\[2, 5\] to float32\[2, 3\]$"):
        repeat(fnn.Dense(3), 2).init(key, jnp.zeros((2, 5)))
    model = fnn.serial(body=repeat(fnn.Dense(5), 2))
    params, state = model.init(key, jnp.zeros((2, 5)))
    unstacked = {"body": {"layers": layer_slice(params["body"]["layers"], 0)}}
    with pytest.raises(fnn.LayerError, match=r"^repeat at body: expected params stacked over 2 "
                                             r"copies"):
        model.apply(unstacked, state, jnp.zeros((2, 5)))
    with pytest.raises(ValueError, match="repeat: num must be a positive integer"):
        repeat(fnn.Dense(5), 0)
    with pytest.raises(ValueError, match="repeat: unroll"):
        repeat(fnn.Dense(5), 2, unroll=0)


# ============================================================================= feed-forward

@pytest.mark.parametrize("activation,use_bias", [("gelu", True), ("relu", False),
                                                 ("swiglu", False), ("swiglu", True)])
def test_feed_forward_matches_numpy_reference(key, activation, use_bias):
    ffn = FeedForward(12, activation=activation, use_bias=use_bias, out_features=3)
    x = jnp.asarray(rand((B, T, F), 6))
    params, state = ffn.init(key, x)
    names = {"gate", "up", "down"} if activation == "swiglu" else {"up", "down"}
    assert set(params) == names and state == {}
    assert params["up"]["w"].shape == (F, 12) and params["down"]["w"].shape == (12, 3)
    assert ("b" in params["down"]) == use_bias
    params = make_params(ffn, x)
    y, _ = run(ffn, params, x)
    assert y.shape == (B, T, 3)
    np.testing.assert_allclose(f64(y), ffn_ref(params, x, activation), **TOL)


def test_feed_forward_dropout(key):
    ffn = FeedForward(64, dropout=0.5)
    x = jnp.asarray(rand((4, F), 7))
    params, state = ffn.init(key, x)
    y_eval, _ = run(ffn, params, x)
    np.testing.assert_allclose(f64(y_eval), ffn_ref(params, x), **TOL)
    y1, _ = run(ffn, params, x, key=jax.random.key(1), train=True)
    y2, _ = run(ffn, params, x, key=jax.random.key(2), train=True)
    assert not np.allclose(f64(y1), f64(y_eval)) and not np.allclose(f64(y1), f64(y2))
    with pytest.raises(fnn.MissingKeyError, match="FeedForward is stochastic"):
        ffn.apply(params, state, x, train=True)


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
    params = make_params(block, x)
    y, new_state = run(block, params, x)
    assert new_state == {}
    ref = block_ref(params, x, norm=kwargs.get("norm", "layer"),
                    activation=kwargs.get("activation", "gelu"), causal=kwargs.get("causal", False))
    np.testing.assert_allclose(f64(y), ref, **TOL)


def test_encoder_block_passes_lengths_and_masks_to_attention(key):
    block = EncoderBlock(2, 16)
    x = rand((B, T, F), 9)
    params = make_params(block, jnp.asarray(x))
    lengths = np.array([5, 3], np.int32)
    changed = x.copy()
    changed[1, 3:] = rand((2, F), 10)  # only padding of the second example changes
    y, _ = run(block, params, AttentionInput(jnp.asarray(x), q_lengths=lengths,
                                             kv_lengths=lengths))
    y2, _ = run(block, params, AttentionInput(jnp.asarray(changed), q_lengths=lengths,
                                              kv_lengths=lengths))
    np.testing.assert_allclose(f64(y2[1, :3]), f64(y[1, :3]), **TOL)
    np.testing.assert_array_equal(np.asarray(y2[0]), np.asarray(y[0]))
    # the valid rows equal the block on the unpadded sequence alone
    short, _ = run(block, params, jnp.asarray(x[1:, :3]))
    np.testing.assert_allclose(f64(y[1:, :3]), f64(short), **TOL)
    # a mask: no query may attend to key 4, so rows 0..3 do not depend on x[:, 4]
    mask = np.ones((T, T), bool)
    mask[:, 4] = False
    changed = x.copy()
    changed[:, 4] = rand((B, F), 11)
    y, _ = run(block, params, AttentionInput(jnp.asarray(x), mask=mask))
    y2, _ = run(block, params, AttentionInput(jnp.asarray(changed), mask=mask))
    np.testing.assert_allclose(f64(y2[:, :4]), f64(y[:, :4]), **TOL)
    assert not np.allclose(f64(y), block_ref(params, x), atol=1e-3)  # the mask did act


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
    params, _ = block.init(key, (x, memory))
    assert set(params) == {"norm1", "attention", "cross_norm", "cross_attention", "norm2", "ffn"}
    assert params["cross_attention"]["key"]["w"].shape == (6, 2, 4)
    params = make_params(block, DecoderInput(x, memory))
    y, _ = run(block, params, DecoderInput(x, memory))
    np.testing.assert_allclose(f64(y), block_ref(params, x, causal=True, memory=memory), **TOL)
    # changing the memory changes the output ...
    other = memory.at[:, 2].set(jnp.asarray(rand((B, 6), 16)))
    y2, _ = run(block, params, DecoderInput(x, other))
    assert not np.allclose(f64(y2), f64(y))
    # ... but not memory positions that are masked out, by lengths or by a mask
    lengths = np.array([2, 2], np.int32)
    y, _ = run(block, params, DecoderInput(x, memory, memory_lengths=lengths))
    y2, _ = run(block, params, DecoderInput(x, other, memory_lengths=lengths))
    np.testing.assert_allclose(f64(y2), f64(y), **TOL)
    mask = np.ones((T, 7), bool)
    mask[:, 2] = False
    y, _ = run(block, params, DecoderInput(x, memory, memory_mask=mask))
    y2, _ = run(block, params, DecoderInput(x, other, memory_mask=mask))
    np.testing.assert_allclose(f64(y2), f64(y), **TOL)


def test_cached_decoding_through_decoder_block_equals_full_pass(key):
    block = DecoderBlock(4, 16, cross=True, num_kv_heads=2, rope=True)
    total, max_length = 6, 8
    x, memory = jnp.asarray(rand((B, total, F), 17)), jnp.asarray(rand((B, 3, 5), 18))
    params = make_params(block, DecoderInput(x, memory))
    full, _ = run(block, params, DecoderInput(x, memory))
    state = init_block_cache(params, B, max_length)
    assert jax.tree.map(jnp.shape, state) == {"attention": {"cache": {
        "k": (B, max_length, 2, 2), "v": (B, max_length, 2, 2), "index": ()}}}
    y, state = run(block, params, DecoderInput(x[:, :2], memory), state)  # a prompt of two
    outputs = [y]
    for t in range(2, total):  # then one token at a time
        y, state = run(block, params, DecoderInput(x[:, t:t + 1], memory), state)
        outputs.append(y)
    assert int(state["attention"]["cache"]["index"]) == total
    np.testing.assert_allclose(f64(jnp.concatenate(outputs, axis=1)), f64(full), **TOL)


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


# ============================================================================= positions

def test_learned_position_embedding_adds_table_rows(key):
    layer = LearnedPositionEmbedding(8)
    x = jnp.asarray(rand((B, T, 4), 20))
    params, state = layer.init(key, x)
    assert jax.tree.map(jnp.shape, params) == {"table": (8, 4)} and state == {}
    params = make_params(layer, x)
    y, _ = run(layer, params, x)
    np.testing.assert_allclose(f64(y), f64(x) + f64(params["table"])[:T], **TOL)
    # decoding from an offset: positions pick the rows
    positions = np.array([[3], [6]], np.int32)
    y, _ = run(layer, params, (x[:, :1], positions))
    np.testing.assert_allclose(f64(y), f64(x[:, :1]) + f64(params["table"])[positions], **TOL)
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
    y, _ = SinusoidalPositionEmbedding(base=base).apply({}, {}, (jnp.asarray(x[:, :2]),
                                                                 jnp.arange(3, 5)))
    np.testing.assert_allclose(f64(y), f64(x[:, :2]) + pe[3:5], **TOL)
    with pytest.raises(fnn.ShapeError, match=r"^SinusoidalPositionEmbedding: expected input "
                                             r"\[\.\.\., time, features\] with time <= "
                                             r"max_length=4"):
        SinusoidalPositionEmbedding(4).apply({}, {}, jnp.asarray(x))


# ============================================================================= errors

def test_bad_hyper_parameters_and_inputs_are_rejected(key):
    with pytest.raises(ValueError, match="FeedForward: unknown activation 'swish'"):
        FeedForward(8, activation="swish")
    with pytest.raises(ValueError, match="EncoderBlock: norm must be one of"):
        EncoderBlock(2, 8, norm="batch")
    with pytest.raises(ValueError, match="DecoderBlock: dropout is a drop probability"):
        DecoderBlock(2, 8, dropout=1.0)
    x = jnp.zeros((B, T, F))
    with pytest.raises(fnn.LayerError, match=r"^DecoderBlock: a block with cross=True needs the "
                                             r"memory"):
        DecoderBlock(2, 8, cross=True).init(key, x)
    with pytest.raises(fnn.LayerError, match=r"^DecoderBlock: got a memory but the block has no "
                                             r"cross-attention"):
        DecoderBlock(2, 8).init(key, (x, x))
    with pytest.raises(fnn.LayerError, match=r"^EncoderBlock: is self-attention; got kv"):
        EncoderBlock(2, 8).init(key, AttentionInput(x, kv=x))
    with pytest.raises(fnn.ShapeError, match=r"^EncoderBlock: expected input \[\.\.\., time, "
                                             r"features\], got float32\[8\]$"):
        EncoderBlock(2, 8).init(key, jnp.zeros((F,)))
    model = fnn.serial(block=EncoderBlock(2, 8))
    params, state = model.init(key, x)
    with pytest.raises(fnn.ShapeError, match=r"^LayerNorm at block/norm1: expected input "
                                             r"\[\.\.\., 8\], got float32\[2, 5, 6\]$"):
        model.apply(params, state, jnp.zeros((B, T, 6)))
    with pytest.raises(fnn.MissingKeyError, match="EncoderBlock at block is stochastic"):
        fnn.serial(block=EncoderBlock(2, 8, dropout=0.1)).apply(params, state, x, train=True)
