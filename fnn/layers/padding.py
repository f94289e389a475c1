"""Padding of the spatial axes of channels-last inputs ``[..., *spatial, C]``."""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp

from fnn.core import Layer, check_rank, parameter_free, shape_error

# fnn's mode -> jnp.pad's; the names are PyTorch's (Conv's padding_mode)
MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}


def _pairs(name: str, padding) -> list[tuple[int, int]]:
    """``padding`` as one ``(low, high)`` pair per spatial axis: an int pads two axes on both
    sides."""
    def count(v):
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    if count(padding):
        return [(padding, padding)] * 2
    pairs = ([tuple(p) if isinstance(p, (tuple, list)) else p for p in padding]
             if isinstance(padding, (tuple, list)) else [])
    if not (1 <= len(pairs) <= 3 and all(isinstance(p, tuple) and len(p) == 2
                                         and count(p[0]) and count(p[1]) for p in pairs)):
        raise ValueError(f"{name}: padding must be an int >= 0 (two spatial axes, both sides) "
                         f"or 1-3 (low, high) pairs of ints >= 0, one per spatial axis, got "
                         f"{padding!r}")
    return pairs


def Pad(padding: int | Sequence[tuple[int, int]], *, mode: str = "zeros",
        value: float = 0.0) -> Layer:
    """Pads the spatial axes. ``x: [..., *spatial, C] -> [..., *padded, C]`` with
    ``padded = low + spatial + high`` on each axis; the channel axis and the leading batch axes
    are left alone. No params.

    ``padding`` is an int (that many positions on both sides of two spatial axes,
    ``[..., H, W, C]``) or ``(low, high)`` pairs, one per spatial axis (1 to 3; the number of
    pairs is the number of spatial axes before the channel axis). ``mode`` is one of
    PyTorch's Conv ``padding_mode`` names, and the results are PyTorch's ``F.pad``:

    - ``"zeros"``: the constant ``value`` (``nn.ZeroPad2d``, ``nn.ConstantPad1d/2d/3d``);
    - ``"reflect"``: mirrored without repeating the edge (``nn.ReflectionPad1d/2d/3d``); the
      padding must be smaller than the axis;
    - ``"replicate"``: the edge repeated (``nn.ReplicationPad1d/2d/3d``);
    - ``"circular"``: wrapped around (``nn.CircularPad1d/2d/3d``); unlike PyTorch, padding
      longer than the axis wraps around again.
    """
    name = "Pad"
    if mode not in MODES:
        raise ValueError(f"{name}: mode must be one of {tuple(MODES)}, got {mode!r}")
    if mode != "zeros" and value != 0.0:
        raise ValueError(f"{name}: value is the constant of mode='zeros', got value={value!r} "
                         f"with mode={mode!r}")
    pairs = _pairs(name, padding)
    n = len(pairs)
    expected = f"[..., {n} spatial axes, features]"

    def check(x):
        check_rank(name, x, n + 1, expected)
        spatial = x.shape[x.ndim - n - 1:-1]
        if mode == "reflect" and any(max(p) >= size for p, size in zip(pairs, spatial)):
            smallest = ", ".join(f"{max(p) + 1}" for p in pairs)
            raise shape_error(name, f"[..., {n} spatial axes, features] of sizes at least "
                              f"({smallest}): reflect padding must be smaller than the axis "
                              f"it pads (padding {padding!r})", x)
        if mode in ("replicate", "circular") and any(
                size == 0 and max(p) > 0 for p, size in zip(pairs, spatial)):
            raise shape_error(name, f"[..., {n} nonempty spatial axes, features] ({mode} "
                              f"padding repeats what the axis holds)", x)

    def pad(x):
        widths = [(0, 0)] * (x.ndim - n - 1) + pairs + [(0, 0)]
        if mode == "zeros":
            return jnp.pad(x, widths, constant_values=jnp.asarray(value, x.dtype))
        return jnp.pad(x, widths, mode=MODES[mode])

    return parameter_free(name, pad, check)
