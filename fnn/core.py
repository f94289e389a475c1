"""The layer contract, written once.

A layer is a pair of pure functions built by a factory (``Dense(128)``, ``Conv(32, (3, 3))``)::

    params, state = layer.init(key, x)
    y, state = layer.apply(params, state, x, *, key=None, train=False)

- ``x`` given to ``init`` may be an array or a ``jax.ShapeDtypeStruct``: only its shape and dtype
  are read, so ``Dense(10)`` needs no input size.
- ``params`` and ``state`` are plain nested dicts with short readable keys; a layer with none
  returns ``{}``. Gradients are taken with respect to ``params`` only.
- ``key`` is keyword-only and needed only by stochastic layers when ``train=True``.
- ``train`` is a Python bool, static under ``jit``.

Combinators (``fnn.combinators``) nest their children's dicts under stable names and call them
through :func:`init_child` and :func:`apply_child`, which keep track of the child's path in the
model. Errors on bad input are raised while tracing (free under ``jit``) and name that path.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import Any, Iterator, NamedTuple, Protocol

import jax
import jax.numpy as jnp

Params = dict[str, Any]  # nested dict of arrays, the trainable parameters
State = dict[str, Any]  # nested dict of arrays that are not trained (e.g. running statistics)
Spec = Any  # an array, a jax.ShapeDtypeStruct, or a pytree of them


class InitFn(Protocol):
    def __call__(self, key: jax.Array, x: Spec, /) -> tuple[Params, State]:
        """Creates the parameters and state for inputs shaped like ``x``."""


class ApplyFn(Protocol):
    def __call__(
        self, params: Params, state: State, x: Any, /, *, key: jax.Array | None = None,
        train: bool = False,
    ) -> tuple[Any, State]:
        """Computes the output and the updated state."""


class Layer(NamedTuple):
    """A layer: ``init`` and ``apply`` pure functions, and the name shown in errors and summaries."""

    init: InitFn
    apply: ApplyFn
    name: str = "Layer"


# ----------------------------------------------------------------------------- errors

class LayerError(ValueError):
    """Bad input to a layer; the message names the layer's path in the model."""


class ShapeError(LayerError):
    """An input whose shape, rank or dtype the layer cannot take."""


class MissingKeyError(LayerError):
    """A stochastic layer was called with ``train=True`` but no random key."""


# The path of the layer being initialised or applied, e.g. ("encoder", "2"). It is read only to
# word error messages and summaries while tracing; it never changes what a layer computes.
_PATH: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("fnn_path", default=())
# When set (by `summary`), every child call appends a row: (path, layer name, output, params).
_RECORD: contextvars.ContextVar[list | None] = contextvars.ContextVar("fnn_record", default=None)


@contextlib.contextmanager
def _scope(name: str) -> Iterator[None]:
    token = _PATH.set(_PATH.get() + (name,))
    try:
        yield
    finally:
        _PATH.reset(token)


def where(layer_name: str) -> str:
    """``"Dense at encoder/2"``: the layer's name and, when nested, its path in the model."""
    path = "/".join(_PATH.get())
    return f"{layer_name} at {path}" if path else layer_name


def describe(x: Any) -> str:
    """``"float32[32, 63]"``: how an input is shown in error messages."""
    shape = getattr(x, "shape", None)
    dtype = getattr(x, "dtype", None)
    if shape is None or dtype is None:
        return type(x).__name__
    return f"{jnp.dtype(dtype).name}[{', '.join(map(str, shape))}]"


def shape_error(layer_name: str, expected: str, x: Any) -> ShapeError:
    """The error for input ``x`` that does not match ``expected`` (e.g. ``"[..., 64]"``)."""
    return ShapeError(f"{where(layer_name)}: expected input {expected}, got {describe(x)}")


def check_rank(layer_name: str, x: Any, min_rank: int, expected: str) -> None:
    if not hasattr(x, "ndim") or x.ndim < min_rank:
        raise shape_error(layer_name, expected, x)


def check_floating(layer_name: str, x: Any, expected: str) -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ShapeError(f"{where(layer_name)}: expected a floating-point input {expected}, got "
                         f"{describe(x)}")


def check_positive(layer_name: str, **values: Any) -> None:
    """Rejects non-positive hyper-parameters at construction, e.g. ``Dense(0)``."""
    for arg, value in values.items():
        items = value if isinstance(value, tuple) else (value,)
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in items):
            raise ValueError(f"{layer_name}: {arg} must be a positive integer"
                             f"{' or a tuple of them' if isinstance(value, tuple) else ''}, "
                             f"got {value!r}")


def require_key(layer_name: str, key: jax.Array | None) -> jax.Array:
    """Returns ``key``, or explains how to pass one to a stochastic layer in training."""
    if key is None:
        raise MissingKeyError(
            f"{where(layer_name)} is stochastic and needs a random key when train=True; call "
            f"apply(params, state, x, key=jax.random.key(0), train=True)")
    return key


def check_train(train: Any) -> None:
    """``train`` must be a Python bool: it selects code paths while tracing."""
    if not isinstance(train, bool):
        raise TypeError(f"{where('apply')}: train must be a Python bool (it is static under jit), "
                        f"got {type(train).__name__}")


# ----------------------------------------------------------------------------- specs and dtypes

def as_spec(x: Spec) -> Any:
    """Turns arrays (or tracers) in a pytree into ``jax.ShapeDtypeStruct``s."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), x)


def output_spec(layer: Layer, params: Params, state: State, x: Spec) -> Any:
    """The output spec of ``layer.apply`` on ``x``, found with ``jax.eval_shape`` (no FLOPs)."""
    apply = functools.partial(layer.apply, train=False)
    y, _ = jax.eval_shape(apply, as_spec(params), as_spec(state), as_spec(x))
    return y


def compute_dtype(dtype: Any, x: Any, param_dtype: Any) -> Any:
    """The dtype a layer computes in: ``dtype`` if given, else the input's floating dtype.

    Integer inputs compute in ``param_dtype``. Parameters are cast to this dtype, so bfloat16
    inputs run in bfloat16 with float32 parameters under strict dtype promotion.
    """
    if dtype is not None:
        return jnp.dtype(dtype)
    if jnp.issubdtype(x.dtype, jnp.floating):
        return x.dtype
    return jnp.dtype(param_dtype)


def align(v: jax.Array, ndim: int) -> jax.Array:
    """``v`` with leading size-1 axes up to rank ``ndim``: explicit broadcasting, so layers run
    under ``jax_numpy_rank_promotion="raise"``."""
    return v.reshape((1,) * (ndim - v.ndim) + v.shape)


# ----------------------------------------------------------------------------- children

def init_child(name: str, child: Layer, key: jax.Array, x: Spec) -> tuple[Params, State, Any]:
    """Initialises ``child`` under ``name``; returns its params, state and output spec."""
    with _scope(name):
        params, state = child.init(key, x)
        y = output_spec(child, params, state, x)
    return params, state, y


def apply_child(
    name: str, child: Layer, params: Params, state: State, x: Any, *, key: jax.Array | None,
    train: bool,
) -> tuple[Any, State]:
    """Applies ``child`` with the entries ``params[name]``/``state[name]`` (``{}`` if absent)."""
    child_params = params.get(name, {})
    with _scope(name):
        record = _RECORD.get()
        row = len(record) if record is not None else None
        if record is not None:
            record.append(None)  # reserve the row so that rows are listed parent before child
        y, new_state = child.apply(child_params, state.get(name, {}), x, key=key, train=train)
        if record is not None:
            record[row] = ("/".join(_PATH.get()), child.name, y, child_params)
    return y, new_state


def put(tree: dict[str, Any], name: str, value: dict[str, Any]) -> None:
    """Adds a child's params or state under ``name`` unless empty: parameter-free layers add no
    clutter to the tree."""
    if value:
        tree[name] = value


def child_key(key: jax.Array | None, index: int) -> jax.Array | None:
    """The key for a combinator's ``index``-th child (``None`` stays ``None``)."""
    return None if key is None else jax.random.fold_in(key, index)


# ----------------------------------------------------------------------------- inspection

def param_count(params: Params) -> int:
    """Total number of scalars in a parameter tree."""
    return sum(math.prod(jnp.shape(p)) for p in jax.tree.leaves(params))


def param_bytes(params: Params) -> int:
    """Total storage of a parameter tree in bytes."""
    return sum(math.prod(jnp.shape(p)) * jnp.dtype(jnp.result_type(p)).itemsize
               for p in jax.tree.leaves(params))


def _shape_str(y: Any) -> str:
    leaves = jax.tree.leaves(y)
    return ", ".join(describe(leaf) for leaf in leaves)


def summary(model: Layer, x: Spec, *, train: bool = False) -> str:
    """A table of every layer: its path, name, output shape, parameter count and bytes.

    Only shapes are computed (``jax.eval_shape``): a summary of a large model costs no FLOPs.
    ``x`` may be an array or a ``jax.ShapeDtypeStruct``.
    """
    spec = as_spec(x)
    params, state = jax.eval_shape(model.init, jax.random.key(0), spec)
    apply = functools.partial(model.apply, key=jax.random.key(0) if train else None,
                              train=train)
    with record_layers() as rows:
        y, _ = jax.eval_shape(apply, params, state, spec)
    table = [("path", "layer", "output", "params", "bytes")]
    table.append(("", model.name, _shape_str(y), f"{param_count(params):,}",
                  f"{param_bytes(params):,}"))
    for path, name, out, child_params in rows:
        table.append((path, name, _shape_str(out),
                      f"{param_count(child_params):,}", f"{param_bytes(child_params):,}"))
    widths = [max(len(row[i]) for row in table) for i in range(5)]
    lines = []
    for i, row in enumerate(table):
        cells = [row[c].ljust(widths[c]) if c < 3 else row[c].rjust(widths[c]) for c in range(5)]
        lines.append("  ".join(cells).rstrip())
        if i == 0:
            lines.append("-" * len(lines[0]))
    lines.append("-" * len(lines[0]))
    lines.append(f"total: {param_count(params):,} parameters, {param_bytes(params):,} bytes; "
                 f"state: {param_count(state):,} values")
    return "\n".join(lines)


@contextlib.contextmanager
def record_layers() -> Iterator[list[tuple[str, str, Any, Params]]]:
    """Collects a row ``(path, layer name, output, params)`` for every child layer applied
    inside the block, listed parent before child (the order in which the calls start)::

        with record_layers() as rows:
            y, _ = model.apply(params, state, x)
        # rows: [("encoder", "serial", ...), ("encoder/0", "Dense", ...), ...]

    The model itself (the outermost call) has no row. Outputs of layers applied inside a traced
    computation (the body of a ``lax.scan``, a ``jax.checkpoint``, a ``jit``) are tracers of that
    computation: only their shape and dtype may be read after it.
    """
    rows: list = []
    token = _RECORD.set(rows)
    try:
        yield rows
    finally:
        _RECORD.reset(token)
