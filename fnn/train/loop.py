"""The training loop: epochs of jitted train steps with a progress bar, evaluation after each
epoch, and a history of metrics."""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping

import jax
import numpy as np
import optax

from fnn.core import Layer
from fnn.data import Split, batches, num_batches
from fnn.train.state import TrainState, create_train_state
from fnn.train.step import DEFAULT_METRICS, Loss, Metric, make_eval_step, make_train_step


def evaluate(eval_step, params, state, x: np.ndarray, y: np.ndarray,
             batch_size: int) -> dict[str, float]:
    """Metrics over all of ``(x, y)``: batch means weighted by batch size."""
    totals: dict[str, float] = {}
    for xb, yb in batches(x, y, batch_size, drop_remainder=False):
        for name, value in eval_step(params, state, xb, yb).items():
            totals[name] = totals.get(name, 0.0) + float(value) * len(xb)
    return {name: total / len(x) for name, total in totals.items()}


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, show: bool):
    if not show:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit="step", dynamic_ncols=True)


def fit(model: Layer, optimizer: optax.GradientTransformation, data: Split, loss: Loss, *,
        epochs: int, batch_size: int, seed: int = 0,
        metrics: Mapping[str, Metric] = DEFAULT_METRICS, eval_batch_size: int = 512,
        on_epoch: Callable[[dict[str, Any]], None] | None = None,
        progress: bool = True) -> tuple[TrainState, list[dict[str, Any]]]:
    """Trains ``model`` on ``data.x_train`` for ``epochs`` epochs and evaluates on ``data.x_test``
    after each one.

    Returns the final train state and the history: one dict per epoch with ``epoch``, ``step``,
    ``train_<metric>`` (the mean over the epoch's steps), ``test_<metric>`` and ``seconds``.
    ``on_epoch`` is called with each history row as it is made. The same seed gives the same
    result: initialisation, shuffling and dropout all derive from it.
    """
    ts = create_train_state(model, optimizer, jax.random.key(seed), data.x_train[:batch_size])
    train_step = make_train_step(model, optimizer, loss, metrics)
    eval_step = make_eval_step(model, loss, metrics)
    steps_per_epoch = num_batches(len(data.x_train), batch_size, drop_remainder=True)
    history = []
    bar = _progress_bar(epochs * steps_per_epoch, progress)
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        step_metrics = []
        for xb, yb in batches(data.x_train, data.y_train, batch_size, seed=seed, epoch=epoch):
            ts, m = train_step(ts, xb, yb)
            step_metrics.append(m)
            bar.update()
        train = {name: float(np.mean([m[name] for m in step_metrics]))
                 for name in step_metrics[0]}
        test = evaluate(eval_step, ts.params, ts.state, data.x_test, data.y_test,
                        eval_batch_size)
        row = {"epoch": epoch, "step": int(ts.step)}
        row |= {f"train_{k}": v for k, v in train.items()}
        row |= {f"test_{k}": v for k, v in test.items()}
        row["seconds"] = round(time.perf_counter() - start, 3)
        history.append(row)
        bar.set_postfix({"epoch": epoch, "loss": f"{row['train_loss']:.4f}"}
                        | {k: f"{v:.4f}" for k, v in row.items() if k.startswith("test_")},
                        refresh=True)
        if on_epoch is not None:
            on_epoch(row)
    bar.close()
    return ts, history
