"""The README's Python example runs and shows the param tree it claims."""

import re
from pathlib import Path

import jax

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_readme_example_runs():
    code = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    namespace: dict = {}
    with jax.numpy_dtype_promotion("standard"):  # as a user would run it
        exec(compile(code, "README.md", "exec"), namespace)
    shapes = jax.tree.map(lambda a: a.shape, namespace["params"])
    assert shapes == {"0": {"b": (32,), "w": (3, 3, 1, 32)}, "4": {"b": (128,), "w": (512, 128)},
                      "head": {"b": (10,), "w": (128, 10)}}
    assert namespace["per_example"].shape == (64, 10)
    assert set(namespace["metrics"]) == {"loss", "accuracy", "skipped", "bad_streak"}
