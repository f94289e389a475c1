"""Dropout."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fnn.core import Layer, check_train, expect_params, per_position, require_key


def Dropout(rate: float) -> Layer:
    """Zeroes each element with probability ``rate`` in training and scales the rest by
    ``1 / (1 - rate)``, so the expected output equals the input; the identity when
    ``train=False``. ``x: [...] -> [...]``. Needs ``key=`` when ``train=True``. Position-wise:
    a ``Seq`` passes through.

    ``rate`` is in ``[0, 1]``; ``Dropout(1.0)`` zeroes everything in training.
    """
    if not isinstance(rate, (int, float)) or isinstance(rate, bool) or not 0.0 <= rate <= 1.0:
        raise ValueError(f"Dropout: rate is the drop probability and must be in [0, 1], "
                         f"got {rate!r}")

    def init(key, x):
        return {}, {}

    def apply(params, state, x, *, key=None, train=False):
        check_train(train)
        expect_params("Dropout", params, {})
        if not train or rate == 0.0:
            return x, state
        key = require_key("Dropout", key)
        if rate == 1.0:
            return jnp.zeros_like(x), state
        keep = jax.random.bernoulli(key, 1.0 - rate, jnp.shape(x))
        return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype)), state

    return per_position(Layer(init, apply, "Dropout"))
