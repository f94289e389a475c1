"""The benchmarks run end to end with tiny settings: each checks that its variants agree on
the loss (it exits with an error otherwise) and prints its table."""

import pathlib
import subprocess
import sys

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "train_step.py"


def _run(script: str, *args: str, timeout: int) -> str:
    """Runs ``benchmarks/<script>`` with ``args``; asserts it succeeds and returns its stdout."""
    result = subprocess.run([sys.executable, str(SCRIPT.parent / script), *args],
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_train_step_benchmark_runs():
    out = _run("train_step.py", "--steps", "1", "--rounds", "1", "--only", "mlp", timeout=120)
    assert "| MLP 784-512-512-10, batch 128 |" in out


def test_checkpoint_io_benchmark_runs():
    out = _run("checkpoint_io.py", "--params", "1000", "--rounds", "1", timeout=120)
    assert "| save_checkpoint |" in out and "| restore_checkpoint |" in out


def test_parallel_step_benchmark_runs():
    out = _run("parallel_step.py", "--steps", "1", "--rounds", "1", "--only", "mlp", timeout=180)
    assert "| sharded/plain | pmap/plain |" in out


def test_sequence_step_benchmark_runs():
    """The LSTM LM part: fnn, the hand-written steps and the naive scan agree on the loss."""
    out = _run("sequence_step.py", "--steps", "1", "--rounds", "1", "--only", "lstm",
               timeout=300)
    assert "LSTM LM" in out


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
