"""LoRA: low-rank adapters (Hu et al. 2021, https://arxiv.org/abs/2106.09685) on a model's Dense
layers and attention projections, for fine-tuning a small fraction of the parameters.

Each adapted weight ``w`` of a matmul ``[in] -> [out]`` gets two leaves next to it, ``lora_a:
[in, rank]`` (random) and ``lora_b: [rank, out]`` (zeros), and the model runs with
``w + (alpha / rank) * lora_a @ lora_b`` in its place. Only the adapters are trained; the base
stays bit-identical, and :func:`merge_lora` folds the adapters back into plain params of the
base model (no cost at inference)::

    adapted = lora(model, "**/attention/*", rank=8)
    params, state = adapted.init(key, x)
    params = take(params, pretrained, lora_frozen(params))   # the trained base (fnn.train.take)
    optimizer = param_groups(optax.adam(1e-3), frozen=lora_frozen(params))
    ts, history = fit(adapted, optimizer, data, loss, params=params, state=state, ...)
    y, _ = model.apply(merge_lora(ts.params, alpha=None), state, x)      # the base model, adapted

``lora_frozen(params)`` are the paths of every leaf but the adapters; ``lora_frozen(params,
trainable="head/**")`` leaves a new head trainable too.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax.nn import initializers

from fnn.core import (Initializer, Layer, LayerError, ParamError, Params, as_spec,
                      at_least_float32, check_positive, check_train, current_path, describe,
                      unobserved, where)
from fnn.inspection import record_layers
from fnn.train.groups import leaf_paths, matches, select

ADAPTERS = ("lora_a", "lora_b")  # the names of the adapter leaves, next to the adapted "w"
_ADAPTER_STREAM = 0x4c6f5241  # fold_in constant: the adapters' keys, apart from the base's
# the projections of a MultiHeadAttention, each with the number of its w's leading axes that
# are the matmul's input: query/key/value w [in, heads, head_dim], out w [heads, head_dim, out]
_ATTENTION = {"query": 1, "key": 1, "value": 1, "out": 2}


class _Projection(NamedTuple):
    """A weight LoRA can adapt."""

    path: str  # of the dict that holds its "w", e.g. "blocks/layers/attention/query"
    in_axes: int  # how many of w's own axes are the matmul's input (the rest are its output)
    ndim: int  # w's own axes (2 for Dense, 3 for attention); more are repeat's stack


def _join(path: str, name: str) -> str:
    return f"{path}/{name}" if path else name


def _entry(tree: Any, path: str) -> Any:
    """The subtree of ``tree`` at ``path`` (``""`` is the top), or ``None``."""
    for part in path.split("/") if path else ():
        if not isinstance(tree, Mapping) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _updated(tree: Params, path: str, entry: Params) -> Params:
    """``tree`` with the dict at ``path`` replaced by ``entry`` (the dicts above it copied)."""
    if not path:
        return entry
    head, _, rest = path.partition("/")
    return {**tree, head: _updated(tree[head], rest, entry)}


def _projections(layer_name: str, path: str) -> list[_Projection]:
    if layer_name == "Dense":
        return [_Projection(path, 1, 2)]
    if layer_name == "MultiHeadAttention":
        return [_Projection(_join(path, name), n, 3) for name, n in _ATTENTION.items()]
    return []


def _found(model: Layer, params: Params, state: Any, x: Any, key: Any,
           train: bool) -> list[_Projection]:
    """Every Dense and attention projection ``model`` applies, in call order, with paths
    relative to the model: the layer calls recorded while tracing its apply on specs (no
    FLOPs; unseen by a summary or capture around this one)."""
    def apply(p, s, x, k):
        return model.apply(p, s, x, key=k, train=train)

    with unobserved(), record_layers() as rows:
        jax.eval_shape(apply, as_spec(params), as_spec(state), as_spec(x), as_spec(key))
    prefix = current_path()  # where this model sits in an outer one
    found = _projections(model.name, "") + [
        p for row in rows
        for p in _projections(row.name, row.path[len(prefix) + 1:] if prefix else row.path)]
    # once each (a layer applied twice), and only weights that are there as the layer made them
    return list({p.path: p for p in found if _has_weight(params, p)}.values())


def _has_weight(params: Params, p: _Projection) -> bool:
    entry = _entry(params, p.path)
    return isinstance(entry, Mapping) and jnp.ndim(entry.get("w")) >= p.ndim


def _hits(pattern: str, path: str) -> bool:
    """A target pattern matches a projection's path or its weight's (``head`` or ``head/w``)."""
    return matches(pattern, path) or matches(pattern, _join(path, "w"))


def _targeted(owner: str, found: list[_Projection], targets: list[str]) -> list[_Projection]:
    paths = [p.path or "(the model itself)" for p in found]
    for pattern in targets:
        if not any(_hits(pattern, p.path) for p in found):
            raise LayerError(f"{where(owner)}: the target pattern {pattern!r} matches no Dense "
                             f"or MultiHeadAttention weight; the model's are "
                             f"{', '.join(paths) or 'none'}")
    return [p for p in found if any(_hits(pattern, p.path) for pattern in targets)]


def _adapter_shapes(w_shape: tuple[int, ...], p: _Projection, rank: int
                    ) -> dict[str, tuple[int, ...]]:
    """``lora_a: [*stack, in, rank]``, ``lora_b: [*stack, rank, out]`` for ``w: [*stack,
    *in_axes, *out_axes]``, ``in``/``out`` the products of the input/output axes."""
    stack, own = w_shape[:len(w_shape) - p.ndim], w_shape[len(w_shape) - p.ndim:]
    n_in, n_out = math.prod(own[:p.in_axes]), math.prod(own[p.in_axes:])
    return {"lora_a": stack + (n_in, rank), "lora_b": stack + (rank, n_out)}


def _init_adapters(key: jax.Array, w: Any, p: _Projection, rank: int,
                   a_init: Initializer) -> Params:
    shapes = _adapter_shapes(w.shape, p, rank)
    stack = shapes["lora_a"][:-2]
    # one 2-D call per stacked copy, so that fan-in initialisers see the true fan-in
    keys = jax.random.split(key, math.prod(stack))
    a = jax.vmap(lambda k: a_init(k, shapes["lora_a"][-2:], w.dtype))(keys)
    return {"lora_a": a.reshape(shapes["lora_a"]), "lora_b": jnp.zeros(shapes["lora_b"], w.dtype)}


def _adapter_paths(tree: Any, path: str = "") -> list[str]:
    """The paths of the dicts in ``tree`` that hold an adapter leaf."""
    if not isinstance(tree, Mapping):
        return []
    if any(name in tree for name in ADAPTERS):
        return [path]
    return [found for k, v in tree.items() for found in _adapter_paths(v, _join(path, str(k)))]


def _check_adapters(owner: str, params: Params, targets: list[_Projection], rank: int) -> None:
    """Each target holds adapters of the shapes this model makes, and nothing else does."""
    for p in targets:
        entry = _entry(params, p.path)
        want = _adapter_shapes(jnp.shape(entry["w"]), p, rank)
        if any(n not in entry or jnp.shape(entry[n]) != want[n] for n in ADAPTERS):
            got = ", ".join(f"{n} {describe(entry[n]) if n in entry else 'missing'}"
                            for n in ADAPTERS)
            raise ParamError(
                f"{where(owner)}: expected params at {p.path or 'the top'} to hold lora_a "
                f"{list(want['lora_a'])} and lora_b {list(want['lora_b'])} next to w "
                f"{describe(entry['w'])}, got {got}; params without adapters are the base "
                f"model's (give them to it), this model's come from its init")
    extra = [path for path in _adapter_paths(params) if path not in {p.path for p in targets}]
    if extra:
        raise ParamError(f"{where(owner)}: unexpected adapters at {', '.join(extra)}; this "
                         f"model adapts {', '.join(p.path for p in targets)}")


def _strip(tree: Any) -> Any:
    """``tree`` without its adapter leaves (their shapes say nothing about the base)."""
    if not isinstance(tree, Mapping):
        return tree
    return {k: _strip(v) for k, v in tree.items() if k not in ADAPTERS}


def _as_patterns(targets: Any) -> list[str]:
    listed = [targets] if isinstance(targets, str) else (
        list(targets) if isinstance(targets, (list, tuple)) else [])
    if not listed or not all(isinstance(t, str) and t and not t.startswith("/") for t in listed):
        raise ValueError(f"lora: targets are path patterns like '**' or '**/attention/*' (a "
                         f"string or a list of them), got {targets!r}")
    return listed


def lora(model: Layer, targets: str | Sequence[str] = "**", *, rank: int = 8,
         alpha: float | None = None,
         a_init: Initializer = initializers.lecun_normal()) -> Layer:
    """``model`` with low-rank adapters on its Dense layers and attention projections whose
    path matches ``targets``.

    ``init`` runs ``model.init`` (with the same key: the base params are the model's own) and
    adds, next to each targeted ``w: [*stack, *in_axes, *out_axes]``, the leaves ``lora_a:
    [*stack, in, rank]`` (``a_init``, LeCun-normal by default: variance ``1 / in``) and
    ``lora_b: [*stack, rank, out]`` (zeros: the adapted model starts exactly as the base), in
    ``w``'s dtype. ``in``/``out`` are the matmul's sizes: Dense ``w: [in, out]``; attention
    query/key/value ``w: [in, heads, head_dim]`` (``out = heads * head_dim``) and out ``w:
    [heads, head_dim, out]`` (``in = heads * head_dim``); ``*stack`` the leading axes of
    ``repeat``-stacked blocks. ``apply`` runs ``model.apply`` with every adapted ``w`` replaced
    by ``w + (alpha / rank) * (lora_a @ lora_b).reshape(w.shape)`` (in ``w``'s dtype); state,
    key, ``train`` and ``Seq`` inputs pass through, and the output and state are the model's.

    - ``targets``: patterns (one or a list) in the syntax of :mod:`fnn.train.groups`, matched
      against each projection's path in the params (``"head"``, ``"blocks/layers/ffn/up"``,
      ``"blocks/layers/attention/query"``) or its weight's (``"head/w"``): ``"**"`` adapts
      everything, ``"**/attention/*"`` the attention projections, ``"blocks/**/ffn/up"`` one
      feed-forward matmul. The layers are found by tracing the model's apply on specs and
      recording its child calls (:func:`fnn.record_layers`), so only layers applied as children
      of fnn's combinators or ``Children`` count (a ``remat``-wrapped Dense does not). A pattern
      that matches none is an error listing those there are.
    - ``rank``: the adapters' inner size; ``alpha``: the scale's numerator, default ``rank``
      (scale 1). Give the same ``alpha`` to :func:`merge_lora`.

    >>> import jax, jax.numpy as jnp, fnn
    >>> model = fnn.serial(fnn.Dense(16), fnn.Relu(), head=fnn.Dense(3))
    >>> adapted = lora(model, "head", rank=2)
    >>> params, state = adapted.init(jax.random.key(0), jnp.zeros((1, 8)))
    >>> jax.tree.map(jnp.shape, params)  # doctest: +NORMALIZE_WHITESPACE
    {'0': {'b': (16,), 'w': (8, 16)},
     'head': {'b': (3,), 'lora_a': (16, 2), 'lora_b': (2, 3), 'w': (16, 3)}}
    >>> x = jnp.ones((1, 8))
    >>> y, _ = adapted.apply(params, state, x)
    >>> bool((y == model.apply(merge_lora(params, alpha=None), state, x)[0]).all())
    True
    """
    if not isinstance(model, Layer):
        raise TypeError(f"lora: model must be a Layer (built by a factory such as Dense(10)), "
                        f"got {type(model).__name__}")
    patterns = _as_patterns(targets)
    check_positive("lora", rank=rank)
    if alpha is not None and (not isinstance(alpha, (int, float)) or isinstance(alpha, bool)
                              or not alpha > 0):
        raise ValueError(f"lora: alpha must be a positive number (the scale is alpha / rank) or "
                         f"None (alpha = rank, scale 1), got {alpha!r}")
    if not callable(a_init):
        raise TypeError(f"lora: a_init must be a jax.nn.initializers function, got {a_init!r}")
    name = f"LoRA({model.name})"

    def init(key, x):
        params, state = model.init(key, x)
        targeted = _targeted(name, _found(model, params, state, x, None, False), patterns)
        adapter_key = jax.random.fold_in(key, _ADAPTER_STREAM)
        for i, p in enumerate(targeted):
            entry = _entry(params, p.path)
            adapters = _init_adapters(jax.random.fold_in(adapter_key, i), entry["w"], p, rank,
                                      a_init)
            params = _updated(params, p.path, {**entry, **adapters})
        return params, state

    def apply(params, state, x, *, key=None, train=False):
        check_train(train)
        found = _found(model, _strip(params), state, x, key, train)
        _check_adapters(name, params, _targeted(name, found, patterns), rank)
        return model.apply(merge_lora(params, alpha=alpha), state, x, key=key, train=train)

    return Layer(init, apply, name)


def _splits(own: tuple[int, ...], n_in: int, n_out: int) -> bool:
    """Whether some leading axes of ``own`` hold ``n_in`` elements and the rest ``n_out``."""
    return any(math.prod(own[:k]) == n_in and math.prod(own[k:]) == n_out
               for k in range(len(own) + 1))


def _merge_entry(entry: Mapping[str, Any], alpha: float | None, path: str) -> Params:
    where_ = path or "the top"
    missing = [n for n in ("w",) + ADAPTERS if n not in entry]
    if missing:
        raise ParamError(f"merge_lora: params at {where_} hold "
                         f"{', '.join(n for n in ADAPTERS if n in entry)} but no "
                         f"{', '.join(missing)} (expected w, lora_a and lora_b together)")
    w, a, b = entry["w"], entry["lora_a"], entry["lora_b"]
    stack = jnp.shape(a)[:-2]
    if not (jnp.ndim(a) >= 2 and jnp.shape(b)[:-2] == stack and jnp.ndim(b) == jnp.ndim(a)
            and jnp.shape(w)[:len(stack)] == stack and a.shape[-1] == b.shape[-2]
            and _splits(jnp.shape(w)[len(stack):], a.shape[-2], b.shape[-1])):
        raise ParamError(f"merge_lora: params at {where_}: expected lora_a [*stack, in, rank] "
                         f"and lora_b [*stack, rank, out] for w [*stack, *in_axes, *out_axes] "
                         f"(in, out: the sizes of w's input and output axes), got w "
                         f"{describe(w)}, lora_a {describe(a)}, lora_b {describe(b)}")
    dt = at_least_float32(w.dtype)
    scale = 1.0 if alpha is None else alpha / a.shape[-1]
    delta = jnp.matmul(a.astype(dt), b.astype(dt)) * scale  # [*stack, in, out]
    rest = {k: v for k, v in entry.items() if k not in ADAPTERS}
    return rest | {"w": w + delta.reshape(w.shape).astype(w.dtype)}


def merge_lora(params: Params, *, alpha: float | None) -> Params:
    """The params of the base model with each adapter folded into its weight: every dict that
    holds ``w: [*stack, *in_axes, *out_axes]``, ``lora_a: [*stack, in, rank]`` and ``lora_b:
    [*stack, rank, out]`` gets ``w + (alpha / rank) * (lora_a @ lora_b).reshape(w.shape)`` (in
    ``w``'s dtype, computed in at least float32) and loses its adapters; the rest is kept as it
    is. The base model's ``apply`` on the result equals the LoRA model's on ``params``.

    ``alpha``: the one given to :func:`lora` (``None`` if it was left at its default, ``rank``,
    scale 1). It has no default, since the params do not hold it and a wrong scale would merge
    silently wrong weights. A pure function of arrays: it works under ``jax.jit``.

    >>> import jax.numpy as jnp
    >>> params = {"head": {"w": jnp.zeros((2, 3)), "b": jnp.zeros(3),
    ...                    "lora_a": jnp.ones((2, 1)), "lora_b": jnp.full((1, 3), 0.5)}}
    >>> merged = merge_lora(params, alpha=2.0)  # scale 2 / rank 1
    >>> sorted(merged["head"]), merged["head"]["w"].tolist()
    (['b', 'w'], [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    """
    def merged(tree: Any, path: str) -> Any:
        if not isinstance(tree, Mapping):
            return tree
        if any(name in tree for name in ADAPTERS):
            return _merge_entry(tree, alpha, path)
        return {k: merged(v, _join(path, str(k))) for k, v in tree.items()}

    return merged(params, "")


def lora_adapters(params: Params) -> Params:
    """Only the adapter leaves of ``params`` (``lora_a``, ``lora_b``), at their paths: what
    fine-tuning changes, to count (``fnn.param_count``) or to save on their own and put back
    with ``fnn.train.take(params, adapters, "**/lora_*")``.

    >>> import jax.numpy as jnp
    >>> lora_adapters({"head": {"w": jnp.zeros((4, 3)), "lora_a": jnp.zeros((4, 1)),
    ...                         "lora_b": jnp.zeros((1, 3))}, "embed": {"table": jnp.zeros(2)}})
    ... # doctest: +ELLIPSIS
    {'head': {'lora_a': Array(...), 'lora_b': Array(...)}}
    """
    if not isinstance(params, Mapping):
        return {}
    kept = {}
    for k, v in params.items():
        sub = v if k in ADAPTERS else lora_adapters(v)
        if k in ADAPTERS or sub:
            kept[k] = sub
    return kept


def lora_frozen(params: Params, trainable: str | Sequence[str] = ()) -> list[str]:
    """The path of every leaf of ``params`` but the adapters and those that a ``trainable``
    pattern matches: give it as ``param_groups(optimizer, frozen=lora_frozen(params))`` to
    train the adapters alone, ``lora_frozen(params, trainable="head/**")`` to train a new head
    too. Raises when ``params`` hold no adapters (the base model's params, say) or a
    ``trainable`` pattern matches nothing.

    >>> import jax.numpy as jnp
    >>> params = {"body": {"w": jnp.zeros((4, 4)), "lora_a": jnp.zeros((4, 1)),
    ...                    "lora_b": jnp.zeros((1, 4)), "b": jnp.zeros(4)},
    ...           "head": {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}}
    >>> lora_frozen(params)
    ['body/b', 'body/w', 'head/b', 'head/w']
    >>> lora_frozen(params, trainable="head/**")
    ['body/b', 'body/w']
    """
    paths = leaf_paths(params)
    adapter = [path.rsplit("/", 1)[-1] in ADAPTERS for path in paths]
    if not any(adapter):
        raise ValueError(f"lora_frozen: the params hold no adapters ({', '.join(ADAPTERS)}); "
                         f"expected the params of a lora(...) model, got leaves "
                         f"{', '.join(paths[:8]) or 'none'}{', ...' if len(paths) > 8 else ''}")
    kept = jax.tree.leaves(select(params, trainable, what="lora_frozen (trainable)"))
    return [path for path, a, k in zip(paths, adapter, kept) if not (a or k)]
