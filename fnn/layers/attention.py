"""Multi-head attention: self- and cross-attention, grouped-query (GQA) and multi-query (MQA)
attention, causal and sliding-window masks, additive biases (ALiBi, relative positions), rotary
position embedding (RoPE), dropout on the attention weights, and incremental decoding with a
key/value cache.

Layout: sequences are ``[..., time, features]`` with any number of leading batch axes (none
included); per-head tensors are ``[B, time, heads, head_dim]`` with the batch axes flattened
into ``B``, as ``jax.nn.dot_product_attention`` takes them. Query head ``h`` reads key/value
head ``h // (num_heads // num_kv_heads)``: each key/value head serves a contiguous group of
query heads, as ``repeat_interleave`` does in PyTorch and Hugging Face models.

The layer is a composition of the module's functions, each usable on its own: the masks
(:func:`causal_mask`, :func:`window_mask`, :func:`length_mask`, :func:`combine_masks`), the
cache write (:func:`write_cache`), the attention itself (:func:`dot_product_attention`, or
``jax.nn.dot_product_attention``), and :func:`zero_empty_rows`.

Masks follow one rule everywhere: ``True`` means *may attend*. A query row that may attend to no
key at all (every key masked, no memory, or a padded query row past ``lengths``) gets an
attention result of exactly zero, so the layer outputs the output bias there and its gradients
are zero and finite.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.nn import initializers

from fnn.core import (Initializer, Layer, LayerError, Seq, ShapeError, align, at_least_float32,
                      check_positive, check_rate, check_train, compute_dtype, describe,
                      expect_params, require_key, seq_lengths, shape_error, where)
from fnn.layers.position import alibi_bias, apply_rope, seq_positions

_NAME = "MultiHeadAttention"
_IMPLEMENTATIONS = (None, "xla", "cudnn", "einsum")
Window = tuple[int, int]


# ----------------------------------------------------------------------------- masks
# Masks are bool, broadcastable to [B, heads, q_time, kv_time]; True = may attend.

def causal_mask(q_time: int, kv_time: int, offset: int | jax.Array = 0) -> jax.Array:
    """``bool[q_time, kv_time]``: query ``i`` (at position ``offset + i``) may attend to key
    ``j`` when ``j <= offset + i`` (top-left aligned for ``offset=0``).

    >>> causal_mask(2, 3).tolist()
    [[True, False, False], [True, True, False]]
    """
    rows = jnp.arange(q_time, dtype=jnp.int32)[:, None] + offset
    return jnp.arange(kv_time, dtype=jnp.int32)[None, :] <= rows


def window_mask(q_time: int, kv_time: int, window: Window,
                offset: int | jax.Array = 0) -> jax.Array:
    """``bool[q_time, kv_time]``: query ``i`` (at position ``offset + i``) may attend to key
    ``j`` when ``offset + i - left <= j <= offset + i + right``, ``window = (left, right)``.

    >>> window_mask(3, 3, (1, 0)).tolist()
    [[True, False, False], [True, True, False], [False, True, True]]
    """
    left, right = window
    rows = jnp.arange(q_time, dtype=jnp.int32)[:, None] + offset
    cols = jnp.arange(kv_time, dtype=jnp.int32)[None, :]
    return (cols >= rows - left) & (cols <= rows + right)


def length_mask(lengths: jax.Array, size: int) -> jax.Array:
    """``bool[B, size]``: the positions before each of ``lengths: int[B]``."""
    return jnp.arange(size, dtype=jnp.int32)[None, :] < lengths[:, None]


def combine_masks(*masks: jax.Array | None) -> jax.Array | None:
    """The logical AND of the masks that are not ``None`` (broadcast), or ``None``."""
    given = [m for m in masks if m is not None]
    if not given:
        return None
    ndim = max(m.ndim for m in given)
    out = align(given[0], ndim)
    for m in given[1:]:
        out = out & align(m, ndim)
    return out


# ----------------------------------------------------------------------------- the computation

def _grouped(mask_or_bias: jax.Array, kv_heads: int, heads: int) -> jax.Array:
    """``[1|B, 1|N, T, S] -> [1|B, 1|K, 1|N // K, T, S]`` (leading axes may be missing), the
    grouped-query layout."""
    mask_or_bias = align(mask_or_bias, 4)
    b, n = mask_or_bias.shape[:2]
    if n == heads:
        return mask_or_bias.reshape((b, kv_heads, heads // kv_heads) + mask_or_bias.shape[2:])
    return mask_or_bias[:, :, None]


def attention_probs(q: jax.Array, k: jax.Array, mask: jax.Array | None = None,
                    bias: jax.Array | None = None) -> jax.Array:
    """``softmax(q k^T / sqrt(d) + bias)`` over the key positions, masked, in at least float32:
    ``q: [B, T, N, D]``, ``k: [B, S, K, D]``, ``mask: bool`` and ``bias`` broadcastable as
    ``[1|B, 1|N, T, S]`` ``-> [B, K, N // K, T, S]``; query head ``h`` is
    ``[:, h // (N // K), h % (N // K)]``. Masked logits get ``-0.7 * float32 max`` (finite), so
    a row that may attend to nothing is uniform."""
    b, t, n, d = q.shape
    kv_heads = k.shape[2]
    logits_dt = at_least_float32(q.dtype)
    qg = q.reshape(b, t, kv_heads, n // kv_heads, d)
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=logits_dt)
    logits = logits * jnp.asarray(1.0 / math.sqrt(d), logits_dt)
    if bias is not None:
        logits = logits + _grouped(bias.astype(logits_dt), kv_heads, n)
    if mask is not None:
        big_negative = jnp.asarray(-0.7 * jnp.finfo(jnp.float32).max, logits_dt)
        logits = jnp.where(_grouped(mask, kv_heads, n), logits, big_negative)
    return jax.nn.softmax(logits, axis=-1)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                          mask: jax.Array | None = None, bias: jax.Array | None = None,
                          dropout: float = 0.0, key: jax.Array | None = None) -> jax.Array:
    """``softmax(q k^T / sqrt(d) + bias, masked) v`` with einsums: ``q: [B, T, N, D]``,
    ``k, v: [B, S, K, D]``, ``mask``/``bias`` as in :func:`attention_probs` ``-> [B, T, N, D]``.
    With ``key``, each attention weight is dropped with probability ``dropout`` and the kept
    ones are scaled by ``1 / (1 - dropout)``."""
    weights = attention_probs(q, k, mask, bias)
    if key is not None and dropout > 0.0:
        keep = jax.random.bernoulli(key, 1.0 - dropout, weights.shape)
        weights = jnp.where(keep, weights / jnp.asarray(1.0 - dropout, weights.dtype),
                            jnp.zeros((), weights.dtype))
    out = jnp.einsum("bkgts,bskd->btkgd", weights.astype(v.dtype), v)
    return out.reshape(q.shape)


def zero_empty_rows(out: jax.Array, valid_rows: jax.Array | None) -> jax.Array:
    """``out: [B, T, N, D]`` with the query rows that may attend to nothing set to zero;
    ``valid_rows``: bool broadcastable to ``[B, T, N, 1]``, or ``None`` (all valid)."""
    return out if valid_rows is None else jnp.where(valid_rows, out, jnp.zeros((), out.dtype))


# ----------------------------------------------------------------------------- decode cache

def init_cache(params: dict[str, Any], batch_shape: int | tuple[int, ...], max_length: int,
               dtype: Any = jnp.float32) -> dict[str, jax.Array]:
    """An empty key/value cache for incremental decoding with a :func:`MultiHeadAttention`.

    ``params`` are the layer's params (they give ``num_kv_heads`` and ``head_dim``). Returns
    ``{"k": [*batch_shape, max_length, num_kv_heads, head_dim], "v": same, "index": int32[]}``;
    ``index`` is the number of positions already written (the same for the whole batch). Put it
    in the layer's state to decode::

        state = {"cache": init_cache(params, batch_shape, max_length)}
        y, state = layer.apply(params, state, x_new)   # x_new: [*batch_shape, new, features]

    Keys are stored after RoPE. Writing past ``max_length`` is not detected under ``jit``.
    """
    batch_shape = (batch_shape,) if isinstance(batch_shape, int) else tuple(batch_shape)
    check_positive("init_cache", max_length=max_length)
    _, kv_heads, head_dim = params["key"]["w"].shape
    shape = batch_shape + (max_length, kv_heads, head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "index": jnp.zeros((), jnp.int32)}


def write_cache(cache: dict[str, jax.Array], k: jax.Array, v: jax.Array
                ) -> tuple[dict[str, jax.Array], jax.Array, jax.Array]:
    """Writes the new keys and values ``k, v: [B, new, K, D]`` at ``cache["index"]``; returns
    the updated cache (``index + new``) and every slot's keys and values ``[B, max_length, K,
    D]`` in ``k``'s dtype (slot ``j`` holds position ``j``)."""
    shape = (k.shape[0],) + cache["k"].shape[-3:]
    start = (0, cache["index"], 0, 0)
    k_all = lax.dynamic_update_slice(cache["k"].reshape(shape), k.astype(cache["k"].dtype), start)
    v_all = lax.dynamic_update_slice(cache["v"].reshape(shape), v.astype(cache["v"].dtype), start)
    new = {"k": k_all.reshape(cache["k"].shape), "v": v_all.reshape(cache["v"].shape),
           "index": cache["index"] + k.shape[1]}
    return new, k_all.astype(k.dtype), v_all.astype(v.dtype)


# ----------------------------------------------------------------------------- reading the input

class _Call(NamedTuple):
    """One call's arrays with the batch axes flattened into ``B``."""

    lead: tuple[int, ...]  # the batch axes of the input
    q: jax.Array  # [B, T, features]
    kv: jax.Array  # [B, S, kv_features]: the input itself, or the memory
    mask: jax.Array | None  # bool [1|B, 1|N, T, S]
    bias: jax.Array | None  # float [1|B, 1|N, T, S]
    q_lengths: jax.Array | None  # int32 [B]
    kv_lengths: jax.Array | None  # int32 [B]
    positions: jax.Array | None  # int [1|B, T]


def _side_error(field: str, expected: str, value: Any) -> ShapeError:
    return ShapeError(f"{where(_NAME)}: expected {field} {expected}, got {describe(value)}")


def _dims(shape: tuple) -> str:
    return f"[{', '.join(map(str, shape))}]"


def _flat_batch(field: str, v: Any, lead: tuple[int, ...], tail: tuple[int, ...],
                kind: str) -> jax.Array:
    """A side input ``v`` broadcastable to ``lead + tail`` as ``[1 or prod(lead), *tail']``,
    where the leading batch axes are flattened (or kept at size 1 when ``v`` does not vary over
    them) and the first tail axis (heads) stays 1 when it is. ``kind``: "bool" or "float"."""
    full = lead + tail
    ok = hasattr(v, "shape") and v.ndim <= len(full) and all(
        a in (1, b) for a, b in zip((1,) * (len(full) - v.ndim) + v.shape, full))
    ok = ok and (v.dtype == jnp.bool_ if kind == "bool" else jnp.issubdtype(v.dtype, jnp.floating))
    if not ok:
        raise _side_error(field, f"{kind} broadcastable to [..., heads, q_time, kv_time] = "
                                 f"{_dims(full)}", v)
    v = align(v, len(full))
    v_tail = v.shape[len(lead):]
    target = (v_tail[0] if v_tail[0] == 1 else tail[0],) + tail[1:]
    if all(dim == 1 for dim in v.shape[:len(lead)]):
        return jnp.broadcast_to(v.reshape((1,) + v_tail), (1,) + target)
    return jnp.broadcast_to(v, lead + target).reshape((math.prod(lead),) + target)


def _memory_lengths(x: Seq, lead: tuple[int, ...]) -> jax.Array | None:
    if x.memory_lengths is None:
        return None
    lengths = x.memory_lengths
    if (not hasattr(lengths, "shape") or tuple(lengths.shape) != lead
            or not jnp.issubdtype(lengths.dtype, jnp.integer)):
        raise _side_error("memory_lengths", f"int{_dims(lead)} (the batch axes of x)", lengths)
    return jnp.asarray(lengths).astype(jnp.int32)


def _inputs(x: Any, cfg: Any) -> tuple[Seq, Any, Any]:
    """Checks the input (an array or a ``Seq``, or their specs); returns it as a ``Seq``, the
    queries' input ``[..., T, features]`` and the keys' ``[..., S, kv_features]``."""
    seq = x if isinstance(x, Seq) else Seq(x)
    q = seq.x
    if not hasattr(q, "ndim") or q.ndim < 2:
        raise shape_error(_NAME, "[..., time, features]", x)
    if not cfg.cross:
        return seq, q, q
    kv = seq.memory
    if kv is None:
        raise LayerError(f"{where(_NAME)}: a cross-attention layer attends to a memory: call it "
                         f"on Seq(x, memory=...), got {describe(x)}")
    if not hasattr(kv, "ndim") or kv.ndim != q.ndim or kv.shape[:-2] != q.shape[:-2]:
        raise _side_error("memory", f"{_dims(q.shape[:-2] + ('memory_time', 'memory_features'))}"
                                    f" (the batch axes of x {describe(q)})", kv)
    return seq, q, kv


def _read(x: Any, cfg: Any, decode_length: int | None = None) -> _Call:
    """The input with its batch axes flattened and its side inputs checked; in decode mode
    masks and biases cover the cache's ``decode_length`` slots."""
    seq, q, kv = _inputs(x, cfg)
    lead, t = q.shape[:-2], q.shape[-2]
    b = math.prod(lead)
    s = kv.shape[-2] if decode_length is None else decode_length
    mask, bias = (seq.memory_mask, None) if cfg.cross else (seq.mask, seq.bias)
    q_lengths = seq_lengths(_NAME, seq)
    kv_lengths = _memory_lengths(seq, lead) if cfg.cross else q_lengths
    positions = None if cfg.cross else seq_positions(_NAME, seq)
    heads = cfg.num_heads
    return _Call(
        lead, q.reshape((b, t, q.shape[-1])), kv.reshape((b, kv.shape[-2], kv.shape[-1])),
        None if mask is None else _flat_batch("mask", mask, lead, (heads, t, s), "bool"),
        None if bias is None else _flat_batch("bias", bias, lead, (heads, t, s), "float"),
        None if q_lengths is None else q_lengths.reshape(b),
        None if kv_lengths is None else kv_lengths.reshape(b),
        None if positions is None else _flat_batch_positions(positions, lead, t))


def _flat_batch_positions(positions: jax.Array, lead: tuple[int, ...], t: int) -> jax.Array:
    """Positions broadcastable to ``lead + (t,)`` as ``[1 or B, t]``."""
    p = align(positions, len(lead) + 1)
    if all(dim == 1 for dim in p.shape[:-1]):
        return jnp.broadcast_to(p.reshape(1, p.shape[-1]), (1, t))
    return jnp.broadcast_to(p, lead + (t,)).reshape(math.prod(lead), t)


# ----------------------------------------------------------------------------- the layer

class _Settings(NamedTuple):
    """A :func:`MultiHeadAttention`'s hyper-parameters, checked."""

    num_heads: int
    kv_heads: int
    head_dim: int | None
    out_features: int | None
    use_bias: bool
    cross: bool
    causal: bool
    window: Window | None
    rope: bool
    rope_base: float
    alibi: bool
    dropout: float
    implementation: str | None
    w_init: Initializer
    b_init: Initializer
    param_dtype: Any
    dtype: Any

    def shapes(self, features, kv_features, head_dim, out) -> dict[str, tuple]:
        """Each projection's ``w`` shape and ``b`` shape (sizes, or names of sizes)."""
        n, k = self.num_heads, self.kv_heads
        return {"query": ((features, n, head_dim), (n, head_dim)),
                "key": ((kv_features, k, head_dim), (k, head_dim)),
                "value": ((kv_features, k, head_dim), (k, head_dim)),
                "out": ((n, head_dim, out), (out,))}

    def structure(self, t: int, s: int, offset: int | jax.Array = 0) -> jax.Array | None:
        """``bool[T, S]``: the causal and window rules for queries at ``offset, ...``."""
        return combine_masks(causal_mask(t, s, offset) if self.causal else None,
                             window_mask(t, s, self.window, offset) if self.window else None)


def _project(p: dict[str, Any], x: jax.Array, dt: Any) -> jax.Array:
    """A query/key/value projection ``x: [..., time, features] -> [..., time, heads, head_dim]``
    in ``dt``."""
    y = jnp.einsum("...tf,fhd->...thd", x, p["w"].astype(dt))
    if "b" in p:
        y = y + align(p["b"].astype(dt), y.ndim)
    return y


def _init(cfg: _Settings, key: jax.Array, x: Any) -> tuple[dict, dict]:
    _, q, kv = _inputs(x, cfg)
    features = q.shape[-1]
    if cfg.head_dim is None and features % cfg.num_heads:
        raise shape_error(_NAME, f"[..., time, features] with features divisible by "
                                 f"num_heads={cfg.num_heads} (or pass head_dim)", x)
    d = features // cfg.num_heads if cfg.head_dim is None else cfg.head_dim
    if cfg.rope and d % 2:
        raise shape_error(_NAME, f"[..., time, features] giving an even head_dim = features // "
                                 f"num_heads for rope=True (or pass head_dim), head_dim would be "
                                 f"{d}", x)
    out = features if cfg.out_features is None else cfg.out_features
    params = {}
    keys = jax.random.split(key, 8)
    for i, (name, (w_shape, b_shape)) in enumerate(
            cfg.shapes(features, kv.shape[-1], d, out).items()):
        fan_in = w_shape[0] if name != "out" else cfg.num_heads * d
        w = cfg.w_init(keys[2 * i], (fan_in, math.prod(w_shape) // fan_in), cfg.param_dtype)
        params[name] = {"w": w.reshape(w_shape)}
        if cfg.use_bias:
            params[name]["b"] = cfg.b_init(keys[2 * i + 1], b_shape, cfg.param_dtype)
    return params, {}


def _check_call(cfg: _Settings, params: dict, call: _Call) -> None:
    """The params against the settings, then the input against the params."""
    shapes = cfg.shapes("features", "kv_features", cfg.head_dim or "head_dim",
                        cfg.out_features or "out_features")
    expect_params(_NAME, params, {name: {"w": w} | ({"b": b} if cfg.use_bias else {})
                                 for name, (w, b) in shapes.items()})
    features, kv_features = params["query"]["w"].shape[0], params["key"]["w"].shape[0]
    if call.q.shape[-1] != features:
        raise shape_error(_NAME, f"[..., time, {features}]", call.q)
    if call.kv.shape[-1] != kv_features:
        raise _side_error("memory", f"[..., memory_time, {kv_features}]", call.kv)


def _apply(cfg: _Settings, params, state, x, *, key=None, train=False):
    check_train(train)
    cache = state.get("cache") if isinstance(state, dict) else None
    if cache is not None and cfg.cross:
        raise LayerError(f"{where(_NAME)}: decode mode (a cache in the state) is self-attention "
                         f"only; a cross=True layer reads its keys from the memory at every step")
    call = _read(x, cfg, decode_length=None if cache is None else cache["k"].shape[-3])
    _check_call(cfg, params, call)
    dt = compute_dtype(cfg.dtype, call.q, cfg.param_dtype)
    q = _project(params["query"], call.q.astype(dt), dt)  # [B, T, N, D]
    k = _project(params["key"], call.kv.astype(dt), dt)  # [B, S, K, D]
    v = _project(params["value"], call.kv.astype(dt), dt)
    t = q.shape[1]
    offset = jnp.zeros((), jnp.int32) if cache is None else _check_cache(cache, call)
    positions = offset + jnp.arange(t, dtype=jnp.int32) if call.positions is None \
        else call.positions  # [T] or [1|B, T]
    if cfg.rope:
        q, k = apply_rope(q, positions, cfg.rope_base), apply_rope(k, positions, cfg.rope_base)
    new_state = state
    if cache is not None:
        new_cache, k, v = write_cache(cache, k, v)  # every slot: [B, max_length, K, D]
        new_state = {**state, "cache": new_cache}
    bias = call.bias
    if cfg.alibi:
        kv_positions = positions if cache is None else jnp.arange(k.shape[1], dtype=jnp.int32)
        slopes = alibi_bias(cfg.num_heads, positions, kv_positions, at_least_float32(dt))
        bias = align(slopes, 4) if bias is None else bias.astype(slopes.dtype) + align(slopes, 4)
    out = _attention(cfg, q, k, v, call, bias, None if cache is None else offset, key, train)
    y = jnp.einsum("bthd,hdo->bto", out, params["out"]["w"].astype(dt))
    if "b" in params["out"]:
        y = y + align(params["out"]["b"].astype(dt), y.ndim)
    y = y.reshape(call.lead + (t, y.shape[-1]))
    return (x.with_x(y) if isinstance(x, Seq) else y), new_state


def _attention(cfg: _Settings, q, k, v, call: _Call, bias, offset, key, train) -> jax.Array:
    """The attention of ``q: [B, T, N, D]`` over ``k, v: [B, S, K, D]`` under every mask, with
    the rows that may attend to nothing zeroed. ``offset``: the cache index in decode mode,
    else ``None``."""
    t, s = q.shape[1], k.shape[1]
    # [T, S]: the causal and window rules, and in decode mode the slots written so far
    rules = cfg.structure(t, s) if offset is None else combine_masks(
        jnp.arange(s, dtype=jnp.int32)[None, :] < offset + t, cfg.structure(t, s, offset))
    kv_valid = None if call.kv_lengths is None else length_mask(call.kv_lengths, s)[:, None, None]
    if cfg.implementation == "einsum" or (train and cfg.dropout > 0.0):
        q_valid = None if call.q_lengths is None else \
            length_mask(call.q_lengths, t)[:, None, :, None]
        drop_key = require_key(_NAME, key) if train and cfg.dropout > 0.0 else None
        out = dot_product_attention(q, k, v, mask=combine_masks(call.mask, rules, q_valid,
                                                                kv_valid),
                                    bias=bias, dropout=cfg.dropout, key=drop_key)
    else:
        fused = offset is None  # the fused call knows causal and window masks from position 0
        # jax promotes bfloat16 logits to float32 implicitly inside; allow that there only
        with jax.numpy_dtype_promotion("standard"):
            out = jax.nn.dot_product_attention(
                q, k, v, bias=bias, mask=call.mask if fused else combine_masks(call.mask, rules),
                is_causal=cfg.causal and fused, local_window_size=cfg.window if fused else None,
                query_seq_lengths=call.q_lengths, key_value_seq_lengths=call.kv_lengths,
                implementation=cfg.implementation)
    # rows that may attend to some key, broadcastable to [B, T, N, 1]; a row of self-attention
    # sees itself under the causal and window rules, so only a mask or no memory empties it
    valid = None
    if call.mask is not None:
        allowed = combine_masks(call.mask, rules, kv_valid)
        valid = jnp.transpose(jnp.any(allowed, axis=-1), (0, 2, 1))[..., None]
    elif call.kv_lengths is not None:
        valid = (call.kv_lengths > 0)[:, None, None, None]
    if call.q_lengths is not None:
        q_rows = length_mask(call.q_lengths, t)[..., None, None]
        valid = q_rows if valid is None else valid & q_rows
    return zero_empty_rows(out, valid)


def _check_cache(cache: dict[str, Any], call: _Call) -> jax.Array:
    """Checks that the new tokens fit the cache; returns its index (the tokens' offset)."""
    cache_lead, max_length = cache["k"].shape[:-3], cache["k"].shape[-3]
    t = call.q.shape[1]
    if call.lead != cache_lead or t > max_length:
        raise shape_error(_NAME, f"{_dims(cache_lead + ('new', 'features'))} with new <= "
                                 f"{max_length} (the cache's batch shape and length)",
                          call.q.reshape(call.lead + call.q.shape[1:]))
    if call.q_lengths is not None:
        raise LayerError(f"{where(_NAME)}: decode mode (a cache in the state) takes no lengths: "
                         f"the cache's index says how many positions are valid")
    return jnp.asarray(cache["index"], jnp.int32)


def _settings(num_heads, num_kv_heads, head_dim, out_features, use_bias, cross, causal, window,
              rope, rope_base, alibi, dropout, implementation, w_init, b_init, param_dtype,
              dtype) -> _Settings:
    """Validates the factory's arguments."""
    kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    check_positive(_NAME, num_heads=num_heads, num_kv_heads=kv_heads)
    for arg, value in (("head_dim", head_dim), ("out_features", out_features)):
        if value is not None:
            check_positive(_NAME, **{arg: value})
    if num_heads % kv_heads:
        raise ValueError(f"{_NAME}: num_heads must be a multiple of num_kv_heads (each key/value "
                         f"head serves num_heads // num_kv_heads query heads), got num_heads="
                         f"{num_heads}, num_kv_heads={kv_heads}")
    if rope and head_dim is not None and head_dim % 2:
        raise ValueError(f"{_NAME}: rope needs an even head_dim, got head_dim={head_dim}")
    check_rate(_NAME, "dropout", dropout)
    if implementation not in _IMPLEMENTATIONS:
        raise ValueError(f"{_NAME}: implementation must be one of {_IMPLEMENTATIONS}, got "
                         f"{implementation!r}")
    if cross and (causal or window is not None or rope or alibi):
        raise ValueError(f"{_NAME}: causal, window, rope and alibi order the positions of one "
                         f"sequence and apply to self-attention only, not to cross=True")
    pair = None
    if window is not None:
        pair = (window, window) if isinstance(window, int) else tuple(window)
        if len(pair) != 2 or not all(isinstance(w, int) and not isinstance(w, bool) and w >= 0
                                     for w in pair):
            raise ValueError(f"{_NAME}: window must be an int >= 0 or a (left, right) pair of "
                             f"them, got {window!r}")
    return _Settings(num_heads, kv_heads, head_dim, out_features, use_bias, cross, causal, pair,
                     rope, rope_base, alibi, dropout, implementation, w_init, b_init,
                     param_dtype, dtype)


def MultiHeadAttention(num_heads: int, *, num_kv_heads: int | None = None,
                       head_dim: int | None = None, out_features: int | None = None,
                       use_bias: bool = True, cross: bool = False, causal: bool = False,
                       window: int | Window | None = None, rope: bool = False,
                       rope_base: float = 10000.0, alibi: bool = False, dropout: float = 0.0,
                       implementation: str | None = None,
                       w_init: Initializer = initializers.lecun_normal(),
                       b_init: Initializer = initializers.zeros,
                       param_dtype: Any = jnp.float32, dtype: Any = None) -> Layer:
    """Multi-head scaled dot-product attention, ``softmax(q k^T / sqrt(head_dim) + bias) v``.

    Shapes: ``x: [..., time, features] -> [..., time, out_features]``, or a ``Seq`` of it
    (returned as a ``Seq``): self-attention reads its ``mask``, ``bias``, ``lengths`` (padded
    keys ignored, padded rows zero) and ``positions`` (RoPE, ALiBi); with ``cross=True`` the
    layer attends from ``x`` to the ``Seq``'s ``memory: [..., memory_time, memory_features]``
    with ``memory_mask`` and ``memory_lengths``. ``out_features`` defaults to ``features``;
    ``head_dim`` to ``features // num_heads``.

    Params, one entry per projection (``N = num_heads``, ``K = num_kv_heads``,
    ``D = head_dim``)::

        {"query": {"w": [features, N, D], "b": [N, D]}, "key": {"w": [kv_features, K, D],
         "b": [K, D]}, "value": same as key, "out": {"w": [N, D, out_features],
         "b": [out_features]}}

    (no ``"b"`` without ``use_bias``; ``kv_features`` is the memory's with ``cross=True``).
    ``w_init`` is called with the 2-D shape ``[in, out]`` (``[features, N * D]``, ...,
    ``[N * D, out_features]``), so fan-in initialisers see the true fan-in.

    - ``num_kv_heads``: fewer key/value heads than query heads is grouped-query attention
      (``num_heads % num_kv_heads == 0``); ``1`` is multi-query attention.
    - ``causal``: query ``i`` sees keys ``j <= i`` (in decode mode ``j <= index + i``).
    - ``window``: a sliding window ``(left, right)`` (an int ``w`` is ``(w, w)``): query ``i``
      sees keys ``i - left <= j <= i + right``; with ``causal`` that is the ``left`` previous
      keys and itself. ``jax.nn.dot_product_attention``'s ``local_window_size``.
    - ``rope``: rotary position embedding on queries and keys (rotate-half convention, see
      :func:`~fnn.layers.position.apply_rope`); ``alibi``: ALiBi's linear biases
      (:func:`~fnn.layers.position.alibi_bias`), added to the ``Seq``'s ``bias`` if any. Both
      use the ``Seq``'s positions, by default ``0, 1, ...`` (``index, ...`` when decoding).
    - ``dropout``: drop probability of each attention weight when ``train=True`` (needs
      ``key=``). Training with dropout always runs fnn's einsum formulation, since the fused
      ``jax.nn.dot_product_attention`` has no dropout; ``implementation`` then applies to
      evaluation only.
    - ``implementation``: passed to ``jax.nn.dot_product_attention``: ``None`` (XLA today),
      ``"xla"``, or ``"cudnn"`` (the fused cuDNN kernel on NVIDIA GPUs: float16/bfloat16,
      ``head_dim`` a multiple of 8); ``"einsum"`` uses :func:`dot_product_attention`.
    - Logits and softmax are computed in at least float32, whatever the compute dtype
      (``dtype``, default: the input's). Masked logits get ``-0.7 * float32 max`` (finite).

    Decode mode (incremental decoding, self-attention only): when ``state`` holds ``{"cache":
    init_cache(...)}``, ``apply`` writes the keys and values of the new tokens ``x:
    [*batch_shape, new, features]`` at ``cache["index"]`` (:func:`write_cache`), attends to
    every position written so far (causally and within the window, if set), and returns the
    state with the updated cache. A ``Seq``'s ``mask`` and ``bias`` then have the cache's
    ``max_length`` as their last axis. Without a cache the state is ``{}``.

    >>> import jax, jax.numpy as jnp
    >>> layer = MultiHeadAttention(4, num_kv_heads=2, causal=True, rope=True, use_bias=False)
    >>> params, state = layer.init(jax.random.key(0), jnp.zeros((2, 5, 16)))
    >>> jax.tree.map(jnp.shape, params)  # doctest: +NORMALIZE_WHITESPACE
    {'key': {'w': (16, 2, 4)}, 'out': {'w': (4, 4, 16)}, 'query': {'w': (16, 4, 4)},
     'value': {'w': (16, 2, 4)}}
    >>> y, state = layer.apply(params, state, jnp.ones((2, 5, 16)))
    >>> y.shape
    (2, 5, 16)
    """
    cfg = _settings(num_heads, num_kv_heads, head_dim, out_features, use_bias, cross, causal,
                    window, rope, rope_base, alibi, dropout, implementation, w_init, b_init,
                    param_dtype, dtype)
    return Layer(functools.partial(_init, cfg), functools.partial(_apply, cfg), _NAME)


# ----------------------------------------------------------------------------- inspection

_WEIGHTS = "attention_weights"


def _weights_error(what: str) -> LayerError:
    return LayerError(f"{_WEIGHTS}: {what}")


def _check_weights_params(params: Any) -> tuple[int, int, int, int]:
    """``(features, heads, kv_heads, head_dim)`` of a :func:`MultiHeadAttention`'s params,
    after checking that they hold self-attention query and key projections."""
    if not isinstance(params, dict) or any(
            not isinstance(params.get(name), dict) or "w" not in params[name]
            for name in ("query", "key")):
        got = sorted(params) if isinstance(params, dict) else type(params).__name__
        raise _weights_error(f"expected the params of a MultiHeadAttention with entries "
                             f"'query' and 'key', each {{'w': ...}}, got {got}")
    wq, wk = params["query"]["w"], params["key"]["w"]
    if wq.ndim != 3 or wk.ndim != 3:
        raise _weights_error(f"expected query w [features, heads, head_dim] and key w "
                             f"[features, kv_heads, head_dim], got query w {describe(wq)}, key w "
                             f"{describe(wk)}")
    features, heads, head_dim = wq.shape
    kv_features, kv_heads, kv_head_dim = wk.shape
    if kv_features != features or kv_head_dim != head_dim or heads % kv_heads:
        raise _weights_error(f"expected key w [{features}, kv_heads, {head_dim}] with kv_heads "
                             f"dividing heads={heads} (self-attention params), got key w "
                             f"{describe(wk)}")
    return features, heads, kv_heads, head_dim


def attention_weights(params: dict[str, Any], x: jax.Array, *, causal: bool = False,
                      window: int | Window | None = None, rope: bool = False,
                      rope_base: float = 10000.0, alibi: bool = False,
                      mask: Any = None) -> jax.Array:
    """The self-attention weights ``softmax(q k^T / sqrt(head_dim) + bias)`` of a
    :func:`MultiHeadAttention` on ``x``, for inspection and plots.

    ``params``: the layer's params (``query`` ``w: [features, heads, head_dim]``, ``key`` ``w:
    [features, kv_heads, head_dim]``, optional biases; the value and output projections are not
    read). ``x: [..., time, features]`` (any number of leading batch axes, none included)
    ``-> float32 [..., heads, time, time]`` (float64 for float64 input): entry ``[..., h, i, j]``
    is how much query position ``i`` of head ``h`` takes from position ``j``.

    Pass the settings the layer was built with: ``causal``, ``window``, ``rope`` and
    ``rope_base``, ``alibi`` (positions ``0, 1, ...``); ``mask`` is bool, broadcastable to
    ``[..., heads, time, time]``, ``True`` = may attend. Grouped-query params (``kv_heads <
    heads``) are read as the layer does. Projections, logits and softmax are computed in
    float32 whatever the dtype of ``x`` (float64 stays float64).

    Each row sums to 1, and masked entries (the upper triangle with ``causal``) are exactly 0; a
    row that may attend to nothing is all zeros, as the layer's attention result is there.
    Multiplying the weights with the value projection and applying the output projection gives
    the layer's output (without dropout).

    >>> import jax, jax.numpy as jnp
    >>> layer = MultiHeadAttention(4, num_kv_heads=2, causal=True)
    >>> x = jax.random.normal(jax.random.key(0), (2, 5, 16))
    >>> params, _ = layer.init(jax.random.key(1), x)
    >>> w = attention_weights(params, x, causal=True)
    >>> w.shape, w.dtype
    ((2, 4, 5, 5), dtype('float32'))
    >>> bool(jnp.allclose(w.sum(-1), 1.0)), float(w[0, 0, 0, 1])  # query 0 sees only key 0
    (True, 0.0)
    """
    features, heads, kv_heads, head_dim = _check_weights_params(params)
    if (not hasattr(x, "ndim") or x.ndim < 2 or x.shape[-1] != features
            or not jnp.issubdtype(x.dtype, jnp.floating)):
        raise ShapeError(f"{_WEIGHTS}: expected x float[..., time, {features}] (the features of "
                         f"the query projection), got {describe(x)}")
    if rope and head_dim % 2:
        raise _weights_error(f"rope needs an even head_dim, got head_dim={head_dim}")
    lead, t = x.shape[:-2], x.shape[-2]
    full = lead + (heads, t, t)
    if mask is not None:
        if (not hasattr(mask, "dtype") or mask.dtype != jnp.bool_ or mask.ndim > len(full)
                or any(a not in (1, b) for a, b in zip(mask.shape[::-1], full[::-1]))):
            raise ShapeError(f"{_WEIGHTS}: expected mask bool broadcastable to [..., heads, "
                             f"time, time] = {_dims(full)}, got {describe(mask)}")
    window_pair = None if window is None else (
        (window, window) if isinstance(window, int) else tuple(window))
    dt = at_least_float32(x.dtype)
    batch = math.prod(lead)
    xf = x.reshape(batch, t, features).astype(dt)
    q = _project(params["query"], xf, dt)  # [B, T, N, D]
    k = _project(params["key"], xf, dt)  # [B, T, K, D]
    positions = jnp.arange(t, dtype=jnp.int32)
    if rope:
        q, k = apply_rope(q, positions, rope_base), apply_rope(k, positions, rope_base)
    allowed = combine_masks(jnp.ones((1,) * len(full), jnp.bool_),
                            causal_mask(t, t) if causal else None,
                            window_mask(t, t, window_pair) if window_pair else None,
                            None if mask is None else align(mask, len(full)))
    allowed = jnp.broadcast_to(allowed, full).reshape(batch, heads, t, t)
    bias = alibi_bias(heads, positions, positions, dt)[None] if alibi else None
    # the layer's own probabilities, [B, K, N // K, T, T] -> [B, N, T, T] (head order kept)
    weights = attention_probs(q, k, allowed, bias).reshape(batch, heads, t, t)
    # masked entries exactly 0, and so a row that may attend to nothing all zeros
    return jnp.where(allowed, weights, jnp.zeros((), weights.dtype)).reshape(full)
