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

from fnn.app.config import (LANGUAGE_DATA, MODEL_DATA, Config, ConfigError, build_model,
                            load_config)
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
    if vocab is not None:  # ids 1..size are characters, 0 padding, size + 1 unknown
        from fnn.data.files import num_text_ids

        filled["vocab_size"] = num_text_ids(vocab)
    return task, filled, vocab


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

    model: Any  # the config's model (with its precision policy)
    params: Any
    state: Any
    config: Config
    vocab: Any  # fnn.data.Vocab of a run whose data has one (text, text_classes), else None
    step: int  # the checkpoint's step
    history: list[dict[str, Any]]  # the metrics rows up to that step
    example: Any = None  # one input's shape and dtype, [1, ...] (a jax.ShapeDtypeStruct)


def load_run(run_dir: str | Path, *, step: int | None = None) -> Run:
    """The run in ``run_dir`` at checkpoint ``step`` (default: the newest one that restores;
    a newer corrupt one is named in a warning and left as it is)."""
    import jax
    import numpy as np

    from fnn.core import as_spec
    from fnn.data import Vocab
    from fnn.train.checkpoint import CheckpointError, restore_checkpoint, restore_latest_intact

    run = Path(run_dir)
    config = run_config(run)
    vocab = Vocab(read_vocab(run / "vocab.json")) if (run / "vocab.json").exists() else None
    filled: dict[str, Any] = {}
    if (run / "inputs.json").exists():  # the model without the data
        example, filled = _read_inputs(run / "inputs.json")
    elif config.data["name"] in LANGUAGE_DATA:
        filled = {"vocab_size": _vocab_size(run, vocab)}
        example = np.zeros((1, config.data["seq_len"]), np.int32)
    else:  # a run without inputs.json: the data gives the input's shape and the classes
        task, filled, data_vocab = task_of(config)
        vocab = vocab or data_vocab
        example = task.example[:1]
    if config.data["name"] in VOCAB_DATA:
        _vocab_size(run, vocab)  # the ids mean nothing without it
    model = build_model(config, **filled)
    like_params, like_state = jax.eval_shape(model.init, jax.random.key(0), as_spec(example))
    root = run / CHECKPOINTS
    try:
        if step is None:
            params, meta, step, corrupt = restore_latest_intact(root, like_params,
                                                                subtree="params")
            for bad, reason in corrupt:
                warnings.warn(f"load_run: the checkpoint of step {bad} in {root} is corrupt "
                              f"({' '.join(reason.split())}); using step {step}", stacklevel=2)
        else:
            params, meta = restore_checkpoint(root, like_params, step=step, subtree="params")
        state, _ = restore_checkpoint(root, like_state, step=step, subtree="state")
    except CheckpointError as e:
        raise ConfigError(f"cannot load the run in {run}: {' '.join(str(e).split())}") from None
    return Run(model, params, state, config, vocab, int(step), list(meta.get("history", [])),
               as_spec(example))


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
    return {"shape": list(example.shape), "dtype": example.dtype.name, "filled": filled}


def _read_inputs(path: Path) -> tuple[Any, dict[str, Any]]:
    import jax
    import numpy as np

    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        spec = jax.ShapeDtypeStruct(tuple(int(n) for n in raw["shape"]), np.dtype(raw["dtype"]))
        filled = dict(raw["filled"])
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path} is not an inputs file of fnn's: "
                          f"{' '.join(str(e).split())}") from None
    return spec, filled


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
