"""Language models over token ids: a character LSTM and a decoder-only transformer (GPT), with
sampling.

Both map ``ids: int[..., time] -> logits [..., time, vocab_size]`` (any number of leading batch
axes) and train with ``fnn.losses.softmax_cross_entropy(logits, targets)`` on
``fnn.data.text.sequence_batches``.

:func:`generate` continues a prompt token by token, the whole loop under one ``jax.jit``:

- :func:`CharLSTM`: the prompt runs through the LSTM layers once (``RNN(..., return_carry=True)``)
  and each new token is one ``cell.step`` per layer, carrying every layer's ``LSTMCarry``.
- :func:`GPT`: the prompt fills a key/value cache (:func:`init_gpt_cache`, one cache per block,
  stacked as ``repeat`` keeps them) and each new token costs one position: the model's ``apply``
  runs in decode mode when its state holds that cache, placing new tokens at the cache's index.

Sampling: ``temperature=0`` is greedy (argmax); otherwise the logits are divided by
``temperature`` and, with ``top_k``, all but the ``k`` largest are dropped before sampling.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.nn import initializers

from fnn.combinators import repeat, serial
from fnn.core import (Layer, LayerError, apply_child, check_positive, check_train,
                      child_key, init_child, put, shape_error)
from fnn.layers import (LSTM, RNN, Dense, DecoderBlock, Dropout, Embedding, LayerNorm,
                        LearnedPositionEmbedding, attend, init_block_cache)


class _Decoder(NamedTuple):
    """How :func:`generate` runs a model incrementally.

    ``prefill(params, state, prompt) -> (logits [..., vocab] of the last prompt token, carry)``
    and ``step(params, carry, token int[...]) -> (logits [..., vocab], carry)``.
    ``max_length``: the longest sequence the model can decode (``None``: unlimited).
    """

    prefill: Callable
    step: Callable
    max_length: Callable[[Any], int | None]


# model.apply -> its decoder; weak keys, so that models can be garbage collected
_DECODERS: "weakref.WeakKeyDictionary[Callable, _Decoder]" = weakref.WeakKeyDictionary()


def _check_ids(name: str, ids: Any, min_rank: int = 1) -> None:
    if (not hasattr(ids, "dtype") or not jnp.issubdtype(ids.dtype, jnp.integer)
            or len(ids.shape) < min_rank):
        raise shape_error(name, "integer ids int[..., time]", ids)


# ============================================================================= CharLSTM

def CharLSTM(vocab_size: int, *, embed: int = 64, hidden: int = 256,
             num_layers: int = 1) -> Layer:
    """A recurrent language model: ``Embedding -> RNN(LSTM) x num_layers -> Dense``.
    ``ids: int[..., time] -> logits [..., time, vocab_size]``.

    Params: ``{"embed": {"table": [vocab_size, embed]}, "lstm1": {"w_i", "w_h", "b"}, ...,
    "lstm{num_layers}": ..., "head": {"w": [hidden, vocab_size], "b"}}``. Continue a prompt with
    :func:`generate`.

    >>> import jax, jax.numpy as jnp
    >>> model = CharLSTM(10, embed=4, hidden=8)
    >>> params, state = model.init(jax.random.key(0), jnp.zeros((2, 5), jnp.int32))
    >>> sorted(params), model.apply(params, state, jnp.zeros((2, 5), jnp.int32))[0].shape
    (['embed', 'head', 'lstm1'], (2, 5, 10))
    """
    check_positive("CharLSTM", vocab_size=vocab_size, embed=embed, hidden=hidden,
                   num_layers=num_layers)
    embedding = Embedding(vocab_size, embed)
    cells = {f"lstm{i}": LSTM(hidden) for i in range(1, num_layers + 1)}
    head = Dense(vocab_size)
    model = serial(embed=embedding, **{name: RNN(cell) for name, cell in cells.items()},
                   head=head)

    def prefill(params, state, prompt):
        h, _ = embedding.apply(params["embed"], {}, prompt)
        carries = {}
        for name, cell in cells.items():
            (h, carries[name]), _ = RNN(cell, return_carry=True).apply(params[name], {}, h)
        logits, _ = head.apply(params["head"], {}, h[..., -1, :])
        return logits, carries

    def step(params, carries, token):
        h, _ = embedding.apply(params["embed"], {}, token)
        new = {}
        for name, cell in cells.items():
            carry = carries[name]
            new[name], h = cell.step(params[name], carry, h)
            new[name] = jax.tree.map(lambda n, o: n.astype(o.dtype), new[name], carry)
        logits, _ = head.apply(params["head"], {}, h)
        return logits, new

    model = model._replace(name="CharLSTM")
    _DECODERS[model.apply] = _Decoder(prefill, step, lambda params: None)
    return model


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


def GPT(vocab_size: int, *, d_model: int = 256, num_heads: int = 4, num_layers: int = 4,
        mlp: int = 1024, max_length: int = 128, dropout: float = 0.0,
        tie_embeddings: bool = False) -> Layer:
    """A decoder-only pre-norm transformer (GPT-2's layout)::

        h = dropout(embed(ids) + position[0:time])
        h = repeat(DecoderBlock(num_heads, mlp, dropout=dropout), num_layers)(h)   # causal
        logits = head(LayerNorm(h))         # head: Dense, or embed.table.T when tied

    ``ids: int[..., time] -> logits [..., time, vocab_size]`` with ``time <= max_length``.

    Params: ``{"embed": {"table": [vocab_size, d_model]}, "position": {"table": [max_length,
    d_model]}, "blocks": {"layers": DecoderBlock params stacked [num_layers, ...]}, "norm":
    {"scale", "bias"}, "head": {"w": [d_model, vocab_size], "b"}}``; no ``"head"`` with
    ``tie_embeddings`` (the logits are ``h @ embed.table.T``). Both embedding tables start
    from a normal with stddev 0.02. The blocks run in one ``lax.scan`` (compile time flat in
    ``num_layers``). ``dropout`` (embeddings, residual branches, feed-forward) needs ``key=`` in
    training.

    Decode mode: with ``state = init_gpt_cache(params, batch_shape)``, ``apply`` on the next
    tokens ``ids: int[*batch_shape, new]`` attends to every token decoded so far, embeds them at
    positions ``index, index + 1, ...`` and returns the updated cache; :func:`generate` uses it.

    >>> import jax, jax.numpy as jnp
    >>> model = GPT(10, d_model=8, num_heads=2, num_layers=2, mlp=16, max_length=6)
    >>> params, state = model.init(jax.random.key(0), jnp.zeros((2, 5), jnp.int32))
    >>> sorted(params), model.apply(params, state, jnp.zeros((2, 5), jnp.int32))[0].shape
    (['blocks', 'embed', 'head', 'norm', 'position'], (2, 5, 10))
    """
    name = "GPT"
    check_positive(name, vocab_size=vocab_size, d_model=d_model, num_heads=num_heads,
                   num_layers=num_layers, mlp=mlp, max_length=max_length)
    if d_model % num_heads:
        raise ValueError(f"{name}: d_model must be a multiple of num_heads, got d_model="
                         f"{d_model}, num_heads={num_heads}")
    embedding = Embedding(vocab_size, d_model, table_init=initializers.normal(stddev=0.02))
    position = LearnedPositionEmbedding(max_length)
    drop = Dropout(dropout)
    blocks = repeat(DecoderBlock(num_heads, mlp, dropout=dropout), num_layers)
    norm = LayerNorm()
    head = None if tie_embeddings else Dense(vocab_size)
    index = {"embed": 0, "position": 1, "drop": 2, "blocks": 3, "norm": 4, "head": 5}

    def check(ids):
        _check_ids(name, ids)
        if ids.shape[-1] > max_length:
            raise shape_error(name, f"int[..., time] with time <= max_length={max_length}", ids)

    def init(key, ids):
        check(ids)
        params, state = {}, {}

        def sub(child_name, child, x):
            p, s, y = init_child(child_name, child, jax.random.fold_in(key, index[child_name]),
                                 x)
            put(params, child_name, p)
            put(state, child_name, s)
            return y

        h = sub("blocks", blocks, sub("position", position, sub("embed", embedding, ids)))
        h = sub("norm", norm, h)
        if head is not None:
            sub("head", head, h)
        return params, state

    def apply(params, state, ids, *, key=None, train=False):
        check_train(train)
        check(ids)
        offset = _decode_index(state)

        def sub(child_name, child, x, child_state=None):
            y, s = apply_child(child_name, child, params,
                               {} if child_state is None else {child_name: child_state}, x,
                               key=child_key(key, index[child_name]), train=train)
            return y, s

        h, _ = sub("embed", embedding, ids)
        if offset is not None:
            positions = offset + jnp.arange(ids.shape[-1], dtype=jnp.int32)
            h, _ = sub("position", position, (h, positions))
        else:
            h, _ = sub("position", position, h)
        h, _ = sub("drop", drop, h)
        h, blocks_state = sub("blocks", blocks, h, state.get("blocks"))
        h, _ = sub("norm", norm, h)
        if head is None:
            logits = attend(params["embed"], h)
        else:
            logits, _ = sub("head", head, h)
        new_state = {}
        if offset is not None:
            put(new_state, "blocks", blocks_state)
        return logits, new_state

    def prefill(params, state, prompt):
        cache = init_gpt_cache(params, prompt.shape[:-1])
        logits, cache = apply(params, cache, prompt)
        return logits[..., -1, :], cache

    def step(params, cache, token):
        logits, cache = apply(params, cache, token[..., None])
        return logits[..., 0, :], cache

    model = Layer(init, apply, name)
    _DECODERS[model.apply] = _Decoder(prefill, step, lambda params: max_length)
    return model


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


@functools.partial(jax.jit, static_argnames=("decoder", "num_tokens", "temperature", "top_k"))
def _generate(decoder, params, state, prompt, key, *, num_tokens, temperature, top_k):
    sample = functools.partial(sample_logits, temperature=temperature, top_k=top_k)
    p = prompt.shape[-1]
    out = jnp.concatenate([prompt, jnp.zeros(prompt.shape[:-1] + (num_tokens,), jnp.int32)],
                          axis=-1)
    logits, carry = decoder.prefill(params, state, prompt)
    token = sample(jax.random.fold_in(key, 0), logits)
    out = lax.dynamic_update_index_in_dim(out, token, p, axis=-1)

    def body(i, loop):
        out, token, carry = loop
        logits, carry = decoder.step(params, carry, token)
        token = sample(jax.random.fold_in(key, i), logits)
        return lax.dynamic_update_index_in_dim(out, token, p + i, axis=-1), token, carry

    out, _, _ = lax.fori_loop(1, num_tokens, body, (out, token, carry))
    return out


def generate(model: Layer, params: dict, state: dict, prompt_ids: Any, num_tokens: int, *,
             key: jax.Array, temperature: float = 1.0, top_k: int | None = None) -> jax.Array:
    """Continues ``prompt_ids: int[..., prompt_len]`` (``prompt_len >= 1``) by ``num_tokens``
    sampled tokens; returns ``int32[..., prompt_len + num_tokens]`` (the prompt first).

    ``model`` must be built by :func:`CharLSTM` or :func:`GPT` (its params and state as
    ``model.init`` returned them). The whole generation is one jitted function: the prompt runs
    once, then every new token is one incremental step (LSTM carries, or the GPT's key/value
    cache: one position per token) inside a ``lax.fori_loop``. Token ``i`` (from 0) is drawn
    with ``fold_in(key, i)``. ``temperature=0`` is greedy decoding; ``top_k`` keeps the ``k``
    largest logits before sampling. For a GPT, ``prompt_len + num_tokens`` must be at most its
    ``max_length``. Compiles once per prompt shape, ``num_tokens``, ``temperature`` and
    ``top_k``.
    """
    decoder = _DECODERS.get(model.apply) if isinstance(model, Layer) else None
    if decoder is None:
        raise TypeError(f"generate: model must be built by CharLSTM(...) or GPT(...), got "
                        f"{getattr(model, 'name', type(model).__name__)}")
    prompt = jnp.asarray(prompt_ids)
    _check_ids("generate", prompt)
    if prompt.shape[-1] < 1:
        raise ValueError("generate: the prompt must hold at least one token")
    if not isinstance(num_tokens, int) or isinstance(num_tokens, bool) or num_tokens < 0:
        raise ValueError(f"generate: num_tokens must be a non-negative integer, got "
                         f"{num_tokens!r}")
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"generate: temperature must be a number >= 0, got {temperature!r}")
    if top_k is not None:
        check_positive("generate", top_k=top_k)
    limit = decoder.max_length(params)
    if limit is not None and prompt.shape[-1] + num_tokens > limit:
        raise ValueError(f"generate: prompt length {prompt.shape[-1]} + num_tokens {num_tokens} "
                         f"exceeds the model's max_length {limit}")
    prompt = prompt.astype(jnp.int32)
    if num_tokens == 0:
        return prompt
    return _generate(decoder, params, state, prompt, key, num_tokens=num_tokens,
                     temperature=float(temperature), top_k=top_k)
