"""How good the samples of `fnn train` GAN and diffusion runs on the digits are, as a LeNet
trained on the digits sees them (``fnn.quality``): the fraction of samples it puts in the class
they were drawn for (class-conditional runs), the rarest class's fraction, its mean confidence,
and the Fréchet distance of its penultimate features of the samples to those of the test split,
next to two baselines: the training split (the floor) and per-pixel Gaussian noise.

    python benchmarks/sample_quality.py RUN_DIR [RUN_DIR ...] [--num 1000] [--judge-epochs 40]
        [--seed 0] [--guidance 1,2,4]

The judge is ``configs/digits_cnn.yaml``'s LeNet and training settings, trained with
``fnn.train.fit``; its test accuracy must exceed 0.99 (the script exits with an error
otherwise). A run that fails to load or sample gets an error row, and the script exits with
status 1 after the table.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from fnn.app import load_run
from fnn.app.config import build_loss, build_model, build_optimizer, load_config
from fnn.app.runs import draw_in_chunks
from fnn.data import Split, load_digits, num_batches
from fnn.quality import Judge, frechet_baselines, judge, sample_report
from fnn.train import fit

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "digits_cnn.yaml"
MIN_ACCURACY = 0.99  # the judge's test accuracy must exceed it
HEADER = ("run", "samples", "accuracy", "min class fraction", "mean confidence", "Fréchet")


def train_judge(data: Split, epochs: int, seed: int) -> tuple[Judge, dict[str, Any], float]:
    """The judge trained on ``data`` (the digits) with the digits CNN config's model and settings
    (``epochs`` and ``seed`` replacing its own), its report on the test split and the seconds
    its training took."""
    config = load_config(CONFIG, {"epochs": epochs, "seed": seed})
    batch_size = config.data["batch_size"]
    steps = epochs * num_batches(len(data.x_train), batch_size, drop_remainder=True)
    model = build_model(config)
    start = time.perf_counter()
    ts, _ = fit(model, build_optimizer(config, steps), data, build_loss(config), epochs=epochs,
                batch_size=batch_size, seed=config.seed, progress=False)
    seconds = time.perf_counter() - start
    j = judge(model, ts.params, ts.state)
    return j, sample_report(j, data.x_test, labels=data.y_test, reference=data.x_train), seconds


def draw(sample: Callable[..., Any], num: int, key: jax.Array, *,
         num_classes: int | None = None, **options: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """``num`` samples ``[num, ...]`` of ``sample(key, n, **options)`` as ``fnn sample`` draws
    them (:func:`fnn.app.runs.draw_in_chunks`); with ``num_classes`` the classes in turn
    (``labels=``), returned with them."""
    labels = None if num_classes is None else np.arange(num) % num_classes
    return draw_in_chunks(sample, num, key, labels=labels, **options), labels


def sampling(config: Any, guidances: list[float] | None) -> list[tuple[str, dict[str, Any]]]:
    """``(what, options)`` of each row of a run: a GAN's one row; a diffusion run's DDIM with
    its ``sample_steps``; a class-conditional one's for each guidance scale (default: its
    own), with the classes in turn."""
    if config.diffusion is None:
        return [("", {})]
    options = {"steps": config.diffusion["sample_steps"]}
    num_classes = config.model.get("num_classes")
    if not num_classes:
        return [("", options)]
    scales = guidances or [config.diffusion["guidance"]]
    return [(f"guidance {g:g}", options | {"guidance": g, "num_classes": num_classes})
            for g in scales]


def run_rows(run_dir: str, j: Judge, reference: np.ndarray, *, num: int, seed: int,
             guidances: list[float] | None) -> list[tuple[str, ...]]:
    """One row per sampling setting of the run in ``run_dir``."""
    run = load_run(run_dir)
    if run.learner is None:
        raise ValueError(f"{run_dir} is a supervised run, not a GAN or diffusion run")
    if guidances and not run.config.model.get("num_classes"):
        print(f"sample_quality: {run_dir} is not class-conditional: --guidance ignored",
              file=sys.stderr)
    rows = []
    for what, options in sampling(run.config, guidances):
        start = time.perf_counter()
        samples, labels = draw(functools.partial(run.learner.sample, run.train_state), num,
                               jax.random.key(seed), **options)
        seconds = time.perf_counter() - start
        report = sample_report(j, samples, labels=labels, reference=reference)
        name = f"{run_dir} (step {run.step}{', ' + what if what else ''})"
        print(f"sample_quality: {name}: {num} samples in {seconds:.1f} s", file=sys.stderr)
        rows.append(report_row(name, num, report))
    return rows


def report_row(name: str, num: int | str, report: dict[str, Any]) -> tuple[str, ...]:
    """A table row of a :func:`fnn.quality.sample_report` (``-`` for what it lacks)."""
    def cell(key: str, digits: int) -> str:
        return f"{report[key]:.{digits}f}" if key in report else "-"

    return (name, str(num), cell("accuracy", 4), cell("min_class_fraction", 4),
            cell("mean_confidence", 4), cell("frechet", 3))


def markdown(rows: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|---|" + "---:|" * (len(HEADER) - 1)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def parse_guidance(text: str) -> list[float]:
    try:
        scales = [float(g) for g in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected scales such as 1,2,4, got {text!r}") from None
    if not all(g >= 0 for g in scales):
        raise argparse.ArgumentTypeError(f"guidance scales must be >= 0, got {text!r}")
    return scales


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="fnn train GAN/diffusion runs")
    parser.add_argument("--num", type=int, default=1000, help="samples per row")
    parser.add_argument("--judge-epochs", type=int, default=40, help="the judge's epochs")
    parser.add_argument("--seed", type=int, default=0, help="the judge's and the samples' seed")
    parser.add_argument("--guidance", type=parse_guidance, default=None,
                        help="guidance scales G1,G2,... of a class-conditional diffusion run")
    args = parser.parse_args(argv)
    if args.num < 2 or args.judge_epochs < 1:
        parser.error(f"--num must be >= 2 and --judge-epochs >= 1, got {args.num} and "
                     f"{args.judge_epochs}")
    data = load_digits()
    j, own, seconds = train_judge(data, args.judge_epochs, args.seed)
    print(f"judge: LeNet of {CONFIG.name}, {args.judge_epochs} epochs in {seconds:.1f} s: test "
          f"accuracy {own['accuracy']:.4f}, mean confidence {own['mean_confidence']:.4f}")
    if not own["accuracy"] > MIN_ACCURACY:
        sys.exit(f"sample_quality: the judge's test accuracy {own['accuracy']:.4f} is not above "
                 f"{MIN_ACCURACY}; train it for more epochs (--judge-epochs)")
    baselines = frechet_baselines(j, data.x_test, data.x_train, num=args.num, seed=args.seed)
    num_train = min(args.num, len(data.x_train))
    rows = [report_row("test split (the reference; the judge's own view)", len(data.x_test),
                       {k: v for k, v in own.items() if k != "frechet"}),
            report_row("train split (the floor)", num_train, {"frechet": baselines["train"]}),
            report_row("per-pixel Gaussian noise", args.num, {"frechet": baselines["noise"]})]
    for row in rows:
        print("  ".join(row), flush=True)
    failed = False
    for run_dir in args.runs:
        try:
            new = run_rows(run_dir, j, data.x_test, num=args.num, seed=args.seed,
                           guidances=args.guidance)
        except Exception as e:  # one broken run must not hide the others' rows
            failed = True
            print(f"sample_quality: {run_dir}: {type(e).__name__}: {e}", file=sys.stderr)
            new = [(run_dir, "error: " + " ".join(f"{type(e).__name__}: {e}".split())[:200],
                    *("-",) * (len(HEADER) - 2))]
        for row in new:
            print("  ".join(row), flush=True)
        rows += new
    print()
    print(markdown(rows))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
