"""Jitted train and eval steps for any model, loss and optax optimizer."""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from jax import lax

from fnn.core import Layer, array_of, batch_axis
from fnn.losses import accuracy
from fnn.train.groups import frozen_mask, frozen_state_mask
from fnn.train.state import TrainState

Loss = Callable[[jax.Array, jax.Array], jax.Array]  # (outputs, targets) -> scalar
Metric = Callable[[jax.Array, jax.Array], jax.Array]  # (outputs, targets) -> scalar
Mix = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]  # mixup, cutmix
_MIX_STREAM = 0x6d6978  # fold_in constant: the mix's key, apart from dropout's


def metric_values(metrics: Mapping[str, Metric] | None, outputs: Any, targets: Any
                  ) -> dict[str, jax.Array]:
    """Each metric of ``outputs`` against ``targets``. ``metrics=None`` is the default set that
    fits the loss: ``accuracy`` when the targets are class ids of the outputs' last axis
    (integer ``targets: [...]`` for ``outputs: [..., classes]``), nothing otherwise (a
    regression loss such as ``mean_squared_error`` gets no accuracy)."""
    if metrics is None:
        classes = (jnp.issubdtype(jnp.result_type(targets), jnp.integer)
                   and jnp.shape(array_of(outputs))[:-1] == jnp.shape(targets))
        metrics = {"accuracy": accuracy} if classes else {}
    return {name: fn(outputs, targets) for name, fn in metrics.items()}


def train_step_fn(model: Layer, optimizer: optax.GradientTransformation, loss: Loss,
                  metrics: Mapping[str, Metric] | None = None, *,
                  axis_name: str | None = None, mix: Mix | None = None):
    """The un-jitted train step ``(train_state, x, y) -> (train_state, metrics)``: one gradient
    step on the batch, in training mode, with the step's own key ``fold_in(key, step)``.

    The returned metrics map ``"loss"``, every name in ``metrics`` (by default ``accuracy`` when
    the targets are class ids, see :func:`metric_values`), ``"skipped"`` and ``"bad_streak"``
    (the new train state's int32 counters) to scalars.

    Non-finite steps are skipped inside the step, without a host round trip: when the loss or any
    gradient is NaN or infinite, params, model state and optimizer state stay as they were,
    ``skipped`` and ``bad_streak`` grow by one, and ``step`` still advances (so a loop moves on to
    the next batch). A finite step resets ``bad_streak`` to 0. A loop can stop a run that keeps
    failing by reading ``bad_streak``. The choice is a ``lax.cond`` on the device: the update
    runs in place on donated buffers, and a skipped step costs no update at all.

    With ``axis_name`` the step is the per-device body of a ``jax.pmap`` or ``jax.shard_map``
    over that axis, each device holding a replica of the train state and its shard of the batch
    ``x: [batch / devices, ...]``. The gradients, loss and metrics are averaged over the axis,
    so that one step equals a single-device step on the whole batch, and so are the floating
    leaves of the model's new state (BatchNorm running statistics computed without an
    ``axis_name`` of its own; averaging statistics a model already synced leaves them as they
    are). Whether a step is finite is decided after the average, so every replica makes the same
    choice and the replicas stay identical. Each device draws its dropout key as
    ``fold_in(fold_in(key, step), device index)``, so devices drop different units.

    ``mix(key, x, y) -> (x, soft_targets)`` mixes each training batch before the model sees it
    (``functools.partial(fnn.mixup, num_classes=10, alpha=0.2)``, or ``fnn.cutmix``) with a key
    of its own drawn from the step's; the loss gets the soft targets (``softmax_cross_entropy``
    takes them), the metrics the class with the larger share of each mixed example. Under pmap
    each device mixes its shard.
    """

    def objective(params, state, x, y, key, *, frozen):
        if frozen is not None:  # constants to the gradient: XLA computes none of theirs
            params = jax.tree.map(lambda p, f: lax.stop_gradient(p) if f else p, params, frozen)
        outputs, new_state = model.apply(params, state, x, key=key, train=True)
        return loss(outputs, y), (outputs, new_state)

    def step(ts: TrainState, x, y):
        key = jax.random.fold_in(ts.key, ts.step)
        params = ts.params
        frozen = frozen_mask(optimizer, params)  # from the param tree's structure: static
        if axis_name is not None:
            key = jax.random.fold_in(key, lax.axis_index(axis_name))
            # Differentiate each device's own loss with respect to a per-device copy of the
            # params, then average explicitly. Under shard_map the gradient of a replicated
            # (invariant) parameter is otherwise summed over devices by the transpose of the
            # implicit broadcast, while under pmap it is not: marking the params as varying
            # gives the local gradient in both, and the pmean below the global mean.
            # (a frozen leaf stays replicated: it gets no gradient and no mean)
            fixed = jax.tree.map(lambda _: False, params) if frozen is None else frozen
            params = jax.tree.map(lambda p, f: p if f else _as_varying(p, axis_name), params,
                                  fixed)
        targets = y
        if mix is not None:
            x, targets = mix(jax.random.fold_in(key, _MIX_STREAM), x, y)
            y = jnp.argmax(targets, axis=-1).astype(y.dtype)  # the larger share's class
        with batch_axis(axis_name):  # BatchNorm: the statistics of the whole global batch
            (value, (outputs, new_state)), grads = jax.value_and_grad(
                functools.partial(objective, frozen=frozen), has_aux=True)(
                params, ts.state, x, targets, key)
        results = {"loss": value} | metric_values(metrics, outputs, y)
        kept = frozen_state_mask(optimizer, ts.state)
        if kept is not None:  # a frozen layer's state (running statistics) stays as it was
            new_state = jax.tree.map(lambda old, new, k: old if k else new, ts.state, new_state,
                                     kept)
        if axis_name is not None:
            if frozen is None:
                grads, results = lax.pmean((grads, results), axis_name)
            else:  # a frozen leaf's gradient is zeros on every device: no mean
                grads = _mean_trainable(grads, frozen, axis_name)
                results = lax.pmean(results, axis_name)
            new_state = _mean_floating(new_state, axis_name)
        # decided after the mean: every replica sees the same loss and gradients
        ok = _all_finite(results["loss"], grads)
        # optax mixes Python scalars with int32 step counts; keep it working when the user
        # runs with jax_numpy_dtype_promotion="strict" (the model itself is strict-clean)
        with jax.numpy_dtype_promotion("standard"):
            # a cond, not a select of new against old values: the update then runs in place
            # on the donated buffers, where a select costs a copy of the optimizer state
            updated = jax.eval_shape(apply_update, grads, ts, new_state)
            params, state, opt_state = lax.cond(ok, apply_update, functools.partial(
                keep, updated=updated), grads, ts, new_state)
        skipped = ts.skipped + (~ok).astype(jnp.int32)
        bad_streak = jnp.where(ok, jnp.zeros_like(ts.bad_streak), ts.bad_streak + 1)
        new_ts = TrainState(params, state, opt_state, ts.step + 1, ts.key, skipped, bad_streak)
        return new_ts, results | {"skipped": skipped, "bad_streak": bad_streak}

    def apply_update(grads, ts: TrainState, new_state):
        updates, opt_state = optimizer.update(grads, ts.opt_state, ts.params)
        return optax.apply_updates(ts.params, updates), new_state, opt_state

    def keep(grads, ts: TrainState, new_state, *, updated):
        # in the dtypes of the update: an optimizer may promote its state (bfloat16 moments
        # with float32 hyper-parameters), and both branches must agree
        return jax.tree.map(lambda old, new: old.astype(new.dtype),
                            (ts.params, ts.state, ts.opt_state), updated)

    return step


def _as_varying(a: jax.Array, axis_name: str) -> jax.Array:
    """``a`` marked as varying over ``axis_name`` (one value per device)."""
    try:
        return lax.pcast(a, axis_name, to="varying")
    except ValueError:  # it varies already: a per-device copy, as in pmap's stacked layout
        return a


def _mean_trainable(grads: Any, frozen: Any, axis_name: str) -> Any:
    """The mean over ``axis_name`` of the gradients of the leaves that are not frozen."""
    return jax.tree.map(lambda g, f: g if f else lax.pmean(g, axis_name), grads, frozen)


def _all_finite(loss: jax.Array, grads: Any) -> jax.Array:
    """A bool scalar: ``loss`` and every gradient element are finite."""
    checks = [jnp.isfinite(loss)] + [jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]
    return jnp.stack(checks).all()


def _mean_floating(tree: Any, axis_name: str) -> Any:
    """The mean over ``axis_name`` of every floating leaf; other leaves (counters) unchanged."""
    return jax.tree.map(
        lambda a: lax.pmean(a, axis_name) if jnp.issubdtype(a.dtype, jnp.inexact) else a, tree)


class DonatingStep:
    """A jitted step that consumes (donates) its first argument, and says so when that argument
    is used again, as when a notebook cell that steps a train state is run twice. Everything
    else (``lower``, ...) is the jitted function's."""

    def __init__(self, step: Callable, name: str):
        self._step, self._name = step, name

    def __call__(self, *args):
        try:
            return self._step(*args)
        except (ValueError, RuntimeError) as e:  # jax 0.10: ValueError; 0.12: RuntimeError
            if "deleted" not in str(e):
                raise
            raise ValueError(
                f"{self._name}: the train state given was already consumed: a step donates the "
                f"buffers of the state it is given to the state it returns, so an old state "
                f"cannot be stepped again. Step the state the last call returned (ts, metrics = "
                f"step(ts, x, y)), or build the step with donate=False to keep old states") from e

    def __getattr__(self, name: str) -> Any:
        return getattr(self._step, name)


def make_train_step(model: Layer, optimizer: optax.GradientTransformation, loss: Loss,
                    metrics: Mapping[str, Metric] | None = None, *, donate: bool = True,
                    mix: Mix | None = None):
    """:func:`train_step_fn`, jitted. With ``donate`` the old train state's buffers are reused
    for the new one: the train state passed in is consumed, and stepping it again raises an
    error that says so (keep the returned state: ``ts, metrics = step(ts, x, y)``)."""
    step = jax.jit(train_step_fn(model, optimizer, loss, metrics, mix=mix),
                   donate_argnums=(0,) if donate else ())
    return DonatingStep(step, "train step") if donate else step


def make_eval_step(model: Layer, loss: Loss, metrics: Mapping[str, Metric] | None = None):
    """A jitted ``(params, state, x, y) -> metrics`` in evaluation mode (``train=False``)."""

    @jax.jit
    def step(params, state, x, y):
        outputs, _ = model.apply(params, state, x, train=False)
        return {"loss": loss(outputs, y)} | metric_values(metrics, outputs, y)

    return step
