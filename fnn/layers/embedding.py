"""Embedding lookup and weight tying."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.nn import initializers

from fnn.core import (Children, Initializer, Layer, LayerError, ShapeError, check_positive,
                      compute_dtype, expect_params, map_array, per_position, shape_error, where)


def Embedding(num_embeddings: int, features: int, *,
              table_init: Initializer = initializers.normal(stddev=1.0),
              param_dtype: Any = jnp.float32, dtype: Any = None) -> Layer:
    """Looks up integer ids in a table. ``ids: int[...] -> [..., features]``; params
    ``{"table": [num_embeddings, features]}``, initialised from a standard normal.
    Position-wise: a ``Seq`` of ids passes through (its lengths, positions, ... kept).

    Ids outside ``[0, num_embeddings)``: given as values (eagerly, outside ``jit``) they raise
    :class:`~fnn.core.ShapeError` naming the first bad id; inside ``jit``, where ids are not
    known and nothing can be raised, their rows are zero (not a clamped or wrapped row of
    another id, and not NaN, which a causal attention would carry to every earlier position
    through its zero weights). fnn checks ids on the host wherever they come from it
    (``generate``'s prompt, ``language_model_task``, the CLI's data).

    To tie output weights to the table (logits ``h @ table.T``), see :func:`tied` and
    :func:`attend`.
    """
    check_positive("Embedding", num_embeddings=num_embeddings, features=features)
    expected = {"table": (num_embeddings, features)}

    def _check_ids(ids) -> None:
        ids = np.asarray(ids)
        bad = (ids < 0) | (ids >= num_embeddings)
        if bad.any():
            first = np.unravel_index(int(np.argmax(bad)), ids.shape)
            raise ShapeError(f"{where('Embedding')}: expected ids in [0, {num_embeddings}), got "
                             f"{int(ids[first])} at index {list(map(int, first))} "
                             f"({int(bad.sum())} of {ids.size} ids outside the table)")

    def init(key, x):
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise shape_error("Embedding", "integer ids int[...]", x)
        return {"table": table_init(key, (num_embeddings, features), param_dtype)}, {}

    def apply(params, state, x, *, key=None, train=False):
        expect_params("Embedding", params, expected)
        if not jnp.issubdtype(jnp.result_type(x), jnp.integer):
            raise shape_error("Embedding", "integer ids int[...]", x)
        if not isinstance(x, jax.core.Tracer):
            _check_ids(x)
        # the table's own dtype, not param_dtype: a precision policy hands in a cast table
        dt = dtype if dtype is not None else params["table"].dtype
        inside = (x >= 0) & (x < num_embeddings)  # a negative id would wrap around in jnp.take
        rows = jnp.take(params["table"], jnp.where(inside, x, 0), axis=0).astype(dt)
        return jnp.where(inside[..., None], rows, jnp.zeros((), dt)), state

    return per_position(Layer(init, apply, "Embedding"))


def attend(params: dict[str, jax.Array], h: jax.Array) -> jax.Array:
    """Logits against an embedding table: ``h: [..., features] -> [..., num_embeddings]``.

    ``params`` are an :func:`Embedding`'s params; this is the tied output projection.
    """
    table = params["table"]
    if h.shape[-1] != table.shape[1]:
        raise shape_error("attend", f"[..., {table.shape[1]}]", h)
    dt = compute_dtype(None, h, table.dtype)
    return jnp.matmul(h, table.astype(dt).T)


def tied(embedding: Layer, body: Layer) -> Layer:
    """``attend(embedding_params, body(embedding(ids)))``: a model whose output projection
    shares the embedding table. ``ids: int[...] -> logits [..., num_embeddings]``; params
    ``{"embedding": {"table": ...}, "body": ...}``. A ``Seq`` of ids gives a ``Seq`` of logits."""
    children = Children("tied", embedding=embedding, body=body)

    def init(key, ids):
        child = children.initializer(key)
        child("body", child("embedding", ids))
        if "table" not in child.params.get("embedding", {}):
            raise LayerError(f"{where('tied')}: the first layer must be an Embedding")
        return child.params, child.state

    def apply(params, state, ids, *, key=None, train=False):
        child = children.runner(params, state, key, train)
        h = child("body", child("embedding", ids))
        return map_array(h, lambda a: attend(params["embedding"], a)), child.state

    return Layer(init, apply, "tied")
