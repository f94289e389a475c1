"""The train-step benchmark runs end to end: its fnn and hand-written steps agree on the loss
(it exits with an error otherwise) and it prints its table."""

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
