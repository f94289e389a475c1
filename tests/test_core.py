"""The contract's helpers: ``Seq`` and how it is shown, ``per_position``, ``Children`` (keys by
position, nesting, state), ``expect_params`` messages, ``seq_lengths`` and the public list."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnn
from fnn import core
from fnn.core import Children, Seq, expect_params, per_position, seq_lengths


def test_seq_is_a_pytree_and_describes_its_fields():
    seq = Seq(jnp.zeros((2, 5, 8)), lengths=jnp.array([5, 3]), memory=jnp.zeros((2, 4, 6)))
    leaves = jax.tree.leaves(seq)
    assert [leaf.shape for leaf in leaves] == [(2, 5, 8), (2,), (2, 4, 6)]  # None fields: none
    doubled = jax.tree.map(lambda a: a * 2, seq)
    assert isinstance(doubled, Seq) and doubled.positions is None
    assert core.describe(seq) == ("Seq(x=float32[2, 5, 8], lengths=int32[2], "
                                  "memory=float32[2, 4, 6])")
    assert core.array_of(seq) is seq.x and core.array_of(seq.x) is seq.x
    assert core.map_array(seq, lambda a: a[..., :2]).x.shape == (2, 5, 2)
    assert core.map_array(seq.x, lambda a: a[..., :2]).shape == (2, 5, 2)
    per_example = jax.vmap(lambda s: (s.x.shape, s.lengths))(seq)
    np.testing.assert_array_equal(per_example[1], [5, 3])


def test_per_position_passes_the_side_inputs_on(key):
    calls = []

    def init(key, x):
        calls.append(type(x))
        return {}, {}

    def apply(params, state, x, *, key=None, train=False):
        calls.append(type(x))
        return x + 1, state

    layer = per_position(fnn.Layer(init, apply, "PlusOne"))
    seq = Seq(jnp.zeros((2, 3)), lengths=jnp.array([3, 1]), positions=jnp.arange(3))
    layer.init(key, seq)
    y, _ = layer.apply({}, {}, seq)
    assert len(calls) == 2 and Seq not in calls  # the layer itself sees only the array
    assert isinstance(y, Seq) and y.lengths is seq.lengths and y.positions is seq.positions
    np.testing.assert_array_equal(y.x, np.ones((2, 3)))
    assert layer.apply({}, {}, jnp.zeros(2))[0].tolist() == [1.0, 1.0]
    assert repr(layer) == "Layer(PlusOne)"


def test_children_fold_keys_by_position_and_nest_params_and_state(key):
    parts = Children("Pair", first=fnn.Dense(3), drop=fnn.Dropout(0.5), norm=fnn.BatchNorm())
    child = parts.initializer(key)
    h = child("first", jax.ShapeDtypeStruct((4, 2), jnp.float32))
    assert h.shape == (4, 3)
    child("norm", child("drop", h))
    assert sorted(child.params) == ["first", "norm"] and sorted(child.state) == ["norm"]
    alone, _ = fnn.Dense(3).init(jax.random.fold_in(key, 0), jnp.zeros((4, 2)))
    jax.tree.map(np.testing.assert_array_equal, child.params["first"], alone)

    x = jnp.ones((4, 2))
    run = parts.runner(child.params, child.state, key, True)
    y = run("drop", run("first", x))
    mask = fnn.Dropout(0.5).apply({}, {}, jnp.ones((4, 3)), key=jax.random.fold_in(key, 1),
                                  train=True)[0]
    np.testing.assert_array_equal(y != 0, (mask != 0) & (run("first", x) != 0))
    run("norm", y)
    assert sorted(run.state) == ["norm"]  # the new BatchNorm statistics, nested by name
    with pytest.raises(TypeError, match=r"Pair: child 'bad' must be a Layer"):
        Children("Pair", bad=fnn.Dense)
    with pytest.raises(ValueError, match=r"child names may not contain '/'"):
        Children("Pair", **{"a/b": fnn.Relu()})
    with pytest.raises(TypeError, match="train must be a Python bool"):
        parts.runner({}, {}, None, 1)


def test_expect_params_names_missing_extra_and_misshapen_entries():
    w = jnp.zeros((3, 4))
    expected = {"w": ("in_features", 4), "b": (4,)}
    expect_params("Dense", {"w": w, "b": jnp.zeros(4)}, expected)  # fits
    with pytest.raises(fnn.ParamError, match=r"^Dense: expected params \{w: \[in_features, 4\], "
                                             r"b: \[4\]\}, got \{w: float32\[3, 4\]\}: missing "
                                             r"b$"):
        expect_params("Dense", {"w": w}, expected)
    with pytest.raises(fnn.ParamError, match=r": unexpected bias$"):
        expect_params("Dense", {"w": w, "b": jnp.zeros(4), "bias": jnp.zeros(4)}, expected)
    with pytest.raises(fnn.ParamError, match=r": b is float32\[5\], expected \[4\]$"):
        expect_params("Dense", {"w": w, "b": jnp.zeros(5)}, expected)
    nested = {"query": {"w": (2, "d")}}
    with pytest.raises(fnn.ParamError, match=r": query/w is float32\[3, 4, 1\], expected "
                                             r"\[2, d\]$"):
        expect_params("MHA", {"query": {"w": jnp.zeros((3, 4, 1))}}, nested)
    with pytest.raises(fnn.ParamError, match=r"expected state .*: state is a list, not a dict"):
        expect_params("BatchNorm", [], {"mean": (3,)}, "state")


def test_a_layers_param_errors_name_its_path(key):
    model = fnn.serial(fnn.Dense(4), encoder=fnn.serial(fnn.Dense(5), fnn.Dense(2)))
    params, state = model.init(key, jnp.zeros((2, 3)))
    params["encoder"]["1"] = {"w": jnp.zeros((2, 5)), "b": jnp.zeros(2)}  # transposed
    with pytest.raises(fnn.ParamError, match=r"^Dense at encoder/1: expected params "
                                             r"\{w: \[in_features, 2\], b: \[2\]\}, got .*: w is "
                                             r"float32\[2, 5\], expected \[in_features, 2\]$"):
        model.apply(params, state, jnp.zeros((2, 3)))


def test_seq_lengths_are_checked_against_the_batch_axes():
    x = jnp.zeros((2, 5, 3))
    assert seq_lengths("RNN", x) is None and seq_lengths("RNN", Seq(x)) is None
    np.testing.assert_array_equal(seq_lengths("RNN", Seq(x, lengths=jnp.array([5, 2]))), [5, 2])
    ids = Seq(jnp.zeros((2, 5), jnp.int32), lengths=jnp.array([5, 2]))
    assert seq_lengths("GPT", ids, time_axis=-1).shape == (2,)
    with pytest.raises(fnn.ShapeError, match=r"^RNN: expected lengths int\[2\] \(the batch axes "
                                             r"of x float32\[2, 5, 3\]\), got int32\[3\]$"):
        seq_lengths("RNN", Seq(x, lengths=jnp.array([5, 2, 1])))
    with pytest.raises(fnn.ShapeError, match=r"got float32\[2\]"):
        seq_lengths("RNN", Seq(x, lengths=jnp.array([5.0, 2.0])))
    np.testing.assert_array_equal(core.valid_positions(jnp.array([3, 0]), 4),
                                  [[True, True, True, False], [False] * 4])


def test_the_layer_authors_helpers_are_public():
    for name in ("Layer", "Seq", "Children", "shape_error", "check_rank", "check_floating",
                 "check_positive", "check_rate", "require_key", "expect_params",
                 "compute_dtype", "align", "per_position", "init_child", "apply_child",
                 "ParamError", "seq_lengths", "map_array"):
        assert name in core.__all__ and hasattr(core, name), name
    assert all(hasattr(core, name) for name in core.__all__)
    # one place for the drop-probability check and the statistics dtype
    with pytest.raises(ValueError, match=r"^Block: dropout is a drop probability and must be in "
                                         r"\[0, 1\), got 1.5$"):
        core.check_rate("Block", "dropout", 1.5)
    assert core.at_least_float32(jnp.bfloat16) == jnp.float32
    assert core.at_least_float32(jnp.float64) == jnp.float32  # float64 needs 64-bit mode
    with jax.enable_x64(True):
        assert core.at_least_float32(jnp.float64) == jnp.float64
