"""Run configurations for ``fnn train``: YAML files in ``configs/``, checked strictly.

A config has these sections (see ``configs/digits_cnn.yaml``)::

    model:     {name: lenet, ...keyword arguments of the model factory}
    data:      {name: digits, batch_size: 64}    # or {name: text, batch_size, seq_len, path}
    optimizer: {name: adamw, learning_rate: 0.002, ...keyword arguments of the optax optimizer}
    schedule:  {name: cosine, warmup_steps: 0}       # constant | cosine
    loss:      {name: softmax_cross_entropy, ...keyword arguments of the loss}
    epochs: 30
    seed: 0
    output_dir: runs/digits_cnn
    # optional, with their defaults:
    parallel: {mode: none, devices: null}  # none | pmap | sharded; devices: how many (null: all)
    precision: float32                     # or bfloat16 / float16: compute dtype, f32 params
    checkpoint: {every: null, keep: 3}     # save every N steps (and at the end); keep the last K
    max_bad_steps: 10                      # stop after this many non-finite steps in a row
    host_malloc: default                   # or tuned: see fnn.app.runtime.tune_host_malloc

Every key is checked: an unknown or mistyped key raises :class:`ConfigError` naming it, where it
is, and the closest valid key. Every value is checked too (:mod:`fnn.app.values`): its type
against what the function it is given to takes (``learning_rate: 1e-3`` is a number, as users
write it), its range where one can be meant (a positive learning rate, a drop probability in
``[0, 1)``), the model's hyper-parameters by building the model (no JAX computation), and
``data.seq_len`` against the model's ``max_length``. Language models (``charlstm``, ``gpt``)
train on ``text`` data (the bundled corpus, or the UTF-8 file at ``data.path``); their
``vocab_size`` comes from the data. The other models train on ``digits``.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
from pathlib import Path
from typing import Any, Callable, Mapping

import optax

from fnn.app.values import ConfigError, check_arguments, check_value, load_yaml
from fnn.losses import LOSSES
from fnn.models import GPT, MLP, CharLSTM, LeNet, ResNet, ViT
from fnn.train.parallel import MODES

__all__ = ["Config", "ConfigError", "parse_config", "load_config", "build_model",
           "build_optimizer", "build_schedule", "build_loss", "MODELS", "MODEL_DATA",
           "OPTIMIZERS", "SCHEDULES", "PRECISIONS", "HOST_MALLOC", "DATASETS"]

MODELS: dict[str, Callable] = {"mlp": MLP, "lenet": LeNet, "resnet": ResNet, "vit": ViT,
                               "charlstm": CharLSTM, "gpt": GPT}
# the data each model trains on, and the model arguments that the data fills in
MODEL_DATA: dict[str, tuple[str, tuple[str, ...]]] = {
    "mlp": ("digits", ()), "lenet": ("digits", ()), "resnet": ("digits", ()),
    "vit": ("digits", ()), "charlstm": ("text", ("vocab_size",)),
    "gpt": ("text", ("vocab_size",)),
}
OPTIMIZERS: dict[str, Callable] = {
    "adam": optax.adam, "adamw": optax.adamw, "sgd": optax.sgd, "rmsprop": optax.rmsprop,
    "lamb": optax.lamb, "lion": optax.lion, "adafactor": optax.adafactor,
}
SCHEDULES = {"constant": {"warmup_steps"}, "cosine": {"warmup_steps", "end_value"}}
PRECISIONS = ("float32", "bfloat16", "float16")  # presets of fnn.precision.Policy.parse
HOST_MALLOC = ("default", "tuned")  # tuned: fnn.app.runtime.tune_host_malloc, set by `fnn train`
# each data set's keys: required and optional
DATASETS = {"digits": ({"batch_size"}, set()),
            "text": ({"batch_size", "seq_len"}, {"path", "eval_batch_size"})}
_OPTIONAL = {"parallel": {"mode": "none", "devices": None}, "precision": "float32",
             "checkpoint": {"every": None, "keep": 3}, "max_bad_steps": 10,
             "host_malloc": "default"}


@dataclasses.dataclass(frozen=True)
class Config:
    model: dict[str, Any]  # factory name and its keyword arguments
    data: dict[str, Any]  # data set name and batch_size
    optimizer: dict[str, Any]  # optax optimizer name and its keyword arguments
    schedule: dict[str, Any]  # learning-rate schedule over the whole run
    loss: dict[str, Any]  # loss name and its keyword arguments
    epochs: int  # passes over the training set
    seed: int  # initialisation, shuffling and dropout all derive from it
    output_dir: str  # where metrics.jsonl, plot.png and checkpoints/ are written
    parallel: dict[str, Any]  # {"mode": none | pmap | sharded, "devices": int or None (all)}
    precision: str  # float32 | bfloat16 | float16 (the compute dtype; params stay float32)
    checkpoint: dict[str, Any]  # {"every": steps or None (only at the end), "keep": K}
    max_bad_steps: int  # consecutive non-finite steps before the run stops
    host_malloc: str  # default | tuned (glibc keeps freed memory: big steps stop faulting)


_TOP_LEVEL = {f.name: f.type for f in dataclasses.fields(Config)}
_REQUIRED = [key for key in _TOP_LEVEL if key not in _OPTIONAL]
_SCALARS = {"epochs": int, "seed": int, "output_dir": str, "precision": str,
            "max_bad_steps": int, "host_malloc": str}


def _unknown(where: str, key: str, allowed: set[str]) -> ConfigError:
    close = difflib.get_close_matches(key, sorted(allowed), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    listing = ", ".join(sorted(allowed))
    return ConfigError(f"unknown key {key!r} in {where}{hint} (allowed: {listing})")


def _check_keys(where: str, given: Mapping[str, Any], allowed: set[str]) -> None:
    for key in given:
        if key not in allowed:
            raise _unknown(where, key, allowed)


def _named_section(config: Mapping[str, Any], section: str, choices: Mapping[str, Any]
                   ) -> tuple[str, dict[str, Any]]:
    value = config[section]
    if not isinstance(value, Mapping) or "name" not in value:
        raise ConfigError(f"{section} must be a mapping with a 'name' (one of "
                          f"{', '.join(sorted(choices))}), got {value!r}")
    name = value["name"]
    if name not in choices:
        raise _unknown(f"{section}.name", str(name), set(choices))
    return name, {k: v for k, v in value.items() if k != "name"}


def _check_signature(where: str, fn: Callable, kwargs: Mapping[str, Any], skip=()) -> None:
    params = inspect.signature(fn).parameters
    allowed = {name for name, p in params.items()
               if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and name not in skip}
    _check_keys(where, kwargs, allowed)
    missing = [name for name, p in params.items() if p.default is p.empty
               and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
               and name not in kwargs and name not in skip]
    if missing:
        raise ConfigError(f"{where} is missing {', '.join(missing)}")


def _positive_or_none(where: str, value: Any, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{where} must be a positive int{' or null' if allow_none else ''}, "
                          f"got {value!r}")


def _options(section: str, value: Any, defaults: Mapping[str, Any],
             shorthand: str | None = None) -> dict[str, Any]:
    """A section of optional keys: a mapping checked against ``defaults`` (missing keys take
    the default), or a bare value for the ``shorthand`` key (``parallel: pmap``)."""
    if shorthand is not None and not isinstance(value, Mapping):
        value = {shorthand: value}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{section} must be a mapping with keys {', '.join(defaults)}, got "
                          f"{value!r}")
    _check_keys(section, value, set(defaults))
    return dict(defaults) | dict(value)


def parse_config(raw: Any) -> Config:
    """Checks a config given as a mapping (e.g. loaded from YAML) and returns it."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"a config must be a mapping of sections, got {type(raw).__name__}")
    _check_keys("the config", raw, set(_TOP_LEVEL))
    missing = [key for key in _REQUIRED if key not in raw]
    if missing:
        raise ConfigError(f"the config is missing {', '.join(missing)}")
    raw = {key: raw.get(key, default) for key, default in _OPTIONAL.items()} | dict(raw)
    for key, kind in _SCALARS.items():
        if not isinstance(raw[key], kind) or isinstance(raw[key], bool):
            raise ConfigError(f"{key} must be {kind.__name__}, got {raw[key]!r}")
    for key in ("epochs", "max_bad_steps"):
        if raw[key] <= 0:
            raise ConfigError(f"{key} must be positive, got {raw[key]}")
    if raw["precision"] not in PRECISIONS:
        raise _unknown("precision", raw["precision"], set(PRECISIONS))
    if raw["host_malloc"] not in HOST_MALLOC:
        raise _unknown("host_malloc", raw["host_malloc"], set(HOST_MALLOC))
    parallel = _options("parallel", raw["parallel"], _OPTIONAL["parallel"], shorthand="mode")
    if parallel["mode"] not in MODES:
        raise _unknown("parallel.mode", str(parallel["mode"]), set(MODES))
    _positive_or_none("parallel.devices", parallel["devices"])
    if parallel["mode"] == "none" and (parallel["devices"] or 1) > 1:
        raise ConfigError(f"parallel.devices is {parallel['devices']} but parallel.mode is none "
                          f"(one device): give a mode, pmap or sharded (--parallel)")
    checkpoint = _options("checkpoint", raw["checkpoint"], _OPTIONAL["checkpoint"])
    _positive_or_none("checkpoint.every", checkpoint["every"])
    _positive_or_none("checkpoint.keep", checkpoint["keep"], allow_none=False)
    raw |= {"parallel": parallel, "checkpoint": checkpoint}

    model_name, model_kwargs = _named_section(raw, "model", MODELS)
    data_name, data_kwargs = _named_section(raw, "data", DATASETS)
    wanted_data, filled = MODEL_DATA[model_name]
    if data_name != wanted_data:
        raise ConfigError(f"model {model_name} trains on data {wanted_data!r}, got data "
                          f"{data_name!r}")
    for key in filled:
        if key in model_kwargs:
            raise ConfigError(f"model ({model_name}): {key} comes from the data; remove it")
    _check_signature(f"model ({model_name})", MODELS[model_name], model_kwargs, skip=filled)
    check_arguments(f"model ({model_name})", MODELS[model_name], model_kwargs)
    required, optional = DATASETS[data_name]
    _check_keys(f"data ({data_name})", data_kwargs, required | optional)
    for key in sorted(required):
        if key not in data_kwargs:
            raise ConfigError(f"data ({data_name}) is missing {key}")
    for key in sorted((required | optional) - {"path"}):
        if key in data_kwargs:
            _positive_or_none(f"data.{key}", data_kwargs[key], allow_none=False)
    if data_kwargs.get("path") is not None and not isinstance(data_kwargs["path"], str):
        raise ConfigError(f"data.path must be a file path, got {data_kwargs['path']!r}")
    opt_name, opt_kwargs = _named_section(raw, "optimizer", OPTIMIZERS)
    _check_signature(f"optimizer ({opt_name})", OPTIMIZERS[opt_name], opt_kwargs)
    if "learning_rate" not in opt_kwargs:  # the schedule is built from it
        raise ConfigError(f"optimizer ({opt_name}) is missing learning_rate")
    check_arguments(f"optimizer ({opt_name})", OPTIMIZERS[opt_name], opt_kwargs)
    check_value(f"optimizer ({opt_name})", "learning_rate", opt_kwargs["learning_rate"],
                "number")
    schedule_name, schedule_kwargs = _named_section(raw, "schedule", SCHEDULES)
    _check_keys(f"schedule ({schedule_name})", schedule_kwargs, SCHEDULES[schedule_name])
    for key, kind in (("warmup_steps", "int"), ("end_value", "number")):
        if key in schedule_kwargs:
            check_value(f"schedule ({schedule_name})", key, schedule_kwargs[key], kind)
    loss_name, loss_kwargs = _named_section(raw, "loss", LOSSES)
    _check_signature(f"loss ({loss_name})", LOSSES[loss_name], loss_kwargs,
                     skip=("logits", "labels", "predictions", "targets"))
    check_arguments(f"loss ({loss_name})", LOSSES[loss_name], loss_kwargs)
    config = Config(**{key: dict(raw[key]) if isinstance(raw[key], Mapping) else raw[key]
                       for key in _TOP_LEVEL})
    _check_model(config)
    return config


def _check_model(config: Config) -> None:
    """Builds the model (closures only: no JAX computation) so that its own checks of its
    hyper-parameters run now, and checks the data's windows against its ``max_length``."""
    name = config.model["name"]
    filled = {key: 2 for key in MODEL_DATA[name][1]}  # stand-ins for what the data fills in
    try:
        build_model(config, **filled)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"model ({name}): {e}") from None
    params = inspect.signature(MODELS[name]).parameters
    if "max_length" in params and "seq_len" in config.data:
        max_length = config.model.get("max_length", params["max_length"].default)
        if config.data["seq_len"] > max_length:
            raise ConfigError(f"data.seq_len ({config.data['seq_len']}) must be at most the "
                              f"model's max_length ({max_length}): a window longer than the "
                              f"position table cannot be embedded")


def load_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> Config:
    """Reads and checks a YAML config; ``overrides`` replace top-level scalars (e.g. epochs)."""
    import yaml

    if Path(path).is_dir():
        raise ConfigError(f"{path} is a directory, not a config file")
    text = Path(path).read_text(encoding="utf-8")
    try:
        raw = load_yaml(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from e
    if isinstance(raw, dict) and overrides:
        raw = _merge(raw, overrides)
    try:
        return parse_config(raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e


def _merge(raw: dict, overrides: Mapping[str, Any]) -> dict:
    """``raw`` with ``overrides``: a mapping given for a section (``parallel: {devices: 4}``)
    updates that section's keys rather than replacing it (a bare value, ``parallel: pmap``, is
    the section's shorthand and counts as a mapping of it)."""
    merged = dict(raw)
    for key, value in overrides.items():
        base = merged.get(key)
        if key == "parallel" and isinstance(base, str):
            base = {"mode": base}
        merged[key] = (dict(base) | dict(value) if isinstance(base, Mapping)
                       and isinstance(value, Mapping) else value)
    return merged


def build_schedule(config: Config, total_steps: int) -> optax.Schedule:
    """The learning-rate schedule: ``optimizer.learning_rate`` shaped by ``schedule``."""
    lr = config.optimizer["learning_rate"]
    kwargs = {k: v for k, v in config.schedule.items() if k != "name"}
    warmup = kwargs.get("warmup_steps", 0)
    if warmup >= total_steps:
        raise ConfigError(f"schedule.warmup_steps ({warmup}) must be less than the run's "
                          f"{total_steps} steps (epochs x batches per epoch)")
    if config.schedule["name"] == "constant":
        return optax.linear_schedule(0.0, lr, warmup) if warmup else optax.constant_schedule(lr)
    return optax.warmup_cosine_decay_schedule(0.0 if warmup else lr, lr, warmup, total_steps,
                                              kwargs.get("end_value", 0.0))


def build_optimizer(config: Config, total_steps: int) -> optax.GradientTransformation:
    kwargs = {k: v for k, v in config.optimizer.items() if k not in ("name", "learning_rate")}
    return OPTIMIZERS[config.optimizer["name"]](build_schedule(config, total_steps), **kwargs)


def build_model(config: Config, **filled: Any):
    """The config's model, wrapped in its precision policy. ``filled``: the arguments that come
    from the data (``vocab_size``). (Under ``parallel: pmap`` fnn's data-parallel step makes
    BatchNorm average its statistics over the devices, as in Python.)"""
    from fnn.precision import Policy, with_policy

    name = config.model["name"]
    kwargs = {k: v for k, v in config.model.items() if k != "name"} | filled
    model = MODELS[name](**kwargs)
    return model if config.precision == "float32" else with_policy(
        model, Policy.parse(config.precision))


def build_loss(config: Config):
    kwargs = {k: v for k, v in config.loss.items() if k != "name"}
    fn = LOSSES[config.loss["name"]]
    return lambda outputs, targets: fn(outputs, targets, **kwargs)
