"""Flatten and Reshape.

Both act on the axes from ``start_axis`` on, which has no default: which axes are batch axes
cannot be told from a shape, and a wrong guess is silently wrong (``Flatten(1)``, PyTorch's
default, flattens the wrong axes of a single image under ``jax.vmap``). A negative
``start_axis`` counts from the end (``Flatten(-3)`` flattens the last three axes of ``[..., H,
W, C]``), which works for any number of leading batch axes, none included; ``start_axis=1``
keeps exactly one leading batch axis, as in PyTorch.
"""

from __future__ import annotations

import math

from fnn.core import Layer, Seq, expect_params, shape_error


def _split_at(name: str, x, start_axis: int, expected: str) -> int:
    if isinstance(x, Seq) or not hasattr(x, "ndim"):  # a Seq's time axis must not be flattened
        raise shape_error(name, expected, x)
    ndim = x.ndim
    start = start_axis + ndim if start_axis < 0 else start_axis
    if not 0 <= start < ndim:  # at least one axis to act on
        raise shape_error(name, expected, x)
    return start


def _check_start(name: str, start_axis) -> None:
    if not isinstance(start_axis, int) or isinstance(start_axis, bool):
        raise TypeError(f"{name}: start_axis must be an int (e.g. -3 for the last three axes of "
                        f"[..., H, W, C]), got {start_axis!r}")


def Flatten(start_axis: int) -> Layer:
    """Flattens the axes from ``start_axis`` on into one.
    ``x: [*lead, *rest] -> [*lead, prod(rest)]`` with ``len(lead) == start_axis`` (or
    ``len(rest) == -start_axis`` for a negative ``start_axis``); ``rest`` has at least one
    axis. Use a negative ``start_axis`` (``Flatten(-3)`` for images) to flatten single examples
    under ``jax.vmap`` correctly."""
    _check_start("Flatten", start_axis)
    expected = (f"at least {start_axis + 1} axes" if start_axis >= 0
                else f"at least {-start_axis} axes")

    def init(key, x):
        _split_at("Flatten", x, start_axis, expected)
        return {}, {}

    def apply(params, state, x, *, key=None, train=False):
        expect_params("Flatten", params, {})
        start = _split_at("Flatten", x, start_axis, expected)
        return x.reshape(x.shape[:start] + (math.prod(x.shape[start:]),)), state

    return Layer(init, apply, "Flatten")


def Reshape(shape: tuple[int, ...], start_axis: int) -> Layer:
    """Reshapes the axes from ``start_axis`` on to ``shape`` (one entry may be ``-1``).
    ``x: [*lead, *rest] -> [*lead, *shape]`` with ``prod(rest) == prod(shape)``; ``start_axis``
    as in :func:`Flatten`."""
    _check_start("Reshape", start_axis)
    shape = tuple(shape)
    if sum(d == -1 for d in shape) > 1 or any(d < -1 or d == 0 for d in shape):
        raise ValueError(f"Reshape: shape may hold positive sizes and at most one -1, "
                         f"got {shape}")
    known = math.prod(d for d in shape if d != -1)

    def target(x):
        relation = "divisible by" if -1 in shape else "=="
        expected = f"[*lead, *rest] with prod(rest) {relation} {known}"
        start = _split_at("Reshape", x, start_axis, expected)
        size = math.prod(x.shape[start:])
        if (size % known) if -1 in shape else (size != known):
            raise shape_error("Reshape", expected, x)
        return x.shape[:start] + tuple(size // known if d == -1 else d for d in shape)

    def init(key, x):
        target(x)
        return {}, {}

    def apply(params, state, x, *, key=None, train=False):
        expect_params("Reshape", params, {})
        shape = target(x)  # checks x first (a Seq has no .reshape)
        return x.reshape(shape), state

    return Layer(init, apply, "Reshape")
