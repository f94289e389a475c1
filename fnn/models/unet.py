"""The U-Net of denoising diffusion (Ho et al. 2020, DDPM; the layout of Nichol and Dhariwal's
guided-diffusion), small and channels-last: it predicts the noise in ``x_t`` given the timestep
``t`` and, for classifier-free guidance, a class label.

Levels: level ``i`` works at resolution ``H / 2 ** i`` with ``features * multipliers[i]``
channels. The way down runs ``num_res_blocks`` residual blocks per level (each followed by
self-attention at the levels in ``attention_levels``) and a stride-2 convolution between levels;
the middle runs block, attention, block at the lowest level; the way up runs
``num_res_blocks + 1`` blocks per level, each on its input concatenated with the matching
output of the way down (the stem's, every block's and every downsampling's, last first), and a
nearest upsampling followed by a 3x3 convolution between levels. Every block adds a projection
of the conditioning (the timestep embedding plus the label embedding) to its feature map.

Unlike DDPM, no layer starts at zero (DDPM zeroes the last convolution of each block and of the
output): every parameter gets a gradient from the first step, and the conditioning changes the
output at initialisation.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from fnn.combinators import serial
from fnn.core import Children, Layer, ShapeError, check_positive, check_rate, describe, where
from fnn.layers import (Conv, Dense, Dropout, Embedding, GroupNorm, MultiHeadAttention, Silu,
                        TimestepEmbedding, Upsample)


def _composite(name: str, children: Children, forward: Callable[[Any, Any], Any]) -> Layer:
    """A layer whose ``init`` and ``apply`` both run ``forward(child, x)``, where ``child(name,
    value)`` initialises a child (on specs) or applies it: ``forward`` only routes values
    between children, so it runs on specs as on arrays."""

    def init(key, x):
        child = children.initializer(key)
        forward(child, x)
        return child.params, child.state

    def apply(params, state, x, *, key=None, train=False):
        child = children.runner(params, state, key, train)
        return forward(child, x), child.state

    return Layer(init, apply, name)


def _joined(x: Any, skip: Any | None) -> Any:
    """``x`` and ``skip`` concatenated along the channels (``x`` alone without a skip)."""
    return x if skip is None else jnp.concatenate([x, skip.astype(x.dtype)], axis=-1)


def _ResBlock(features: int, num_groups: int, dropout: float) -> Layer:
    """``(x, emb)`` or ``(x, skip, emb)`` -> ``[..., H, W, features]``: on ``h = x`` (or ``x``
    and ``skip`` concatenated), ``conv1(silu(norm1(h))) + time(silu(emb))`` broadcast over the
    positions, then ``conv2(drop(silu(norm2(.))))``, plus ``h`` (through the 1x1 convolution
    ``skip`` when its width differs). ``emb: [..., E]``."""
    name = "ResBlock"

    def parts(in_features: int) -> Children:
        return Children(name, {
            "norm1": GroupNorm(num_groups, start_axis=-3), "act": Silu(),
            "conv1": Conv(features, (3, 3)), "time": Dense(features),
            "norm2": GroupNorm(num_groups, start_axis=-3), "drop": Dropout(dropout),
            "conv2": Conv(features, (3, 3))}
            | ({} if in_features == features else {"skip": Conv(features, (1, 1))}))

    def split(inputs):
        *maps, emb = inputs
        return (maps[0], maps[1] if len(maps) == 2 else None), emb

    def init(key, inputs):
        (x, skip), emb = split(inputs)
        h = jax.eval_shape(_joined, x, skip)
        children = parts(h.shape[-1])
        child = children.initializer(key)
        child("conv2", child("drop", child("act", child("norm2", child(
            "conv1", child("act", child("norm1", h)))))))
        child("time", child("act", emb))
        if "skip" in children:
            child("skip", h)
        return child.params, child.state

    def apply(params, state, inputs, *, key=None, train=False):
        (x, skip), emb = split(inputs)
        h = _joined(x, skip)
        children = parts(h.shape[-1])
        child = children.runner(params, state, key, train)
        y = child("conv1", child("act", child("norm1", h)))
        t = child("time", child("act", emb))  # [..., features]
        y = y + t.reshape(t.shape[:-1] + (1, 1, features)).astype(y.dtype)
        y = child("conv2", child("drop", child("act", child("norm2", y))))
        return y + (child("skip", h) if "skip" in children else h).astype(y.dtype), state

    return Layer(init, apply, name)


def _AttentionBlock(num_heads: int, num_groups: int) -> Layer:
    """``x: [..., H, W, C] -> x + attention(norm(x))``, self-attention over the ``H * W``
    positions."""
    name = "AttentionBlock"
    children = Children(name, norm=GroupNorm(num_groups, start_axis=-3),
                        attention=MultiHeadAttention(num_heads))

    def flat(x):
        return x.shape[:-3] + (x.shape[-3] * x.shape[-2], x.shape[-1])  # [..., H * W, C]

    def init(key, x):
        child = children.initializer(key)
        h = child("norm", x)
        child("attention", jax.ShapeDtypeStruct(flat(h), h.dtype))
        return child.params, child.state

    def apply(params, state, x, *, key=None, train=False):
        child = children.runner(params, state, key, train)
        h = child("attention", child("norm", x).reshape(flat(x)))
        return x + h.reshape(x.shape).astype(x.dtype), state

    return Layer(init, apply, name)


def _Conditioning(time_features: int, frequency_features: int,
                  num_classes: int | None) -> Layer:
    """``t`` or ``(t, labels)`` -> ``[..., time_features]``: the timestep embedding, plus the
    label's embedding (``num_classes + 1`` rows, the last the null label)."""
    name = "Conditioning"
    children = Children(name, {"time": TimestepEmbedding(
        time_features, frequency_features=frequency_features)}
        | ({} if num_classes is None else {"label": Embedding(num_classes + 1, time_features)}))

    def init(key, inputs):
        child = children.initializer(key)
        t, labels = inputs if num_classes is not None else (inputs, None)
        child("time", t)
        if labels is not None:
            child("label", labels)
        return child.params, child.state

    def apply(params, state, inputs, *, key=None, train=False):
        child = children.runner(params, state, key, train)
        t, labels = inputs if num_classes is not None else (inputs, None)
        emb = child("time", t)
        if labels is not None:
            emb = emb + child("label", labels).astype(emb.dtype)
        return emb, state

    return Layer(init, apply, name)


def _down_level(width: int, blocks: int, attention: bool, downsample: bool, make) -> Layer:
    """``(h, emb) -> (h, skips)``: the way down at one level; ``skips`` every output kept for
    the way up."""
    layers: dict[str, Layer] = {}
    for j in range(1, blocks + 1):
        layers[f"block{j}"] = make.block(width)
        if attention:
            layers[f"attention{j}"] = make.attention()
    if downsample:
        layers["downsample"] = Conv(width, (3, 3), strides=2)

    def forward(child, inputs):
        h, emb = inputs
        skips = []
        for j in range(1, blocks + 1):
            h = child(f"block{j}", (h, emb))
            if attention:
                h = child(f"attention{j}", h)
            skips.append(h)
        if downsample:
            h = child("downsample", h)
            skips.append(h)
        return h, tuple(skips)

    return _composite("Down", Children("Down", layers), forward)


def _up_level(width: int, blocks: int, attention: bool, upsample: bool, make) -> Layer:
    """``(h, emb, skips) -> h``: the way up at one level, one block per skip (last first)."""
    layers: dict[str, Layer] = {}
    for j in range(1, blocks + 1):
        layers[f"block{j}"] = make.block(width)
        if attention:
            layers[f"attention{j}"] = make.attention()
    if upsample:
        layers["upsample"] = serial(resize=Upsample(2), conv=Conv(width, (3, 3)))

    def forward(child, inputs):
        h, emb, skips = inputs
        for j, skip in enumerate(reversed(skips), start=1):
            h = child(f"block{j}", (h, skip, emb))
            if attention:
                h = child(f"attention{j}", h)
        return child("upsample", h) if upsample else h

    return _composite("Up", Children("Up", layers), forward)


class _Makers:
    """The block factories with the U-Net's settings."""

    def __init__(self, num_groups: int, dropout: float, num_heads: int):
        self.num_groups, self.dropout, self.num_heads = num_groups, dropout, num_heads

    def block(self, features: int) -> Layer:
        return _ResBlock(features, self.num_groups, self.dropout)

    def attention(self) -> Layer:
        return _AttentionBlock(self.num_heads, self.num_groups)


def UNet(*, channels: int = 1, features: int = 32, multipliers: Sequence[int] = (1, 2),
         num_res_blocks: int = 1, attention_levels: Sequence[int] | None = None,
         num_heads: int = 4, num_groups: int = 8, num_classes: int | None = None,
         dropout: float = 0.0, time_features: int | None = None) -> Layer:
    """The DDPM U-Net (see the module docstring): predicts the noise of ``x_t``.

    Shapes: the input is a tuple ``(x_t, t)``, or ``(x_t, t, labels)`` when ``num_classes`` is
    set: ``x_t: [..., H, W, channels]``, ``t: [...]`` (int timesteps or floats), ``labels:
    int[...]`` in ``[0, num_classes]``, where the id ``num_classes`` is "no label" (the null
    class of classifier-free guidance) ``-> [..., H, W, channels]``. ``H`` and ``W`` must be
    divisible by ``2 ** (len(multipliers) - 1)``.

    - ``features``: the base width; level ``i`` has ``features * multipliers[i]`` channels.
      The defaults suit 8x8 digits: levels at 8x8 (32 channels) and 4x4 (64), 701,345 params.
    - ``attention_levels``: the levels (indices into ``multipliers``) with self-attention after
      each block; default the lowest-resolution one. The middle's attention is there when the
      lowest level is listed (``()``: no attention at all). ``num_heads`` heads.
    - ``num_groups``: GroupNorm's groups (every width must be divisible by it).
    - ``time_features``: the width of the conditioning embedding, default ``4 * features``
      (DDPM's): the timesteps' sinusoidal features of ``features`` entries through
      :func:`~fnn.layers.conditioning.TimestepEmbedding`, plus a label embedding of
      ``num_classes + 1`` rows when ``num_classes`` is set.
    - ``dropout``: in every block, before its second convolution (needs ``key=`` in training).

    Params: ``{"conditioning": {"time", "label"}, "stem", "down0", "down1", ..., "middle",
    ..., "up1", "up0", "out"}``; level ``i``'s blocks ``{"block1", "attention1", ...,
    "downsample"}`` on the way down and ``{"block1", ..., "upsample"}`` on the way up.

    >>> import jax, jax.numpy as jnp
    >>> model = UNet(features=8, num_heads=2)
    >>> x_t, t = jnp.zeros((2, 8, 8, 1)), jnp.array([10, 500])
    >>> params, state = model.init(jax.random.key(0), (x_t, t))
    >>> sorted(params)
    ['conditioning', 'down0', 'down1', 'middle', 'out', 'stem', 'up0', 'up1']
    >>> model.apply(params, state, (x_t, t))[0].shape
    (2, 8, 8, 1)
    """
    name = "UNet"
    multipliers = tuple(multipliers)
    check_positive(name, channels=channels, features=features, multipliers=multipliers,
                   num_res_blocks=num_res_blocks, num_heads=num_heads, num_groups=num_groups)
    if num_classes is not None:
        check_positive(name, num_classes=num_classes)
    check_rate(name, "dropout", dropout)
    time_features = 4 * features if time_features is None else time_features
    check_positive(name, time_features=time_features)
    levels = len(multipliers)
    lowest = levels - 1
    attention_levels = (lowest,) if attention_levels is None else tuple(attention_levels)
    if not all(isinstance(i, int) and 0 <= i < levels for i in attention_levels):
        raise ValueError(f"{name}: attention_levels must be indices into multipliers "
                         f"(0 to {lowest}), got {attention_levels!r}")
    widths = [features * m for m in multipliers]
    if any(w % num_groups for w in widths):
        raise ValueError(f"{name}: every level's width (features * multipliers = {widths}) "
                         f"must be divisible by num_groups={num_groups}")
    if any(widths[i] % num_heads for i in attention_levels):
        raise ValueError(f"{name}: the widths of the attention levels "
                         f"({[widths[i] for i in attention_levels]}) must be divisible by "
                         f"num_heads={num_heads}")

    make = _Makers(num_groups, dropout, num_heads)
    layers: dict[str, Layer] = {"conditioning": _Conditioning(time_features, features,
                                                              num_classes),
                                "stem": Conv(features, (3, 3))}
    for i in range(levels):
        layers[f"down{i}"] = _down_level(widths[i], num_res_blocks, i in attention_levels,
                                         i < lowest, make)
    middle = {"block1": make.block(widths[lowest])}
    if lowest in attention_levels:
        middle["attention"] = make.attention()
    middle["block2"] = make.block(widths[lowest])
    layers["middle"] = _middle(middle)
    for i in reversed(range(levels)):
        layers[f"up{i}"] = _up_level(widths[i], num_res_blocks + 1, i in attention_levels,
                                     i > 0, make)
    layers["out"] = serial(norm=GroupNorm(num_groups, start_axis=-3), act=Silu(),
                           conv=Conv(channels, (3, 3)))
    children = Children(name, layers)

    def forward(child, inputs):
        x, t, labels = _check_inputs(inputs, channels, levels, num_classes)
        emb = child("conditioning", t if labels is None else (t, labels))
        h = child("stem", x)
        skips = [h]
        for i in range(levels):
            h, kept_here = child(f"down{i}", (h, emb))
            skips.extend(kept_here)
        h = child("middle", (h, emb))
        for i in reversed(range(levels)):
            n = num_res_blocks + 1
            h = child(f"up{i}", (h, emb, tuple(skips[-n:])))
            del skips[-n:]
        return child("out", h)

    return _composite(name, children, forward)


def _middle(layers: dict[str, Layer]) -> Layer:
    """``(h, emb) -> h``: block, attention (if any), block at the lowest level."""

    def forward(child, inputs):
        h, emb = inputs
        h = child("block1", (h, emb))
        if "attention" in layers:
            h = child("attention", h)
        return child("block2", (h, emb))

    return _composite("Middle", Children("Middle", layers), forward)


def _check_inputs(inputs: Any, channels: int, levels: int, num_classes: int | None):
    """``(x_t, t, labels)`` (``labels`` ``None`` without ``num_classes``), checked."""
    expected = (f"(x_t [..., H, W, {channels}], t [...]"
                + (", labels int[...])" if num_classes is not None else ")"))
    given = (f"({', '.join(describe(a) for a in inputs)})" if isinstance(inputs, (tuple, list))
             else describe(inputs))

    def fail(detail: str) -> ShapeError:
        return ShapeError(f"{where('UNet')}: expected input {expected}, got {given}{detail}")

    if not isinstance(inputs, (tuple, list)) or len(inputs) not in (2, 3):
        raise fail("")
    if len(inputs) == 3 and num_classes is None:
        raise fail(": labels need a model built with num_classes")
    if len(inputs) == 2 and num_classes is not None:
        raise fail(f": a model built with num_classes takes labels (the id {num_classes} is "
                   f"the null label, for no class)")
    x, t, labels = tuple(inputs) + (None,) * (3 - len(inputs))
    if not hasattr(x, "ndim") or x.ndim < 3 or x.shape[-1] != channels or not jnp.issubdtype(
            x.dtype, jnp.floating):
        raise fail("")
    factor = 2 ** (levels - 1)
    if x.shape[-3] % factor or x.shape[-2] % factor:
        raise fail(f": H and W must be divisible by {factor} (2 ** (len(multipliers) - 1), "
                   f"the downsampling)")
    batch = tuple(x.shape[:-3])
    if not hasattr(t, "shape") or tuple(t.shape) != batch or not (
            jnp.issubdtype(t.dtype, jnp.integer) or jnp.issubdtype(t.dtype, jnp.floating)):
        raise fail(f": t must be int or float with x_t's batch axes {list(batch)}")
    if labels is not None and (not hasattr(labels, "shape") or tuple(labels.shape) != batch
                               or not jnp.issubdtype(labels.dtype, jnp.integer)):
        raise fail(f": labels must be int with x_t's batch axes {list(batch)}")
    return x, t, labels

