"""Deployment with jax.export: a CNN and a GPT exported, saved, loaded and called give the
model's outputs, also in a process that has only JAX; any batch size with a symbolic batch;
weights as constants or as an argument read from safetensors; a run of ``fnn train``; and the
errors (a refused overwrite, a corrupt file, inputs that do not fit)."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from helpers import rand, run

from fnn.combinators import serial
from fnn.core import Layer, Seq
from fnn.interop.export import (ExportError, ExportedFunction, export_model, exported_weights,
                                load_exported, save_exported)
from fnn.interop.weights import read_safetensors, save_safetensors
from fnn.layers import BatchNorm, Conv, Dense, Flatten, Relu
from fnn.models import GPT, LeNet

TOL = 1e-6
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cnn():
    """A LeNet on digits-shaped input, with dropout (the export must be eval mode)."""
    model = LeNet(10, features=(8, 16), kernel_size=3, hidden_features=32, dropout=0.25)
    x = rand((4, 8, 8, 1))
    params, state = jax.jit(model.init)(jax.random.key(0), x)
    return model, params, state, x


@pytest.fixture(scope="module")
def gpt():
    model = GPT(50, features=16, num_heads=2, num_layers=2, hidden_features=32, max_length=12)
    ids = np.random.default_rng(0).integers(0, 50, (3, 12)).astype(np.int32)
    params, state = jax.jit(model.init)(jax.random.key(1), ids)
    return model, params, state, ids


def _forward(model, params, state, x):
    """``model.apply(params, state, x)[0]``, jitted once per model and shape."""
    return run(model, params, x, state)[0]


def _round_trip(tmp_path, exported, name="model.jaxexport"):
    return load_exported(save_exported(tmp_path / name, exported))


def test_a_cnn_saved_and_loaded_gives_the_models_outputs(tmp_path, cnn):
    model, params, state, x = cnn
    predict = _round_trip(tmp_path, export_model(model, params, state, x))
    assert predict.exported.in_avals[0].shape == (4, 8, 8, 1)
    np.testing.assert_allclose(predict(x), _forward(model, params, state, x), rtol=0, atol=TOL)
    assert repr(predict) == (f"ExportedFunction(LeNet: (float32[4, 8, 8, 1]) -> "
                             f"(float32[4, 10]) on cpu, from {tmp_path / 'model.jaxexport'})")


def test_a_symbolic_batch_takes_any_batch_size(tmp_path, cnn):
    model, params, state, _ = cnn
    spec = jax.ShapeDtypeStruct((1, 8, 8, 1), jnp.float32)
    predict = _round_trip(tmp_path, export_model(model, params, state, spec, batch_size="b"))
    assert predict.signature() == ("float32[b, 8, 8, 1]", "float32[b, 10]")
    for batch in (1, 7):
        x = rand((batch, 8, 8, 1), seed=batch)
        np.testing.assert_allclose(predict(x), _forward(model, params, state, x), rtol=0,
                                   atol=TOL)


def test_a_gpt_takes_int32_tokens_at_two_batch_sizes(tmp_path, gpt):
    model, params, state, ids = gpt
    predict = _round_trip(tmp_path, export_model(model, params, state, ids, batch_size="b"))
    assert predict.signature() == ("int32[b, 12]", "float32[b, 12, 50]")
    for batch in (3, 1):
        np.testing.assert_allclose(predict(ids[:batch]), _forward(model, params, state,
                                                                  ids[:batch]),
                                   rtol=0, atol=TOL)
    with pytest.raises(ExportError, match=r"expected inputs \(int32\[b, 12\]\), got "
                                          r"\(float32\[3, 12\]\): Dtype mismatch"):
        predict(ids.astype(np.float32))


# a program that knows nothing of fnn: it reads each NAME.jaxexport and runs it on NAME.npy
_JAX_ONLY = """
import json, sys
import numpy as np
from jax import export
outputs = {}
for name in sys.argv[1:]:
    with open(name + ".jaxexport", "rb") as f:
        exported = export.deserialize(bytearray(f.read()))
    outputs[name] = np.asarray(exported.call(np.load(name + ".npy"))).tolist()
assert "fnn" not in sys.modules, sorted(m for m in sys.modules if m.startswith("fnn"))
print(json.dumps(outputs))
"""


def test_a_process_with_jax_alone_runs_the_saved_files(tmp_path, cnn, gpt):
    expected = {}
    for name, (model, params, state, x), batch in (("cnn", cnn, 3), ("gpt", gpt, 2)):
        save_exported(tmp_path / f"{name}.jaxexport",
                      export_model(model, params, state, x, batch_size="b"))
        np.save(tmp_path / f"{name}.npy", x[:batch])  # another batch size than exported with
        expected[name] = _forward(model, params, state, x[:batch])
    result = subprocess.run([sys.executable, "-c", _JAX_ONLY, "cnn", "gpt"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    outputs = json.loads(result.stdout)
    for name, want in expected.items():
        np.testing.assert_allclose(np.array(outputs[name], np.float32), want, rtol=0, atol=TOL)


def _batchnorm_cnn():
    """A CNN with state (BatchNorm's running statistics, made random so that they matter)."""
    model = serial(Conv(4, (3, 3)), BatchNorm(), Relu(), Flatten(-3), Dense(10))
    x = rand((2, 8, 8, 1))
    params, state = jax.jit(model.init)(jax.random.key(2), x)
    state = jax.tree.map(lambda a: jnp.asarray(rand(a.shape, seed=9, low=0.5)), state)
    return model, params, state, x


def test_embedded_weights_include_the_state(tmp_path):
    model, params, state, x = _batchnorm_cnn()
    predict = _round_trip(tmp_path, export_model(model, params, state, x))
    np.testing.assert_allclose(predict(x), _forward(model, params, state, x), rtol=0, atol=TOL)
    fresh = jax.jit(model.init)(jax.random.key(2), x)[1]
    assert not np.allclose(predict(x), _forward(model, params, fresh, x), atol=1e-3)


def test_weights_as_an_argument_come_from_a_safetensors_file(tmp_path):
    model, params, state, x = _batchnorm_cnn()
    exported = export_model(model, params, state, x, batch_size="b", weights="argument")
    predict = _round_trip(tmp_path, exported)
    save_safetensors(tmp_path / "weights.safetensors", exported_weights(params, state))
    weights = read_safetensors(tmp_path / "weights.safetensors")
    assert sorted(weights) == ["params/0/b", "params/0/w", "params/1/b", "params/1/scale",
                               "params/4/b", "params/4/w", "state/1/mean", "state/1/var"]
    assert predict.signature()[0] == "dict of 8 arrays, float32[b, 8, 8, 1]"
    np.testing.assert_allclose(predict(weights, x), _forward(model, params, state, x), rtol=0,
                               atol=TOL)
    # the weights are not in the program: others give the model's outputs with those
    doubled = jax.tree.map(lambda a: 2 * a, params)
    np.testing.assert_allclose(predict(exported_weights(doubled, state), x),
                               _forward(model, doubled, state, x), rtol=0, atol=TOL)
    embedded = export_model(model, params, state, x, batch_size="b")
    assert len(exported.serialize()) < len(embedded.serialize())
    del weights["state/1/var"]
    with pytest.raises(ExportError, match=r"expected inputs \(dict of 8 arrays, float32\[b, 8, "
                                          r"8, 1\]\), got \(dict of 7 arrays, .*'state/1/var'"):
        predict(weights, x)


def test_several_inputs_reach_the_model_as_a_tuple(tmp_path):
    def apply(params, state, x, *, key=None, train=False):
        a, b = x
        return a * params["w"] + b, state

    model = Layer(lambda key, x: ({"w": jnp.full((1, 3), 2.0)}, {}), apply, "Pair")
    a, b = rand((2, 3)), rand((2, 3), seed=1)
    predict = _round_trip(tmp_path, export_model(model, model.init(None, None)[0], {}, a, b,
                                                 batch_size="n"))
    np.testing.assert_allclose(predict(a, b), 2 * a + b, rtol=0, atol=TOL)
    assert predict.signature() == ("float32[n, 3], float32[n, 3]", "float32[n, 3]")


def test_a_fixed_batch_size_refuses_another(tmp_path, cnn):
    model, params, state, x = cnn
    predict = _round_trip(tmp_path, export_model(model, params, state, x, batch_size=3))
    np.testing.assert_allclose(predict(x[:3]), _forward(model, params, state, x[:3]), rtol=0,
                               atol=TOL)
    with pytest.raises(ExportError, match=r"model.jaxexport: expected inputs \(float32\[3, 8, 8, "
                                          r"1\]\), got \(float32\[4, 8, 8, 1\]\): Shape mismatch"):
        predict(x)
    with pytest.raises(ExportError, match=r"got \(float32\[3, 8, 8, 1\], float32\[3, 8, 8, 1\]\)"
                                          r": .* same pytree structure"):
        predict(x[:3], x[:3])


def test_several_platforms(tmp_path, cnn):
    model, params, state, x = cnn
    predict = _round_trip(tmp_path, export_model(model, params, state, x,
                                                 platforms=("cpu", "cuda")))
    assert predict.exported.platforms == ("cpu", "cuda")
    np.testing.assert_allclose(predict(x), _forward(model, params, state, x), rtol=0, atol=TOL)
    elsewhere = ExportedFunction(export_model(model, params, state, x, platforms="cuda"))
    with pytest.raises(ExportError, match="exported for cuda, not for this machine's cpu: "
                                          r"export it with platforms=\(\.\.\., 'cpu'\)"):
        elsewhere(x)


def test_export_runs_eval_mode_and_refuses_train_with_dropout(cnn):
    model, params, state, x = cnn
    with pytest.raises(ExportError, match="train=True: Dropout at dropout is stochastic and "
                                          "needs a random key .* export with train=False"):
        export_model(model, params, state, x, train=True)


def test_a_file_is_never_overwritten_unless_asked(tmp_path, cnn):
    model, params, state, x = cnn
    path = tmp_path / "model.jaxexport"
    save_exported(path, export_model(model, params, state, x))
    before = path.read_bytes()
    other = export_model(model, params, state, x, batch_size="b")
    with pytest.raises(FileExistsError, match="exists: pass overwrite=True"):
        save_exported(path, other)
    assert path.read_bytes() == before
    save_exported(path, other, overwrite=True)
    assert load_exported(path).signature()[0] == "float32[b, 8, 8, 1]"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.jaxexport"]


def test_a_failed_write_leaves_no_file(tmp_path, cnn, monkeypatch):
    model, params, state, x = cnn
    exported = export_model(model, params, state, x)

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        save_exported(tmp_path / "model.jaxexport", exported)
    assert list(tmp_path.iterdir()) == []


def test_a_missing_or_corrupt_file_is_a_clear_error(tmp_path, cnn):
    model, params, state, x = cnn
    exported = export_model(model, params, state, x)
    data = exported.serialize()
    with pytest.raises(FileNotFoundError, match="nowhere.jaxexport: no such file"):
        load_exported(tmp_path / "nowhere.jaxexport")
    with pytest.raises(FileNotFoundError, match="is not a file"):
        load_exported(tmp_path)
    for name, content in (("text", b"not a program at all"), ("half", data[:len(data) // 2]),
                          ("empty", b""), ("zeros", bytes(1000))):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ExportError, match=f"{name}: not a jax.export file "
                                              f"\\({len(content)} bytes; "):
            load_exported(tmp_path / name)
    # a file whose table reads but whose program does not: refused at once, not at a call
    damaged = dataclasses.replace(exported, mlir_module_serialized=b"ML\xefR" + bytes(40))
    (tmp_path / "damaged").write_bytes(damaged.serialize())
    with pytest.raises(ExportError, match=f"damaged: its program does not read in jax "
                                          f"{jax.__version__} \\(a file of a newer JAX, or a "
                                          f"damaged one\\): .*Failed to deserialize StableHLO"):
        load_exported(tmp_path / "damaged")


def test_without_flatbuffers_jax_says_what_to_install(tmp_path, monkeypatch):
    def deserialize(data):
        raise ImportError("Please install 'flatbuffers' in order to use Exported serialization")

    (tmp_path / "model.jaxexport").write_bytes(b"any")
    monkeypatch.setattr(jax.export, "deserialize", deserialize)
    with pytest.raises(ImportError, match="install 'flatbuffers'"):
        load_exported(tmp_path / "model.jaxexport")


@pytest.mark.parametrize("call, error, message", [
    (lambda m, p, s, x: export_model(m, p, s), TypeError, "expected at least one input"),
    (lambda m, p, s, x: export_model(m, p, s, Seq(x)), TypeError,
     r"input 0 is a Seq\(x=float32\[4, 8, 8, 1\]\): .* not a Seq"),
    (lambda m, p, s, x: export_model(m, p, s, x.tolist()), TypeError,
     "input 0 must be an array or a jax.ShapeDtypeStruct, got list"),
    (lambda m, p, s, x: export_model(m, p, s, x, batch_size=0), ValueError,
     "batch_size must be None, a positive int or the name of a symbolic size"),
    (lambda m, p, s, x: export_model(m, p, s, x, batch_size=True), ValueError, "got True"),
    (lambda m, p, s, x: export_model(m, p, s, x, batch_size="b, c"), ValueError,
     "batch_size must name one symbolic size such as 'b', got 'b, c'"),
    (lambda m, p, s, x: export_model(m, p, s, np.float32(1), batch_size="b"), ExportError,
     r"needs a batch axis 0 on every input, input 0 is float32\[\]"),
    (lambda m, p, s, x: export_model(m, p, s, x, weights="constants"), ValueError,
     "weights must be one of embedded, argument, got 'constants'"),
    (lambda m, p, s, x: export_model(m, p, s, x, train=0), TypeError,
     "train must be a Python bool, got int"),
    (lambda m, p, s, x: export_model(m.apply, p, s, x), TypeError, "expected a Layer"),
    (lambda m, p, s, x: export_model(m, p, s, x, platforms=("gpu",)), ValueError,
     "say 'cuda' \\(NVIDIA\\) or 'rocm' \\(AMD\\)"),
    (lambda m, p, s, x: export_model(m, p, s, x, platforms=()), ValueError,
     "platforms must be distinct names"),
    (lambda m, p, s, x: save_exported("never", m), TypeError, "expected a jax.export.Exported"),
])
def test_export_errors(cnn, call, error, message):
    with pytest.raises(error, match=message):
        call(*cnn)


def test_a_run_of_fnn_train_exported_predicts_as_it_does(tmp_path):
    """``fnn train`` (one epoch of a small LeNet on the digits), ``load_run``, export, file."""
    from fnn.app import load_run
    from fnn.app.cli import main
    from fnn.data import load_digits

    raw = yaml.safe_load((ROOT / "configs" / "digits_cnn.yaml").read_text())
    raw |= {"epochs": 1, "output_dir": str(tmp_path / "run"),
            "schedule": {"name": "cosine", "warmup_steps": 5}}
    raw["model"] |= {"features": [4, 8], "hidden_features": 16}
    (tmp_path / "cnn.yaml").write_text(yaml.safe_dump(raw))
    assert main(["train", str(tmp_path / "cnn.yaml"), "--no-progress"]) == 0
    run = load_run(tmp_path / "run")
    x = load_digits().x_test
    exported = export_model(run.model, run.params, run.state, x[:1], batch_size="b")
    predict = load_exported(save_exported(tmp_path / "digits_cnn.jaxexport", exported))
    want = _forward(run.model, run.params, run.state, x)
    np.testing.assert_allclose(predict(x), want, rtol=0, atol=TOL)
    assert np.array_equal(np.argmax(predict(x), -1), np.argmax(want, -1))
