"""Several processes: two local processes train one model together with mode="sharded", and
with mode="fsdp" (the model split over both processes' devices, checkpointed and evaluated as
it is), and end with the parameters of one process on the whole batch; a process that dies ends the run (never
a hang); the environment contract of ``initialize_from_env``.

One launch serves both multi-process tests (each process start costs seconds): the workers train
STEPS steps and save their params, then process 1 exits abruptly (once process 0 has saved) while
process 0 goes on. The workers run this file as a script (``python test_distributed.py OUT_DIR``).
"""

import contextlib
import io
import os
import pathlib
import sys
import time

import jax
import numpy as np
import optax
import pytest

from fnn.losses import softmax_cross_entropy
from fnn.models import MLP
from fnn.train.checkpoint import list_steps, restore_checkpoint, save_checkpoint
from fnn.train.distributed import initialize, initialize_from_env, launch
from fnn.train.learner import supervised
from fnn.train.parallel import data_parallel
from fnn.train.state import create_train_state

NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 2
BATCH = 16  # global batch: each process feeds BATCH / NUM_PROCESSES rows
STEPS = 4
DEATH_CODE = 3  # process 1's exit code when it dies in step STEPS + 1
TIMEOUT_S = 120  # a whole launch; a run that needs longer has hung


def _batch(step: int):
    rng = np.random.default_rng(step)
    return (rng.standard_normal((BATCH, 32)).astype(np.float32),
            rng.integers(0, 3, BATCH).astype(np.int32))


def _setup():
    # dense1/w [32, 64] has the 1,024 elements that fsdp splits
    model, optimizer = MLP([64], 3), optax.adam(0.05)
    ts = create_train_state(model, optimizer, jax.random.key(0), _batch(0)[0])
    return model, optimizer, ts


def _flat_params(ts) -> np.ndarray:
    return np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(ts.params)])


def _worker(out: pathlib.Path) -> None:
    """One process of the run: joins the others, trains STEPS steps on its rows of each batch
    and writes its params; then process 1 exits abruptly while process 0 takes another step
    (which needs process 1)."""
    jax.config.update("jax_num_cpu_devices", DEVICES_PER_PROCESS)
    assert initialize_from_env(timeout_s=20)
    index, count = jax.process_index(), jax.process_count()
    (out / f"pid{index}").write_text(str(os.getpid()))
    model, optimizer, ts = _setup()
    runner = data_parallel(model, optimizer, softmax_cross_entropy, mode="sharded")
    assert runner.num_devices == count * DEVICES_PER_PROCESS
    pts = runner.put_state(ts)
    share = BATCH // count

    def step(pts, i):
        x, y = _batch(i)
        rows = slice(index * share, (index + 1) * share)  # process i: rows [i B/P, (i+1) B/P)
        pts, metrics = runner.step(pts, *runner.put_batch(x[rows], y[rows]))
        print(f"step {i + 1}: loss {float(metrics['loss']):.6f}", flush=True)
        return pts, metrics

    rows = slice(index * share, (index + 1) * share)
    fsdp = data_parallel(model, optimizer, softmax_cross_entropy, mode="fsdp")
    learner = supervised(model, optimizer, softmax_cross_entropy)
    fts = fsdp.initial_state(learner.init, jax.random.key(0), _batch(0)[0])
    for i in range(STEPS):
        x, y = _batch(i)
        fts, _ = fsdp.step(fts, *fsdp.put_batch(x[rows], y[rows]))
    split = fsdp.get_state(fts)
    assert not split.params["dense1"]["w"].is_fully_addressable
    save_checkpoint(out / "fsdp", STEPS, split)  # every process gathers; process 0 writes
    held_out = jax.jit(learner.eval_step)(split, *_batch(99))
    np.save(out / f"fsdp_loss{index}.npy", np.float32(held_out["loss"]))

    for i in range(STEPS):
        pts, metrics = step(pts, i)
    np.save(out / f"params{index}.npy", _flat_params(runner.get_state(pts)))
    np.save(out / f"loss{index}.npy", np.float32(metrics["loss"]))
    (out / f"done{index}").touch()
    if index == 1:
        # die only once process 0 has printed and saved step STEPS: else launch may stop it
        # before it gets there
        deadline = time.monotonic() + TIMEOUT_S / 2
        while not (out / "done0").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        os._exit(DEATH_CODE)
    step(pts, STEPS)  # needs process 1: must never finish
    print("process 0 finished a step without process 1", flush=True)


def learner_eval(model, optimizer):
    return jax.jit(supervised(model, optimizer, softmax_cross_entropy).eval_step)


def _distributed_available() -> bool:
    return hasattr(jax, "distributed") and hasattr(jax.distributed, "initialize")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Launches the workers once: (exit code, stdout, stderr, seconds, output folder)."""
    if not _distributed_available():
        pytest.skip("jax.distributed is not available")
    out = tmp_path_factory.mktemp("distributed")
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    stdout, stderr = io.StringIO(), io.StringIO()
    start = time.monotonic()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = launch([sys.executable, str(pathlib.Path(__file__).resolve()), str(out)],
                      NUM_PROCESSES, timeout_s=TIMEOUT_S, env=env)
    return code, stdout.getvalue(), stderr.getvalue(), time.monotonic() - start, out


def test_two_processes_train_like_one_process_on_the_whole_batch(run):
    _, stdout, stderr, _, out = run
    for index in range(NUM_PROCESSES):
        assert f"[process {index}] step {STEPS}: loss" in stdout, stdout + stderr
    model, optimizer, ts = _setup()
    runner = data_parallel(model, optimizer, softmax_cross_entropy, mode="none")
    for i in range(STEPS):
        ts, metrics = runner.step(ts, *_batch(i))
    expected = _flat_params(ts)
    for index in range(NUM_PROCESSES):
        got = np.load(out / f"params{index}.npy")
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.load(out / f"loss{index}.npy"), metrics["loss"], rtol=1e-6)
    # the processes are replicas of one another: bit-identical
    np.testing.assert_array_equal(np.load(out / "params0.npy"), np.load(out / "params1.npy"))
    # fsdp: the checkpoint gathered from both processes holds the one-process params
    saved, _ = restore_checkpoint(out / "fsdp", jax.eval_shape(lambda: ts))
    np.testing.assert_allclose(_flat_params(saved), expected, rtol=1e-6, atol=1e-6)
    assert list_steps(out / "fsdp") == [STEPS]
    held_out = learner_eval(model, optimizer)(ts, *_batch(99))["loss"]
    for index in range(NUM_PROCESSES):
        np.testing.assert_allclose(np.load(out / f"fsdp_loss{index}.npy"), held_out, rtol=1e-5)


def test_a_dying_process_ends_the_run_and_stops_the_others(run):
    code, stdout, stderr, seconds, out = run
    assert code == DEATH_CODE, stdout + stderr
    assert seconds < TIMEOUT_S
    assert f"launch: process 1 of 2 exited with code {DEATH_CODE}" in stderr
    assert "process 0 finished a step without process 1" not in stdout
    survivor = int((out / "pid0").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(survivor, 0)  # stopped and reaped, not left running


def test_launch_reports_a_failing_command_and_a_timeout(capsys, tmp_path):
    # process 1 fails only after process 0 has printed and exited, so that its line is streamed
    # before launch stops the others
    done = tmp_path / "process-0-done"
    script = (f"import os, sys, time, pathlib\n"
              f"print('hello', flush=True)\n"
              f"done = pathlib.Path({str(done)!r})\n"
              f"if os.environ['FNN_PROCESS_ID'] == '0':\n"
              f"    done.touch(); sys.exit(0)\n"
              f"deadline = time.monotonic() + 20\n"
              f"while not done.exists() and time.monotonic() < deadline:\n"
              f"    time.sleep(0.01)\n"
              f"time.sleep(0.5)\n"
              f"sys.exit(5)\n")
    code = launch([sys.executable, "-c", script], 2, timeout_s=30)
    output = capsys.readouterr()
    assert code == 5
    assert "[process 0] hello" in output.out and "[process 1] hello" in output.out
    assert "process 1 of 2 exited with code 5" in output.err and "hello" in output.err

    start = time.monotonic()
    code = launch([sys.executable, "-c", "import time; time.sleep(60)"], 2, timeout_s=1)
    assert code == 124 and time.monotonic() - start < 10
    assert "timed out after 1 s" in capsys.readouterr().err
    with pytest.raises(ValueError, match="num_processes must be a positive int, got 0"):
        launch(["true"], 0)


def test_initialize_reads_the_environment_and_checks_its_input(monkeypatch):
    for name in ("FNN_COORDINATOR", "FNN_NUM_PROCESSES", "FNN_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    assert initialize_from_env() is False
    monkeypatch.setenv("FNN_COORDINATOR", "127.0.0.1:1234")
    with pytest.raises(ValueError, match="missing FNN_NUM_PROCESSES, FNN_PROCESS_ID"):
        initialize_from_env()
    monkeypatch.setenv("FNN_NUM_PROCESSES", "two")
    monkeypatch.setenv("FNN_PROCESS_ID", "0")
    with pytest.raises(ValueError, match="FNN_NUM_PROCESSES must be an integer, got 'two'"):
        initialize_from_env()
    with pytest.raises(ValueError, match=r"process_id must be in \[0, 2\), got 2"):
        initialize("127.0.0.1:1234", 2, 2)
    with pytest.raises(ValueError, match="must be 'host:port', got '127.0.0.1'"):
        initialize("127.0.0.1", 2, 0)
    jax.devices()  # the backend is up in this test process
    with pytest.raises(RuntimeError, match="before any other JAX call"):
        initialize("127.0.0.1:1234", 2, 0)


if __name__ == "__main__":
    _worker(pathlib.Path(sys.argv[1]))
