"""ResNet (He et al. 2016) with basic and bottleneck blocks, channels-last.

The layout follows torchvision's ResNet v1.5 (stride on the 3x3 convolution of a bottleneck,
projection shortcuts where the shape changes, no bias before BatchNorm), so the ImageNet
configurations have the same parameter counts: ``ResNet((2, 2, 2, 2))`` (ResNet-18) has
11,689,512 and ``ResNet((3, 4, 6, 3), block="bottleneck")`` (ResNet-50) 25,557,032.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax

from fnn.combinators import serial
from fnn.core import Children, Layer, LayerError, check_positive, where
from fnn.layers import BatchNorm, Conv, Dense, GlobalAvgPool, MaxPool, Relu


def _conv_bn(features: int, kernel: int, strides: int, norm: dict[str, Any], relu: bool) -> dict:
    pad = (kernel - 1) // 2
    layers = {"conv": Conv(features, (kernel, kernel), strides=strides, padding=pad,
                           use_bias=False),
              "bn": BatchNorm(**norm)}
    if relu:
        layers["relu"] = Relu()
    return layers


def _block(name: str, body: dict[str, Layer], shortcut: Layer | None) -> Layer:
    """``relu(body(x) + shortcut(x))`` with the body's layers named at the top of the params
    (``{"conv1", "bn1", ..., "shortcut"}``) and an identity shortcut when none is given."""
    children = Children(name, body | ({} if shortcut is None else {"shortcut": shortcut}))

    def init(key, x):
        child = children.initializer(key)
        h = x
        for child_name in body:
            h = child(child_name, h)
        if shortcut is not None:
            child("shortcut", x)
        return child.params, child.state

    def apply(params, state, x, *, key=None, train=False):
        child = children.runner(params, state, key, train)
        h = x
        for child_name in body:
            h = child(child_name, h)
        skip = x if shortcut is None else child("shortcut", x)
        if h.shape != skip.shape:
            raise LayerError(f"{where(name)}: the block's output {h.shape} does not match its "
                             f"shortcut's {skip.shape}")
        return jax.nn.relu(h + skip), child.state

    return Layer(init, apply, name)


def BasicBlock(features: int, *, strides: int = 1, project: bool = False,
               norm: dict[str, Any] | None = None) -> Layer:
    """Two 3x3 convolutions with BatchNorm: ``x: [..., H, W, C] -> [..., H/s, W/s, features]``.
    ``project`` adds a 1x1 convolution + BatchNorm shortcut (needed when the shape changes).
    Params ``{"conv1", "bn1", "conv2", "bn2", "shortcut"}``."""
    norm = norm or {}
    first = _conv_bn(features, 3, strides, norm, relu=True)
    second = _conv_bn(features, 3, 1, norm, relu=False)
    body = {"conv1": first["conv"], "bn1": first["bn"], "relu1": first["relu"],
            "conv2": second["conv"], "bn2": second["bn"]}
    shortcut = serial(**_conv_bn(features, 1, strides, norm, relu=False)) if project else None
    return _block("BasicBlock", body, shortcut)


def Bottleneck(features: int, *, strides: int = 1, project: bool = False,
               norm: dict[str, Any] | None = None, expansion: int = 4) -> Layer:
    """1x1 reduce, 3x3 (with the stride), 1x1 expand to ``expansion * features``, each with
    BatchNorm: ``x: [..., H, W, C] -> [..., H/s, W/s, expansion * features]``.
    Params ``{"conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "shortcut"}``."""
    norm = norm or {}
    layers = [_conv_bn(features, 1, 1, norm, relu=True),
              _conv_bn(features, 3, strides, norm, relu=True),
              _conv_bn(expansion * features, 1, 1, norm, relu=False)]
    body: dict[str, Layer] = {}
    for i, conv_bn in enumerate(layers, start=1):
        body[f"conv{i}"], body[f"bn{i}"] = conv_bn["conv"], conv_bn["bn"]
        if "relu" in conv_bn:
            body[f"relu{i}"] = conv_bn["relu"]
    out = expansion * features
    shortcut = serial(**_conv_bn(out, 1, strides, norm, relu=False)) if project else None
    return _block("Bottleneck", body, shortcut)


def ResNet(stage_sizes: Sequence[int] = (2, 2, 2, 2), *, block: str = "basic",
           num_classes: int = 1000, features: int = 64, stem: str = "imagenet",
           axis_name: str | None = None, momentum: float = 0.9) -> Layer:
    """ResNet: a stem, stages of blocks (width doubling and stride 2 from the second stage on),
    global average pooling and a dense head.

    Shapes: ``x: [..., H, W, C] -> [..., num_classes]``. ``features`` is the first stage's
    width (doubling from stage to stage). ``stage_sizes`` gives the blocks per stage:
    ``(2, 2, 2, 2)`` basic is ResNet-18, ``(3, 4, 6, 3)`` basic ResNet-34 and bottleneck
    ResNet-50. ``stem="imagenet"`` is conv 7x7/2 + max-pool 3x3/2; ``stem="small"`` a single
    3x3 convolution, for small images (CIFAR, digits). ``axis_name`` makes every BatchNorm
    compute statistics across devices. Params: ``{"stem", "stage1": {"block1", ...}, ...,
    "head"}``.
    """
    check_positive("ResNet", stage_sizes=tuple(stage_sizes), num_classes=num_classes,
                   features=features)
    if block not in ("basic", "bottleneck"):
        raise ValueError(f"ResNet: block must be 'basic' or 'bottleneck', got {block!r}")
    if stem not in ("imagenet", "small"):
        raise ValueError(f"ResNet: stem must be 'imagenet' or 'small', got {stem!r}")
    norm = {"momentum": momentum, "axis_name": axis_name}
    if stem == "imagenet":
        stem_layer = serial(**_conv_bn(features, 7, 2, norm, relu=True),
                            pool=MaxPool((3, 3), strides=2, padding=1))
    else:
        stem_layer = serial(**_conv_bn(features, 3, 1, norm, relu=True))
    make_block, expansion = (BasicBlock, 1) if block == "basic" else (Bottleneck, 4)
    stages: dict[str, Layer] = {"stem": stem_layer}
    in_features = features
    for s, num_blocks in enumerate(stage_sizes):
        width = features * 2 ** s
        blocks = {}
        for b in range(num_blocks):
            strides = 2 if s > 0 and b == 0 else 1
            project = strides != 1 or in_features != width * expansion
            blocks[f"block{b + 1}"] = make_block(width, strides=strides, project=project,
                                                 norm=norm)
            in_features = width * expansion
        stages[f"stage{s + 1}"] = serial(**blocks)
    return serial(**stages, pool=GlobalAvgPool(-3), head=Dense(num_classes))._replace(
        name="ResNet")
