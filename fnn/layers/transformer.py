"""Pre-norm transformer blocks: an encoder block and a decoder block (with optional
cross-attention), and the decode-mode state of a stack of them.

Layout: sequences are ``[..., time, features]`` with any number of leading batch axes (none
included), as in :mod:`fnn.layers.attention`, or a :class:`~fnn.core.Seq` of them with masks,
lengths, positions and a memory. Blocks keep the input's shape, so a stack of them is
``fnn.combinators.repeat(EncoderBlock(...), num_layers)`` (one ``lax.scan`` over stacked params,
compile time flat in depth).

Both blocks are pre-norm by default (GPT-2, LLaMA, ``norm_first=True`` in PyTorch)::

    x = x + drop(attention(norm1(x)))
    x = x + drop(cross_attention(cross_norm(x), memory))     # DecoderBlock(cross=True) only
    x = x + drop(ffn(norm2(x)))

and post-norm with ``norm_first=False`` (the original Transformer, BERT, PyTorch's default)::

    x = norm1(x + drop(attention(x)))
    x = cross_norm(x + drop(cross_attention(x, memory)))     # DecoderBlock(cross=True) only
    x = norm2(x + drop(ffn(x)))

Params are nested under the sublayer names: ``{"norm1", "attention", ["cross_norm",
"cross_attention",] "norm2", "ffn"}``; the residual dropouts (``drop1``, ``cross_drop``,
``drop2``) have none. Cached decoding keeps the self-attention's key/value cache in
``state["attention"]["cache"]`` (see :func:`init_block_cache`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from fnn.core import (Children, Layer, LayerError, Seq, array_of, as_spec, check_floating,
                      check_positive, check_rate, describe, map_array, require_key, shape_error,
                      where)
from fnn.layers.attention import MultiHeadAttention, init_cache
from fnn.layers.dropout import Dropout
from fnn.layers.feedforward import FeedForward
from fnn.layers.norm import LayerNorm, RMSNorm

_NORMS = {"layer": LayerNorm, "rms": RMSNorm}


def make_norm(owner: str, norm: str, epsilon: float | None = None) -> Layer:
    """The norm called ``norm`` (``"layer"`` or ``"rms"``), with ``epsilon`` unless ``None``
    (its own default)."""
    if norm not in _NORMS:
        raise ValueError(f"{owner}: norm must be one of {sorted(_NORMS)}, got {norm!r}")
    return _NORMS[norm]() if epsilon is None else _NORMS[norm](epsilon=epsilon)


def _block(name: str, num_heads: int, hidden_features: int, *, cross: bool, causal: bool,
           num_kv_heads, dropout, attention_dropout, activation, norm, norm_epsilon, rope,
           alibi, window, use_bias, implementation, norm_first) -> Layer:
    """The block behind :func:`EncoderBlock` and :func:`DecoderBlock`."""
    check_positive(name, num_heads=num_heads, hidden_features=hidden_features)
    check_rate(name, "dropout", dropout)
    check_rate(name, "attention_dropout", attention_dropout)
    if not isinstance(norm_first, bool):
        raise TypeError(f"{name}: norm_first must be True or False, got {norm_first!r}")
    mha = dict(num_kv_heads=num_kv_heads, use_bias=use_bias, dropout=attention_dropout,
               implementation=implementation)
    # (norm, body, residual dropout) of each residual branch, in order
    branches = [("norm1", "attention", "drop1")] + (
        [("cross_norm", "cross_attention", "cross_drop")] if cross else []) + [
        ("norm2", "ffn", "drop2")]
    layers = {
        "norm1": make_norm(name, norm, norm_epsilon),
        "attention": MultiHeadAttention(num_heads, causal=causal, rope=rope, alibi=alibi,
                                        window=window, **mha),
        "drop1": Dropout(dropout)}
    if cross:
        layers |= {"cross_norm": make_norm(name, norm, norm_epsilon),
                   "cross_attention": MultiHeadAttention(num_heads, cross=True, **mha),
                   "cross_drop": Dropout(dropout)}
    layers |= {"norm2": make_norm(name, norm, norm_epsilon),
               "ffn": FeedForward(hidden_features, activation=activation, dropout=dropout,
                                  use_bias=use_bias),
               "drop2": Dropout(dropout)}
    parts = Children(name, layers)

    def check(x):
        h = array_of(x)
        if not hasattr(h, "ndim") or h.ndim < 2:
            raise shape_error(name, "[..., time, features]", x)
        check_floating(name, h, "[..., time, features]")
        if cross and (not isinstance(x, Seq) or x.memory is None):
            raise LayerError(f"{where(name)}: a block with cross=True attends to a memory: call "
                             f"it on Seq(x, memory=...), got {describe(x)}")

    def init(key, x):
        check(x)
        child = parts.initializer(key)
        for norm_name, body, drop in branches:  # each branch's input is shaped like x
            child(drop, child(body, child(norm_name, as_spec(x))))
        return child.params, child.state

    def apply(params, state, x, *, key=None, train=False):
        check(x)
        if train and (dropout > 0.0 or attention_dropout > 0.0):
            require_key(name, key)
        child = parts.runner(params, state, key, train)
        h = array_of(x)
        for norm_name, body, drop in branches:  # side inputs kept
            if norm_first:  # h + drop(body(norm(h)))
                y = child(drop, child(body, child(norm_name, map_array(x, lambda _: h))))
                h = h + array_of(y).astype(h.dtype)
            else:  # norm(h + drop(body(h)))
                y = child(drop, child(body, map_array(x, lambda _: h)))
                total = h + array_of(y).astype(h.dtype)
                h = array_of(child(norm_name, map_array(x, lambda _: total)))
        return map_array(x, lambda _: h), child.state

    return Layer(init, apply, name)


def EncoderBlock(num_heads: int, hidden_features: int, *, num_kv_heads: int | None = None,
                 dropout: float = 0.0, attention_dropout: float = 0.0,
                 activation: str | Layer = "gelu", norm: str = "layer",
                 norm_epsilon: float | None = None, rope: bool = False, alibi: bool = False,
                 window: int | tuple[int, int] | None = None, causal: bool = False,
                 use_bias: bool = True, implementation: str | None = None,
                 norm_first: bool = True) -> Layer:
    """A transformer encoder block, pre-norm (``norm_first=False``: post-norm, see the
    module's docs)::

        x = x + drop(attention(norm1(x)))
        x = x + drop(ffn(norm2(x)))

    Shapes: ``x: [..., time, features] -> [..., time, features]``, or a ``Seq`` of it (returned
    as a ``Seq``) whose ``mask``, ``bias``, ``lengths`` and ``positions`` go to the
    self-attention: padded keys are ignored and padded rows get no attention (they keep
    ``x + ffn(...)``).

    Params ``{"norm1": {"scale", "b"}, "attention": MultiHeadAttention's, "norm2": ...,
    "ffn": FeedForward's}`` (RMSNorm has only ``"scale"``).

    - ``num_heads``, ``num_kv_heads`` (grouped-query), ``rope``, ``alibi``, ``window``,
      ``causal``, ``implementation``: as :func:`~fnn.layers.attention.MultiHeadAttention`;
      ``attention_dropout`` is its dropout on the attention weights.
    - ``hidden_features``, ``activation`` (``"gelu"``, ``"gelu_tanh"``, ``"swiglu"``, ...): the
      :func:`~fnn.layers.feedforward.FeedForward`'s.
    - ``dropout``: on both residual branches and on the feed-forward's hidden units (as in
      PyTorch's ``TransformerEncoderLayer``); needs ``key=`` when ``train=True``.
    - ``norm``: ``"layer"`` (LayerNorm) or ``"rms"`` (RMSNorm); ``norm_epsilon`` its epsilon
      (default: the norm's own, 1e-5 and 1e-6).
    - ``use_bias``: biases in the attention projections and the feed-forward layers.
    - ``norm_first``: pre-norm (``True``) or post-norm (``False``), as PyTorch's
      ``TransformerEncoderLayer(norm_first=...)``.

    With ``causal=True`` the block can decode incrementally like :func:`DecoderBlock` (state
    from :func:`init_block_cache`).

    >>> import jax, jax.numpy as jnp
    >>> block = EncoderBlock(2, 32)
    >>> params, state = block.init(jax.random.key(0), jnp.zeros((2, 5, 8)))
    >>> sorted(params)
    ['attention', 'ffn', 'norm1', 'norm2']
    >>> block.apply(params, state, jnp.ones((2, 5, 8)))[0].shape
    (2, 5, 8)
    """
    return _block("EncoderBlock", num_heads, hidden_features, cross=False, causal=causal,
                  num_kv_heads=num_kv_heads, dropout=dropout,
                  attention_dropout=attention_dropout, activation=activation, norm=norm,
                  norm_epsilon=norm_epsilon, rope=rope, alibi=alibi, window=window,
                  use_bias=use_bias, implementation=implementation,
                  norm_first=norm_first)


def DecoderBlock(num_heads: int, hidden_features: int, *, cross: bool = False,
                 num_kv_heads: int | None = None, dropout: float = 0.0,
                 attention_dropout: float = 0.0, activation: str | Layer = "gelu",
                 norm: str = "layer", norm_epsilon: float | None = None, rope: bool = False,
                 alibi: bool = False, window: int | tuple[int, int] | None = None,
                 use_bias: bool = True, implementation: str | None = None,
                 norm_first: bool = True) -> Layer:
    """A transformer decoder block (pre-norm; ``norm_first=False``: post-norm): causal
    self-attention, cross-attention to a memory (with ``cross=True``), and a feed-forward
    network::

        x = x + drop(attention(norm1(x)))                    # causal
        x = x + drop(cross_attention(cross_norm(x), memory))  # cross=True only
        x = x + drop(ffn(norm2(x)))

    Shapes: ``x: [..., time, features] -> [..., time, features]``, or a ``Seq`` of it; with
    ``cross=True`` a ``Seq(x, memory=[..., memory_time, memory_features], memory_mask=...,
    memory_lengths=...)``. The ``Seq``'s ``mask``, ``bias``, ``lengths`` and ``positions`` go to
    the self-attention (combined with the causal mask), the memory's fields to the
    cross-attention.

    Params ``{"norm1", "attention", "cross_norm", "cross_attention", "norm2", "ffn"}`` (the
    cross entries only with ``cross=True``; without them a ``DecoderBlock`` has the params of an
    ``EncoderBlock(causal=True)``). RoPE, ALiBi and the window apply to the self-attention.
    Other arguments as :func:`EncoderBlock`.

    Decode mode: with ``state = init_block_cache(params, batch_shape, max_length)`` (the
    self-attention's key/value cache, ``{"attention": {"cache": ...}}``), ``apply`` on the next
    tokens ``x: [*batch_shape, new, features]`` attends to every token decoded so far and
    returns the updated cache; decoding token by token equals the full causal pass.
    Cross-attention is recomputed from ``memory`` at every step (it has no cache).

    >>> import jax, jax.numpy as jnp
    >>> from fnn.core import Seq
    >>> block = DecoderBlock(2, 32, cross=True)
    >>> x = Seq(jnp.ones((2, 5, 8)), memory=jnp.ones((2, 7, 6)))
    >>> params, state = block.init(jax.random.key(0), x)
    >>> sorted(params)
    ['attention', 'cross_attention', 'cross_norm', 'ffn', 'norm1', 'norm2']
    >>> block.apply(params, state, x)[0].x.shape
    (2, 5, 8)
    """
    return _block("DecoderBlock", num_heads, hidden_features, cross=cross, causal=True,
                  num_kv_heads=num_kv_heads, dropout=dropout,
                  attention_dropout=attention_dropout, activation=activation, norm=norm,
                  norm_epsilon=norm_epsilon, rope=rope, alibi=alibi, window=window,
                  use_bias=use_bias, implementation=implementation,
                  norm_first=norm_first)


def init_block_cache(params: dict[str, Any], batch_shape: int | tuple[int, ...],
                     max_length: int, dtype: Any = jnp.float32) -> dict[str, Any]:
    """The decode-mode state of a :func:`DecoderBlock` (or causal :func:`EncoderBlock`):
    ``{"attention": {"cache": init_cache(params["attention"], batch_shape, max_length,
    dtype)}}``.

    Also takes the params of ``repeat(block, num)`` (``{"layers": stacked}``) and then returns
    ``{"layers": {"attention": {"cache": ...}}}`` with every cache entry stacked ``[num, ...]``
    (one cache per copy), the state ``repeat`` threads through its copies::

        state = init_block_cache(params, batch_shape, max_length)
        y, state = model.apply(params, state, x_new)   # x_new: [*batch_shape, new, features]
    """
    if "layers" in params and "attention" not in params:
        stacked = jax.vmap(lambda p: init_block_cache(p, batch_shape, max_length, dtype))(
            params["layers"])
        return {"layers": stacked}
    if "attention" not in params:
        raise LayerError(f"init_block_cache: expected the params of a DecoderBlock or "
                         f"EncoderBlock (with an 'attention' entry) or of a repeat of them, got "
                         f"entries {sorted(params)}")
    return {"attention": {"cache": init_cache(params["attention"], batch_shape, max_length,
                                              dtype)}}
