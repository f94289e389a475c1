"""Weight files (fnn.interop.weights): safetensors and npz of params/state trees, checked
against the format's specification (bytes built here), against the safetensors library where it
is installed, and against the model on load."""

from __future__ import annotations

import json
import struct

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import fnn
from fnn.interop import (WeightsError, load_npz, load_safetensors, read_npz, read_safetensors,
                         save_npz, save_safetensors)
from fnn.interop.weights import read_safetensors_metadata


@pytest.fixture
def model_params():
    model = fnn.serial(fnn.Conv(4, (3, 3)), fnn.BatchNorm(), fnn.Relu(), fnn.Flatten(-3),
                       head=fnn.Dense(3, param_dtype=jnp.bfloat16))
    return model, model.init(jax.random.key(0), jnp.zeros((2, 5, 5, 1)))


def _spec_file(path, entries: dict[str, tuple[str, list[int], bytes]], metadata=None):
    """A safetensors file written by hand from the specification: an 8-byte little-endian
    header length, the JSON header, the concatenated little-endian data."""
    header, data, offset = {}, b"", 0
    for name, (dtype, shape, raw) in entries.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        data += raw
    if metadata:
        header["__metadata__"] = metadata
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def test_a_file_built_from_the_specification_is_read(tmp_path):
    path = tmp_path / "spec.safetensors"
    _spec_file(path, {"a.weight": ("F32", [2, 2], struct.pack("<4f", 1, 2, 3, 4)),
                      "ids": ("I64", [3], struct.pack("<3q", -1, 0, 7)),
                      "half": ("BF16", [2], struct.pack("<2H", 0x3F80, 0xC000))},
               metadata={"format": "pt"})
    flat = read_safetensors(path)
    np.testing.assert_array_equal(flat["a.weight"], [[1, 2], [3, 4]])
    assert flat["ids"].dtype == np.int64 and flat["ids"].tolist() == [-1, 0, 7]
    assert flat["half"].dtype == ml_dtypes.bfloat16
    assert flat["half"].astype(np.float32).tolist() == [1.0, -2.0]
    assert read_safetensors_metadata(path) == {"format": "pt"}


def test_written_bytes_follow_the_specification(tmp_path):
    path = tmp_path / "w.safetensors"
    save_safetensors(path, {"x": np.array([1.5, -2.0], np.float32)}, metadata={"k": "v"})
    raw = path.read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    assert (8 + length) % 8 == 0  # the header is padded so that the data is aligned
    header = json.loads(raw[8:8 + length])
    assert header == {"__metadata__": {"k": "v"},
                      "x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    assert struct.unpack("<2f", raw[8 + length:]) == (1.5, -2.0)


@pytest.mark.parametrize("save,load", [(save_safetensors, load_safetensors),
                                       (save_npz, load_npz)])
def test_params_and_state_round_trip_with_their_dtypes(tmp_path, model_params, save, load):
    _, (params, state) = model_params
    tree = {"params": params, "state": state, "step": jnp.array(3, jnp.int32),
            "mask": jnp.array([True, False])}
    path = tmp_path / "w.bin"
    save(path, tree)
    back = load(path, like=tree)
    assert jax.tree.structure(back) == jax.tree.structure(tree)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(tree)):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert back["params"]["head"]["w"].dtype == jnp.bfloat16
    plain = load(path)  # without like: nested dicts of numpy arrays from the names
    assert sorted(plain) == ["mask", "params", "state", "step"]
    assert plain["params"]["head"]["w"].dtype == ml_dtypes.bfloat16


def test_like_may_be_shapes_only(tmp_path, model_params):
    model, (params, _) = model_params
    path = tmp_path / "p.safetensors"
    save_safetensors(path, params)
    like, _ = jax.eval_shape(model.init, jax.random.key(1), jnp.zeros((2, 5, 5, 1)))
    back = load_safetensors(path, like=like)
    np.testing.assert_array_equal(back["0"]["w"], params["0"]["w"])


def test_mismatches_against_the_model_are_named(tmp_path, model_params):
    _, (params, _) = model_params
    path = tmp_path / "p.safetensors"
    save_safetensors(path, params)
    wider = jax.tree.map(lambda a: a, params)
    wider["head"]["w"] = jnp.zeros((100, 4), jnp.bfloat16)
    with pytest.raises(WeightsError, match=r"p\.safetensors: entry 'head/w': expected "
                                           r"bfloat16\[100, 4\], got bfloat16\[100, 3\]"):
        load_safetensors(path, like=wider)
    recast = jax.tree.map(lambda a: a, params)
    recast["head"]["w"] = params["head"]["w"].astype(jnp.float32)
    with pytest.raises(WeightsError, match=r"'head/w': expected float32\[100, 3\], got "
                                           r"bfloat16\[100, 3\]"):
        load_safetensors(path, like=recast)
    other = {k: v for k, v in params.items() if k != "head"} | {"new": {"w": jnp.zeros(2)}}
    with pytest.raises(WeightsError, match=r"missing 'new/w'; not in the model 'head/b', "
                                           r"'head/w'"):
        load_safetensors(path, like=other)


def test_a_state_dict_saved_by_safetensors_loads(tmp_path):
    st = pytest.importorskip("safetensors.numpy", reason="safetensors is not installed "
                             "(pip install -e '.[interop]')")
    path = tmp_path / "theirs.safetensors"
    st.save_file({"fc.weight": np.arange(6, dtype=np.float32).reshape(2, 3),
                  "fc.bias": np.ones(2, np.float16)}, str(path))
    flat = read_safetensors(path)
    assert flat["fc.bias"].dtype == np.float16
    np.testing.assert_array_equal(flat["fc.weight"], np.arange(6).reshape(2, 3))
    # and the library reads ours, bfloat16 included (through torch, whose loader knows it)
    torch_st = pytest.importorskip("safetensors.torch", reason="torch is not installed")
    ours = tmp_path / "ours.safetensors"
    save_safetensors(ours, {"a": {"w": jnp.full((2, 2), 1.5, jnp.bfloat16)}})
    loaded = torch_st.load_file(str(ours))
    assert list(loaded) == ["a/w"] and str(loaded["a/w"].dtype) == "torch.bfloat16"
    assert loaded["a/w"].float().tolist() == [[1.5, 1.5], [1.5, 1.5]]


def test_sharded_files_round_trip_through_their_index(tmp_path, model_params):
    _, (params, _) = model_params
    written = save_safetensors(tmp_path / "model.safetensors", params, max_shard_bytes=200)
    index = tmp_path / "model.safetensors.index.json"
    assert written[0] == index and len(written) > 2
    assert written[1].name == f"model-00001-of-{len(written) - 1:05d}.safetensors"
    weight_map = json.loads(index.read_text())["weight_map"]
    assert set(weight_map) == {"0/w", "0/b", "1/scale", "1/b", "head/w", "head/b"}
    back = load_safetensors(index, like=params)
    np.testing.assert_array_equal(back["head"]["w"], params["head"]["w"])
    written[1].unlink()
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_safetensors(index, like=params)


def test_nothing_is_overwritten_and_a_failed_write_leaves_nothing(tmp_path):
    path = tmp_path / "w.safetensors"
    save_safetensors(path, {"a": np.zeros(2, np.float32)})
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="exists: pass overwrite=True"):
        save_safetensors(path, {"a": np.ones(2, np.float32)})
    with pytest.raises(FileExistsError, match="exists: pass overwrite=True"):
        save_npz(tmp_path / "w.safetensors", {"a": np.ones(2)})
    assert path.read_bytes() == before
    with pytest.raises(WeightsError, match="entry 'c': safetensors has no dtype for complex64"):
        save_safetensors(tmp_path / "new.safetensors", {"c": np.zeros(2, np.complex64)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]
    save_safetensors(path, {"a": np.ones(2, np.float32)}, overwrite=True)
    np.testing.assert_array_equal(read_safetensors(path)["a"], [1, 1])


@pytest.mark.parametrize("damage,message", [
    (lambda raw: raw[:5], "not a safetensors file"),
    (lambda raw: struct.pack("<Q", 10 ** 12) + raw[8:], "a header of 1000000000000 bytes"),
    (lambda raw: raw[:8] + b"x" + raw[9:], "its header is not JSON"),
    (lambda raw: raw[:-4], r"entry 'w' \(float32\[4\], 16 bytes\) does not fit .*truncated"),
])
def test_a_damaged_file_is_refused_clearly(tmp_path, damage, message):
    path = tmp_path / "w.safetensors"
    save_safetensors(path, {"w": np.arange(4, dtype=np.float32)})
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(WeightsError, match=message):
        read_safetensors(path)


def test_npz_errors(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(WeightsError, match="not an npz file"):
        read_npz(bad)
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_npz(tmp_path / "missing.npz")


def test_names_that_collide_are_refused(tmp_path):
    with pytest.raises(WeightsError, match="entry 'a/b/c' lies under 'a/b', which is an array"):
        load_safetensors(_saved(tmp_path, {"a/b/c": np.zeros(1), "a/b": np.zeros(1)}))
    with pytest.raises(WeightsError, match="entry 'a/b' is also the name of a group"):
        fnn.interop.unflatten({"a/b/c": np.zeros(1), "a/b": np.zeros(1)})
    with pytest.raises(WeightsError, match="two leaves of the tree are both named 'a/b'"):
        save_safetensors(tmp_path / "x.safetensors", {"a": {"b": np.zeros(1)}, "a/b": np.zeros(1)})


def _saved(tmp_path, flat):
    path = tmp_path / "flat.safetensors"
    save_safetensors(path, flat)
    return path


def test_npz_keeps_entries_named_like_numpys_arguments_and_big_endian_arrays(tmp_path):
    tree = {"file": np.arange(3, dtype=">f4"), "allow_pickle": np.ones(2, np.int16)}
    save_npz(tmp_path / "w.npz", tree)
    back = load_npz(tmp_path / "w.npz", like={"file": np.zeros(3, np.float32),
                                               "allow_pickle": np.zeros(2, np.int16)})
    np.testing.assert_array_equal(back["file"], [0, 1, 2])
    assert back["file"].dtype == np.float32 and back["allow_pickle"].tolist() == [1, 1]


def test_dtypes_neither_format_names_are_refused(tmp_path):
    odd = {"q": np.zeros(4, ml_dtypes.int4)}
    with pytest.raises(WeightsError, match="entry 'q': safetensors has no dtype for int4"):
        save_npz(tmp_path / "w.npz", odd)
    with pytest.raises(WeightsError, match="entry 'q': safetensors has no dtype for int4"):
        save_safetensors(tmp_path / "w.safetensors", odd)
    assert list(tmp_path.iterdir()) == []


def test_files_get_a_plain_files_permissions(tmp_path):
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    save_safetensors(tmp_path / "w.safetensors", {"a": np.zeros(1)})
    save_npz(tmp_path / "w.npz", {"a": np.zeros(1)})
    for name in ("w.safetensors", "w.npz"):
        assert (tmp_path / name).stat().st_mode == plain.stat().st_mode


def test_index_metadata(tmp_path):
    save_safetensors(tmp_path / "m.safetensors", {"a": np.zeros(4), "b": np.zeros(4)},
                     metadata={"format": "np"}, max_shard_bytes=32)
    meta = read_safetensors_metadata(tmp_path / "m.safetensors.index.json")
    assert meta == {"format": "np", "total_size": 64}
    with pytest.raises(WeightsError, match="'total_size' is the index's own entry"):
        save_safetensors(tmp_path / "n.safetensors", {"a": np.zeros(4), "b": np.zeros(4)},
                         metadata={"total_size": "x"}, max_shard_bytes=32)
