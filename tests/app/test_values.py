"""Config values: YAML numbers as users write them, types read from annotations and defaults,
ranges, and one-line messages naming the key, the expectation and the value."""

from typing import Optional, Sequence

import optax
import pytest

from fnn.app.values import ConfigError, check_arguments, check_value, load_yaml


@pytest.mark.parametrize("text, expected", [
    ("1e-3", 0.001), ("1E-3", 0.001), ("-2e4", -20000.0), ("+1.5e-2", 0.015), ("3.e1", 30.0),
    ("1_000e-3", 1.0), ("0.5", 0.5), ("7", 7), ("'1e-3'", "1e-3"), ("1e", "1e"),
    ("e3", "e3"), ("1e-3x", "1e-3x"),
])
def test_yaml_numbers_as_users_write_them(text, expected):
    value = load_yaml(f"v: {text}")["v"]
    assert value == expected
    assert type(value) is type(expected)


def test_yaml_loader_stays_safe():
    with pytest.raises(Exception, match="could not determine a constructor"):
        load_yaml("v: !!python/object/apply:os.system ['true']")


def _fn(a: int, b: float, c: bool, d: str, e: Sequence[int], f: Optional[float] = None,
        g=3, h=0.5, i=False, j=None, learning_rate: float = 0.1, dropout: float = 0.0,
        momentum=0.9, warmup_steps: int = 0):
    return a


@pytest.mark.parametrize("key, value", [
    ("a", 3), ("b", 2), ("b", 0.5), ("c", True), ("d", "x"), ("e", [1, 2]), ("e", []),
    ("f", 1e-3), ("f", None), ("g", 2.5), ("h", 1), ("i", False), ("j", {"any": "thing"}),
    ("learning_rate", 1e-9), ("dropout", 0.0), ("dropout", 0.99), ("momentum", 1.0),
    ("warmup_steps", 0),
])
def test_values_that_fit(key, value):
    check_arguments("model (f)", _fn, {key: value})


@pytest.mark.parametrize("key, value, message", [
    ("a", 2.0, "a must be an int, got 2.0 (a number)"),
    ("a", True, "a must be an int, got True (a bool)"),
    ("b", "1e-3x", "b must be a finite number, got '1e-3x' (a string)"),
    ("b", float("nan"), "b must be a finite number, got nan (a number)"),
    ("b", float("inf"), "b must be a finite number, got inf (a number)"),
    ("c", "yes please", "c must be true or false, got 'yes please' (a string)"),
    ("d", 3, "d must be a string, got 3 (an int)"),
    ("e", [1, 2.5], "e must be a list of ints, got [1, 2.5] (a list)"),
    ("e", 4, "e must be a list of ints, got 4 (an int)"),
    ("f", [1], "f must be a finite number, got [1] (a list)"),
    ("g", "three", "g must be a finite number, got 'three' (a string)"),
    ("i", 0, "i must be true or false, got 0 (an int)"),
    ("learning_rate", -0.1, "learning_rate must be a positive number, got -0.1"),
    ("learning_rate", 0, "learning_rate must be a positive number, got 0"),
    ("dropout", 1.0, r"dropout must be a drop probability in [0, 1), got 1.0"),
    ("dropout", -0.1, r"dropout must be a drop probability in [0, 1), got -0.1"),
    ("momentum", 1.5, r"momentum must be a number in [0, 1], got 1.5"),
    ("warmup_steps", -1, "warmup_steps must be an int >= 0, got -1"),
])
def test_values_that_do_not_fit(key, value, message):
    with pytest.raises(ConfigError) as info:
        check_arguments("model (f)", _fn, {key: value})
    assert str(info.value) == f"model (f): {message}"


def test_unknown_and_skipped_keys_are_left_to_the_key_check():
    check_arguments("x", _fn, {"not_an_argument": "anything", "a": "skipped"}, skip=("a",))


def test_optax_annotations_are_understood():
    """optax declares ``learning_rate: ScalarOrSchedule`` and ``b1: float``."""
    check_arguments("optimizer (adamw)", optax.adamw, {"learning_rate": 1e-3, "b1": 0.9,
                                                      "weight_decay": 0.0})
    with pytest.raises(ConfigError, match=r"^optimizer \(adamw\): learning_rate must be a "
                                          r"finite number, got '1e-3x' \(a string\)$"):
        check_arguments("optimizer (adamw)", optax.adamw, {"learning_rate": "1e-3x"})
    with pytest.raises(ConfigError, match=r"^optimizer \(adamw\): b2 must be a number in "
                                          r"\[0, 1\), got 1\.0$"):
        check_arguments("optimizer (adamw)", optax.adamw, {"b2": 1.0})


def test_check_value_ignores_null_and_ranges_only_numbers():
    check_value("x", "learning_rate", None, "number")
    check_value("x", "dropout", "anything", "any")  # no range check on a value of no kind
    with pytest.raises(ConfigError, match="^x: learning_rate must be a positive number"):
        check_value("x", "learning_rate", -1, "int")
