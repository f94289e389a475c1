"""Combinators: layers built from layers.

Each child's params and state are nested under a stable, readable name: its position (``"0"``,
``"1"``, ...) or the keyword it was given. Children without params or state add nothing to the
tree. Each child gets its own random key, folded in from its position, so adding a layer does not
change the keys of the others.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from fnn.core import (Layer, LayerError, Params, State, apply_child, check_train, child_key,
                      init_child, output_spec, put, where)


def _named_children(name: str, layers: Sequence[Layer], named: dict[str, Layer]
                    ) -> list[tuple[str, Layer]]:
    children = [(str(i), layer) for i, layer in enumerate(layers)] + list(named.items())
    if not children:
        raise ValueError(f"{name} needs at least one layer")
    names = [child_name for child_name, _ in children]
    if len(set(names)) != len(names):
        raise ValueError(f"{name}: child names must be unique, got {names}")
    for child_name, layer in children:
        if not isinstance(layer, Layer):
            raise TypeError(f"{name}: child {child_name!r} must be a Layer (built by a factory "
                            f"such as Dense(10) or Relu()), got {type(layer).__name__}")
        if "/" in child_name:
            raise ValueError(f"{name}: child names may not contain '/', got {child_name!r}")
    return children


def _init_children(children: list[tuple[str, Layer]], key, x, *, chain: bool
                   ) -> tuple[Params, State]:
    """Initialises each child on ``x``, or with ``chain`` on the previous child's output."""
    params, state = {}, {}
    for i, (child_name, child) in enumerate(children):
        p, s, y = init_child(child_name, child, jax.random.fold_in(key, i), x)
        x = y if chain else x
        put(params, child_name, p)
        put(state, child_name, s)
    return params, state


def _init_each(children: list[tuple[str, Layer]], apply):
    """An ``init`` that initialises every child on the same input, then traces ``apply`` once
    (shapes only) so that outputs that cannot be combined are reported at ``init``."""
    def init(key, x):
        params, state = _init_children(children, key, x, chain=False)
        output_spec(Layer(init, apply), params, state, x)
        return params, state
    return init


def _apply_each(children: list[tuple[str, Layer]], params: Params, state: State, x, key, train
                ) -> tuple[list[Any], State]:
    """Applies every child to the same input; returns their outputs and the new state."""
    check_train(train)
    outputs, new_state = [], {}
    for i, (child_name, child) in enumerate(children):
        y, s = apply_child(child_name, child, params, state, x, key=child_key(key, i), train=train)
        outputs.append(y)
        put(new_state, child_name, s)
    return outputs, new_state


def serial(*layers: Layer, **named: Layer) -> Layer:
    """Applies layers one after another: ``serial(Dense(64), Relu(), Dense(10))``.
    ``x: [...] -> [...]``, each child's output being the next one's input.

    Children given by position are named ``"0"``, ``"1"``, ...; children given by keyword keep
    their keyword, in order: ``serial(encoder=mlp, head=Dense(10))`` has params
    ``{"encoder": ..., "head": ...}``.
    """
    children = _named_children("serial", layers, named)

    def init(key, x):
        return _init_children(children, key, x, chain=True)

    def apply(params, state, x, *, key=None, train=False):
        check_train(train)
        new_state = {}
        for i, (child_name, child) in enumerate(children):
            x, s = apply_child(child_name, child, params, state, x, key=child_key(key, i),
                               train=train)
            put(new_state, child_name, s)
        return x, new_state

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


def branch(*layers: Layer, combine: str | Callable[[tuple], Any] = "concat",
           **named_layers: Layer) -> Layer:
    """Feeds the same input to several layers and combines their outputs.
    ``x: [...] -> combine([layer(x) for layer in layers])``, e.g. ``[..., f1 + f2]`` for
    ``"concat"`` of two layers with ``f1`` and ``f2`` features.

    ``combine`` is ``"concat"`` (along the last axis), ``"add"``, ``"tuple"`` (the outputs as a
    tuple, in order), or a function of that tuple. Children are named as in :func:`serial`.
    """
    children = _named_children("branch", layers, named_layers)
    if callable(combine):
        combine_fn = combine
    elif combine in _COMBINE:
        combine_fn = _COMBINE[combine]
    else:
        raise ValueError(f"branch: combine must be one of {sorted(_COMBINE)} or a function, "
                         f"got {combine!r}")

    def apply(params, state, x, *, key=None, train=False):
        outputs, new_state = _apply_each(children, params, state, x, key, train)
        try:
            return combine_fn(tuple(outputs)), new_state
        except (TypeError, ValueError) as e:
            raise LayerError(f"{where('branch')}: cannot combine outputs of shapes "
                             f"{[jnp.shape(y) for y in outputs]} with {combine!r}: {e}") from e

    return Layer(_init_each(children, apply), apply, "branch")


def residual(body: Layer, shortcut: Layer | None = None) -> Layer:
    """``body(x) + shortcut(x)``; the shortcut is the identity unless given.
    ``x: [...] -> y: [...]``, where both branches must give the same shape.

    Params: ``{"body": ..., "shortcut": ...}`` (each left out when it has none).
    """
    children = [("body", body)] + ([("shortcut", shortcut)] if shortcut is not None else [])

    def apply(params, state, x, *, key=None, train=False):
        outputs, new_state = _apply_each(children, params, state, x, key, train)
        skip = outputs[1] if shortcut is not None else x
        y = outputs[0]
        if jnp.shape(y) != jnp.shape(skip):
            raise LayerError(f"{where('residual')}: the body's output {jnp.shape(y)} does not "
                             f"match the shortcut's {jnp.shape(skip)}; give a shortcut layer that "
                             f"maps the input to the body's output shape")
        return y + skip.astype(y.dtype), new_state

    return Layer(_init_each(children, apply), apply, "residual")
