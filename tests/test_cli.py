"""The config checks and the ``fnn`` command line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fnn.cli import main
from fnn.config import ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def _raw(name="digits_mlp.yaml"):
    return yaml.safe_load((ROOT / "configs" / name).read_text())


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    config = load_config(path)
    assert config.epochs > 0


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(epoch=3), r"unknown key 'epoch' in the config; did you mean 'epochs'\?"),
    (lambda c: c["model"].update(hiden_sizes=[3]),
     r"unknown key 'hiden_sizes' in model \(mlp\); did you mean 'hidden_sizes'\?"),
    (lambda c: c["optimizer"].update(learning_rat=0.1),
     r"unknown key 'learning_rat' in optimizer \(adamw\); did you mean 'learning_rate'\?"),
    (lambda c: c["optimizer"].update(name="adamm"),
     r"unknown key 'adamm' in optimizer.name; did you mean 'adam'\?"),
    (lambda c: c["schedule"].update(warmup=3),
     r"unknown key 'warmup' in schedule \(cosine\); did you mean 'warmup_steps'\?"),
    (lambda c: c["data"].update(batchsize=3), r"unknown key 'batchsize' in data \(digits\)"),
    (lambda c: c["loss"].update(smoothing=0.1), r"unknown key 'smoothing' in loss"),
    (lambda c: c["model"].pop("num_outputs"), r"model \(mlp\) is missing num_outputs"),
    (lambda c: c.pop("seed"), r"the config is missing seed"),
    (lambda c: c.update(epochs="ten"), r"epochs must be int, got 'ten'"),
    (lambda c: c["data"].update(batch_size=0), r"data.batch_size must be a positive int"),
])
def test_bad_configs_are_rejected_with_a_clear_message(edit, message):
    raw = _raw()
    edit(raw)
    with pytest.raises(ConfigError, match=message):
        parse_config(raw)


def test_cli_reports_config_errors(tmp_path, capsys):
    raw = _raw()
    raw["optimiser"] = raw.pop("optimizer")
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'optimiser' in the config; did you mean 'optimizer'?" in err


def test_cli_trains_the_mlp_to_its_target(tmp_path):
    """A shortened run of configs/digits_mlp.yaml (the full run is in the README)."""
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "fnn.cli", "train", str(ROOT / "configs" / "digits_mlp.yaml"),
         "--epochs", "12", "--output-dir", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == list(range(1, 13))
    assert rows[-1]["test_accuracy"] >= 0.97
    assert (out / "plot.png").read_bytes()[:4] == b"\x89PNG"
    assert f"final test accuracy: {rows[-1]['test_accuracy']:.4f}" in result.stdout


def test_cli_summary(capsys):
    assert main(["summary", str(ROOT / "configs" / "digits_cnn.yaml")]) == 0
    out = capsys.readouterr().out
    assert "conv1" in out and "head" in out and "total:" in out
