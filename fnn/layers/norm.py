"""Normalisation layers: BatchNorm, LayerNorm, GroupNorm, InstanceNorm, RMSNorm.

Statistics are computed in at least float32 whatever the input dtype; the output has the compute
dtype (``dtype``, default: the input's). Features are on the last axis (channels-last). Params
are ``{"scale": [features], "b": [features]}`` (``use_scale``, ``use_bias``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from fnn.core import (Layer, Seq, UnboundAxisError, align, at_least_float32, check_floating,
                      check_rank, check_train, compute_dtype, current_batch_axis, expect_params,
                      per_position, seq_lengths, shape_error, valid_positions, where)


def _affine_params(features: int, use_scale: bool, use_bias: bool, param_dtype) -> dict:
    params = {}
    if use_scale:
        params["scale"] = jnp.ones((features,), param_dtype)
    if use_bias:
        params["b"] = jnp.zeros((features,), param_dtype)
    return params


def _expected(features: int | str, use_scale: bool, use_bias: bool) -> dict:
    return (({"scale": (features,)} if use_scale else {})
            | ({"b": (features,)} if use_bias else {}))


def _normalize(x, mean, var, params, epsilon: float, dtype) -> jax.Array:
    """``(x - mean) / sqrt(var + eps) * scale + b``, folded into one multiply-add."""
    ndim = x.ndim
    mean, var = align(mean, ndim), align(var, ndim)
    mul = lax.rsqrt(var + epsilon)
    if "scale" in params:
        mul = mul * align(params["scale"].astype(mul.dtype), ndim)
    shift = -mean * mul
    if "b" in params:
        shift = shift + align(params["b"].astype(mul.dtype), ndim)
    y = x.astype(mul.dtype) * mul + shift
    return y.astype(compute_dtype(dtype, x, x.dtype))


def _check_features(name: str, x, features: int) -> None:
    if jnp.ndim(x) < 1 or x.shape[-1] != features:
        raise shape_error(name, f"[..., {features}]", x)


def _batch_moments(x: jax.Array, valid: jax.Array | None, axis_name: str | None):
    """The mean and biased variance of ``x`` over every axis but the last, in at least float32,
    over the positions where ``valid`` (``[..., time, 1]``) holds, averaged over ``axis_name``."""
    axes = tuple(range(x.ndim - 1))
    xf = x.astype(at_least_float32(x.dtype))
    if valid is None:
        mean = jnp.mean(xf, axes)
        if axis_name is not None:
            mean = lax.pmean(mean, axis_name)
        var = jnp.mean(jnp.square(xf - align(mean, x.ndim)), axes)
        return mean, (var if axis_name is None else lax.pmean(var, axis_name))
    # jnp.where, not a multiplication by 0/1: padded positions may hold anything (inf * 0 is nan)
    zero = jnp.zeros((), xf.dtype)
    count = jnp.sum(jnp.broadcast_to(valid.astype(xf.dtype), x.shape[:-1] + (1,)), axes)
    if axis_name is not None:
        count = lax.psum(count, axis_name)
    count = jnp.maximum(count, 1.0)
    total = jnp.sum(jnp.where(valid, xf, zero), axes)
    mean = (total if axis_name is None else lax.psum(total, axis_name)) / count
    squares = jnp.sum(jnp.where(valid, jnp.square(xf - align(mean, x.ndim)), zero), axes)
    var = (squares if axis_name is None else lax.psum(squares, axis_name)) / count
    return mean, var


def _axis(name: str, axis_name: str | None) -> str | None:
    """The mapped axis to average statistics over: the layer's own, else the batch axis of
    fnn's data-parallel step (:func:`fnn.core.batch_axis`); checked to be bound."""
    axis = current_batch_axis() if axis_name is None else axis_name
    if axis is not None:
        try:
            lax.axis_index(axis)
        except NameError as e:
            raise UnboundAxisError(
                f"{where(name)}: averages its batch statistics over the mapped axis {axis!r}, "
                f"which is not bound here: call the model inside the jax.pmap or shard_map over "
                f"{axis!r} it was written for, or build it without axis_name (fnn.train's data "
                f"parallel modes then give every device the whole batch's statistics)") from e
    return axis


def BatchNorm(*, momentum: float = 0.99, epsilon: float = 1e-5, axis_name: str | None = None,
              use_scale: bool = True, use_bias: bool = True, param_dtype: Any = jnp.float32,
              dtype: Any = None) -> Layer:
    """Batch normalisation over every axis but the last.

    Shapes: ``x: [..., features] -> [..., features]``; params ``{"scale", "b"}`` and state
    ``{"mean", "var"}``, each ``[features]``.

    ``train=True`` normalises with the batch's statistics and returns running statistics updated
    as ``new = momentum * old + (1 - momentum) * batch`` (the biased batch variance);
    ``train=False`` normalises with the running statistics and leaves them unchanged. With
    ``axis_name``, training statistics are averaged over that mapped axis (``jax.pmap``,
    ``shard_map``), so every device normalises with the statistics of the global batch; called
    where that axis is not bound it raises :class:`~fnn.core.UnboundAxisError`. Without one,
    fnn's own data-parallel step (``mode="pmap"``) averages over its device axis all the same,
    so the same model gives the same statistics on one device and on several.
    Given a ``Seq`` with ``lengths`` (``x: [..., time, features]``), the statistics leave the
    padded positions out; the ``Seq`` is passed on.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"BatchNorm: momentum must be in [0, 1], got {momentum!r}")
    name = "BatchNorm"

    def init(key, x):
        x = x.x if isinstance(x, Seq) else x
        check_rank(name, x, 1, "[..., features]")
        check_floating(name, x, "[..., features]")
        features = x.shape[-1]
        state = {"mean": jnp.zeros((features,), jnp.float32),
                 "var": jnp.ones((features,), jnp.float32)}
        return _affine_params(features, use_scale, use_bias, param_dtype), state

    def apply(params, state, x, *, key=None, train=False):
        check_train(train)
        expect_params(name, state, {"mean": ("features",), "var": ("features",)}, "state")
        features = state["mean"].shape[0]
        expect_params(name, state, {"mean": (features,), "var": (features,)}, "state")
        expect_params(name, params, _expected(features, use_scale, use_bias))
        seq, x = (x, x.x) if isinstance(x, Seq) else (None, x)
        _check_features(name, x, features)
        if not train:
            y, new_state = _normalize(x, state["mean"], state["var"], params, epsilon, dtype), state
        else:
            lengths = seq_lengths(name, seq)
            valid = None if lengths is None else valid_positions(lengths, x.shape[-2])[..., None]
            mean, var = _batch_moments(x, valid, _axis(name, axis_name))
            new_state = {
                "mean": momentum * state["mean"] + (1.0 - momentum) * mean.astype(jnp.float32),
                "var": momentum * state["var"] + (1.0 - momentum) * var.astype(jnp.float32),
            }
            y = _normalize(x, mean, var, params, epsilon, dtype)
        return (y if seq is None else seq.with_x(y)), new_state

    return Layer(init, apply, name)


def _feature_norm(name: str, moments, epsilon: float, use_scale: bool, use_bias: bool,
                  param_dtype, dtype) -> Layer:
    """A position-wise norm over the last axis: ``moments(xf) -> (mean, var)``, each
    ``[..., 1]`` (``xf``: the input in at least float32), then :func:`_normalize`."""

    def init(key, x):
        check_rank(name, x, 1, "[..., features]")
        return _affine_params(x.shape[-1], use_scale, use_bias, param_dtype), {}

    def apply(params, state, x, *, key=None, train=False):
        check_rank(name, x, 1, "[..., features]")
        check_floating(name, x, "[..., features]")
        expect_params(name, params, _expected(x.shape[-1], use_scale, use_bias))
        mean, var = moments(x.astype(at_least_float32(x.dtype)))
        return _normalize(x, mean, var, params, epsilon, dtype), state

    return per_position(Layer(init, apply, name))


def LayerNorm(*, epsilon: float = 1e-5, use_scale: bool = True, use_bias: bool = True,
              param_dtype: Any = jnp.float32, dtype: Any = None) -> Layer:
    """Normalises each example over its last axis. ``x: [..., features] -> [..., features]``;
    params ``{"scale", "b"}``, each ``[features]``. Position-wise: a ``Seq`` passes through."""

    def moments(xf):
        mean = jnp.mean(xf, -1, keepdims=True)
        return mean, jnp.mean(jnp.square(xf - mean), -1, keepdims=True)

    return _feature_norm("LayerNorm", moments, epsilon, use_scale, use_bias, param_dtype, dtype)


def RMSNorm(*, epsilon: float = 1e-6, use_scale: bool = True, param_dtype: Any = jnp.float32,
            dtype: Any = None) -> Layer:
    """``x / sqrt(mean(x**2) + eps) * scale`` over the last axis.
    ``x: [..., features] -> [..., features]``; params ``{"scale": [features]}``. Position-wise:
    a ``Seq`` passes through."""

    def moments(xf):
        mean_square = jnp.mean(jnp.square(xf), -1, keepdims=True)
        return jnp.zeros((1,), xf.dtype), mean_square

    return _feature_norm("RMSNorm", moments, epsilon, use_scale, False, param_dtype, dtype)


def GroupNorm(num_groups: int = 32, *, start_axis: int, epsilon: float = 1e-5,
              use_scale: bool = True, use_bias: bool = True, param_dtype: Any = jnp.float32,
              dtype: Any = None) -> Layer:
    """Splits the channels into ``num_groups`` groups of consecutive channels and normalises each
    group over the spatial axes and its channels, per example.

    Shapes: ``x: [*lead, *spatial, features] -> same``, where the spatial axes run from
    ``start_axis`` to the last but one (a negative ``start_axis`` counts from the end:
    ``GroupNorm(8, start_axis=-3)`` for ``[..., H, W, C]``, which also works under ``jax.vmap``;
    no default, as for :func:`~fnn.layers.reshape.Flatten`).
    ``features`` must be divisible by ``num_groups``. Params ``{"scale", "b"}``, each
    ``[features]``.
    """
    if not isinstance(num_groups, int) or num_groups <= 0:
        raise ValueError(f"GroupNorm: num_groups must be a positive integer, got {num_groups!r}")
    name = "GroupNorm"

    def check(x):
        check_rank(name, x, 1, "[..., features]")
        start = start_axis + x.ndim if start_axis < 0 else start_axis
        if not 0 <= start <= x.ndim - 1 or x.shape[-1] % num_groups:
            raise shape_error(name, f"[*lead, *spatial, features] with the spatial axes "
                              f"from axis {start_axis} and features divisible by "
                              f"num_groups={num_groups}", x)
        return start

    def init(key, x):
        check(x)
        return _affine_params(x.shape[-1], use_scale, use_bias, param_dtype), {}

    def apply(params, state, x, *, key=None, train=False):
        start = check(x)
        check_floating(name, x, "[..., features]")
        channels = x.shape[-1]
        expect_params(name, params, _expected(channels, use_scale, use_bias))
        # [*lead, *spatial, groups, channels // groups]
        xg = x.astype(at_least_float32(x.dtype)).reshape(
            x.shape[:-1] + (num_groups, channels // num_groups))
        axes = tuple(range(start, x.ndim - 1)) + (x.ndim,)
        mean = jnp.mean(xg, axes, keepdims=True)
        var = jnp.mean(jnp.square(xg - mean), axes, keepdims=True)
        # per-channel statistics [*lead, 1..., channels] so that scale and bias apply per channel
        mean = jnp.broadcast_to(mean, mean.shape[:-1] + (channels // num_groups,))
        var = jnp.broadcast_to(var, var.shape[:-1] + (channels // num_groups,))
        flat = mean.shape[:-2] + (channels,)
        return _normalize(x, mean.reshape(flat), var.reshape(flat), params, epsilon, dtype), state

    return Layer(init, apply, name)


def InstanceNorm(*, start_axis: int, epsilon: float = 1e-5, use_scale: bool = True,
                 use_bias: bool = True, param_dtype: Any = jnp.float32,
                 dtype: Any = None) -> Layer:
    """Normalises each example's channels one by one over the spatial axes (PyTorch's
    ``nn.InstanceNorm1d/2d/3d(affine=True)`` without running statistics, biased variance).

    Shapes: ``x: [*lead, *spatial, features] -> same``, where the spatial axes (at least one)
    run from ``start_axis`` to the last but one; a negative ``start_axis`` counts from the end:
    ``-3`` for images ``[..., H, W, C]`` (any batch axes, ``jax.vmap`` too), ``-2`` for signals
    ``[..., L, C]``. No default, as for :func:`GroupNorm`: on ``[N, L, C]`` a default of ``-3``
    would normalise over the batch without a word. Params ``{"scale", "b"}``, each
    ``[features]``. The same as ``GroupNorm(features, start_axis=start_axis)``.
    """
    name = "InstanceNorm"
    if not isinstance(start_axis, int) or isinstance(start_axis, bool):
        raise TypeError(f"{name}: start_axis must be an int (-3 for [..., H, W, C]), got "
                        f"{start_axis!r}")
    expected = (f"[*lead, *spatial, features] with the spatial axes from axis {start_axis}"
                if start_axis >= 0 else f"[..., {-start_axis - 1} spatial axes, features]")

    def check(x):
        check_rank(name, x, 2, expected)
        start = start_axis + x.ndim if start_axis < 0 else start_axis
        if not 0 <= start < x.ndim - 1:
            raise shape_error(name, expected, x)
        return start

    def init(key, x):
        check(x)
        return _affine_params(x.shape[-1], use_scale, use_bias, param_dtype), {}

    def apply(params, state, x, *, key=None, train=False):
        axes = tuple(range(check(x), x.ndim - 1))
        check_floating(name, x, expected)
        expect_params(name, params, _expected(x.shape[-1], use_scale, use_bias))
        xf = x.astype(at_least_float32(x.dtype))
        mean = jnp.mean(xf, axes, keepdims=True)  # [*lead, 1, ..., features]
        var = jnp.mean(jnp.square(xf - mean), axes, keepdims=True)
        return _normalize(x, mean, var, params, epsilon, dtype), state

    return Layer(init, apply, name)
