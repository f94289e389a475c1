"""Times fnn's data-parallel train steps on ONE device against the plain jitted step: what the
``"sharded"`` (jit over a one-device mesh) and ``"pmap"`` (pmap over one device) machinery
costs when there is nothing to split.

    python benchmarks/parallel_step.py [--steps K] [--rounds R] [--only mlp|cnn]

Models as in ``train_step.py``: (a) MLP 784-512-512-10, batch 128; (b) LeNet on 28x28x1,
batch 64; an ``optax.adam(1e-3)`` step with softmax cross-entropy and accuracy, built by
``fnn.train.parallel.data_parallel`` with ``mode="none"`` (the plain ``jax.jit`` step),
``"sharded"`` and ``"pmap"``, all on the first device. Before timing, the three first steps
from the same initial state must report the same loss (to 1e-5).

A fourth program separates pmap's machinery from pmap's data layout: ``jit, pmap layout`` is
the plain ``jax.jit`` of the same per-device step, given the state and batch as pmap holds
them (a leading device axis of size 1, dropped and restored inside the program), without
``jax.pmap``.

Two timings per model: ``step``, the step on a batch already on the device (as in
``train_step.py``), and ``put_batch + step``, the batch placed from numpy arrays every step, as
a training loop does. Timing is interleaved: each round runs K steps of each mode, in an order
that rotates between rounds, and blocks on the last result. The table shows the median ms per
step and the median over rounds of the per-round ratio to the plain step (goal: at most 1.02),
and pmap's ratio to the jit of its own layout.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from typing import Callable

import jax
import numpy as np
import optax

from fnn.losses import softmax_cross_entropy
from fnn.train import create_train_state
from fnn.train.parallel import DataParallel, data_parallel, replicate, shard_batch, unreplicate
from fnn.train.step import train_step_fn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_step import (CASES, LEARNING_RATE, LOSS_TOLERANCE, print_setup,  # noqa: E402
                        print_table, timing_parser)

MODES = ("none", "sharded", "pmap", "layout")
LABELS = {"none": "plain jit", "sharded": "sharded", "pmap": "pmap",
          "layout": "jit, pmap layout"}


def pmap_layout_runner(model, optimizer, device) -> DataParallel:
    """``jax.jit`` of the per-device step on pmap's layout (leading device axis), no pmap."""
    body = train_step_fn(model, optimizer, softmax_cross_entropy)

    def step(ts, x, y):
        ts, metrics = body(jax.tree.map(lambda a: a[0], ts), x[0], y[0])
        return jax.tree.map(lambda a: a[None], ts), metrics

    return DataParallel("layout", [device], jax.jit(step, donate_argnums=(0,)),
                        put_state=lambda ts: replicate(ts, [device]),
                        put_rows=lambda tree: shard_batch(tree, [device]),
                        get_state=unreplicate)


def make_runs(case, device) -> dict[str, tuple[Callable[[int, bool], None], float]]:
    """Per mode: ``run(k, place)`` (k steps, placing the numpy batch each step when ``place``,
    blocking on the result) and the loss of its first step."""
    optimizer = optax.adam(LEARNING_RATE)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((case.batch,) + case.input_shape, dtype=np.float32)
    y = rng.integers(0, 10, case.batch).astype(np.int32)
    initial = create_train_state(case.fnn_model, optimizer, jax.random.key(0), x)
    host = jax.tree.map(np.array, initial._replace(key=jax.random.key_data(initial.key)))
    runs = {}
    for mode in MODES:
        if mode == "layout":
            runner = pmap_layout_runner(case.fnn_model, optimizer, device)
        else:
            runner = data_parallel(case.fnn_model, optimizer, softmax_cross_entropy, mode=mode,
                                   devices=[device])
        # every mode starts from its own copy: the steps donate the state they are given
        ts = runner.put_state(host._replace(key=jax.random.wrap_key_data(host.key)))
        batch = runner.put_batch(x, y)
        ts, metrics = runner.step(ts, *batch)  # compiles
        box = [ts]

        def run(k, place, runner=runner, batch=batch, box=box):
            ts = box[0]
            for _ in range(k):
                ts, _ = runner.step(ts, *(runner.put_batch(x, y) if place else batch))
            jax.block_until_ready(ts)
            box[0] = ts

        runs[mode] = (run, float(metrics["loss"]))
    return runs


def check_same_loss(name: str, runs) -> None:
    losses = {mode: loss for mode, (_, loss) in runs.items()}
    plain = losses["none"]
    for mode, loss in losses.items():
        if not abs(loss - plain) <= LOSS_TOLERANCE * max(1.0, abs(plain)):
            raise SystemExit(f"{name}: the {mode} step's first loss {loss!r} differs from the "
                             f"plain step's {plain!r}: they do not compute the same thing")
    print(f"{name}: first-step loss " + ", ".join(f"{LABELS[m]} {v:.6f}"
                                                   for m, v in losses.items()))


def time_interleaved(runs, steps: int, rounds: int, place: bool) -> dict[str, list[float]]:
    """Per mode, the ms per step of every round; the order rotates by one each round."""
    times: dict[str, list[float]] = {mode: [] for mode in runs}
    order = list(runs)
    for r in range(rounds):
        for mode in order[r % len(order):] + order[:r % len(order)]:
            start = time.perf_counter()
            runs[mode][0](steps, place)
            times[mode].append((time.perf_counter() - start) * 1e3 / steps)
    return times


def main(argv=None) -> None:
    args = timing_parser(__doc__, steps=10, rounds=15, only=sorted(CASES)).parse_args(argv)
    print_setup(args)
    device = jax.devices()[0]

    rows = []
    for key in [args.only] if args.only else list(CASES):
        case = CASES[key]
        runs = make_runs(case, device)
        check_same_loss(case.name, runs)
        for place, timed in ((False, "step"), (True, "put_batch + step")):
            times = time_interleaved(runs, args.steps, args.rounds, place)
            ratios = [f"{statistics.median(a / b for a, b in zip(times[m], times[base])):.3f}"
                      for m, base in (("sharded", "none"), ("pmap", "none"),
                                      ("pmap", "layout"))]
            rows.append((case.name, timed) + tuple(
                f"{statistics.median(times[m]):.2f}" for m in MODES) + tuple(ratios))

    print_table(["model", "timed"] + [f"{LABELS[m]} ms" for m in MODES]
                + ["sharded/plain", "pmap/plain", "pmap/(jit, pmap layout)"], rows,
                text_columns=2)


if __name__ == "__main__":
    main()
