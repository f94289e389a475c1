"""Checkpoints: bit-exact round trips, keep-last-K, every kind of damage detected and named,
interrupted saves ignored, SIGKILL during a save, and no unpickling anywhere in fnn."""

import hashlib
import inspect
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import textwrap
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

import fnn
from fnn.models import MLP
from fnn.train import create_train_state
from fnn.train import checkpoint as ckpt
from fnn.train.checkpoint import (CheckpointError, latest_step, list_steps, restore_checkpoint,
                                  save_checkpoint)


class Pair(NamedTuple):
    first: Any
    second: Any


def _random_tree(seed: int):
    """Every kind of leaf a train state holds. Floats are made from random bit patterns, so
    NaNs with payloads, -0.0, infinities and subnormals all have to round-trip."""
    rng = np.random.default_rng(seed)
    bits32 = rng.integers(0, 2**32, (5, 3), dtype=np.uint32)
    bits16 = rng.integers(0, 2**16, (4, 2), dtype=np.uint16)
    params = {"dense": {"w": jnp.asarray(bits32.view(np.float32)),
                        "b": jnp.asarray(rng.standard_normal(3, dtype=np.float32))},
              "embed": jnp.asarray(bits16.view(ml_dtypes.bfloat16))}
    adam, rest = optax.adam(1e-3).init(params)  # (ScaleByAdamState, EmptyState())
    moments = {name: jax.tree.map(lambda p, k=k: p + k, params)
               for k, name in ((1, "mu"), (2, "nu"))}  # non-zero, unlike a fresh state
    opt_state = (adam._replace(count=jnp.asarray(seed, jnp.int32), **moments), rest)
    return {"params": params, "opt_state": opt_state,
            "ints": jnp.asarray(rng.integers(-2**31, 2**31, (3,)), jnp.int32),
            "mask": jnp.asarray(rng.random(6) < 0.5),
            "step": jnp.asarray(seed, jnp.int32),
            "key": jax.random.key(seed),
            "keys": jax.random.split(jax.random.key(seed + 1), 3),
            "pair": Pair(jnp.zeros((0, 2), jnp.float32), None),
            "empty": {}, "none": None}


def _like(tree):
    return jax.eval_shape(lambda: tree)


def _bits(x) -> np.ndarray:
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    x = np.asarray(x)
    return x.view(f"u{x.dtype.itemsize}") if x.size else x


def assert_bit_identical(got, expected):
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        assert isinstance(g, jax.Array)
        assert (g.shape, g.dtype) == (e.shape, e.dtype)
        np.testing.assert_array_equal(_bits(g), _bits(e))


def _entry(directory: pathlib.Path, path: str) -> dict:
    manifest = json.loads((directory / "manifest.json").read_text())
    return next(e for e in manifest["arrays"] if e["path"] == path)


# ----------------------------------------------------------------------------- round trips

def test_round_trip_is_bit_exact(tmp_path):
    tree = _random_tree(1)
    path = save_checkpoint(tmp_path, 123, tree)
    assert path == tmp_path / "step_00000123"
    assert sorted(os.listdir(path)) == ["arrays.bin", "manifest.json"]
    restored, metadata = restore_checkpoint(tmp_path, _like(tree))
    assert metadata == {}
    assert_bit_identical(restored, tree)
    assert jnp.issubdtype(restored["key"].dtype, jax.dtypes.prng_key)
    assert str(jax.random.key_impl(restored["key"])) == "threefry2x32"
    assert isinstance(restored["opt_state"][0], optax.ScaleByAdamState)
    # the restored key draws the same numbers as the saved one
    np.testing.assert_array_equal(jax.random.normal(restored["key"], (4,)),
                                  jax.random.normal(tree["key"], (4,)))
    # `like` may also be a tree of arrays
    assert_bit_identical(restore_checkpoint(tmp_path, tree)[0], tree)


def test_train_state_round_trip_with_eval_shape_like(tmp_path):
    def make():
        return create_train_state(MLP([8], 3), optax.adam(1e-3), jax.random.key(0),
                                  jnp.zeros((2, 4), jnp.float32))

    state = make()
    save_checkpoint(tmp_path, 0, state)
    restored, _ = restore_checkpoint(tmp_path, jax.eval_shape(make))
    assert type(restored) is type(state)
    assert_bit_identical(restored, state)


def test_metadata_round_trips(tmp_path):
    metadata = {"data": {"epoch": 2, "position": 12345}, "lr": 0.1, "name": "run é",
                "flags": [True, None, [1, 2]], "big": 2**62}
    save_checkpoint(tmp_path, 7, _random_tree(0), metadata=metadata)
    assert restore_checkpoint(tmp_path, _like(_random_tree(0)))[1] == metadata


@pytest.mark.parametrize("metadata, error, match", [
    ({"position": (1, 2)}, TypeError, "tuples become lists"),
    ({1: "one"}, TypeError, "non-string keys"),
    ({"position": np.int64(3)}, TypeError, "JSON-serialisable.*int64"),
    ({"loss": float("nan")}, ValueError, "JSON-serialisable"),
    ([1, 2], TypeError, "metadata must be a dict, got list"),
])
def test_metadata_must_survive_json(tmp_path, metadata, error, match):
    with pytest.raises(error, match=match):
        save_checkpoint(tmp_path, 0, _random_tree(0), metadata=metadata)
    assert list_steps(tmp_path) == []


def test_bad_save_arguments(tmp_path):
    tree = _random_tree(0)
    with pytest.raises(TypeError, match=r"leaf \['lr'\] is a float, not an array"):
        save_checkpoint(tmp_path, 0, {"lr": 0.1})
    with pytest.raises(ValueError, match="step must be >= 0, got -1"):
        save_checkpoint(tmp_path, -1, tree)
    with pytest.raises(TypeError, match="step must be an int, got True"):
        save_checkpoint(tmp_path, True, tree)
    with pytest.raises(ValueError, match="keep must be None or an int >= 1, got 0"):
        save_checkpoint(tmp_path, 0, tree, keep=0)
    with pytest.raises(TypeError, match=r"\['x'\]: dtype object is not a numeric"):
        save_checkpoint(tmp_path, 0, {"x": np.array([None])})
    assert list_steps(tmp_path) == []
    save_checkpoint(tmp_path, np.int32(4), tree)  # numpy integers are fine
    assert list_steps(tmp_path) == [4]


def test_float64_without_x64_is_refused(tmp_path):
    x = {"x": np.arange(3, dtype=np.float64) / 3}
    save_checkpoint(tmp_path, 0, x)
    with pytest.raises(CheckpointError, match=r"\['x'\] in .*arrays.bin: float64 becomes float32"
                                              ".*jax_enable_x64"):
        restore_checkpoint(tmp_path, x)


# ----------------------------------------------------------------------------- steps, keep

def test_keep_keeps_exactly_the_last_k(tmp_path):
    for step in range(6):
        save_checkpoint(tmp_path, step * 10, _random_tree(step), keep=3)
        assert list_steps(tmp_path) == [10 * s for s in range(max(0, step - 2), step + 1)]
    assert sorted(os.listdir(tmp_path)) == ["step_00000030", "step_00000040", "step_00000050"]
    assert latest_step(tmp_path) == 50
    assert_bit_identical(restore_checkpoint(tmp_path, _like(_random_tree(0)), step=30)[0],
                         _random_tree(3))
    assert_bit_identical(restore_checkpoint(tmp_path, _like(_random_tree(0)))[0],
                         _random_tree(5))
    # the step just saved is always kept, with the keep - 1 highest others
    save_checkpoint(tmp_path, 5, _random_tree(9), keep=2)
    assert list_steps(tmp_path) == [5, 50]


def test_without_keep_all_are_kept_and_overwrite_replaces(tmp_path):
    for step in (3, 1, 2):
        save_checkpoint(tmp_path, step, _random_tree(step))
    assert list_steps(tmp_path) == [1, 2, 3]
    save_checkpoint(tmp_path, 2, _random_tree(20), metadata={"again": True})
    assert sorted(os.listdir(tmp_path)) == ["step_00000001", "step_00000002", "step_00000003"]
    restored, metadata = restore_checkpoint(tmp_path, _like(_random_tree(0)), step=2)
    assert metadata == {"again": True}
    assert_bit_identical(restored, _random_tree(20))


def test_missing_root_and_missing_step(tmp_path):
    assert list_steps(tmp_path / "nowhere") == []
    assert latest_step(tmp_path / "nowhere") is None
    with pytest.raises(CheckpointError, match="no complete checkpoint in .*nowhere"):
        restore_checkpoint(tmp_path / "nowhere", _like(_random_tree(0)))
    save_checkpoint(tmp_path, 4, _random_tree(0))
    with pytest.raises(CheckpointError, match=r"no checkpoint of step 3 .* steps: \[4\]"):
        restore_checkpoint(tmp_path, _like(_random_tree(0)), step=3)


# ----------------------------------------------------------------------------- damage

@pytest.mark.parametrize("path", ["['params']['dense']['w']", "['params']['embed']",
                                  "['opt_state'][0].mu['dense']['b']", "['key']", "['mask']"])
def test_flipped_byte_names_the_array_and_file(tmp_path, path):
    tree = _random_tree(2)
    directory = save_checkpoint(tmp_path, 1, tree)
    entry = _entry(directory, path)
    data = directory / "arrays.bin"
    raw = bytearray(data.read_bytes())
    raw[entry["offset"] + entry["nbytes"] // 2] ^= 0x10
    data.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=re.escape(f"array {path} in {data}: sha256 "
                                                        "mismatch")):
        restore_checkpoint(tmp_path, _like(tree))


def test_truncated_or_extended_data_file(tmp_path):
    tree = _random_tree(3)
    directory = save_checkpoint(tmp_path, 1, tree)
    data = directory / "arrays.bin"
    raw = data.read_bytes()
    cut = _entry(directory, "['opt_state'][0].nu['embed']")
    # cut in the middle of that array: it is the first one the file no longer holds
    data.write_bytes(raw[:cut["offset"] + 3])
    with pytest.raises(CheckpointError, match=re.escape(
            f"array ['opt_state'][0].nu['embed'] in {data}: the file is truncated")):
        restore_checkpoint(tmp_path, _like(tree))
    data.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"in .*arrays.bin: the file is truncated"):
        restore_checkpoint(tmp_path, _like(tree))
    data.write_bytes(raw + b"\0")
    with pytest.raises(CheckpointError, match=f"{len(raw) + 1} bytes, the manifest says "
                                              f"{len(raw)}"):
        restore_checkpoint(tmp_path, _like(tree))
    data.unlink()
    with pytest.raises(CheckpointError, match="arrays.bin: the data file cannot be opened"):
        restore_checkpoint(tmp_path, _like(tree))


def _rehash(manifest: dict) -> dict:
    """The manifest with its manifest_sha256 recomputed as the format documents it."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return {**body, "manifest_sha256": hashlib.sha256(canonical.encode()).hexdigest()}


def test_missing_garbled_or_edited_manifest(tmp_path):
    tree = _random_tree(4)
    directory = save_checkpoint(tmp_path, 1, tree, metadata={"position": 10})
    manifest_path = directory / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    assert _rehash(manifest) == manifest  # the documented hash is the one written

    def restore_fails(match):
        with pytest.raises(CheckpointError, match=match):
            restore_checkpoint(tmp_path, _like(tree))

    manifest_path.write_text(manifest_path.read_text()[:-40])
    restore_fails("manifest.json: the manifest is unreadable or garbled")
    manifest_path.write_text("[1, 2]")
    restore_fails("manifest.json: malformed manifest")
    # a valid JSON edit of the metadata: caught by the manifest's own hash
    manifest_path.write_text(json.dumps({**manifest, "metadata": {"position": 11}}))
    restore_fails("manifest_sha256 does not match")
    # edits with a recomputed hash are still checked field by field
    bad = json.loads(json.dumps(manifest))
    bad["arrays"][0]["dtype"] = "object"  # must never be read as raw pointers
    manifest_path.write_text(json.dumps(_rehash(bad)))
    restore_fails("malformed manifest: TypeError: manifest: dtype object is not a numeric")
    bad = json.loads(json.dumps(manifest))
    del bad["arrays"][1]["sha256"]
    manifest_path.write_text(json.dumps(_rehash(bad)))
    restore_fails("malformed manifest: KeyError: 'sha256'")
    bad = json.loads(json.dumps(manifest))
    bad["arrays"][1]["offset"] += 4
    manifest_path.write_text(json.dumps(_rehash(bad)))
    restore_fails(r"offset \d+ and nbytes \d+ do not fit its layout")
    manifest_path.write_text(json.dumps({**manifest, "version": 2}))
    restore_fails("not a fnn-checkpoint version 1 manifest")
    manifest_path.unlink()
    restore_fails("manifest.json: the manifest is missing")
    assert list_steps(tmp_path) == [1]  # still listed: it is damaged, not silently skipped


def test_like_with_other_structure_shape_or_dtype(tmp_path):
    tree = {"w": jnp.zeros((5, 3), jnp.float32), "key": jax.random.key(0),
            "n": jnp.zeros((), jnp.int32)}
    save_checkpoint(tmp_path, 0, tree)

    def restore_fails(like, *matches):
        with pytest.raises(CheckpointError) as info:
            restore_checkpoint(tmp_path, like)
        message = str(info.value)
        assert "step_00000000/manifest.json: the checkpoint does not match `like`" in message
        for match in matches:
            assert match in message

    like = _like(tree)
    restore_fails({**like, "w": jax.ShapeDtypeStruct((5, 4), jnp.float32)},
                  "['w']: `like` expects float32[5, 4], the checkpoint has float32[5, 3]")
    restore_fails({**like, "w": jax.ShapeDtypeStruct((5, 3), jnp.bfloat16)},
                  "['w']: `like` expects bfloat16[5, 3], the checkpoint has float32[5, 3]")
    restore_fails({**like, "key": jax.ShapeDtypeStruct((2,), jnp.uint32)},
                  "['key']: `like` expects uint32[2], the checkpoint has key<fry>[]")
    restore_fails({**like, "extra": jax.ShapeDtypeStruct((), jnp.int32)},
                  "['extra']: in `like` but not in the checkpoint")
    restore_fails({"w": like["w"], "key": like["key"]},
                  "['n']: in the checkpoint but not in `like`")
    restore_fails(Pair(like["w"], like["n"]), ".first: in `like` but not in the checkpoint",
                  "['w']: in the checkpoint but not in `like`")
    with pytest.raises(TypeError, match=r"leaf \['n'\] of `like` is a int"):
        restore_checkpoint(tmp_path, {**like, "n": 3})


# ----------------------------------------------------------------------------- interrupted saves

def test_leftover_temp_dir_is_ignored_and_cleaned_up(tmp_path):
    save_checkpoint(tmp_path, 1, _random_tree(1))
    # what a save of step 2 killed half-way leaves behind: a temporary directory, no manifest
    leftover = tmp_path / ".tmp-step_00000002-0123abcd"
    leftover.mkdir()
    (leftover / "arrays.bin").write_bytes(b"\1" * 100)
    assert list_steps(tmp_path) == [1] and latest_step(tmp_path) == 1
    assert_bit_identical(restore_checkpoint(tmp_path, _like(_random_tree(0)))[0],
                         _random_tree(1))
    save_checkpoint(tmp_path, 3, _random_tree(3))
    assert sorted(os.listdir(tmp_path)) == ["step_00000001", "step_00000003"]


def test_overwrite_interrupted_between_renames_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 1, _random_tree(1), metadata={"version": "old"})
    real_replace, calls = os.replace, []

    def replace_then_die(src, dst):  # the second rename would put the new checkpoint in place
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError("killed here")
        real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", replace_then_die)
    with pytest.raises(OSError, match="killed here"):
        save_checkpoint(tmp_path, 1, _random_tree(2), metadata={"version": "new"})
    monkeypatch.undo()
    assert not (tmp_path / "step_00000001").exists()  # moved aside, the new one not yet there
    like = _like(_random_tree(0))
    assert list_steps(tmp_path) == [1]
    restored, metadata = restore_checkpoint(tmp_path, like)
    assert metadata == {"version": "old"}
    assert_bit_identical(restored, _random_tree(1))
    # the next save moves it back and removes the interrupted save's directory
    save_checkpoint(tmp_path, 5, _random_tree(5))
    assert sorted(os.listdir(tmp_path)) == ["step_00000001", "step_00000005"]
    assert restore_checkpoint(tmp_path, like, step=1)[1] == {"version": "old"}


def _kill_test_tree(i: int):
    """~2.3 MB that differ in every array from one save to the next (numpy only: it also runs
    in the child processes)."""
    import ml_dtypes
    import numpy as np

    return {"w": np.full(1 << 19, i, np.float32), "v": np.full(1 << 16, -i, ml_dtypes.bfloat16),
            "n": np.arange(1000, dtype=np.int32) * i, "step": np.int32(i)}


_KILL_CHILD = textwrap.dedent("""
    import sys
    from fnn.train.checkpoint import save_checkpoint
    root, mode = sys.argv[1], sys.argv[2]
    for i in range(100_000):
        step = i if mode == "new" else 7  # "overwrite": the same step over and over
        save_checkpoint(root, step, _kill_test_tree(i), metadata={"i": i}, keep=2)
        print(i, flush=True)
""")


def _kill_at_random_moments(source: str, roots: list, modes: list, delays) -> list:
    """Runs one saving child per root and SIGKILLs each ``delay`` seconds after its first
    checkpoint is complete; returns each child's printed lines (the saves it finished)."""
    children = [subprocess.Popen([sys.executable, "-c", source, str(root), mode],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for root, mode in zip(roots, modes)]
    kill_at = [None] * len(children)
    try:
        deadline = time.monotonic() + 60
        while any(child.returncode is None for child in children):
            assert time.monotonic() < deadline, "no checkpoint within 60 s"
            for n, child in enumerate(children):
                if child.poll() is not None:
                    continue
                now = time.monotonic()
                if kill_at[n] is None and list_steps(roots[n]):
                    kill_at[n] = now + delays[n]
                if kill_at[n] is not None and now >= kill_at[n]:
                    child.send_signal(signal.SIGKILL)
                    child.wait()
            time.sleep(0.002)
    finally:
        outputs = []
        for child in children:
            child.kill()  # nothing left running if an assertion failed
            outputs.append(child.communicate(timeout=30))
    for child, (_, stderr) in zip(children, outputs):
        assert child.returncode == -signal.SIGKILL, stderr
    return [[int(line) for line in stdout.split()] for stdout, _ in outputs]


def test_sigkill_during_save_never_loses_the_previous_checkpoint(tmp_path):
    modes = ["new", "overwrite", "new", "overwrite"]
    roots = [tmp_path / f"run{n}" for n in range(len(modes))]
    delays = np.random.default_rng(0).uniform(0.0, 0.3, len(modes))
    source = inspect.getsource(_kill_test_tree) + _KILL_CHILD
    printed = _kill_at_random_moments(source, roots, modes, delays)
    like = _like(jax.tree.map(jnp.asarray, _kill_test_tree(0)))
    for reported, root, mode in zip(printed, roots, modes):
        last = reported[-1] if reported else 0  # saved, but perhaps killed before printing
        steps = list_steps(root)
        if mode == "new":  # with keep=2: the last reported save is there, at most one after it
            assert last in steps and set(steps) <= {last - 1, last, last + 1}, (last, steps)
        else:
            assert steps == [7]
        for step in steps:
            restored, metadata = restore_checkpoint(root, like, step=step)
            assert step == (metadata["i"] if mode == "new" else 7)
            # exactly one of the states that were saved
            assert_bit_identical(restored, jax.tree.map(jnp.asarray,
                                                        _kill_test_tree(metadata["i"])))
        # never the state from before the last reported save
        assert restore_checkpoint(root, like)[1]["i"] in (last, last + 1)
        # the next save cleans up whatever the kill left behind
        save_checkpoint(root, 10**6, _kill_test_tree(0), keep=1)
        assert os.listdir(root) == ["step_01000000"]


# ----------------------------------------------------------------------------- devices, pickle

_SHARDED_CHILD = textwrap.dedent("""
    import sys
    import jax
    jax.config.update("jax_num_cpu_devices", 4)
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from fnn.train.checkpoint import restore_checkpoint, save_checkpoint

    mesh = jax.make_mesh((4,), ("data",))
    replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    x = jax.device_put(np.arange(8, dtype=np.float32), replicated)
    y = jax.device_put(np.arange(8, 16, dtype=np.float32), split)
    z = jax.jit(lambda a, b: a * b, out_shardings=replicated)(x, y)
    tree = {"x": x, "y": y, "z": z, "key": jax.device_put(jax.random.key(3), replicated)}
    save_checkpoint(sys.argv[1], 0, tree)
    like = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                        tree)
    restored, _ = restore_checkpoint(sys.argv[1], like)
    for name, value in tree.items():
        assert restored[name].sharding == value.sharding, name
        if name == "key":
            restored[name], value = map(jax.random.key_data, (restored[name], value))
        np.testing.assert_array_equal(np.asarray(restored[name]), np.asarray(value))
    np.testing.assert_array_equal(np.asarray(restored["z"]), np.arange(8) * np.arange(8, 16))
    print("restored on", len(restored["y"].sharding.device_set), "devices")
""")


def test_arrays_on_several_devices(tmp_path):
    result = subprocess.run([sys.executable, "-c", _SHARDED_CHILD, str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "restored on 4 devices"


_UNPICKLING = re.compile(r"^\s*(import|from)\s+(c?pickle|dill|cloudpickle|joblib)\b"
                         r"|allow_pickle\s*=\s*True|weights_only\s*=\s*False", re.MULTILINE)


def test_no_module_of_fnn_unpickles():
    for line in ["import pickle", "  from pickle import loads", "import cloudpickle as cp",
                 "np.load(f, allow_pickle = True)", "torch.load(f, weights_only=False)"]:
        assert _UNPICKLING.search(line), line  # the pattern catches what it is meant to
    for line in ["np.load(f)", "import pickleball", "allow_pickle=False"]:
        assert not _UNPICKLING.search(line), line
    package = pathlib.Path(fnn.__file__).parent
    sources = sorted(package.rglob("*.py"))
    assert package / "train" / "checkpoint.py" in sources
    found = [f"{p.relative_to(package)}: {m.group(0).strip()}"
             for p in sources for m in _UNPICKLING.finditer(p.read_text(encoding="utf-8"))]
    assert found == []


def test_a_symlink_out_of_the_root_is_refused(tmp_path):
    root = tmp_path / "checkpoints"
    save_checkpoint(root, 1, {"w": np.arange(4, dtype=np.float32)})
    elsewhere = tmp_path / "elsewhere.bin"
    data = root / "step_00000001" / "arrays.bin"
    elsewhere.write_bytes(data.read_bytes())
    data.unlink()
    data.symlink_to(elsewhere)  # the same bytes, but not from inside the checkpoint root
    with pytest.raises(CheckpointError, match=r"arrays.bin is a symbolic link to .*elsewhere.bin,"
                                              r" outside the checkpoint root .*: refused"):
        restore_checkpoint(root, {"w": jax.ShapeDtypeStruct((4,), jnp.float32)})
    # a link that stays inside the root is a file of the root like any other
    data.unlink()
    inside = root / "copy.bin"
    inside.write_bytes(elsewhere.read_bytes())
    data.symlink_to(inside)
    tree, _ = restore_checkpoint(root, {"w": jax.ShapeDtypeStruct((4,), jnp.float32)})
    np.testing.assert_array_equal(tree["w"], np.arange(4))


def test_restore_latest_intact_reports_and_set_aside_keeps_the_corrupt_ones(tmp_path):
    from fnn.train.checkpoint import restore_latest_intact, set_aside

    like = {"w": jax.ShapeDtypeStruct((4,), jnp.float32)}
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, {"w": np.full(4, step, np.float32)})
    data = tmp_path / "step_00000003" / "arrays.bin"
    raw = bytearray(data.read_bytes())
    raw[0] ^= 1
    data.write_bytes(bytes(raw))
    tree, _, step, corrupt = restore_latest_intact(tmp_path, like)
    assert step == 2 and float(tree["w"][0]) == 2.0
    assert [s for s, _ in corrupt] == [3] and "sha256 mismatch" in corrupt[0][1]
    moved = set_aside(tmp_path, 3)
    assert moved.name.startswith("corrupt-step_00000003-") and list_steps(tmp_path) == [1, 2]
    assert (moved / "arrays.bin").read_bytes() == bytes(raw)
    for step in (1, 2):
        set_aside(tmp_path, step)
    with pytest.raises(CheckpointError, match=r"no complete checkpoint in"):
        restore_latest_intact(tmp_path, like)


def test_restore_a_subtree_of_a_train_state(tmp_path):
    model = MLP([8], 3)
    ts = create_train_state(model, optax.adam(1e-3), jax.random.key(0), jnp.zeros((2, 5)))
    save_checkpoint(tmp_path, 4, ts)
    like = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((2, 5)))[0]
    params, _ = restore_checkpoint(tmp_path, like, subtree="params")
    assert jax.tree.structure(params) == jax.tree.structure(ts.params)
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(ts.params)):
        assert np.asarray(got).tobytes() == np.asarray(want).tobytes()
    state, _ = restore_checkpoint(tmp_path, {}, subtree="state")  # an MLP has no state
    assert state == {}
    # a dict at the top: the subtree is a key
    save_checkpoint(tmp_path / "d", 1, {"params": ts.params, "other": jnp.ones(3)})
    params, _ = restore_checkpoint(tmp_path / "d", like, subtree="params")
    np.testing.assert_array_equal(params["head"]["w"], ts.params["head"]["w"])
    with pytest.raises(CheckpointError, match=r"the checkpoint has no subtree 'weights'; its "
                                              r"parts are .bad_streak, .key, .opt_state, "
                                              r".params, .skipped, .step$"):
        restore_checkpoint(tmp_path, like, subtree="weights")
    wrong = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape[::-1], s.dtype), like)
    with pytest.raises(CheckpointError, match=r"\.params\['dense1'\]\['w'\]: `like` expects "
                                              r"float32\[8, 5\], the checkpoint has "
                                              r"float32\[5, 8\]"):
        restore_checkpoint(tmp_path, wrong, subtree="params")
    # damage anywhere is found, also outside the subtree
    data = tmp_path / "step_00000004" / "arrays.bin"
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 1
    data.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="sha256"):
        restore_checkpoint(tmp_path, like, subtree="params")
