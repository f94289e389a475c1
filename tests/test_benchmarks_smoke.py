"""The benchmarks run end to end with tiny settings: each checks that its variants agree on
the loss (it exits with an error otherwise) and prints its table."""

import pathlib
import subprocess
import sys

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "train_step.py"


def test_train_step_benchmark_runs():
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--steps", "1", "--rounds", "1", "--only", "mlp"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "| MLP 784-512-512-10, batch 128 |" in result.stdout


def test_checkpoint_io_benchmark_runs():
    script = SCRIPT.parent / "checkpoint_io.py"
    result = subprocess.run([sys.executable, str(script), "--params", "1000", "--rounds", "1"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "| save_checkpoint |" in result.stdout and "| restore_checkpoint |" in result.stdout


def test_parallel_step_benchmark_runs():
    script = SCRIPT.parent / "parallel_step.py"
    result = subprocess.run([sys.executable, str(script), "--steps", "1", "--rounds", "1",
                             "--only", "mlp"], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    assert "| sharded/plain | pmap/plain |" in result.stdout


def test_sequence_step_benchmark_runs():
    """The LSTM LM part: fnn, the hand-written steps and the naive scan agree on the loss."""
    script = SCRIPT.parent / "sequence_step.py"
    result = subprocess.run([sys.executable, str(script), "--steps", "1", "--rounds", "1",
                             "--only", "lstm"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "LSTM LM" in result.stdout
