"""Embedding lookup, attend and tied against numpy; the table checked against the layer's
sizes; a ``Seq`` of ids passes through."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnn
from helpers import f32, f64, init_apply, rand, run

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ids", [np.array(3), np.array([0, 9, 3, 3]),
                                 np.array([[1, 2, 3], [9, 0, 4]])], ids=["0d", "1d", "2d"])
def test_embedding_lookup(ids):
    table = rand((10, 4), 1)
    ids_j = jnp.asarray(ids, jnp.int32)
    y, _, _ = init_apply(fnn.Embedding(10, 4), ids_j, {"table": table})
    assert y.shape == ids.shape + (4,) and y.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(y), table[ids])


@pytest.mark.parametrize("shape", [(4,), (2, 4), (2, 3, 4)])
def test_attend(shape):
    table = rand((7, 4), 1)
    h = f32(rand(shape, 2))
    logits = fnn.attend({"table": f32(table)}, h)
    assert logits.shape == shape[:-1] + (7,)
    np.testing.assert_allclose(f64(logits), f64(h) @ f64(table).T, **TOL)


TIED = fnn.tied(fnn.Embedding(7, 4), fnn.Dense(4))


def _tied_params():
    table, w, b = rand((7, 4), 1), rand((4, 4), 2), rand((4,), 3)
    return {"embedding": {"table": f32(table)}, "body": {"w": f32(w), "b": f32(b)}}


def _tied_ref(params, ids):
    table, w, b = (f64(params["embedding"]["table"]), f64(params["body"]["w"]),
                   f64(params["body"]["b"]))
    return (table[np.asarray(ids)] @ w + b) @ table.T


def test_tied():
    ids = jnp.asarray([[0, 6, 2], [3, 3, 1]], jnp.int32)
    spec, state = jax.eval_shape(TIED.init, jax.random.key(0), ids)
    assert jax.tree.map(lambda a: a.shape, spec) == {
        "embedding": {"table": (7, 4)}, "body": {"w": (4, 4), "b": (4,)}}
    params = _tied_params()
    logits, _ = run(TIED, params, ids, state)
    np.testing.assert_allclose(f64(logits), _tied_ref(params, ids), **TOL)


def test_tied_needs_an_embedding_first():
    model = fnn.tied(fnn.Dense(4), fnn.Dense(4))
    with pytest.raises(fnn.LayerError, match=re.escape(
            "tied: the first layer must be an Embedding")):
        model.init(jax.random.key(0), jnp.zeros((2, 4), jnp.float32))


# ============================================================================= a Seq of ids

EMBEDDING = fnn.Embedding(10, 4)


def test_embedding_passes_a_seq_through():
    """Ids int[B, T] in a Seq with lengths int[B]: the vectors as in the plain lookup, the side
    inputs unchanged."""
    ids = jnp.asarray([[1, 2, 3, 0], [9, 0, 4, 4]], jnp.int32)
    seq = fnn.Seq(ids, lengths=jnp.array([4, 2], jnp.int32),
                  positions=jnp.array([[0, 1, 2, 3], [5, 6, 7, 8]], jnp.int32))
    spec, _ = jax.eval_shape(EMBEDDING.init, jax.random.key(0), seq)
    assert spec["table"].shape == (10, 4)
    table = rand((10, 4), 1)
    y, _ = run(EMBEDDING, {"table": f32(table)}, seq)
    plain, _ = run(EMBEDDING, {"table": f32(table)}, ids)
    assert isinstance(y, fnn.Seq)
    for name in ("lengths", "positions"):
        np.testing.assert_array_equal(np.asarray(getattr(y, name)),
                                      np.asarray(getattr(seq, name)), err_msg=name)
        assert getattr(y, name).dtype == jnp.int32
    assert y.mask is None and y.memory is None
    np.testing.assert_array_equal(np.asarray(y.x), np.asarray(plain))
    np.testing.assert_array_equal(np.asarray(y.x), table[np.asarray(ids)])


def test_tied_seq_of_ids_gives_a_seq_of_logits():
    ids = jnp.asarray([[0, 6, 2], [3, 3, 1]], jnp.int32)
    seq = fnn.Seq(ids, lengths=jnp.array([3, 1], jnp.int32))
    params = _tied_params()
    y, _ = run(TIED, params, seq)
    assert isinstance(y, fnn.Seq)
    np.testing.assert_array_equal(np.asarray(y.lengths), [3, 1])
    assert y.x.shape == (2, 3, 7)
    np.testing.assert_allclose(f64(y.x), _tied_ref(params, ids), **TOL)


# ============================================================================= the table checked

def _message(text):
    return f"^{re.escape(text)}$"


@pytest.mark.parametrize("shapes,detail", [
    ({"table": (10, 5)}, "table is float32[10, 5], expected [10, 4]"),
    ({"table": (11, 4)}, "table is float32[11, 4], expected [10, 4]"),
    ({"table": (4, 10)}, "table is float32[4, 10], expected [10, 4]"),
    ({"w": (10, 4)}, "missing table; unexpected w"),
    ({"table": (10, 4), "b": (4,)}, "unexpected b"),
], ids=["features", "num_embeddings", "transposed", "renamed", "extra"])
def test_embedding_table_checked(shapes, detail):
    params = {k: jnp.zeros(s, jnp.float32) for k, s in shapes.items()}
    got = "{" + ", ".join(f"{k}: float32[{', '.join(map(str, s))}]"
                          for k, s in shapes.items()) + "}"
    with pytest.raises(fnn.ParamError, match=_message(
            f"Embedding: expected params {{table: [10, 4]}}, got {got}: {detail}")):
        EMBEDDING.apply(params, {}, jnp.zeros((2, 3), jnp.int32))


def test_embedding_table_checked_inside_tied():
    params = _tied_params()
    params["embedding"]["table"] = jnp.zeros((7, 5), jnp.float32)
    with pytest.raises(fnn.ParamError, match=_message(
            "Embedding at embedding: expected params {table: [7, 4]}, got "
            "{table: float32[7, 5]}: table is float32[7, 5], expected [7, 4]")):
        TIED.apply(params, {}, jnp.zeros((2, 3), jnp.int32))


def test_embedding_refuses_float_ids():
    with pytest.raises(fnn.ShapeError, match=_message(
            "Embedding: expected input integer ids int[...], got float32[2, 3]")):
        EMBEDDING.apply({"table": jnp.zeros((10, 4))}, {}, jnp.zeros((2, 3), jnp.float32))


def test_ids_outside_the_table_are_an_error_eagerly_and_zero_rows_under_jit():
    layer = fnn.Embedding(5, 2)
    params, state = layer.init(jax.random.key(0), jnp.zeros((1, 3), jnp.int32))
    with pytest.raises(fnn.ShapeError, match=r"^Embedding: expected ids in \[0, 5\), got 7 at "
                                             r"index \[0, 1\] \(2 of 3 ids outside the table\)$"):
        layer.apply(params, state, jnp.array([[1, 7, -1]]))
    y, _ = jax.jit(layer.apply)(params, state, jnp.array([[1, 7, -1]]))  # ids unknown there
    np.testing.assert_array_equal(y[0, 0], params["table"][1])
    np.testing.assert_array_equal(y[0, 1:], np.zeros((2, 2)))  # not a wrapped row (-1 -> 4)
