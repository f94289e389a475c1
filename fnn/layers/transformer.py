"""Transformer building blocks: feed-forward networks, pre-norm encoder and decoder blocks, and
position embeddings.

Layout: sequences are ``[..., time, features]`` with any number of leading batch axes (none
included), as in :mod:`fnn.layers.attention`. Blocks keep the input's shape, so a stack of them
is ``fnn.combinators.repeat(EncoderBlock(...), num_layers)`` (one ``lax.scan`` over stacked
params, compile time flat in depth).

Both blocks are pre-norm (GPT-2, LLaMA, ``norm_first=True`` in PyTorch)::

    x = x + drop(attention(norm1(x)))
    x = x + drop(cross_attention(cross_norm(x), memory))     # DecoderBlock(cross=True) only
    x = x + drop(ffn(norm2(x)))

Params are nested under the sublayer names: ``{"norm1", "attention", ["cross_norm",
"cross_attention",] "norm2", "ffn"}``. Each sublayer gets the key ``fold_in(key, position)``
(norm1 0, attention 1, norm2 2, ffn 3, the two residual dropouts 4 and 5, cross_norm 6,
cross_attention 7, its residual dropout 8). Cached decoding keeps the self-attention's
key/value cache in ``state["attention"]["cache"]`` (see :func:`init_block_cache`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.nn import initializers

from fnn.core import (Layer, LayerError, ShapeError, align, apply_child, as_spec, check_floating,
                      check_positive, check_rank, check_train, child_key, compute_dtype, describe,
                      init_child, put, require_key, shape_error, where)
from fnn.layers.activations import ACTIVATIONS
from fnn.layers.attention import AttentionInput, MultiHeadAttention, init_cache
from fnn.layers.dense import Dense
from fnn.layers.dropout import Dropout
from fnn.layers.norm import LayerNorm, RMSNorm

Initializer = jax.nn.initializers.Initializer

# Gated feed-forward variants (Shazeer, "GLU Variants Improve Transformer", 2020): the gate's
# activation.
_GATED = {"swiglu": jax.nn.silu, "geglu": lambda v: jax.nn.gelu(v, approximate=False),
          "reglu": jax.nn.relu}
_NORMS = {"layer": LayerNorm, "rms": RMSNorm}


def _check_rate(name: str, arg: str, rate: Any) -> None:
    if not isinstance(rate, (int, float)) or isinstance(rate, bool) or not 0.0 <= rate < 1.0:
        raise ValueError(f"{name}: {arg} is a drop probability and must be in [0, 1), "
                         f"got {rate!r}")


# ----------------------------------------------------------------------------- feed-forward

def FeedForward(hidden_features: int, *, activation: str | Layer = "gelu", dropout: float = 0.0,
                out_features: int | None = None, use_bias: bool = True,
                w_init: Initializer = initializers.lecun_normal(),
                b_init: Initializer = initializers.zeros,
                param_dtype: Any = jnp.float32, dtype: Any = None) -> Layer:
    """The position-wise feed-forward network of a transformer.
    ``x: [..., features] -> [..., out_features]`` (``out_features`` defaults to ``features``).

    - Plain (``activation`` a name of ``fnn.layers.ACTIVATIONS``, e.g. ``"gelu"`` (exact erf
      GELU) or ``"relu"``, or any activation ``Layer``):
      ``down(drop(act(up(x))))``; params ``{"up": {"w": [features, hidden], "b"},
      "down": {"w": [hidden, out], "b"}}``.
    - Gated (``"swiglu"``, ``"geglu"``, ``"reglu"``; LLaMA's is SwiGLU):
      ``down(drop(act(gate(x)) * up(x)))`` with ``act`` silu, exact gelu or relu; params
      ``{"gate": {"w": [features, hidden], "b"}, "up": same, "down": {"w": [hidden, out],
      "b"}}``.

    ``"b"`` entries only with ``use_bias``. ``dropout`` drops hidden units in training (needs
    ``key=``). ``w_init``, ``b_init``, ``param_dtype`` and ``dtype`` are passed to each
    :func:`~fnn.layers.dense.Dense`.

    >>> import jax, jax.numpy as jnp
    >>> ffn = FeedForward(16, activation="swiglu", use_bias=False)
    >>> params, _ = ffn.init(jax.random.key(0), jnp.zeros((2, 5, 8)))
    >>> jax.tree.map(jnp.shape, params)
    {'down': {'w': (16, 8)}, 'gate': {'w': (8, 16)}, 'up': {'w': (8, 16)}}
    """
    name = "FeedForward"
    check_positive(name, hidden_features=hidden_features)
    if out_features is not None:
        check_positive(name, out_features=out_features)
    _check_rate(name, "dropout", dropout)
    gated = isinstance(activation, str) and activation in _GATED
    if isinstance(activation, Layer):
        act_layer = activation
    elif gated:
        act_layer = None
    elif isinstance(activation, str) and activation in ACTIVATIONS:
        act_layer = ACTIVATIONS[activation]()
    else:
        raise ValueError(f"{name}: unknown activation {activation!r}; expected one of "
                         f"{sorted(ACTIVATIONS) + sorted(_GATED)} or an activation Layer")
    dense = dict(use_bias=use_bias, w_init=w_init, b_init=b_init, param_dtype=param_dtype,
                 dtype=dtype)
    up = Dense(hidden_features, **dense)
    drop = Dropout(dropout)

    def down(features):
        return Dense(features if out_features is None else out_features, **dense)

    def init(key, x):
        check_rank(name, x, 1, "[..., features]")
        params = {}
        if gated:
            params["gate"], _, _ = init_child("gate", up, jax.random.fold_in(key, 2), x)
        params["up"], _, h = init_child("up", up, jax.random.fold_in(key, 0), x)
        params["down"], _, _ = init_child("down", down(x.shape[-1]), jax.random.fold_in(key, 1),
                                          h)
        return params, {}

    def apply(params, state, x, *, key=None, train=False):
        check_train(train)
        check_rank(name, x, 1, "[..., features]")
        h, _ = apply_child("up", up, params, {}, x, key=None, train=train)
        if gated:
            g, _ = apply_child("gate", up, params, {}, x, key=None, train=train)
            h = _GATED[activation](g) * h
        else:
            h, _ = act_layer.apply({}, {}, h, key=None, train=train)
        if train and dropout > 0.0:
            h, _ = drop.apply({}, {}, h, key=require_key(name, key), train=train)
        y, _ = apply_child("down", down(params["down"]["w"].shape[1]), params, {}, h, key=None,
                           train=train)
        return y, state

    return Layer(init, apply, name)


# ----------------------------------------------------------------------------- blocks

class DecoderInput(NamedTuple):
    """The input of :func:`DecoderBlock` with cross-attention, masks, lengths or positions.

    A plain array ``x`` is ``DecoderInput(x)``; a tuple ``(x, memory)`` is
    ``DecoderInput(x, memory)``.

    - ``x``: ``[..., time, features]``, the sequence being decoded.
    - ``memory``: ``[..., memory_time, memory_features]``, what cross-attention attends to (the
      encoder's output); needed exactly when the block has ``cross=True``.
    - ``mask``: bool, broadcastable to ``[..., heads, time, time]`` (``[..., heads, time,
      max_length]`` in decode mode); ``True`` = may attend. Combined with the causal mask.
    - ``memory_mask``: bool, broadcastable to ``[..., heads, time, memory_time]``.
    - ``lengths``: int, broadcastable to ``[...]``: rows of ``x`` at or past it are right
      padding (their attention results are zero; causality keeps valid rows from seeing them).
    - ``memory_lengths``: int, broadcastable to ``[...]``: memory positions at or past it are
      ignored by cross-attention.
    - ``positions``: int, broadcastable to ``[..., time]``: the positions RoPE rotates by.
    """

    x: Any
    memory: Any = None
    mask: Any = None
    memory_mask: Any = None
    lengths: Any = None
    memory_lengths: Any = None
    positions: Any = None


def _make_norm(name: str, norm: str) -> Layer:
    if norm not in _NORMS:
        raise ValueError(f"{name}: norm must be one of {sorted(_NORMS)}, got {norm!r}")
    return _NORMS[norm]()


def _check_sequence(name: str, x: Any) -> None:
    if not hasattr(x, "ndim") or x.ndim < 2:
        raise shape_error(name, "[..., time, features]", x)
    check_floating(name, x, "[..., time, features]")


def _block(name: str, num_heads: int, hidden_features: int, *, num_kv_heads, dropout,
           attention_dropout, activation, norm, rope, causal, cross, use_bias,
           implementation) -> Layer:
    """The pre-norm block behind :func:`EncoderBlock` and :func:`DecoderBlock`; ``split`` turns
    the input into ``(x, self-attention input, cross-attention input or None)``."""
    check_positive(name, num_heads=num_heads, hidden_features=hidden_features)
    _check_rate(name, "dropout", dropout)
    _check_rate(name, "attention_dropout", attention_dropout)
    mha = dict(num_kv_heads=num_kv_heads, use_bias=use_bias, dropout=attention_dropout,
               implementation=implementation)
    children = {
        "norm1": _make_norm(name, norm),
        "attention": MultiHeadAttention(num_heads, causal=causal, rope=rope, **mha),
        "norm2": _make_norm(name, norm),
        "ffn": FeedForward(hidden_features, activation=activation, dropout=dropout,
                           use_bias=use_bias),
    }
    if cross:
        children["cross_norm"] = _make_norm(name, norm)
        children["cross_attention"] = MultiHeadAttention(num_heads, **mha)
    index = {"norm1": 0, "attention": 1, "norm2": 2, "ffn": 3, "cross_norm": 6,
             "cross_attention": 7}
    drop = Dropout(dropout)
    decoder = name == "DecoderBlock"

    def split(x) -> tuple[Any, AttentionInput, AttentionInput | None]:
        if decoder:
            if isinstance(x, tuple) and not isinstance(x, (DecoderInput, AttentionInput)):
                x = DecoderInput(*x)
            inp = x if isinstance(x, DecoderInput) else DecoderInput(x)
            if isinstance(inp.x, AttentionInput) or isinstance(x, AttentionInput):
                raise LayerError(f"{where(name)}: give masks and lengths as a DecoderInput, "
                                 f"not an AttentionInput")
            _check_sequence(name, inp.x)
            if cross and inp.memory is None:
                raise LayerError(f"{where(name)}: a block with cross=True needs the memory: call "
                                 f"it on DecoderInput(x, memory) or (x, memory)")
            if not cross and (inp.memory is not None or inp.memory_mask is not None
                              or inp.memory_lengths is not None):
                raise LayerError(f"{where(name)}: got a memory but the block has no "
                                 f"cross-attention; build it with cross=True")
            self_in = AttentionInput(q=inp.x, mask=inp.mask, q_lengths=inp.lengths,
                                     q_positions=inp.positions)
            cross_in = (AttentionInput(q=inp.x, kv=inp.memory, mask=inp.memory_mask,
                                       q_lengths=inp.lengths, kv_lengths=inp.memory_lengths)
                        if cross else None)
            return inp.x, self_in, cross_in
        inp = x if isinstance(x, AttentionInput) else AttentionInput(q=x)
        if inp.kv is not None:
            raise LayerError(f"{where(name)}: is self-attention; got kv {describe(inp.kv)} (use "
                             f"DecoderBlock(cross=True) to attend to another sequence)")
        _check_sequence(name, inp.q)
        return inp.q, inp, None

    def init(key, x):
        q, self_in, cross_in = split(x)
        params, state = {}, {}

        def sub(child_name, h):
            p, s, y = init_child(child_name, children[child_name],
                                 jax.random.fold_in(key, index[child_name]), h)
            put(params, child_name, p)
            put(state, child_name, s)
            return y

        spec = as_spec(q)
        sub("attention", self_in._replace(q=sub("norm1", spec)))
        if cross:
            h = sub("cross_norm", spec)
            sub("cross_attention", cross_in._replace(q=h))
        sub("ffn", sub("norm2", spec))
        return params, state

    def apply(params, state, x, *, key=None, train=False):
        check_train(train)
        q, self_in, cross_in = split(x)
        if train and (dropout > 0.0 or attention_dropout > 0.0):
            require_key(name, key)
        new_state = {}

        def sub(child_name, h):
            y, s = apply_child(child_name, children[child_name], params, state, h,
                               key=child_key(key, index[child_name]), train=train)
            put(new_state, child_name, s)
            return y

        def add(x, y, drop_index):
            y, _ = drop.apply({}, {}, y, key=child_key(key, drop_index), train=train)
            return x + y.astype(x.dtype)

        h = sub("norm1", q)
        x = add(q, sub("attention", self_in._replace(q=h)), 4)
        if cross:
            h = sub("cross_norm", x)
            x = add(x, sub("cross_attention", cross_in._replace(q=h)), 8)
        h = sub("norm2", x)
        x = add(x, sub("ffn", h), 5)
        return x, new_state

    return Layer(init, apply, name)


def EncoderBlock(num_heads: int, hidden_features: int, *, num_kv_heads: int | None = None,
                 dropout: float = 0.0, attention_dropout: float = 0.0,
                 activation: str | Layer = "gelu", norm: str = "layer", rope: bool = False,
                 causal: bool = False, use_bias: bool = True,
                 implementation: str | None = None) -> Layer:
    """A pre-norm transformer encoder block::

        x = x + drop(attention(norm1(x)))
        x = x + drop(ffn(norm2(x)))

    Shapes: ``x: [..., time, features] -> [..., time, features]``, or an
    :class:`~fnn.layers.attention.AttentionInput` (``q=x`` with ``mask``, ``q_lengths``,
    ``kv_lengths``, ``q_positions``; no ``kv``) ``-> [..., time, features]``: the masks,
    lengths and positions are passed to the self-attention unchanged. With lengths, pass both
    ``q_lengths`` and ``kv_lengths``: padded keys are then ignored, and padded rows get no
    attention (they keep ``x + ffn(...)``).

    Params ``{"norm1": {"scale", "bias"}, "attention": MultiHeadAttention's, "norm2": ...,
    "ffn": FeedForward's}`` (RMSNorm has only ``"scale"``).

    - ``num_heads``, ``num_kv_heads`` (grouped-query), ``rope``, ``causal``,
      ``implementation``: as :func:`~fnn.layers.attention.MultiHeadAttention`;
      ``attention_dropout`` is its dropout on the attention weights.
    - ``hidden_features``, ``activation`` (``"gelu"``, ``"swiglu"``, ...): the
      :func:`FeedForward`'s.
    - ``dropout``: on both residual branches and on the feed-forward's hidden units (as in
      PyTorch's ``TransformerEncoderLayer``); needs ``key=`` when ``train=True``.
    - ``norm``: ``"layer"`` (LayerNorm) or ``"rms"`` (RMSNorm).
    - ``use_bias``: biases in the attention projections and the feed-forward layers.

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
    return _block("EncoderBlock", num_heads, hidden_features, num_kv_heads=num_kv_heads,
                  dropout=dropout, attention_dropout=attention_dropout, activation=activation,
                  norm=norm, rope=rope, causal=causal, cross=False, use_bias=use_bias,
                  implementation=implementation)


def DecoderBlock(num_heads: int, hidden_features: int, *, cross: bool = False,
                 num_kv_heads: int | None = None, dropout: float = 0.0,
                 attention_dropout: float = 0.0, activation: str | Layer = "gelu",
                 norm: str = "layer", rope: bool = False, use_bias: bool = True,
                 implementation: str | None = None) -> Layer:
    """A pre-norm transformer decoder block: causal self-attention, cross-attention to a memory
    (with ``cross=True``), and a feed-forward network::

        x = x + drop(attention(norm1(x)))                    # causal
        x = x + drop(cross_attention(cross_norm(x), memory))  # cross=True only
        x = x + drop(ffn(norm2(x)))

    Shapes: ``x: [..., time, features] -> [..., time, features]``; with ``cross=True``
    ``(x, memory)`` or :class:`DecoderInput` ``(x, memory: [..., memory_time,
    memory_features], masks, lengths, positions) -> [..., time, features]``.

    Params ``{"norm1", "attention", "cross_norm", "cross_attention", "norm2", "ffn"}`` (the
    cross entries only with ``cross=True``; without them a ``DecoderBlock`` has the params of an
    ``EncoderBlock(causal=True)``). RoPE (``rope=True``) applies to the self-attention only.
    Other arguments as :func:`EncoderBlock`.

    Decode mode: with ``state = init_block_cache(params, batch_shape, max_length)`` (the
    self-attention's key/value cache, ``{"attention": {"cache": ...}}``), ``apply`` on the next
    tokens ``x: [*batch_shape, new, features]`` attends to every token decoded so far and
    returns the updated cache; decoding token by token equals the full causal pass.
    Cross-attention is recomputed from ``memory`` at every step (it has no cache).

    >>> import jax, jax.numpy as jnp
    >>> block = DecoderBlock(2, 32, cross=True)
    >>> x, memory = jnp.ones((2, 5, 8)), jnp.ones((2, 7, 6))
    >>> params, state = block.init(jax.random.key(0), (x, memory))
    >>> sorted(params)
    ['attention', 'cross_attention', 'cross_norm', 'ffn', 'norm1', 'norm2']
    >>> block.apply(params, state, (x, memory))[0].shape
    (2, 5, 8)
    """
    return _block("DecoderBlock", num_heads, hidden_features, num_kv_heads=num_kv_heads,
                  dropout=dropout, attention_dropout=attention_dropout, activation=activation,
                  norm=norm, rope=rope, causal=True, cross=cross, use_bias=use_bias,
                  implementation=implementation)


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


# ----------------------------------------------------------------------------- positions

def _split_positions(name: str, x: Any, max_length: int | None) -> tuple[jax.Array, Any]:
    """``x`` or ``(x, positions)``: the sequence and its positions (``None``: ``0, 1, ...``)."""
    positions = None
    if isinstance(x, tuple):
        if len(x) != 2:
            raise LayerError(f"{where(name)}: expected x or (x, positions), got a tuple of "
                             f"{len(x)}")
        x, positions = x
    if not hasattr(x, "ndim") or x.ndim < 2:
        raise shape_error(name, "[..., time, features]", x)
    if positions is None and max_length is not None and x.shape[-2] > max_length:
        raise shape_error(name, f"[..., time, features] with time <= max_length={max_length}",
                          x)
    if positions is not None:
        if (not hasattr(positions, "dtype") or not jnp.issubdtype(positions.dtype, jnp.integer)
                or positions.ndim > x.ndim - 1
                or any(a not in (1, b) for a, b in zip(positions.shape[::-1],
                                                       x.shape[-2::-1]))):
            raise ShapeError(f"{where(name)}: expected positions int broadcastable to "
                             f"[..., time] = [{', '.join(map(str, x.shape[:-1]))}], got "
                             f"{describe(positions)}")
    return x, positions


def LearnedPositionEmbedding(max_length: int, *,
                             table_init: Initializer = initializers.normal(stddev=0.02),
                             param_dtype: Any = jnp.float32, dtype: Any = None) -> Layer:
    """Adds a learned position embedding (BERT, GPT-2): ``y[..., t, :] = x[..., t, :] +
    table[t]``. ``x: [..., time, features] -> [..., time, features]``; params
    ``{"table": [max_length, features]}`` (normal, stddev 0.02). ``time > max_length`` is an
    error.

    For decoding from an offset, call it on ``(x, positions)`` with ``positions`` int
    broadcastable to ``[..., time]``: ``y = x + table[positions]``, e.g. ``positions =
    index + jnp.arange(new)``. Positions past the table are clamped to its last row (not
    detectable under ``jit``).

    >>> import jax, jax.numpy as jnp
    >>> layer = LearnedPositionEmbedding(16)
    >>> params, _ = layer.init(jax.random.key(0), jnp.zeros((2, 5, 8)))
    >>> params["table"].shape
    (16, 8)
    """
    name = "LearnedPositionEmbedding"
    check_positive(name, max_length=max_length)

    def init(key, x):
        x, _ = _split_positions(name, x, max_length)
        return {"table": table_init(key, (max_length, x.shape[-1]), param_dtype)}, {}

    def apply(params, state, x, *, key=None, train=False):
        x, positions = _split_positions(name, x, max_length)
        table = params["table"]
        if x.shape[-1] != table.shape[1]:
            raise shape_error(name, f"[..., time, {table.shape[1]}]", x)
        dt = compute_dtype(dtype, x, param_dtype)
        if positions is None:
            emb = table[:x.shape[-2]]
        else:
            emb = jnp.take(table, positions, axis=0, mode="clip")
        return x.astype(dt) + align(emb.astype(dt), x.ndim), state

    return Layer(init, apply, name)


def sinusoidal_table(positions: jax.Array, features: int, base: float = 10000.0,
                     dtype: Any = jnp.float32) -> jax.Array:
    """The sinusoidal embeddings of ``positions: [...] -> [..., features]``, interleaved as in
    "Attention Is All You Need": ``pe[..., 2i] = sin(pos / base ** (2i / features))`` and
    ``pe[..., 2i + 1] = cos(pos / base ** (2i / features))`` (an odd ``features`` ends with a
    sine). Computed in ``dtype``.

    >>> import jax.numpy as jnp
    >>> sinusoidal_table(jnp.arange(2), 4).tolist()[0]
    [0.0, 1.0, 0.0, 1.0]
    """
    column = jnp.arange(features)
    exponent = (2 * (column // 2)).astype(dtype) / jnp.asarray(features, dtype)
    inv_freq = jnp.power(jnp.asarray(base, dtype), -exponent)  # [features]
    positions = jnp.asarray(positions)
    angles = positions.astype(dtype)[..., None] * align(inv_freq, positions.ndim + 1)
    return jnp.where(align(column % 2 == 0, angles.ndim), jnp.sin(angles), jnp.cos(angles))


def SinusoidalPositionEmbedding(max_length: int | None = None, base: float = 10000.0) -> Layer:
    """Adds the fixed sinusoidal position embedding of "Attention Is All You Need":
    ``y[..., t, :] = x[..., t, :] + pe[t]``, interleaved layout (see :func:`sinusoidal_table`):
    ``pe[t, 2i] = sin(t / base ** (2i / features))``, ``pe[t, 2i + 1] = cos(...)``.
    ``x: [..., time, features] -> [..., time, features]``; no params. ``time > max_length`` is
    an error when ``max_length`` is given.

    For decoding from an offset, call it on ``(x, positions)`` with ``positions`` int
    broadcastable to ``[..., time]``. The table is computed in float32 (float64 for float64
    inputs) and added in the input's dtype.

    >>> import jax.numpy as jnp
    >>> layer = SinusoidalPositionEmbedding()
    >>> layer.apply({}, {}, jnp.zeros((1, 2, 4)))[0][0].tolist()[1][:2]  # sin(1), cos(1)
    [0.8414709568023682, 0.5403022766113281]
    """
    name = "SinusoidalPositionEmbedding"
    if max_length is not None:
        check_positive(name, max_length=max_length)
    if not isinstance(base, (int, float)) or isinstance(base, bool) or base <= 0:
        raise ValueError(f"{name}: base must be a positive number, got {base!r}")

    def init(key, x):
        _split_positions(name, x, max_length)
        return {}, {}

    def apply(params, state, x, *, key=None, train=False):
        x, positions = _split_positions(name, x, max_length)
        check_floating(name, x, "[..., time, features]")
        if positions is None:
            positions = jnp.arange(x.shape[-2])
        table_dt = jnp.float64 if x.dtype == jnp.float64 else jnp.float32
        pe = sinusoidal_table(positions, x.shape[-1], base, table_dt)
        return x + align(pe.astype(x.dtype), x.ndim), state

    return Layer(init, apply, name)
