"""The README's Python examples run, in order, and show what they claim."""

import re
import textwrap
from pathlib import Path

import jax

import fnn

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_readme_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    # the functional API, side inputs, writing your own layer, PyTorch weights, LoRA and export
    assert len(blocks) == 5
    namespace: dict = {}
    with jax.numpy_dtype_promotion("standard"):  # as a user would run it
        for i, code in enumerate(blocks):
            exec(compile(textwrap.dedent(code), f"README.md (example {i + 1})", "exec"),
                 namespace)
    shapes = jax.tree.map(lambda a: a.shape, namespace["params"])
    assert shapes == {"0": {"b": (32,), "w": (3, 3, 1, 32)}, "4": {"b": (128,), "w": (512, 128)},
                      "head": {"b": (10,), "w": (128, 10)}}
    assert namespace["per_example"].shape == (64, 10)
    assert set(namespace["metrics"]) == {"loss", "accuracy", "skipped", "bad_streak"}
    # side inputs
    out, y = namespace["out"], namespace["y"]
    assert isinstance(out, fnn.Seq) and out.x.shape == (2, 7, 5)
    # past its length the LSTMs output zero, so the head gives its bias
    assert float(abs(out.x[1, 3:] - namespace["rnn_params"]["head"]["b"][None]).max()) == 0.0
    assert isinstance(y, fnn.Seq) and y.x.shape == (2, 7, 16) and y.memory is not None
    # your own layers
    assert int(namespace["custom_state"]["1"]["calls"]) == 1
    # PyTorch weights: torch's [out, in] transposed, the same layout back
    assert namespace["ported"]["0"]["w"].shape == (4, 8)
    # 8 hidden units of 4 each
    assert namespace["logits"].shape == (3, 2) and float(namespace["logits"][0, 0]) == 32.0
    assert namespace["back"]["2.weight"].shape == (2, 8)
    # LoRA starts as the base; its merge is the base's tree; the export serves any batch
    assert jax.tree.structure(namespace["merged"]) == jax.tree.structure(namespace["ported"])
    assert namespace["served"].shape == (5, 2) and float(namespace["served"][0, 0]) == 32.0
    custom = jax.tree.map(lambda a: a.shape, namespace["custom_params"])
    assert custom == {"0": {"scale": (16,)},
                      "2": {"body": {"b": (16,), "w": (16, 16)}, "gate": {"b": (1,),
                                                                         "w": (16, 1)}}}
