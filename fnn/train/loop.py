"""The training loop: jitted (optionally data-parallel) train steps over a task's batches, with a
progress bar, periodic evaluation, checkpoints, resume, and a stop after too many non-finite
steps in a row."""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import numpy as np
import optax

from fnn.core import Layer
from fnn.data import Split, batches
from fnn.train.checkpoint import (latest_step, restore_latest_intact, save_checkpoint,
                                  set_aside)
from fnn.train.learner import Learner, supervised
from fnn.train.parallel import MODES, data_parallel
from fnn.train.sharding import spans_processes
from fnn.train.state import TrainState
from fnn.train.step import Loss, Metric, Mix
from fnn.train.tasks import Task, classification_task

# per-step entries of the step's metrics that are counters, not averaged into the history
_COUNTERS = ("skipped", "bad_streak")


class NonFiniteError(RuntimeError):
    """Too many consecutive train steps had a non-finite loss or gradient."""


def evaluate(eval_step, params, state, x: np.ndarray, y: np.ndarray,
             batch_size: int) -> dict[str, float]:
    """Metrics over all of ``(x, y)``: batch means weighted by batch size."""
    return evaluate_batches(eval_step, params, state,
                            batches(x, y, batch_size, drop_remainder=False))


def evaluate_batches(eval_step, params, state, data) -> dict[str, float]:
    """Metrics over every ``(x, y)`` batch of ``data``, weighted by batch size."""
    return _evaluate(lambda ts, x, y: eval_step(params, state, x, y), None, data)


def _evaluate(eval_step, ts, data) -> dict[str, float]:
    """The means of ``eval_step(ts, x, y)`` over the ``(x, y)`` batches of ``data``, weighted by
    batch size."""
    totals: dict[str, float] = {}
    count = 0
    for xb, yb in data:
        size = len(jax.tree.leaves(xb)[0])  # the rows of an array, or of a Seq's array
        for name, value in eval_step(ts, xb, yb).items():
            totals[name] = totals.get(name, 0.0) + float(value) * size
        count += size
    return {name: total / count for name, total in totals.items()}


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, initial: int, show: bool):
    if not show:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)


class _TrainMeans:
    """Running sums of the per-step train metrics since the last history row; skipped steps
    (non-finite) are left out. Kept as Python floats so a checkpoint can carry them."""

    def __init__(self, sums: Mapping[str, float] | None = None, count: int = 0):
        self.sums = dict(sums or {})
        self.count = count

    def add(self, metrics: Mapping[str, float]) -> None:
        skipped = metrics["bad_streak"] > 0  # a skipped step extends the streak; a good one ends it
        for name, value in metrics.items():
            if name not in _COUNTERS:
                self.sums[name] = self.sums.get(name, 0.0) + (0.0 if skipped else float(value))
        self.count += not skipped

    def means(self) -> dict[str, float | None]:
        """The means; ``None`` (JSON ``null``) when every step was skipped."""
        return {name: (total / self.count if self.count else None)
                for name, total in self.sums.items()}


def _local_rows(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """This process's share of a global batch: rows ``[i * B / P, (i + 1) * B / P)``."""
    count, index = jax.process_count(), jax.process_index()
    if count == 1:
        return x, y
    size = len(jax.tree.leaves(x)[0])  # an array's rows, or a Seq's
    if size % count:
        raise ValueError(f"the global batch size {size} does not divide by the number of "
                         f"processes {count}")
    share = size // count
    rows = slice(index * share, (index + 1) * share)
    return jax.tree.map(lambda a: a[rows], (x, y))


class _Start(NamedTuple):
    """Where a run starts: the train state, the history so far, the running train means and
    the seconds already spent (all from the latest checkpoint when resuming)."""

    ts: TrainState
    history: list[dict[str, Any]]
    means: _TrainMeans
    seconds: float


def _start(learner: Learner, runner, task: Task, seed: int, checkpoint_dir, resume: bool,
           num_steps: int) -> _Start:
    # where the mode keeps it: split over the devices from the start in fsdp and tensor
    ts = runner.initial_state(learner.init, jax.random.key(seed), task.example)
    if learner.check is not None:
        learner.check(ts, task)
    if not (resume and checkpoint_dir is not None and latest_step(checkpoint_dir) is not None):
        return _Start(ts, [], _TrainMeans(), 0.0)
    ts, meta, step, corrupt = restore_latest_intact(checkpoint_dir, ts)
    for bad, reason in corrupt if jax.process_index() == 0 else ():  # one process writes
        moved = set_aside(checkpoint_dir, bad)  # kept on disk, under a name that does not count
        warnings.warn(f"train: the checkpoint of step {bad} is corrupt ({reason}); resuming "
                      f"from step {step} instead, the corrupt one moved to {moved}",
                      stacklevel=3)
    history = list(meta["history"])
    if int(ts.step) > num_steps:
        raise ValueError(f"train: the checkpoint in {checkpoint_dir} is at step {int(ts.step)}, "
                         f"past the run's {num_steps} steps")
    return _Start(ts, history, _TrainMeans(meta["train_sums"], meta["train_count"]),
                  history[-1]["seconds"] if history else 0.0)


def _stop_if_stuck(learner: Learner, state_after: Callable[[], TrainState], step: int,
                   streak: int, max_bad_steps: int, batch) -> None:
    """Raises :class:`NonFiniteError` after ``max_bad_steps`` skipped steps in a row, with the
    learner's diagnosis of the last bad batch (``state_after()``: the state after it, fetched
    only then)."""
    if streak < max_bad_steps:
        return
    if learner.diagnose is None:
        found = "no diagnosis (the learner has none)"
    else:
        found = (learner.diagnose(state_after(), step, batch)
                 or "the debug pass found every output and gradient finite")
    raise NonFiniteError(
        f"{streak} consecutive train steps (steps {step - streak + 1} to {step}) had a "
        f"non-finite loss or gradient and were skipped, so the parameters are those of step "
        f"{step - streak + 1}; stopping (max_bad_steps={max_bad_steps}). On the last bad "
        f"batch: {found}")


def _check_arguments(caller: str = "train", **values: Any) -> None:
    """Each given count must be a positive int (``None`` means its default)."""
    for arg, value in values.items():
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                  or value <= 0):
            raise ValueError(f"{caller}: {arg} must be a positive int, got {value!r}")


def _history_row(task: Task, done: int, means: _TrainMeans, held_out: Mapping[str, float],
                 skipped: int, seconds: float) -> dict[str, Any]:
    epochs, index = divmod(done, task.steps_per_epoch)
    row = {"step": done, "epoch": epochs if index == 0 else round(done / task.steps_per_epoch, 4)}
    row |= {f"train_{k}": v for k, v in means.means().items()}
    row |= {f"{task.eval_name}_{k}": v for k, v in held_out.items()}
    return row | {"skipped": skipped, "seconds": round(seconds, 3)}


def train(model: Layer, optimizer: optax.GradientTransformation, loss: Loss, task: Task, *,
          num_steps: int, seed: int = 0, eval_every: int | None = None,
          parallel: str = "none", devices: Sequence[Any] | None = None,
          mesh: Any = None, rules: Any = None,
          checkpoint_dir: str | Path | None = None, checkpoint_every: int | None = None,
          keep: int = 3, resume: bool = False, max_bad_steps: int = 10,
          on_log: Callable[[dict[str, Any]], None] | None = None,
          progress: bool = True, params: Any = None, state: Any = None,
          mix: Mix | None = None) -> tuple[TrainState, list[dict[str, Any]]]:
    """Trains ``model`` with ``optimizer`` on ``loss`` over ``task`` for ``num_steps`` steps;
    returns the final train state and the history: the loop of :func:`train_learner` (every
    argument but these three is that loop's) with the learner :func:`~fnn.train.supervised`.

    - ``params`` and ``state``: start from these (pretrained weights, or another run's)
      instead of the model's init, checked against it (see
      :func:`~fnn.train.create_train_state`). A resumed run starts from its checkpoint instead.
    - ``mix``: mixup or cutmix of every training batch (see :func:`~fnn.train.train_step_fn`).
    """
    return train_learner(supervised(model, optimizer, loss, task.metrics, mix=mix,
                                    params=params, state=state), task, num_steps=num_steps,
                         seed=seed, eval_every=eval_every, parallel=parallel, devices=devices,
                         mesh=mesh, rules=rules, checkpoint_dir=checkpoint_dir,
                         checkpoint_every=checkpoint_every,
                         keep=keep, resume=resume, max_bad_steps=max_bad_steps, on_log=on_log,
                         progress=progress)


def train_learner(learner: Learner, task: Task, *, num_steps: int, seed: int = 0,
                  eval_every: int | None = None, parallel: str = "none",
                  devices: Sequence[Any] | None = None,
                  mesh: Any = None, rules: Any = None,
                  checkpoint_dir: str | Path | None = None,
                  checkpoint_every: int | None = None, keep: int = 3, resume: bool = False,
                  max_bad_steps: int = 10,
                  on_log: Callable[[dict[str, Any]], None] | None = None,
                  on_eval: Callable[[int, TrainState], None] | None = None,
                  on_start: Callable[[TrainState], None] | None = None,
                  progress: bool = True) -> tuple[TrainState, list[dict[str, Any]]]:
    """Trains ``learner`` (:class:`~fnn.train.Learner`: a classifier, a GAN, a diffusion model)
    on ``task`` for ``num_steps`` steps; returns the final train state and the history.

    - History: a row every ``eval_every`` steps (default: one epoch) and after the last step,
      with ``step``, ``epoch`` (steps / steps per epoch), ``train_<metric>`` (the mean over the
      steps since the previous row, skipped steps left out), ``<eval_name>_<metric>`` (the
      learner's ``eval_step`` on the task's held-out data), ``skipped`` (non-finite steps so
      far) and ``seconds``. ``on_log`` is called with each row as it is made, and ``on_eval``
      with the step and the train state of each row (to write samples, say), ``on_start`` with
      the train state as placed on the devices before the first step (to report the memory it
      takes, :func:`fnn.train.sharding.bytes_per_device`); all three only in the first process.
    - ``parallel``: one of :data:`fnn.train.parallel.MODES` over ``devices`` (default: every
      local device, or every device for the modes with a mesh); ``mesh`` and ``rules``: the
      layout of the ``"fsdp"`` and ``"tensor"`` modes; see :func:`fnn.train.data_parallel`.
      With several processes each feeds its share of every global batch (rows
      ``[i * B / P, (i + 1) * B / P)``), and a checkpoint of a state split across processes is
      gathered one array at a time and written by the first process.
    - Checkpoints: with ``checkpoint_dir`` the whole run (train state, the data position, the
      history so far) is saved every ``checkpoint_every`` steps and after the last step,
      keeping the last ``keep``. With ``resume`` the run continues from the latest checkpoint
      there (if any) and ends exactly as the uninterrupted run would: batches are a function of
      the step, and every random key derives from the seed and the step.
    - A step whose loss or gradient is not finite changes nothing and is counted; after
      ``max_bad_steps`` such steps in a row :class:`NonFiniteError` is raised, with the
      learner's diagnosis (a supervised learner names the first layer whose output or gradient
      is not finite on the last bad batch).

    The same seed gives the same result: initialisation, shuffling and every random draw derive
    from it. Each step is dispatched before the previous step's metrics are read, so the host
    never waits for the device between steps.
    """
    _check_arguments(num_steps=num_steps, max_bad_steps=max_bad_steps, eval_every=eval_every,
                     checkpoint_every=checkpoint_every, keep=keep)
    if resume and checkpoint_dir is None:
        raise ValueError("train: resume=True needs the checkpoint_dir to resume from")
    eval_every = task.steps_per_epoch if eval_every is None else eval_every
    runner = data_parallel(learner, mode=parallel, devices=devices, mesh=mesh,
                           rules=rules)
    start = _start(learner, runner, task, seed, checkpoint_dir, resume, num_steps)
    history, means = start.history, start.means
    eval_step = jax.jit(learner.eval_step)
    writer = jax.process_index() == 0
    bar = _progress_bar(num_steps, int(start.ts.step), progress and writer)
    clock = time.perf_counter()

    def read(pts, means: _TrainMeans, done: int, m, batch) -> dict[str, float]:
        """A dispatched step's metrics on the host: added to ``means``, the streak checked
        (``pts``: the placed train state after the step). Reads nothing the loop rebinds."""
        metrics = {name: float(v) for name, v in jax.device_get(m).items()}
        means.add(metrics)
        try:
            _stop_if_stuck(learner, lambda: runner.get_state(pts), done,
                           int(metrics["bad_streak"]), max_bad_steps, batch)
        except NonFiniteError:
            bar.close()
            raise
        return metrics

    pts = runner.put_state(start.ts)
    if on_start is not None and writer:
        on_start(pts)
    state = None  # the train state as of the last history row or checkpoint
    pending = None  # the previous step's (step, metrics, batch): read after the next dispatch
    for step in range(int(start.ts.step), num_steps):
        batch = task.batch(step)
        pts, m = runner.step(pts, *runner.put_batch(*_local_rows(*batch)))
        if pending is not None:
            read(pts, means, *pending)
        pending, done = (step + 1, m, batch), step + 1
        bar.update()
        log_now = done == num_steps or done % eval_every == 0
        save_now = checkpoint_dir is not None and (
            done == num_steps or bool(checkpoint_every and done % checkpoint_every == 0))
        if not (log_now or save_now):
            continue
        current, pending = read(pts, means, *pending), None
        state = runner.get_state(pts)
        if log_now:
            held_out = _evaluate(eval_step, state, task.eval_batches())
            row = _history_row(task, done, means, held_out, int(current["skipped"]),
                               start.seconds + time.perf_counter() - clock)
            history.append(row)
            means = _TrainMeans()
            bar.set_postfix({"loss": f"{row.get('train_loss') or float('nan'):.4f}"}
                            | {k: f"{v:.4f}" for k, v in held_out.items()}, refresh=True)
            if on_log is not None and writer:
                on_log(row)
            if on_eval is not None and writer:
                on_eval(done, state)
        # a state split over several processes is gathered array by array, by every process
        if save_now and (writer or spans_processes(state)):
            # the data position is the step (the manifest's own): a batch is f(seed, step)
            save_checkpoint(checkpoint_dir, done, state, keep=keep,
                            metadata={"history": history, "train_sums": means.sums,
                                      "train_count": means.count})
    bar.close()
    return (runner.get_state(pts) if state is None else state), history


def fit(model: Layer, optimizer: optax.GradientTransformation, data: Split, loss: Loss, *,
        epochs: int, batch_size: int, seed: int = 0,
        metrics: Mapping[str, Metric] | None = None, eval_batch_size: int = 512,
        on_epoch: Callable[[dict[str, Any]], None] | None = None,
        progress: bool = True, **options: Any) -> tuple[TrainState, list[dict[str, Any]]]:
    """Trains a classifier on ``data.x_train`` for ``epochs`` epochs and evaluates on
    ``data.x_test`` after each one: :func:`train` on a
    :func:`~fnn.train.tasks.classification_task`.

    Returns the final train state and the history: one row per epoch with ``epoch``, ``step``,
    ``train_<metric>`` (the mean over the epoch's steps), ``test_<metric>``, ``skipped`` and
    ``seconds``. ``on_epoch`` is called with each row as it is made. ``options`` are passed to
    :func:`train` (``params`` and ``state`` to start from, ``parallel``, ``checkpoint_dir``,
    ``resume``, ...).
    """
    _check_arguments("fit", epochs=epochs, **{k: options[k] for k in (
        "eval_every", "checkpoint_every", "keep", "max_bad_steps") if k in options})
    if epochs is None:
        raise ValueError("fit: epochs must be a positive int, got None")
    if options.get("parallel", "none") not in MODES:
        raise ValueError(f"fit: parallel must be one of {MODES}, got {options['parallel']!r}")
    if options.get("resume") and options.get("checkpoint_dir") is None:
        raise ValueError("fit: resume=True needs the checkpoint_dir to resume from")
    task = classification_task(data, batch_size, seed=seed, eval_batch_size=eval_batch_size,
                               metrics=metrics, _caller="fit")
    return train(model, optimizer, loss, task, num_steps=epochs * task.steps_per_epoch,
                 seed=seed, on_log=on_epoch, progress=progress, **options)
