"""Dense (fully connected) layer."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.nn import initializers

from fnn.core import (Initializer, Layer, align, check_positive, check_rank, compute_dtype,
                      expect_params, per_position, shape_error)


def Dense(features: int, *, use_bias: bool = True,
          w_init: Initializer = initializers.lecun_normal(),
          b_init: Initializer = initializers.zeros,
          param_dtype: Any = jnp.float32, dtype: Any = None) -> Layer:
    """``y = x @ w + b`` over the last axis.

    Shapes: ``x: [..., in_features] -> y: [..., features]``; params
    ``{"w": [in_features, features], "b": [features]}`` (``b`` only with ``use_bias``).
    ``w`` starts LeCun-normal (variance ``1 / in_features``), ``b`` at zero; pass any
    ``jax.nn.initializers`` function to change them. ``param_dtype`` is the storage dtype,
    ``dtype`` the compute dtype (default: the input's). Position-wise: a ``Seq`` passes through.

    >>> import jax, jax.numpy as jnp, fnn
    >>> params, state = Dense(3).init(jax.random.key(0), jnp.zeros((2, 5)))
    >>> jax.tree.map(jnp.shape, params)
    {'b': (3,), 'w': (5, 3)}
    """
    check_positive("Dense", features=features)
    expected = {"w": ("in_features", features)} | ({"b": (features,)} if use_bias else {})

    def init(key, x):
        check_rank("Dense", x, 1, "[..., in_features]")
        w_key, b_key = jax.random.split(key)
        params = {"w": w_init(w_key, (x.shape[-1], features), param_dtype)}
        if use_bias:
            params["b"] = b_init(b_key, (features,), param_dtype)
        return params, {}

    def apply(params, state, x, *, key=None, train=False):
        expect_params("Dense", params, expected)
        w = params["w"]
        if jnp.ndim(x) < 1 or x.shape[-1] != w.shape[0]:
            raise shape_error("Dense", f"[..., {w.shape[0]}]", x)
        dt = compute_dtype(dtype, x, param_dtype)
        y = jnp.matmul(x.astype(dt), w.astype(dt))
        if use_bias:
            y = y + align(params["b"].astype(dt), y.ndim)
        return y, state

    return per_position(Layer(init, apply, "Dense"))
