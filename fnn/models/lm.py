"""Language models over token ids: a character LSTM and a decoder-only transformer (GPT), with
sampling.

Both map ``ids: int[..., time] -> logits [..., time, vocab_size]`` (any number of leading batch
axes) and train with ``fnn.losses.softmax_cross_entropy(logits, targets)`` on
``fnn.data.text.sequence_batches``.

:func:`generate` continues a prompt token by token, the whole loop under one ``jax.jit``.
Both models have a *decode mode*, selected by their state: ``apply(params, decode_state, ids)``
continues from what the state holds and returns it updated, so ``generate`` needs nothing but
the model's ``apply`` and a decode state:

- :func:`CharLSTM`: :func:`init_lstm_carry` gives zero carries; in decode mode each LSTM layer
  steps its cell from the carry in the state and returns the new carry.
- :func:`GPT`: :func:`init_gpt_cache` gives an empty key/value cache per block (stacked as
  ``repeat`` keeps them); in decode mode new tokens go in at the cache's index, so each new token
  costs one position.

Sampling: ``temperature=0`` is greedy (argmax); otherwise the logits are divided by
``temperature`` and, with ``top_k``, all but the ``k`` largest are dropped before sampling.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.nn import initializers

from fnn.combinators import repeat, serial
from fnn.core import (Children, Layer, LayerError, Seq, array_of, check_positive, map_array,
                      shape_error)
from fnn.layers import (LSTM, Dense, DecoderBlock, Dropout, Embedding, LearnedPositionEmbedding,
                        LSTMCell, attend, init_block_cache)
from fnn.layers.transformer import make_norm


def _check_ids(name: str, ids: Any, min_rank: int = 1) -> None:
    ids = array_of(ids)
    if (not hasattr(ids, "dtype") or not jnp.issubdtype(ids.dtype, jnp.integer)
            or len(ids.shape) < min_rank):
        raise shape_error(name, "integer ids int[..., time]", ids)


# ============================================================================= CharLSTM

def CharLSTM(vocab_size: int, *, embedding_features: int = 64, features: int = 256,
             num_layers: int = 1) -> Layer:
    """A recurrent language model: ``Embedding -> LSTM x num_layers -> Dense``.
    ``ids: int[..., time] -> logits [..., time, vocab_size]`` (a ``Seq`` of ids with lengths
    gives a ``Seq`` of logits, which the losses average over the valid positions).

    Params: ``{"embed": {"table": [vocab_size, embedding_features]}, "lstm1": {"w_i", "w_h",
    "b"}, ..., "lstm{num_layers}": ..., "head": {"w": [features, vocab_size], "b"}}``.

    Decode mode: with ``state = init_lstm_carry(params, batch_shape)``, ``apply`` continues
    every layer from the carries in the state and returns them updated; :func:`generate` uses
    it.

    >>> import jax, jax.numpy as jnp
    >>> model = CharLSTM(10, embedding_features=4, features=8)
    >>> params, state = model.init(jax.random.key(0), jnp.zeros((2, 5), jnp.int32))
    >>> sorted(params), model.apply(params, state, jnp.zeros((2, 5), jnp.int32))[0].shape
    (['embed', 'head', 'lstm1'], (2, 5, 10))
    """
    check_positive("CharLSTM", vocab_size=vocab_size, embedding_features=embedding_features,
                   features=features, num_layers=num_layers)
    embedding = Embedding(vocab_size, embedding_features)
    cells = {f"lstm{i}": LSTMCell(features) for i in range(1, num_layers + 1)}
    head = Dense(vocab_size)
    model = serial(embed=embedding, **{name: LSTM(features) for name in cells}, head=head)

    def apply(params, state, ids, *, key=None, train=False):
        if "carry" not in state:
            return model.apply(params, state, ids, key=key, train=train)
        # decode mode: continue every layer from its carry, one cell step per token
        h, _ = embedding.apply(params["embed"], {}, ids)
        carries = {}
        for name, cell in cells.items():
            carries[name], h = _continue(cell, params[name], state["carry"][name], h)
        logits, _ = head.apply(params["head"], {}, h)
        return logits, {"carry": carries}

    return Layer(model.init, apply, "CharLSTM")


def _continue(cell, params, carry, h: jax.Array):
    """Runs ``cell`` over ``h: [..., time, features]`` from ``carry``; returns the last carry
    (in the dtypes it came in) and the outputs ``[..., time, features]``."""

    def step(c, x):
        new, y = cell.step(params, c, x)
        return jax.tree.map(lambda n, o: n.astype(o.dtype), new, c), y

    carry, ys = lax.scan(step, carry, jnp.moveaxis(h, -2, 0))
    return carry, jnp.moveaxis(ys, 0, -2)


def init_lstm_carry(params: dict, batch_shape: int | tuple[int, ...],
                    dtype: Any = jnp.float32) -> dict:
    """The decode-mode state of a :func:`CharLSTM`: zero carries for ``batch_shape`` sequences,
    ``{"carry": {"lstm1": LSTMCarry(h, c), ...}}``, each ``[*batch_shape, features]``."""
    layers = sorted(name for name in params if name.startswith("lstm"))
    if not layers:
        raise LayerError(f"init_lstm_carry: expected the params of a CharLSTM, got entries "
                         f"{sorted(params)}")
    batch_shape = (batch_shape,) if isinstance(batch_shape, int) else tuple(batch_shape)
    return {"carry": {name: LSTMCell(params[name]["w_h"].shape[0]).initial_carry(batch_shape,
                                                                                 dtype)
                      for name in layers}}


# ============================================================================= GPT

def _decode_index(state: dict) -> jax.Array | None:
    """The number of positions already in the cache of a GPT's decode state, else ``None``."""
    blocks = state.get("blocks") if isinstance(state, dict) else None
    if not blocks:
        return None
    try:
        index = blocks["layers"]["attention"]["cache"]["index"]
    except (KeyError, TypeError) as e:
        raise LayerError("GPT: the state must be {} or init_gpt_cache(params, ...)") from e
    return index[0]  # one cache per block, all at the same index


def GPT(vocab_size: int, *, features: int = 256, num_heads: int = 4, num_layers: int = 4,
        hidden_features: int = 1024, max_length: int = 128, dropout: float = 0.0,
        tie_embeddings: bool = False, activation: str = "gelu", norm: str = "layer",
        norm_epsilon: float | None = None, use_bias: bool = True) -> Layer:
    """A decoder-only pre-norm transformer (GPT-2's layout)::

        h = dropout(embed(ids) + position[0:time])
        h = repeat(DecoderBlock(num_heads, hidden_features, ...), num_layers)(h)   # causal
        logits = head(norm(h))         # head: Dense, or embed.table.T when tied

    ``ids: int[..., time] -> logits [..., time, vocab_size]`` with ``time <= max_length`` (a
    ``Seq`` of ids with lengths gives a ``Seq`` of logits). The block's options are the
    model's: ``activation`` (``"gelu"``; GPT-2 itself uses ``"gelu_tanh"``), ``norm``
    (``"layer"`` or ``"rms"``) and ``norm_epsilon`` (also the final norm's), ``use_bias``.

    Params: ``{"embed": {"table": [vocab_size, features]}, "position": {"table": [max_length,
    features]}, "blocks": {"layers": DecoderBlock params stacked [num_layers, ...]}, "norm":
    {"scale", "b"}, "head": {"w": [features, vocab_size], "b"}}``; no ``"head"`` with
    ``tie_embeddings`` (the logits are ``h @ embed.table.T``). Both embedding tables start
    from a normal with stddev 0.02. The blocks run in one ``lax.scan`` (compile time flat in
    ``num_layers``). ``dropout`` (embeddings, residual branches, feed-forward) needs ``key=`` in
    training.

    Decode mode: with ``state = init_gpt_cache(params, batch_shape)``, ``apply`` on the next
    tokens ``ids: int[*batch_shape, new]`` attends to every token decoded so far, embeds them at
    positions ``index, index + 1, ...`` and returns the updated cache; :func:`generate` uses it.

    >>> import jax, jax.numpy as jnp
    >>> model = GPT(10, features=8, num_heads=2, num_layers=2, hidden_features=16,
    ...             max_length=6)
    >>> params, state = model.init(jax.random.key(0), jnp.zeros((2, 5), jnp.int32))
    >>> sorted(params), model.apply(params, state, jnp.zeros((2, 5), jnp.int32))[0].shape
    (['blocks', 'embed', 'head', 'norm', 'position'], (2, 5, 10))
    """
    name = "GPT"
    check_positive(name, vocab_size=vocab_size, features=features, num_heads=num_heads,
                   num_layers=num_layers, hidden_features=hidden_features,
                   max_length=max_length)
    if features % num_heads:
        raise ValueError(f"{name}: features must be a multiple of num_heads, got features="
                         f"{features}, num_heads={num_heads}")
    block = DecoderBlock(num_heads, hidden_features, dropout=dropout, activation=activation,
                         norm=norm, norm_epsilon=norm_epsilon, use_bias=use_bias)
    parts = Children(name, {
        "embed": Embedding(vocab_size, features, table_init=initializers.normal(stddev=0.02)),
        "position": LearnedPositionEmbedding(max_length),
        "drop": Dropout(dropout),
        "blocks": repeat(block, num_layers),
        "norm": make_norm(name, norm, norm_epsilon),
    } | ({} if tie_embeddings else {"head": Dense(vocab_size)}))

    def check(ids):
        _check_ids(name, ids)
        if array_of(ids).shape[-1] > max_length:
            raise shape_error(name, f"int[..., time] with time <= max_length={max_length}", ids)

    def init(key, ids):
        check(ids)
        child = parts.initializer(key)
        h = child("norm", child("blocks", child("position", child("embed", ids))))
        if not tie_embeddings:
            child("head", h)
        return child.params, child.state

    def apply(params, state, ids, *, key=None, train=False):
        check(ids)
        offset = _decode_index(state)
        child = parts.runner(params, state, key, train)
        h = child("embed", ids)
        own_seq = offset is not None and not isinstance(h, Seq)
        if offset is not None:  # decoding: the new tokens sit at the cache's index onwards
            positions = offset + jnp.arange(array_of(ids).shape[-1], dtype=jnp.int32)
            h = (Seq(h) if own_seq else h)._replace(positions=positions)
        h = child("norm", child("blocks", child("drop", child("position", h))))
        logits = (map_array(h, lambda a: attend(params["embed"], a)) if tie_embeddings
                  else child("head", h))
        return (logits.x if own_seq else logits), child.state

    return Layer(init, apply, name)


def init_gpt_cache(params: dict, batch_shape: int | tuple[int, ...],
                   max_length: int | None = None, dtype: Any = jnp.float32) -> dict:
    """The decode-mode state of a :func:`GPT`: an empty key/value cache per block for
    ``batch_shape`` sequences of up to ``max_length`` tokens (default: the model's
    ``max_length``), ``{"blocks": {"layers": {"attention": {"cache": ...}}}}``."""
    if "blocks" not in params or "position" not in params:
        raise LayerError(f"init_gpt_cache: expected the params of a GPT, got entries "
                         f"{sorted(params)}")
    if max_length is None:
        max_length = params["position"]["table"].shape[0]
    batch_shape = (batch_shape,) if isinstance(batch_shape, int) else tuple(batch_shape)
    return {"blocks": init_block_cache(params["blocks"], batch_shape, max_length, dtype)}


# ============================================================================= sampling

def sample_logits(key: jax.Array, logits: jax.Array, *, temperature: float = 1.0,
                  top_k: int | None = None) -> jax.Array:
    """A token id per row of ``logits: [..., vocab] -> int32[...]``: argmax when
    ``temperature == 0``, else a sample from ``softmax(logits / temperature)`` restricted to
    the ``top_k`` largest logits (all when ``None``)."""
    logits = logits.astype(jnp.float32)
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if top_k is not None and top_k < logits.shape[-1]:
        kth = lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("apply", "num_tokens", "temperature", "top_k",
                                             "limit"))
def _generate(apply, params, state, prompt, key, *, num_tokens, temperature, top_k, limit):
    """Tokens ``p .. limit`` (all, without a ``limit``) come from decode-mode calls on the
    state; each later one from a full pass over the ``limit`` tokens before it."""
    sample = functools.partial(sample_logits, temperature=temperature, top_k=top_k)
    p = prompt.shape[-1]
    out = jnp.concatenate([prompt, jnp.zeros(prompt.shape[:-1] + (num_tokens,), jnp.int32)],
                          axis=-1)
    cached = num_tokens if limit is None else max(0, min(num_tokens, limit + 1 - p))
    if cached:
        logits, state = apply(params, state, prompt)
        token = sample(jax.random.fold_in(key, 0), logits[..., -1, :])
        out = lax.dynamic_update_index_in_dim(out, token, p, axis=-1)

        def decode(i, loop):
            out, token, state = loop
            logits, state = apply(params, state, token[..., None])
            token = sample(jax.random.fold_in(key, i), logits[..., 0, :])
            return lax.dynamic_update_index_in_dim(out, token, p + i, axis=-1), token, state

        out, _, _ = lax.fori_loop(1, cached, decode, (out, token, state))

    def slide(i, out):  # token p + i from the window of the `limit` tokens before it
        window = lax.dynamic_slice_in_dim(out, p + i - limit, limit, axis=-1)
        logits, _ = apply(params, {}, window)
        token = sample(jax.random.fold_in(key, i), logits[..., -1, :])
        return lax.dynamic_update_index_in_dim(out, token, p + i, axis=-1)

    return lax.fori_loop(cached, num_tokens, slide, out) if cached < num_tokens else out


def _cache_length(state: dict) -> int | None:
    """The number of positions a GPT decode state can hold, else ``None`` (no limit)."""
    try:
        return state["blocks"]["layers"]["attention"]["cache"]["k"].shape[-3]
    except (KeyError, TypeError):
        return None


def generate(model: Layer, params: dict, state: dict, prompt_ids: Any, num_tokens: int, *,
             key: jax.Array, temperature: float = 1.0, top_k: int | None = None) -> jax.Array:
    """Continues ``prompt_ids: int[..., prompt_len]`` (``prompt_len >= 1``) by ``num_tokens``
    sampled tokens; returns ``int32[..., prompt_len + num_tokens]`` (the prompt first).

    ``state`` is the model's decode state for the prompt's batch shape:
    ``init_lstm_carry(params, batch_shape)`` for a :func:`CharLSTM`,
    ``init_gpt_cache(params, batch_shape)`` for a :func:`GPT`. The whole generation is one
    jitted function: the prompt runs once through ``model.apply`` in decode mode, then every new
    token is one more decode-mode call on that token inside a ``lax.fori_loop``. Token ``i``
    (from 0) is drawn with ``fold_in(key, i)``. ``temperature=0`` is greedy decoding; ``top_k``
    keeps the ``k`` largest logits before sampling. Compiles once per prompt shape,
    ``num_tokens``, ``temperature`` and ``top_k``.

    A GPT sees at most its cache's length (its ``max_length``) of tokens: past it, generation
    goes on with a sliding window, each new token predicted by a full pass over the last
    ``max_length`` tokens (positions counted from the window's start, as the model was
    trained), so a continuation may be longer than the model's context. The prompt's ids must
    lie in the model's vocabulary (checked here, on the host).
    """
    if not isinstance(model, Layer):
        raise TypeError(f"generate: model must be a Layer, got {type(model).__name__}")
    if not state:
        raise ValueError("generate: state must be the model's decode state for the prompt's "
                         "batch shape, e.g. init_gpt_cache(params, batch_shape) or "
                         "init_lstm_carry(params, batch_shape); got {}")
    prompt = jnp.asarray(prompt_ids)
    _check_ids("generate", prompt)
    if prompt.shape[-1] < 1:
        raise ValueError("generate: the prompt must hold at least one token")
    if not isinstance(num_tokens, int) or isinstance(num_tokens, bool) or num_tokens < 0:
        raise ValueError(f"generate: num_tokens must be a non-negative integer, got "
                         f"{num_tokens!r}")
    if not isinstance(temperature, (int, float)) or not temperature >= 0:  # NaN too
        raise ValueError(f"generate: temperature must be a number >= 0, got {temperature!r}")
    if top_k is not None:
        check_positive("generate", top_k=top_k)
    _check_vocabulary(params, prompt)
    limit = _cache_length(state)
    prompt = prompt.astype(jnp.int32)
    if num_tokens == 0:
        return prompt
    return _generate(model.apply, params, state, prompt, key, num_tokens=num_tokens,
                     temperature=float(temperature), top_k=top_k, limit=limit)


def _check_vocabulary(params: dict, prompt: jax.Array) -> None:
    """Raises unless the prompt's ids lie in the model's embedding table (inside ``jit`` an id
    outside it would give NaN logits)."""
    table = params.get("embed", {}).get("table") if isinstance(params, dict) else None
    if table is None:
        return
    ids = np.asarray(prompt)
    bad = (ids < 0) | (ids >= table.shape[0])
    if bad.any():
        first = int(ids.reshape(-1)[np.argmax(bad.reshape(-1))])
        raise ValueError(f"generate: the prompt's ids must lie in the model's vocabulary "
                         f"[0, {table.shape[0]}), got {first}")
