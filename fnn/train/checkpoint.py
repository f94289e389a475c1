"""Checkpoints: the whole train state, written atomically and verified when it is read back.

    path = save_checkpoint(root, step, train_state, metadata={"epoch": 3}, keep=3)
    train_state, metadata = restore_checkpoint(root, like)           # the latest step
    train_state, metadata = restore_checkpoint(root, like, step=100)

The saved tree is any pytree of arrays: a :class:`~fnn.train.TrainState` (params, state, optax
states made of NamedTuples, the int32 step, a typed PRNG key from ``jax.random.key``) or any
other. ``like`` has the same structure with array or ``jax.ShapeDtypeStruct`` leaves, e.g.
``jax.eval_shape(lambda: create_train_state(model, optimizer, key, x))``; its leaves say which
arrays to expect, and the restored arrays get the ``sharding`` of ``like``'s leaves where they
have one.

On disk
-------
::

    root/
      step_00000100/            one directory per step, the step zero-padded to 8 digits
        arrays.bin              the raw bytes of every array, one after the other
        manifest.json           what those bytes are (below)
      step_00000200/
      .tmp-step_00000300-9f2c01ab/   a save in progress, or killed: ignored by readers and
                                     removed by the next save

``manifest.json`` is one JSON object::

    {"format": "fnn-checkpoint", "version": 1, "step": 200,
     "metadata": {...},                 # the caller's JSON metadata, e.g. the data position
     "data_bytes": 4194304,             # the size of arrays.bin
     "arrays": [{"path": ".params['dense1']['w']",   # jax.tree_util.keystr of the key path
                 "dtype": "bfloat16", "shape": [784, 512],
                 "offset": 0, "nbytes": 802816,       # where its bytes lie in arrays.bin
                 "sha256": "...",                     # of those bytes
                 "key_impl": null},                   # PRNG implementation of a key array
                ...],
     "manifest_sha256": "..."}          # of the canonical JSON of all other fields

Arrays are stored C-contiguous in little-endian byte order (the native order of every platform
JAX runs on) under numpy's name of their dtype, so ``bfloat16`` and the other ml_dtypes
round-trip bit for bit. A typed PRNG key array is stored as its ``jax.random.key_data``
(``uint32`` with a trailing axis) with ``key_impl`` naming the implementation, and restored with
``jax.random.wrap_key_data``. A checkpoint is bytes and JSON only: reading one never unpickles
or runs anything. Restoring checks the manifest's own hash, every key path, dtype and shape
against ``like``, the data file's size and every array's sha256, so a truncated or corrupted
checkpoint raises :class:`CheckpointError` naming the file and the array instead of returning
wrong numbers.

Atomicity
---------
A save writes into a temporary directory inside ``root``, fsyncs every file and that directory,
renames it to ``step_XXXXXXXX`` with ``os.replace`` and fsyncs ``root``. A process killed at any
moment therefore leaves every checkpoint that was complete before intact. Overwriting an
existing step first renames the old directory aside (``.old-step_XXXXXXXX-...``); until the new
one is in place, readers take that as the step's checkpoint, and the next save moves it back if
the process died in between, so the step always reads as either the old or the new checkpoint.
Checkpoints beyond ``keep`` are deleted only after the new one is in place, and are renamed to a
temporary name first, so that they disappear whole. One process writes to a root at a time (in
multi-host training, process 0).
"""

from __future__ import annotations

import hashlib
import json
import math
import operator
import os
import pathlib
import re
import secrets
import shutil
from concurrent import futures
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

FORMAT = "fnn-checkpoint"
VERSION = 1
MANIFEST = "manifest.json"
DATA_FILE = "arrays.bin"
_TMP_PREFIX = ".tmp-"  # anything being written or deleted
_OLD_PREFIX = ".old-"  # a complete checkpoint moved aside while its step is overwritten
_STEP_DIR = re.compile(r"step_(\d{8,})")
_OLD_DIR = re.compile(re.escape(_OLD_PREFIX) + r"step_(\d{8,})-[0-9a-f]+")
_MAX_LISTED = 10  # mismatching arrays listed in one error message
_CHUNK_BYTES = 64 << 20  # a save copies about this much to the host at a time


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, corrupted, or does not match ``like``; the
    message names the file and, where one array is at fault, its key path."""


class _Entry(NamedTuple):
    """One array as the manifest records it."""

    path: str  # jax.tree_util.keystr of the leaf's key path
    dtype: np.dtype  # of the stored bytes (uint32 key data for a PRNG key array)
    shape: tuple[int, ...]  # of the stored bytes
    offset: int  # where its bytes start in the data file
    nbytes: int
    sha256: str  # hex digest of its bytes
    key_impl: str | None  # PRNG implementation of a typed key array, None for other arrays


class _Manifest(NamedTuple):
    step: int
    metadata: dict
    data_bytes: int  # the data file's size
    entries: list[_Entry]


# ----------------------------------------------------------------------------- saving

def save_checkpoint(root, step: int, tree, *, metadata: dict | None = None,
                    keep: int | None = None) -> pathlib.Path:
    """Saves ``tree`` as the checkpoint ``root/step_XXXXXXXX``, atomically; returns that path.

    Leftovers of an interrupted save in ``root`` are removed first (see the module docstring).

    Args:
      root: the checkpoint directory; created if missing.
      step: the step number, an int >= 0. A checkpoint of the same step is replaced atomically.
      tree: a pytree of arrays (jax or numpy, typed PRNG keys included). Arrays are copied to
        the host a few at a time (at most about 64 MiB at once, or one larger array), so a
        save never holds the whole tree in host memory. An array sharded over several
        processes' devices is gathered (a collective): then every process must call
        ``save_checkpoint`` with the same arguments, and only process 0 writes.
      metadata: a dict saved alongside and returned by :func:`restore_checkpoint`, e.g. the
        data iterator's position. It must survive a JSON round trip unchanged: string keys,
        lists rather than tuples, finite floats.
      keep: if given, keep this checkpoint and the ``keep - 1`` others with the highest steps
        and delete the rest, once this one is in place. ``None`` keeps all.

    Returns:
      The new checkpoint's directory.
    """
    root = pathlib.Path(root)
    step = _check_step(step)
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
        raise ValueError(f"save_checkpoint: keep must be None or an int >= 1, got {keep!r}")
    metadata = _check_metadata(metadata)
    leaves = _device_leaves(tree)
    final = root / _step_name(step)
    spans = any(isinstance(leaf, jax.Array) and not leaf.is_fully_addressable
                for _, leaf, _ in leaves)
    if spans and jax.process_index() != 0:
        # take part in gathering each array that spans processes, in process 0's order; only
        # process 0 writes, so this one copies nothing else to its host
        for _, leaf, _ in leaves:
            if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
                multihost_utils.process_allgather(leaf, tiled=True)
        return final
    root.mkdir(parents=True, exist_ok=True)
    _clean_leftovers(root)
    tmp = root / f"{_TMP_PREFIX}{final.name}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        _write(tmp, step, _host_chunks(leaves), len(leaves), metadata)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _move_into_place(tmp, final)
    if keep is not None:
        _delete_all_but(root, step, keep)
    return final


def _check_step(step) -> int:
    try:
        if isinstance(step, bool):
            raise TypeError
        step = operator.index(step)
    except TypeError:
        raise TypeError(f"save_checkpoint: step must be an int, got {step!r}") from None
    if step < 0:
        raise ValueError(f"save_checkpoint: step must be >= 0, got {step}")
    return step


def _check_metadata(metadata) -> dict:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise TypeError(f"save_checkpoint: metadata must be a dict, got "
                        f"{type(metadata).__name__}")
    try:
        text = json.dumps(metadata, allow_nan=False)
    except TypeError as e:
        raise TypeError(f"save_checkpoint: metadata must be JSON-serialisable: {e}") from None
    except ValueError as e:  # NaN or infinity, or a circular reference
        raise ValueError(f"save_checkpoint: metadata must be JSON-serialisable: {e}") from None
    if json.loads(text) != metadata:
        raise TypeError("save_checkpoint: metadata would come back changed from JSON (tuples "
                        "become lists, non-string keys become strings): use lists and string "
                        f"keys; got {metadata!r}")
    return metadata


def _device_leaves(tree) -> list[tuple[str, Any, str | None]]:
    """``(key path, array, PRNG implementation or None)`` for every leaf of ``tree``, a key
    array as its key data; nothing is copied yet."""
    leaves = []
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        path = jax.tree_util.keystr(key_path)
        if not isinstance(leaf, (jax.Array, np.ndarray, np.generic)):
            raise TypeError(f"save_checkpoint: leaf {path} is a {type(leaf).__name__}, not an "
                            "array; wrap it with jnp.asarray so that its dtype is saved too")
        impl = None
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            impl = str(jax.random.key_impl(leaf))
            leaf = jax.random.key_data(leaf)
        _check_dtype(np.dtype(leaf.dtype), f"save_checkpoint: array {path}")
        leaves.append((path, leaf, impl))
    paths = [path for path, _, _ in leaves]
    if len(set(paths)) != len(paths):
        raise ValueError(f"save_checkpoint: two leaves share a key path: {sorted(paths)}")
    return leaves


def _host_chunks(leaves):
    """The leaves as C-contiguous host arrays, in order, in lists of at most
    :data:`_CHUNK_BYTES` (or one larger array): each list is one ``jax.device_get``, so that
    its copies overlap, and a list is dropped once written."""
    chunk, size = [], 0
    for entry in leaves:
        nbytes = np.dtype(entry[1].dtype).itemsize * math.prod(np.shape(entry[1]))
        if chunk and size + nbytes > _CHUNK_BYTES:
            yield _fetch(chunk)
            chunk, size = [], 0
        chunk.append(entry)
        size += nbytes
    if chunk:
        yield _fetch(chunk)


def _fetch(chunk) -> list[tuple[str, np.ndarray, str | None]]:
    local = [leaf if not isinstance(leaf, jax.Array) or leaf.is_fully_addressable
             else multihost_utils.process_allgather(leaf, tiled=True)
             for _, leaf, _ in chunk]
    arrays = []
    for (path, _, impl), array in zip(chunk, jax.device_get(local)):
        array = np.asarray(array, order="C")  # keeps 0-d arrays 0-d
        if not array.dtype.isnative:
            array = array.astype(array.dtype.newbyteorder("="))
        arrays.append((path, array, impl))
    return arrays


def _check_dtype(dtype: np.dtype, where: str) -> np.dtype:
    """``dtype`` if it is stored as raw bytes under a name that reads back as itself."""
    try:
        ok = (dtype.kind in "biufcV" and dtype.names is None and dtype.subdtype is None
              and np.dtype(dtype.name) == dtype)
    except TypeError:  # a name numpy does not understand
        ok = False
    if not ok:
        raise TypeError(f"{where}: dtype {dtype} is not a numeric, bool or ml_dtypes type")
    return dtype


def _write(directory: pathlib.Path, step: int, chunks, count: int, metadata: dict) -> None:
    """Writes the data file from the ``chunks`` of :func:`_host_chunks` (``count`` arrays in
    all) and then the manifest into ``directory``, and syncs them to disk."""
    entries, offset = [], 0
    with _thread_pool(count) as pool, open(directory / DATA_FILE, "wb") as f:
        for chunk in chunks:
            # hashing takes about as long as writing: the threads hash while this one writes
            digests = pool.map(_sha256, [array for _, array, _ in chunk])
            for _, array, _ in chunk:
                f.write(_bytes_of(array))
            for (path, array, impl), digest in zip(chunk, digests):
                entries.append({"path": path, "dtype": array.dtype.name,
                                "shape": list(array.shape), "offset": offset,
                                "nbytes": array.nbytes, "sha256": digest, "key_impl": impl})
                offset += array.nbytes
        _sync(f)
    manifest = {"format": FORMAT, "version": VERSION, "step": step, "metadata": metadata,
                "data_bytes": offset, "arrays": entries}
    manifest["manifest_sha256"] = _manifest_hash(manifest)
    with open(directory / MANIFEST, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        _sync(f)
    _fsync_dir(directory)


def _move_into_place(tmp: pathlib.Path, final: pathlib.Path) -> None:
    if final.exists():
        # os.replace cannot replace a non-empty directory: move the old one aside, where readers
        # still find it (see _step_dirs), put the new one in place, then delete the old one
        old = final.with_name(f"{_OLD_PREFIX}{final.name}-{secrets.token_hex(4)}")
        os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        _remove_dir(old)
    else:
        os.replace(tmp, final)
        _fsync_dir(final.parent)


def _delete_all_but(root: pathlib.Path, step: int, keep: int) -> None:
    """Deletes all checkpoints but ``step`` and the ``keep - 1`` others with the highest steps."""
    dirs = _step_dirs(root)
    others = sorted(s for s in dirs if s != step)
    for s in others[:max(0, len(others) - (keep - 1))]:
        _remove_dir(dirs[s])


def _clean_leftovers(root: pathlib.Path) -> None:
    """Removes interrupted saves and deletions, and moves back a checkpoint that a killed
    overwrite had moved aside."""
    for entry in root.iterdir():
        if not entry.is_dir():
            continue
        if entry.name.startswith(_TMP_PREFIX):
            shutil.rmtree(entry)
        elif match := _OLD_DIR.fullmatch(entry.name):
            final = root / _step_name(int(match[1]))
            if final.exists():
                _remove_dir(entry)
            else:
                os.replace(entry, final)
                _fsync_dir(root)


def _remove_dir(directory: pathlib.Path) -> None:
    """Deletes ``directory`` whole: renamed away first, so that a kill mid-way never leaves a
    partly deleted checkpoint under a name that readers take."""
    trash = directory.with_name(f"{_TMP_PREFIX}deleted-{secrets.token_hex(4)}")
    os.replace(directory, trash)
    shutil.rmtree(trash)


def _sha256(array: np.ndarray) -> str:
    return hashlib.sha256(_bytes_of(array)).hexdigest()


def _thread_pool(tasks: int) -> futures.ThreadPoolExecutor:
    """Threads to hash several arrays at once: hashlib releases the GIL, and hashing is most of
    the time that a save or a restore takes."""
    return futures.ThreadPoolExecutor(max(1, min(tasks, os.cpu_count() or 1)))


def _bytes_of(array: np.ndarray) -> np.ndarray:
    """The bytes of a C-contiguous array, as a flat uint8 view (no copy)."""
    return array.reshape(-1).view(np.uint8)


def _sync(f) -> None:
    f.flush()
    os.fsync(f.fileno())


def _fsync_dir(directory: pathlib.Path) -> None:
    """Makes the directory's entries (renames, new files) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _manifest_hash(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def _step_name(step: int) -> str:
    return f"step_{step:08d}"


# ----------------------------------------------------------------------------- listing

def _step_dirs(root: pathlib.Path) -> dict[int, pathlib.Path]:
    """The directory of every complete checkpoint in ``root``, by step."""
    if not root.is_dir():
        return {}
    dirs, moved_aside = {}, {}
    for entry in root.iterdir():
        if match := _STEP_DIR.fullmatch(entry.name):
            # step directories only ever appear whole (renamed into place), so each is complete
            if entry.name == _step_name(int(match[1])) and entry.is_dir():
                dirs[int(match[1])] = entry
        elif (match := _OLD_DIR.fullmatch(entry.name)) and entry.is_dir():
            moved_aside[int(match[1])] = entry
    # an overwrite killed between its two renames: the old checkpoint still counts
    return {**moved_aside, **dirs}


def list_steps(root) -> list[int]:
    """The steps of the complete checkpoints in ``root``, ascending; ``[]`` if there are none
    or ``root`` does not exist. Interrupted saves are ignored."""
    return sorted(_step_dirs(pathlib.Path(root)))


def latest_step(root) -> int | None:
    """The highest step with a complete checkpoint in ``root``, or ``None``."""
    steps = list_steps(root)
    return steps[-1] if steps else None


# ----------------------------------------------------------------------------- restoring

def restore_checkpoint(root, like, *, step: int | None = None, load: bool = True,
                       subtree: str | None = None) -> tuple[Any, dict]:
    """Reads the checkpoint of ``step`` (default: the latest) from ``root``, verified.

    Args:
      root: the checkpoint directory given to :func:`save_checkpoint`.
      like: a pytree with the saved tree's structure whose leaves have the expected ``shape``
        and ``dtype``: arrays or ``jax.ShapeDtypeStruct`` (e.g. from ``jax.eval_shape``).
        Where a leaf has a ``sharding``, the restored array is placed with it.
      step: the step to read; ``None`` reads the latest.
      load: ``False`` only verifies the checkpoint (every check below, no device arrays made)
        and returns ``(None, metadata)``.
      subtree: the name of one part of the saved tree to restore, ``like`` then having the
        structure of that part only: ``subtree="params"`` reads the params of a whole train
        state's checkpoint (a field of a NamedTuple or a key of a dict at the top of the tree).
        Every array of the checkpoint is still verified.

    Returns:
      ``(tree, metadata)``: a pytree of jax arrays with the structure of ``like``, and the
      metadata dict that was saved with it.

    Raises:
      CheckpointError: no such checkpoint; a missing, garbled or edited manifest; key paths,
        shapes or dtypes that differ from ``like`` (naming each path, expected versus got); a
        missing, truncated or corrupted data file (naming the file and the array).
    """
    root = pathlib.Path(root)
    directory = _checkpoint_dir(root, step)
    for path in (directory, directory / MANIFEST, directory / DATA_FILE):
        _check_inside(root, path)
    manifest = _read_manifest(directory / MANIFEST)
    like_leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
    prefix = "" if subtree is None else _subtree_prefix(manifest, subtree, directory / MANIFEST,
                                                        empty=not like_leaves)
    like_by_path = {prefix + jax.tree_util.keystr(p): leaf for p, leaf in like_leaves}
    _check_like(manifest._replace(entries=[e for e in manifest.entries
                                           if _under(e.path, prefix)]),
                like_by_path, directory / MANIFEST)
    arrays = _read_arrays(directory / DATA_FILE, manifest)
    if not load:
        return None, manifest.metadata
    entries = {e.path: e for e in manifest.entries}
    values = [_to_jax(arrays[path], entries[path], leaf, directory / DATA_FILE)
              for path, leaf in like_by_path.items()]
    return jax.tree_util.tree_unflatten(treedef, values), manifest.metadata


def _under(path: str, prefix: str) -> bool:
    """Whether the key path ``path`` lies in the subtree at ``prefix`` (``""``: the root)."""
    return path.startswith(prefix) and path[len(prefix):len(prefix) + 1] in ("", ".", "[")


def _subtree_prefix(manifest: _Manifest, name: str, manifest_path: pathlib.Path,
                    empty: bool) -> str:
    """The key path of the top-level part ``name``: ``.name`` (a field) or ``['name']``. A
    part without arrays (an empty model state) leaves nothing in the manifest: with ``empty``
    (``like`` has no leaves either) that is no error."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"restore_checkpoint: subtree is the name of a part of the saved tree "
                        f"(\"params\"), got {name!r}")
    for prefix in (f".{name}", f"[{name!r}]"):
        if any(_under(e.path, prefix) for e in manifest.entries):
            return prefix
    if empty:
        return f".{name}"
    tops = sorted({re.match(r"^(\.\w+|\[[^\]]*\])", e.path).group(1)
                   for e in manifest.entries if re.match(r"^(\.\w+|\[[^\]]*\])", e.path)})
    raise CheckpointError(f"{manifest_path}: the checkpoint has no subtree {name!r}; its parts "
                          f"are {', '.join(tops) or 'none (a single array)'}")


def _check_inside(root: pathlib.Path, path: pathlib.Path) -> None:
    """Refuses a checkpoint file or directory that is a symbolic link leading outside ``root``:
    a checkpoint is read from where it was written, never from wherever a link points."""
    if not path.is_symlink():
        return
    target = path.resolve()
    if not target.is_relative_to(root.resolve()):
        raise CheckpointError(f"{path} is a symbolic link to {target}, outside the checkpoint "
                              f"root {root}: refused")


def restore_latest_intact(root, like, *, load: bool = True, subtree: str | None = None
                          ) -> tuple[Any, dict, int, list[tuple[int, str]]]:
    """:func:`restore_checkpoint` of the newest checkpoint in ``root`` that restores: returns
    ``(tree, metadata, step, corrupt)``, where ``corrupt`` lists ``(step, reason)`` for each
    newer checkpoint that did not (a flipped byte, a truncated file, a changed manifest).
    ``load=False`` only finds and verifies it (``tree`` is then ``None``); ``subtree`` as in
    :func:`restore_checkpoint`. Raises
    :class:`CheckpointError` when there is none, or none restores."""
    root = pathlib.Path(root)
    corrupt: list[tuple[int, str]] = []
    for step in sorted(_step_dirs(root), reverse=True):
        try:
            tree, metadata = restore_checkpoint(root, like, step=step, load=load,
                                                subtree=subtree)
        except CheckpointError as e:
            corrupt.append((step, str(e)))
            continue
        return tree, metadata, step, corrupt
    if not corrupt:
        raise CheckpointError(f"no complete checkpoint in {root}")
    raise CheckpointError(f"no checkpoint in {root} restores: " + "; ".join(
        f"step {step}: {reason}" for step, reason in corrupt))


def set_aside(root, step: int) -> pathlib.Path:
    """Renames the checkpoint of ``step`` to ``corrupt-step_XXXXXXXX-<random>`` in ``root``, so
    that it no longer counts as a checkpoint but stays on disk (nothing is deleted); returns
    the new path."""
    root = pathlib.Path(root)
    directory = _checkpoint_dir(root, step)
    target = root / f"corrupt-{_step_name(step)}-{secrets.token_hex(4)}"
    os.replace(directory, target)
    _fsync_dir(root)
    return target


def _checkpoint_dir(root: pathlib.Path, step: int | None) -> pathlib.Path:
    dirs = _step_dirs(root)
    if not dirs:
        raise CheckpointError(f"no complete checkpoint in {root}")
    if step is None:
        return dirs[max(dirs)]
    if step not in dirs:
        raise CheckpointError(f"no checkpoint of step {step} in {root}; complete steps: "
                              f"{sorted(dirs)}")
    return dirs[step]


def _read_manifest(path: pathlib.Path) -> _Manifest:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: the manifest is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: the manifest is unreadable or garbled: {e}") from None
    try:
        return _parse_manifest(raw, path)
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:  # a field missing or mistyped
        raise CheckpointError(f"{path}: malformed manifest: {type(e).__name__}: {e}") from None


def _parse_manifest(raw: dict, path: pathlib.Path) -> _Manifest:
    if raw.get("format") != FORMAT or raw.get("version") != VERSION:
        raise CheckpointError(f"{path}: not a {FORMAT} version {VERSION} manifest (format "
                              f"{raw.get('format')!r}, version {raw.get('version')!r})")
    if raw.get("manifest_sha256") != _manifest_hash(raw):
        raise CheckpointError(f"{path}: manifest_sha256 does not match the manifest's contents: "
                              "the manifest was changed or corrupted after it was written")
    entries, offset = [], 0
    for item in raw["arrays"]:
        entry = _Entry(path=_typed(item["path"], str), dtype=_dtype_named(item["dtype"]),
                       shape=tuple(_typed(n, int) for n in item["shape"]),
                       offset=_typed(item["offset"], int), nbytes=_typed(item["nbytes"], int),
                       sha256=_typed(item["sha256"], str),
                       key_impl=None if item["key_impl"] is None else _typed(item["key_impl"],
                                                                             str))
        size = int(np.prod(entry.shape, dtype=np.int64)) * entry.dtype.itemsize
        if entry.offset != offset or entry.nbytes != size or min(entry.shape, default=0) < 0:
            raise CheckpointError(f"{path}: array {entry.path}: offset {entry.offset} and nbytes "
                                  f"{entry.nbytes} do not fit its layout ({entry.dtype}"
                                  f"{list(entry.shape)} after {offset} bytes)")
        entries.append(entry)
        offset += size
    if raw["data_bytes"] != offset:
        raise CheckpointError(f"{path}: data_bytes {raw['data_bytes']} != {offset}, the sum of "
                              "the arrays' sizes")
    metadata = raw["metadata"]
    if not isinstance(metadata, dict):
        raise TypeError(f"metadata is a {type(metadata).__name__}, not a dict")
    return _Manifest(_typed(raw["step"], int), metadata, offset, entries)


def _typed(value, kind: type):
    if isinstance(value, bool) or not isinstance(value, kind):
        raise TypeError(f"expected {kind.__name__}, got {value!r}")
    return value


def _dtype_named(name) -> np.dtype:
    try:
        dtype = np.dtype(_typed(name, str))
    except TypeError:  # not a dtype name numpy knows
        raise TypeError(f"unknown dtype {name!r}") from None
    return _check_dtype(dtype, "manifest")


def _leaf_spec(entry: _Entry, manifest_path: pathlib.Path) -> jax.ShapeDtypeStruct:
    """The shape and dtype of the leaf an entry restores (a key array for PRNG key data)."""
    stored = jax.ShapeDtypeStruct(entry.shape, entry.dtype)
    if entry.key_impl is None:
        return stored
    try:
        return jax.eval_shape(lambda d: jax.random.wrap_key_data(d, impl=entry.key_impl), stored)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{manifest_path}: array {entry.path}: not the key data of a "
                              f"{entry.key_impl!r} PRNG key: {e}") from None


def _describe(shape, dtype) -> str:
    return f"{dtype}[{', '.join(map(str, shape))}]"


def _check_like(manifest: _Manifest, like_by_path: dict, manifest_path: pathlib.Path) -> None:
    """Raises a CheckpointError listing every difference between the checkpoint and ``like``."""
    saved = {e.path: e for e in manifest.entries}
    missing = [p for p in like_by_path if p not in saved]
    extra = [p for p in saved if p not in like_by_path]
    problems = [f"{p}: in `like` but not in the checkpoint" for p in missing]
    problems += [f"{p}: in the checkpoint but not in `like`" for p in extra]
    for path, leaf in like_by_path.items():
        if path not in saved:
            continue
        if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
            raise TypeError(f"restore_checkpoint: leaf {path} of `like` is a "
                            f"{type(leaf).__name__}; give arrays or jax.ShapeDtypeStruct")
        spec = _leaf_spec(saved[path], manifest_path)
        if tuple(leaf.shape) != spec.shape or leaf.dtype != spec.dtype:
            problems.append(f"{path}: `like` expects {_describe(leaf.shape, leaf.dtype)}, the "
                            f"checkpoint has {_describe(spec.shape, spec.dtype)}")
    if problems:
        more = len(problems) - _MAX_LISTED
        listed = problems[:_MAX_LISTED] + ([f"... and {more} more"] if more > 0 else [])
        raise CheckpointError(f"{manifest_path}: the checkpoint does not match `like`:\n  "
                              + "\n  ".join(listed))


def _read_arrays(path: pathlib.Path, manifest: _Manifest) -> dict[str, np.ndarray]:
    """Every array of the data file, by key path, each checked against its sha256."""
    arrays = _read_raw(path, manifest)
    with _thread_pool(len(arrays)) as pool:
        digests = list(pool.map(_sha256, arrays))
    for entry, digest in zip(manifest.entries, digests):
        if digest != entry.sha256:
            raise CheckpointError(f"array {entry.path} in {path}: sha256 mismatch: its bytes "
                                  "changed after the save (the file is corrupted)")
    return {entry.path: array for entry, array in zip(manifest.entries, arrays)}


def _read_raw(path: pathlib.Path, manifest: _Manifest) -> list[np.ndarray]:
    """The arrays of the data file, unchecked, in the manifest's order."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise CheckpointError(f"{path}: the data file cannot be opened: {e}") from None
    arrays = []
    with f:
        size = os.fstat(f.fileno()).st_size
        if size < manifest.data_bytes:
            _raise_truncated(path, size, manifest)
        if size > manifest.data_bytes:
            raise CheckpointError(f"{path}: {size} bytes, the manifest says "
                                  f"{manifest.data_bytes}: the file was changed after the save")
        for entry in manifest.entries:  # stored back to back, in this order
            array = np.empty(entry.shape, entry.dtype)
            data = _bytes_of(array)
            if f.readinto(data) != entry.nbytes:  # the file shrank while being read
                _raise_truncated(path, os.fstat(f.fileno()).st_size, manifest)
            arrays.append(array)
    return arrays


def _raise_truncated(path: pathlib.Path, size: int, manifest: _Manifest):
    """Raises a CheckpointError naming the first array that a data file of ``size`` bytes
    cuts off."""
    entry = next(e for e in manifest.entries if e.offset + e.nbytes > size)
    raise CheckpointError(f"array {entry.path} in {path}: the file is truncated: the array needs "
                          f"bytes {entry.offset} to {entry.offset + entry.nbytes}, the file has "
                          f"{size} of the {manifest.data_bytes} the manifest says")


def _to_jax(array: np.ndarray, entry: _Entry, like_leaf, path: pathlib.Path) -> jax.Array:
    """The restored leaf on ``like_leaf``'s sharding, if it has one."""
    sharding = getattr(like_leaf, "sharding", None)
    if entry.key_impl is not None:
        return jax.device_put(jax.random.wrap_key_data(array, impl=entry.key_impl), sharding)
    value = jax.device_put(array, sharding)
    if value.dtype != array.dtype:  # e.g. float64 while jax_enable_x64 is off
        raise CheckpointError(f"array {entry.path} in {path}: {array.dtype} becomes "
                              f"{value.dtype} on the device; enable jax_enable_x64 to restore it")
    return value
