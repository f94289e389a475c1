"""What a training run trains and how one step goes: the unit the loop drives.

A :class:`Learner` is four functions over a train state. The loop of
:func:`fnn.train.train_learner` (progress, evaluation, checkpoints, bit-exact resume, the stop
after too many non-finite steps, data parallel in every mode) knows nothing else about a run, so
one loop serves every kind:

- :func:`supervised`: one model, one optimizer and a loss on ``(x, y)`` batches, the step of
  :func:`fnn.train.train_step_fn` (classifiers, language models);
- :func:`fnn.train.gan`: a generator and a discriminator, two optimizers, alternating steps;
- :func:`fnn.train.diffusion`: a denoiser trained on noised inputs at a per-example timestep,
  with an exponential moving average of its weights.

The train state is always a :class:`~fnn.train.TrainState`. A learner of several networks keeps
a dict of them in ``params``, ``state`` and ``opt_state`` (``{"generator": ..., "discriminator":
...}``), and ``ema`` holds the averaged weights of a learner that keeps them. ``step``, ``key``,
``skipped`` and ``bad_streak`` mean the same for every learner: a step whose losses or gradients
are not finite changes nothing but the counters.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fnn.core import Layer, array_of, describe, output_spec
from fnn.train.state import TrainState, create_train_state
from fnn.train.step import Loss, Metric, Mix, metric_values, train_step_fn

StepFn = Callable[[TrainState, Any, Any], tuple[TrainState, dict[str, jax.Array]]]


class Learner(NamedTuple):
    """What :func:`fnn.train.train_learner` trains.

    - ``init(key, x) -> TrainState``: the train state for inputs shaped like ``x`` (one batch's
      inputs, an array or a ``jax.ShapeDtypeStruct``).
    - ``train_step_fn(axis_name) -> step``: the un-jitted train step ``(ts, x, y) -> (ts,
      metrics)``. ``axis_name=None`` is the step on one device (or under ``jit`` with a sharded
      batch); with a name, the per-device body of a ``pmap``/``shard_map`` over that axis, which
      must average gradients and metrics over it so that the step equals one device's on the
      whole batch. ``metrics`` maps names to scalars and must include ``"loss"``, ``"skipped"``
      and ``"bad_streak"`` (the new state's counters).
    - ``eval_step(ts, x, y) -> metrics``: held-out metrics of one batch, un-jitted (the loop
      jits it); a run's held-out metrics are their means weighted by batch size.
    - ``check(ts, task)``: raises before a run when the learner cannot train on the task (a
      classifier's head narrower than the labels); shapes only (``ts`` may hold
      ``jax.ShapeDtypeStruct`` leaves). ``None``: nothing to check.
    - ``diagnose(ts, step, batch) -> str | None``: after too many non-finite steps, what went
      wrong on the last bad batch (the first non-finite layer), for the error message.
    - ``sample(ts, key, num, **options)``: ``num`` new examples in the data's scale, for a
      generative learner (``None`` for the others).
    """

    init: Callable[[jax.Array, Any], TrainState]
    train_step_fn: Callable[[str | None], StepFn]
    eval_step: Callable[[TrainState, Any, Any], dict[str, jax.Array]]
    check: Callable[[TrainState, Any], None] | None = None
    diagnose: Callable[[TrainState, int, Any], str | None] | None = None
    sample: Callable[..., Any] | None = None


def supervised(model: Layer, optimizer: optax.GradientTransformation, loss: Loss,
               metrics: Mapping[str, Metric] | None = None, *, mix: Mix | None = None,
               params: Any = None, state: Any = None) -> Learner:
    """One model trained on ``(x, y)`` batches by ``optimizer`` on ``loss(model(x), y)``: the
    step of :func:`fnn.train.train_step_fn` (``mix`` mixes each batch), evaluated with the loss
    and ``metrics`` in evaluation mode. ``params`` and ``state`` start the run from these trees
    instead of the model's init (see :func:`fnn.train.create_train_state`)."""

    def init(key, x):
        return create_train_state(model, optimizer, key, x, params=params, state=state)

    def eval_step(ts, x, y):
        outputs, _ = model.apply(ts.params, ts.state, x, train=False)
        return {"loss": loss(outputs, y)} | metric_values(metrics, outputs, y)

    def check(ts, task):
        check_outputs("train", model, ts.params, ts.state, task)

    def diagnose(ts, step, batch):
        from fnn.train.debug import find_nonfinite

        x, y = batch
        return find_nonfinite(model, ts.params, ts.state, x, y, loss,
                              key=jax.random.fold_in(ts.key, step))

    return Learner(init, functools.partial(_supervised_step, model, optimizer, loss, metrics,
                                           mix), eval_step, check, diagnose)


def _supervised_step(model, optimizer, loss, metrics, mix, axis_name):
    return train_step_fn(model, optimizer, loss, metrics, axis_name=axis_name, mix=mix)


def check_outputs(caller: str, model: Layer, params, state, task) -> None:
    """Raises unless the model's output has a column for every class of the task's labels (a
    5-output head on 10 classes would train on labels it cannot represent). Shapes only."""
    if task.num_classes is None:
        return
    out = output_spec(model, params, state, task.example)
    width = jnp.shape(array_of(out))[-1] if jnp.ndim(array_of(out)) else 0
    if width < task.num_classes:
        raise ValueError(f"{caller}: the model's output {describe(out)} has {width} classes on "
                         f"its last axis, but the task's labels go up to {task.num_classes - 1}: "
                         f"give the model a head of {task.num_classes} outputs")
