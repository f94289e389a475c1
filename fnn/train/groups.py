"""Parameter groups: path patterns over the param tree choose what is frozen, which optimizer
(learning rate) a group gets, and where weight decay applies.

A leaf's path is its keys joined by ``/``, as in fnn's error messages: ``trunk/conv1/w``,
``head/b``, ``blocks/0/attention/query/w``. A pattern is a path whose segments may hold ``*``
(any characters within one segment) and whose segment ``**`` stands for any number of segments,
none included::

    "trunk/**"     every leaf under trunk
    "**/b"         every leaf named b (the biases), at any depth
    "head/*"       the leaves directly under head
    "**"           everything

A pattern that matches no leaf is an error (a typo would otherwise freeze nothing, silently).

    optimizer = param_groups(optax.adamw(1e-3, mask=decay_mask),
                             frozen=["trunk/**"],
                             groups={"head/**": optax.adamw(1e-2)})

Frozen leaves get no optimizer state and no update: their values stay bit-identical, and
fnn's train step (which reads :attr:`ParamGroups.frozen`) does not even compute their
gradients and keeps the model state at frozen paths as it is (a frozen BatchNorm's running
statistics; in training it still normalises with the batch's statistics, as in PyTorch's
``train()`` mode). The returned optimizer is an ordinary optax ``GradientTransformation``
and works in any training loop; inside another transformation (``optax.chain(clip, groups)``)
the train step no longer sees which leaves are frozen and computes their gradients, but the
values still stay as they are as long as nothing after the groups changes the updates
(``optax.chain(groups, optax.add_decayed_weights(...))`` would decay frozen leaves too).
"""

from __future__ import annotations

import fnmatch
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax

Patterns = str | Sequence[str]


def leaf_path(key_path: Sequence[Any]) -> str:
    """The ``/``-joined path of a key path from ``jax.tree_util.tree_flatten_with_path``."""
    parts = []
    for key in key_path:
        for attribute in ("key", "name", "idx"):  # dict keys, NamedTuple fields, list indices
            if hasattr(key, attribute):
                parts.append(str(getattr(key, attribute)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def leaf_paths(tree: Any) -> list[str]:
    """The path of every leaf of ``tree``, in the order of ``jax.tree.leaves``."""
    return [leaf_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _as_list(patterns: Patterns) -> list[str]:
    listed = [patterns] if isinstance(patterns, str) else list(patterns)
    for pattern in listed:
        if not isinstance(pattern, str) or not pattern or pattern.startswith("/"):
            raise ValueError(f"a parameter pattern is a path like 'trunk/**' or '**/b', got "
                             f"{pattern!r}")
    return listed


def _matches(pattern: Sequence[str], path: Sequence[str]) -> bool:
    if not pattern:
        return not path
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        return any(_matches(rest, path[i:]) for i in range(len(path) + 1))
    return bool(path) and fnmatch.fnmatchcase(path[0], head) and _matches(rest, path[1:])


def matches(pattern: str, path: str) -> bool:
    """Whether ``path`` (``"trunk/conv1/w"``) is matched by ``pattern`` (``"trunk/**"``)."""
    return _matches(pattern.split("/"), path.split("/") if path else [])


def select(tree: Any, patterns: Patterns, *, strict: bool = True, what: str = "select") -> Any:
    """A tree of bools like ``tree``: True at each leaf whose path some pattern matches.

    With ``strict`` raises ``ValueError`` naming a pattern that matches no leaf, with the paths
    there are (``what`` names the caller in the message)."""
    listed = _as_list(patterns)
    paths = leaf_paths(tree)
    for pattern in listed if strict else ():
        if not any(matches(pattern, path) for path in paths):
            raise ValueError(f"{what}: the pattern {pattern!r} matches no parameter; the "
                             f"parameters are {_listing(paths)}")
    chosen = [any(matches(pattern, path) for pattern in listed) for path in paths]
    return jax.tree.unflatten(jax.tree.structure(tree), chosen)


def _listing(paths: Sequence[str], most: int = 12) -> str:
    shown = ", ".join(paths[:most])
    return shown + (f", ... ({len(paths)} in all)" if len(paths) > most else "") if paths \
        else "none"


def take(target: Any, source: Any, patterns: Patterns = "**", *, strict: bool = True) -> Any:
    """``target`` with each leaf whose path a pattern matches replaced by the leaf of ``source``
    at the same path: a pretrained trunk into freshly initialised params with a new head,
    ``take(fresh, pretrained, "trunk/**")``. The taken leaves must exist in ``source`` with the
    same shape and dtype (a ``ValueError`` names each that does not). With ``strict`` a pattern
    that matches nothing in ``target`` is an error too."""
    chosen = jax.tree.leaves(select(target, patterns, strict=strict, what="take"))
    by_path = {leaf_path(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(source)[0]}
    leaves, treedef = jax.tree_util.tree_flatten_with_path(target)
    problems, result = [], []
    for (key_path, leaf), hit in zip(leaves, chosen):
        path = leaf_path(key_path)
        if not hit:
            result.append(leaf)
        elif path not in by_path:
            problems.append(f"{path}: not in the source")
        elif (jnp.shape(by_path[path]), jnp.result_type(by_path[path])) != (
                jnp.shape(leaf), jnp.result_type(leaf)):
            problems.append(f"{path}: expected {_spec(leaf)}, the source has "
                            f"{_spec(by_path[path])}")
        else:
            result.append(by_path[path])
    if problems:
        raise ValueError(f"take: {len(problems)} of the parameters to take do not fit: "
                         + "; ".join(problems[:10]) + ("; ..." if len(problems) > 10 else ""))
    return jax.tree.unflatten(treedef, result)


def _spec(leaf: Any) -> str:
    return f"{jnp.result_type(leaf)}[{', '.join(map(str, jnp.shape(leaf)))}]"


NO_DECAY = ("b", "scale")  # fnn's names of biases and of norm scales (offsets are "b" too)


def decay_mask(params: Any) -> Any:
    """Where weight decay applies by the usual practice: every weight (Dense and attention
    weights, conv kernels, recurrent ``w_i``/``w_h``, embedding and position tables), not the
    biases and norm parameters: leaves named ``b`` or ``scale`` (:data:`NO_DECAY`), whatever
    their shape (an attention bias ``[heads, head_dim]``, a ``repeat``-stacked one
    ``[layers, features]``). Give it as the ``mask`` of ``optax.adamw`` (it is what ``fnn
    train`` configs use unless ``weight_decay_mask: all``)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    return jax.tree.unflatten(treedef, [leaf_path(p).rsplit("/", 1)[-1] not in NO_DECAY
                                        for p, _ in leaves])


def _frozen() -> optax.GradientTransformation:
    """Updates of ``-0.0`` and no state. ``-0.0`` rather than ``0.0``: ``p + (-0.0)`` is ``p``
    bit for bit for every ``p`` (``-0.0 + 0.0`` would be ``+0.0``)."""

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda g: jnp.full_like(g, -0.0), updates), state

    return optax.GradientTransformation(init, update)


FROZEN = "frozen"
DEFAULT = "default"


class ParamGroups(optax.GradientTransformationExtraArgs):
    """An optax optimizer over parameter groups (see :func:`param_groups`). Its ``frozen``
    attribute (patterns) tells fnn's train step which gradients it need not compute."""

    # the patterns, set by param_groups on each instance; a copy made by _replace has none,
    # and its step then computes the frozen leaves' (zero) updates like any optax chain's
    frozen: tuple[str, ...] = ()

    def frozen_mask(self, params: Any) -> Any:
        """The bool tree of the frozen leaves of ``params`` (None when nothing is frozen)."""
        return select(params, self.frozen, what="param_groups (frozen)") if self.frozen \
            else None


def labels(params: Any, *, frozen: Patterns = (), groups: Iterable[Patterns] = ()) -> Any:
    """The label of each leaf of ``params``: ``"frozen"``, ``"group<i>"`` for the first group
    whose patterns match it, or ``"default"``. Raises on a pattern that matches nothing and on
    a leaf that two groups claim (a frozen leaf is frozen whatever group it is in)."""
    paths = leaf_paths(params)
    frozen_mask = jax.tree.leaves(select(params, frozen, what="param_groups (frozen)")) \
        if _as_list(frozen) else [False] * len(paths)
    chosen = [DEFAULT] * len(paths)
    for index, patterns in enumerate(groups):
        mask = jax.tree.leaves(select(params, patterns, what=f"param_groups (group {index})"))
        for i, (hit, path) in enumerate(zip(mask, paths)):
            if hit and chosen[i] != DEFAULT:
                raise ValueError(f"param_groups: {path} is in group {chosen[i][len('group'):]} "
                                 f"and in group {index}; give each parameter one group")
            if hit:
                chosen[i] = f"group{index}"
    chosen = [FROZEN if f else c for f, c in zip(frozen_mask, chosen)]
    return jax.tree.unflatten(jax.tree.structure(params), chosen)


def param_groups(default: optax.GradientTransformation, *, frozen: Patterns = (),
                 groups: Mapping[str | tuple[str, ...], optax.GradientTransformation]
                 | Sequence[tuple[Patterns, optax.GradientTransformation]] = ()
                 ) -> ParamGroups:
    """``default`` for every parameter, except the ``frozen`` ones (no update, no optimizer
    state) and those of ``groups`` (patterns to optimizers: another learning rate, no weight
    decay, another optimizer altogether), each group with optimizer state of its own.

    >>> import jax.numpy as jnp, optax
    >>> params = {"trunk": {"w": jnp.ones((2, 2)), "b": jnp.ones(2)},
    ...           "head": {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}}
    >>> opt = param_groups(optax.sgd(0.1), frozen="trunk/**", groups={"head/b": optax.sgd(1.0)})
    >>> updates, _ = opt.update(jax.tree.map(jnp.ones_like, params), opt.init(params), params)
    >>> [round(float(updates[k][n].ravel()[0]), 6) for k, n in
    ...  (("trunk", "w"), ("head", "w"), ("head", "b"))]
    [-0.0, -0.1, -1.0]
    """
    items = list(groups.items()) if isinstance(groups, Mapping) else list(groups)
    for item in items:
        if not (isinstance(item, tuple) and len(item) == 2 and hasattr(item[1], "update")):
            raise TypeError(f"param_groups: groups maps patterns to optax optimizers, got "
                            f"{item!r}")
    frozen = tuple(_as_list(frozen))
    group_patterns = [_as_list(patterns) for patterns, _ in items]
    transforms = {DEFAULT: default, FROZEN: _frozen()}
    transforms |= {f"group{i}": optimizer for i, (_, optimizer) in enumerate(items)}
    inner = optax.multi_transform(
        transforms, lambda params: labels(params, frozen=frozen, groups=group_patterns))
    result = ParamGroups(inner.init, inner.update)
    result.frozen = frozen
    return result


def frozen_mask(optimizer: Any, params: Any) -> Any:
    """The frozen leaves of ``params`` under ``optimizer`` (a bool tree), or None when the
    optimizer freezes nothing that the train step can see."""
    return optimizer.frozen_mask(params) if isinstance(optimizer, ParamGroups) else None


def frozen_state_mask(optimizer: Any, state: Any) -> Any:
    """The leaves of the model ``state`` at frozen paths (a BatchNorm's running statistics in
    a frozen trunk), or None: the train step keeps them as they are."""
    if not isinstance(optimizer, ParamGroups) or not optimizer.frozen:
        return None
    return select(state, optimizer.frozen, strict=False)
