"""The values of a config, checked: each argument against the type its function declares (or its
default has), and the ranges that can be meant (a positive learning rate, a drop probability in
``[0, 1)``). Keys are checked in :mod:`fnn.app.config`; this module reads YAML numbers as users
write them (``1e-3``) and words every wrong value as one line naming the key, what it expects
and what it got.
"""

from __future__ import annotations

import inspect
import math
import re
from typing import Any, Callable, Mapping

import yaml


class ConfigError(ValueError):
    """A config that cannot be run: an unknown key, a missing one, or a value of the wrong type
    or range."""


class _Loader(yaml.SafeLoader):
    """YAML as users write it: PyYAML follows YAML 1.1, where ``1e-3`` (no dot) is a string;
    here it is the number 0.001, as in YAML 1.2, JSON and Python."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def load_yaml(text: str) -> Any:
    """``text`` parsed by :class:`_Loader`."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


# ----------------------------------------------------------------------------- types

def _describe(value: Any) -> str:
    """``'1e-3x' (a string)``: a value and its type, for messages."""
    kind = {str: "a string", bool: "a bool", int: "an int", float: "a number", list: "a list",
            dict: "a mapping", type(None): "null"}.get(type(value), type(value).__name__)
    return f"{value!r} ({kind})"


def _kind(param: inspect.Parameter) -> str:
    """What an argument takes: ``"int"``, ``"number"``, ``"bool"``, ``"str"``, ``"ints"`` (a
    list of ints) or ``"any"``, from its annotation or else from its default."""
    annotation = param.annotation
    text = annotation if isinstance(annotation, str) else str(annotation)
    text = re.sub(r"<class '(\w+)'>", r"\1", text).replace(" ", "")
    text = re.sub(r"\b(typing|collections\.abc)\.", "", text)
    text = re.sub(r"^Optional\[(.*)\]$", r"\1", text)
    parts = [p for p in re.split(r"\|", text) if p not in ("None", "NoneType")]
    core = "|".join(parts)
    simple = {"int": "int", "float": "number", "bool": "bool", "str": "str",
              "Sequence[int]": "ints", "tuple[int,...]": "ints", "list[int]": "ints"}
    if core in simple:
        return simple[core]
    if ("float" in core or "Array" in core) and "str" not in core:
        return "number"  # float | None, and optax's ScalarOrSchedule and Numeric
    default = param.default
    if isinstance(default, bool):
        return "bool"
    if isinstance(default, (int, float)):
        return "number"
    return "any"


def _fits(value: Any, kind: str) -> bool:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return {"int": isinstance(value, int) and not isinstance(value, bool),
            "number": number and math.isfinite(value),
            "bool": isinstance(value, bool),
            "str": isinstance(value, str),
            "ints": isinstance(value, (list, tuple)) and all(
                isinstance(v, int) and not isinstance(v, bool) for v in value),
            "any": True}[kind]


_EXPECTED = {"int": "an int", "number": "a finite number", "bool": "true or false",
             "str": "a string", "ints": "a list of ints", "any": "anything"}

# Ranges that can be meant, by argument name, wherever the argument appears.
_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "learning_rate": (lambda v: v > 0, "a positive number"),
    "weight_decay": (lambda v: v >= 0, "a number >= 0"),
    "end_value": (lambda v: v >= 0, "a number >= 0"),
    "eps": (lambda v: v >= 0, "a number >= 0"),
    "warmup_steps": (lambda v: v >= 0, "an int >= 0"),
    "dropout": (lambda v: 0 <= v < 1, "a drop probability in [0, 1)"),
    "attention_dropout": (lambda v: 0 <= v < 1, "a drop probability in [0, 1)"),
    "label_smoothing": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "momentum": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "b1": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "b2": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
}


def check_value(where: str, key: str, value: Any, kind: str) -> None:
    """Raises :class:`ConfigError` unless ``value`` is of ``kind`` and in the range its key
    allows: ``optimizer (adamw): learning_rate must be a positive number, got -0.1``."""
    if value is None:
        return  # null: the function's own default decides
    if not _fits(value, kind):
        raise ConfigError(f"{where}: {key} must be {_EXPECTED[kind]}, got {_describe(value)}")
    if key in _RANGES and kind in ("int", "number"):
        ok, expected = _RANGES[key]
        if not ok(value):
            raise ConfigError(f"{where}: {key} must be {expected}, got {value!r}")


def check_arguments(where: str, fn: Callable, kwargs: Mapping[str, Any], skip=()) -> None:
    """Every given argument of ``fn`` checked by :func:`check_value`."""
    params = inspect.signature(fn).parameters
    for key, value in kwargs.items():
        if key in params and key not in skip:
            check_value(where, key, value, _kind(params[key]))
