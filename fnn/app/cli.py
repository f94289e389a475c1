"""The command line: ``fnn train CONFIG``, ``fnn generate RUN_DIR`` and ``fnn summary CONFIG``.

A run directory (the config's ``output_dir``) is described in :mod:`fnn.app.rundir`. Every
user error is one line, ``fnn: error: ...`` on stderr, with exit status 2 (``--debug`` shows
the traceback instead); a run that stops on non-finite steps exits with status 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fnn.app.config import (HOST_MALLOC, LANGUAGE_DATA, ConfigError, build_loss, build_mix,
                            build_model, build_optimizer, load_config)
from fnn.app.runs import inputs_of, load_run, run_config, start_weights, task_of
from fnn.train.parallel import MODES

# device-count advice for a CPU-only machine
_CPU_DEVICES = "XLA_FLAGS=--xla_force_host_platform_device_count=N"


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
        raise ConfigError(f"parallel.devices is {count} but only {len(available)} "
                          f"device{'s are' if len(available) != 1 else ' is'} available (on a "
                          f"CPU, {_CPU_DEVICES} before the start gives N devices)")
    return available[:count]


def _setup(config, args, parallel: bool = True):
    """The task, model, optimizer, loss and the run directory's plan: every check of a ``fnn
    train`` command, before anything is written (``parallel=False``: leaves out the device
    checks, for the launcher of several processes, which has no devices of theirs)."""
    import jax

    from fnn.app import rundir
    from fnn.train import create_train_state
    from fnn.train.loop import check_outputs

    task, filled, vocab = task_of(config)
    steps = config.epochs * task.steps_per_epoch
    model = build_model(config, **filled)
    optimizer = build_optimizer(config, steps)
    name = config.model["name"]
    try:
        like = jax.eval_shape(lambda: create_train_state(model, optimizer, jax.random.key(0),
                                                         task.example))
    except ValueError as e:
        if "param_groups" not in str(e):
            raise
        raise ConfigError(f"optimizer ({config.optimizer['name']}): frozen and groups: "
                          f"{e}") from None
    check_outputs(f"model ({name})", model, like.params, like.state, task)
    try:  # in training too (augmentation, dropout), before the run directory changes
        jax.eval_shape(lambda p, s, x: model.apply(p, s, x, key=jax.random.key(0), train=True),
                       like.params, like.state, task.example)
    except (ValueError, TypeError) as e:
        where = "augment" if config.augment else f"model ({name})"
        raise ConfigError(f"{where}: in training on the data's batches: {e}") from None
    mix = build_mix(config, task.num_classes)
    if mix is not None:
        try:
            jax.eval_shape(mix, jax.random.key(0), *task.batch(0))
        except (ValueError, TypeError) as e:
            raise ConfigError(f"mix ({config.mix['name']}): on the data's batches: {e}") from None
    devices = _devices(config) if parallel else None
    run_plan = rundir.plan(Path(config.output_dir), config, vocab, like, steps,
                           resume=args.resume, overwrite=args.overwrite)
    start = start_weights(config, model, task.example) if run_plan.resume_step is None \
        else (None, None)
    return task, filled, vocab, steps, model, optimizer, devices, run_plan, start


def train(args: argparse.Namespace) -> int:
    if args.processes < 1:
        raise ConfigError(f"--processes must be at least 1, got {args.processes}")
    if args.processes > 1:
        from fnn.train.distributed import launch

        config = load_config(args.config, _overrides(args))
        if config.parallel["mode"] != "sharded":
            raise ConfigError("--processes trains one model over the devices of every process, "
                              "which needs parallel mode sharded (add --parallel sharded)")
        _setup(config, args, parallel=False)  # the user's errors, once, before any launch
        return launch([sys.executable, "-m", "fnn.app.cli"] + _without_processes(
            sys.argv[1:] if args.argv is None else args.argv), args.processes)

    from fnn.app import rundir
    from fnn.app.runtime import tune_host_malloc
    from fnn.train import NonFiniteError, train as run
    from fnn.train.distributed import initialize_from_env

    config = load_config(args.config, _overrides(args))  # no JAX call: the next two come first
    # before JAX starts its threads, whose first allocation picks their malloc arena
    malloc = config.host_malloc
    if malloc == "tuned" and not tune_host_malloc():
        malloc = "default (tuned needs glibc)"
    initialize_from_env()  # a process of `fnn train --processes N` joins the others first
    task, filled, vocab, steps, model, optimizer, devices, run_plan, start = _setup(config, args)
    out = Path(config.output_dir)
    writer = _is_first_process()
    _barrier("planned")  # every process has read the run directory before it changes
    for note in run_plan.notes if writer else ():
        print(f"fnn: {note}", file=sys.stderr)
    if writer:  # every check has passed: now the run directory may change
        rundir.prepare(out, config, vocab, run_plan, inputs=inputs_of(task, filled))
    _barrier("prepared")
    print(f"training {config.model['name']} on {config.data['name']} for {config.epochs} "
          f"epochs ({steps} steps of {config.data['batch_size']}), parallel: "
          f"{config.parallel['mode']}, precision: {config.precision}, host malloc: {malloc}")
    metrics_path = out / "metrics.jsonl"

    def log(row):
        with metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    try:
        _, history = run(model, optimizer, build_loss(config), task, num_steps=steps,
                         seed=config.seed, parallel=config.parallel["mode"], devices=devices,
                         checkpoint_dir=out / rundir.CHECKPOINTS,
                         checkpoint_every=config.checkpoint["every"],
                         keep=config.checkpoint["keep"], resume=run_plan.resume_step is not None,
                         max_bad_steps=config.max_bad_steps, on_log=log,
                         progress=not args.no_progress, params=start[0], state=start[1],
                         mix=build_mix(config, task.num_classes))
    except NonFiniteError as e:
        print(f"fnn: error: {e}", file=sys.stderr)
        return 1
    if writer:
        _finish(out, history, task)
    return 0


def _finish(out: Path, history: list, task) -> None:
    """The whole run's metrics (the history carried by the checkpoints, also after
    ``--resume``), the plot, and the final line."""
    from fnn.app.plot import plot_history

    metrics_path = out / "metrics.jsonl"
    metrics_path.write_text("".join(json.dumps(row) + "\n" for row in history))
    plot_history(history, out / "plot.png")
    final, name = history[-1], task.eval_name
    if "bits_per_char" in task.metrics:
        result = f"final {name} bits per character: {final[f'{name}_bits_per_char']:.4f}"
    else:
        result = f"final {name} accuracy: {final[f'{name}_accuracy']:.4f}"
    print(f"{result} ({name} loss {final[f'{name}_loss']:.4f}) after {final['seconds']:.1f} s, "
          f"{final['skipped']} skipped steps; metrics in {metrics_path}, plot in "
          f"{out / 'plot.png'}, checkpoints in {out / 'checkpoints'}")


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


def _is_first_process() -> bool:
    import jax

    return jax.process_index() == 0


def _barrier(name: str) -> None:
    """Waits for every process of a ``--processes N`` run (nothing to wait for alone)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"fnn train: {name}")


def generate(args: argparse.Namespace) -> int:
    import warnings

    import jax
    import numpy as np

    from fnn.models import generate as sample
    from fnn.models import init_gpt_cache, init_lstm_carry

    run = Path(args.run_dir)
    config = run_config(run)
    name = config.model["name"]
    if config.data["name"] not in LANGUAGE_DATA:
        raise ConfigError(f"{run}: fnn generate needs a language model run (charlstm or gpt), "
                          f"this one trained {name}")
    if args.length < 0:
        raise ConfigError(f"--length must be at least 0, got {args.length}")
    if not args.temperature >= 0:  # NaN too
        raise ConfigError(f"--temperature must be a number >= 0, got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise ConfigError(f"--top-k must be at least 1, got {args.top_k}")
    if not args.prompt:
        raise ConfigError("--prompt must hold at least one character")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_run(run)
    for warning in caught:  # a corrupt newer checkpoint, left as it is
        print(f"fnn: {warning.message}", file=sys.stderr)
    vocab, model, params = loaded.vocab, loaded.model, loaded.params
    prompt = vocab.encode(args.prompt)[None]
    # past a GPT's max_length, generate goes on with a sliding window
    decode = init_gpt_cache(params, 1) if name == "gpt" else init_lstm_carry(params, 1)
    ids = sample(model, params, decode, prompt, args.length, key=jax.random.key(args.seed),
                 temperature=args.temperature, top_k=args.top_k)
    print(f"# {name} at step {loaded.step}, temperature {args.temperature}, "
          f"top_k {args.top_k}", file=sys.stderr)
    print(vocab.decode(np.asarray(ids[0])))
    return 0


def export(args: argparse.Namespace) -> int:
    """Writes a run's model as a jax.export program, or its weights as safetensors/npz."""
    import warnings

    from fnn.interop import (ExportedFunction, export_model, flatten, save_exported, save_npz,
                             save_safetensors)

    weight_files = {".safetensors": save_safetensors, ".npz": save_npz}
    run = Path(args.run_dir)
    out = Path(args.out)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_run(run)
    for warning in caught:  # a corrupt newer checkpoint, left as it is
        print(f"fnn: {warning.message}", file=sys.stderr)
    weights = {"params": loaded.params, "state": loaded.state}
    if out.exists() and not args.overwrite:  # before any work, in the command line's words
        raise FileExistsError(f"{out} exists: pass --overwrite to replace it")
    if out.suffix in weight_files:
        if args.batch_size is not None or args.platforms is not None:
            raise ConfigError(f"--batch-size and --platforms are for a jax.export program; "
                              f"{out.name} is a weights file ({out.suffix})")
        weight_files[out.suffix](out, weights, overwrite=args.overwrite)
        what = f"the params and state ({len(flatten(weights))} arrays)"
    else:
        exported = export_model(loaded.model, loaded.params, loaded.state, loaded.example,
                                batch_size=_batch_size(args.batch_size),
                                platforms=None if args.platforms is None
                                else args.platforms.split(","))
        save_exported(out, exported, overwrite=args.overwrite)
        inputs, outputs = ExportedFunction(exported, str(out)).signature()
        what = (f"a jax.export program ({inputs}) -> ({outputs}) on "
                f"{', '.join(exported.platforms)}")
    print(f"wrote {out} ({out.stat().st_size / 1e3:,.0f} kB): {what} of the run's "
          f"{loaded.config.model['name']} at step {loaded.step}")
    return 0


def _batch_size(value: str | None) -> int | str:
    """``--batch-size``: ``dynamic`` (the default: any batch) or a positive int."""
    if value is None or value == "dynamic":
        return "b"
    try:
        size = int(value)
    except ValueError:
        size = 0
    if size < 1:
        raise ConfigError(f"--batch-size must be 'dynamic' or a positive integer, got {value!r}")
    return size


def summary(args: argparse.Namespace) -> int:
    import jax

    from fnn.inspection import summary as model_summary

    config = load_config(args.config)
    task, filled, _ = task_of(config)
    x = jax.ShapeDtypeStruct(task.example.shape, task.example.dtype)
    print(model_summary(build_model(config, **filled), x))
    return 0


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, like every other user error."""

    def error(self, message: str):
        self.exit(2, f"fnn: error: {self.prog.removeprefix('fnn ')}: {message}\n"
                  if self.prog != "fnn" else f"fnn: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fnn", description="Train fnn models from configs.")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error instead of one line")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    train_cmd = commands.add_parser("train", help="train a model from a YAML config")
    train_cmd.add_argument("config", help="path to a YAML config, e.g. configs/digits_cnn.yaml")
    train_cmd.add_argument("--epochs", type=int, help="override the config's epochs")
    train_cmd.add_argument("--output-dir", help="override the config's output_dir")
    train_cmd.add_argument("--resume", action="store_true",
                           help="continue the run in output_dir from its latest checkpoint")
    train_cmd.add_argument("--overwrite", action="store_true",
                           help="start again in an output_dir that holds a run (removes it)")
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
    export_cmd = commands.add_parser(
        "export", help="write a run's model as a jax.export program (runs with JAX alone), or "
                       "its weights as .safetensors or .npz")
    export_cmd.add_argument("run_dir", help="the output_dir of an `fnn train` run")
    export_cmd.add_argument("--out", required=True,
                            help="FILE.safetensors or FILE.npz: the params and state; any other "
                                 "name: the jax.export program (weights inside)")
    export_cmd.add_argument("--batch-size", help="the program's batch size: dynamic (default: "
                                                 "any) or an integer")
    export_cmd.add_argument("--platforms", help="where the program may run, comma-separated "
                                                "(default: this machine's), e.g. cpu,cuda")
    export_cmd.add_argument("--overwrite", action="store_true", help="replace FILE if it exists")
    export_cmd.set_defaults(run=export)
    for command in (train_cmd, gen_cmd, summary_cmd, export_cmd):  # --debug before or after
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show the traceback of an error instead of one line")
    return parser


def _one_line(error: BaseException) -> str:
    """An error's message on one line (a message of several lines joined)."""
    return " ".join(str(error).split()) or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.argv = argv
    try:
        return args.run(args)
    except (ValueError, TypeError, OSError) as e:  # the user's config, data, files or flags
        if args.debug:
            raise
        print(f"fnn: error: {_one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
