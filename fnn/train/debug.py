"""Naming where a training step goes non-finite: the input, a parameter, a layer or a gradient.

``jax.debug_nans`` and ``checkify`` name the primitive that made the first NaN (``log``), not the
layer; :func:`find_nonfinite` names the layer by its path in the model.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fnn.core import Layer, Params, State, UnboundAxisError, check_train
from fnn.inspection import capture_intermediates, record_layers
from fnn.train.step import Loss


def _bad_values(leaf: Any) -> str | None:
    """``"NaN (3 of 40 values)"``, ``"inf (...)"``, ``"NaN and inf (...)"``, or ``None`` when
    ``leaf`` is finite or not floating."""
    if not (hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.inexact)):
        return None
    # on the host with numpy: checking every layer's output with jax.numpy would compile one
    # small computation per shape
    values = np.asarray(leaf)
    nan, inf = np.isnan(values), np.isinf(values)
    kinds = [kind for kind, mask in (("NaN", nan), ("inf", inf)) if mask.any()]
    if not kinds:
        return None
    return f"{' and '.join(kinds)} ({int((nan | inf).sum())} of {values.size} values)"


def _first_bad(tree: Any) -> tuple[tuple, str] | None:
    """The key path and :func:`_bad_values` of the first non-finite leaf of ``tree``."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        bad = _bad_values(leaf)
        if bad is not None:
            return path, bad
    return None


def _is_concrete(tree: Any) -> bool:
    """Whether every leaf holds values, not a tracer of a traced sub-computation (a
    ``lax.scan`` body, a ``jax.checkpoint``) that ran inside the recorded call."""
    return not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(tree))


def _completion_order(paths: list[str]) -> list[int]:
    """Row indices in the order the calls finished, from rows listed in the order they started:
    a layer finishes after all of its children (paths below its own)."""
    order: list[int] = []
    open_rows: list[int] = []
    for i, path in enumerate(paths):
        while open_rows and not path.startswith(paths[open_rows[-1]] + "/"):
            order.append(open_rows.pop())
        open_rows.append(i)
    return order + open_rows[::-1]


def _bad_copy(value: Any) -> int:
    """The first copy (index along the leading axis of a value stacked by ``repeat``) that is
    not finite."""
    bad = None
    for leaf in jax.tree.leaves(value):
        if hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.inexact):
            finite = np.isfinite(np.asarray(leaf)).reshape(np.shape(leaf)[0], -1).all(axis=1)
            if not finite.all():
                index = int(np.argmin(finite))
                bad = index if bad is None else min(bad, index)
    return 0 if bad is None else bad


def _first_bad_output(layers: dict[str, str], captured: dict[str, Any]) -> str | None:
    """Names the layer whose output is the first non-finite one in forward order: in the order
    the layers finish, with the layers inside a ``repeat`` ordered copy by copy (their outputs
    are stacked over the copies)."""
    paths = list(layers)  # each path once, in the order the calls started
    repeats = [p for p in paths if layers[p] == "repeat"]
    order = _completion_order(paths)
    position = {paths[i]: n for n, i in enumerate(order)}
    best = None
    for path in (paths[i] for i in order):
        value = captured.get(path)
        bad = _first_bad(value) if value is not None and _is_concrete(value) else None
        if bad is None:
            continue
        group = next((r for r in repeats if path.startswith(r + "/")), None)
        if group is None:
            key, where_in = (position[path], 0, position[path]), ""
        else:
            body = [p for p in paths if p.startswith(group + "/")]
            copy, copies = _bad_copy(value), np.shape(jax.tree.leaves(value)[0])[0]
            key = (min(position[p] for p in body), copy, position[path])
            where_in = f" (in copy {copy + 1} of the {copies} of repeat at {group})"
        if best is None or key < best[0]:
            best = (key, f"the output of {layers[path]} at {path}{where_in} has {bad[1]}: the "
                         f"first layer, in forward order, whose output is not finite")
    return None if best is None else best[1]


def _key_name(key: Any) -> str:
    """``"w"`` for the dict key ``['w']``, ``"0"`` for the sequence index ``[0]``."""
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _owner(key_path: tuple, layers: dict[str, str], model_name: str) -> tuple[str, str]:
    """The path and ``"Dense at encoder/1"`` description of the layer that owns a param or
    state leaf: the recorded layer whose path is the longest prefix of the leaf's keys."""
    keys = [_key_name(k) for k in key_path]
    for n in range(len(keys), 0, -1):
        path = "/".join(keys[:n])
        if path in layers:
            return path, f"{layers[path]} at {path}"
    return "", model_name


def _leaf_name(tree_name: str, key_path: tuple, layers: dict[str, str], model_name: str) -> str:
    return (f"{tree_name}{jax.tree_util.keystr(key_path)} "
            f"({_owner(key_path, layers, model_name)[1]})")


def find_nonfinite(model: Layer, params: Params, state: State, x: Any, y: Any, loss: Loss, *,
                   key: jax.Array | None = None, train: bool = True) -> str | None:
    """Runs one forward and backward pass of ``loss(model(x), y)`` and says where it first
    stops being finite, or returns ``None`` when everything is finite.

    Args are those of a train step: ``x: [batch, ...]`` (an array or a pytree of them) and
    ``y: [batch, ...]``; ``loss(outputs, y) -> scalar``; ``key`` for stochastic layers when
    ``train`` is true. The checks run in the order the values are made, and the first failing
    one is reported:

    1. the input batch, then the targets (``"the input batch has NaN (1 of 64 values)"``);
    2. the params, then the state (``"the parameter params['0']['w'] (Dense at 0) has NaN"``);
    3. each layer's output, in the order the layers finish (a layer before the combinator that
       contains it), so the first layer whose output is not finite is named although every
       layer after it is not finite either (``"the output of Lambda at encoder/1 has inf"``);
       layers inside ``repeat`` and ``remat`` are checked too (their outputs are captured as
       values, see :func:`fnn.capture_intermediates`); then the model's own output and the
       updated state;
    4. the loss;
    5. the gradients of the params, in the order the backward pass makes them (the last layer
       first): when every forward value is finite, the non-finite gradient made first is the
       closest to its cause (``"the gradient of params['0']['w'] (Dense at 0) has NaN"``).

    The forward pass runs eagerly (un-jitted) so that every layer's output can be read; the
    gradients are computed by one jitted backward pass. A model whose layers average over a
    device axis (``BatchNorm(axis_name=...)``) cannot run in training mode outside
    ``pmap``/``shard_map``: it is then checked in evaluation mode, and the message says so. Call
    it on the batch that went wrong,
    with the params, state and key of the step that went wrong (``fold_in(ts.key, ts.step)``
    for a :class:`~fnn.train.TrainState`).
    """
    check_train(train)
    for what, tree in (("the input batch", x), ("the target batch", y)):
        bad = _first_bad(tree)
        if bad is not None:
            where_in = jax.tree_util.keystr(bad[0])
            return f"{what}{' entry ' + where_in if where_in else ''} has {bad[1]}"

    try:
        with record_layers() as rows:
            outputs, new_state, captured = capture_intermediates(model, params, state, x,
                                                                 key=key, train=train)
    except UnboundAxisError as e:
        # a layer that averages over devices (BatchNorm(axis_name=...)) has no device axis
        # outside pmap/shard_map; in evaluation mode it uses its running statistics instead
        if not train:
            raise
        found = find_nonfinite(model, params, state, x, y, loss, key=key, train=False)
        return found and (f"{found} (found in evaluation mode: in training mode the model "
                          f"averages over a device axis, which does not exist outside pmap: {e})")
    layers: dict[str, str] = {}
    for row in rows:
        layers.setdefault(row.path, row.name)

    for tree_name, tree, label in (("params", params, "the parameter"),
                                   ("state", state, "the state entry")):
        bad = _first_bad(tree)
        if bad is not None:
            return f"{label} {_leaf_name(tree_name, bad[0], layers, model.name)} has {bad[1]}"

    first = _first_bad_output(layers, captured)
    if first is not None:
        return first
    bad = _first_bad(outputs)
    if bad is not None:
        return f"the output of the model ({model.name}) has {bad[1]}"
    bad = _first_bad(new_state)
    if bad is not None:
        return (f"the updated state entry {_leaf_name('state', bad[0], layers, model.name)} has "
                f"{bad[1]}")

    value = loss(outputs, y)
    if _bad_values(value) is not None:
        return (f"the loss is {float(value)} although the model's outputs and targets are "
                f"finite: check the loss function and the targets' range (class ids outside "
                f"the model's head make softmax_cross_entropy NaN)")

    def objective(p):
        return loss(model.apply(p, state, x, key=key, train=train)[0], y)

    grads = jax.jit(jax.grad(objective))(params)
    return _first_bad_gradient(grads, layers, model.name)


def _first_bad_gradient(grads: Params, layers: dict[str, str], model_name: str) -> str | None:
    """The first non-finite gradient in backward order: layers in reverse forward order (the
    order of ``layers``), the leaves of one layer in tree order."""
    forward = {path: i for i, path in enumerate(layers)}
    leaves = jax.tree_util.tree_leaves_with_path(grads)
    bad = [(path, _bad_values(g)) for path, g in leaves]
    bad = [(path, what) for path, what in bad if what is not None]
    if not bad:
        return None
    # a stable sort: leaves of the same layer keep their tree order
    bad.sort(key=lambda item: -forward.get(_owner(item[0], layers, model_name)[0], -1))
    path, what = bad[0]
    return (f"the gradient of {_leaf_name('params', path, layers, model_name)} has {what}, with "
            f"every layer's output and the loss finite: the first non-finite gradient in the "
            f"backward pass ({len(bad)} of {len(leaves)} gradient arrays are not finite)")
