"""Weight reparametrisations: a wrapped layer applied with a transformed weight.

Both wrap a layer whose params hold a weight ``"w"`` with its output features on the last axis:
:func:`~fnn.layers.dense.Dense` (``[in, out]``), :func:`~fnn.layers.conv.Conv` and
:func:`~fnn.layers.conv.ConvTranspose` (``[*kernel, in, out]``). Where PyTorch reshapes its
``[out, in, *kernel]`` weight to a matrix ``[out, in * prod(kernel)]`` (``dim=0``), fnn reads
``w`` as the matrix ``[prod(kernel) * in, out]`` (its own axis order): the same matrix up to
transposition and the order of its rows.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from fnn.core import (Layer, ParamError, at_least_float32, check_positive, check_train,
                      describe, expect_params, put, where)

_UV_STREAM = 0x53704e6d  # fold_in constant: the keys of SpectralNorm's u and v


def _weight(name: str, params: Any, entry: str = "w") -> jax.Array:
    """The wrapped layer's weight ``params[entry]``, checked to have at least 2 axes."""
    w = params.get(entry) if isinstance(params, Mapping) else None
    if not hasattr(w, "ndim") or w.ndim < 2:
        given = ("{" + ", ".join(f"{k}: {describe(v)}" for k, v in params.items()) + "}"
                 if isinstance(params, Mapping) else type(params).__name__)
        raise ParamError(f"{where(name)}: expected params with a weight {entry!r} [..., out] of "
                         f"at least 2 axes (a Dense, Conv or ConvTranspose), got {given}")
    return w


def _normalize(v: jax.Array, epsilon: float) -> jax.Array:
    """``v / max(||v||, epsilon)``, as ``torch.nn.functional.normalize``."""
    return v / jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(v))), epsilon)


def SpectralNorm(layer: Layer, *, num_iterations: int = 1, epsilon: float = 1e-12) -> Layer:
    """``layer`` applied with its weight divided by its largest singular value (Miyato et al.
    2018), estimated by power iteration as ``torch.nn.utils.spectral_norm`` does.

    Shapes: those of ``layer``. Params: ``layer``'s own, unchanged (a model with and without
    spectral norm has the same param tree, and the same initial values for the same key).
    State: ``{"u": [out], "v": [rest], "layer": layer's state}`` (``"layer"`` left out when
    empty), float32, where ``w: [..., out]`` is read as the matrix ``m = w.reshape(rest, out)``
    (see the module docstring); ``u`` and ``v`` start as normalised standard-normal vectors.

    ``train=True`` runs ``num_iterations`` power-iteration steps ``v = normalize(m @ u)``,
    ``u = normalize(v @ m)`` (on the weight with gradients stopped, as in PyTorch) and returns
    the new ``u, v`` in the state; ``train=False`` uses the stored ones and leaves them
    unchanged. Either way ``sigma = u @ (v @ m)`` (differentiated through ``w`` only) and the
    layer runs with ``w / sigma``. ``epsilon`` keeps the normalisations finite.

    >>> import jax, jax.numpy as jnp, fnn
    >>> sn = SpectralNorm(fnn.Conv(4, (3, 3)))
    >>> params, state = sn.init(jax.random.key(0), jnp.zeros((1, 8, 8, 2)))
    >>> jax.tree.map(jnp.shape, (params, state))
    ({'b': (4,), 'w': (3, 3, 2, 4)}, {'u': (4,), 'v': (18,)})
    """
    name = "SpectralNorm"
    if not isinstance(layer, Layer):
        raise TypeError(f"{name}: layer must be a Layer (Dense, Conv, ConvTranspose), got "
                        f"{type(layer).__name__}")
    check_positive(name, num_iterations=num_iterations)
    if not isinstance(epsilon, (int, float)) or isinstance(epsilon, bool) or not epsilon > 0:
        raise ValueError(f"{name}: epsilon must be a positive number, got {epsilon!r}")

    def init(key, x):
        params, inner = layer.init(key, x)
        w = _weight(name, params)
        out, rest = w.shape[-1], math.prod(w.shape[:-1])
        dt = at_least_float32(w.dtype)
        u_key, v_key = jax.random.split(jax.random.fold_in(key, _UV_STREAM))
        state = {"u": _normalize(jax.random.normal(u_key, (out,), dt), epsilon),
                 "v": _normalize(jax.random.normal(v_key, (rest,), dt), epsilon)}
        put(state, "layer", inner)
        return params, state

    def apply(params, state, x, *, key=None, train=False):
        check_train(train)
        w = _weight(name, params)
        out, rest = w.shape[-1], math.prod(w.shape[:-1])
        if not isinstance(state, Mapping):
            raise ParamError(f"{where(name)}: expected state as a dict, got "
                             f"{type(state).__name__}")
        expect_params(name, {k: s for k, s in state.items() if k != "layer"},
                      {"u": (out,), "v": (rest,)}, "state")
        m = w.astype(at_least_float32(w.dtype)).reshape(rest, out)
        u, v = state["u"].astype(m.dtype), state["v"].astype(m.dtype)
        if train:
            frozen = jax.lax.stop_gradient(m)
            for _ in range(num_iterations):
                v = _normalize(frozen @ u, epsilon)  # [rest]
                u = _normalize(v @ frozen, epsilon)  # [out]
        sigma = jnp.dot(u, v @ m)
        normalized = (m / sigma).reshape(w.shape).astype(w.dtype)
        y, inner = layer.apply({**params, "w": normalized}, state.get("layer", {}), x, key=key,
                               train=train)
        new_state = {"u": u.astype(state["u"].dtype), "v": v.astype(state["v"].dtype)}
        put(new_state, "layer", inner)
        return y, new_state

    return Layer(init, apply, name)


def _norm_but_last(v: jax.Array) -> jax.Array:
    """``||v||`` over every axis but the last, in at least float32: ``[..., out] -> [out]``."""
    vf = v.astype(at_least_float32(v.dtype))
    return jnp.sqrt(jnp.sum(jnp.square(vf), axis=tuple(range(v.ndim - 1))))


def WeightNorm(layer: Layer) -> Layer:
    """``layer`` with its weight split into a direction and a length (Salimans and Kingma
    2016): ``w = g * v / ||v||``, the norm over every axis but the last (one length per output
    feature, PyTorch's ``weight_norm(dim=0)``).

    Shapes: those of ``layer``. Params: ``layer``'s with ``"w"`` replaced by ``"v"`` (``w``'s
    shape) and ``"g"`` (``[out]``), e.g. ``{"v": [in, out], "g": [out], "b": [out]}`` for a
    Dense; ``v`` starts at the layer's initial ``w`` and ``g`` at its norm, so the initial
    weight is the layer's own. State: ``layer``'s. The weight is computed in at least float32
    and given to ``layer`` in ``v``'s dtype.

    >>> import jax, jax.numpy as jnp, fnn
    >>> wn = WeightNorm(fnn.Dense(3))
    >>> params, _ = wn.init(jax.random.key(0), jnp.zeros((2, 5)))
    >>> jax.tree.map(jnp.shape, params)
    {'b': (3,), 'g': (3,), 'v': (5, 3)}
    """
    name = "WeightNorm"
    if not isinstance(layer, Layer):
        raise TypeError(f"{name}: layer must be a Layer (Dense, Conv, ConvTranspose), got "
                        f"{type(layer).__name__}")

    def init(key, x):
        params, state = layer.init(key, x)
        w = _weight(name, params)
        clash = sorted({"v", "g"} & set(params))
        if clash:
            raise ParamError(f"{where(name)}: the wrapped layer's params already hold "
                             f"{', '.join(clash)}, the names WeightNorm gives its own")
        rest = {k: p for k, p in params.items() if k != "w"}
        return rest | {"g": _norm_but_last(w).astype(w.dtype), "v": w}, state

    def apply(params, state, x, *, key=None, train=False):
        v = _weight(name, params, "v")
        expect_params(name, {"g": params.get("g")}, {"g": (v.shape[-1],)})
        g = params["g"].astype(at_least_float32(v.dtype))
        w = v.astype(g.dtype) * (g / _norm_but_last(v)).reshape((1,) * (v.ndim - 1) + g.shape)
        rest = {k: p for k, p in params.items() if k not in ("v", "g")}
        return layer.apply(rest | {"w": w.astype(v.dtype)}, state, x, key=key, train=train)

    return Layer(init, apply, name)
