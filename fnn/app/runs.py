"""Runs made by ``fnn train``, back in Python: :func:`load_run` gives the model, its params and
state at the newest intact checkpoint, the config, the vocabulary and the history, with no
optimizer to rebuild (the params and state are read out of the whole train state's checkpoint).

    run = fnn.app.load_run("runs/digits_cnn")
    logits, _ = run.model.apply(run.params, run.state, x)

Here, not in :mod:`fnn.train`: a run directory is the command line's format (a config names
its model, data and optimizer), and the library never imports the application.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, NamedTuple

from fnn.app.config import (LANGUAGE_DATA, MODEL_DATA, MODELS, NOISE_SCHEDULES, Config,
                            ConfigError, build_discriminator, build_loss, build_mix, build_model,
                            build_optimizer, load_config, run_kind)
from fnn.app.rundir import CHECKPOINTS, read_vocab


def task_of(config: Config):
    """The config's training task, the model arguments that come from the data (``vocab_size``,
    and the number of classes where the config leaves it out) and the vocabulary (None for data
    without one)."""
    from fnn.data import load_digits, load_text
    from fnn.train.tasks import classification_task, language_model_task

    data = config.data
    name = data["name"]
    if name == "text":
        text = load_text(data.get("path"))
        task = language_model_task(text, data["batch_size"], data["seq_len"], seed=config.seed,
                                   eval_batch_size=data.get("eval_batch_size"))
        return task, {"vocab_size": text.vocab.size}, text.vocab
    vocab = None
    if name == "digits":
        labelled = load_digits()
    else:
        labelled, vocab = _own_data(data)
    task = classification_task(labelled, data["batch_size"], seed=config.seed)
    filled = {key: task.num_classes for key in MODEL_DATA[config.model["name"]][2]
              if key not in config.model}
    filled |= _image_arguments(config, task.example)
    if vocab is not None:  # ids 1..size are characters, 0 padding, size + 1 unknown
        from fnn.data.files import num_text_ids

        filled["vocab_size"] = num_text_ids(vocab)
    return task, filled, vocab


def _image_arguments(config: Config, example) -> dict[str, Any]:
    """What a generative model's images are like (``image_size``, ``channels``), from the
    data: the arguments of its factory that :data:`MODEL_DATA` says the data fills in."""
    wanted = MODEL_DATA[config.model["name"]][1]
    if not {"image_size", "channels"} & set(wanted):
        return {}
    shape = tuple(example.shape[1:])
    if len(shape) != 3 or ("image_size" in wanted and shape[0] != shape[1]):
        raise ConfigError(f"model ({config.model['name']}) makes square images [size, size, "
                          f"channels]; the data's are {list(shape)}")
    values = {"image_size": int(shape[0]), "channels": int(shape[-1])}
    return {key: values[key] for key in wanted}


def model_input(config: Config, x: Any) -> Any:
    """What the config's model is given for a batch of data ``x`` (a spec): ``x`` itself, a
    GAN generator's latents ``[B, latent_features]``, or a diffusion model's ``(x_t, t)`` (and
    ``labels`` when class-conditional)."""
    import inspect

    import jax
    import jax.numpy as jnp

    n = x.shape[0]
    if config.gan is not None:
        latent = config.model.get("latent_features", inspect.signature(
            MODELS[config.model["name"]]).parameters["latent_features"].default)
        return jax.ShapeDtypeStruct((n, latent), jnp.float32)
    if config.diffusion is not None:
        t = jax.ShapeDtypeStruct((n,), jnp.int32)
        x = jax.ShapeDtypeStruct(x.shape, jnp.float32)
        return (x, t) if config.model.get("num_classes") is None else (x, t, t)
    return x


def learner_of(config: Config, task: Any, filled: dict[str, Any], steps: int, *,
               start: tuple[Any, Any] = (None, None), optimizer: Any = None):
    """The config's learner (:class:`fnn.train.Learner`) and its main model (a classifier, a
    GAN's generator, a diffusion model's denoiser), for a run of ``steps`` steps on ``task``.
    ``start``: the params and state a supervised run starts from (:func:`start_weights`);
    ``optimizer``: every network's, in place of the config's (a run loaded to sample from
    needs none: ``optax.identity()``)."""
    from fnn.train import diffusion, gan, supervised

    model = build_model(config, **filled)
    given = optimizer
    optimizer = build_optimizer(config, steps) if given is None else given
    kind = run_kind(config)
    if kind == "supervised":
        return supervised(model, optimizer, build_loss(config), task.metrics,
                          mix=build_mix(config, task.num_classes), params=start[0],
                          state=start[1]), model
    data_range = task.data_range
    if data_range is None:
        raise ConfigError(f"data ({config.data['name']}): a generative model needs floating "
                          f"inputs (images), whose range of values its samples are given in")
    if data_range[0] == data_range[1]:
        raise ConfigError(f"data ({config.data['name']}): every training input has the value "
                          f"{data_range[0]}: there is nothing to learn to generate")
    if kind == "gan":
        section = config.gan
        latent = model_input(config, task.example).shape[-1]
        d_optimizer = given if given is not None or section["optimizer"] is None else \
            build_optimizer(config, steps, section["optimizer"])
        return gan(model, build_discriminator(config, **filled), optimizer, d_optimizer,
                   latent_features=latent, loss=section["loss"], data_range=data_range), model
    section = config.diffusion
    return diffusion(model, optimizer,
                     NOISE_SCHEDULES[section["noise_schedule"]](section["timesteps"]),
                     example_shape=tuple(task.example.shape[1:]),
                     num_classes=config.model.get("num_classes"),
                     label_dropout=section["label_dropout"], ema_decay=section["ema_decay"],
                     data_range=data_range), model


def _own_data(data: dict[str, Any]):
    """The split of a config's own files (:mod:`fnn.data.files`) and its vocabulary (text)."""
    from fnn.data import files  # Pillow is imported only for images

    split = {"test_path": data.get("test_path"), "test_fraction": data.get("test_fraction")}
    name = data["name"]
    if name == "arrays":
        return files.load_arrays(data["path"], **split), None
    if name == "csv":
        return files.load_csv(data["path"], data["label_column"], **split), None
    if name == "images":
        size = data["size"] if isinstance(data["size"], int) else tuple(data["size"])
        labelled, _ = files.load_image_folder(data["path"], size,
                                              channels=data.get("channels", 3), **split)
        return labelled, None
    labelled, _, vocab = files.load_text_folder(data["path"], seq_len=data["seq_len"], **split)
    return labelled, vocab


def run_config(run: Path) -> Config:
    """The config of the run in ``run``, after checking that it is one."""
    if not run.is_dir():
        raise ConfigError(f"not an fnn run directory: {run} is not a directory")
    if not (run / "config.yaml").exists():
        raise ConfigError(f"not an fnn run directory: no config.yaml in {run}")
    return load_config(run / "config.yaml")


class Run(NamedTuple):
    """A run of ``fnn train`` at one checkpoint."""

    model: Any  # the config's model (with its precision policy): a GAN's generator
    params: Any  # its params: a diffusion model's moving average (what its samples use)
    state: Any
    config: Config
    vocab: Any  # fnn.data.Vocab of a run whose data has one (text, text_classes), else None
    step: int  # the checkpoint's step
    history: list[dict[str, Any]]  # the metrics rows up to that step
    example: Any = None  # the model's input for one example, [1, ...] (jax.ShapeDtypeStructs:
    #                      a GAN generator's latents, a diffusion model's (x_t, t, labels))
    learner: Any = None  # a generative run's fnn.train.Learner (its sample draws new examples)
    data_range: Any = None  # the smallest and largest training input (the samples' scale)
    train_state: Any = None  # what learner.sample reads: a TrainState of the params, state
    #                          and ema (its opt_state, step, key and counters are None)


def load_run(run_dir: str | Path, *, step: int | None = None) -> Run:
    """The run in ``run_dir`` at checkpoint ``step`` (default: the newest one that restores;
    a newer corrupt one is named in a warning and left as it is)."""
    import jax
    import numpy as np

    from fnn.core import as_spec
    from fnn.data import Vocab

    run = Path(run_dir)
    config = run_config(run)
    vocab = Vocab(read_vocab(run / "vocab.json")) if (run / "vocab.json").exists() else None
    filled: dict[str, Any] = {}
    data_range = None
    if (run / "inputs.json").exists():  # the model without the data
        example, filled, data_range = _read_inputs(run / "inputs.json")
    elif config.data["name"] in LANGUAGE_DATA:
        filled = {"vocab_size": _vocab_size(run, vocab)}
        example = np.zeros((1, config.data["seq_len"]), np.int32)
    else:  # a run without inputs.json: the data gives the input's shape and the classes
        task, filled, data_vocab = task_of(config)
        vocab = vocab or data_vocab
        example, data_range = task.example[:1], task.data_range
    if config.data["name"] in VOCAB_DATA:
        _vocab_size(run, vocab)  # the ids mean nothing without it
    if run_kind(config) != "supervised":
        return _load_generative(run, config, example, filled, data_range, step)
    model = build_model(config, **filled)
    like_params, like_state = jax.eval_shape(model.init, jax.random.key(0), as_spec(example))
    (params, state), meta, step = _restore(run, {"params": like_params, "state": like_state},
                                           step)
    return Run(model, params, state, config, vocab, step, list(meta.get("history", [])),
               as_spec(example))


def _restore(run: Path, likes: dict[str, Any], step: int | None):
    """The subtrees named by ``likes`` of a run's checkpoint ``step`` (default: the newest that
    restores, a newer corrupt one named in a warning), its metadata and its step."""
    from fnn.train.checkpoint import CheckpointError, restore_checkpoint, restore_latest_intact

    root = run / CHECKPOINTS
    names = list(likes)
    try:
        if step is None:
            first, meta, step, corrupt = restore_latest_intact(root, likes[names[0]],
                                                               subtree=names[0])
            for bad, reason in corrupt:
                warnings.warn(f"load_run: the checkpoint of step {bad} in {root} is corrupt "
                              f"({' '.join(reason.split())}); using step {step}", stacklevel=3)
        else:
            first, meta = restore_checkpoint(root, likes[names[0]], step=step, subtree=names[0])
        rest = [restore_checkpoint(root, likes[name], step=step, subtree=name)[0]
                for name in names[1:]]
    except CheckpointError as e:
        raise ConfigError(f"cannot load the run in {run}: {' '.join(str(e).split())}") from None
    return [first] + rest, meta, int(step)


def _load_generative(run: Path, config: Config, example, filled, data_range, step) -> Run:
    """A GAN or diffusion run: its learner and the parts of its train state that sampling
    reads (params, state, ema)."""
    import jax
    import optax

    from fnn.core import as_spec
    from fnn.train.state import TrainState
    from fnn.train.tasks import Task

    spec = as_spec(example)
    data_range = (0.0, 1.0) if data_range is None else data_range  # a run of fnn 0.1's data
    stand_in = Task(spec, 1, None, None, "test", {}, None, data_range)
    learner, model = learner_of(config, stand_in, filled, 1, optimizer=optax.identity())
    like = jax.eval_shape(learner.init, jax.random.key(0), spec)
    names = ["params", "state"] + (["ema"] if like.ema is not None else [])
    restored, meta, step = _restore(run, {name: getattr(like, name) for name in names}, step)
    parts = dict(zip(names, restored))
    ts = TrainState(parts["params"], parts["state"], None, None, None, None, None,
                    parts.get("ema"))
    if config.gan is not None:
        params, state = ts.params["generator"], ts.state["generator"]
    else:
        params, state = ts.ema, ts.state
    return Run(model, params, state, config, None, step, list(meta.get("history", [])),
               model_input(config, spec), learner=learner, train_state=ts,
               data_range=data_range)


SAMPLE_CHUNK = 250  # examples per call of a learner's sampler: bounds the memory a draw needs


def draw_samples(run: Run, num: int, key: Any, **options: Any) -> Any:
    """``num`` new examples from a generative run (:func:`load_run`) in the data's scale:
    :func:`draw_in_chunks` of its learner's ``sample``. What ``fnn sample`` writes and
    ``benchmarks/sample_quality.py`` judges, so the same seed gives both the same examples."""
    import functools

    if run.learner is None:
        raise ConfigError(f"draw_samples: the run trained {run.config.model['name']}, not a "
                          f"generative model")
    return draw_in_chunks(functools.partial(run.learner.sample, run.train_state), num, key,
                          **options)


def draw_in_chunks(sample: Any, num: int, key: Any, *, labels: Any = None,
                   **options: Any) -> Any:
    """``num`` examples of ``sample(key, n, labels=..., **options)``, float32, drawn in calls
    of one size, ``min(num, SAMPLE_CHUNK)`` (one compiled sampler; the extra examples of the
    last call are dropped): call ``i`` with ``fold_in(key, i)`` and its share of ``labels``
    (``int[num]``, repeated to fill the last call; none for an unconditional model)."""
    import jax
    import numpy as np

    size = min(num, SAMPLE_CHUNK)
    calls = -(-num // size)
    padded = None if labels is None else np.resize(np.asarray(labels), calls * size)
    parts = []
    for i in range(calls):
        given = {} if padded is None else {"labels": padded[i * size:(i + 1) * size]}
        parts.append(np.asarray(sample(jax.random.fold_in(key, i), size, **given, **options)))
    return np.concatenate(parts)[:num].astype(np.float32)


VOCAB_DATA = ("text", "text_classes")  # data whose ids are characters of a vocab.json


def _vocab_size(run: Path, vocab: Any) -> int:
    if vocab is None:
        raise ConfigError(f"{run}: no vocab.json: the run did not finish writing its files")
    return vocab.size


def inputs_of(task: Any, filled: dict[str, Any]) -> dict[str, Any]:
    """What ``inputs.json`` holds: one input's shape and dtype and the model arguments the data
    filled in (``vocab_size``, the number of classes)."""
    import numpy as np

    example = np.asarray(task.example[:1])
    data_range = None if task.data_range is None else list(task.data_range)
    return {"shape": list(example.shape), "dtype": example.dtype.name, "filled": filled,
            "data_range": data_range}


def _read_inputs(path: Path) -> tuple[Any, dict[str, Any], tuple[float, float] | None]:
    import jax
    import numpy as np

    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        spec = jax.ShapeDtypeStruct(tuple(int(n) for n in raw["shape"]), np.dtype(raw["dtype"]))
        filled = dict(raw["filled"])
        data_range = raw.get("data_range")  # absent in the runs of fnn 0.1
        if data_range is not None:
            low, high = (float(v) for v in data_range)
            data_range = (low, high)
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path} is not an inputs file of fnn's: "
                          f"{' '.join(str(e).split())}") from None
    return spec, filled, data_range


def start_weights(config: Config, model: Any, example: Any) -> tuple[Any, Any]:
    """The params and state a fresh run of ``config`` starts from: ``(None, None)`` (the
    model's init) without ``init``; with it, the params and state of the run ``init.from`` at
    the paths ``init.take`` matches, and everything else as the model's init makes it (with the
    key :func:`fnn.train.create_train_state` uses, so the new parts are those of a fresh run)."""
    if config.init is None:
        return None, None
    import jax

    from fnn.core import as_spec
    from fnn.train.groups import take

    try:
        source = load_run(config.init["from"])
    except (ConfigError, OSError) as e:
        raise ConfigError(f"init.from: {e}") from None
    init_key, _ = jax.random.split(jax.random.key(config.seed))
    params, state = jax.jit(model.init)(init_key, as_spec(example))
    try:
        return (take(params, source.params, config.init["take"]),
                take(state, source.state, config.init["take"], strict=False))
    except ValueError as e:
        raise ConfigError(f"init: from the run in {config.init['from']}: {e}") from None
