"""LeNet-style convolutional network."""

from __future__ import annotations

from typing import Sequence

from fnn.combinators import serial
from fnn.core import Layer, check_positive
from fnn.layers import Conv, Dense, Dropout, Flatten, MaxPool, Relu


def LeNet(num_classes: int = 10, *, features: Sequence[int] = (32, 64),
          kernel_size: int = 5, hidden_features: int = 256, dropout: float = 0.0) -> Layer:
    """``[Conv(k x k, SAME) -> Relu -> MaxPool(2)] per entry of features -> Flatten ->
    Dense(hidden_features) -> Relu [-> Dropout] -> Dense(num_classes)``.

    Shapes: ``x: [..., H, W, C] -> [..., num_classes]`` (H and W divisible by
    ``2 ** len(features)``). Params: ``{"conv1", "conv2", ..., "fc", "head"}``. The defaults are
    the classic 28x28 LeNet of the benchmarks: conv 5x5x32, pool, conv 5x5x64, pool, dense 256.
    """
    check_positive("LeNet", num_classes=num_classes, features=tuple(features),
                   kernel_size=kernel_size, hidden_features=hidden_features)
    layers: dict[str, Layer] = {}
    for i, width in enumerate(features, start=1):
        layers[f"conv{i}"] = Conv(width, (kernel_size, kernel_size))
        layers[f"relu{i}"] = Relu()
        layers[f"pool{i}"] = MaxPool((2, 2))
    layers["flatten"] = Flatten(-3)
    layers["fc"] = Dense(hidden_features)
    layers["relu"] = Relu()
    if dropout:
        layers["dropout"] = Dropout(dropout)
    layers["head"] = Dense(num_classes)
    return serial(**layers)._replace(name="LeNet")
