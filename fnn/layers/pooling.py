"""Max and average pooling over 1, 2 or 3 spatial dimensions, adaptive pooling to a given
output size, and global pooling.

Inputs are channels-last, ``[..., *spatial, features]``, with any number of leading batch axes;
the number of spatial dimensions is ``len(window)``. ``strides`` default to the window (no
overlap). ``padding`` is ``"VALID"`` (default), ``"SAME"``, an int, or ``(low, high)`` pairs.
Adaptive pooling takes ``output_size``: a tuple, one entry per spatial axis, or an int for two
(``[..., H, W, C]`` images).
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fnn.core import (Layer, Seq, check_floating, check_positive, check_rank, expect_params,
                      parameter_free, seq_lengths, shape_error, valid_positions)
from fnn.layers.conv import Padding, _padding, _tuple, check_nonempty


def _pool(name: str, window: int | Sequence[int], strides, padding: Padding, reduce):
    """A pooling layer: ``reduce(x, dims, strides, padding, n)`` over full-rank windows of ``n``
    spatial axes."""
    window_ = (window,) if isinstance(window, int) else tuple(window)
    n = len(window_)
    if not 1 <= n <= 3:
        raise ValueError(f"{name}: window must have 1, 2 or 3 entries, got {window!r}")
    window_ = _tuple(name, "window", window_, n)
    strides_ = window_ if strides is None else _tuple(name, "strides", strides, n)
    padding_ = _padding(name, padding, n)
    expected = f"[..., {n} spatial axes, features]"

    def check(x):
        check_rank(name, x, n + 1, expected)
        check_nonempty(name, x, window_, padding_, f"the window {'x'.join(map(str, window_))} "
                                                   f"with padding {padding!r}")

    def pool(x):
        lead = x.ndim - n - 1
        dims = (1,) * lead + window_ + (1,)
        steps = (1,) * lead + strides_ + (1,)
        pads = padding_ if isinstance(padding_, str) else [(0, 0)] * lead + padding_ + [(0, 0)]
        return reduce(x, dims, steps, pads, n)

    return parameter_free(name, pool, check)


def _blocks(x: jax.Array, window: tuple[int, ...]) -> jax.Array:
    """``x: [..., *spatial, C]`` cut into non-overlapping windows,
    ``[..., out_1, window_1, ..., out_n, window_n, C]``; trailing positions that fill no whole
    window are dropped, as with ``"VALID"`` padding."""
    n = len(window)
    lead = x.shape[:x.ndim - n - 1]
    out = [size // k for size, k in zip(x.shape[len(lead):-1], window)]
    x = x[(...,) + tuple(slice(0, o * k) for o, k in zip(out, window)) + (slice(None),)]
    return x.reshape(lead + tuple(d for o, k in zip(out, window) for d in (o, k)) + x.shape[-1:])


def _window_axes(n: int) -> tuple[int, ...]:
    """The axes of :func:`_blocks`'s output that run within a window."""
    return tuple(-2 * (n - i) for i in range(n))


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _block_max(x: jax.Array, window: tuple[int, ...]) -> jax.Array:
    """Max-pool over non-overlapping windows (strides equal to the window, no padding)."""
    return _blocks(x, window).max(_window_axes(len(window)))


@_block_max.defjvp
def _block_max_jvp(window, primals, tangents):
    # The derivative of reduce_window's max: each window's tangent is that of its first maximum
    # in row-major order (jnp.max would share it among ties, which are common: ReLU zeros,
    # constant image backgrounds). Transposed, this sends the whole gradient there.
    (x,), (t,) = primals, tangents
    blocks = _blocks(x, window)
    axes = tuple(axis + blocks.ndim for axis in _window_axes(len(window)))
    y = blocks.max(axes, keepdims=True)
    # each position's row-major rank within its window, shaped to broadcast against blocks
    shape = [1] * blocks.ndim
    for axis, k in zip(axes, window):
        shape[axis] = k
    rank = sum(lax.broadcasted_iota(jnp.int32, shape, axis) * math.prod(window[i + 1:])
               for i, axis in enumerate(axes))
    first = jnp.min(jnp.where(blocks == y, rank, math.prod(window)), axes, keepdims=True)
    dy = jnp.where(rank == first, _blocks(t, window), 0).sum(axes)
    return y.squeeze(axes), dy


def MaxPool(window: int | Sequence[int], strides: int | Sequence[int] | None = None,
            padding: Padding = "VALID") -> Layer:
    """Maximum over each window. ``x: [..., *spatial, C] -> [..., *pooled, C]``; padded
    positions never win."""

    def reduce(x, dims, steps, pads, n):
        floating = jnp.issubdtype(x.dtype, jnp.floating)
        unpadded = pads == "VALID" or (pads != "SAME" and all(p == (0, 0) for p in pads))
        if floating and dims == steps and unpadded:
            # Non-overlapping windows as a reshape and a max: the same values and gradients, but
            # XLA:CPU expands reduce_window's gradient (select-and-scatter) into index-tracking
            # reduce-windows and a scatter that took half of a LeNet train step.
            return _block_max(x, dims[x.ndim - n - 1:x.ndim - 1])
        # a Python scalar init value lets JAX recognise the max monoid (and differentiate it)
        lowest = -jnp.inf if floating else int(jnp.iinfo(x.dtype).min)
        return lax.reduce_window(x, lowest, lax.max, dims, steps, pads)

    return _pool("MaxPool", window, strides, padding, reduce)


def AvgPool(window: int | Sequence[int], strides: int | Sequence[int] | None = None,
            padding: Padding = "VALID", count_include_pad: bool = True) -> Layer:
    """Mean over each window. ``x: [..., *spatial, C] -> [..., *pooled, C]``. With padding,
    ``count_include_pad`` divides by the full window size (as PyTorch and Flax do by default);
    otherwise by the number of real elements in the window."""

    def reduce(x, dims, steps, pads, n):
        check_floating("AvgPool", x, "[..., spatial axes, features]")
        sums = lax.reduce_window(x, 0.0, lax.add, dims, steps, pads)
        if count_include_pad:
            return sums / jnp.array(math.prod(dims), x.dtype)
        # the count of real elements per window, computed with size-1 batch and feature axes
        # and broadcast over them
        lead = x.ndim - 1 - n
        ones = jnp.ones((1,) * lead + x.shape[lead:-1] + (1,), x.dtype)
        counts = lax.reduce_window(ones, 0.0, lax.add, dims, steps, pads)
        return sums / counts

    return _pool("AvgPool", window, strides, padding, reduce)


def _bins(size: int, out: int) -> tuple[np.ndarray, np.ndarray]:
    """Adaptive pooling's bins along one axis: bin ``i`` covers ``[floor(i * size / out),
    ceil((i + 1) * size / out))``. Returns the ``[out, k]`` source indices of each bin, ``k``
    the longest bin, shorter bins filled with their last index, and the ``[out, k]`` mask of
    the positions that belong to the bin."""
    i = np.arange(out)
    start = (i * size) // out
    end = -((-(i + 1) * size) // out)
    k = int(np.max(end - start))
    offsets = start[:, None] + np.arange(k)[None, :]
    valid = offsets < end[:, None]
    return np.where(valid, offsets, end[:, None] - 1), valid


def _bin_view(x: jax.Array, axis: int, indices: np.ndarray) -> jax.Array:
    """``x`` with ``axis`` replaced by the two axes ``[out, k]`` of :func:`_bins`."""
    taken = jnp.take(x, jnp.asarray(indices.reshape(-1), jnp.int32), axis=axis, mode="clip")
    return taken.reshape(x.shape[:axis] + indices.shape + x.shape[axis + 1:])


def _adaptive(name: str, output_size, reduce, floating: bool = False) -> Layer:
    """An adaptive pooling layer: ``reduce(bins, axis, valid)`` pools ``bins`` (``x`` with one
    spatial axis cut into ``[out, k]`` by :func:`_bins`) over ``axis`` (the ``k`` axis), where
    ``valid`` (numpy, ``[out, k]``) marks the real positions; with ``floating``, only
    floating-point inputs are taken. A bin is a product of intervals, so the axes are pooled
    one by one, the last first: a max's first maximum along the last axis, then along the one
    before, is the first in row-major order."""
    sizes = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    if not 1 <= len(sizes) <= 3:
        raise ValueError(f"{name}: output_size must be an int (two spatial axes) or a tuple of "
                         f"1, 2 or 3 ints, one per spatial axis, got {output_size!r}")
    check_positive(name, output_size=sizes)
    n = len(sizes)
    expected = f"[..., {n} spatial axes, features]"

    def check(x):
        check_rank(name, x, n + 1, expected)
        if floating:
            check_floating(name, x, expected)
        if not all(x.shape[x.ndim - n - 1:-1]):
            raise shape_error(name, f"[..., {n} nonempty spatial axes, features]", x)

    def pool(x):
        for k in reversed(range(n)):
            axis, out = x.ndim - n - 1 + k, sizes[k]
            indices, valid = _bins(x.shape[axis], out)
            x = reduce(_bin_view(x, axis, indices), axis + 1, valid)
        return x

    return parameter_free(name, pool, check)


def _bin_mean(bins: jax.Array, axis: int, valid: np.ndarray) -> jax.Array:
    # each bin's positions weighted 1 / its length, the filler positions 0
    weights = valid / valid.sum(1, keepdims=True)
    shape = [1] * bins.ndim
    shape[axis - 1:axis + 1] = weights.shape
    return jnp.sum(bins * jnp.asarray(weights.reshape(shape), bins.dtype), axis)


def _bin_max(bins: jax.Array, axis: int, valid: np.ndarray) -> jax.Array:
    # the fillers repeat a bin's last position, so they never change its maximum; the first
    # maximum is taken (argmax), so the gradient goes there alone, as in PyTorch (jnp.max
    # would share it among ties)
    first = jnp.argmax(bins, axis=axis, keepdims=True)
    return jnp.take_along_axis(bins, first, axis=axis).squeeze(axis)


def AdaptiveAvgPool(output_size: int | Sequence[int]) -> Layer:
    """Mean over bins that cut each spatial axis into ``output_size`` nearly equal parts, as
    PyTorch's ``nn.AdaptiveAvgPool1d/2d/3d``: bin ``i`` of an axis of ``in`` positions covers
    ``[floor(i * in / out), ceil((i + 1) * in / out))`` (neighbouring bins overlap when ``out``
    does not divide ``in``). ``x: [..., *spatial, C] -> [..., *output_size, C]``;
    ``output_size`` is an int for two spatial axes (``[..., H, W, C]``) or a tuple, one entry
    per spatial axis."""
    return _adaptive("AdaptiveAvgPool", output_size, _bin_mean, floating=True)


def AdaptiveMaxPool(output_size: int | Sequence[int]) -> Layer:
    """Maximum over the bins of :func:`AdaptiveAvgPool`, as PyTorch's
    ``nn.AdaptiveMaxPool1d/2d/3d``. ``x: [..., *spatial, C] -> [..., *output_size, C]``; the
    gradient of each bin goes to its first maximum (row-major)."""
    return _adaptive("AdaptiveMaxPool", output_size, _bin_max)


def _global(name: str, start_axis: int, reduce, masked) -> Layer:
    expected = (f"[batch, *spatial, features] (spatial axes from axis {start_axis})"
                if start_axis >= 0 else f"[..., {-start_axis - 1} spatial axes, features]")

    def axes(x):
        if not hasattr(x, "ndim"):
            raise shape_error(name, expected, x)
        start = start_axis + x.ndim if start_axis < 0 else start_axis
        if not 0 <= start < x.ndim - 1:
            raise shape_error(name, expected, x)
        return tuple(range(start, x.ndim - 1))

    def seq_lengths_checked(x):
        """A Seq's lengths, once its time axis is known to be the only pooled one."""
        if axes(x.x) != (x.x.ndim - 2,):
            raise shape_error(name, "a Seq [..., time, features] pooled over its time axis only "
                              "(start_axis=-2)", x)
        return seq_lengths(name, x)

    def init(key, x):
        if isinstance(x, Seq):  # refused at init as in apply
            seq_lengths_checked(x)
        else:
            axes(x)
        return {}, {}

    def apply(params, state, x, *, key=None, train=False):
        expect_params(name, params, {})
        if not isinstance(x, Seq):
            return reduce(x, axis=axes(x)), state
        # a sequence: pooled over its time axis, the padded positions left out
        lengths = seq_lengths_checked(x)
        if lengths is None:
            return reduce(x.x, axis=x.x.ndim - 2), state
        return masked(x.x, valid_positions(lengths, x.x.shape[-2])[..., None], lengths), state

    return Layer(init, apply, name)


def _masked_mean(x, valid, lengths):
    total = jnp.sum(jnp.where(valid, x, jnp.zeros((), x.dtype)), axis=-2)
    count = jnp.maximum(lengths, 1).astype(x.dtype)[..., None]
    return total / count


def _masked_max(x, valid, lengths):
    # -inf, not finfo.min: a valid -inf must stay -inf, as in the unmasked max
    lowest = jnp.asarray(-jnp.inf if jnp.issubdtype(x.dtype, jnp.floating)
                         else jnp.iinfo(x.dtype).min, x.dtype)
    y = jnp.max(jnp.where(valid, x, lowest), axis=-2)
    return jnp.where((lengths > 0)[..., None], y, jnp.zeros((), x.dtype))


def GlobalAvgPool(start_axis: int) -> Layer:
    """Mean over every spatial axis: ``[*lead, *spatial, C] -> [*lead, C]``. Spatial axes run
    from ``start_axis`` to the last but one; a negative ``start_axis`` counts from the end:
    ``-3`` pools ``[..., H, W, C]`` images with any number of batch axes, none included
    (``jax.vmap`` over single images), ``-2`` sequences ``[..., time, C]``, ``-4`` volumes, and
    ``1`` everything after one batch axis. There is no default: which axes are batch axes
    cannot be told from a shape, and a wrong guess would mix examples without a word.

    A ``Seq`` ``[..., time, C]`` (with ``start_axis=-2``) is pooled over its time axis and gives a
    plain array ``[..., C]``; with ``lengths`` the mean is over each sequence's valid positions
    (zero for an empty one)."""
    return _global("GlobalAvgPool", start_axis, jnp.mean, _masked_mean)


def GlobalMaxPool(start_axis: int) -> Layer:
    """Maximum over every spatial axis: ``[*lead, *spatial, C] -> [*lead, C]``; axes and
    ``Seq`` inputs as in :func:`GlobalAvgPool` (the maximum over the valid positions, zero for
    an empty sequence)."""
    return _global("GlobalMaxPool", start_axis, jnp.max, _masked_max)
