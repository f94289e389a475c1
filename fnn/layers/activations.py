"""Activation functions as layers: ``serial(Dense(64), Relu(), Dense(10))``. All but
:func:`PReLU` (a learned slope) are parameter-free.

All are position-wise: a :class:`~fnn.core.Seq` passes through with its array replaced.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from fnn.core import (Layer, align, check_floating, check_rank, compute_dtype, expect_params,
                      parameter_free, per_position, shape_error, where)


def Lambda(fn: Callable[[jax.Array], jax.Array], name: str = "Lambda") -> Layer:
    """A parameter-free layer that applies ``fn`` to its input: ``x -> fn(x)``, shapes as ``fn``
    gives them. Given a ``Seq``, ``fn`` gets its array and the result keeps the side inputs."""

    return per_position(parameter_free(name, fn))


def _elementwise(name: str, fn: Callable[[jax.Array], jax.Array]) -> Layer:
    def checked(x):
        if not hasattr(x, "dtype"):
            raise TypeError(f"{where(name)}: expected an array, got {type(x).__name__}")
        return fn(x)
    return Lambda(checked, name)


def Identity() -> Layer:
    """Returns its input unchanged. ``x: [...] -> [...]``."""
    return Lambda(lambda x: x, "Identity")


def Relu() -> Layer:
    """``max(x, 0)``, elementwise. ``x: [...] -> [...]``."""
    return _elementwise("Relu", jax.nn.relu)


def Relu6() -> Layer:
    """``min(max(x, 0), 6)``, elementwise. ``x: [...] -> [...]``."""
    return _elementwise("Relu6", jax.nn.relu6)


def LeakyRelu(negative_slope: float = 0.01) -> Layer:
    """``x if x >= 0 else negative_slope * x``, elementwise. ``x: [...] -> [...]``."""
    return _elementwise("LeakyRelu", lambda x: jax.nn.leaky_relu(x, negative_slope))


def Elu(alpha: float = 1.0) -> Layer:
    """``x if x > 0 else alpha * (exp(x) - 1)``, elementwise. ``x: [...] -> [...]``."""
    return _elementwise("Elu", lambda x: jax.nn.elu(x, alpha))


def Celu(alpha: float = 1.0) -> Layer:
    """Continuously differentiable ELU, elementwise. ``x: [...] -> [...]``."""
    return _elementwise("Celu", lambda x: jax.nn.celu(x, alpha))


def Selu() -> Layer:
    """Scaled ELU (self-normalising networks), elementwise. ``x: [...] -> [...]``."""
    return _elementwise("Selu", jax.nn.selu)


def Gelu(approximate: bool = False) -> Layer:
    """Gaussian error linear unit, elementwise; exact (erf) unless ``approximate`` (tanh).
    ``x: [...] -> [...]``."""
    return _elementwise("Gelu", lambda x: jax.nn.gelu(x, approximate=approximate))


def Silu() -> Layer:
    """``x * sigmoid(x)`` (also called swish), elementwise. ``x: [...] -> [...]``."""
    return _elementwise("Silu", jax.nn.silu)


def Mish() -> Layer:
    """``x * tanh(softplus(x))``, elementwise. ``x: [...] -> [...]``."""
    return _elementwise("Mish", jax.nn.mish)


def Tanh() -> Layer:
    """Hyperbolic tangent, elementwise. ``x: [...] -> [...]``."""
    return _elementwise("Tanh", jnp.tanh)


def HardTanh() -> Layer:
    """``clip(x, -1, 1)``, elementwise. ``x: [...] -> [...]``."""
    return _elementwise("HardTanh", jax.nn.hard_tanh)


def Sigmoid() -> Layer:
    """``1 / (1 + exp(-x))``, elementwise. ``x: [...] -> [...]``."""
    return _elementwise("Sigmoid", jax.nn.sigmoid)


def Softplus() -> Layer:
    """``log(1 + exp(x))``, elementwise. ``x: [...] -> [...]``."""
    return _elementwise("Softplus", jax.nn.softplus)


def PReLU(*, per_channel: bool = False, init: float = 0.25, param_dtype: Any = jnp.float32,
          dtype: Any = None) -> Layer:
    """``x if x > 0 else slope * x`` with a learned ``slope``, elementwise (PyTorch's
    ``nn.PReLU``). ``x: [...] -> [...]``; params ``{"slope": []}``, one slope for every
    element (``nn.PReLU()``), or with ``per_channel`` ``{"slope": [C]}``, one per channel of
    the last axis (``nn.PReLU(num_parameters=C)``, whose channels are on axis 1 of NCHW).
    Each slope starts at ``init``. Position-wise: a ``Seq`` passes through."""
    name = "PReLU"

    def check(x, channels: int | str) -> None:
        expected = f"[..., {channels}]" if per_channel else "[...]"
        if not per_channel and not hasattr(x, "dtype"):
            raise TypeError(f"{where(name)}: expected an array, got {type(x).__name__}")
        if per_channel:
            check_rank(name, x, 1, expected)
            if isinstance(channels, int) and x.shape[-1] != channels:
                raise shape_error(name, expected, x)
        check_floating(name, x, expected)

    def init_params(key, x):
        check(x, "channels")
        return {"slope": jnp.full(x.shape[-1:] if per_channel else (), init, param_dtype)}, {}

    def apply(params, state, x, *, key=None, train=False):
        expect_params(name, params, {"slope": ("channels",) if per_channel else ()})
        check(x, params["slope"].shape[0] if per_channel else "channels")
        dt = compute_dtype(dtype, x, param_dtype)
        x = x.astype(dt)
        slope = align(params["slope"].astype(dt), x.ndim)
        # x > 0, not >=: at 0 the gradient is the slope's, as in PyTorch
        return jnp.where(x > 0, x, slope * x), state

    return per_position(Layer(init_params, apply, name))


def _along_axis(name: str, fn: Callable[..., jax.Array], axis: int) -> Layer:
    def along(x):
        check_rank(name, x, 1, "[..., features]")
        return fn(x, axis=axis)
    return Lambda(along, name)


def Softmax(axis: int = -1) -> Layer:
    """``exp(x) / sum(exp(x))`` along ``axis``. ``x: [...] -> [...]``."""
    return _along_axis("Softmax", jax.nn.softmax, axis)


def LogSoftmax(axis: int = -1) -> Layer:
    """``x - logsumexp(x)`` along ``axis``. ``x: [...] -> [...]``."""
    return _along_axis("LogSoftmax", jax.nn.log_softmax, axis)


def _gelu_tanh() -> Layer:
    """``Gelu(approximate=True)``, the tanh approximation, elementwise. ``x: [...] -> [...]``."""
    return Gelu(approximate=True)


# Activation layers by name, for models and configs that take ``activation="gelu"``: "gelu" is
# the exact (erf) GELU, "gelu_tanh" the tanh approximation (GPT-2, jax.nn.gelu's default).
ACTIVATIONS: dict[str, Callable[[], Layer]] = {
    "identity": Identity, "relu": Relu, "relu6": Relu6, "leaky_relu": LeakyRelu, "elu": Elu,
    "celu": Celu, "selu": Selu, "gelu": Gelu, "gelu_tanh": _gelu_tanh, "silu": Silu,
    "mish": Mish, "tanh": Tanh, "hard_tanh": HardTanh, "sigmoid": Sigmoid, "softplus": Softplus,
}


def activation(name: str) -> Layer:
    """The activation layer called ``name`` (e.g. ``"relu"``), with default settings."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


