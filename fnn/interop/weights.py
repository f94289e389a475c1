"""Weight files: safetensors and npz for any params/state tree, keys joined by ``/``.

A tree ``{"encoder": {"0": {"w": ..., "b": ...}}}`` is written as the flat entries
``encoder/0/w`` and ``encoder/0/b``, each array with its own dtype (``bfloat16`` and the other
ml_dtypes types included) and shape. The files are those every other tool reads: a
``.safetensors`` file written here loads in ``safetensors.torch.load_file`` and Hugging Face, and a
file from ``safetensors.torch.save_file`` (a PyTorch ``state_dict``) loads here as flat entries
(:func:`read_safetensors`), ready for the PyTorch importers of :mod:`fnn.interop.pytorch`.

Loading into a model checks what it reads against ``like`` (the model's params, or anything of
the same structure, e.g. ``jax.eval_shape`` of its ``init``), as checkpoints do: every entry
present, nothing extra, the same shape and dtype, with an error naming the entry and expected
versus got. Writing is atomic (a temporary file moved into place) and never replaces an existing
file unless ``overwrite=True``.

Sharded files (Hugging Face's ``model.safetensors.index.json`` with its ``weight_map``) are read
by giving the index's path, and written with ``max_shard_bytes``.
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
import zipfile
from typing import Any, Callable, Mapping

import jax
import ml_dtypes
import numpy as np

from fnn.core import describe
from fnn.train.groups import leaf_path

# safetensors' dtype names (the format's specification), and their numpy types
_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_), "U8": np.dtype(np.uint8), "I8": np.dtype(np.int8),
    "U16": np.dtype(np.uint16), "I16": np.dtype(np.int16), "U32": np.dtype(np.uint32),
    "I32": np.dtype(np.int32), "U64": np.dtype(np.uint64), "I64": np.dtype(np.int64),
    "F16": np.dtype(np.float16), "F32": np.dtype(np.float32), "F64": np.dtype(np.float64),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
# a header larger than this is not a safetensors header (the reference reader's own limit)
_MAX_HEADER = 100_000_000
# npz has no bfloat16: such arrays are stored as their bits, their dtypes in this entry
_NPZ_DTYPES = "__dtypes__"


class WeightsError(ValueError):
    """A weight file that cannot be read, or whose entries do not fit the model."""


# ----------------------------------------------------------------------------- trees


def flatten(tree: Any) -> dict[str, np.ndarray]:
    """The leaves of ``tree`` as ``{"a/b/w": array}`` host arrays, in the order of
    ``jax.tree.leaves``. Raises when two leaves would get the same name."""
    flat: dict[str, np.ndarray] = {}
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = leaf_path(key_path)
        if name in flat:
            raise WeightsError(f"two leaves of the tree are both named {name!r}")
        flat[name] = np.asarray(leaf)
    return flat


def unflatten(flat: Mapping[str, Any]) -> dict:
    """Nested dicts from ``/``-joined names: ``{"a/b": x} -> {"a": {"b": x}}``."""
    tree: dict = {}
    for name, value in flat.items():
        *parents, last = name.split("/")
        node = tree
        for i, part in enumerate(parents):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise WeightsError(f"entry {name!r} lies under {'/'.join(parents[:i + 1])!r}, "
                                   f"which is an array")
            node = child
        if last in node:
            raise WeightsError(f"entry {name!r} is also the name of a group of entries")
        node[last] = value
    return tree


def fit_to(flat: Mapping[str, np.ndarray], like: Any, *, source: str) -> Any:
    """The tree of ``like``'s structure whose leaves are the entries of ``flat`` of the same
    names, as ``jax.Array``\\ s. Raises :class:`WeightsError` naming ``source`` and the entry when
    one is missing or extra, or its shape or dtype differs from ``like``'s leaf."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
    names = [leaf_path(key_path) for key_path, _ in leaves]
    missing = [n for n in names if n not in flat]
    extra = sorted(set(flat) - set(names))
    if missing or extra:
        parts = ([f"missing {_some(missing)}"] if missing else []) + (
            [f"not in the model {_some(extra)}"] if extra else [])
        raise WeightsError(f"{source}: the entries do not match the model: " + "; ".join(parts))
    out = []
    for name, (_, leaf) in zip(names, leaves):
        value = flat[name]
        if (value.shape, value.dtype) != (tuple(leaf.shape), np.dtype(leaf.dtype)):
            raise WeightsError(f"{source}: entry {name!r}: expected {describe(leaf)}, "
                               f"got {describe(value)}")
        out.append(jax.numpy.asarray(value))
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(like), out)


def _some(names: list[str], most: int = 8) -> str:
    shown = ", ".join(repr(n) for n in names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


# ----------------------------------------------------------------------------- writing


def write_atomically(path: pathlib.Path, write: Callable[[Any], None], overwrite: bool) -> None:
    """Writes ``path`` through ``write(file)`` into a temporary file beside it, then moves it into
    place: a failed write leaves no file and an existing one untouched."""
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists: pass overwrite=True to replace it")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path.parent} is not a directory")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # a plain file's mode, not mkstemp's private 0600
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _little_endian(array: np.ndarray) -> np.ndarray:
    """``array`` in C order and little-endian bytes, as both formats store them."""
    array = np.asarray(array, order="C")  # (ascontiguousarray would make scalars 1-d)
    return array.astype(array.dtype.newbyteorder("<")) if array.dtype.byteorder == ">" else array


def _dtype_name(name: str, dtype: np.dtype) -> str:
    if dtype not in _NAMES:
        raise WeightsError(f"entry {name!r}: safetensors has no dtype for {dtype.name}")
    return _NAMES[dtype]


def _safetensors_bytes(flat: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None
                       ) -> tuple[bytes, list[np.ndarray]]:
    """The header (length and JSON, padded to 8 bytes as the format asks) and the data."""
    header: dict[str, Any] = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise WeightsError(f"metadata must map strings to strings, got {dict(metadata)!r}")
        header["__metadata__"] = dict(metadata)
    offset, data = 0, []
    for name, array in flat.items():
        array = _little_endian(array)
        header[name] = {"dtype": _dtype_name(name, array.dtype), "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
        data.append(array)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text, data


def _write_safetensors(path: pathlib.Path, flat: Mapping[str, np.ndarray],
                       metadata: Mapping[str, str] | None, overwrite: bool) -> None:
    head, data = _safetensors_bytes(flat, metadata)

    def write(f):
        f.write(head)
        for array in data:
            f.write(array.reshape(-1).view(np.uint8).data)

    write_atomically(path, write, overwrite)


def _shards(flat: Mapping[str, np.ndarray], max_shard_bytes: int) -> list[dict]:
    """Consecutive entries grouped into shards of at most ``max_shard_bytes`` (an entry larger
    than that gets a shard of its own)."""
    shards: list[dict] = [{}]
    size = 0
    for name, array in flat.items():
        if shards[-1] and size + array.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = array
        size += array.nbytes
    return shards


def save_safetensors(path: str | os.PathLike, tree: Any, *,
                     metadata: Mapping[str, str] | None = None, overwrite: bool = False,
                     max_shard_bytes: int | None = None) -> list[pathlib.Path]:
    """Writes every leaf of ``tree`` (params, state, a PyTorch-style flat dict, ...) to the
    safetensors file ``path``, named by its ``/``-joined path; returns the files written.

    ``metadata`` (strings to strings) goes into the file's header. With ``max_shard_bytes``,
    a tree larger than that is split into ``STEM-00001-of-0000N.safetensors`` files beside
    ``path`` plus the index ``STEM.safetensors.index.json`` (Hugging Face's layout), and the
    index is the file to load. Nothing is replaced unless ``overwrite=True``.

    >>> import tempfile, pathlib, jax.numpy as jnp
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "params.safetensors"
    >>> _ = save_safetensors(path, {"dense": {"w": jnp.ones((2, 3), jnp.bfloat16)}})
    >>> {k: (v.dtype.name, v.shape) for k, v in read_safetensors(path).items()}
    {'dense/w': ('bfloat16', (2, 3))}
    """
    path = pathlib.Path(path)
    flat = flatten(tree)
    total = sum(a.nbytes for a in flat.values())
    if max_shard_bytes is None or total <= max_shard_bytes:
        _write_safetensors(path, flat, metadata, overwrite)
        return [path]
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    stem = path.name.removesuffix(".safetensors")
    shards = _shards(flat, max_shard_bytes)
    names = [f"{stem}-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    index_path = path.parent / f"{stem}.safetensors.index.json"
    for target in [index_path] + [path.parent / n for n in names]:
        if target.exists() and not overwrite:
            raise FileExistsError(f"{target} exists: pass overwrite=True to replace it")
    for name, shard in zip(names, shards):
        _write_safetensors(path.parent / name, shard, metadata, overwrite=True)
    if "total_size" in (metadata or {}):
        raise WeightsError("metadata: 'total_size' is the index's own entry (the bytes of all "
                           "shards)")
    index = {"metadata": dict(metadata or {}) | {"total_size": total},
             "weight_map": {entry: name for name, shard in zip(names, shards) for entry in shard}}
    write_atomically(index_path, lambda f: f.write(json.dumps(index, indent=2).encode()),
                      overwrite=True)
    return [index_path] + [path.parent / n for n in names]


# ----------------------------------------------------------------------------- reading


def _header(path: pathlib.Path, data: np.ndarray) -> tuple[dict, int]:
    if data.size < 8:
        raise WeightsError(f"{path}: not a safetensors file ({data.size} bytes)")
    length = int.from_bytes(data[:8].tobytes(), "little")
    if length > min(_MAX_HEADER, data.size - 8):
        raise WeightsError(f"{path}: not a safetensors file (a header of {length} bytes in a "
                           f"file of {data.size})")
    try:
        header = json.loads(data[8:8 + length].tobytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"{path}: not a safetensors file (its header is not JSON: {e})") \
            from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: not a safetensors file (its header is not a JSON object)")
    return header, 8 + length


def _entry(path: pathlib.Path, name: str, info: Any, data: np.ndarray, start: int) -> np.ndarray:
    try:
        dtype = _DTYPES[info["dtype"]]
        shape = tuple(int(n) for n in info["shape"])
        begin, end = (int(n) for n in info["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise WeightsError(f"{path}: entry {name!r} has a malformed description {info!r} (known "
                           f"dtypes: {', '.join(_DTYPES)})") from None
    size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if end - begin != size or begin < 0 or start + end > data.size:
        spec = describe(jax.ShapeDtypeStruct(shape, dtype))
        raise WeightsError(f"{path}: entry {name!r} ({spec}, {size} bytes) does not fit its "
                           f"data offsets [{begin}, {end}] in a file of {data.size} bytes "
                           f"(truncated?)")
    return data[start + begin:start + end].view(dtype).reshape(shape).copy()


def _read_one(path: pathlib.Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    data = np.fromfile(path, dtype=np.uint8)
    header, start = _header(path, data)
    metadata = header.pop("__metadata__", None) or {}
    return {name: _entry(path, name, info, data, start) for name, info in header.items()}, metadata


def _read_index(path: pathlib.Path) -> dict[str, np.ndarray]:
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise WeightsError(f"{path}: not a safetensors index (a JSON object with a "
                           f"'weight_map'): {e}") from None
    flat: dict[str, np.ndarray] = {}
    for name in files:
        shard_path = path.parent / name
        shard, _ = _read_one(shard_path)
        listed = {k for k, v in weight_map.items() if v == name}
        if set(shard) != listed:
            raise WeightsError(f"{shard_path}: its entries differ from those the index {path} "
                               f"lists for it: {_some(sorted(set(shard) ^ listed))}")
        flat |= shard
    return flat


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The entries of a safetensors file (or of the shards of a ``*.safetensors.index.json``)
    as ``{name: numpy array}``, with their dtypes (``bfloat16`` as ``ml_dtypes.bfloat16``)."""
    path = pathlib.Path(path)
    if path.name.endswith(".json"):
        return _read_index(path)
    return _read_one(path)[0]


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``__metadata__`` of a safetensors file's header (``{}`` if it has none), or the
    ``metadata`` of a ``*.safetensors.index.json``."""
    path = pathlib.Path(path)
    if path.name.endswith(".json"):
        try:
            return dict(json.loads(path.read_text()).get("metadata") or {})
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError, TypeError) as e:
            raise WeightsError(f"{path}: not a safetensors index: {e}") from None
    return _read_one(path)[1]


def load_safetensors(path: str | os.PathLike, like: Any = None) -> Any:
    """The tree saved by :func:`save_safetensors`: with ``like`` (the model's params or state, or
    their ``jax.eval_shape``), a tree of its structure after checking every entry's name,
    shape and dtype against it (:class:`WeightsError` naming the entry otherwise); without it,
    nested dicts of numpy arrays built from the ``/``-joined names."""
    flat = read_safetensors(path)
    return unflatten(flat) if like is None else fit_to(flat, like, source=str(path))


def save_npz(path: str | os.PathLike, tree: Any, *, overwrite: bool = False) -> pathlib.Path:
    """Writes every leaf of ``tree`` to the uncompressed numpy archive ``path``, named by its
    ``/``-joined path. Dtypes numpy's format cannot name (``bfloat16``, float8) are stored as
    their bits and restored by :func:`load_npz`. Nothing is replaced unless ``overwrite=True``."""
    path = pathlib.Path(path)
    flat = flatten(tree)
    if _NPZ_DTYPES in flat:
        raise WeightsError(f"the entry name {_NPZ_DTYPES!r} is reserved")
    arrays, extended = {}, {}
    for name, array in flat.items():
        array = _little_endian(array)
        if array.dtype.kind == "V":  # an ml_dtypes type: stored as its bits
            extended[name] = _dtype_name(name, array.dtype)
            array = array.view(np.dtype(f"u{array.dtype.itemsize}"))
        arrays[name] = array
    if extended:
        arrays[_NPZ_DTYPES] = np.array(json.dumps(extended))
    write_atomically(path, lambda f: _write_npz(f, arrays), overwrite)
    return path


def _write_npz(f, arrays: Mapping[str, np.ndarray]) -> None:
    """The archive ``np.savez`` writes (``NAME.npy`` entries, uncompressed), entry by entry:
    ``np.savez(f, **arrays)`` would take an entry named ``file`` or ``allow_pickle`` as its own
    argument."""
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, array in arrays.items():
            with archive.open(name + ".npy", "w", force_zip64=True) as entry:
                np.lib.format.write_array(entry, array, allow_pickle=False)


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The entries of an npz file as ``{name: array}``, extended dtypes restored."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as archive:
            flat = {name: archive[name] for name in archive.files}
    except (ValueError, OSError) as e:
        raise WeightsError(f"{path}: not an npz file: {e}") from None
    extended = json.loads(str(flat.pop(_NPZ_DTYPES))) if _NPZ_DTYPES in flat else {}
    for name, dtype in extended.items():
        flat[name] = flat[name].view(_DTYPES[dtype])
    return flat


def load_npz(path: str | os.PathLike, like: Any = None) -> Any:
    """The tree saved by :func:`save_npz`, checked against ``like`` as in
    :func:`load_safetensors`."""
    flat = read_npz(path)
    return unflatten(flat) if like is None else fit_to(flat, like, source=str(path))
