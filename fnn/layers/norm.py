"""Normalisation layers: BatchNorm, LayerNorm, GroupNorm, RMSNorm.

Statistics are computed in at least float32 whatever the input dtype; the output has the compute
dtype (``dtype``, default: the input's). Features are on the last axis (channels-last).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from fnn.core import Layer, align, check_floating, check_rank, check_train, shape_error


def _stats_dtype(x) -> Any:
    """float32, or float64 for float64 inputs: statistics never in half precision."""
    return jnp.float64 if x.dtype == jnp.float64 else jnp.float32


def _affine_params(features: int, use_scale: bool, use_bias: bool, param_dtype) -> dict:
    params = {}
    if use_scale:
        params["scale"] = jnp.ones((features,), param_dtype)
    if use_bias:
        params["bias"] = jnp.zeros((features,), param_dtype)
    return params


def _normalize(x, mean, var, params, epsilon: float, dtype) -> jax.Array:
    """``(x - mean) / sqrt(var + eps) * scale + bias``, folded into one multiply-add."""
    ndim = x.ndim
    mean, var = align(mean, ndim), align(var, ndim)
    mul = lax.rsqrt(var + epsilon)
    if "scale" in params:
        mul = mul * align(params["scale"].astype(mul.dtype), ndim)
    shift = -mean * mul
    if "bias" in params:
        shift = shift + align(params["bias"].astype(mul.dtype), ndim)
    y = x.astype(mul.dtype) * mul + shift
    return y.astype(dtype if dtype is not None else x.dtype)


def _check_features(name: str, x, features: int) -> None:
    if jnp.ndim(x) < 1 or x.shape[-1] != features:
        raise shape_error(name, f"[..., {features}]", x)


def BatchNorm(*, momentum: float = 0.99, epsilon: float = 1e-5, axis_name: str | None = None,
              use_scale: bool = True, use_bias: bool = True, param_dtype: Any = jnp.float32,
              dtype: Any = None) -> Layer:
    """Batch normalisation over every axis but the last.

    Shapes: ``x: [..., features] -> [..., features]``; params ``{"scale", "bias"}`` and state
    ``{"mean", "var"}``, each ``[features]``.

    ``train=True`` normalises with the batch's statistics and returns running statistics updated
    as ``new = momentum * old + (1 - momentum) * batch`` (the biased batch variance);
    ``train=False`` normalises with the running statistics and leaves them unchanged. With
    ``axis_name``, training statistics are averaged over that mapped axis (``jax.pmap``,
    ``shard_map``), so every device normalises with the statistics of the global batch.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"BatchNorm: momentum must be in [0, 1], got {momentum!r}")

    def init(key, x):
        check_rank("BatchNorm", x, 1, "[..., features]")
        check_floating("BatchNorm", x, "[..., features]")
        features = x.shape[-1]
        state = {"mean": jnp.zeros((features,), jnp.float32),
                 "var": jnp.ones((features,), jnp.float32)}
        return _affine_params(features, use_scale, use_bias, param_dtype), state

    def apply(params, state, x, *, key=None, train=False):
        check_train(train)
        _check_features("BatchNorm", x, state["mean"].shape[0])
        if not train:
            return _normalize(x, state["mean"], state["var"], params, epsilon, dtype), state
        axes = tuple(range(x.ndim - 1))
        xf = x.astype(_stats_dtype(x))
        mean = jnp.mean(xf, axes)
        if axis_name is not None:
            mean = lax.pmean(mean, axis_name)
        var = jnp.mean(jnp.square(xf - align(mean, x.ndim)), axes)
        if axis_name is not None:
            var = lax.pmean(var, axis_name)
        new_state = {
            "mean": momentum * state["mean"] + (1.0 - momentum) * mean.astype(jnp.float32),
            "var": momentum * state["var"] + (1.0 - momentum) * var.astype(jnp.float32),
        }
        return _normalize(x, mean, var, params, epsilon, dtype), new_state

    return Layer(init, apply, "BatchNorm")


def LayerNorm(*, epsilon: float = 1e-5, use_scale: bool = True, use_bias: bool = True,
              param_dtype: Any = jnp.float32, dtype: Any = None) -> Layer:
    """Normalises each example over its last axis. ``x: [..., features] -> [..., features]``;
    params ``{"scale", "bias"}``, each ``[features]``."""

    def init(key, x):
        check_rank("LayerNorm", x, 1, "[..., features]")
        return _affine_params(x.shape[-1], use_scale, use_bias, param_dtype), {}

    def apply(params, state, x, *, key=None, train=False):
        check_floating("LayerNorm", x, "[..., features]")
        if params:
            _check_features("LayerNorm", x, next(iter(params.values())).shape[0])
        xf = x.astype(_stats_dtype(x))
        mean = jnp.mean(xf, -1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), -1, keepdims=True)
        return _normalize(x, mean, var, params, epsilon, dtype), state

    return Layer(init, apply, "LayerNorm")


def RMSNorm(*, epsilon: float = 1e-6, use_scale: bool = True, param_dtype: Any = jnp.float32,
            dtype: Any = None) -> Layer:
    """``x / sqrt(mean(x**2) + eps) * scale`` over the last axis.
    ``x: [..., features] -> [..., features]``; params ``{"scale": [features]}``."""

    def init(key, x):
        check_rank("RMSNorm", x, 1, "[..., features]")
        return _affine_params(x.shape[-1], use_scale, False, param_dtype), {}

    def apply(params, state, x, *, key=None, train=False):
        check_floating("RMSNorm", x, "[..., features]")
        if params:
            _check_features("RMSNorm", x, params["scale"].shape[0])
        xf = x.astype(_stats_dtype(x))
        mean_square = jnp.mean(jnp.square(xf), -1, keepdims=True)
        return _normalize(x, jnp.zeros((1,), xf.dtype), mean_square, params, epsilon, dtype), state

    return Layer(init, apply, "RMSNorm")


def GroupNorm(num_groups: int = 32, *, start_axis: int = 1, epsilon: float = 1e-5,
              use_scale: bool = True, use_bias: bool = True, param_dtype: Any = jnp.float32,
              dtype: Any = None) -> Layer:
    """Splits the channels into ``num_groups`` groups of consecutive channels and normalises each
    group over the spatial axes and its channels, per example.

    Shapes: ``x: [*lead, *spatial, features] -> same``, where the spatial axes run from
    ``start_axis`` to the last but one (a negative ``start_axis`` counts from the end:
    ``GroupNorm(8, start_axis=-3)`` for ``[..., H, W, C]``, which also works under ``jax.vmap``).
    ``features`` must be divisible by ``num_groups``. Params ``{"scale", "bias"}``, each
    ``[features]``.
    """
    if not isinstance(num_groups, int) or num_groups <= 0:
        raise ValueError(f"GroupNorm: num_groups must be a positive integer, got {num_groups!r}")

    def check(x):
        check_rank("GroupNorm", x, 1, "[..., features]")
        start = start_axis + x.ndim if start_axis < 0 else start_axis
        if not 0 <= start <= x.ndim - 1 or x.shape[-1] % num_groups:
            raise shape_error("GroupNorm", f"[*lead, *spatial, features] with the spatial axes "
                              f"from axis {start_axis} and features divisible by "
                              f"num_groups={num_groups}", x)
        return start

    def init(key, x):
        check(x)
        return _affine_params(x.shape[-1], use_scale, use_bias, param_dtype), {}

    def apply(params, state, x, *, key=None, train=False):
        check_floating("GroupNorm", x, "[..., features]")
        start = check(x)
        if params:
            _check_features("GroupNorm", x, next(iter(params.values())).shape[0])
        channels = x.shape[-1]
        # [*lead, *spatial, groups, channels // groups]
        xg = x.astype(_stats_dtype(x)).reshape(x.shape[:-1] + (num_groups, channels // num_groups))
        axes = tuple(range(start, x.ndim - 1)) + (x.ndim,)
        mean = jnp.mean(xg, axes, keepdims=True)
        var = jnp.mean(jnp.square(xg - mean), axes, keepdims=True)
        # per-channel statistics [*lead, 1..., channels] so that scale and bias apply per channel
        mean = jnp.broadcast_to(mean, mean.shape[:-1] + (channels // num_groups,))
        var = jnp.broadcast_to(var, var.shape[:-1] + (channels // num_groups,))
        flat = mean.shape[:-2] + (channels,)
        return _normalize(x, mean.reshape(flat), var.reshape(flat), params, epsilon, dtype), state

    return Layer(init, apply, "GroupNorm")


