"""Positional encodings: learned and sinusoidal position embeddings, rotary embedding (RoPE) and
ALiBi's linear attention biases.

Sequences are ``[..., time, features]``. The position of each step is ``0, 1, ...`` unless the
input is a :class:`~fnn.core.Seq` with ``positions`` (``int``, broadcastable to
``[..., time]``), e.g. ``index + jnp.arange(new)`` when decoding from an offset.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.nn import initializers

from fnn.core import (Initializer, Layer, Seq, ShapeError, align, array_of, at_least_float32,
                      check_floating, check_positive, compute_dtype, describe, expect_params,
                      shape_error, where)


def seq_positions(layer_name: str, x: Any) -> jax.Array | None:
    """The ``positions`` of a ``Seq`` ``[..., time, features]`` (``None`` when absent), checked:
    ``int``, broadcastable to ``[..., time]``."""
    positions = x.positions if isinstance(x, Seq) else None
    if positions is None:
        return None
    lead = x.x.shape[:-1]
    if (not hasattr(positions, "dtype") or not jnp.issubdtype(positions.dtype, jnp.integer)
            or positions.ndim > len(lead)
            or any(a not in (1, b) for a, b in zip(positions.shape[::-1], lead[::-1]))):
        raise ShapeError(f"{where(layer_name)}: expected positions int broadcastable to "
                         f"[..., time] = [{', '.join(map(str, lead))}], got {describe(positions)}")
    return jnp.asarray(positions)


def _check_sequence(name: str, x: Any, max_length: int | None) -> jax.Array:
    """The array of ``x`` (``[..., time, features]``); its time checked against
    ``max_length`` when it has no positions of its own."""
    h = array_of(x)
    if not hasattr(h, "ndim") or h.ndim < 2:
        raise shape_error(name, "[..., time, features]", x)
    given = isinstance(x, Seq) and x.positions is not None
    if not given and max_length is not None and h.shape[-2] > max_length:
        raise shape_error(name, f"[..., time, features] with time <= max_length={max_length}", x)
    return h


def _check_positions(name: str, positions: jax.Array, max_length: int) -> None:
    values = np.asarray(positions)
    if values.size and (values.min() < 0 or values.max() >= max_length):
        bad = values.max() if values.max() >= max_length else values.min()
        raise ShapeError(f"{where(name)}: expected positions in [0, {max_length}) (the table's "
                         f"rows), got {int(bad)}")


def LearnedPositionEmbedding(max_length: int, *,
                             table_init: Initializer = initializers.normal(stddev=0.02),
                             param_dtype: Any = jnp.float32, dtype: Any = None) -> Layer:
    """Adds a learned position embedding (BERT, GPT-2): ``y[..., t, :] = x[..., t, :] +
    table[position t]``. ``x: [..., time, features] -> [..., time, features]``; params
    ``{"table": [max_length, features]}`` (normal, stddev 0.02). Without positions ``time >
    max_length`` is an error; so are a ``Seq``'s ``positions`` outside ``[0, max_length)``
    given as values (eagerly); under ``jit``, where they are not known, they are clamped to the
    table. A ``Seq`` passes through.

    >>> import jax, jax.numpy as jnp
    >>> layer = LearnedPositionEmbedding(16)
    >>> params, _ = layer.init(jax.random.key(0), jnp.zeros((2, 5, 8)))
    >>> params["table"].shape
    (16, 8)
    """
    name = "LearnedPositionEmbedding"
    check_positive(name, max_length=max_length)

    def init(key, x):
        h = _check_sequence(name, x, max_length)
        return {"table": table_init(key, (max_length, h.shape[-1]), param_dtype)}, {}

    def apply(params, state, x, *, key=None, train=False):
        h = _check_sequence(name, x, max_length)
        expect_params(name, params, {"table": (max_length, "features")})
        table = params["table"]
        if h.shape[-1] != table.shape[1]:
            raise shape_error(name, f"[..., time, {table.shape[1]}]", x)
        dt = compute_dtype(dtype, h, param_dtype)
        positions = seq_positions(name, x)
        if positions is not None and not isinstance(positions, jax.core.Tracer):
            _check_positions(name, positions, max_length)
        emb = table[:h.shape[-2]] if positions is None else jnp.take(table, positions, axis=0,
                                                                        mode="clip")
        y = h.astype(dt) + align(emb.astype(dt), h.ndim)
        return (x.with_x(y) if isinstance(x, Seq) else y), state

    return Layer(init, apply, name)


def sinusoidal_table(positions: jax.Array, features: int, base: float = 10000.0,
                     dtype: Any = jnp.float32) -> jax.Array:
    """The sinusoidal embeddings of ``positions: [...] -> [..., features]``, interleaved as in
    "Attention Is All You Need": ``pe[..., 2i] = sin(pos / base ** (2i / features))`` and
    ``pe[..., 2i + 1] = cos(pos / base ** (2i / features))`` (an odd ``features`` ends with a
    sine). Computed in ``dtype``.

    >>> import jax.numpy as jnp
    >>> sinusoidal_table(jnp.arange(2), 4).tolist()[0]
    [0.0, 1.0, 0.0, 1.0]
    """
    column = jnp.arange(features)
    exponent = (2 * (column // 2)).astype(dtype) / jnp.asarray(features, dtype)
    inv_freq = jnp.power(jnp.asarray(base, dtype), -exponent)  # [features]
    positions = jnp.asarray(positions)
    angles = positions.astype(dtype)[..., None] * align(inv_freq, positions.ndim + 1)
    return jnp.where(align(column % 2 == 0, angles.ndim), jnp.sin(angles), jnp.cos(angles))


def SinusoidalPositionEmbedding(max_length: int | None = None, base: float = 10000.0) -> Layer:
    """Adds the fixed sinusoidal position embedding of "Attention Is All You Need":
    ``y[..., t, :] = x[..., t, :] + pe[position t]``, interleaved layout (see
    :func:`sinusoidal_table`). ``x: [..., time, features] -> [..., time, features]``; no params.
    ``time > max_length`` is an error when ``max_length`` is given (and the input has no
    positions). The table is computed in float32 (float64 for float64 inputs) and added in the
    input's dtype. A ``Seq`` passes through.

    >>> import jax.numpy as jnp
    >>> layer = SinusoidalPositionEmbedding()
    >>> layer.apply({}, {}, jnp.zeros((1, 2, 4)))[0][0].tolist()[1][:2]  # sin(1), cos(1)
    [0.8414709568023682, 0.5403022766113281]
    """
    name = "SinusoidalPositionEmbedding"
    if max_length is not None:
        check_positive(name, max_length=max_length)
    if not isinstance(base, (int, float)) or isinstance(base, bool) or base <= 0:
        raise ValueError(f"{name}: base must be a positive number, got {base!r}")

    def init(key, x):
        _check_sequence(name, x, max_length)
        return {}, {}

    def apply(params, state, x, *, key=None, train=False):
        expect_params(name, params, {})
        h = _check_sequence(name, x, max_length)
        check_floating(name, h, "[..., time, features]")
        positions = seq_positions(name, x)
        positions = jnp.arange(h.shape[-2]) if positions is None else positions
        pe = sinusoidal_table(positions, h.shape[-1], base, at_least_float32(h.dtype))
        y = h + align(pe.astype(h.dtype), h.ndim)
        return (x.with_x(y) if isinstance(x, Seq) else y), state

    return Layer(init, apply, name)


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
    dt = at_least_float32(x.dtype)
    inv_freq = jnp.asarray(base ** (-np.arange(half, dtype=np.float64) * 2.0 / head_dim), dt)
    positions = jnp.asarray(positions)
    pos = align(positions, x.ndim - 2).astype(dt)[..., None]  # [..., time, 1]
    angles = (pos * align(inv_freq, pos.ndim))[..., None, :]  # [..., time, 1, half]
    cos, sin = align(jnp.cos(angles), x.ndim), align(jnp.sin(angles), x.ndim)
    x1, x2 = x[..., :half].astype(dt), x[..., half:].astype(dt)
    y = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return y.astype(x.dtype)


def alibi_slopes(num_heads: int) -> np.ndarray:
    """ALiBi's per-head slopes (Press et al., 2022): for ``n`` heads a power of two,
    ``2 ** (-8 (h + 1) / n)``; otherwise those of the largest power of two below ``n``,
    followed by every other slope of twice that many. ``float64[num_heads]``.

    >>> alibi_slopes(4).tolist()
    [0.25, 0.0625, 0.015625, 0.00390625]
    """
    check_positive("alibi_slopes", num_heads=num_heads)

    def powers(n: int) -> np.ndarray:
        return 2.0 ** (-8.0 * np.arange(1, n + 1) / n)

    closest = 2 ** int(np.floor(np.log2(num_heads)))
    if closest == num_heads:
        return powers(num_heads)
    return np.concatenate([powers(closest), powers(2 * closest)[0::2][:num_heads - closest]])


def alibi_bias(num_heads: int, q_positions: jax.Array, kv_positions: jax.Array,
               dtype: Any = jnp.float32) -> jax.Array:
    """ALiBi's attention bias ``-slope[h] * |q_position - kv_position|``:
    ``q_positions: int[..., q_time]``, ``kv_positions: int[..., kv_time]`` (broadcastable to
    each other's batch axes) ``-> [..., heads, q_time, kv_time]`` in ``dtype``. With a causal
    mask this is the paper's ``slope * (j - i)`` on every allowed key.

    >>> import jax.numpy as jnp
    >>> alibi_bias(2, jnp.arange(2), jnp.arange(2)).tolist()[0]  # head 0: slope 2 ** -4
    [[-0.0, -0.0625], [-0.0625, -0.0]]
    """
    slopes = jnp.asarray(alibi_slopes(num_heads), dtype)  # [heads]
    q = jnp.asarray(q_positions)[..., None, :, None]  # [..., 1, q_time, 1]
    k = jnp.asarray(kv_positions)[..., None, None, :]  # [..., 1, 1, kv_time]
    ndim = max(q.ndim, k.ndim)
    distance = jnp.abs(align(q, ndim) - align(k, ndim)).astype(dtype)
    return -align(slopes[:, None, None], ndim) * distance
