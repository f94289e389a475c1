"""Multi-layer perceptron."""

from __future__ import annotations

from typing import Sequence

from fnn.combinators import serial
from fnn.core import Layer, check_positive
from fnn.layers import Dense, Dropout, Flatten, activation as activation_layer


def MLP(hidden_features: Sequence[int], out_features: int, *, activation: str = "relu",
        dropout: float = 0.0, flatten_axes: int = 0) -> Layer:
    """``Dense -> activation [-> Dropout]`` per entry of ``hidden_features``, then
    ``Dense(out_features)``.

    Shapes: ``x: [..., in_features] -> [..., out_features]``; with ``flatten_axes=k`` the last
    ``k`` axes are flattened first (``flatten_axes=3`` takes images ``[..., H, W, C]``).
    Params: ``{"dense1": ..., "dense2": ..., "head": ...}``.

    >>> import jax, jax.numpy as jnp
    >>> params, _ = MLP([32], 10).init(jax.random.key(0), jnp.zeros((1, 64)))
    >>> jax.tree.map(jnp.shape, params)
    {'dense1': {'b': (32,), 'w': (64, 32)}, 'head': {'b': (10,), 'w': (32, 10)}}
    """
    check_positive("MLP", hidden_features=tuple(hidden_features), out_features=out_features)
    if not isinstance(flatten_axes, int) or isinstance(flatten_axes, bool) or flatten_axes < 0:
        raise ValueError(f"MLP: flatten_axes must be an int >= 0 (how many trailing axes to "
                         f"flatten), got {flatten_axes!r}")
    layers: dict[str, Layer] = {}
    if flatten_axes:
        layers["flatten"] = Flatten(-flatten_axes)
    for i, size in enumerate(hidden_features, start=1):
        layers[f"dense{i}"] = Dense(size)
        layers[f"act{i}"] = activation_layer(activation)
        if dropout:
            layers[f"dropout{i}"] = Dropout(dropout)
    layers["head"] = Dense(out_features)
    return serial(**layers)._replace(name="MLP")
