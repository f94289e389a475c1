"""Data augmentation: random crops, flips, shifts, noise and cutout as layers, and the
batch-level mixes ``mixup`` and ``cutmix`` as functions (they change the labels too).

The layers are stochastic, without params or state, and active only in training: with
``train=False`` they return the input unchanged and need no key. Images are channels-last,
``x: [..., height, width, channels]`` as for :func:`~fnn.layers.Conv`; every image of the
leading axes (usually ``[batch]``) gets its own draw from the one ``key``. Under ``jax.vmap``
the draws follow the key: mapped with one key for all, every mapped slice draws alike; map
split keys with it for independent draws. Put them in front of a model::

    model = fnn.serial(fnn.RandomCrop(1), fnn.RandomFlip(), LeNet(10))

>>> import jax, jax.numpy as jnp
>>> crop = RandomCrop(1)
>>> x = jnp.arange(2 * 3 * 3, dtype=jnp.float32).reshape(2, 3, 3, 1)
>>> crop.init(jax.random.key(0), x)  # no params, no state
({}, {})
>>> bool(jnp.all(crop.apply({}, {}, x)[0] == x))  # evaluation: the identity, no key needed
True
>>> y, _ = crop.apply({}, {}, x, key=jax.random.key(0), train=True)
>>> y.shape
(2, 3, 3, 1)

``mixup`` and ``cutmix`` mix a batch and return soft labels for
:func:`fnn.losses.softmax_cross_entropy`. ``fit``, ``train`` and the train steps take one as
``mix`` (``functools.partial(fnn.mixup, num_classes=10, alpha=0.2)``) and apply it to every
training batch; in a loop of your own, call it on the batch in training only::

    mixed, soft_labels = fnn.cutmix(mix_key, x, labels, num_classes, alpha=1.0)
    logits, state = model.apply(params, state, mixed, key=model_key, train=True)
    loss = fnn.losses.softmax_cross_entropy(logits, soft_labels)
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

from fnn.core import (Layer, ShapeError, align, at_least_float32, check_floating, check_positive,
                      check_rank, check_train, describe, expect_params, per_position, require_key,
                      shape_error)

_IMAGES = "[..., height, width, channels]"
_MODES = ("constant", "reflect", "edge")


def _check_count(name: str, arg: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name}: {arg} must be an integer >= 0, got {value!r}")


def _check_probability(name: str, arg: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}: {arg} must be a probability in [0, 1], got {value!r}")


def _check_images(name: str, x: Any) -> None:
    check_rank(name, x, 3, _IMAGES)


def _augmentation(name: str, augment: Callable[[jax.Array, jax.Array], jax.Array],
                  check: Callable[[str, Any], None], active: bool) -> Layer:
    """A parameter-free layer that applies ``augment(key, x)`` in training (when ``active``:
    hyper-parameters that change nothing need no key) and is the identity otherwise."""

    def init(key, x):
        check(name, x)
        return {}, {}

    def apply(params, state, x, *, key=None, train=False):
        check_train(train)
        expect_params(name, params, {})
        check(name, x)
        if not train or not active:
            return x, state
        return augment(require_key(name, key), x), state

    return Layer(init, apply, name)


def _random_windows(key: jax.Array, x: jax.Array, pad: int, mode: str) -> jax.Array:
    """Each image of ``x: [..., H, W, C]`` padded by ``pad`` on every side and cut back to
    ``H x W`` at an offset drawn uniformly from ``[0, 2 * pad]`` on each spatial axis."""
    *lead, height, width, channels = x.shape
    padded = jnp.pad(x, [(0, 0)] * len(lead) + [(pad, pad), (pad, pad), (0, 0)], mode=mode)
    offsets = jax.random.randint(key, (*lead, 2), 0, 2 * pad + 1)  # [..., (row, col)]
    images = math.prod(lead)
    flat = padded.reshape((images,) + padded.shape[-3:])  # [images, H + 2 pad, W + 2 pad, C]

    def window(image, offset):
        return lax.dynamic_slice(image, (offset[0], offset[1], 0), (height, width, channels))

    return jax.vmap(window)(flat, offsets.reshape(images, 2)).reshape(x.shape)


def RandomCrop(padding: int, *, mode: str = "constant") -> Layer:
    """Pads each side of every image by ``padding`` and crops it back to its size at a random
    offset: torchvision's ``RandomCrop(size, padding)`` with ``size`` the input's size.
    ``x: [..., H, W, C] -> [..., H, W, C]``, any dtype.

    ``mode`` fills the border: ``"constant"`` (zeros), ``"reflect"`` (mirrored without
    repeating the edge, torchvision's ``"reflect"``) or ``"edge"`` (the edge repeated). The
    offset is uniform in ``[0, 2 * padding]`` on each axis, per image.
    """
    _check_count("RandomCrop", "padding", padding)
    if mode not in _MODES:
        raise ValueError(f"RandomCrop: mode must be one of {', '.join(map(repr, _MODES))}, "
                         f"got {mode!r}")
    return _augmentation("RandomCrop", lambda key, x: _random_windows(key, x, padding, mode),
                         _check_images, active=padding > 0)


def RandomTranslate(max_shift: int) -> Layer:
    """Shifts every image by a random whole number of pixels in ``[-max_shift, max_shift]`` on
    each spatial axis (uniform, independent per axis and per image); pixels shifted in are
    zeros. ``x: [..., H, W, C] -> [..., H, W, C]``, any dtype.

    The same as ``RandomCrop(max_shift)``: a shift of ``s`` is a crop of the zero-padded image
    at offset ``max_shift - s``.
    """
    _check_count("RandomTranslate", "max_shift", max_shift)
    return _augmentation("RandomTranslate",
                         lambda key, x: _random_windows(key, x, max_shift, "constant"),
                         _check_images, active=max_shift > 0)


def RandomFlip(*, horizontal: bool = True, vertical: bool = False, p: float = 0.5) -> Layer:
    """Flips every image left-right (``horizontal``, the width axis) and/or upside down
    (``vertical``, the height axis), each with probability ``p``, drawn independently per axis
    and per image. ``x: [..., H, W, C] -> [..., H, W, C]``, any dtype."""
    for arg, value in (("horizontal", horizontal), ("vertical", vertical)):
        if not isinstance(value, bool):
            raise TypeError(f"RandomFlip: {arg} must be a bool, got {value!r}")
    if not (horizontal or vertical):
        raise ValueError("RandomFlip: horizontal and vertical are both False, so nothing would "
                         "be flipped; set at least one")
    _check_probability("RandomFlip", "p", p)
    axes = [axis for axis, on in ((-2, horizontal), (-3, vertical)) if on]

    def flip(key, x):
        for axis, axis_key in zip(axes, jax.random.split(key, len(axes))):
            flipped = jax.random.bernoulli(axis_key, p, x.shape[:-3])[..., None, None, None]
            x = jnp.where(flipped, jnp.flip(x, axis), x)
        return x

    return _augmentation("RandomFlip", flip, _check_images, active=p > 0)


def GaussianNoise(stddev: float) -> Layer:
    """Adds independent ``N(0, stddev ** 2)`` noise to every element, drawn in ``x``'s dtype
    (bfloat16 inputs stay bfloat16). ``x: [...] -> [...]``, floating. Position-wise: a ``Seq``
    passes through."""
    if (not isinstance(stddev, (int, float)) or isinstance(stddev, bool) or not stddev >= 0
            or not math.isfinite(stddev)):
        raise ValueError(f"GaussianNoise: stddev must be a finite number >= 0, got {stddev!r}")

    def check(name, x):
        check_floating(name, x, "[...]")

    def add_noise(key, x):
        return x + stddev * jax.random.normal(key, x.shape, x.dtype)

    return per_position(_augmentation("GaussianNoise", add_noise, check, active=stddev > 0))


def _square_masks(key: jax.Array, shape: tuple[int, ...], size: int) -> jax.Array:
    """``bool[..., H, W]``: for each image of ``shape = (..., H, W, C)``, a ``size x size``
    square at a centre drawn uniformly over the image, clipped at the border."""
    *lead, height, width, _ = shape
    rows_key, cols_key = jax.random.split(key)
    # the square's first row and column: rows [centre - size // 2, centre - size // 2 + size),
    # for even sizes the square of DeVries & Taylor's code, odd ones centred
    top = jax.random.randint(rows_key, (*lead, 1, 1), 0, height) - size // 2
    left = jax.random.randint(cols_key, (*lead, 1, 1), 0, width) - size // 2
    rows = align(lax.broadcasted_iota(jnp.int32, (height, 1), 0), top.ndim)
    cols = align(lax.broadcasted_iota(jnp.int32, (1, width), 1), top.ndim)
    return (rows >= top) & (rows < top + size) & (cols >= left) & (cols < left + size)


def Cutout(size: int, *, p: float = 1.0) -> Layer:
    """Zeroes a ``size x size`` square of every image (all channels), with probability ``p``
    per image (DeVries & Taylor, 2017). The square's centre is uniform over the image, so near
    the border the square is clipped and fewer pixels are zeroed.
    ``x: [..., H, W, C] -> [..., H, W, C]``, any dtype."""
    check_positive("Cutout", size=size)
    _check_probability("Cutout", "p", p)

    def cut(key, x):
        square_key, apply_key = jax.random.split(key)
        masks = _square_masks(square_key, x.shape, size)
        masks &= jax.random.bernoulli(apply_key, p, x.shape[:-3])[..., None, None]
        return jnp.where(masks[..., None], jnp.zeros((), x.dtype), x)

    return _augmentation("Cutout", cut, _check_images, active=p > 0)


# ----------------------------------------------------------------------------- batch mixes

def _check_mix(name: str, x: Any, labels: Any, num_classes: Any, alpha: Any, expected: str,
               rank_fits: Callable[[int], bool]) -> tuple[jax.Array, jax.Array]:
    """Checks the arguments of a batch mix; returns ``x`` and ``labels`` as JAX arrays."""
    check_positive(name, num_classes=num_classes)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0:
        raise ValueError(f"{name}: alpha must be a number > 0, got {alpha!r}")
    if not hasattr(x, "ndim") or not rank_fits(x.ndim):
        raise shape_error(name, expected, x)
    if (not hasattr(labels, "shape") or not jnp.issubdtype(labels.dtype, jnp.integer)
            or tuple(labels.shape) != tuple(x.shape[:1])):
        raise ShapeError(f"{name}: expected labels int[{x.shape[0]}] (a class id per example "
                         f"of x {describe(x)}), got {describe(labels)}")
    return jnp.asarray(x), jnp.asarray(labels)


def _targets(labels: jax.Array, num_classes: int) -> jax.Array:
    """``float32[batch, num_classes]`` one-hot rows; NaN rows for labels outside
    ``[0, num_classes)``, so the loss is NaN as it is for such integer labels."""
    inside = (labels >= 0) & (labels < num_classes)
    one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    return jnp.where(inside[:, None], one_hot, jnp.asarray(jnp.nan, jnp.float32))


def _mix_labels(labels: jax.Array, partners: jax.Array, num_classes: int,
                lam: jax.Array) -> jax.Array:
    return lam * _targets(labels, num_classes) + (1 - lam) * _targets(partners, num_classes)


def mixup(key: jax.Array, x: jax.Array, labels: jax.Array, num_classes: int, *,
          alpha: float) -> tuple[jax.Array, jax.Array]:
    """Mixup (Zhang et al., 2018): the batch mixed with a random permutation of itself.

    ``x: [batch, ...]`` floating, ``labels: int[batch]``. With ``lam ~ Beta(alpha, alpha)``
    (one draw for the batch) and ``j = perm[i]``, returns ``mixed_x[i] = lam * x[i] +
    (1 - lam) * x[j]`` (computed in at least float32, in ``x``'s dtype) and
    ``soft_labels: float32[batch, num_classes]``, ``lam * one_hot(labels[i]) + (1 - lam) *
    one_hot(labels[j])``: probabilities for :func:`fnn.losses.softmax_cross_entropy`. A label
    outside ``[0, num_classes)`` makes its rows NaN (and so the loss). Jittable with
    ``num_classes`` and ``alpha`` static; in training only, outside the model.
    """
    x, labels = _check_mix("mixup", x, labels, num_classes, alpha, "[batch, ...]",
                           lambda rank: rank >= 1)
    check_floating("mixup", x, "[batch, ...]")
    lam_key, perm_key = jax.random.split(key)
    lam = jax.random.beta(lam_key, alpha, alpha)  # float32[]
    perm = jax.random.permutation(perm_key, x.shape[0])
    wide = x.astype(at_least_float32(x.dtype))
    mixed = lam.astype(wide.dtype) * wide + (1 - lam).astype(wide.dtype) * wide[perm]
    return mixed.astype(x.dtype), _mix_labels(labels, labels[perm], num_classes, lam)


def cutmix(key: jax.Array, x: jax.Array, labels: jax.Array, num_classes: int, *,
           alpha: float) -> tuple[jax.Array, jax.Array]:
    """CutMix (Yun et al., 2019): a box of each image replaced by the same box of another
    image of the batch (a random permutation of it), as torchvision's ``CutMix``.

    ``x: [batch, H, W, C]`` any dtype, ``labels: int[batch]``. With ``lam ~ Beta(alpha,
    alpha)`` (one draw, one box for the batch), the box has half-sides
    ``floor(0.5 * sqrt(1 - lam) * H)`` and ``... * W`` around a centre uniform over the image,
    clipped at the border; ``lam`` is then corrected to ``1 - box_area / (H * W)``, the share
    of each image that is its own. Returns ``mixed_x: [batch, H, W, C]`` and ``soft_labels:
    float32[batch, num_classes]`` = ``lam * one_hot(labels[i]) + (1 - lam) *
    one_hot(labels[perm[i]])`` (NaN rows for a label outside ``[0, num_classes)``).
    """
    x, labels = _check_mix("cutmix", x, labels, num_classes, alpha,
                           "[batch, height, width, channels]", lambda rank: rank == 4)
    _, height, width, _ = x.shape
    lam_key, perm_key, row_key, col_key = jax.random.split(key, 4)
    lam = jax.random.beta(lam_key, alpha, alpha)
    perm = jax.random.permutation(perm_key, x.shape[0])
    ratio = 0.5 * jnp.sqrt(1 - lam)
    half_h = jnp.floor(ratio * height).astype(jnp.int32)
    half_w = jnp.floor(ratio * width).astype(jnp.int32)
    row = jax.random.randint(row_key, (), 0, height)
    col = jax.random.randint(col_key, (), 0, width)
    top, bottom = jnp.maximum(row - half_h, 0), jnp.minimum(row + half_h, height)
    left, right = jnp.maximum(col - half_w, 0), jnp.minimum(col + half_w, width)
    rows = lax.broadcasted_iota(jnp.int32, (height, 1), 0)
    cols = lax.broadcasted_iota(jnp.int32, (1, width), 1)
    box = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)  # [H, W]
    mixed = jnp.where(box[None, :, :, None], x[perm], x)
    area = ((bottom - top) * (right - left)).astype(jnp.float32)
    lam = 1 - area / (height * width)
    return mixed, _mix_labels(labels, labels[perm], num_classes, lam)
