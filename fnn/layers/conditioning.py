"""Conditioning: sinusoidal timestep features and their embedding (diffusion models), and
feature-wise linear modulation of a feature map by a condition vector (FiLM)."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.nn import initializers

from fnn.core import (Children, Initializer, Layer, Seq, ShapeError, align, at_least_float32,
                      check_floating, check_positive, compute_dtype, describe, expect_params,
                      shape_error, where)
from fnn.layers.activations import ACTIVATIONS
from fnn.layers.dense import Dense


def _check_period(name: str, max_period: Any) -> None:
    if not isinstance(max_period, (int, float)) or isinstance(max_period, bool) \
            or not max_period > 0:
        raise ValueError(f"{name}: max_period must be a positive number, got {max_period!r}")


def _check_even(name: str, arg: str, value: Any) -> None:
    check_positive(name, **{arg: value})
    if value % 2:
        raise ValueError(f"{name}: {arg} must be even (half cosines, half sines), got {value}")


def _check_timesteps(name: str, t: Any) -> None:
    if isinstance(t, Seq) or not hasattr(t, "dtype") or not (
            jnp.issubdtype(t.dtype, jnp.integer) or jnp.issubdtype(t.dtype, jnp.floating)):
        raise shape_error(name, "timesteps int[...] or float[...]", t)


def timestep_features(t: Any, features: int, *, max_period: float = 10000.0) -> jax.Array:
    """The sinusoidal features of timesteps (DDPM; the layout of guided-diffusion's
    ``timestep_embedding``): ``t: [...]`` (int or float) ``-> [..., features]``, cosines
    first: ``[cos(t * f_0), ..., cos(t * f_{h-1}), sin(t * f_0), ..., sin(t * f_{h-1})]``
    with ``h = features // 2`` and ``f_i = max_period ** (-i / h)``. ``features`` must be even.
    Computed and returned in at least float32 (float64 for float64 ``t`` in 64-bit mode).

    >>> import jax.numpy as jnp
    >>> timestep_features(jnp.array([0, 1]), 4).tolist()[0]  # cos 0, cos 0, sin 0, sin 0
    [1.0, 1.0, 0.0, 0.0]
    """
    name = "timestep_features"
    _check_even(name, "features", features)
    _check_period(name, max_period)
    _check_timesteps(name, t)
    dt = at_least_float32(t.dtype) if jnp.issubdtype(t.dtype, jnp.floating) else jnp.float32
    half = features // 2
    freqs = jnp.exp(jnp.arange(half, dtype=dt) * jnp.asarray(-math.log(max_period) / half, dt))
    t = jnp.asarray(t).astype(dt)
    angles = t[..., None] * align(freqs, t.ndim + 1)  # [..., half]
    return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


def TimestepEmbedding(features: int, *, hidden_features: int | None = None,
                      frequency_features: int | None = None, activation: str | Layer = "silu",
                      max_period: float = 10000.0,
                      w_init: Initializer = initializers.lecun_normal(),
                      b_init: Initializer = initializers.zeros,
                      param_dtype: Any = jnp.float32, dtype: Any = None) -> Layer:
    """The timestep embedding of a diffusion model: ``timestep_features(t,
    frequency_features) -> Dense(hidden_features) -> activation -> Dense(features)``.

    Shapes: ``t: [...]`` (int or float timesteps) ``-> [..., features]``. Defaults:
    ``hidden_features = features`` and ``frequency_features = features`` (diffusers'
    ``TimestepEmbedding`` with ``in_channels = time_embed_dim``); DDPM's U-Net uses
    ``features = hidden_features = 4 * width`` on ``frequency_features = width``, its base
    width (:func:`fnn.models.UNet` does so). ``frequency_features`` must be even. Params
    ``{"dense1": {"w": [frequency_features, hidden_features], "b"}, "dense2": {"w":
    [hidden_features, features], "b"}}``. Computes in ``dtype`` (default: ``t``'s floating
    dtype, ``param_dtype`` for int timesteps).

    >>> import jax, jax.numpy as jnp
    >>> embed = TimestepEmbedding(8, frequency_features=4)
    >>> params, _ = embed.init(jax.random.key(0), jnp.zeros((2,), jnp.int32))
    >>> jax.tree.map(jnp.shape, params)
    {'dense1': {'b': (8,), 'w': (4, 8)}, 'dense2': {'b': (8,), 'w': (8, 8)}}
    """
    name = "TimestepEmbedding"
    check_positive(name, features=features)
    hidden = features if hidden_features is None else hidden_features
    check_positive(name, hidden_features=hidden)
    frequencies = features if frequency_features is None else frequency_features
    _check_even(name, "frequency_features", frequencies)
    _check_period(name, max_period)
    if not (isinstance(activation, Layer) or activation in ACTIVATIONS):
        raise ValueError(f"{name}: unknown activation {activation!r}; expected one of "
                         f"{sorted(ACTIVATIONS)} or an activation Layer")
    act = activation if isinstance(activation, Layer) else ACTIVATIONS[activation]()
    dense = dict(w_init=w_init, b_init=b_init, param_dtype=param_dtype, dtype=dtype)
    parts = Children(name, dense1=Dense(hidden, **dense), act=act,
                     dense2=Dense(features, **dense))

    def init(key, t):
        _check_timesteps(name, t)
        child = parts.initializer(key)
        spec = jax.ShapeDtypeStruct(t.shape + (frequencies,), compute_dtype(dtype, t,
                                                                             param_dtype))
        child("dense2", child("act", child("dense1", spec)))
        return child.params, {}

    def apply(params, state, t, *, key=None, train=False):
        _check_timesteps(name, t)
        child = parts.runner(params, state, key, train)
        h = timestep_features(t, frequencies, max_period=max_period)
        h = h.astype(compute_dtype(dtype, t, param_dtype))
        return child("dense2", child("act", child("dense1", h))), state

    return Layer(init, apply, name)


def FiLM(*, use_bias: bool = True, w_init: Initializer = initializers.zeros,
         b_init: Initializer = initializers.zeros, param_dtype: Any = jnp.float32,
         dtype: Any = None) -> Layer:
    """Feature-wise linear modulation (Perez et al. 2018): a feature map scaled and shifted per
    channel by a projection of a condition vector.

    Shapes: the input is a tuple ``(x, condition)``, ``x: [..., *spatial, C]`` and
    ``condition: [..., D]`` with the same leading batch axes ``[...]`` (``*spatial`` may be
    empty) ``-> [..., *spatial, C]``: ``x * (1 + scale) + shift``, where ``[scale | shift] =
    condition @ w + b: [..., 2C]`` (scale first) is broadcast over the spatial axes. Params
    ``{"w": [D, 2C], "b": [2C]}`` (``b`` only with ``use_bias``), zeros by default, so FiLM
    starts as the identity on ``x``. Computes in ``dtype`` (default: ``x``'s).

    >>> import jax, jax.numpy as jnp
    >>> film = FiLM()
    >>> x, condition = jnp.ones((2, 4, 4, 3)), jnp.ones((2, 5))
    >>> params, _ = film.init(jax.random.key(0), (x, condition))
    >>> jax.tree.map(jnp.shape, params)
    {'b': (6,), 'w': (5, 6)}
    >>> bool((film.apply(params, {}, (x, condition))[0] == x).all())
    True
    """
    name = "FiLM"
    expected = "(x [..., *spatial, C], condition [..., D]) with the same batch axes [...]"

    def split(inputs):
        """``(x, condition)``, checked."""
        if not isinstance(inputs, (tuple, list)) or len(inputs) != 2:
            raise ShapeError(f"{where(name)}: expected input {expected}, got "
                             f"{describe(inputs)}")
        x, condition = inputs
        given = f"({describe(x)}, {describe(condition)})"
        if (not all(hasattr(a, "ndim") and not isinstance(a, Seq) for a in (x, condition))
                or condition.ndim < 1 or x.ndim < condition.ndim
                or x.shape[:condition.ndim - 1] != condition.shape[:-1]):
            raise ShapeError(f"{where(name)}: expected input {expected}, got {given}")
        check_floating(name, x, expected)
        check_floating(name, condition, expected)
        return x, condition

    def init(key, inputs):
        x, condition = split(inputs)
        channels = x.shape[-1]
        w_key, b_key = jax.random.split(key)
        params = {"w": w_init(w_key, (condition.shape[-1], 2 * channels), param_dtype)}
        if use_bias:
            params["b"] = b_init(b_key, (2 * channels,), param_dtype)
        return params, {}

    def apply(params, state, inputs, *, key=None, train=False):
        x, condition = split(inputs)
        channels = x.shape[-1]
        expect_params(name, params, {"w": ("D", 2 * channels)}
                      | ({"b": (2 * channels,)} if use_bias else {}))
        if condition.shape[-1] != params["w"].shape[0]:
            raise ShapeError(f"{where(name)}: expected condition [..., {params['w'].shape[0]}] "
                             f"(the rows of w), got {describe(condition)}")
        dt = compute_dtype(dtype, x, param_dtype)
        film = jnp.matmul(condition.astype(dt), params["w"].astype(dt))  # [..., 2C]
        if use_bias:
            film = film + align(params["b"].astype(dt), film.ndim)
        # [..., 1 per spatial axis, 2C]
        film = film.reshape(film.shape[:-1] + (1,) * (x.ndim - condition.ndim) + film.shape[-1:])
        scale, shift = film[..., :channels], film[..., channels:]
        return x.astype(dt) * (1 + scale) + shift, state

    return Layer(init, apply, name)
