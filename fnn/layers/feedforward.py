"""The position-wise feed-forward network of a transformer block, plain or gated."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.nn import initializers

from fnn.core import (Children, Initializer, Layer, check_positive, check_rank, check_rate,
                      per_position, require_key)
from fnn.layers.activations import ACTIVATIONS
from fnn.layers.dense import Dense
from fnn.layers.dropout import Dropout

# Gated feed-forward variants (Shazeer, "GLU Variants Improve Transformer", 2020): the gate's
# activation.
GATED = {"swiglu": jax.nn.silu, "geglu": lambda v: jax.nn.gelu(v, approximate=False),
         "reglu": jax.nn.relu}


def FeedForward(hidden_features: int, *, activation: str | Layer = "gelu", dropout: float = 0.0,
                out_features: int | None = None, use_bias: bool = True,
                w_init: Initializer = initializers.lecun_normal(),
                b_init: Initializer = initializers.zeros,
                param_dtype: Any = jnp.float32, dtype: Any = None) -> Layer:
    """The position-wise feed-forward network of a transformer.
    ``x: [..., features] -> [..., out_features]`` (``out_features`` defaults to the input's
    ``features``). Position-wise: a ``Seq`` passes through.

    - Plain (``activation`` a name of ``fnn.layers.ACTIVATIONS``, e.g. ``"gelu"`` (exact erf
      GELU), ``"gelu_tanh"`` or ``"relu"``, or any activation ``Layer``):
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
    check_rate(name, "dropout", dropout)
    gated = isinstance(activation, str) and activation in GATED
    if not (gated or isinstance(activation, Layer) or activation in ACTIVATIONS):
        raise ValueError(f"{name}: unknown activation {activation!r}; expected one of "
                         f"{sorted(ACTIVATIONS) + sorted(GATED)} or an activation Layer")
    act = None if gated else (activation if isinstance(activation, Layer)
                              else ACTIVATIONS[activation]())
    dense = dict(use_bias=use_bias, w_init=w_init, b_init=b_init, param_dtype=param_dtype,
                 dtype=dtype)

    def parts(features: int) -> Children:
        """The children for inputs of ``features``: the down projection maps back to them
        unless ``out_features`` is given."""
        out = features if out_features is None else out_features
        return Children(name, ({"gate": Dense(hidden_features, **dense)} if gated else {})
                        | {"up": Dense(hidden_features, **dense)}
                        | ({} if gated else {"act": act})
                        | {"drop": Dropout(dropout), "down": Dense(out, **dense)})

    def init(key, x):
        check_rank(name, x, 1, "[..., features]")
        child = parts(x.shape[-1]).initializer(key)
        h = child("up", x)
        if gated:
            child("gate", x)
        else:
            h = child("act", h)
        child("down", child("drop", h))
        return child.params, {}

    def apply(params, state, x, *, key=None, train=False):
        check_rank(name, x, 1, "[..., features]")
        if train and dropout > 0.0:  # name this layer, not its child "drop"
            require_key(name, key)
        child = parts(x.shape[-1]).runner(params, state, key, train)
        h = child("up", x)
        h = GATED[activation](child("gate", x)) * h if gated else child("act", h)
        return child("down", child("drop", h)), state

    return per_position(Layer(init, apply, name))
