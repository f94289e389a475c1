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

from fnn.app.config import (HOST_MALLOC, LANGUAGE_DATA, ConfigError, build_mix, build_model,
                            load_config, run_kind)
from fnn.app.rundir import SAMPLES
from fnn.app.runs import (draw_samples, inputs_of, learner_of, load_run, model_input,
                          run_config, start_weights, task_of)
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


def _check_layout(config, learner, like, devices) -> None:
    """The mesh and rules of fsdp and tensor, tried on the train state's shapes."""
    from fnn.train.parallel import data_parallel

    options = config.parallel
    try:
        runner = data_parallel(learner, mode=options["mode"], devices=devices,
                               mesh=options["mesh"], rules=options["rules"])
        runner.step.lay_out(like)
    except ValueError as e:
        raise ConfigError(f"parallel ({options['mode']}): {e}") from None


def _memory_report(ts) -> None:
    """The device memory the placed train state takes: what a layout is for."""
    from fnn.train.sharding import bytes_per_device

    held = bytes_per_device(ts)
    total = sum(leaf.nbytes for leaf in _state_leaves(ts))
    print(f"train state: {max(held.values()) / 2**20:.2f} MiB per device (the most of this "
          f"process's {len(held)}), {total / 2**20:.2f} MiB in all")


def _state_leaves(ts):
    import jax

    return [jax.random.key_data(a) if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key)
            else a for a in jax.tree.leaves(ts)]


def _setup(config, args, parallel: bool = True):
    """The task, learner and the run directory's plan: every check of a ``fnn train`` command,
    before anything is written (``parallel=False``: leaves out the device checks, for the
    launcher of several processes, which has no devices of theirs)."""
    import jax

    from fnn.app import rundir

    task, filled, vocab = task_of(config)
    steps = config.epochs * task.steps_per_epoch
    learner, model = learner_of(config, task, filled, steps)
    name = config.model["name"]
    try:
        like = jax.eval_shape(lambda: learner.init(jax.random.key(0), task.example))
    except ValueError as e:
        if "param_groups" in str(e):
            raise ConfigError(f"optimizer ({config.optimizer['name']}): frozen and groups: "
                              f"{e}") from None
        if run_kind(config) == "supervised":
            raise
        raise ConfigError(f"model ({name}): on the data's batches: {e}") from None
    if run_kind(config) == "supervised":
        _check_supervised(config, task, model, like)
    else:
        _check_generative(config, task, learner, like)
    devices = _devices(config) if parallel else None
    if parallel and config.parallel["mode"] in ("fsdp", "tensor"):
        _check_layout(config, learner, like, devices)
    run_plan = rundir.plan(Path(config.output_dir), config, vocab, like, steps,
                           resume=args.resume, overwrite=args.overwrite)
    if run_plan.resume_step is None and config.init is not None:
        learner, _ = learner_of(config, task, filled, steps,
                                start=start_weights(config, model, task.example))
    return task, filled, vocab, steps, learner, devices, run_plan


def _check_supervised(config, task, model, like) -> None:
    """A classifier's or language model's checks: its head against the labels, the model (and
    its augmentation) and the batch mix in training on the data's batches. Shapes only."""
    import jax

    from fnn.train.learner import check_outputs

    name = config.model["name"]
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


def _check_generative(config, task, learner, like) -> None:
    """A GAN's or diffusion model's checks: the learner's own (a class-conditional model has a
    label for each of the data's classes), and one train step runs on the data's batches.
    Shapes only."""
    import jax

    name = config.model["name"]
    try:
        if learner.check is not None:
            learner.check(like, task)
    except ValueError as e:
        raise ConfigError(f"model ({name}): {e}") from None
    try:
        jax.eval_shape(learner.train_step_fn(None), like, *task.batch(0))
    except (ValueError, TypeError) as e:
        raise ConfigError(f"model ({name}): in training on the data's batches: {e}") from None


_MULTI_PROCESS_MODES = ("sharded", "shard_map", "fsdp", "tensor")


def _check_multi_process(config, flag: str) -> None:
    if config.parallel["mode"] not in _MULTI_PROCESS_MODES:
        raise ConfigError(f"{flag} trains one model over the devices of every process, which "
                          f"needs parallel mode {', '.join(_MULTI_PROCESS_MODES)} (add "
                          f"--parallel sharded), got {config.parallel['mode']}")


def _join(args: argparse.Namespace, config) -> None:
    """Joins the other processes of the run: ``--coordinator``, ``--num-processes`` and
    ``--process-id`` (a run of several machines), else the environment
    (:func:`fnn.train.distributed.initialize_from_env`: ``fnn train --processes N``, or the
    variables a cluster's launcher sets). Before any other JAX call."""
    from fnn.train.distributed import initialize, initialize_from_env

    flags = {"--coordinator": args.coordinator, "--num-processes": args.num_processes,
             "--process-id": args.process_id}
    given = [flag for flag, value in flags.items() if value is not None]
    if not given:
        initialize_from_env()
        return
    if len(given) != len(flags):
        raise ConfigError(f"{', '.join(flags)} go together: missing "
                          f"{', '.join(f for f in flags if f not in given)}")
    _check_multi_process(config, "--coordinator")
    try:
        initialize(args.coordinator, args.num_processes, args.process_id)
    except ValueError as e:
        raise ConfigError(str(e).replace("initialize: ", "")) from None


def train(args: argparse.Namespace) -> int:
    if args.processes < 1:
        raise ConfigError(f"--processes must be at least 1, got {args.processes}")
    if args.processes > 1 and args.coordinator is not None:
        raise ConfigError("--processes launches local processes; --coordinator joins a run of "
                          "several machines: give one or the other")
    if args.processes > 1:
        from fnn.train.distributed import launch

        config = load_config(args.config, _overrides(args))
        _check_multi_process(config, "--processes")
        _setup(config, args, parallel=False)  # the user's errors, once, before any launch
        return launch([sys.executable, "-m", "fnn.app.cli"] + _without_processes(
            sys.argv[1:] if args.argv is None else args.argv), args.processes)

    from fnn.app import rundir
    from fnn.app.runtime import tune_host_malloc
    from fnn.train import NonFiniteError, train_learner as run

    config = load_config(args.config, _overrides(args))  # no JAX call: the next two come first
    # before JAX starts its threads, whose first allocation picks their malloc arena
    malloc = config.host_malloc
    if malloc == "tuned" and not tune_host_malloc():
        malloc = "default (tuned needs glibc)"
    _join(args, config)  # a process of several joins the others first
    task, filled, vocab, steps, learner, devices, run_plan = _setup(config, args)
    out = Path(config.output_dir)
    writer = _is_first_process()
    _barrier("planned")  # every process has read the run directory before it changes
    for note in run_plan.notes if writer else ():
        print(f"fnn: {note}", file=sys.stderr)
    if writer:  # every check has passed: now the run directory may change
        rundir.prepare(out, config, vocab, run_plan, inputs=inputs_of(task, filled))
    kind = run_kind(config)
    _barrier("prepared")
    print(f"training {config.model['name']} on {config.data['name']} for {config.epochs} "
          f"epochs ({steps} steps of {config.data['batch_size']}), parallel: "
          f"{config.parallel['mode']}, precision: {config.precision}, host malloc: {malloc}")
    metrics_path = out / "metrics.jsonl"

    def log(row):
        with metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    try:
        _, history = run(learner, task, num_steps=steps,
                         seed=config.seed, eval_every=config.eval_every * task.steps_per_epoch,
                         parallel=config.parallel["mode"], devices=devices,
                         mesh=config.parallel["mesh"], rules=config.parallel["rules"],
                         on_start=_memory_report, checkpoint_dir=out / rundir.CHECKPOINTS,
                         checkpoint_every=config.checkpoint["every"],
                         keep=config.checkpoint["keep"], resume=run_plan.resume_step is not None,
                         max_bad_steps=config.max_bad_steps, on_log=log,
                         on_eval=None if kind == "supervised" else _sample_grids(
                             config, learner, task, out),
                         progress=not args.no_progress)
    except NonFiniteError as e:
        print(f"fnn: error: {e}", file=sys.stderr)
        return 1
    if writer:
        _finish(out, history, task, kind)
    return 0


GRID = 100  # samples in the grid of each evaluation of a generative run, 10 by 10


def _sample_grids(config, learner, task, out: Path):
    """``on_eval`` of a generative run: a grid of samples at each evaluation,
    ``samples/step_XXXXXXXX.png``, from the same latents (GAN) or starting noise (diffusion)
    every time, so that the grids show the model's progress; a class-conditional model's row
    ``k`` holds class ``k`` (the first 10 classes; with fewer, the classes in turn)."""
    import jax
    import numpy as np

    from fnn.app.plot import save_image_grid

    key = jax.random.fold_in(jax.random.key(config.seed), 0x677264)  # the grids' own key
    options = {}
    if config.diffusion is not None:
        options = {"steps": config.diffusion["sample_steps"],
                   "guidance": config.diffusion["guidance"]}
        if config.model.get("num_classes") is not None:
            options["labels"] = np.repeat(np.arange(10), 10) % config.model["num_classes"]
    folder = out / SAMPLES

    def write(step: int, ts) -> None:
        folder.mkdir(exist_ok=True)
        images = learner.sample(ts, key, GRID, **options)
        save_image_grid(np.asarray(images), folder / f"step_{step:08d}.png",
                        data_range=task.data_range, columns=10)

    return write


def _finish(out: Path, history: list, task, kind: str) -> None:
    """The whole run's metrics (the history carried by the checkpoints, also after
    ``--resume``), the plot, and the final line."""
    from fnn.app.plot import plot_history

    metrics_path = out / "metrics.jsonl"
    metrics_path.write_text("".join(json.dumps(row) + "\n" for row in history))
    plot_history(history, out / "plot.png")
    final, name = history[-1], task.eval_name
    if kind != "supervised":
        grids = sorted((out / SAMPLES).glob("step_*.png"))
        print(f"final {name} loss {final[f'{name}_loss']:.4f} after {final['seconds']:.1f} s, "
              f"{final['skipped']} skipped steps; samples in {grids[-1] if grids else out}, "
              f"metrics in {metrics_path}, checkpoints in {out / 'checkpoints'}; draw more "
              f"with fnn sample {out}")
        return
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
        # a model of several inputs (a diffusion model's (x_t, t, labels)) takes them as one
        inputs = loaded.example if isinstance(loaded.example, tuple) else (loaded.example,)
        exported = export_model(loaded.model, loaded.params, loaded.state, *inputs,
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


def sample(args: argparse.Namespace) -> int:
    """Draws new examples from a GAN or diffusion run: FILE.npz and a PNG grid beside it."""
    import warnings

    import jax
    import numpy as np

    from fnn.app.plot import save_image_grid
    from fnn.interop.weights import write_atomically

    run = Path(args.run_dir)
    config = run_config(run)
    kind = run_kind(config)
    if kind == "supervised":
        raise ConfigError(f"{run}: fnn sample needs a gan or diffusion run, this one trained "
                          f"{config.model['name']} on a {config.loss['name']} loss")
    out = Path(args.out)
    if out.suffix != ".npz":
        raise ConfigError(f"--out must name an .npz file (the samples and labels), got {out}")
    grid = out.with_suffix(".png")
    if args.num < 1:
        raise ConfigError(f"--num must be at least 1, got {args.num}")
    options: dict = {}
    classes = config.model.get("num_classes")
    if kind == "gan":
        for flag, value in (("--label", args.label), ("--steps", args.steps),
                            ("--guidance", args.guidance)):
            if value is not None:
                raise ConfigError(f"{flag} is for a diffusion run; {run} trained a GAN")
    else:
        options["steps"] = _sample_steps(args.steps, config)
        guidance = config.diffusion["guidance"] if args.guidance is None else args.guidance
        if not guidance >= 0:
            raise ConfigError(f"--guidance must be a number >= 0, got {guidance}")
        if args.guidance is not None and classes is None:
            raise ConfigError(f"--guidance is for a class-conditional model; {run} trained "
                              f"{config.model['name']} without num_classes")
        options["guidance"] = guidance
        if args.label is not None and classes is None:
            raise ConfigError(f"--label is for a class-conditional model; {run} trained "
                              f"{config.model['name']} without num_classes")
        if args.label is not None and not 0 <= args.label < classes:
            raise ConfigError(f"--label must be a class in [0, {classes}), got {args.label}")
    for path in (out, grid):
        if path.exists() and not args.overwrite:
            raise FileExistsError(f"{path} exists: pass --overwrite to replace it")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_run(run)
    for warning in caught:  # a corrupt newer checkpoint, left as it is
        print(f"fnn: {warning.message}", file=sys.stderr)
    labels = None
    if classes is not None:
        labels = (np.full(args.num, args.label, np.int32) if args.label is not None
                  else (np.arange(args.num) % classes).astype(np.int32))
    samples = draw_samples(loaded, args.num, jax.random.key(args.seed), labels=labels,
                           **options)
    arrays = {"samples": samples} | ({} if labels is None else {"labels": labels})
    data_range = loaded.data_range

    def write_npz(f):
        np.savez(f, **arrays)

    write_atomically(out, write_npz, overwrite=args.overwrite)
    save_image_grid(samples[:100], grid, data_range=data_range, columns=10)
    how = ""
    if kind == "diffusion":
        steps = options["steps"]
        how = (", ancestral sampling" if steps is None else f", {steps} DDIM steps") + \
            f", guidance {options['guidance']}"
    print(f"wrote {out}: samples {list(samples.shape)} in [{data_range[0]:g}, "
          f"{data_range[1]:g}]{'' if labels is None else ' and labels'} from the "
          f"{config.model['name']} at step {loaded.step}{how}; the first "
          f"{min(args.num, 100)} in {grid}")
    return 0


def _sample_steps(value: str | None, config) -> int | None:
    """``--steps``: the DDIM steps (an int), ``all`` (ancestral sampling through every step) or,
    when absent, the config's ``diffusion.sample_steps``."""
    timesteps = config.diffusion["timesteps"]
    if value is None:
        return config.diffusion["sample_steps"]
    if value == "all":
        return None
    try:
        steps = int(value)
    except ValueError:
        steps = 0
    if not 1 <= steps <= timesteps:
        raise ConfigError(f"--steps must be 'all' or a number of DDIM steps in [1, {timesteps}] "
                          f"(the run's timesteps), got {value!r}")
    return steps


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
    print(model_summary(build_model(config, **filled), model_input(config, x)))
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
                           help="override parallel.mode (pmap/sharded/shard_map: data "
                                "parallel; fsdp/tensor: the model split over the devices too)")
    train_cmd.add_argument("--devices", type=int,
                           help="override parallel.devices (default: every local device)")
    train_cmd.add_argument("--processes", type=int, default=1,
                           help="launch N local processes that train together (127.0.0.1)")
    train_cmd.add_argument("--coordinator", metavar="HOST:PORT",
                           help="join a run of several machines: process 0's address (with "
                                "--num-processes and --process-id; one process per machine)")
    train_cmd.add_argument("--num-processes", type=int, help="the processes of the run")
    train_cmd.add_argument("--process-id", type=int, help="this process's index, 0 .. N-1")
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
    sample_cmd = commands.add_parser(
        "sample", help="draw new examples from a GAN or diffusion run: an .npz and a PNG grid")
    sample_cmd.add_argument("run_dir", help="the output_dir of an `fnn train` GAN or diffusion "
                                            "run")
    sample_cmd.add_argument("--num", type=int, default=100, help="how many examples")
    sample_cmd.add_argument("--label", type=int, help="the class of every example (a "
                                                      "class-conditional model; default: the "
                                                      "classes in turn)")
    sample_cmd.add_argument("--steps", help="DDIM steps, or 'all' for ancestral sampling "
                                            "(default: the config's sample_steps)")
    sample_cmd.add_argument("--guidance", type=float, help="classifier-free guidance scale "
                                                           "(default: the config's)")
    sample_cmd.add_argument("--seed", type=int, default=0)
    sample_cmd.add_argument("--out", required=True,
                            help="FILE.npz: samples [N, ...] in the data's scale (and labels); "
                                 "the first 100 also as FILE.png")
    sample_cmd.add_argument("--overwrite", action="store_true",
                            help="replace FILE.npz and FILE.png if they exist")
    sample_cmd.set_defaults(run=sample)
    # --debug before or after the command
    for command in (train_cmd, gen_cmd, summary_cmd, export_cmd, sample_cmd):
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
