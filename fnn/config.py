"""Run configurations for ``fnn train``: YAML files in ``configs/``, checked strictly.

A config has these sections (see ``configs/digits_cnn.yaml``)::

    model:     {name: lenet, ...keyword arguments of the model factory}
    data:      {name: digits, batch_size: 64}
    optimizer: {name: adamw, learning_rate: 0.002, ...keyword arguments of the optax optimizer}
    schedule:  {name: cosine, warmup_steps: 0}       # constant | cosine
    loss:      {name: softmax_cross_entropy, ...keyword arguments of the loss}
    epochs: 30
    seed: 0
    output_dir: runs/digits_cnn

Every key is checked: an unknown or mistyped key raises :class:`ConfigError` naming it, where it
is, and the closest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
from pathlib import Path
from typing import Any, Callable, Mapping

import optax

from fnn.losses import LOSSES
from fnn.models import MLP, LeNet, ResNet

MODELS: dict[str, Callable] = {"mlp": MLP, "lenet": LeNet, "resnet": ResNet}
OPTIMIZERS: dict[str, Callable] = {
    "adam": optax.adam, "adamw": optax.adamw, "sgd": optax.sgd, "rmsprop": optax.rmsprop,
    "lamb": optax.lamb, "lion": optax.lion, "adafactor": optax.adafactor,
}
SCHEDULES = {"constant": {"warmup_steps"}, "cosine": {"warmup_steps", "end_value"}}
DATASETS = {"digits": {"batch_size"}}


class ConfigError(ValueError):
    """A config that cannot be run: an unknown key, a missing one, or a value of the wrong type."""


@dataclasses.dataclass(frozen=True)
class Config:
    model: dict[str, Any]  # factory name and its keyword arguments
    data: dict[str, Any]  # data set name and batch_size
    optimizer: dict[str, Any]  # optax optimizer name and its keyword arguments
    schedule: dict[str, Any]  # learning-rate schedule over the whole run
    loss: dict[str, Any]  # loss name and its keyword arguments
    epochs: int  # passes over the training set
    seed: int  # initialisation, shuffling and dropout all derive from it
    output_dir: str  # where metrics.jsonl and plot.png are written


_TOP_LEVEL = {f.name: f.type for f in dataclasses.fields(Config)}
_SCALARS = {"epochs": int, "seed": int, "output_dir": str}


def _unknown(where: str, key: str, allowed: set[str]) -> ConfigError:
    close = difflib.get_close_matches(key, sorted(allowed), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown key {key!r} in {where}{hint} (allowed: {', '.join(sorted(allowed))})")


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


def parse_config(raw: Any) -> Config:
    """Checks a config given as a mapping (e.g. loaded from YAML) and returns it."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"a config must be a mapping of sections, got {type(raw).__name__}")
    _check_keys("the config", raw, set(_TOP_LEVEL))
    missing = [key for key in _TOP_LEVEL if key not in raw]
    if missing:
        raise ConfigError(f"the config is missing {', '.join(missing)}")
    for key, kind in _SCALARS.items():
        if not isinstance(raw[key], kind) or isinstance(raw[key], bool):
            raise ConfigError(f"{key} must be {kind.__name__}, got {raw[key]!r}")
    if raw["epochs"] <= 0:
        raise ConfigError(f"epochs must be positive, got {raw['epochs']}")

    model_name, model_kwargs = _named_section(raw, "model", MODELS)
    _check_signature(f"model ({model_name})", MODELS[model_name], model_kwargs)
    data_name, data_kwargs = _named_section(raw, "data", DATASETS)
    _check_keys(f"data ({data_name})", data_kwargs, DATASETS[data_name])
    if not isinstance(data_kwargs.get("batch_size"), int) or data_kwargs["batch_size"] <= 0:
        raise ConfigError(f"data.batch_size must be a positive int, got "
                          f"{data_kwargs.get('batch_size')!r}")
    opt_name, opt_kwargs = _named_section(raw, "optimizer", OPTIMIZERS)
    _check_signature(f"optimizer ({opt_name})", OPTIMIZERS[opt_name], opt_kwargs)
    schedule_name, schedule_kwargs = _named_section(raw, "schedule", SCHEDULES)
    _check_keys(f"schedule ({schedule_name})", schedule_kwargs, SCHEDULES[schedule_name])
    loss_name, loss_kwargs = _named_section(raw, "loss", LOSSES)
    _check_signature(f"loss ({loss_name})", LOSSES[loss_name], loss_kwargs,
                     skip=("logits", "labels", "predictions", "targets"))
    return Config(**{key: dict(raw[key]) if isinstance(raw[key], Mapping) else raw[key]
                     for key in _TOP_LEVEL})


def load_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> Config:
    """Reads and checks a YAML config; ``overrides`` replace top-level scalars (e.g. epochs)."""
    import yaml

    text = Path(path).read_text()
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if isinstance(raw, dict) and overrides:
        raw = raw | dict(overrides)
    try:
        return parse_config(raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e


def build_schedule(config: Config, total_steps: int) -> optax.Schedule:
    """The learning-rate schedule: ``optimizer.learning_rate`` shaped by ``schedule``."""
    lr = config.optimizer["learning_rate"]
    kwargs = {k: v for k, v in config.schedule.items() if k != "name"}
    warmup = kwargs.get("warmup_steps", 0)
    if config.schedule["name"] == "constant":
        return optax.linear_schedule(0.0, lr, warmup) if warmup else optax.constant_schedule(lr)
    return optax.warmup_cosine_decay_schedule(0.0 if warmup else lr, lr, warmup, total_steps,
                                              kwargs.get("end_value", 0.0))


def build_optimizer(config: Config, total_steps: int) -> optax.GradientTransformation:
    kwargs = {k: v for k, v in config.optimizer.items() if k not in ("name", "learning_rate")}
    return OPTIMIZERS[config.optimizer["name"]](build_schedule(config, total_steps), **kwargs)


def build_model(config: Config):
    kwargs = {k: v for k, v in config.model.items() if k != "name"}
    return MODELS[config.model["name"]](**kwargs)


def build_loss(config: Config):
    kwargs = {k: v for k, v in config.loss.items() if k != "name"}
    fn = LOSSES[config.loss["name"]]
    return lambda outputs, targets: fn(outputs, targets, **kwargs)
