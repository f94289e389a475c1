"""The config checks and the ``fnn`` command line."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from fnn.app.cli import main
from fnn.app.config import ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def _raw(name="digits_mlp.yaml"):
    return yaml.safe_load((ROOT / "configs" / name).read_text())


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    config = load_config(path)
    assert config.epochs > 0


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(epoch=3), r"unknown key 'epoch' in the config; did you mean 'epochs'\?"),
    (lambda c: c["model"].update(hiden_features=[3]),
     r"unknown key 'hiden_features' in model \(mlp\); did you mean 'hidden_features'\?"),
    (lambda c: c["optimizer"].update(learning_rat=0.1),
     r"unknown key 'learning_rat' in optimizer \(adamw\); did you mean 'learning_rate'\?"),
    (lambda c: c["optimizer"].update(name="adamm"),
     r"unknown key 'adamm' in optimizer.name; did you mean 'adam'\?"),
    (lambda c: c["schedule"].update(warmup=3),
     r"unknown key 'warmup' in schedule \(cosine\); did you mean 'warmup_steps'\?"),
    (lambda c: c["data"].update(batchsize=3), r"unknown key 'batchsize' in data \(digits\)"),
    (lambda c: c["loss"].update(smoothing=0.1), r"unknown key 'smoothing' in loss"),
    (lambda c: c["model"].pop("out_features"), r"model \(mlp\) is missing out_features"),
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
        [sys.executable, "-m", "fnn.app.cli", "train", str(ROOT / "configs" / "digits_mlp.yaml"),
         "--epochs", "12", "--output-dir", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == list(range(1, 13))
    assert rows[-1]["test_accuracy"] >= 0.97
    assert (out / "plot.png").read_bytes()[:4] == b"\x89PNG"
    assert f"final test accuracy: {rows[-1]['test_accuracy']:.4f}" in result.stdout
    assert "host malloc: default" in result.stdout


def test_cli_summary(capsys):
    assert main(["summary", str(ROOT / "configs" / "digits_cnn.yaml")]) == 0
    out = capsys.readouterr().out
    assert "conv1" in out and "head" in out and "total:" in out


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(parallel="pmapp"), r"unknown key 'pmapp' in parallel.mode; did you mean"),
    (lambda c: c.update(parallel={"mode": "pmap", "device": 2}),
     r"unknown key 'device' in parallel; did you mean 'devices'\?"),
    (lambda c: c.update(parallel={"devices": 0}), r"parallel.devices must be a positive int"),
    (lambda c: c.update(precision="bf16"), r"unknown key 'bf16' in precision"),
    (lambda c: c.update(checkpoint={"every": 5, "kept": 2}),
     r"unknown key 'kept' in checkpoint; did you mean 'keep'\?"),
    (lambda c: c.update(max_bad_steps=0), r"max_bad_steps must be positive"),
    (lambda c: c.update(host_malloc="fast"), r"unknown key 'fast' in host_malloc"),
    (lambda c: c.update(model={"name": "gpt"}), r"model gpt trains on data 'text', got data 'digits'"),
])
def test_bad_optional_sections_are_rejected(edit, message):
    raw = _raw()
    edit(raw)
    with pytest.raises(ConfigError, match=message):
        parse_config(raw)


def test_optional_sections_take_defaults_and_shorthands():
    config = parse_config(_raw() | {"parallel": "sharded"})
    assert config.parallel == {"mode": "sharded", "devices": None}
    assert config.precision == "float32" and config.max_bad_steps == 10
    assert config.host_malloc == "default"
    assert config.checkpoint == {"every": None, "keep": 3}
    lm = _raw("charlm_lstm.yaml")
    lm["model"]["vocab_size"] = 50
    with pytest.raises(ConfigError, match="vocab_size comes from the data; remove it"):
        parse_config(lm)
    lm = _raw("charlm_lstm.yaml")
    lm["data"].pop("seq_len")
    with pytest.raises(ConfigError, match=r"data \(text\) is missing seq_len"):
        parse_config(lm)


def _fnn(*args, timeout=300, cwd=None):
    return subprocess.run([sys.executable, "-m", "fnn.app.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=cwd)


def test_cli_trains_a_language_model_on_a_text_file_and_generates(tmp_path):
    """A user's own text file (30,000 characters of the bundled corpus), a small LSTM: the
    validation loss falls, and `fnn generate` continues a prompt from the saved run."""
    from fnn.data import default_corpus

    (tmp_path / "my.txt").write_text(default_corpus()[:30_000], encoding="utf-8")
    raw = _raw("charlm_lstm.yaml")
    raw["model"] |= {"embedding_features": 16, "features": 64}
    raw["data"] |= {"path": str(tmp_path / "my.txt"), "batch_size": 16, "seq_len": 32}
    raw |= {"epochs": 3, "output_dir": str(tmp_path / "run"),
            "checkpoint": {"every": 50, "keep": 1}}
    (tmp_path / "lm.yaml").write_text(yaml.safe_dump(raw))
    result = _fnn("train", tmp_path / "lm.yaml", "--no-progress", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line)
            for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2, 3]
    assert rows[-1]["valid_loss"] < rows[0]["valid_loss"] - 0.1
    assert rows[-1]["valid_bits_per_char"] == pytest.approx(rows[-1]["valid_loss"] / np.log(2),
                                                            rel=1e-5)
    assert f"final valid bits per character: {rows[-1]['valid_bits_per_char']:.4f}" in \
        result.stdout
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "checkpoints", "config.yaml", "metrics.jsonl", "plot.png", "vocab.json"]

    sample = _fnn("generate", tmp_path / "run", "--prompt", "The ", "--length", 40,
                  "--temperature", 0)
    assert sample.returncode == 0, sample.stderr
    assert sample.stdout.startswith("The ") and len(sample.stdout) == 4 + 40 + 1
    again = _fnn("generate", tmp_path / "run", "--prompt", "The ", "--length", 40,
                 "--temperature", 0)
    assert again.stdout == sample.stdout  # greedy decoding is deterministic
    bad = _fnn("generate", tmp_path / "run", "--prompt", "\u2603")
    assert bad.returncode != 0 and "not in the vocabulary" in bad.stderr


def _params_of_last_checkpoint(run):
    manifest = max((run / "checkpoints").glob("step_*")) / "manifest.json"
    return {entry["path"]: entry["sha256"] for entry in json.loads(manifest.read_text())["arrays"]}


def test_a_run_killed_with_sigkill_and_resumed_ends_bit_identical(tmp_path):
    import signal
    import time

    raw = _raw()
    raw |= {"epochs": 6, "checkpoint": {"every": 5, "keep": 2}}
    (tmp_path / "mlp.yaml").write_text(yaml.safe_dump(raw))
    # the run left alone tunes glibc's malloc, the killed one does not: no number changes
    alone = _fnn("train", tmp_path / "mlp.yaml", "--output-dir", tmp_path / "alone",
                 "--no-progress", "--host-malloc", "tuned")
    assert alone.returncode == 0, alone.stderr
    assert "host malloc: tuned" in alone.stdout

    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "fnn.app.cli", "train", str(tmp_path / "mlp.yaml"),
                             "--output-dir", str(run), "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not list((run / "checkpoints").glob("step_*")) and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        proc.kill()
    stopped_at = max(int(p.name.split("_")[1]) for p in (run / "checkpoints").glob("step_*"))
    assert stopped_at < 6 * 22  # killed before the end
    resumed = _fnn("train", tmp_path / "mlp.yaml", "--output-dir", run, "--no-progress",
                   "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert _params_of_last_checkpoint(run) == _params_of_last_checkpoint(tmp_path / "alone")
    strip = lambda path: [{k: v for k, v in json.loads(line).items() if k != "seconds"}
                          for line in path.read_text().splitlines()]
    assert strip(run / "metrics.jsonl") == strip(tmp_path / "alone" / "metrics.jsonl")


def test_a_fresh_run_starts_over_and_a_resumed_one_keeps_rows_up_to_its_checkpoint(tmp_path):
    from fnn.app.cli import _start_metrics
    from fnn.train.checkpoint import list_steps, save_checkpoint

    metrics, checkpoints = tmp_path / "metrics.jsonl", tmp_path / "checkpoints"
    save_checkpoint(checkpoints, 20, {"w": np.zeros(3, np.float32)})
    rows = "".join(json.dumps({"step": s}) + "\n" for s in (10, 20, 30))  # 30: logged, then killed
    metrics.write_text(rows)
    _start_metrics(metrics, checkpoints, resume=True)
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [10, 20]
    assert list_steps(checkpoints) == [20]
    _start_metrics(metrics, checkpoints, resume=False)
    assert metrics.read_text() == "" and not checkpoints.exists()
