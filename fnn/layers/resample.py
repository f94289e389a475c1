"""Resampling of the spatial axes: Upsample (nearest or linear interpolation) and the
sub-pixel rearrangements PixelShuffle and PixelUnshuffle.

Inputs are channels-last, ``[..., *spatial, C]``, with any number of leading batch axes. A
size or scale factor given as a tuple has one entry per spatial axis (1 to 3); a plain number
means two spatial axes, images ``[..., H, W, C]`` (a 1-D signal takes a 1-tuple, ``(2,)``).
The results are PyTorch's (``nn.Upsample``/``F.interpolate``, ``nn.PixelShuffle``) after the
move from NCHW to NHWC.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fnn.core import Layer, check_floating, check_positive, check_rank, parameter_free, shape_error

METHODS = ("nearest", "linear")


def _per_axis(name: str, arg: str, value, kinds: tuple[type, ...]) -> tuple:
    """``value`` as one entry per spatial axis: a tuple of 1-3 entries, or a number for two."""
    values = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if not 1 <= len(values) <= 3 or not all(
            isinstance(v, kinds) and not isinstance(v, bool) and v > 0 for v in values):
        what = "int" if kinds == (int,) else "number"
        raise ValueError(f"{name}: {arg} must be a positive {what} (two spatial axes) or a tuple "
                         f"of 1, 2 or 3 of them (one per spatial axis), got {value!r}")
    return values


def _nearest_indices(size: int, out: int) -> np.ndarray:
    """PyTorch's ``mode="nearest"`` source index of each output position, ``floor(i * in /
    out)``, computed in float32 as PyTorch computes it (the float32 rounding moves some bin
    edges by one position against exact integer arithmetic)."""
    step = np.float32(size) / np.float32(out)
    positions = np.arange(out, dtype=np.float32) * step
    return np.minimum(np.floor(positions).astype(np.int64), size - 1)


def _linear_weights(size: int, out: int, align_corners: bool):
    """PyTorch's linear interpolation along one axis: for each output position the two
    source indices and their weights. ``align_corners=False``: half-pixel centres,
    ``src = (i + 0.5) * in / out - 0.5``, clamped at 0; ``True``:
    ``src = i * (in - 1) / (out - 1)``."""
    i = np.arange(out, dtype=np.float64)
    if align_corners:
        src = i * ((size - 1) / (out - 1) if out > 1 else 0.0)
    else:
        src = np.maximum((i + 0.5) * (size / out) - 0.5, 0.0)
    low = np.minimum(np.floor(src).astype(np.int64), size - 1)
    high = np.minimum(low + 1, size - 1)
    frac = np.clip(src - low, 0.0, 1.0)
    return low, high, 1.0 - frac, frac


def _along(x: jax.Array, axis: int, indices: np.ndarray) -> jax.Array:
    return jnp.take(x, jnp.asarray(indices, jnp.int32), axis=axis, mode="clip")


def _weights(w: np.ndarray, axis: int, x: jax.Array) -> jax.Array:
    """``w: [out]`` shaped to broadcast along ``axis`` of ``x`` (explicitly, full rank)."""
    shape = [1] * x.ndim
    shape[axis] = w.shape[0]
    return jnp.asarray(w.reshape(shape), x.dtype)


def Upsample(scale_factor: float | Sequence[float] | None = None, *,
             size: int | Sequence[int] | None = None, method: str = "nearest",
             align_corners: bool = False) -> Layer:
    """Resizes the spatial axes by ``scale_factor`` or to ``size`` (exactly one of them), as
    PyTorch's ``nn.Upsample``/``F.interpolate``.

    Shapes: ``x: [..., *spatial, C] -> [..., *out_spatial, C]`` with ``out = size``, or
    ``out = floor(in * scale_factor)`` (a factor below 1 shrinks). A tuple has one entry per
    spatial axis (1 to 3); a plain number means two, ``[..., H, W, C]``. No params.

    - ``method="nearest"``: PyTorch's ``mode="nearest"``, output ``i`` copies input
      ``floor(i * in / out)``. Any dtype.
    - ``method="linear"``: linear along each axis (PyTorch's ``"linear"``, ``"bilinear"``,
      ``"trilinear"``): with ``align_corners=False`` (PyTorch's default) the pixels are
      centred at half-integers and the edges clamped; with ``True`` the corner pixels of input
      and output coincide. No antialiasing when shrinking (``jax.image.resize`` would widen the
      kernel). Floating-point inputs.

    Positions map by ``in / out`` also when ``scale_factor`` is given: a factor sets only the
    output size. That is PyTorch's ``recompute_scale_factor=True``; its default maps by
    ``1 / scale_factor``, the same for integer factors but not when ``in * scale_factor`` is
    not an integer.

    Computed as gathers of the source rows along each axis (and a weighted sum of two for
    ``"linear"``), the indices and weights fixed at trace time.
    """
    name = "Upsample"
    if (scale_factor is None) == (size is None):
        raise ValueError(f"{name}: give exactly one of scale_factor and size, got "
                         f"scale_factor={scale_factor!r}, size={size!r}")
    if method not in METHODS:
        raise ValueError(f"{name}: method must be one of {METHODS}, got {method!r}")
    if align_corners and method != "linear":
        raise ValueError(f"{name}: align_corners=True needs method='linear', got {method!r}")
    if size is not None:
        sizes = _per_axis(name, "size", size, (int,))
        n = len(sizes)
    else:
        scales = tuple(float(s) for s in _per_axis(name, "scale_factor", scale_factor,
                                                    (int, float)))
        n = len(scales)
    expected = f"[..., {n} spatial axes, features]"

    def out_sizes(x) -> tuple[int, ...]:
        check_rank(name, x, n + 1, expected)
        if method == "linear":
            check_floating(name, x, expected)
        spatial = x.shape[x.ndim - n - 1:-1]
        if size is not None:
            outs = sizes
        else:
            outs = tuple(math.floor(d * s) for d, s in zip(spatial, scales))
        if not all(spatial) or not all(outs):
            leaves = "" if size is not None else f" that scale_factor={scale_factor!r} leaves"
            raise shape_error(name, f"[..., {n} spatial axes, features] of sizes{leaves} at "
                              f"least 1", x)
        return outs

    def resize(x):
        for k, out in enumerate(out_sizes(x)):
            axis = x.ndim - n - 1 + k
            if method == "nearest":
                x = _along(x, axis, _nearest_indices(x.shape[axis], out))
                continue
            low, high, w_low, w_high = _linear_weights(x.shape[axis], out, align_corners)
            x = (_along(x, axis, low) * _weights(w_low, axis, x)
                 + _along(x, axis, high) * _weights(w_high, axis, x))
        return x

    return parameter_free(name, resize, out_sizes)


def PixelShuffle(factor: int) -> Layer:
    """Moves channels into space (sub-pixel convolution's upsampling), as PyTorch's
    ``nn.PixelShuffle``: ``x: [..., H, W, C * r * r] -> [..., H * r, W * r, C]`` with
    ``r = factor``; input channel ``c * r * r + i * r + j`` goes to output channel ``c`` at
    offset ``(i, j)`` of each ``r x r`` block. No params."""
    name = "PixelShuffle"
    check_positive(name, factor=factor)
    r = factor
    expected = f"[..., H, W, C * {r * r}] (channels divisible by factor ** 2 = {r * r})"

    def check(x):
        check_rank(name, x, 3, expected)
        if x.shape[-1] % (r * r):
            raise shape_error(name, expected, x)

    def shuffle(x):
        *lead, h, w, c = x.shape
        lead = tuple(lead)
        y = x.reshape(lead + (h, w, c // (r * r), r, r))  # [..., H, W, C, i, j]
        y = jnp.moveaxis(y, (-5, -4, -3, -2, -1), (-5, -3, -1, -4, -2))  # [..., H, i, W, j, C]
        return y.reshape(lead + (h * r, w * r, c // (r * r)))

    return parameter_free(name, shuffle, check)


def PixelUnshuffle(factor: int) -> Layer:
    """Moves space into channels, the inverse of :func:`PixelShuffle` (PyTorch's
    ``nn.PixelUnshuffle``): ``x: [..., H * r, W * r, C] -> [..., H, W, C * r * r]`` with
    ``r = factor``; offset ``(i, j)`` of each ``r x r`` block of channel ``c`` goes to channel
    ``c * r * r + i * r + j``. No params."""
    name = "PixelUnshuffle"
    check_positive(name, factor=factor)
    r = factor
    expected = f"[..., H, W, C] (H and W divisible by factor={r})"

    def check(x):
        check_rank(name, x, 3, expected)
        if x.shape[-3] % r or x.shape[-2] % r:
            raise shape_error(name, expected, x)

    def unshuffle(x):
        *lead, h, w, c = x.shape
        lead = tuple(lead)
        y = x.reshape(lead + (h // r, r, w // r, r, c))  # [..., H, i, W, j, C]
        y = jnp.moveaxis(y, (-5, -3, -1, -4, -2), (-5, -4, -3, -2, -1))  # [..., H, W, C, i, j]
        return y.reshape(lead + (h // r, w // r, c * r * r))

    return parameter_free(name, unshuffle, check)
