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

from jax import lax

from fnn.core import (Layer, LayerError, Params, State, apply_child, as_spec, check_positive,
                      check_train, child_key, describe, init_child, output_spec, put, where)


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
    """
    children = _named_children("branch", layers, named_layers)
    combine_fn = combiner("branch", combine)

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


def _describe_tree(tree: Any) -> str:
    return ", ".join(describe(leaf) for leaf in jax.tree.leaves(tree)) or "nothing"


def _same_spec(x: Any, y: Any) -> bool:
    """Whether two pytrees of arrays or specs have the same structure, shapes and dtypes."""
    x, y = as_spec(x), as_spec(y)
    return (jax.tree.structure(x) == jax.tree.structure(y)
            and all(a.shape == b.shape and a.dtype == b.dtype
                    for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y))))


def _replace_first(x: tuple, first: Any) -> tuple:
    """``x`` (a tuple or NamedTuple) with its first entry replaced."""
    if hasattr(x, "_fields"):
        return x._replace(**{x._fields[0]: first})
    return type(x)((first,) + tuple(x[1:]))


def repeat(layer: Layer, num: int, *, remat: bool | Callable[..., bool] = False,
           unroll: int | bool = 1) -> Layer:
    """Applies ``num`` copies of ``layer``, each with its own params, one after another:
    ``x: [...] -> [...]``, where ``layer`` must map its input to an output of the same shape,
    dtype and structure (each copy's output is the next one's input).

    Side inputs: when ``x`` is a tuple or NamedTuple (``AttentionInput(q, mask=...)``,
    ``DecoderInput(x, memory)``, ``(x, memory)``) and ``layer`` maps it to an output shaped like
    its first entry, that entry is carried from copy to copy and the other entries (masks,
    lengths, memory) are given unchanged to every copy; the output is the last copy's.

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

    def carries_first(x, y) -> bool:
        """Whether ``y`` continues ``x`` (False) or ``x``'s first entry (True); raises if
        neither."""
        if _same_spec(x, y):
            return False
        if isinstance(x, tuple) and len(x) > 0 and _same_spec(x[0], y):
            return True
        raise LayerError(
            f"{where('repeat')}: the repeated layer {layer.name} must map its input (or the "
            f"first entry of a tuple input) to an output of the same shape and dtype (each "
            f"copy's output is the next copy's input), but it maps {_describe_tree(x)} to "
            f"{_describe_tree(y)}")

    def init(key, x):
        out = {}

        def init_one(k):
            p, s, y = init_child("layers", layer, k, x)
            out["y"] = y  # a static spec, the same for every copy
            return p, s

        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(num))
        stacked_params, stacked_state = jax.vmap(init_one)(keys)
        carries_first(as_spec(x), out["y"])
        params, state = {}, {}
        put(params, "layers", stacked_params)
        put(state, "layers", stacked_state)
        return params, state

    def check_stacked(tree, what):
        for leaf in jax.tree.leaves(tree):
            if jnp.ndim(leaf) < 1 or jnp.shape(leaf)[0] != num:
                raise LayerError(f"{where('repeat')}: expected {what} stacked over {num} copies "
                                 f"(every leaf with leading axis {num}, as init makes them), "
                                 f"got a leaf {describe(leaf)}")

    def apply(params, state, x, *, key=None, train=False):
        check_train(train)
        stacked_params, stacked_state = params.get("layers", {}), state.get("layers", {})
        check_stacked(stacked_params, "params")
        check_stacked(stacked_state, "state")
        mode = {}

        def body(carry, xs):
            p, s, k = xs
            y, new_s = apply_child("layers", layer, {"layers": p}, {"layers": s}, carry, key=k,
                                   train=train)
            mode["first"] = carries_first(carry, y)  # static: the same for every copy
            return (_replace_first(carry, y) if mode["first"] else y), new_s

        if remat is not False:
            body = jax.checkpoint(body, prevent_cse=False,
                                  policy=None if remat is True else remat)
        keys = (None if key is None
                else jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(num)))
        y, new_stacked_state = lax.scan(body, x, (stacked_params, stacked_state, keys),
                                        length=num, unroll=unroll)
        new_state = {}
        put(new_state, "layers", new_stacked_state)
        return (y[0] if mode["first"] else y), new_state

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
            return layer.apply(params, state, x, key=key, train=train)

        return jax.checkpoint(run, prevent_cse=prevent_cse, policy=policy)(params, state, x, key)

    return Layer(layer.init, apply, f"remat({layer.name})")
