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
from fnn.layers import (Conv, Dropout, Embedding, EncoderBlock, GlobalAvgPool, LayerNorm,
                        LearnedPositionEmbedding, Dense, Reshape)


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


def ViT(num_classes: int, *, patch_size: int, d_model: int, num_heads: int, num_layers: int,
        mlp: int, dropout: float = 0.0) -> Layer:
    """The Vision Transformer (Dosovitskiy et al., 2021) with mean pooling.
    ``images: [..., H, W, C] -> logits [..., num_classes]``, ``H`` and ``W`` multiples of
    ``patch_size``::

        patches = Conv(d_model, patch_size, strides=patch_size)(images)   # [..., H/p, W/p, d]
        tokens  = reshape(patches, [..., N, d]) + position                # N = HW / p^2
        tokens  = repeat(EncoderBlock(num_heads, mlp, dropout), num_layers)(dropout(tokens))
        logits  = head(mean over N of LayerNorm(tokens))

    Params: ``{"patches": {"w": [p, p, C, d_model], "b"}, "position": {"table": [N, d_model]},
    "blocks": {"layers": EncoderBlock params stacked [num_layers, ...]}, "norm": {"scale",
    "bias"}, "head": {"w": [d_model, num_classes], "b"}}``. The number of patches ``N`` is
    fixed by the image size seen at ``init``. ``dropout`` (on the embedded patches, the residual
    branches and the feed-forward) needs ``key=`` in training.

    >>> import jax, jax.numpy as jnp
    >>> model = ViT(10, patch_size=4, d_model=16, num_heads=2, num_layers=2, mlp=32)
    >>> params, state = model.init(jax.random.key(0), jnp.zeros((3, 8, 8, 1)))
    >>> params["position"]["table"].shape
    (4, 16)
    >>> model.apply(params, state, jnp.zeros((3, 8, 8, 1)))[0].shape
    (3, 10)
    """
    check_positive("ViT", num_classes=num_classes, patch_size=patch_size, d_model=d_model,
                   num_heads=num_heads, num_layers=num_layers, mlp=mlp)
    return serial(
        patches=Conv(d_model, (patch_size, patch_size), strides=(patch_size, patch_size),
                     padding="VALID"),
        tokens=Reshape((-1, d_model), start_axis=-3),
        position=_PatchPositions(),
        drop=Dropout(dropout),
        blocks=repeat(EncoderBlock(num_heads, mlp, dropout=dropout), num_layers),
        norm=LayerNorm(),
        pool=GlobalAvgPool(-2),
        head=Dense(num_classes),
    )._replace(name="ViT")


def TransformerClassifier(vocab_size: int, num_classes: int, *, d_model: int, num_heads: int,
                          num_layers: int, mlp: int, max_length: int,
                          dropout: float = 0.0) -> Layer:
    """A transformer encoder over token ids with mean pooling over time.
    ``ids: int[..., time] -> logits [..., num_classes]`` with ``time <= max_length``::

        h = repeat(EncoderBlock(num_heads, mlp), num_layers)(embed(ids) + position[0:time])
        logits = head(mean over time of LayerNorm(h))

    Every position counts in the mean (no padding mask). Params: ``{"embed": {"table":
    [vocab_size, d_model]}, "position": {"table": [max_length, d_model]}, "blocks": {"layers":
    ...}, "norm": ..., "head": {"w": [d_model, num_classes], "b"}}``.

    >>> import jax, jax.numpy as jnp
    >>> model = TransformerClassifier(20, 3, d_model=8, num_heads=2, num_layers=1, mlp=16,
    ...                               max_length=12)
    >>> params, state = model.init(jax.random.key(0), jnp.zeros((4, 12), jnp.int32))
    >>> model.apply(params, state, jnp.zeros((4, 12), jnp.int32))[0].shape
    (4, 3)
    """
    check_positive("TransformerClassifier", vocab_size=vocab_size, num_classes=num_classes,
                   d_model=d_model, num_heads=num_heads, num_layers=num_layers, mlp=mlp,
                   max_length=max_length)
    return serial(
        embed=Embedding(vocab_size, d_model, table_init=initializers.normal(stddev=0.02)),
        position=LearnedPositionEmbedding(max_length),
        drop=Dropout(dropout),
        blocks=repeat(EncoderBlock(num_heads, mlp, dropout=dropout), num_layers),
        norm=LayerNorm(),
        pool=GlobalAvgPool(-2),
        head=Dense(num_classes),
    )._replace(name="TransformerClassifier")


__all__ = ["ViT", "TransformerClassifier"]
