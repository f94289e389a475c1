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

Side inputs: one convention
---------------------------
Masks, lengths, positions and the memory of cross-attention travel *with* the sequence, as one
:class:`Seq` value in place of ``x``: ``model.apply(params, state, Seq(x, lengths=lengths))``.
Every sequence layer reads the fields it uses and returns the ``Seq`` with its array replaced;
position-wise layers (``Dense``, activations, ``Dropout``, ``LayerNorm``, ``Embedding``, ...)
apply to the array and pass the side inputs on; layers that consume the time axis
(``GlobalAvgPool(-2)``) return a plain array, pooled over the valid positions only; layers that
cannot respect the side inputs (convolutions, ``Flatten``) refuse a ``Seq``. Why a value and not
keyword arguments: the contract keeps one signature, so every combinator, ``repeat``'s scan,
``jax.vmap``, ``eval_shape``, precision policies, the train step and data parallel pass side
inputs on for free (a ``Seq`` is a pytree), and a layer written against the contract needs no
extra arguments to sit between sequence layers. ``repeat`` carries the array from copy to copy
and gives every copy the same side inputs. Losses and metrics given a ``Seq`` of outputs with
``lengths`` average over the valid positions only.

Vocabulary (one name per concept, used by every factory)
--------------------------------------------------------
- ``features``: a layer's output width (``Dense``, ``Conv``, ``Embedding``, recurrent cells) and a
  transformer's model width; ``in_features`` the input's last axis.
- ``hidden_features``: the inner width(s) of a feed-forward block or an MLP.
- ``out_features``: an output width that defaults to the input's (``MultiHeadAttention``,
  ``FeedForward``) or of a general model (``MLP``); ``num_classes``: a classifier's logits.
- ``num_heads``, ``num_kv_heads``, ``head_dim``; ``num_layers``; ``max_length``; ``vocab_size``.
- Params: ``"w"`` a weight (matrix or kernel), ``"b"`` an additive bias, ``"scale"`` a
  per-feature factor (norms), ``"table"`` an embedding table; state ``"mean"``/``"var"``
  (running statistics), ``"cache"`` (attention keys and values for decoding).
- ``rate``/``dropout``: a drop probability in ``[0, 1)``; ``epsilon``: a norm's stabiliser;
  ``use_bias``, ``use_scale``; ``param_dtype`` (storage) and ``dtype`` (compute);
  ``w_init``/``b_init``/``table_init``: ``jax.nn.initializers`` functions.
- Activations by name (``fnn.layers.ACTIVATIONS``): ``"gelu"`` is the exact (erf) GELU and
  ``"gelu_tanh"`` its tanh approximation (GPT-2, ``jax.nn.gelu``'s default).

Writing a layer
---------------
The helpers a layer author needs are below and listed in ``__all__``: :func:`shape_error`,
:func:`check_rank`, :func:`check_floating`, :func:`check_positive`, :func:`check_rate`,
:func:`require_key`, :func:`compute_dtype`, :func:`align`, :func:`per_position` (pass a
``Seq`` through), :func:`parameter_free` (a layer that is a function of its input),
:func:`init_child`/:func:`apply_child` and :class:`Children` (a layer built from named
children). Errors on bad input are raised while tracing (free under ``jit``) and
name the layer's path in the model (``Dense at encoder/2``), kept by the child helpers.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Protocol

import jax
import jax.numpy as jnp

__all__ = [
    "Params", "State", "Spec", "Initializer", "Layer", "Seq", "LayerError", "ShapeError",
    "MissingKeyError", "ParamError", "UnboundAxisError", "where", "describe", "shape_error",
    "check_rank", "check_floating", "expect_params", "check_positive", "check_rate", "require_key",
    "check_train", "as_spec", "output_spec", "compute_dtype", "at_least_float32", "align",
    "array_of", "map_array", "seq_lengths", "valid_positions", "per_position", "parameter_free",
    "init_child",
    "apply_child", "put", "child_key", "Children", "check_children",
]

Params = dict[str, Any]  # nested dict of arrays, the trainable parameters
State = dict[str, Any]  # nested dict of arrays that are not trained (e.g. running statistics)
Spec = Any  # an array, a jax.ShapeDtypeStruct, or a pytree of them
Initializer = jax.nn.initializers.Initializer


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
    """A layer: ``init`` and ``apply`` pure functions, and the name shown in errors and
    summaries."""

    init: InitFn
    apply: ApplyFn
    name: str = "Layer"

    def __repr__(self) -> str:
        return f"Layer({self.name})"


class Seq(NamedTuple):
    """A sequence and its side inputs, given to a layer in place of the bare array (see the
    module docstring). Every field but ``x`` is optional; batch axes ``[...]`` are ``x``'s.

    - ``x``: ``[..., time, features]`` (or token ids ``int[..., time]``).
    - ``lengths``: ``int[...]``: positions at or past a sequence's length are right padding.
      Recurrent layers stop there, attention ignores padded keys and zeroes padded rows, global
      pooling and BatchNorm leave them out, losses do not count them.
    - ``positions``: ``int``, broadcastable to ``[..., time]``: the position of each step (for
      position embeddings and RoPE); ``0, 1, ...`` when absent.
    - ``mask``: ``bool``, broadcastable to ``[..., heads, time, time]``: which keys each query
      of self-attention may attend to (``True`` = may attend; in decode mode the last axis is
      the cache's ``max_length``).
    - ``bias``: float, broadcastable to ``[..., heads, time, time]``: added to self-attention's
      logits (relative position biases).
    - ``memory``: ``[..., memory_time, memory_features]``, what cross-attention attends to;
      ``memory_lengths`` (``int[...]``) and ``memory_mask`` (``bool``, broadcastable to
      ``[..., heads, time, memory_time]``) as ``lengths`` and ``mask`` for it.

    >>> import jax.numpy as jnp
    >>> seq = Seq(jnp.zeros((2, 5, 8)), lengths=jnp.array([5, 3]))
    >>> describe(seq)
    'Seq(x=float32[2, 5, 8], lengths=int32[2])'
    >>> describe(seq.with_x(jnp.zeros((2, 5, 4))))
    'Seq(x=float32[2, 5, 4], lengths=int32[2])'
    """

    x: Any
    lengths: Any = None
    positions: Any = None
    mask: Any = None
    bias: Any = None
    memory: Any = None
    memory_lengths: Any = None
    memory_mask: Any = None

    def with_x(self, x: Any) -> Seq:
        """The same side inputs with the array replaced."""
        return self._replace(x=x)


def array_of(x: Any) -> Any:
    """The array of ``x``: ``x.x`` for a :class:`Seq`, else ``x`` itself."""
    return x.x if isinstance(x, Seq) else x


def map_array(x: Any, fn: Callable[[Any], Any]) -> Any:
    """``fn`` applied to the array of ``x``; for a :class:`Seq`, the result in its place."""
    return x.with_x(fn(x.x)) if isinstance(x, Seq) else fn(x)


def seq_lengths(layer_name: str, seq: Any, time_axis: int = -2) -> jax.Array | None:
    """The ``lengths`` of a :class:`Seq` (``None`` for a plain array or no lengths), checked:
    ``int`` with exactly the batch axes of ``seq.x``, the axes before ``time_axis`` (``-2`` for
    ``[..., time, features]``, ``-1`` for token ids ``int[..., time]``)."""
    if not isinstance(seq, Seq) or seq.lengths is None:
        return None
    lengths, x = seq.lengths, seq.x
    batch = tuple(x.shape[:x.ndim + time_axis]) if hasattr(x, "shape") else None
    if (batch is None or not hasattr(lengths, "shape") or tuple(lengths.shape) != batch
            or not jnp.issubdtype(lengths.dtype, jnp.integer)):
        raise ShapeError(f"{where(layer_name)}: expected lengths "
                         f"int[{', '.join(map(str, batch or ()))}] (the batch axes of x "
                         f"{describe(x)}), got {describe(lengths)}")
    if isinstance(lengths, jax.ShapeDtypeStruct):  # at init: only its shape is checked
        return lengths
    return jnp.asarray(lengths).astype(jnp.int32)


def valid_positions(lengths: jax.Array, time: int) -> jax.Array:
    """``bool[..., time]``: which of ``time`` positions lie before ``lengths: int[...]``."""
    return align(jnp.arange(time, dtype=jnp.int32), lengths.ndim + 1) < lengths[..., None]


# ----------------------------------------------------------------------------- errors

class LayerError(ValueError):
    """Bad input to a layer; the message names the layer's path in the model."""


class ShapeError(LayerError):
    """An input whose shape, rank or dtype the layer cannot take."""


class MissingKeyError(LayerError):
    """A stochastic layer was called with ``train=True`` but no random key."""


class UnboundAxisError(LayerError):
    """A layer averages over a mapped axis (``axis_name``) that is not bound: it was called
    outside the ``jax.pmap``/``shard_map`` it was written for."""


class ParamError(LayerError):
    """Params (or state) that do not fit the layer: a missing or extra entry, or a shape its
    hyper-parameters do not allow."""


# The path of the layer being initialised or applied, e.g. ("encoder", "2"). It is read only to
# word error messages and summaries while tracing; it never changes what a layer computes.
_PATH: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("fnn_path", default=())


@contextlib.contextmanager
def _scope(name: str) -> Iterator[None]:
    token = _PATH.set(_PATH.get() + (name,))
    try:
        yield
    finally:
        _PATH.reset(token)


def current_path() -> str:
    """The path of the layer being traced, ``"encoder/2"`` (``""`` at the top)."""
    return "/".join(_PATH.get())


def where(layer_name: str) -> str:
    """``"Dense at encoder/2"``: the layer's name and, when nested, its path in the model."""
    path = current_path()
    return f"{layer_name} at {path}" if path else layer_name


def describe(x: Any) -> str:
    """``"float32[32, 63]"``: how an input is shown in error messages (a :class:`Seq` with its
    fields)."""
    if isinstance(x, Seq):
        fields = [f"{name}={describe(value)}" for name, value in zip(x._fields, x)
                  if value is not None]
        return f"Seq({', '.join(fields)})"
    shape = getattr(x, "shape", None)
    dtype = getattr(x, "dtype", None)
    if shape is None or dtype is None:
        return type(x).__name__
    return f"{jnp.dtype(dtype).name}[{', '.join(map(str, shape))}]"


def shape_error(layer_name: str, expected: str, x: Any) -> ShapeError:
    """The error for input ``x`` that does not match ``expected`` (e.g. ``"[..., 64]"``)."""
    return ShapeError(f"{where(layer_name)}: expected input {expected}, got {describe(x)}")


def check_rank(layer_name: str, x: Any, min_rank: int, expected: str) -> None:
    """Rejects anything but an array (or spec) of rank ``min_rank`` or more."""
    if isinstance(x, Seq) or not hasattr(x, "ndim") or x.ndim < min_rank:
        raise shape_error(layer_name, expected, x)


Shape = tuple[int | str, ...]  # an expected shape: sizes, or names of sizes that may be anything


def _shape_text(shape: Shape) -> str:
    return f"[{', '.join(map(str, shape))}]"


def _tree_text(tree: Any, leaf_text: Callable[[Any], str]) -> str:
    if isinstance(tree, Mapping):
        return "{" + ", ".join(f"{k}: {_tree_text(v, leaf_text)}" for k, v in tree.items()) + "}"
    return leaf_text(tree)


def _fits(leaf: Any, shape: Shape) -> bool:
    leaf_shape = getattr(leaf, "shape", None)
    return (leaf_shape is not None and len(leaf_shape) == len(shape)
            and all(isinstance(e, str) or e == d for e, d in zip(shape, leaf_shape)))


def expect_params(layer_name: str, params: Any, expected: Mapping[str, Any],
                 what: str = "params") -> None:
    """Checks that ``params`` has exactly the entries of ``expected`` (nested the same way),
    each leaf of the expected shape: ``{"w": ("in_features", 5), "b": (5,)}``, where a string
    names a size that may be anything. Raises :class:`ParamError` naming the layer's path,
    what was expected and what was given."""
    def fail(detail: str) -> ParamError:
        return ParamError(f"{where(layer_name)}: expected {what} "
                          f"{_tree_text(expected, _shape_text)}, got "
                          f"{_tree_text(params, describe)}: {detail}")

    def check(given: Any, wanted: Mapping[str, Any], prefix: str) -> None:
        if not isinstance(given, Mapping):
            raise fail(f"{prefix or what} is a {type(given).__name__}, not a dict")
        missing = [k for k in wanted if k not in given]
        extra = [k for k in given if k not in wanted]
        if missing or extra:
            parts = ([f"missing {', '.join(prefix + k for k in missing)}"] if missing else []) + (
                [f"unexpected {', '.join(prefix + k for k in extra)}"] if extra else [])
            raise fail("; ".join(parts))
        for k, shape in wanted.items():
            if isinstance(shape, Mapping):
                check(given[k], shape, f"{prefix}{k}/")
            elif not _fits(given[k], shape):
                raise fail(f"{prefix}{k} is {describe(given[k])}, expected {_shape_text(shape)}")

    check(params, expected, "")


def check_floating(layer_name: str, x: Any, expected: str) -> None:
    """Rejects an input whose dtype is not floating (integer ids given to a Dense, say)."""
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


def check_rate(layer_name: str, arg: str, rate: Any) -> None:
    """Rejects a drop probability outside ``[0, 1)``."""
    if not isinstance(rate, (int, float)) or isinstance(rate, bool) or not 0.0 <= rate < 1.0:
        raise ValueError(f"{layer_name}: {arg} is a drop probability and must be in [0, 1), "
                         f"got {rate!r}")


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
    inputs run in bfloat16 with float32 parameters under strict dtype promotion. A float64
    input (a NumPy array, say) computes in float32 unless 64-bit mode (``jax_enable_x64``) is
    on, as JAX itself would store it.
    """
    if dtype is not None:
        return jax.dtypes.canonicalize_dtype(dtype)
    if jnp.issubdtype(x.dtype, jnp.floating):
        return jax.dtypes.canonicalize_dtype(x.dtype)
    return jax.dtypes.canonicalize_dtype(param_dtype)


def at_least_float32(dtype: Any) -> Any:
    """float32, or float64 for float64 (with 64-bit mode on): statistics, logits and softmax
    never in half precision."""
    wide = jnp.dtype(dtype) == jnp.float64
    return jax.dtypes.canonicalize_dtype(jnp.float64 if wide else jnp.float32)


def align(v: jax.Array, ndim: int) -> jax.Array:
    """``v`` with leading size-1 axes up to rank ``ndim``: explicit broadcasting, so layers run
    under ``jax_numpy_rank_promotion="raise"``."""
    return v.reshape((1,) * (ndim - v.ndim) + v.shape)


def per_position(layer: Layer) -> Layer:
    """``layer`` made to pass a :class:`Seq` through: the array is given to ``layer`` and the
    result comes back as the ``Seq`` with its array replaced. For layers that treat each
    position on its own (``Dense``, activations, ``Dropout``, ``LayerNorm``)."""

    def init(key, x):
        return layer.init(key, array_of(x))

    def apply(params, state, x, *, key=None, train=False):
        if not isinstance(x, Seq):
            return layer.apply(params, state, x, key=key, train=train)
        y, new_state = layer.apply(params, state, x.x, key=key, train=train)
        return x.with_x(y), new_state

    return Layer(init, apply, layer.name)


def parameter_free(name: str, fn: Callable[[Any], Any],
                   check: Callable[[Any], None] | None = None) -> Layer:
    """A layer with no params and no state that applies ``fn(x)``: ``check(x)``, when given,
    raises for an input the layer does not take, at ``init`` (on shapes alone) as in
    ``apply``, and params given to ``apply`` are an error (another layer's, by mistake)."""

    def init(key, x):
        if check is not None:
            check(x)
        return {}, {}

    def apply(params, state, x, *, key=None, train=False):
        expect_params(name, params, {})
        if check is not None:
            check(x)
        return fn(x), state

    return Layer(init, apply, name)


# ----------------------------------------------------------------------------- children

def init_child(name: str, child: Layer, key: jax.Array, x: Spec) -> tuple[Params, State, Any]:
    """Initialises ``child`` under ``name``; returns its params, state and output spec."""
    with _scope(name):
        params, state = child.init(key, x)
        y = output_spec(child, params, state, x)
    return params, state, y


# Observers of child calls, set by fnn.inspection (summaries, debugging): each is called as
# observe(event, path, layer, x, y, params, state) with event "start" (y None) before a child's
# apply and "end" after it, while tracing; rows are so listed parent before child.
_OBSERVERS: contextvars.ContextVar[tuple[Callable[..., None], ...]] = contextvars.ContextVar(
    "fnn_observers", default=())
# Where intermediate outputs are being captured (fnn.capture_intermediates): path -> output.
# A combinator that traces its children inside a lax.scan or jax.checkpoint (repeat, remat)
# captures into a fresh dict there and returns it as an output of that computation, so that
# the values leave the inner trace as values.
_CAPTURED: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "fnn_captured", default=None)
# How many times the layer being traced runs per call of the model: the product of the lengths
# of the repeat scans around it (a summary counts a scanned body's FLOPs that many times).
_COPIES: contextvars.ContextVar[int] = contextvars.ContextVar("fnn_copies", default=1)


def apply_child(
    name: str, child: Layer, params: Params, state: State, x: Any, *, key: jax.Array | None,
    train: bool,
) -> tuple[Any, State]:
    """Applies ``child`` with the entries ``params[name]``/``state[name]`` (``{}`` if absent)."""
    child_params, child_state = params.get(name, {}), state.get(name, {})
    with _scope(name):
        observers = _OBSERVERS.get()
        path = current_path()
        for observe in observers:
            observe("start", path, child, x, None, child_params, child_state)
        y, new_state = child.apply(child_params, child_state, x, key=key, train=train)
        for observe in observers:
            observe("end", path, child, x, y, child_params, child_state)
        captured = _CAPTURED.get()
        if captured is not None:
            captured[path] = y
    return y, new_state


@contextlib.contextmanager
def inner_trace(copies: int = 1) -> Iterator[dict[str, Any] | None]:
    """For combinators that trace their children inside a ``lax.scan`` or ``jax.checkpoint``:
    within the block, captured intermediates go to a fresh dict (yielded; ``None`` when nothing
    is being captured), which the combinator returns as an output of the inner computation and
    hands to :func:`report_captured` outside it; ``copies`` is how many times the body runs."""
    outer = _CAPTURED.get()
    inner = None if outer is None else {}
    tokens = (_CAPTURED.set(inner), _COPIES.set(_COPIES.get() * copies))
    try:
        yield inner
    finally:
        _CAPTURED.reset(tokens[0])
        _COPIES.reset(tokens[1])


def report_captured(values: Mapping[str, Any] | None) -> None:
    """Adds intermediates returned by an inner computation (see :func:`inner_trace`)."""
    captured = _CAPTURED.get()
    if captured is not None and values:
        captured.update(values)


# The mapped axis that holds the devices' shards of the batch while fnn's data-parallel step
# is traced (jax.pmap): BatchNorm without an axis_name of its own averages its statistics over
# it, so a model gives the same statistics in every mode (fnn.train.parallel).
_BATCH_AXIS: contextvars.ContextVar[str | None] = contextvars.ContextVar("fnn_batch_axis",
                                                                         default=None)


@contextlib.contextmanager
def batch_axis(name: str | None) -> Iterator[None]:
    """Within the block, layers that compute batch statistics average them over the mapped
    axis ``name`` (``None``: no axis) unless they name an axis of their own."""
    token = _BATCH_AXIS.set(name)
    try:
        yield
    finally:
        _BATCH_AXIS.reset(token)


def current_batch_axis() -> str | None:
    """The axis set by :func:`batch_axis`, or ``None``."""
    return _BATCH_AXIS.get()


@contextlib.contextmanager
def observing(observer: Callable[..., None]) -> Iterator[None]:
    """Calls ``observer`` for every child call traced inside the block (see ``_OBSERVERS``)."""
    token = _OBSERVERS.set(_OBSERVERS.get() + (observer,))
    try:
        yield
    finally:
        _OBSERVERS.reset(token)


@contextlib.contextmanager
def unobserved() -> Iterator[None]:
    """Within the block, child calls are seen by no observer and captured nowhere: for a layer
    that traces its child an extra time to learn about it (:func:`fnn.adapters.lora` finds the
    layers it adapts so), so that a summary or a capture around it lists each call once."""
    tokens = (_OBSERVERS.set(()), _CAPTURED.set(None))
    try:
        yield
    finally:
        _OBSERVERS.reset(tokens[0])
        _CAPTURED.reset(tokens[1])


@contextlib.contextmanager
def capturing() -> Iterator[dict[str, Any]]:
    """Collects every child's output traced inside the block into the yielded dict, keyed by
    path (the values cross ``repeat``'s scan and ``remat``'s checkpoint as returned outputs)."""
    captured: dict[str, Any] = {}
    token = _CAPTURED.set(captured)
    try:
        yield captured
    finally:
        _CAPTURED.reset(token)


def copies() -> int:
    """How many times the layer being traced runs per call of the model (see ``_COPIES``)."""
    return _COPIES.get()


def put(tree: dict[str, Any], name: str, value: dict[str, Any]) -> None:
    """Adds a child's params or state under ``name`` unless empty: parameter-free layers add no
    clutter to the tree."""
    if value:
        tree[name] = value


def child_key(key: jax.Array | None, index: int) -> jax.Array | None:
    """The key for a combinator's ``index``-th child (``None`` stays ``None``)."""
    return None if key is None else jax.random.fold_in(key, index)


class Children:
    """The named children of a layer built from layers: one place that initialises each child
    on its own input, applies a child by name and derives each child's key from its position in
    ``children`` (``fold_in(key, position)``, as :func:`fnn.combinators.serial` does).

    The params and state of child ``name`` are nested under ``name`` (left out when empty)::

        parts = Children("Block", norm=LayerNorm(), attention=MultiHeadAttention(4))

        def init(key, x):
            child = parts.initializer(key)
            child("attention", child("norm", x))      # each returns its child's output spec
            return child.params, child.state

        def apply(params, state, x, *, key=None, train=False):
            child = parts.runner(params, state, key, train)
            y = child("attention", child("norm", x))
            return y, child.state

    A child may be applied more than once; its last state is kept.
    """

    def __init__(self, owner: str, children: Mapping[str, Layer] | None = None,
                 **named: Layer):
        self.owner = owner
        self.layers: dict[str, Layer] = dict(children or {}) | named
        for name, layer in self.layers.items():
            if not isinstance(layer, Layer):
                raise TypeError(f"{owner}: child {name!r} must be a Layer (built by a factory "
                                f"such as Dense(10) or Relu()), got {type(layer).__name__}")
            if "/" in name:
                raise ValueError(f"{owner}: child names may not contain '/', got {name!r}")
        self.index = {name: i for i, name in enumerate(self.layers)}

    def __contains__(self, name: str) -> bool:
        return name in self.layers

    def initializer(self, key: jax.Array) -> _ChildInit:
        """Initialises children one call at a time; see the class docstring."""
        return _ChildInit(self, key)

    def runner(self, params: Params, state: State, key: jax.Array | None,
               train: bool) -> _ChildRun:
        """Applies children one call at a time; see the class docstring. Entries of
        ``params`` or ``state`` that name no child are an error (params of another model)."""
        check_train(train)
        check_children(self.owner, params, state, self.layers)
        return _ChildRun(self, params, state, key, train)


def check_children(owner: str, params: Any, state: Any, names: Any) -> None:
    """Raises :class:`ParamError` when ``params`` or ``state`` of a layer built from children
    hold an entry that names none of them (params of another model, say)."""
    for what, tree in (("params", params), ("state", state)):
        if not isinstance(tree, Mapping):
            raise ParamError(f"{where(owner)}: expected {what} as a dict of its children's, got "
                             f"{type(tree).__name__}")
        extra = [name for name in tree if name not in names]
        if extra:
            raise ParamError(f"{where(owner)}: unexpected {what} entries "
                             f"{', '.join(map(repr, extra))} (its children are "
                             f"{', '.join(map(repr, names))})")


class _ChildInit:
    def __init__(self, children: Children, key: jax.Array):
        self._children, self._key = children, key
        self.params: Params = {}
        self.state: State = {}

    def __call__(self, name: str, x: Spec) -> Any:
        """Initialises child ``name`` on ``x``; returns its output spec."""
        p, s, y = init_child(name, self._children.layers[name],
                             jax.random.fold_in(self._key, self._children.index[name]), x)
        put(self.params, name, p)
        put(self.state, name, s)
        return y


class _ChildRun:
    def __init__(self, children: Children, params: Params, state: State,
                 key: jax.Array | None, train: bool):
        self._children, self._params, self._state = children, params, state
        self._key, self._train = key, train
        self.state: State = {}

    def __call__(self, name: str, x: Any) -> Any:
        """Applies child ``name`` to ``x``; returns its output (its new state is kept)."""
        y, s = apply_child(name, self._children.layers[name], self._params, self._state, x,
                           key=child_key(self._key, self._children.index[name]),
                           train=self._train)
        put(self.state, name, s)
        return y
