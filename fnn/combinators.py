"""Combinators: layers built from layers.

Each child's params and state are nested under a stable, readable name: its position (``"0"``,
``"1"``, ...) or the keyword it was given. Children without params or state add nothing to the
tree. Each child gets its own random key, folded in from its position, so adding a layer does not
change the keys of the others. A :class:`~fnn.core.Seq` goes through a combinator as through any
layer: each child gets it, and outputs are combined on their arrays.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from fnn.core import (Children, Layer, LayerError, Params, Seq, State, apply_child, array_of,
                      as_spec, check_children, check_positive, check_train, describe, init_child,
                      inner_trace, output_spec, put, report_captured, where)


def _children(name: str, layers: Sequence[Layer], named: dict[str, Layer]) -> Children:
    entries = [(str(i), layer) for i, layer in enumerate(layers)] + list(named.items())
    if not entries:
        raise ValueError(f"{name} needs at least one layer")
    names = [child_name for child_name, _ in entries]
    if len(set(names)) != len(names):
        raise ValueError(f"{name}: child names must be unique, got {names}")
    return Children(name, dict(entries))


def _init_each(children: Children, apply):
    """An ``init`` that initialises every child on the same input, then traces ``apply`` once
    (shapes only) so that outputs that cannot be combined are reported at ``init``."""
    def init(key, x):
        child = children.initializer(key)
        for name in children.layers:
            child(name, x)
        output_spec(Layer(init, apply), child.params, child.state, x)
        return child.params, child.state
    return init


def _apply_each(children: Children, params: Params, state: State, x, key, train
                ) -> tuple[list[Any], State]:
    """Applies every child to the same input; returns their outputs and the new state."""
    child = children.runner(params, state, key, train)
    return [child(name, x) for name in children.layers], child.state


def _on_arrays(fn: Callable[[list[Any]], Any], outputs: list[Any]) -> Any:
    """``fn`` of the outputs' arrays; when the first output is a ``Seq``, the result comes back
    in it (its side inputs kept)."""
    y = fn([array_of(o) for o in outputs])
    return outputs[0].with_x(y) if isinstance(outputs[0], Seq) else y


def serial(*layers: Layer, **named: Layer) -> Layer:
    """Applies layers one after another: ``serial(Dense(64), Relu(), Dense(10))``.
    ``x: [...] -> [...]``, each child's output being the next one's input.

    Children given by position are named ``"0"``, ``"1"``, ...; children given by keyword keep
    their keyword, in order: ``serial(encoder=mlp, head=Dense(10))`` has params
    ``{"encoder": ..., "head": ...}``.
    """
    children = _children("serial", layers, named)

    def init(key, x):
        child = children.initializer(key)
        for name in children.layers:
            x = child(name, x)
        return child.params, child.state

    def apply(params, state, x, *, key=None, train=False):
        child = children.runner(params, state, key, train)
        for name in children.layers:
            x = child(name, x)
        return x, child.state

    return Layer(init, apply, "serial")


def named(name: str, layer: Layer) -> Layer:
    """Nests ``layer``'s params and state under ``name``: ``{name: layer_params}``.
    ``x -> layer(x)``, shapes as ``layer``'s."""
    return serial(**{name: layer})


_COMBINE: dict[str, Callable[[Sequence[Any]], Any]] = {
    "concat": lambda ys: jnp.concatenate(ys, axis=-1),
    "add": lambda ys: sum(ys[1:], ys[0]),
    "tuple": tuple,
}


def combiner(name: str, combine: str | Callable[[tuple], Any]) -> Callable[[tuple], Any]:
    """The function behind ``combine="concat" | "add" | "tuple"`` or a given function."""
    if callable(combine):
        return combine
    if combine in _COMBINE:
        return _COMBINE[combine]
    raise ValueError(f"{name}: combine must be one of {sorted(_COMBINE)} or a function, "
                     f"got {combine!r}")


def branch(*layers: Layer, combine: str | Callable[[tuple], Any] = "concat",
           **named_layers: Layer) -> Layer:
    """Feeds the same input to several layers and combines their outputs.
    ``x: [...] -> combine([layer(x) for layer in layers])``, e.g. ``[..., f1 + f2]`` for
    ``"concat"`` of two layers with ``f1`` and ``f2`` features.

    ``combine`` is ``"concat"`` (along the last axis), ``"add"``, ``"tuple"`` (the outputs as a
    tuple, in order), or a function of that tuple. Children are named as in :func:`serial`.
    With a ``Seq`` input the outputs' arrays are combined and returned in the first output's
    ``Seq``.
    """
    children = _children("branch", layers, named_layers)
    combine_fn = combiner("branch", combine)

    def apply(params, state, x, *, key=None, train=False):
        outputs, new_state = _apply_each(children, params, state, x, key, train)
        try:
            return _on_arrays(lambda ys: combine_fn(tuple(ys)), outputs), new_state
        except (TypeError, ValueError) as e:
            raise LayerError(f"{where('branch')}: cannot combine outputs "
                             f"{', '.join(describe(y) for y in outputs)} with {combine!r}: "
                             f"{e}") from e

    return Layer(_init_each(children, apply), apply, "branch")


def residual(body: Layer, shortcut: Layer | None = None) -> Layer:
    """``body(x) + shortcut(x)``; the shortcut is the identity unless given.
    ``x: [...] -> y: [...]``, where both branches must give the same shape.

    Params: ``{"body": ..., "shortcut": ...}`` (each left out when it has none). With a ``Seq``
    input the arrays are added and the result returned in the body's ``Seq``.
    """
    children = Children("residual", {"body": body} | ({} if shortcut is None else
                                                      {"shortcut": shortcut}))

    def add(ys: list[Any]) -> Any:
        y, skip = ys[0], ys[1]
        if jnp.shape(y) != jnp.shape(skip):
            raise LayerError(f"{where('residual')}: the body's output {jnp.shape(y)} does not "
                             f"match the shortcut's {jnp.shape(skip)}; give a shortcut layer that "
                             f"maps the input to the body's output shape")
        return y + skip.astype(y.dtype)

    def apply(params, state, x, *, key=None, train=False):
        outputs, new_state = _apply_each(children, params, state, x, key, train)
        return _on_arrays(add, outputs if shortcut is not None else outputs + [x]), new_state

    return Layer(_init_each(children, apply), apply, "residual")


def _describe_tree(tree: Any) -> str:
    if isinstance(tree, Seq):
        return describe(tree)
    return ", ".join(describe(leaf) for leaf in jax.tree.leaves(tree)) or "nothing"


def _same_spec(x: Any, y: Any) -> bool:
    """Whether two pytrees of arrays or specs have the same structure, shapes and dtypes."""
    x, y = as_spec(x), as_spec(y)
    return (jax.tree.structure(x) == jax.tree.structure(y)
            and all(a.shape == b.shape and a.dtype == b.dtype
                    for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y))))


def _check_carry(layer: Layer, x: Any, y: Any) -> None:
    """``repeat``'s one rule: each copy maps its input to an output like it (for a ``Seq``, an
    array like its array, in a ``Seq``)."""
    if isinstance(x, Seq) == isinstance(y, Seq) and _same_spec(array_of(x), array_of(y)):
        return
    raise LayerError(
        f"{where('repeat')}: the repeated layer {layer.name} must map its input to an output of "
        f"the same shape and dtype (each copy's output is the next copy's input), but it maps "
        f"{_describe_tree(x)} to {_describe_tree(y)}")


def _check_stacked(tree: Any, what: str, num: int) -> None:
    for leaf in jax.tree.leaves(tree):
        if jnp.ndim(leaf) < 1 or jnp.shape(leaf)[0] != num:
            raise LayerError(f"{where('repeat')}: expected {what} stacked over {num} copies "
                             f"(every leaf with leading axis {num}, as init makes them), got a "
                             f"leaf {describe(leaf)}")


def repeat(layer: Layer, num: int, *, remat: bool | Callable[..., bool] = False,
           unroll: int | bool = 1) -> Layer:
    """Applies ``num`` copies of ``layer``, each with its own params, one after another:
    ``x: [...] -> [...]``, where ``layer`` must map its input to an output of the same shape
    and dtype (each copy's output is the next one's input). With a ``Seq`` input its array is
    carried from copy to copy and every copy gets the same side inputs (lengths, masks,
    memory); the output is the ``Seq`` with the last copy's array.

    The copies' params and state are stacked along a new leading axis of size ``num`` and the
    copies run in one ``lax.scan`` over that axis, so tracing and compile time do not grow with
    ``num`` (``repeat(block, 24)`` traces ``block`` once). Params: ``{"layers": stacked}``,
    where ``stacked`` has the structure of ``layer``'s params with every leaf ``[num, ...]``;
    copy ``i``'s params are ``jax.tree.map(lambda a: a[i], params["layers"])``. State likewise
    (``{"layers": stacked}``: BatchNorm running statistics, attention caches), updated per copy.
    Either is ``{}`` when ``layer`` has none.

    - ``init`` initialises the copies with ``jax.vmap`` over the keys ``fold_in(key, i)``.
    - ``apply`` gives copy ``i`` the key ``fold_in(key, i)`` (``None`` stays ``None``).
    - ``remat``: ``True`` rematerialises each copy in the backward pass (``jax.checkpoint`` on
      the per-copy body: activation memory of one copy instead of ``num``); or a
      ``jax.checkpoint_policies`` policy (e.g. ``dots_saveable``), used as ``policy``.
    - ``unroll``: passed to ``lax.scan`` (copies per loop iteration; ``True`` unrolls fully).

    For cached decoding through repeated attention blocks, the state holds one cache per copy,
    stacked: :func:`fnn.layers.transformer.init_block_cache` builds it from these params.

    >>> import jax, jax.numpy as jnp, fnn
    >>> model = repeat(fnn.serial(fnn.Dense(4), fnn.Relu()), 3)
    >>> params, state = model.init(jax.random.key(0), jnp.zeros((2, 4)))
    >>> jax.tree.map(jnp.shape, params)
    {'layers': {'0': {'b': (3, 4), 'w': (3, 4, 4)}}}
    >>> model.apply(params, state, jnp.ones((2, 4)))[0].shape
    (2, 4)
    """
    check_positive("repeat", num=num)
    if not isinstance(layer, Layer):
        raise TypeError(f"repeat: layer must be a Layer (built by a factory such as Dense(10)), "
                        f"got {type(layer).__name__}")
    if not (isinstance(unroll, bool) or (isinstance(unroll, int) and unroll >= 1)):
        raise ValueError(f"repeat: unroll must be a positive integer or a bool, got {unroll!r}")
    if not (isinstance(remat, bool) or callable(remat)):
        raise ValueError(f"repeat: remat must be a bool or a jax.checkpoint policy, got "
                         f"{remat!r}")

    def init(key, x):
        def init_one(k):  # copy i is initialised with fold_in(key, i) itself, as apply keys it
            p, s, y = init_child("layers", layer, k, x)
            _check_carry(layer, x, y)
            params, state = {}, {}
            put(params, "layers", p)
            put(state, "layers", s)
            return params, state

        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(num))
        return jax.vmap(init_one)(keys)

    def apply(params, state, x, *, key=None, train=False):
        check_train(train)
        check_children("repeat", params, state, ("layers",))
        _check_stacked(params, "params", num)
        _check_stacked(state, "state", num)

        def body(carry, per_copy):
            p, s, k = per_copy
            given = x.with_x(carry) if isinstance(x, Seq) else carry
            with inner_trace(num) as captured:
                y, new_s = apply_child("layers", layer, p, s, given, key=k, train=train)
            _check_carry(layer, given, y)
            return array_of(y), ({"layers": new_s} if new_s else {}, captured)

        if remat is not False:
            body = jax.checkpoint(body, prevent_cse=False,
                                  policy=None if remat is True else remat)
        keys = (None if key is None
                else jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(num)))
        y, (new_state, captured) = lax.scan(body, array_of(x), (params, state, keys),
                                            length=num, unroll=unroll)
        report_captured(captured)
        return (x.with_x(y) if isinstance(x, Seq) else y), new_state

    return Layer(init, apply, "repeat")


def remat(layer: Layer, *, policy: Callable[..., bool] | None = None,
          prevent_cse: bool = True) -> Layer:
    """``layer`` with its ``apply`` wrapped in ``jax.checkpoint``: the same params, state and
    outputs (``x: [...] -> layer(x)``, shapes as ``layer``'s), but in the backward pass its
    intermediate activations are recomputed from its input instead of being kept from the
    forward pass. Activation memory falls to the layer's inputs and outputs, for one more
    forward pass of the layer.

    - ``policy``: a ``jax.checkpoint_policies`` entry naming what may still be saved (e.g.
      ``dots_saveable`` keeps matmul results and recomputes only the cheap elementwise work);
      ``None`` saves nothing.
    - ``prevent_cse``: passed to ``jax.checkpoint``. ``True`` stops XLA from merging the
      recomputation back into the forward pass; ``False`` is safe (and faster) inside
      ``lax.scan``, which already prevents that.

    ``train`` stays static and ``key`` is passed through, so stochastic layers draw the same
    masks in the recomputation as in the forward pass. For deep stacks of identical blocks,
    ``repeat(block, num, remat=True)`` rematerialises each copy inside its scan.

    >>> import jax, jax.numpy as jnp, fnn
    >>> block = remat(fnn.serial(fnn.Dense(8), fnn.Gelu(), fnn.Dense(4)))
    >>> params, state = block.init(jax.random.key(0), jnp.zeros((2, 4)))
    >>> jax.tree.map(jnp.shape, params)
    {'0': {'b': (8,), 'w': (4, 8)}, '2': {'b': (4,), 'w': (8, 4)}}
    >>> block.apply(params, state, jnp.ones((2, 4)))[0].shape
    (2, 4)
    """
    if not isinstance(layer, Layer):
        raise TypeError(f"remat: layer must be a Layer (built by a factory such as Dense(10)), "
                        f"got {type(layer).__name__}")
    if policy is not None and not callable(policy):
        raise TypeError(f"remat: policy must be a jax.checkpoint_policies entry (e.g. "
                        f"jax.checkpoint_policies.dots_saveable) or None, got {policy!r}")
    if not isinstance(prevent_cse, bool):
        raise TypeError(f"remat: prevent_cse must be a bool, got {prevent_cse!r}")

    def apply(params, state, x, *, key=None, train=False):
        check_train(train)

        def run(params, state, x, key):  # train is closed over: static, as jax.checkpoint needs
            with inner_trace() as captured:
                y, new_state = layer.apply(params, state, x, key=key, train=train)
            return y, new_state, captured

        y, new_state, captured = jax.checkpoint(run, prevent_cse=prevent_cse, policy=policy)(
            params, state, x, key)
        report_captured(captured)
        return y, new_state

    return Layer(layer.init, apply, f"remat({layer.name})")
