"""Jitted train and eval steps for any model, loss and optax optimizer."""

from __future__ import annotations

from typing import Callable, Mapping

import jax
import optax

from fnn.core import Layer
from fnn.losses import accuracy
from fnn.train.state import TrainState

Loss = Callable[[jax.Array, jax.Array], jax.Array]  # (outputs, targets) -> scalar
Metric = Callable[[jax.Array, jax.Array], jax.Array]  # (outputs, targets) -> scalar
DEFAULT_METRICS: Mapping[str, Metric] = {"accuracy": accuracy}


def train_step_fn(model: Layer, optimizer: optax.GradientTransformation, loss: Loss,
                  metrics: Mapping[str, Metric] = DEFAULT_METRICS):
    """The un-jitted train step ``(train_state, x, y) -> (train_state, metrics)``: one gradient
    step on the batch, in training mode, with the step's own key ``fold_in(key, step)``."""

    def objective(params, state, x, y, key):
        outputs, new_state = model.apply(params, state, x, key=key, train=True)
        return loss(outputs, y), (outputs, new_state)

    def step(ts: TrainState, x, y):
        key = jax.random.fold_in(ts.key, ts.step)
        (value, (outputs, new_state)), grads = jax.value_and_grad(objective, has_aux=True)(
            ts.params, ts.state, x, y, key)
        # optax mixes Python scalars with int32 step counts; keep it working when the user
        # runs with jax_numpy_dtype_promotion="strict" (the model itself is strict-clean)
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = optimizer.update(grads, ts.opt_state, ts.params)
            params = optax.apply_updates(ts.params, updates)
        results = {"loss": value} | {name: fn(outputs, y) for name, fn in metrics.items()}
        return TrainState(params, new_state, opt_state, ts.step + 1, ts.key), results

    return step


def make_train_step(model: Layer, optimizer: optax.GradientTransformation, loss: Loss,
                    metrics: Mapping[str, Metric] = DEFAULT_METRICS, *, donate: bool = True):
    """:func:`train_step_fn`, jitted. With ``donate`` the old train state's buffers are reused
    for the new one (do not use the train state passed in after the call)."""
    return jax.jit(train_step_fn(model, optimizer, loss, metrics),
                   donate_argnums=(0,) if donate else ())


def make_eval_step(model: Layer, loss: Loss, metrics: Mapping[str, Metric] = DEFAULT_METRICS):
    """A jitted ``(params, state, x, y) -> metrics`` in evaluation mode (``train=False``)."""

    @jax.jit
    def step(params, state, x, y):
        outputs, _ = model.apply(params, state, x, train=False)
        return {"loss": loss(outputs, y)} | {name: fn(outputs, y) for name, fn in metrics.items()}

    return step
