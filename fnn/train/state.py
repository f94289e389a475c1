"""The train state: everything a training run carries from one step to the next."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fnn.core import Layer, Params, State, as_spec


class TrainState(NamedTuple):
    params: Params  # trainable parameters
    state: State  # non-trained model state (e.g. BatchNorm running statistics)
    opt_state: optax.OptState  # the optimizer's state
    step: jax.Array  # int32 scalar: steps taken so far
    key: jax.Array  # base random key; step i uses fold_in(key, i), so no key is carried forward


def create_train_state(model: Layer, optimizer: optax.GradientTransformation, key: jax.Array,
                       x: Any) -> TrainState:
    """Initialises ``model`` for inputs shaped like ``x`` and ``optimizer`` for its params."""
    init_key, train_key = jax.random.split(key)
    spec = as_spec(x)
    # one compiled init instead of one small compilation per parameter initialiser
    params, state = jax.jit(lambda k: model.init(k, spec))(init_key)
    return TrainState(params, state, optimizer.init(params), jnp.zeros((), jnp.int32), train_key)
