"""The command line: ``fnn train CONFIG``, ``fnn generate RUN_DIR`` and ``fnn summary CONFIG``.

A run directory (the config's ``output_dir``) holds ``config.yaml`` (the config as run),
``metrics.jsonl`` (one JSON line per evaluation), ``plot.png``, ``checkpoints/step_*`` and, for
language models, ``vocab.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fnn.app.config import (HOST_MALLOC, MODEL_DATA, ConfigError, build_loss, build_model,
                        build_optimizer, load_config)
from fnn.train.parallel import MODES
from fnn.train.checkpoint import CheckpointError


def _task(config):
    """The config's training task and the arguments its model takes from the data."""
    from fnn.data import load_digits, load_text
    from fnn.train.tasks import classification_task, language_model_task

    data = config.data
    if data["name"] == "text":
        text = load_text(data.get("path"))
        task = language_model_task(text, data["batch_size"], data["seq_len"], seed=config.seed,
                                   eval_batch_size=data.get("eval_batch_size"))
        return task, {"vocab_size": text.vocab.size}, text.vocab
    return classification_task(load_digits(), data["batch_size"], seed=config.seed), {}, None


def _overrides(args: argparse.Namespace) -> dict:
    overrides = {k: v for k, v in (("epochs", args.epochs), ("output_dir", args.output_dir),
                                   ("host_malloc", args.host_malloc)) if v is not None}
    if args.parallel is not None or args.devices is not None:
        overrides["parallel"] = {k: v for k, v in (("mode", args.parallel),
                                                   ("devices", args.devices)) if v is not None}
    return overrides


def _devices(config):
    import jax

    count = config.parallel["devices"]
    if config.parallel["mode"] == "none" or count is None:
        return None  # data_parallel's default: the first device, or every device of the mode
    available = jax.local_devices() if jax.process_count() == 1 else jax.devices()
    if count > len(available):
        raise ConfigError(f"parallel.devices is {count} but only {len(available)} devices "
                          f"are available")
    return available[:count]


def train(args: argparse.Namespace) -> int:
    if args.processes > 1:
        from fnn.train.distributed import launch

        if load_config(args.config, _overrides(args)).parallel["mode"] != "sharded":
            raise ConfigError("--processes trains one model over the devices of every process, "
                              "which needs parallel mode sharded (add --parallel sharded)")
        return launch([sys.executable, "-m", "fnn.app.cli"] + _without_processes(
            sys.argv[1:] if args.argv is None else args.argv), args.processes)

    from fnn.app.runtime import tune_host_malloc
    from fnn.app.plot import plot_history
    from fnn.train import NonFiniteError, train as run
    from fnn.train.distributed import initialize_from_env

    config = load_config(args.config, _overrides(args))  # no JAX call: the next two come first
    # before JAX starts its threads, whose first allocation picks their malloc arena
    malloc = config.host_malloc
    if malloc == "tuned" and not tune_host_malloc():
        malloc = "default (tuned needs glibc)"
    initialize_from_env()  # a process of `fnn train --processes N` joins the others first
    task, filled, vocab = _task(config)
    out = Path(config.output_dir)
    writer = _is_first_process()
    metrics_path = out / "metrics.jsonl"
    if writer:
        out.mkdir(parents=True, exist_ok=True)
        _write_run_files(config, out, vocab)
        _start_metrics(metrics_path, out / "checkpoints", args.resume)
    steps = config.epochs * task.steps_per_epoch

    def log(row):
        with metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    model = build_model(config, **filled)
    print(f"training {config.model['name']} on {config.data['name']} for {config.epochs} "
          f"epochs ({steps} steps of {config.data['batch_size']}), parallel: "
          f"{config.parallel['mode']}, precision: {config.precision}, host malloc: {malloc}")
    try:
        ts, history = run(model, build_optimizer(config, steps), build_loss(config), task,
                          num_steps=steps, seed=config.seed,
                          parallel=config.parallel["mode"], devices=_devices(config),
                          checkpoint_dir=out / "checkpoints",
                          checkpoint_every=config.checkpoint["every"],
                          keep=config.checkpoint["keep"], resume=args.resume,
                          max_bad_steps=config.max_bad_steps, on_log=log,
                          progress=not args.no_progress)
    except NonFiniteError as e:
        print(f"fnn: error: {e}", file=sys.stderr)
        return 1
    if not writer:
        return 0
    # the history carried by the checkpoints is the whole run's, also after --resume
    metrics_path.write_text("".join(json.dumps(row) + "\n" for row in history))
    plot_history(history, out / "plot.png")
    final = history[-1]
    name = task.eval_name
    if "bits_per_char" in task.metrics:
        result = f"final {name} bits per character: {final[f'{name}_bits_per_char']:.4f}"
    else:
        result = f"final {name} accuracy: {final[f'{name}_accuracy']:.4f}"
    print(f"{result} ({name} loss {final[f'{name}_loss']:.4f}) after {final['seconds']:.1f} s, "
          f"{final['skipped']} skipped steps; metrics in {metrics_path}, plot in "
          f"{out / 'plot.png'}, checkpoints in {out / 'checkpoints'}")
    return 0


def _without_processes(argv: list[str]) -> list[str]:
    """The command line of one of the launched processes: ``--processes N`` removed."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--processes":
            skip = True
        elif not arg.startswith("--processes="):
            kept.append(arg)
    return kept


def _start_metrics(metrics_path: Path, checkpoints: Path, resume: bool) -> None:
    """A fresh run starts a fresh metrics file and drops an earlier run's checkpoints; a
    resumed one keeps the rows up to its latest checkpoint (a killed run may have logged more)."""
    import shutil

    from fnn.train.checkpoint import latest_step

    step = latest_step(checkpoints) if resume else None
    if step is None:
        if checkpoints.exists() and not resume:
            shutil.rmtree(checkpoints)
        metrics_path.write_text("")
        return
    rows = metrics_path.read_text().splitlines() if metrics_path.exists() else []
    metrics_path.write_text("".join(line + "\n" for line in rows
                                    if json.loads(line)["step"] <= step))


def _is_first_process() -> bool:
    import jax

    return jax.process_index() == 0


def _write_run_files(config, out: Path, vocab) -> None:
    import dataclasses

    import yaml

    (out / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
    if vocab is not None:
        (out / "vocab.json").write_text(json.dumps({"chars": vocab.chars}))


def generate(args: argparse.Namespace) -> int:
    import jax
    import numpy as np

    from fnn.data import Vocab
    from fnn.models import generate as sample
    from fnn.models import init_gpt_cache, init_lstm_carry
    from fnn.train import create_train_state
    from fnn.train.checkpoint import restore_checkpoint

    run = Path(args.run_dir)
    config = load_config(run / "config.yaml")
    name = config.model["name"]
    if MODEL_DATA[name][0] != "text":
        raise ConfigError(f"{run}: fnn generate needs a language model run (charlstm or gpt), "
                          f"this one trained {name}")
    vocab = Vocab(json.loads((run / "vocab.json").read_text())["chars"])
    model = build_model(config, vocab_size=vocab.size)
    # only the optimizer state's structure matters here, not the schedule's length
    optimizer = build_optimizer(config, config.schedule.get("warmup_steps", 0) + 1)
    example = np.zeros((config.data["batch_size"], config.data["seq_len"]), np.int32)
    like = jax.eval_shape(lambda: create_train_state(model, optimizer, jax.random.key(0),
                                                     example))
    ts, _ = restore_checkpoint(run / "checkpoints", like)
    prompt = vocab.encode(args.prompt)[None]
    # generate checks that a GPT's prompt plus the new characters fit its max_length
    decode = init_gpt_cache(ts.params, 1) if name == "gpt" else init_lstm_carry(ts.params, 1)
    ids = sample(model, ts.params, decode, prompt, args.length, key=jax.random.key(args.seed),
                 temperature=args.temperature, top_k=args.top_k)
    print(f"# {name} at step {int(ts.step)}, temperature {args.temperature}, "
          f"top_k {args.top_k}", file=sys.stderr)
    print(vocab.decode(np.asarray(ids[0])))
    return 0


def summary(args: argparse.Namespace) -> int:
    import jax

    from fnn.inspection import summary as model_summary

    config = load_config(args.config)
    task, filled, _ = _task(config)
    x = jax.ShapeDtypeStruct(task.example.shape, task.example.dtype)
    print(model_summary(build_model(config, **filled), x))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fnn", description="Train fnn models from configs.")
    commands = parser.add_subparsers(dest="command", required=True)
    train_cmd = commands.add_parser("train", help="train a model from a YAML config")
    train_cmd.add_argument("config", help="path to a YAML config, e.g. configs/digits_cnn.yaml")
    train_cmd.add_argument("--epochs", type=int, help="override the config's epochs")
    train_cmd.add_argument("--output-dir", help="override the config's output_dir")
    train_cmd.add_argument("--resume", action="store_true",
                           help="continue from the latest checkpoint in output_dir")
    train_cmd.add_argument("--parallel", choices=MODES,
                           help="override parallel.mode (pmap/sharded: data parallel)")
    train_cmd.add_argument("--devices", type=int,
                           help="override parallel.devices (default: every local device)")
    train_cmd.add_argument("--processes", type=int, default=1,
                           help="launch N local processes that train together (127.0.0.1)")
    train_cmd.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    train_cmd.add_argument("--host-malloc", choices=HOST_MALLOC,
                           help="override host_malloc (tuned: glibc keeps freed memory for the "
                                "next step; faster for steps with large temporaries)")
    train_cmd.set_defaults(run=train)
    gen_cmd = commands.add_parser("generate", help="sample text from a trained language model")
    gen_cmd.add_argument("run_dir", help="the output_dir of an `fnn train` language-model run")
    gen_cmd.add_argument("--prompt", default="The ", help="text to continue")
    gen_cmd.add_argument("--length", type=int, default=200, help="characters to generate")
    gen_cmd.add_argument("--temperature", type=float, default=0.8)
    gen_cmd.add_argument("--top-k", type=int, default=None)
    gen_cmd.add_argument("--seed", type=int, default=0)
    gen_cmd.set_defaults(run=generate)
    summary_cmd = commands.add_parser("summary", help="print a config's model summary")
    summary_cmd.add_argument("config")
    summary_cmd.set_defaults(run=summary)
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        return args.run(args)
    except (ConfigError, CheckpointError, FileNotFoundError) as e:
        print(f"fnn: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
