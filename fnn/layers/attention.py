"""Multi-head attention: self- and cross-attention, grouped-query (GQA) and multi-query (MQA)
attention, rotary position embedding (RoPE), dropout on the attention weights, and incremental
decoding with a key/value cache.

Layout: sequences are ``[..., time, features]`` with any number of leading batch axes (none
included); per-head tensors are ``[..., time, heads, head_dim]``, as
``jax.nn.dot_product_attention`` takes them. Query head ``h`` reads key/value head
``h // (num_heads // num_kv_heads)``: each key/value head serves a contiguous group of query
heads, as ``repeat_interleave`` does in PyTorch and Hugging Face models.

Masks follow one rule everywhere: ``True`` means *may attend*. A query row that may attend to no
key at all (every key masked, ``kv_lengths == 0``, or a padded query row past ``q_lengths``)
gets an attention result of exactly zero, so the layer outputs the output bias there (zero
without ``use_bias``) and its gradients are zero and finite.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.nn import initializers

from fnn.core import (Layer, LayerError, ShapeError, align, check_positive, check_train,
                      compute_dtype, describe, require_key, shape_error, where)

Initializer = jax.nn.initializers.Initializer

_NAME = "MultiHeadAttention"
_IMPLEMENTATIONS = (None, "xla", "cudnn", "einsum")


class AttentionInput(NamedTuple):
    """The input of :func:`MultiHeadAttention` for cross-attention, masks, lengths or positions.

    A plain array ``x`` is the same as ``AttentionInput(q=x)``: self-attention without a mask.

    - ``q``: ``[..., q_time, q_features]``, the sequence that asks (queries).
    - ``kv``: ``[..., kv_time, kv_features]``, the sequence attended to (keys and values); ``None``
      for self-attention (``kv = q``). Its batch axes must equal ``q``'s.
    - ``mask``: bool, broadcastable to ``[..., heads, q_time, kv_time]``; ``True`` = may attend.
      In decode mode ``kv_time`` is the cache's ``max_length`` (slot ``j`` holds position ``j``).
    - ``q_lengths``: int, broadcastable to ``[...]``; query rows at or past it are padding and
      get a zero attention result.
    - ``kv_lengths``: int, broadcastable to ``[...]``; keys at or past it are ignored.
    - ``q_positions`` / ``kv_positions``: int, broadcastable to ``[..., q_time]`` /
      ``[..., kv_time]``; the positions RoPE rotates by (only read with ``rope=True``). By
      default ``0, 1, ...`` (in decode mode ``index, index + 1, ...``); in self-attention
      ``kv_positions`` defaults to ``q_positions``.
    """

    q: Any
    kv: Any = None
    mask: Any = None
    q_lengths: Any = None
    kv_lengths: Any = None
    q_positions: Any = None
    kv_positions: Any = None


# ----------------------------------------------------------------------------- helpers

def _error(field: str, expected: str, value: Any) -> ShapeError:
    """Like :func:`fnn.core.shape_error`, for a field of :class:`AttentionInput`."""
    return ShapeError(f"{where(_NAME)}: expected {field} {expected}, got {describe(value)}")


def _dims(shape: tuple[int, ...]) -> str:
    return f"[{', '.join(map(str, shape))}]"


def _batched(field: str, v: Any, lead: tuple[int, ...], tail: tuple[int, ...], expected: str,
             kind: str, keep: tuple[int, ...] = ()) -> jax.Array:
    """``v`` (broadcastable to ``lead + tail``) as ``[1 or prod(lead), *tail]``: the leading
    batch axes are flattened, or kept at size 1 when ``v`` does not vary over them; the tail
    axes numbered in ``keep`` stay at size 1 when they are 1. ``kind`` is ``"bool"`` or
    ``"int"``."""
    full = lead + tail
    if not hasattr(v, "shape"):
        v = jnp.asarray(v)
    ok = v.ndim <= len(full)
    ok = ok and all(a in (1, b) for a, b in zip((1,) * (len(full) - v.ndim) + v.shape, full))
    if kind == "int":
        ok = ok and jnp.issubdtype(v.dtype, jnp.integer)
    else:
        ok = ok and v.dtype == jnp.bool_
    if not ok:
        raise _error(field, expected, v)
    v = align(v, len(full))
    v_tail = v.shape[len(lead):]
    target = tuple(1 if i in keep and v_tail[i] == 1 else size for i, size in enumerate(tail))
    if all(dim == 1 for dim in v.shape[:len(lead)]):
        return jnp.broadcast_to(v.reshape((1,) + v_tail), (1,) + target)
    return jnp.broadcast_to(v, lead + target).reshape((math.prod(lead),) + target)


def _at_least_f32(dtype: Any) -> Any:
    """float32, or float64 for float64: logits, softmax and rotations never in half precision."""
    return jnp.dtype(jnp.float64) if jnp.dtype(dtype) == jnp.float64 else jnp.dtype(jnp.float32)


def apply_rope(x: jax.Array, positions: jax.Array, base: float = 10000.0) -> jax.Array:
    """Rotary position embedding, rotate-half convention (GPT-NeoX, Hugging Face LLaMA).

    ``x: [..., time, heads, head_dim]`` (``head_dim`` even), ``positions: int [..., time]``
    (broadcastable) ``-> [..., time, heads, head_dim]``. The features are split into halves
    ``x1, x2``; the pair ``(x1[i], x2[i])`` is rotated by the angle
    ``positions * base ** (-2 i / head_dim)``. (The interleaved convention of the RoFormer paper
    rotates the pairs ``(x[2i], x[2i + 1])`` instead; convert such weights by permuting the
    query and key projection columns.) The rotation is computed in at least float32.

    >>> import jax.numpy as jnp
    >>> apply_rope(jnp.ones((3, 2, 4)), jnp.arange(3)).shape
    (3, 2, 4)
    """
    head_dim = x.shape[-1]
    if x.ndim < 3 or head_dim % 2:
        raise ShapeError(f"apply_rope: expected input [..., time, heads, head_dim] with an even "
                         f"head_dim, got {describe(x)}")
    half = head_dim // 2
    dt = _at_least_f32(x.dtype)
    inv_freq = jnp.asarray(base ** (-np.arange(half, dtype=np.float64) * 2.0 / head_dim), dt)
    positions = jnp.asarray(positions)
    pos = align(positions, x.ndim - 2).astype(dt)[..., None]  # [..., time, 1]
    angles = (pos * align(inv_freq, pos.ndim))[..., None, :]  # [..., time, 1, half]
    cos, sin = align(jnp.cos(angles), x.ndim), align(jnp.sin(angles), x.ndim)
    x1, x2 = x[..., :half].astype(dt), x[..., half:].astype(dt)
    y = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return y.astype(x.dtype)


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


def _project(p: dict[str, Any], x: jax.Array, dt: Any) -> jax.Array:
    """A query/key/value projection ``x: [..., time, features] -> [..., time, heads, head_dim]``
    in ``dt``."""
    y = jnp.einsum("...tf,fhd->...thd", x, p["w"].astype(dt))
    if "b" in p:
        y = y + align(p["b"].astype(dt), y.ndim)
    return y


def _attention_probs(q, k, mask):
    """``softmax(q k^T / sqrt(d))`` over the key positions, masked, in at least float32:
    ``q: [B, T, N, D]``, ``k: [B, S, K, D]``, ``mask: bool [1 or B, 1 or N, T, S]`` or ``None``
    ``-> [B, K, N // K, T, S]``; query head ``h`` is ``[:, h // (N // K), h % (N // K)]`` and
    uses key head ``h // (N // K)``. A row that may attend to nothing is uniform."""
    b, t, n, d = q.shape
    kv_heads = k.shape[2]
    g = n // kv_heads
    logits_dt = _at_least_f32(q.dtype)
    qg = q.reshape(b, t, kv_heads, g, d)
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=logits_dt)
    logits = logits * jnp.asarray(1.0 / math.sqrt(d), logits_dt)
    if mask is not None:
        mb, mn = mask.shape[:2]
        mask = mask.reshape((mb, kv_heads, g) + mask.shape[2:]) if mn == n else mask[:, :, None]
        # finite: a fully masked row stays finite (uniform)
        big_negative = jnp.asarray(-0.7 * jnp.finfo(jnp.float32).max, logits_dt)
        logits = jnp.where(mask, logits, big_negative)
    return jax.nn.softmax(logits, axis=-1)


def _explicit_attention(q, k, v, mask, rate, key):
    """``softmax(q k^T / sqrt(d) masked) v`` with einsums. ``q: [B, T, N, D]``,
    ``k, v: [B, S, K, D]``, ``mask: bool [1 or B, 1 or N, T, S]`` or ``None``; dropout with
    ``rate`` on the attention weights when ``key`` is given."""
    weights = _attention_probs(q, k, mask)
    if key is not None:
        keep = jax.random.bernoulli(key, 1.0 - rate, weights.shape)
        weights = jnp.where(keep, weights / jnp.asarray(1.0 - rate, weights.dtype),
                            jnp.zeros((), weights.dtype))
    out = jnp.einsum("bkgts,bskd->btkgd", weights.astype(v.dtype), v)
    return out.reshape(q.shape)


# ----------------------------------------------------------------------------- the layer

def MultiHeadAttention(num_heads: int, *, num_kv_heads: int | None = None,
                       head_dim: int | None = None, out_features: int | None = None,
                       use_bias: bool = False, causal: bool = False, rope: bool = False,
                       rope_base: float = 10000.0, dropout: float = 0.0,
                       implementation: str | None = None,
                       w_init: Initializer = initializers.lecun_normal(),
                       b_init: Initializer = initializers.zeros,
                       param_dtype: Any = jnp.float32, dtype: Any = None) -> Layer:
    """Multi-head scaled dot-product attention, ``softmax(q k^T / sqrt(head_dim)) v``.

    Shapes: ``x: [..., time, features] -> [..., time, out_features]`` (self-attention), or
    ``AttentionInput(q=[..., q_time, q_features], kv=[..., kv_time, kv_features], mask=...)
    -> [..., q_time, out_features]`` (cross-attention, masks, lengths; see
    :class:`AttentionInput`). ``out_features`` defaults to ``q_features``; ``head_dim`` to
    ``q_features // num_heads``.

    Params, one entry per projection (``N = num_heads``, ``K = num_kv_heads``,
    ``D = head_dim``)::

        {"query": {"w": [q_features, N, D]}, "key": {"w": [kv_features, K, D]},
         "value": {"w": [kv_features, K, D]}, "out": {"w": [N, D, out_features]}}

    With ``use_bias`` each also has ``"b"`` (``[N, D]``, ``[K, D]``, ``[K, D]``,
    ``[out_features]``). ``w_init`` is called with the 2-D shape ``[in, out]`` (``[q_features,
    N * D]``, ..., ``[N * D, out_features]``), so fan-in initialisers see the true fan-in; the
    result is reshaped.

    - ``num_kv_heads``: fewer key/value heads than query heads is grouped-query attention
      (``num_heads % num_kv_heads == 0``); ``1`` is multi-query attention.
    - ``causal``: query ``i`` sees keys ``j <= i`` (top-left aligned when ``q_time != kv_time``,
      as in PyTorch and ``jax.nn.dot_product_attention``; in decode mode ``j <= index + i``).
    - ``rope``: rotary position embedding on queries and keys (rotate-half convention, see
      :func:`apply_rope`); positions from :class:`AttentionInput` or ``0, 1, ...``.
    - ``dropout``: drop probability of each attention weight when ``train=True`` (needs
      ``key=``); the kept weights are scaled by ``1 / (1 - dropout)``.
    - ``implementation``: passed to ``jax.nn.dot_product_attention``: ``None`` (XLA today),
      ``"xla"``, or ``"cudnn"`` (the fused cuDNN kernel on NVIDIA GPUs: float16/bfloat16,
      ``head_dim`` a multiple of 8); ``"einsum"`` uses fnn's explicit formulation. Dropout
      in training always takes the explicit formulation (the fused call has no dropout).
    - Logits and softmax are computed in at least float32, whatever the compute dtype
      (``dtype``, default: the input's). Masked logits get ``-0.7 * float32 max`` (finite).

    Decode mode (incremental decoding): when ``state`` holds ``{"cache": init_cache(...)}``,
    ``apply`` writes the keys and values of the new tokens ``x: [*batch_shape, new,
    features]`` at ``cache["index"]``, attends to every position written so far (causally
    within the new tokens if ``causal``), rotates by positions ``index, index + 1, ...``, and
    returns the state with the updated cache (``index + new``). Decode mode is self-attention
    only. Without a cache the state is ``{}``.

    >>> import jax, jax.numpy as jnp
    >>> layer = MultiHeadAttention(4, num_kv_heads=2, causal=True, rope=True)
    >>> params, state = layer.init(jax.random.key(0), jnp.zeros((2, 5, 16)))
    >>> jax.tree.map(jnp.shape, params)  # doctest: +NORMALIZE_WHITESPACE
    {'key': {'w': (16, 2, 4)}, 'out': {'w': (4, 4, 16)}, 'query': {'w': (16, 4, 4)},
     'value': {'w': (16, 2, 4)}}
    >>> y, state = layer.apply(params, state, jnp.ones((2, 5, 16)))
    >>> y.shape
    (2, 5, 16)
    """
    kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    check_positive(_NAME, num_heads=num_heads, num_kv_heads=kv_heads)
    if head_dim is not None:
        check_positive(_NAME, head_dim=head_dim)
    if out_features is not None:
        check_positive(_NAME, out_features=out_features)
    if num_heads % kv_heads:
        raise ValueError(f"{_NAME}: num_heads must be a multiple of num_kv_heads (each key/value "
                         f"head serves num_heads // num_kv_heads query heads), got num_heads="
                         f"{num_heads}, num_kv_heads={kv_heads}")
    if rope and head_dim is not None and head_dim % 2:
        raise ValueError(f"{_NAME}: rope needs an even head_dim, got head_dim={head_dim}")
    if (not isinstance(dropout, (int, float)) or isinstance(dropout, bool)
            or not 0.0 <= dropout < 1.0):
        raise ValueError(f"{_NAME}: dropout is the drop probability of an attention weight and "
                         f"must be in [0, 1), got {dropout!r}")
    if implementation not in _IMPLEMENTATIONS:
        raise ValueError(f"{_NAME}: implementation must be one of {_IMPLEMENTATIONS}, got "
                         f"{implementation!r}")

    def split(x) -> tuple[Any, Any, AttentionInput]:
        inp = x if isinstance(x, AttentionInput) else AttentionInput(q=x)
        q = inp.q
        if not hasattr(q, "ndim") or q.ndim < 2:
            raise shape_error(_NAME, "[..., time, features]", q)
        kv = q if inp.kv is None else inp.kv
        if inp.kv is not None:
            if not hasattr(kv, "ndim") or kv.ndim != q.ndim or kv.shape[:-2] != q.shape[:-2]:
                raise _error("kv", f"{_dims(q.shape[:-2] + ('kv_time', 'kv_features'))} "
                             f"(the batch axes of q {describe(q)})", kv)
        return q, kv, inp

    def init(key, x):
        q, kv, _ = split(x)
        features, kv_features = q.shape[-1], kv.shape[-1]
        if head_dim is None and features % num_heads:
            raise shape_error(_NAME, f"[..., time, features] with features divisible by "
                                     f"num_heads={num_heads} (or pass head_dim)", q)
        d = features // num_heads if head_dim is None else head_dim
        if rope and d % 2:
            raise shape_error(_NAME, f"[..., time, features] giving an even head_dim = "
                                     f"features // num_heads for rope=True (or pass head_dim), "
                                     f"head_dim would be {d}", q)
        out = features if out_features is None else out_features
        keys = jax.random.split(key, 8)
        shapes = {"query": (features, num_heads, d), "key": (kv_features, kv_heads, d),
                  "value": (kv_features, kv_heads, d), "out": (num_heads, d, out)}
        params = {}
        for i, (name, shape) in enumerate(shapes.items()):
            fan_in = shape[0] if name != "out" else num_heads * d
            w = w_init(keys[2 * i], (fan_in, math.prod(shape) // fan_in), param_dtype)
            params[name] = {"w": w.reshape(shape)}
            if use_bias:
                params[name]["b"] = b_init(keys[2 * i + 1], shape[1:] if name != "out" else
                                           (out,), param_dtype)
        return params, {}

    def apply(params, state, x, *, key=None, train=False):
        check_train(train)
        q_in, kv_in, inp = split(x)
        features, n, d = params["query"]["w"].shape
        kv_features = params["key"]["w"].shape[0]
        if q_in.shape[-1] != features:
            raise shape_error(_NAME, f"[..., time, {features}]", q_in)
        if kv_in.shape[-1] != kv_features:
            raise _error("kv", f"[..., kv_time, {kv_features}]", kv_in)
        lead, t, s = q_in.shape[:-2], q_in.shape[-2], kv_in.shape[-2]
        b = math.prod(lead)
        dt = compute_dtype(dtype, q_in, param_dtype)
        q = _project(params["query"], q_in.reshape(b, t, features).astype(dt), dt)
        k = _project(params["key"], kv_in.reshape(b, s, kv_features).astype(dt), dt)
        v = _project(params["value"], kv_in.reshape(b, s, kv_features).astype(dt), dt)

        cache = state.get("cache") if isinstance(state, dict) else None
        decode = cache is not None
        if decode:
            if inp.kv is not None:
                raise LayerError(f"{where(_NAME)}: decode mode (a cache in state) is "
                                 f"self-attention only; got kv {describe(inp.kv)}")
            cache_lead = cache["k"].shape[:-3]
            max_length = cache["k"].shape[-3]
            if lead != cache_lead or t > max_length:
                raise shape_error(_NAME, f"{_dims(cache_lead + ('new', features))} with new <= "
                                         f"{max_length} (the cache's batch shape and length)",
                                  q_in)
            index = jnp.asarray(cache["index"], jnp.int32)
            offset = index
        else:
            offset = jnp.zeros((), jnp.int32)

        if rope:
            steps = jnp.arange(t, dtype=jnp.int32)
            q_pos = (offset + steps if inp.q_positions is None else
                     _batched("q_positions", inp.q_positions, lead, (t,),
                              f"int broadcastable to {_dims(lead + (t,))}", "int"))
            if inp.kv_positions is not None:
                kv_pos = _batched("kv_positions", inp.kv_positions, lead, (s,),
                                  f"int broadcastable to {_dims(lead + (s,))}", "int")
            elif inp.kv is None:
                kv_pos = q_pos
            else:
                kv_pos = jnp.arange(s, dtype=jnp.int32)
            q = apply_rope(q, q_pos, rope_base)
            k = apply_rope(k, kv_pos, rope_base)

        new_state = state
        if decode:
            max_length = cache["k"].shape[-3]
            kv_shape = (b, max_length) + cache["k"].shape[-2:]
            start = (0, index, 0, 0)
            k_all = lax.dynamic_update_slice(cache["k"].reshape(kv_shape),
                                             k.astype(cache["k"].dtype), start)
            v_all = lax.dynamic_update_slice(cache["v"].reshape(kv_shape),
                                             v.astype(cache["v"].dtype), start)
            new_state = {**state, "cache": {"k": k_all.reshape(cache["k"].shape),
                                            "v": v_all.reshape(cache["v"].shape),
                                            "index": index + t}}
            k, v, s = k_all.astype(dt), v_all.astype(dt), max_length

        # masks: the user's [1|B, 1|N, T, S], lengths [B]
        mask = None
        if inp.mask is not None:
            mask = _batched("mask", inp.mask, lead, (n, t, s),
                            f"bool broadcastable to [..., heads, q_time, kv_time] = "
                            f"{_dims(lead + (n, t, s))}", "bool", keep=(0,))
        q_len = kv_len = None
        if inp.q_lengths is not None:
            q_len = _batched("q_lengths", inp.q_lengths, lead, (), f"int broadcastable to "
                             f"{_dims(lead)}", "int").astype(jnp.int32)
            q_len = jnp.broadcast_to(q_len, (b,))
        if inp.kv_lengths is not None:
            kv_len = _batched("kv_lengths", inp.kv_lengths, lead, (), f"int broadcastable to "
                              f"{_dims(lead)}", "int").astype(jnp.int32)
            kv_len = jnp.broadcast_to(kv_len, (b,))

        rows = jnp.arange(t, dtype=jnp.int32)[:, None]
        cols = jnp.arange(s, dtype=jnp.int32)[None, :]
        structural = None  # [1, 1, T, S]: causal and, in decode mode, the written prefix
        if decode:
            structural = cols < index + t
            if causal:
                structural = structural & (cols <= rows + index)
            structural = structural[None, None]
        explicit = implementation == "einsum" or (train and dropout > 0.0)
        if explicit:
            full = mask
            extra = [structural]
            if causal and not decode:
                extra.append((cols <= rows)[None, None])
            if q_len is not None:
                extra.append(jnp.arange(t, dtype=jnp.int32)[None, None, :, None]
                             < q_len[:, None, None, None])
            if kv_len is not None:
                extra.append(jnp.arange(s, dtype=jnp.int32)[None, None, None, :]
                             < kv_len[:, None, None, None])
            for m in extra:
                if m is not None:
                    full = m if full is None else full & m
            drop_key = require_key(_NAME, key) if train and dropout > 0.0 else None
            out = _explicit_attention(q, k, v, full, dropout, drop_key)
        else:
            dpa_mask = mask
            if structural is not None:
                dpa_mask = structural if mask is None else mask & structural
            # jax promotes bfloat16 logits to float32 implicitly inside; allow that there only
            with jax.numpy_dtype_promotion("standard"):
                out = jax.nn.dot_product_attention(
                    q, k, v, mask=dpa_mask, is_causal=causal and not decode,
                    query_seq_lengths=q_len, key_value_seq_lengths=kv_len,
                    implementation=implementation)

        # Rows that may attend to nothing get exactly zero (see the module docstring).
        valid = None  # broadcastable to [B, T, N, 1]
        if mask is not None:
            rows_mask = mask
            if structural is not None:
                rows_mask = rows_mask & structural
            elif causal:
                rows_mask = rows_mask & (cols <= rows)[None, None]
            if kv_len is not None:
                rows_mask = rows_mask & (cols[None, None] < kv_len[:, None, None, None])
            valid = jnp.transpose(jnp.any(rows_mask, axis=-1), (0, 2, 1))[..., None]
        elif kv_len is not None:
            valid = (kv_len > 0)[:, None, None, None]
        if q_len is not None:
            q_valid = (jnp.arange(t, dtype=jnp.int32)[None, :] < q_len[:, None])[..., None, None]
            valid = q_valid if valid is None else valid & q_valid
        if valid is not None:
            out = jnp.where(valid, out, jnp.zeros((), out.dtype))

        y = jnp.einsum("bthd,hdo->bto", out, params["out"]["w"].astype(dt))
        if "b" in params["out"]:
            y = y + align(params["out"]["b"].astype(dt), y.ndim)
        return y.reshape(lead + (t, y.shape[-1])), new_state

    return Layer(init, apply, _NAME)


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
                      rope: bool = False, rope_base: float = 10000.0,
                      mask: Any = None) -> jax.Array:
    """The self-attention weights ``softmax(q k^T / sqrt(head_dim))`` of a
    :func:`MultiHeadAttention` on ``x``, for inspection and plots.

    ``params``: the layer's params (``query`` ``w: [features, heads, head_dim]``, ``key`` ``w:
    [features, kv_heads, head_dim]``, optional biases; the value and output projections are not
    read). ``x: [..., time, features]`` (any number of leading batch axes, none included)
    ``-> float32 [..., heads, time, time]`` (float64 for float64 input): entry ``[..., h, i, j]``
    is how much query position ``i`` of head ``h`` takes from position ``j``.

    Pass the settings the layer was built with: ``causal``, ``rope`` and ``rope_base``
    (positions ``0, 1, ...``); ``mask`` is bool, broadcastable to ``[..., heads, time, time]``,
    ``True`` = may attend. Grouped-query params (``kv_heads < heads``) are read as the layer
    does: query head ``h`` uses key head ``h // (heads // kv_heads)``. Projections, logits and
    softmax are computed in float32 whatever the dtype of ``x`` (float64 stays float64).

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
    dt = _at_least_f32(x.dtype)
    batch = math.prod(lead)
    xf = x.reshape(batch, t, features).astype(dt)
    q = _project(params["query"], xf, dt)  # [B, T, N, D]
    k = _project(params["key"], xf, dt)  # [B, T, K, D]
    if rope:
        positions = jnp.arange(t, dtype=jnp.int32)
        q, k = apply_rope(q, positions, rope_base), apply_rope(k, positions, rope_base)
    allowed = jnp.ones((1,) * len(full), jnp.bool_)
    if causal:
        allowed = align(jnp.tril(jnp.ones((t, t), jnp.bool_)), len(full))
    if mask is not None:
        allowed = allowed & align(mask, len(full))
    allowed = jnp.broadcast_to(allowed, full).reshape(batch, heads, t, t)
    # the layer's own probabilities, [B, K, N // K, T, T] -> [B, N, T, T] (head order kept)
    weights = _attention_probs(q, k, allowed).reshape(batch, heads, t, t)
    # masked entries exactly 0, and so a row that may attend to nothing all zeros
    return jnp.where(allowed, weights, jnp.zeros((), weights.dtype)).reshape(full)
