"""Runs back in Python (load_run) and a run that starts from another: init.from and take, with
frozen parameters and a learning-rate group, through the command line."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

from fnn.app import load_run
from fnn.app.cli import main
from fnn.app.config import ConfigError, build_optimizer, parse_config
from fnn.train import ParamGroups, leaf_paths

ROOT = Path(__file__).parents[2]


def _config(tmp_path, name, **changes):
    raw = yaml.safe_load((ROOT / "configs" / "digits_mlp.yaml").read_text())
    raw |= {"epochs": 2, "output_dir": str(tmp_path / name), "schedule": {"name": "cosine"},
            "model": dict(raw["model"], hidden_features=[32, 32])} | changes
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path, raw


def _train(path, capsys):
    code = main(["train", str(path), "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("pretrained")
    path, _ = _config(tmp_path, "a")
    assert main(["train", str(path), "--no-progress"]) == 0
    return tmp_path / "a"


def test_load_run_brings_back_the_model_and_its_weights(pretrained):
    run = load_run(pretrained)
    assert run.config.model["hidden_features"] == [32, 32] and run.vocab is None
    rows = [json.loads(line) for line in (pretrained / "metrics.jsonl").read_text().splitlines()]
    assert run.step == rows[-1]["step"] and run.history == rows
    assert leaf_paths(run.params) == ["dense1/b", "dense1/w", "dense2/b", "dense2/w", "head/b",
                                      "head/w"]
    from fnn.data import load_digits

    digits = load_digits()
    logits, _ = run.model.apply(run.params, run.state, digits.x_test)
    accuracy = float(np.mean(np.argmax(logits, -1) == digits.y_test))
    assert accuracy == pytest.approx(rows[-1]["test_accuracy"], abs=1e-6)


def test_load_run_errors(tmp_path, pretrained):
    with pytest.raises(ConfigError, match="not an fnn run directory: no config.yaml in"):
        load_run(tmp_path)
    with pytest.raises(ConfigError, match=r"cannot load the run in .*: .*no checkpoint"):
        load_run(pretrained, step=7)


def test_a_run_from_another_with_a_frozen_trunk(tmp_path, pretrained, capsys):
    path, _ = _config(tmp_path, "b", init={"from": str(pretrained), "take": ["dense1/**"]},
                      optimizer={"name": "adamw", "learning_rate": 0.002,
                                 "frozen": ["dense1/**"],
                                 "groups": [{"params": ["head/**"], "learning_rate": 0.01}]},
                      seed=5)
    _train(path, capsys)
    source, run = load_run(pretrained), load_run(tmp_path / "b")
    for name in ("w", "b"):  # frozen: bit for bit the pretrained trunk
        assert np.asarray(run.params["dense1"][name]).tobytes() == \
            np.asarray(source.params["dense1"][name]).tobytes()
    # the rest started fresh (seed 5) and trained
    assert not np.allclose(run.params["dense2"]["w"], source.params["dense2"]["w"])
    accuracy = [row["test_accuracy"] for row in run.history]
    assert accuracy[-1] > max(0.5, accuracy[0]), accuracy
    # a resumed run continues from its own checkpoint: the source is not read again
    source_dir = pretrained.parent / "a-moved"
    pretrained.rename(source_dir)
    try:
        captured = _train_resume(path, capsys, epochs=3)
    finally:
        source_dir.rename(pretrained)
    assert "resuming from step" in captured.err
    resumed = load_run(tmp_path / "b")
    assert resumed.step > run.step
    assert np.asarray(resumed.params["dense1"]["w"]).tobytes() == \
        np.asarray(source.params["dense1"]["w"]).tobytes()


def _train_resume(path, capsys, epochs):
    code = main(["train", str(path), "--no-progress", "--resume", "--epochs", str(epochs)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured


def test_init_errors_are_one_line_and_write_nothing(tmp_path, pretrained, capsys):
    path, _ = _config(tmp_path, "c", init={"from": str(tmp_path / "nowhere")})
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fnn: error: init.from: not an fnn run directory: ")
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "c").exists()
    path, _ = _config(tmp_path, "d", init={"from": str(pretrained), "take": ["neck/**"]})
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "init: from the run in" in err and "the pattern 'neck/**' matches no parameter" in err
    path, _ = _config(tmp_path, "f", optimizer={"name": "adam", "learning_rate": 0.01,
                                                "frozen": ["dense/**"]})
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fnn: error: ") and "optimizer (adam): frozen and groups: " in err
    assert "the pattern 'dense/**' matches no parameter; the parameters are dense1/b" in err
    assert not (tmp_path / "f").exists()
    assert not (tmp_path / "d").exists()
    path, _ = _config(tmp_path, "e", init={"from": str(pretrained)},
                      model={"name": "mlp", "hidden_features": [16, 32], "out_features": 10,
                             "flatten_axes": 3})
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert ("dense1/w: expected float32[64, 16], the source has float32[64, 32]" in err)
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("change, message", [
    ({"init": "runs/x"}, r"init must be a mapping with from"),
    ({"init": {"from": "runs/x", "takes": ["a"]}}, r"unknown key 'takes' in init; did you mean "
                                                   r"'take'\?"),
    ({"init": {"from": "runs/x", "take": []}}, r"init.take must be a list of parameter patterns"),
    ({"optimizer": {"name": "adamw", "learning_rate": 0.1, "frozen": 3}},
     r"optimizer \(adamw\): frozen must be a list of parameter patterns"),
    ({"optimizer": {"name": "adamw", "learning_rate": 0.1, "groups": [{"learning_rate": 1}]}},
     r"optimizer \(adamw\): groups\[0\] must be a mapping with params"),
    ({"optimizer": {"name": "adamw", "learning_rate": 0.1,
                    "groups": [{"params": ["head/**"], "learning_rat": 1.0}]}},
     r"unknown key 'learning_rat' in optimizer \(adamw\): groups\[0\]; did you mean "
     r"'learning_rate'\?"),
    ({"optimizer": {"name": "adamw", "learning_rate": 0.1,
                    "groups": [{"params": ["head/**"], "learning_rate": -1.0}]}},
     r"optimizer \(adamw\): groups\[0\]: learning_rate must be a positive number, got -1.0"),
    ({"optimizer": {"name": "sgd", "learning_rate": 0.1, "weight_decay_mask": "all"}},
     r"optimizer \(sgd\): weight_decay_mask is for optimizers with weight decay and a mask "
     r"\(adamw, lamb, lion\), not sgd"),
    ({"optimizer": {"name": "adamw", "learning_rate": 0.1, "weight_decay_mask": "biases"}},
     r"weight_decay_mask must be one of weights, all, got 'biases'"),
    ({"optimizer": {"name": "adamw", "learning_rate": 0.1, "mask": "x"}},
     r"unknown key 'mask' in optimizer \(adamw\)"),
])
def test_config_errors_of_groups_and_init(tmp_path, change, message):
    _, raw = _config(tmp_path, "x", **change)
    with pytest.raises(ConfigError, match=message):
        parse_config(raw)


def test_weight_decay_skips_biases_by_default(tmp_path):
    """adamw with weight decay and a zero gradient: only the weights shrink."""
    import jax.numpy as jnp

    params = {"dense": {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}}
    zeros = jax.tree.map(jnp.zeros_like, params)
    for mask, decayed in (("weights", ["w"]), ("all", ["b", "w"])):
        _, raw = _config(tmp_path, "x", optimizer={"name": "adamw", "learning_rate": 0.1,
                                                   "weight_decay": 0.5,
                                                   "weight_decay_mask": mask},
                         schedule={"name": "constant"})
        optimizer = build_optimizer(parse_config(raw), 100)
        with jax.numpy_dtype_promotion("standard"):
            updates, _ = optimizer.update(zeros, optimizer.init(params), params)
        assert sorted(k for k, u in updates["dense"].items() if np.any(u)) == decayed
        np.testing.assert_allclose(updates["dense"]["w"], -0.05 * np.ones((2, 2)), rtol=1e-6)
    _, raw = _config(tmp_path, "x", optimizer={"name": "adamw", "learning_rate": 0.1,
                                               "frozen": ["**/b"]})
    assert isinstance(build_optimizer(parse_config(raw), 10), ParamGroups)
