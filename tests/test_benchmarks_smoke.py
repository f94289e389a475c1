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


def test_the_hand_written_step_with_skip_keeps_the_state_on_a_nan_batch():
    """``hand + skip`` in train_step.py does the work of fnn's skip: a NaN batch changes
    nothing, a finite one updates."""
    import importlib.util

    import jax
    import numpy as np
    import optax

    spec = importlib.util.spec_from_file_location("train_step_benchmark", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    optimizer = optax.adam(1e-3)
    rng = np.random.default_rng(0)
    params = [(rng.standard_normal((4, 3)).astype(np.float32), np.zeros(3, np.float32))]
    step = bench.hand_train_step(bench.hand_mlp_apply, optimizer, skip_nonfinite=True)
    x, y = rng.standard_normal((8, 4)).astype(np.float32), rng.integers(0, 3, 8).astype(np.int32)

    def fresh():
        return jax.tree.map(np.copy, params), optimizer.init(params)

    # the benchmark runs with JAX's default promotion (optax mixes Python floats and ints)
    with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
        (after_nan, _), metrics = step(fresh(), np.full_like(x, np.nan), y)
        (after_good, _), _ = step(fresh(), x, y)
    assert not np.isfinite(float(metrics["loss"]))
    for got, want in zip(jax.tree.leaves(after_nan), jax.tree.leaves(params)):
        np.testing.assert_array_equal(got, want)
    assert not np.array_equal(after_good[0][0], params[0][0])
