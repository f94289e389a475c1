"""The command line: ``fnn train CONFIG`` and ``fnn summary CONFIG``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fnn.config import ConfigError, build_loss, build_model, build_optimizer, load_config


def _data(config):
    from fnn.data import load_digits

    return load_digits()  # the only data set so far; parse_config checked the name


def train(args: argparse.Namespace) -> int:
    from fnn.data import num_batches
    from fnn.train import fit, plot_history

    overrides = {k: v for k, v in (("epochs", args.epochs), ("output_dir", args.output_dir))
                 if v is not None}
    config = load_config(args.config, overrides)
    data = _data(config)
    batch_size = config.data["batch_size"]
    steps = config.epochs * num_batches(len(data.x_train), batch_size, drop_remainder=True)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.jsonl"
    metrics_path.write_text("")

    def log(row):
        with metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    print(f"training {config.model['name']} on {config.data['name']} "
          f"({len(data.x_train)} train / {len(data.x_test)} test) for {config.epochs} epochs")
    _, history = fit(build_model(config), build_optimizer(config, steps), data,
                     build_loss(config), epochs=config.epochs, batch_size=batch_size,
                     seed=config.seed, on_epoch=log, progress=not args.no_progress)
    plot_history(history, out / "plot.png")
    final = history[-1]
    print(f"final test accuracy: {final['test_accuracy']:.4f} (test loss "
          f"{final['test_loss']:.4f}) after {final['seconds']:.1f} s; "
          f"metrics in {metrics_path}, plot in {out / 'plot.png'}")
    return 0


def summary(args: argparse.Namespace) -> int:
    import jax
    import numpy as np

    from fnn.core import summary as model_summary

    config = load_config(args.config)
    data = _data(config)
    x = jax.ShapeDtypeStruct((config.data["batch_size"],) + data.x_train.shape[1:],
                             np.float32)
    print(model_summary(build_model(config), x))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fnn", description="Train fnn models from configs.")
    commands = parser.add_subparsers(dest="command", required=True)
    train_cmd = commands.add_parser("train", help="train a model from a YAML config")
    train_cmd.add_argument("config", help="path to a YAML config, e.g. configs/digits_cnn.yaml")
    train_cmd.add_argument("--epochs", type=int, help="override the config's epochs")
    train_cmd.add_argument("--output-dir", help="override the config's output_dir")
    train_cmd.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    train_cmd.set_defaults(run=train)
    summary_cmd = commands.add_parser("summary", help="print a config's model summary")
    summary_cmd.add_argument("config")
    summary_cmd.set_defaults(run=summary)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ConfigError, FileNotFoundError) as e:
        print(f"fnn: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
