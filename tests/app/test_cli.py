"""The config checks and the ``fnn`` command line."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

import fnn
from fnn.app.cli import main
from fnn.app.config import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def _raw(name="digits_mlp.yaml"):
    return yaml.safe_load((ROOT / "configs" / name).read_text())



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
        "checkpoints", "config.yaml", "inputs.json", "metrics.jsonl", "plot.png", "vocab.json"]

    sample = _fnn("generate", tmp_path / "run", "--prompt", "The ", "--length", 40,
                  "--temperature", 0)
    assert sample.returncode == 0, sample.stderr
    assert sample.stdout.startswith("The ") and len(sample.stdout) == 4 + 40 + 1
    again = _fnn("generate", tmp_path / "run", "--prompt", "The ", "--length", 40,
                 "--temperature", 0)
    assert again.stdout == sample.stdout  # greedy decoding is deterministic
    bad = _fnn("generate", tmp_path / "run", "--prompt", "\u2603")
    assert bad.returncode == 2 and "not in the vocabulary" in bad.stderr
    assert len(bad.stderr.splitlines()) == 1 and bad.stderr.startswith("fnn: error: ")
    # every other argument error is one line too (in-process: no training needed)
    for args, message in [
            (["--length", "-1"], "--length must be at least 0, got -1"),
            (["--temperature", "-0.5"], "--temperature must be a number >= 0, got -0.5"),
            (["--temperature", "nan"], "--temperature must be a number >= 0, got nan"),
            (["--top-k", "0"], "--top-k must be at least 1, got 0"),
            (["--prompt", ""], "--prompt must hold at least one character"),
            (["--length", "x"], "argument --length: invalid int value: 'x'")]:
        code, _, err = _main(["generate", str(tmp_path / "run"), *args])
        assert code == 2 and err.startswith("fnn: error: ") and message in err, err
        assert len(err.splitlines()) == 1, err
    (tmp_path / "run" / "vocab.json").unlink()
    code, _, err = _main(["generate", str(tmp_path / "run")])
    assert code == 2 and err == f"fnn: error: {tmp_path / 'run'}: no vocab.json: the run did " \
        f"not finish writing its files\n"


def _params_of_last_checkpoint(run):
    manifest = max((run / "checkpoints").glob("step_*")) / "manifest.json"
    return {entry["path"]: entry["sha256"] for entry in json.loads(manifest.read_text())["arrays"]}


def test_a_run_killed_with_sigkill_and_resumed_ends_bit_identical(tmp_path):
    from helpers import kill_at_first_checkpoint

    raw = _raw()
    raw |= {"epochs": 4, "checkpoint": {"every": 5, "keep": 2}}
    (tmp_path / "mlp.yaml").write_text(yaml.safe_dump(raw))
    # the run left alone tunes glibc's malloc, the killed one does not: no number changes
    alone = _fnn("train", tmp_path / "mlp.yaml", "--output-dir", tmp_path / "alone",
                 "--no-progress", "--host-malloc", "tuned")
    assert alone.returncode == 0, alone.stderr
    assert "host malloc: tuned" in alone.stdout

    run = tmp_path / "killed"
    assert kill_at_first_checkpoint(tmp_path / "mlp.yaml", run) < 4 * 22  # before the end
    resumed = _fnn("train", tmp_path / "mlp.yaml", "--output-dir", run, "--no-progress",
                   "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert _params_of_last_checkpoint(run) == _params_of_last_checkpoint(tmp_path / "alone")
    strip = lambda path: [{k: v for k, v in json.loads(line).items() if k != "seconds"}
                          for line in path.read_text().splitlines()]
    assert strip(run / "metrics.jsonl") == strip(tmp_path / "alone" / "metrics.jsonl")


# ----------------------------------------------------------------------------- runs are never lost

def _main(argv):
    """``fnn ARGV`` in this process: (exit status, stdout, stderr)."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's errors
            code = e.code
    return code, out.getvalue(), err.getvalue()


def _tiny(tmp_path, name="tiny.yaml", **changes):
    """A one-epoch MLP on the digits (22 steps, checkpoints at 10, 20 and 22)."""
    raw = _raw() | {"epochs": 1, "output_dir": str(tmp_path / "run"),
                    "checkpoint": {"every": 10, "keep": 3},
                    "schedule": {"name": "cosine", "warmup_steps": 5}}
    raw["model"] |= {"hidden_features": [8], "dropout": 0.0}
    for section, value in changes.items():
        raw[section] = raw.get(section, {}) | value if isinstance(value, dict) else value
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def _snapshot(directory):
    """Every file under ``directory`` with its bytes (and every symlink with its target)."""
    return {str(p.relative_to(directory)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(directory.rglob("*"))}


def _steps(run):
    return sorted(int(p.name.split("_")[1]) for p in (run / "checkpoints").glob("step_*"))


def test_a_fresh_run_into_a_run_directory_is_refused_and_overwrite_starts_again(tmp_path):
    config, run = _tiny(tmp_path), tmp_path / "run"
    assert _main(["train", str(config), "--no-progress"])[0] == 0
    before = _snapshot(run)
    assert _steps(run) == [10, 20, 22]
    code, _, err = _main(["train", str(config), "--no-progress"])
    assert code == 2 and len(err.splitlines()) == 1
    assert err == (f"fnn: error: output_dir {run} already holds a run (config.yaml, "
                   f"metrics.jsonl, plot.png, inputs.json, checkpoints/): pass --resume to "
                   f"continue it or "
                   f"--overwrite to start it again\n")
    assert _snapshot(run) == before  # nothing was changed
    code, _, err = _main(["train", str(_tiny(tmp_path, epochs=2)), "--no-progress",
                          "--overwrite"])
    assert code == 0 and "--overwrite: removing the run" in err
    assert _steps(run) == [30, 40, 44]  # the earlier run's checkpoints are gone
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2]
    code, _, err = _main(["train", str(config), "--resume", "--overwrite"])
    assert code == 2 and "--resume and --overwrite exclude each other" in err


def test_resume_checks_the_config_before_it_writes_anything(tmp_path):
    config, run = _tiny(tmp_path), tmp_path / "run"
    assert _main(["train", str(config), "--no-progress"])[0] == 0
    before = _snapshot(run)
    changed = _tiny(tmp_path, "changed.yaml", optimizer={"learning_rate": 0.01}, seed=3)
    code, _, err = _main(["train", str(changed), "--no-progress", "--resume"])
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith(f"fnn: error: cannot resume the run in {run} with another config "
                          f"(optimizer: the run's ")
    assert "seed: the run's 0, now 3" in err and "only checkpoint, epochs," in err
    assert _snapshot(run) == before
    # how long it runs may change: two epochs continue from the end of the first
    code, _, err = _main(["train", str(_tiny(tmp_path, "longer.yaml", epochs=2)),
                          "--no-progress", "--resume"])
    assert code == 0 and "resuming from step 22" in err
    assert _steps(run)[-1] == 44


def test_resume_refuses_a_data_file_with_another_vocabulary_and_changes_nothing(tmp_path):
    text = "the quick brown fox jumps over the lazy dog. " * 60
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    raw = _raw("charlm_lstm.yaml")
    raw["model"] |= {"embedding_features": 4, "features": 8}
    raw["data"] |= {"path": str(tmp_path / "a.txt"), "batch_size": 8, "seq_len": 16}
    raw |= {"epochs": 1, "output_dir": str(tmp_path / "run"),
            "checkpoint": {"every": 10, "keep": 1}, "schedule": {"name": "constant"}}
    (tmp_path / "lm.yaml").write_text(yaml.safe_dump(raw))
    assert _main(["train", str(tmp_path / "lm.yaml"), "--no-progress"])[0] == 0
    before = _snapshot(tmp_path / "run")
    # the same number of characters, other ones: ids would silently decode to other letters
    (tmp_path / "a.txt").write_text(text.replace("z", "Z"), encoding="utf-8")
    code, _, err = _main(["train", str(tmp_path / "lm.yaml"), "--no-progress", "--resume"])
    assert code == 2 and len(err.splitlines()) == 1
    chars = len(set(text))  # the same size: only a check of the characters themselves catches it
    assert (f"the data's vocabulary ({chars} characters) is not the run's ({chars} characters in "
            f"vocab.json)") in err
    assert _snapshot(tmp_path / "run") == before


def test_resume_without_a_checkpoint_says_it_starts_a_fresh_run(tmp_path):
    config, run = _tiny(tmp_path, epochs=1), tmp_path / "run"
    code, _, err = _main(["train", str(config), "--no-progress", "--resume"])
    assert code == 0
    assert f"fnn: no checkpoint in {run / 'checkpoints'}: starting a fresh run" in err
    assert _steps(run) == [10, 20, 22]


def test_resume_uses_the_newest_intact_checkpoint_and_keeps_the_corrupt_one(tmp_path):
    config, run = _tiny(tmp_path, epochs=2), tmp_path / "run"
    assert _main(["train", str(config), "--no-progress"])[0] == 0
    left_alone = _params_of_last_checkpoint(run)
    # a crash that left the last two checkpoints damaged: 44 flipped, 40 truncated
    data = run / "checkpoints" / "step_00000044" / "arrays.bin"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0xFF
    data.write_bytes(bytes(raw))
    truncated = run / "checkpoints" / "step_00000040" / "arrays.bin"
    truncated.write_bytes(truncated.read_bytes()[:-8])
    code, _, err = _main(["train", str(config), "--no-progress", "--resume"])
    assert code == 0, err
    assert "the checkpoint of step 44 is corrupt (array " in err
    assert "the checkpoint of step 40 is corrupt (array " in err
    assert "resuming from step 30" in err
    aside = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("corrupt"))
    assert [name[:len("corrupt-step_00000040")] for name in aside] == [
        "corrupt-step_00000040", "corrupt-step_00000044"]  # kept, never deleted
    assert (run / "checkpoints" / aside[1] / "arrays.bin").read_bytes() == bytes(raw)
    # and the run ends where the undamaged run ended, bit for bit
    assert _params_of_last_checkpoint(run) == left_alone


@pytest.mark.parametrize("case", [
    "dropout", "hidden_features", "batch_size", "output_dir_is_a_file", "empty_text",
    "text_is_a_directory", "text_not_utf8", "seq_len", "processes", "devices", "head_width",
    "learning_rate", "bad_flag", "generate_not_a_run",
])
def test_user_errors_are_one_line_with_exit_status_2(tmp_path, case):
    lm = _raw("charlm_lstm.yaml")
    lm["model"] |= {"embedding_features": 4, "features": 8}
    lm |= {"output_dir": str(tmp_path / "run")}

    def lm_with(name, data):
        config = lm | {"data": lm["data"] | data}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(config))
        return ["train", str(tmp_path / f"{name}.yaml")]

    (tmp_path / "file").write_text("not a directory")
    cases = {
        "dropout": (["train", str(_tiny(tmp_path, "dropout.yaml", model={"dropout": 2.0}))],
                    "model (mlp): dropout must be a drop probability in [0, 1), got 2.0"),
        "hidden_features": (["train", str(_tiny(tmp_path, "hidden_features.yaml",
                                                      model={"hidden_features": [-5]}))],
                            "MLP: hidden_features must be a positive integer or a tuple of "
                            "them, got (-5,)"),
        "batch_size": (["train", str(_tiny(tmp_path, "batch_size.yaml",
                                                 data={"batch_size": 5000}))],
                       "classification_task: batch_size 5000 is larger than the training set "
                       "(1438 examples)"),
        "output_dir_is_a_file": (["train", str(_tiny(tmp_path, "file.yaml")), "--output-dir",
                                  str(tmp_path / "file")],
                                 f"output_dir {tmp_path / 'file'} is a file, not a directory"),
        "empty_text": (lm_with("empty", {"path": str(tmp_path / "empty.txt")}),
                       "load_text: the text must have at least 2 characters, got 0"),
        "text_is_a_directory": (lm_with("directory", {"path": str(tmp_path)}),
                                f"load_text: {str(tmp_path)!r} is a directory, not a text file"),
        "text_not_utf8": (lm_with("latin1", {"path": str(tmp_path / "latin1.txt")}),
                          f"load_text: {str(tmp_path / 'latin1.txt')!r} is not UTF-8 text: "
                          f"byte 0xe9 at offset 3 (invalid continuation byte)"),
        "seq_len": (["train", str(ROOT / "configs" / "charlm_transformer.yaml")],
                    None),  # replaced below: a window longer than max_length
        "processes": (["train", str(_tiny(tmp_path, "processes.yaml")), "--processes", "0"],
                      "--processes must be at least 1, got 0"),
        "coordinator": (["train", str(_tiny(tmp_path, "coordinator.yaml")), "--parallel",
                         "fsdp", "--coordinator", "127.0.0.1:1234"],
                        "--coordinator, --num-processes, --process-id go together: missing "
                        "--num-processes, --process-id"),
        "coordinator_mode": (["train", str(_tiny(tmp_path, "coordinator_mode.yaml")),
                              "--coordinator", "127.0.0.1:1234", "--num-processes", "2",
                              "--process-id", "0"],
                             "--coordinator trains one model over the devices of every "
                             "process, which needs parallel mode sharded, shard_map, fsdp, "
                             "tensor (add --parallel sharded), got none"),
        "rules": (["train", str(_tiny(tmp_path, "rules.yaml", parallel={
            "mode": "fsdp", "rules": {"nope/*": ["data"]}}))],
                  "parallel (fsdp): sharding: the rule 'nope/*' matches no parameter; the "
                  "parameters are dense1/b, dense1/w, head/b, head/w"),
        "devices": (["train", str(_tiny(tmp_path, "devices.yaml")), "--parallel", "pmap",
                     "--devices", "99"],
                    "parallel.devices is 99 but only 8 devices are available (on a CPU, "
                    "XLA_FLAGS=--xla_force_host_platform_device_count=N before the start gives N "
                    "devices)"),
        "head_width": (["train", str(_tiny(tmp_path, "head_width.yaml",
                                                 model={"out_features": 5}))],
                       "model (mlp): the model's output float32[64, 5] has 5 classes on its "
                       "last axis, but the task's labels go up to 9: give the model a head of 10 "
                       "outputs"),
        "learning_rate": (["train", str(_tiny(tmp_path, "learning_rate.yaml",
                                              optimizer={"learning_rate": "1e-3x"}))],
                          "learning_rate must be a finite number, got '1e-3x' (a string)"),
        "bad_flag": (["train", str(_tiny(tmp_path, "bad_flag.yaml")), "--epochs", "two"],
                     "fnn: error: train: argument --epochs: invalid int value: 'two'"),
        "generate_not_a_run": (["generate", str(tmp_path)],
                               f"not an fnn run directory: no config.yaml in {tmp_path}"),
    }
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9 au lait".encode("latin-1"))
    argv, message = cases[case]
    if case == "seq_len":
        raw = _raw("charlm_transformer.yaml")
        raw["data"]["seq_len"] = 256
        (tmp_path / "gpt.yaml").write_text(yaml.safe_dump(raw))
        argv = ["train", str(tmp_path / "gpt.yaml")]
        message = "data.seq_len (256) must be at most the model's max_length (128)"
    code, out, err = _main(argv)
    assert code == 2, (code, err)
    assert err.startswith("fnn: error: ") and message in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # nothing written for a refused command


def test_debug_shows_the_traceback(tmp_path):
    config = _tiny(tmp_path, model={"dropout": 2.0})
    with pytest.raises(ConfigError, match="dropout must be a drop probability"):
        main(["--debug", "train", str(config)])
    with pytest.raises(ConfigError, match="dropout must be a drop probability"):
        main(["train", str(config), "--debug"])



def test_resume_with_fewer_epochs_than_the_checkpoint_changes_nothing(tmp_path):
    config, run = _tiny(tmp_path, epochs=2), tmp_path / "run"
    assert _main(["train", str(config), "--no-progress"])[0] == 0
    before = _snapshot(run)
    code, _, err = _main(["train", str(config), "--no-progress", "--resume", "--epochs", "1"])
    assert code == 2 and len(err.splitlines()) == 1
    assert "its checkpoint is at step 44, past this run's 22 steps (epochs 1)" in err
    assert _snapshot(run) == before  # config.yaml not rewritten before the refusal


# ----------------------------------------------------------------------------- fnn export

def test_export_writes_a_program_and_weight_files_of_a_run(tmp_path):
    from fnn.app import load_run
    from fnn.data import load_digits
    from fnn.interop import load_exported, load_safetensors, read_npz

    assert _main(["train", str(_tiny(tmp_path)), "--no-progress"])[0] == 0
    run = load_run(tmp_path / "run")
    assert run.example.shape == (1, 8, 8, 1)
    x = load_digits().x_test[:5]
    want, _ = run.model.apply(run.params, run.state, x)

    code, out, _ = _main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "m.jax")])
    assert code == 0 and "(float32[b, 8, 8, 1]) -> (float32[b, 10]) on cpu" in out
    assert "mlp at step 22" in out
    np.testing.assert_allclose(load_exported(tmp_path / "m.jax")(x), want, atol=1e-6)

    code, out, _ = _main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "m7.jax"),
                          "--batch-size", "7", "--platforms", "cpu,cuda"])
    assert code == 0 and "float32[7, 8, 8, 1]" in out and "on cpu, cuda" in out

    code, out, _ = _main(["export", str(tmp_path / "run"), "--out",
                          str(tmp_path / "w.safetensors")])
    assert code == 0 and "the params and state" in out
    weights = load_safetensors(tmp_path / "w.safetensors",
                               like={"params": run.params, "state": run.state})
    np.testing.assert_array_equal(weights["params"]["head"]["w"], run.params["head"]["w"])
    assert _main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "w.npz")])[0] == 0
    assert set(read_npz(tmp_path / "w.npz")) == {
        "params/" + name for name in fnn.interop.flatten(run.params)}


@pytest.mark.parametrize("argv,message", [
    (["--out", "{tmp}/m.jax"], "m.jax exists: pass --overwrite to replace it"),
    (["--out", "{tmp}/new.jax", "--batch-size", "0"],
     "--batch-size must be 'dynamic' or a positive integer, got '0'"),
    (["--out", "{tmp}/w.npz", "--batch-size", "4"],
     "--batch-size and --platforms are for a jax.export program; w.npz is a weights file"),
    (["--out", "{tmp}/new.jax", "--platforms", "gpu"], "'gpu' is not a platform of jax.export"),
])
def test_export_user_errors_are_one_line_and_write_nothing(tmp_path, argv, message):
    assert _main(["train", str(_tiny(tmp_path)), "--no-progress"])[0] == 0
    (tmp_path / "m.jax").write_bytes(b"kept")
    before = _snapshot(tmp_path)
    argv = [a.format(tmp=tmp_path) for a in argv]
    code, _, err = _main(["export", str(tmp_path / "run"), *argv])
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert _snapshot(tmp_path) == before
