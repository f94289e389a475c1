"""DCGAN (Radford et al. 2016): a generator from latent vectors to images and a discriminator
from images to logits, channels-last and sized by the image size.

Both work between ``image_size`` (a power of two, at least 4) and a 4x4 map, one stride-2 step
per doubling: 8x8 images (the digits) take one step, 32x32 three. The generator ends in tanh
(images in ``[-1, 1]``); the discriminator's logit is for "real" (``fnn.losses``'s GAN losses
take it). ``spectral_norm=True`` makes the discriminator an SN-GAN one: every convolution and the
head in :func:`~fnn.layers.reparam.SpectralNorm` and no BatchNorm.
"""

from __future__ import annotations

import math
from typing import Any

from fnn.combinators import serial
from fnn.core import Layer, check_positive, check_rank, shape_error
from fnn.layers import (BatchNorm, Conv, ConvTranspose, Dense, Flatten, LeakyRelu, Relu, Reshape,
                        SpectralNorm, Tanh)


def _steps(name: str, image_size: Any) -> int:
    """The number of stride-2 steps between a 4x4 map and ``image_size``."""
    if (not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 4
            or image_size & (image_size - 1)):
        raise ValueError(f"{name}: image_size must be a power of two >= 4 (4, 8, 16, 32, ...), "
                         f"got {image_size!r}")
    return int(math.log2(image_size)) - 2


def _checked(name: str, model: Layer, expected: str, fits) -> Layer:
    """``model`` named ``name``, with its input checked by ``fits(x)`` first."""

    def check(x):
        if not fits(x):
            raise shape_error(name, expected, x)

    def init(key, x):
        check(x)
        return model.init(key, x)

    def apply(params, state, x, *, key=None, train=False):
        check(x)
        return model.apply(params, state, x, key=key, train=train)

    return Layer(init, apply, name)


def DCGANGenerator(latent_features: int = 64, *, image_size: int = 8, channels: int = 1,
                   features: int = 64, momentum: float = 0.9,
                   axis_name: str | None = None) -> Layer:
    """The DCGAN generator: ``z: [..., latent_features] -> images [..., image_size,
    image_size, channels]`` in ``[-1, 1]``.

    ``Dense(4 * 4 * width)`` reshaped to a 4x4 map of ``width = features * 2 ** steps``
    channels (``steps = log2(image_size / 4)``) ``-> BatchNorm -> ReLU``; per step
    ``ConvTranspose(4x4, stride 2)`` halving the width (to ``features`` at the last) ``->
    BatchNorm -> ReLU``; then ``Conv(channels, 3x3) -> tanh``. The defaults (8x8 digits) have
    263,105 params. Params ``{"project", "norm0", "up1", "norm1", ..., "out"}``; state the
    BatchNorms' statistics (``momentum``; ``axis_name`` for cross-device statistics).

    >>> import jax, jax.numpy as jnp
    >>> generator = DCGANGenerator(16, features=8)
    >>> params, state = generator.init(jax.random.key(0), jnp.zeros((2, 16)))
    >>> images, _ = generator.apply(params, state, jnp.zeros((2, 16)))
    >>> images.shape
    (2, 8, 8, 1)
    """
    name = "DCGANGenerator"
    check_positive(name, latent_features=latent_features, channels=channels, features=features)
    steps = _steps(name, image_size)
    norm = {"momentum": momentum, "axis_name": axis_name}
    width = features * 2 ** steps
    layers: dict[str, Layer] = {"project": Dense(4 * 4 * width, use_bias=False),
                                "reshape": Reshape((4, 4, width), start_axis=-1),
                                "norm0": BatchNorm(**norm), "relu0": Relu()}
    for step in range(1, steps + 1):
        width //= 2
        layers[f"up{step}"] = ConvTranspose(width, (4, 4), strides=2, use_bias=False)
        layers[f"norm{step}"] = BatchNorm(**norm)
        layers[f"relu{step}"] = Relu()
    layers["out"] = Conv(channels, (3, 3))
    layers["tanh"] = Tanh()
    return _checked(name, serial(**layers), f"[..., {latent_features}]",
                    lambda z: hasattr(z, "ndim") and z.ndim >= 1
                    and z.shape[-1] == latent_features)


def DCGANDiscriminator(*, image_size: int = 8, channels: int = 1, features: int = 64,
                       spectral_norm: bool = False, negative_slope: float = 0.2,
                       momentum: float = 0.9, axis_name: str | None = None) -> Layer:
    """The DCGAN discriminator: ``images [..., image_size, image_size, channels] -> logits
    [...]``, one per image.

    ``Conv(features, 3x3) -> LeakyReLU`` at full resolution; per step ``Conv(4x4, stride 2)``
    doubling the width (from ``2 * features``) ``-> BatchNorm -> LeakyReLU`` down to 4x4; then
    ``Flatten -> Dense(1)``. LeakyReLU's ``negative_slope`` is 0.2. ``spectral_norm=True``
    wraps every Conv and the Dense in :func:`~fnn.layers.reparam.SpectralNorm` (their power
    iteration vectors in the state) and leaves the BatchNorms out. The defaults (8x8 digits)
    have 134,017 params. Params ``{"conv0", "conv1", "norm1", ..., "head"}``.

    >>> import jax, jax.numpy as jnp
    >>> discriminator = DCGANDiscriminator(features=8, spectral_norm=True)
    >>> params, state = discriminator.init(jax.random.key(0), jnp.zeros((2, 8, 8, 1)))
    >>> discriminator.apply(params, state, jnp.zeros((2, 8, 8, 1)))[0].shape
    (2,)
    """
    name = "DCGANDiscriminator"
    check_positive(name, channels=channels, features=features)
    steps = _steps(name, image_size)
    wrap = SpectralNorm if spectral_norm else (lambda layer: layer)
    layers: dict[str, Layer] = {"conv0": wrap(Conv(features, (3, 3))),
                                "act0": LeakyRelu(negative_slope)}
    width = features
    for step in range(1, steps + 1):
        width *= 2
        layers[f"conv{step}"] = wrap(Conv(width, (4, 4), strides=2, padding=1,
                                          use_bias=spectral_norm))
        if not spectral_norm:
            layers[f"norm{step}"] = BatchNorm(momentum=momentum, axis_name=axis_name)
        layers[f"act{step}"] = LeakyRelu(negative_slope)
    layers["flatten"] = Flatten(-3)
    layers["head"] = wrap(Dense(1))
    layers["logit"] = Reshape((), start_axis=-1)  # [..., 1] -> [...]
    expected = f"[..., {image_size}, {image_size}, {channels}]"
    return _checked(name, serial(**layers), expected,
                    lambda x: check_rank(name, x, 3, expected) is None
                    and tuple(x.shape[-3:]) == (image_size, image_size, channels))
