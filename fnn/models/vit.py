"""Transformer encoders for classification: the Vision Transformer (images) and a sequence
classifier (token ids).

Both use **mean pooling** over the tokens rather than a class token: it needs no extra token or
parameter, works with any number of patches, and is as accurate as the class token for ViTs
trained from scratch (Beyer et al., "Better plain ViT baselines for ImageNet-1k", 2022). The
encoder blocks are pre-norm ``EncoderBlock``s in one ``repeat`` (one ``lax.scan``: compile time
flat in depth), followed by a final LayerNorm, the pooling and a Dense head.
"""

from __future__ import annotations

from jax.nn import initializers

from fnn.combinators import repeat, serial
from fnn.core import Layer, check_positive, check_rank, shape_error
from fnn.layers import (Conv, Dense, Dropout, Embedding, EncoderBlock, GlobalAvgPool,
                        LearnedPositionEmbedding, Reshape)
from fnn.layers.transformer import make_norm


def _PatchPositions() -> Layer:
    """A learned position embedding sized at ``init`` from the input: ``x: [..., N, d] ->
    x + table``, params ``{"table": [N, d]}`` (N = number of patches, fixed by the image size
    seen at ``init``)."""
    name = "LearnedPositionEmbedding"

    def init(key, x):
        check_rank(name, x, 2, "[..., patches, features]")
        return LearnedPositionEmbedding(x.shape[-2]).init(key, x)

    def apply(params, state, x, *, key=None, train=False):
        n = params["table"].shape[0]
        if not hasattr(x, "ndim") or x.ndim < 2 or x.shape[-2] != n:
            raise shape_error(name, f"[..., {n}, features] (the number of patches of the images "
                                    f"seen at init)", x)
        return LearnedPositionEmbedding(n).apply(params, state, x, key=key, train=train)

    return Layer(init, apply, name)


def _Patches(features: int, patch_size: int) -> Layer:
    """The patch embedding: ``Conv(features, (p, p), strides=(p, p), padding="VALID")`` on
    images whose ``H`` and ``W`` are multiples of ``p`` (others would lose their last rows and
    columns): ``[..., H, W, C] -> [..., H / p, W / p, features]``; the Conv's params."""
    conv = Conv(features, (patch_size, patch_size), strides=(patch_size, patch_size),
                padding="VALID")
    name = "PatchEmbedding"

    def check(x):
        check_rank(name, x, 3, "[..., H, W, C]")
        if x.shape[-3] % patch_size or x.shape[-2] % patch_size:
            raise shape_error(name, f"[..., H, W, C] with H and W multiples of "
                                    f"patch_size={patch_size}", x)

    def init(key, x):
        check(x)
        return conv.init(key, x)

    def apply(params, state, x, *, key=None, train=False):
        check(x)
        return conv.apply(params, state, x, key=key, train=train)

    return Layer(init, apply, name)


def ViT(num_classes: int, *, patch_size: int, features: int, num_heads: int, num_layers: int,
        hidden_features: int, dropout: float = 0.0, activation: str = "gelu",
        norm: str = "layer", norm_epsilon: float | None = None,
        use_bias: bool = True) -> Layer:
    """The Vision Transformer (Dosovitskiy et al., 2021) with mean pooling.
    ``images: [..., H, W, C] -> logits [..., num_classes]``, ``H`` and ``W`` multiples of
    ``patch_size``::

        patches = Conv(features, patch_size, strides=patch_size)(images)  # [..., H/p, W/p, d]
        tokens  = reshape(patches, [..., N, d]) + position                # N = HW / p^2
        tokens  = repeat(EncoderBlock(num_heads, hidden_features, dropout, ...),
                         num_layers)(dropout(tokens))
        logits  = head(mean over N of norm(tokens))

    Params: ``{"patches": {"w": [p, p, C, features], "b"}, "position": {"table": [N,
    features]}, "blocks": {"layers": EncoderBlock params stacked [num_layers, ...]}, "norm":
    {"scale", "b"}, "head": {"w": [features, num_classes], "b"}}``. The number of patches ``N``
    is fixed by the image size seen at ``init``. ``dropout`` (on the embedded patches, the
    residual branches and the feed-forward) needs ``key=`` in training. ``activation``,
    ``norm``, ``norm_epsilon`` and ``use_bias`` are the blocks' (the norm also the final one).

    >>> import jax, jax.numpy as jnp
    >>> model = ViT(10, patch_size=4, features=16, num_heads=2, num_layers=2, hidden_features=32)
    >>> params, state = model.init(jax.random.key(0), jnp.zeros((3, 8, 8, 1)))
    >>> params["position"]["table"].shape
    (4, 16)
    >>> model.apply(params, state, jnp.zeros((3, 8, 8, 1)))[0].shape
    (3, 10)
    """
    check_positive("ViT", num_classes=num_classes, patch_size=patch_size, features=features,
                   num_heads=num_heads, num_layers=num_layers, hidden_features=hidden_features)
    block = EncoderBlock(num_heads, hidden_features, dropout=dropout, activation=activation,
                         norm=norm, norm_epsilon=norm_epsilon, use_bias=use_bias)
    return serial(
        patches=_Patches(features, patch_size),
        tokens=Reshape((-1, features), start_axis=-3),
        position=_PatchPositions(),
        drop=Dropout(dropout),
        blocks=repeat(block, num_layers),
        norm=make_norm("ViT", norm, norm_epsilon),
        pool=GlobalAvgPool(-2),
        head=Dense(num_classes),
    )._replace(name="ViT")


def TransformerClassifier(vocab_size: int, num_classes: int, *, features: int, num_heads: int,
                          num_layers: int, hidden_features: int, max_length: int,
                          dropout: float = 0.0, activation: str = "gelu", norm: str = "layer",
                          norm_epsilon: float | None = None, use_bias: bool = True) -> Layer:
    """A transformer encoder over token ids with mean pooling over time.
    ``ids: int[..., time] -> logits [..., num_classes]`` with ``time <= max_length``::

        h = repeat(EncoderBlock(num_heads, hidden_features, ...), num_layers)(
            embed(ids) + position[0:time])
        logits = head(mean over time of norm(h))

    For padded batches give a ``Seq(ids, lengths=...)``: attention ignores the padding and the
    mean is over each sequence's valid positions (without lengths every position counts).
    Params: ``{"embed": {"table": [vocab_size, features]}, "position": {"table": [max_length,
    features]}, "blocks": {"layers": ...}, "norm": ..., "head": {"w": [features, num_classes],
    "b"}}``. ``activation``, ``norm``, ``norm_epsilon`` and ``use_bias`` are the blocks'.

    >>> import jax, jax.numpy as jnp
    >>> model = TransformerClassifier(20, 3, features=8, num_heads=2, num_layers=1,
    ...                               hidden_features=16, max_length=12)
    >>> params, state = model.init(jax.random.key(0), jnp.zeros((4, 12), jnp.int32))
    >>> model.apply(params, state, jnp.zeros((4, 12), jnp.int32))[0].shape
    (4, 3)
    """
    check_positive("TransformerClassifier", vocab_size=vocab_size, num_classes=num_classes,
                   features=features, num_heads=num_heads, num_layers=num_layers,
                   hidden_features=hidden_features, max_length=max_length)
    block = EncoderBlock(num_heads, hidden_features, dropout=dropout, activation=activation,
                         norm=norm, norm_epsilon=norm_epsilon, use_bias=use_bias)
    return serial(
        embed=Embedding(vocab_size, features, table_init=initializers.normal(stddev=0.02)),
        position=LearnedPositionEmbedding(max_length),
        drop=Dropout(dropout),
        blocks=repeat(block, num_layers),
        norm=make_norm("TransformerClassifier", norm, norm_epsilon),
        pool=GlobalAvgPool(-2),
        head=Dense(num_classes),
    )._replace(name="TransformerClassifier")


__all__ = ["ViT", "TransformerClassifier"]
