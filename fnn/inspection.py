"""Looking inside a model: parameter counts, a per-layer summary with FLOPs, the outputs of every
layer as values (also inside ``repeat``'s scan and ``remat``), and a record of the layer calls.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, Iterator, NamedTuple

import jax
import jax.numpy as jnp
from jax.extend.core import ClosedJaxpr, jaxpr_as_fun

from fnn.core import (Layer, ParamError, Params, Seq, State, as_spec, capturing, check_train,
                      copies, describe, observing)


def param_count(params: Params) -> int:
    """Total number of scalars in a parameter tree."""
    return sum(math.prod(jnp.shape(p)) for p in jax.tree.leaves(params))


def param_bytes(params: Params) -> int:
    """Total storage of a parameter tree in bytes."""
    return sum(math.prod(jnp.shape(p)) * jnp.dtype(jnp.result_type(p)).itemsize
               for p in jax.tree.leaves(params))


def _differences(name: str, expected: Any, given: Any) -> list[str]:
    """Every key path where ``given`` differs from ``expected`` (missing, unexpected, or of
    another shape or dtype)."""
    want = {jax.tree_util.keystr(p): leaf
            for p, leaf in jax.tree_util.tree_leaves_with_path(expected)}
    have = {jax.tree_util.keystr(p): leaf
            for p, leaf in jax.tree_util.tree_leaves_with_path(given)}
    problems = [f"{name}{p}: missing (expected {describe(want[p])})" for p in want
                if p not in have]
    problems += [f"{name}{p}: unexpected {describe(have[p])}" for p in have if p not in want]
    for path, leaf in want.items():
        if path in have:
            got = as_spec(have[path])
            if (got.shape, got.dtype) != (leaf.shape, leaf.dtype):
                problems.append(f"{name}{path}: expected {describe(leaf)}, got {describe(got)}")
    return problems


def check_params(model: Layer, params: Params, state: State, x: Any) -> None:
    """Compares ``params`` and ``state`` with what ``model.init`` makes for inputs like ``x``
    (shapes only, no FLOPs) and raises :class:`~fnn.core.ParamError` listing every difference
    by path: an entry missing or unexpected, or of another shape or dtype. Use it on params
    loaded from elsewhere before applying them.

    >>> import jax, jax.numpy as jnp, fnn
    >>> model = fnn.serial(fnn.Dense(4), head=fnn.Dense(3))
    >>> params, state = model.init(jax.random.key(0), jnp.zeros((2, 5)))
    >>> check_params(model, params, state, jnp.zeros((2, 5)))  # fits: returns None
    >>> del params["head"]["b"]
    >>> check_params(model, params, state, jnp.zeros((2, 5)))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    fnn.core.ParamError: check_params: serial's params ...: params['head']['b']: missing (...)
    """
    expected_params, expected_state = jax.eval_shape(model.init, jax.random.key(0), as_spec(x))
    problems = (_differences("params", expected_params, params)
                + _differences("state", expected_state, state))
    if problems:
        raise ParamError(f"check_params: {model.name}'s params and state differ from what its "
                         f"init makes for x {describe(as_spec(x))}: {'; '.join(problems)}")


# ----------------------------------------------------------------------------- recording calls

class Row(NamedTuple):
    """One child call: its path, its layer's name, its output and its params (and, for
    summaries, the layer, its input, its state and how many times it runs per model call)."""

    path: str
    name: str
    output: Any
    params: Params
    layer: Layer | None = None
    input: Any = None
    state: State | None = None
    copies: int = 1


@contextlib.contextmanager
def record_layers() -> Iterator[list[Row]]:
    """Collects a :class:`Row` ``(path, name, output, params, ...)`` for every child layer
    applied inside the block, listed parent before child (the order in which the calls start)::

        with record_layers() as rows:
            y, _ = model.apply(params, state, x)
        # rows: [("encoder", "serial", ...), ("encoder/0", "Dense", ...), ...]

    The model itself (the outermost call) has no row. Outputs of layers applied inside a traced
    computation (the body of a ``lax.scan``, a ``jax.checkpoint``, a ``jit``) are tracers of that
    computation: only their shape and dtype may be read after it; for their values use
    :func:`capture_intermediates`.
    """
    rows: list[Row | None] = []
    open_rows: dict[str, list[int]] = {}

    def observe(event, path, layer, x, y, params, state):
        if event == "start":  # reserve the row, so that a parent comes before its children
            open_rows.setdefault(path, []).append(len(rows))
            rows.append(None)
        else:
            rows[open_rows[path].pop()] = Row(path, layer.name, y, params, layer, x, state,
                                              copies())

    with observing(observe):
        yield rows  # type: ignore[misc]


def capture_intermediates(model: Layer, params: Params, state: State, x: Any, *,
                          key: jax.Array | None = None, train: bool = False
                          ) -> tuple[Any, State, dict[str, Any]]:
    """``model.apply`` that also returns every child layer's output, as values::

        y, new_state, outputs = capture_intermediates(model, params, state, x)
        outputs["blocks/layers/attention"]   # [num_layers, *attention's output shape]

    ``outputs`` maps each child's path in the model to its output. Inside ``repeat`` a child's
    output is stacked over the copies (a leading axis of ``num``); inside ``remat`` it is the
    forward pass's. A pure function of its arguments: it works under ``jax.jit`` (jit it as it
    is, or ``jax.jit(functools.partial(capture_intermediates, model))``), ``jax.grad`` and
    ``jax.vmap``. A child applied twice keeps its last output. Paths are in sorted order.

    >>> import jax, jax.numpy as jnp, fnn
    >>> model = fnn.repeat(fnn.serial(fnn.Dense(4), fnn.Relu()), 3)
    >>> params, state = model.init(jax.random.key(0), jnp.zeros((2, 4)))
    >>> _, _, outputs = capture_intermediates(model, params, state, jnp.ones((2, 4)))
    >>> {path: value.shape for path, value in outputs.items()}
    {'layers': (3, 2, 4), 'layers/0': (3, 2, 4), 'layers/1': (3, 2, 4)}
    """
    check_train(train)
    with capturing() as captured:
        y, new_state = model.apply(params, state, x, key=key, train=train)
    return y, new_state, dict(sorted(captured.items()))


# ----------------------------------------------------------------------------- FLOPs

def _xla_flops(closed: Any) -> float:
    """XLA's count of floating-point operations of a jaxpr (each loop body counted once)."""
    jaxpr = closed.jaxpr if isinstance(closed, ClosedJaxpr) else closed
    avals = [v.aval for v in jaxpr.invars]
    analysis = jax.jit(jaxpr_as_fun(closed)).lower(*avals).cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per computation
        analysis = analysis[0] if analysis else {}
    return float((analysis or {}).get("flops", 0.0))


def _sub_jaxprs(eqn: Any) -> Iterator[Any]:
    for value in eqn.params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if hasattr(item, "eqns") or isinstance(item, ClosedJaxpr):
                yield item


def _scan_correction(jaxpr: Any) -> float:
    """What XLA's count of ``jaxpr`` misses: each ``scan`` body runs ``length`` times, but XLA
    counts it once."""
    jaxpr = jaxpr.jaxpr if isinstance(jaxpr, ClosedJaxpr) else jaxpr
    extra = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            body = eqn.params["jaxpr"]
            extra += eqn.params["length"] * _flops_of_jaxpr(body) - _xla_flops(body)
        else:
            extra += sum(_scan_correction(sub) for sub in _sub_jaxprs(eqn))
    return extra


def _flops_of_jaxpr(closed: Any) -> float:
    return _xla_flops(closed) + _scan_correction(closed)


def flops(fn: Any, *args: Any) -> float:
    """The floating-point operations of one call of ``fn(*args)`` (arrays or
    ``jax.ShapeDtypeStruct``s): XLA's cost analysis, with every ``lax.scan`` body counted
    ``length`` times (XLA itself counts a loop body once). Only traced and lowered, never run.

    >>> import jax.numpy as jnp
    >>> flops(lambda x, w: x @ w, jnp.ones((8, 64)), jnp.ones((64, 32)))  # 2 * 8 * 64 * 32
    32768.0
    """
    return _flops_of_jaxpr(jax.make_jaxpr(fn)(*as_spec(args)))


def _row_flops(row: Row, key: jax.Array | None, train: bool) -> float:
    def apply(params, state, x):
        return row.layer.apply(params, state, x, key=key, train=train)[0]
    return row.copies * flops(apply, row.params, row.state, row.input)


# ----------------------------------------------------------------------------- summary

class Summary(str):
    """A model summary: a string (``print`` it, compare it) that a notebook shows as the table
    itself rather than an escaped string."""

    def __repr__(self) -> str:
        return str(self)

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(str(self))


def _shape_str(y: Any) -> str:
    if isinstance(y, Seq):
        return describe(y)
    return ", ".join(describe(leaf) for leaf in jax.tree.leaves(y))


def _count(value: float) -> str:
    return f"{value:,.0f}"


def summary(model: Layer, x: Any, *, train: bool = False, flops: bool = True) -> Summary:
    """A table of every layer: its path, name, output shape, parameter count, bytes and (with
    ``flops``) the floating-point operations of one call on ``x``.

    FLOPs are XLA's cost analysis of each layer on its input (a multiply-add counts 2), with
    every ``lax.scan`` body counted as many times as it runs: a layer inside ``repeat(block,
    12)`` shows the work of its 12 copies, and an ``RNN`` that of all its time steps. Only
    shapes are computed (``jax.eval_shape``) and programs lowered, never run: a summary of a
    large model costs no FLOPs. ``x`` may be an array or a ``jax.ShapeDtypeStruct`` (or a
    ``Seq`` of them). Printed, the result is the table; it is also a ``str``.
    """
    spec = as_spec(x)
    params, state = jax.eval_shape(model.init, jax.random.key(0), spec)
    key = jax.random.key(0) if train else None
    apply = functools.partial(model.apply, key=key, train=train)
    with record_layers() as rows:
        y, _ = jax.eval_shape(apply, params, state, spec)
    top = Row("", model.name, y, params, model, spec, state)
    header = ("path", "layer", "output", "params", "bytes") + (("flops",) if flops else ())
    table = [header]
    for row in [top] + rows:
        cells = (row.path, row.name, _shape_str(row.output), _count(param_count(row.params)),
                 _count(param_bytes(row.params)))
        table.append(cells + ((_count(_row_flops(row, key, train)),) if flops else ()))
    widths = [max(len(cells[i]) for cells in table) for i in range(len(header))]
    lines = []
    for i, cells in enumerate(table):
        padded = [c.ljust(widths[j]) if j < 3 else c.rjust(widths[j]) for j, c in enumerate(cells)]
        lines.append("  ".join(padded).rstrip())
        if i == 0:
            lines.append("-" * len(lines[0]))
    lines.append("-" * len(lines[0]))
    lines.append(f"total: {param_count(params):,} parameters, {param_bytes(params):,} bytes; "
                 f"state: {param_count(state):,} values"
                 + (f"; {table[1][-1]} FLOPs per call" if flops else ""))
    return Summary("\n".join(lines))
