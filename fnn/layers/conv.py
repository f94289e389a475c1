"""Convolutions over 1, 2 or 3 spatial dimensions, channels-last: Conv, SeparableConv,
ConvTranspose.

Layout: inputs are ``[..., *spatial, in_features]`` (NWC, NHWC or NDHWC, with any number of
leading batch axes, none included), kernels ``[*kernel_size, in_features // groups, features]``
(WIO, HWIO, DHWIO). The number of spatial dimensions is ``len(kernel_size)``.

``padding`` is ``"SAME"`` (output size ``ceil(in / stride)``), ``"VALID"`` (no padding), an
int ``p`` (``p`` on both sides of every spatial axis), or one ``(low, high)`` pair per axis.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.nn import initializers

from fnn.core import (Children, Initializer, Layer, ParamError, align, check_rank,
                      compute_dtype, expect_params, shape_error, where)

Padding = str | int | Sequence[tuple[int, int]]


def _tuple(name: str, arg: str, value: int | Sequence[int], n: int) -> tuple[int, ...]:
    values = (value,) * n if isinstance(value, int) else tuple(value)
    if len(values) != n or not all(isinstance(v, int) and v > 0 for v in values):
        raise ValueError(f"{name}: {arg} must be a positive int or {n} of them, got {value!r}")
    return values


def _padding(name: str, padding: Padding, n: int) -> str | list[tuple[int, int]]:
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID"):
            raise ValueError(f"{name}: padding must be 'SAME', 'VALID', an int or (low, high) "
                             f"pairs, got {padding!r}")
        return padding.upper()
    if isinstance(padding, int):
        return [(padding, padding)] * n
    pairs = [tuple(p) for p in padding]
    if len(pairs) != n or not all(len(p) == 2 for p in pairs):
        raise ValueError(f"{name}: padding needs {n} (low, high) pairs, got {padding!r}")
    return pairs


def _dimension_numbers(n: int) -> lax.ConvDimensionNumbers:
    spatial = tuple(range(1, n + 1))
    # input/output [N, *spatial, C]; kernel [*spatial, I, O]
    return lax.ConvDimensionNumbers(lhs_spec=(0, n + 1) + spatial,
                                    rhs_spec=(n + 1, n) + tuple(range(n)),
                                    out_spec=(0, n + 1) + spatial)


def _size(window: tuple[int, ...]) -> str:
    return "x".join(map(str, window))


def _one_batch_axis(fn, x: jax.Array, n: int) -> jax.Array:
    """Runs ``fn`` on ``x`` reshaped to exactly one batch axis, then restores the leading axes."""
    lead = x.shape[:x.ndim - n - 1]
    y = fn(x.reshape((math.prod(lead),) + x.shape[len(lead):]))
    return y.reshape(lead + y.shape[1:])


def _settings(name: str, features: int, kernel_size, strides, padding, dilation):
    """Validates a convolution's hyper-parameters; returns them as tuples (one entry per axis)."""
    kernel = (kernel_size,) if isinstance(kernel_size, int) else tuple(kernel_size)
    n = len(kernel)
    if not 1 <= n <= 3:
        raise ValueError(f"{name}: kernel_size must have 1, 2 or 3 entries, got {kernel_size!r}")
    _tuple(name, "features", features, 1)
    return (_tuple(name, "kernel_size", kernel, n), _tuple(name, "strides", strides, n),
            _padding(name, padding, n), _tuple(name, "dilation", dilation, n))


def check_nonempty(name: str, x, window: tuple[int, ...], padding, what: str) -> None:
    """Raises unless every spatial axis of ``x: [..., *spatial, C]`` is at least as long as a
    window of ``window`` (the dilated kernel, or the pooling window) needs under ``padding``
    (``"SAME"``, ``"VALID"`` or ``(low, high)`` pairs): a shorter axis gives an empty output."""
    n = len(window)
    pads = [(0, 0)] * n if padding == "VALID" else padding
    if padding == "SAME":
        smallest = (1,) * n
    else:
        smallest = tuple(max(1, w - lo - hi) for w, (lo, hi) in zip(window, pads))
    if any(size < least for size, least in zip(x.shape[-n - 1:-1], smallest)):
        axes = ("L",) if n == 1 else ("H", "W") if n == 2 else ("D", "H", "W")
        sizes = ", ".join(f"{axis} >= {least}" for axis, least in zip(axes, smallest))
        raise shape_error(name, f"[..., {sizes}, features] (the smallest that {what} takes: a "
                          f"smaller input gives an empty output)", x)


def _conv_init(name: str, kernel: tuple[int, ...], features: int, groups: int, use_bias: bool,
               w_init, b_init, param_dtype, check=None):
    """The ``init`` shared by Conv and ConvTranspose: a kernel and an optional bias; ``check``
    (if given) checks the input first."""
    n = len(kernel)

    def init(key, x):
        check_rank(name, x, n + 1, f"[..., {n} spatial axes, in_features]")
        if check is not None:
            check(x)
        in_features = x.shape[-1]
        if in_features % groups:
            raise shape_error(name, f"[..., {n} spatial axes, in_features divisible by "
                              f"feature_group_count={groups}]", x)
        w_key, b_key = jax.random.split(key)
        params = {"w": w_init(w_key, kernel + (in_features // groups, features), param_dtype)}
        if use_bias:
            params["b"] = b_init(b_key, (features,), param_dtype)
        return params, {}

    return init


def _check_call(name: str, params, x, kernel: tuple[int, ...], in_features: int | str,
                features: int, use_bias: bool) -> None:
    """Checks the params against the layer's settings, then the input against the params."""
    expect_params(name, params, {"w": kernel + (in_features, features)}
                 | ({"b": (features,)} if use_bias else {}))
    check_rank(name, x, len(kernel) + 1, f"[..., {len(kernel)} spatial axes, in_features]")


def Conv(features: int, kernel_size: int | Sequence[int], *, strides: int | Sequence[int] = 1,
         padding: Padding = "SAME", dilation: int | Sequence[int] = 1,
         feature_group_count: int = 1, use_bias: bool = True,
         w_init: Initializer = initializers.lecun_normal(),
         b_init: Initializer = initializers.zeros,
         param_dtype: Any = jnp.float32, dtype: Any = None) -> Layer:
    """Convolution (cross-correlation, as in every deep-learning library).

    Shapes: ``x: [..., *spatial, in_features] -> [..., *out_spatial, features]``; params
    ``{"w": [*kernel_size, in_features // feature_group_count, features], "b": [features]}``.
    ``kernel_size`` is an int only for 1-D; give a tuple for 2-D and 3-D (``(3, 3)``).
    ``feature_group_count=in_features`` gives a depthwise convolution. ``w`` starts
    LeCun-normal over its fan-in, ``b`` at zero.
    """
    kernel, strides_, padding_, dilation_ = _settings("Conv", features, kernel_size, strides,
                                                      padding, dilation)
    n = len(kernel)
    groups = _tuple("Conv", "feature_group_count", feature_group_count, 1)[0]
    if features % groups:
        raise ValueError(f"Conv: features ({features}) must be divisible by "
                         f"feature_group_count ({groups})")
    dimension_numbers = _dimension_numbers(n)
    dilated = tuple(d * (k - 1) + 1 for k, d in zip(kernel, dilation_))

    def nonempty(x):
        check_nonempty("Conv", x, dilated, padding_, f"the kernel {_size(kernel)} with padding "
                                                      f"{padding!r}")

    def apply(params, state, x, *, key=None, train=False):
        _check_call("Conv", params, x, kernel, "in_features // groups", features, use_bias)
        nonempty(x)
        w = params["w"]
        if x.shape[-1] != w.shape[-2] * groups:
            raise shape_error("Conv", f"[..., {n} spatial axes, {w.shape[-2] * groups}]", x)
        dt = compute_dtype(dtype, x, param_dtype)

        def conv(xb):
            return lax.conv_general_dilated(
                xb.astype(dt), w.astype(dt), window_strides=strides_, padding=padding_,
                rhs_dilation=dilation_, dimension_numbers=dimension_numbers,
                feature_group_count=groups)

        y = _one_batch_axis(conv, x, n)
        if use_bias:
            y = y + align(params["b"].astype(dt), y.ndim)
        return y, state

    init = _conv_init("Conv", kernel, features, groups, use_bias, w_init, b_init, param_dtype,
                      check=nonempty)
    return Layer(init, apply, "Conv")


def SeparableConv(features: int, kernel_size: int | Sequence[int], *, depth_multiplier: int = 1,
                  strides: int | Sequence[int] = 1, padding: Padding = "SAME",
                  dilation: int | Sequence[int] = 1, use_bias: bool = True,
                  w_init: Initializer = initializers.lecun_normal(),
                  b_init: Initializer = initializers.zeros,
                  param_dtype: Any = jnp.float32, dtype: Any = None) -> Layer:
    """Depthwise-separable convolution (MobileNet, Xception): a depthwise :func:`Conv` (each
    input channel convolved on its own into ``depth_multiplier`` channels, no bias) followed by
    a 1x1 pointwise :func:`Conv` to ``features``.

    Shapes: ``x: [..., *spatial, in_features] -> [..., *out_spatial, features]``, the spatial
    sizes as :func:`Conv`'s with the same ``kernel_size``, ``strides``, ``padding`` and
    ``dilation`` (which apply to the depthwise step). Params ``{"depthwise": {"w":
    [*kernel_size, 1, in_features * depth_multiplier]}, "pointwise": {"w": [1, ..., 1,
    in_features * depth_multiplier, features], "b": [features]}}``; depthwise output channel
    ``c * depth_multiplier + m`` is the ``m``-th of input channel ``c`` (PyTorch's
    ``Conv2d(in, in * depth_multiplier, k, groups=in)`` then ``Conv2d(..., features, 1)``).

    >>> import jax, jax.numpy as jnp
    >>> layer = SeparableConv(8, (3, 3), depth_multiplier=2)
    >>> params, _ = layer.init(jax.random.key(0), jnp.zeros((1, 5, 5, 3)))
    >>> jax.tree.map(jnp.shape, params)
    {'depthwise': {'w': (3, 3, 1, 6)}, 'pointwise': {'b': (8,), 'w': (1, 1, 6, 8)}}
    """
    name = "SeparableConv"
    kernel = _settings(name, features, kernel_size, strides, padding, dilation)[0]
    multiplier = _tuple(name, "depth_multiplier", depth_multiplier, 1)[0]
    n = len(kernel)
    shared = dict(w_init=w_init, param_dtype=param_dtype, dtype=dtype)
    expected = f"[..., {n} spatial axes, in_features]"

    def parts(in_features: int) -> Children:
        mid = in_features * multiplier
        return Children(name, depthwise=Conv(mid, kernel, strides=strides, padding=padding,
                                             dilation=dilation, feature_group_count=in_features,
                                             use_bias=False, **shared),
                        pointwise=Conv(features, (1,) * n, padding="VALID", use_bias=use_bias,
                                       b_init=b_init, **shared))

    def expected_params(mid: int | str) -> dict:
        pointwise = {"w": (1,) * n + (mid, features)} | ({"b": (features,)} if use_bias else {})
        return {"depthwise": {"w": kernel + (1, mid)}, "pointwise": pointwise}

    def init(key, x):
        check_rank(name, x, n + 1, expected)
        child = parts(x.shape[-1]).initializer(key)
        child("pointwise", child("depthwise", x))
        return child.params, {}

    def apply(params, state, x, *, key=None, train=False):
        expect_params(name, params, expected_params("in_features * depth_multiplier"))
        mid = params["depthwise"]["w"].shape[-1]
        expect_params(name, params, expected_params(mid))
        if mid % multiplier:
            raise ParamError(f"{where(name)}: the depthwise kernel's {mid} channels are not "
                             f"in_features * depth_multiplier={multiplier}")
        check_rank(name, x, n + 1, expected)
        if x.shape[-1] != mid // multiplier:
            raise shape_error(name, f"[..., {n} spatial axes, {mid // multiplier}]", x)
        child = parts(x.shape[-1]).runner(params, state, key, train)
        return child("pointwise", child("depthwise", x)), state

    return Layer(init, apply, name)


def _transpose_same_pads(kernel: int, stride: int) -> tuple[int, int]:
    """The padding of the stride-dilated input that gives ``"SAME"``'s ``in * stride`` outputs
    (``kernel`` the dilated kernel), as ``lax.conv_transpose`` pads it."""
    total = kernel + stride - 2
    low = kernel - 1 if stride > kernel - 1 else -(-total // 2)
    return low, total - low


def ConvTranspose(features: int, kernel_size: int | Sequence[int], *,
                  strides: int | Sequence[int] = 1, padding: Padding = "SAME",
                  dilation: int | Sequence[int] = 1, feature_group_count: int = 1,
                  use_bias: bool = True, w_init: Initializer = initializers.lecun_normal(),
                  b_init: Initializer = initializers.zeros,
                  param_dtype: Any = jnp.float32, dtype: Any = None) -> Layer:
    """Transposed convolution: every input position adds ``x[i] * w`` into the output at
    ``i * strides`` (the gradient of :func:`Conv` with respect to its input, as in PyTorch).

    Shapes: ``x: [..., *spatial, in_features] -> [..., *out_spatial, features]``, where
    ``out = in * strides`` for ``"SAME"`` and ``(in - 1) * strides + dilation * (kernel - 1) + 1``
    (the full output) for ``"VALID"``; an int or ``(low, high)`` pairs crop that many positions
    from each side of the full output (PyTorch's ``padding``). Params
    ``{"w": [*kernel_size, in_features // feature_group_count, features], "b": [features]}``.

    ``feature_group_count`` is PyTorch's ``groups``: the input and output channels are cut into
    that many consecutive groups, and each group of outputs is computed from its group of
    inputs alone. The kernel is laid out as :func:`Conv`'s: input channel ``g * in_g + a``
    (``in_g = in_features // groups``) reaches output channel ``g * out_g + b`` through
    ``w[..., a, g * out_g + b]``. (PyTorch's weight is ``[in_features, features // groups,
    *kernel]``; ``fnn.interop.pytorch``'s ``conv_transpose`` family converts it, given
    ``groups``.)
    """
    kernel, strides_, padding_, dilation_ = _settings("ConvTranspose", features, kernel_size,
                                                      strides, padding, dilation)
    n = len(kernel)
    groups = _tuple("ConvTranspose", "feature_group_count", feature_group_count, 1)[0]
    if features % groups:
        raise ValueError(f"ConvTranspose: features ({features}) must be divisible by "
                         f"feature_group_count ({groups})")
    if padding_ == "SAME":
        padding_ = [_transpose_same_pads(d * (k - 1) + 1, s)
                    for k, d, s in zip(kernel, dilation_, strides_)]
    else:
        # lax pads the stride-dilated input: the full output needs (dilated kernel - 1) on each
        # side, and cropping ``p`` from the output is padding ``p`` less.
        crops = [(0, 0)] * n if padding_ == "VALID" else padding_
        padding_ = [(d * (k - 1) - lo, d * (k - 1) - hi)
                    for k, d, (lo, hi) in zip(kernel, dilation_, crops)]
    dimension_numbers = _dimension_numbers(n)
    spatial_axes = tuple(range(n))
    in_text = "in_features" if groups == 1 else "in_features // groups"

    def apply(params, state, x, *, key=None, train=False):
        _check_call("ConvTranspose", params, x, kernel, in_text, features, use_bias)
        w = params["w"]
        if x.shape[-1] != w.shape[-2] * groups:
            raise shape_error("ConvTranspose", f"[..., {n} spatial axes, "
                              f"{w.shape[-2] * groups}]", x)
        dt = compute_dtype(dtype, x, param_dtype)
        # a convolution of the stride-dilated input with the flipped kernel (what
        # lax.conv_transpose computes, here with groups): the scatter form above, the true
        # transpose of Conv
        flipped = jnp.flip(w.astype(dt), axis=spatial_axes)

        def conv_t(xb):
            return lax.conv_general_dilated(
                xb.astype(dt), flipped, window_strides=(1,) * n, padding=padding_,
                lhs_dilation=strides_, rhs_dilation=dilation_,
                dimension_numbers=dimension_numbers, feature_group_count=groups)

        y = _one_batch_axis(conv_t, x, n)
        if use_bias:
            y = y + align(params["b"].astype(dt), y.ndim)
        return y, state

    init = _conv_init("ConvTranspose", kernel, features, groups, use_bias, w_init, b_init,
                      param_dtype)
    return Layer(init, apply, "ConvTranspose")
