"""Losses and metrics: each takes a batch of model outputs and targets and returns a scalar
mean over the batch (float32 whatever the output dtype).

Outputs may be a :class:`~fnn.core.Seq` (a sequence model given padded sequences): with
``lengths`` the mean is over the valid positions only, ``[..., time, ...]`` positions at or
past each sequence's length left out (a batch with none valid gives 0).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from fnn.core import LayerError, Seq, valid_positions


def _split(name: str, outputs, time_axis: int):
    """The output array, and the weight of each position (``None``: all count) for a ``Seq``
    with lengths; ``time_axis`` counts from the end of the output."""
    if not isinstance(outputs, Seq):
        return outputs, None
    x = outputs.x
    if outputs.lengths is None:
        return x, None
    lengths = outputs.lengths
    batch = x.shape[:x.ndim + time_axis]
    if tuple(jnp.shape(lengths)) != tuple(batch):
        raise LayerError(f"{name}: expected lengths of shape {tuple(batch)} (the batch axes of "
                         f"the outputs {x.shape}), got {tuple(jnp.shape(lengths))}")
    return x, valid_positions(jnp.asarray(lengths).astype(jnp.int32), x.shape[time_axis])


def _mean(values: jax.Array, weights: jax.Array | None) -> jax.Array:
    """The mean of ``values`` over the positions where ``weights`` (bool, broadcast from the
    left) holds, or over all of them without weights."""
    if weights is None:
        return values.mean()
    valid = jnp.broadcast_to(
        weights.reshape(weights.shape + (1,) * (values.ndim - weights.ndim)), values.shape)
    # jnp.where, not a product: a padded position may hold anything (NaN * 0 is NaN)
    total = jnp.sum(jnp.where(valid, values, jnp.zeros((), values.dtype)))
    return total / jnp.maximum(jnp.sum(valid.astype(values.dtype)), 1.0)


def _check_labels(name: str, logits: jax.Array, labels: jax.Array) -> None:
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"{name}: labels must be integer class ids, got {labels.dtype}")
    if logits.shape[:-1] != labels.shape:
        raise LayerError(f"{name}: expected logits [..., num_classes] and labels [...] with the "
                         f"same leading shape, got logits {logits.shape} and labels "
                         f"{labels.shape}")


def _check_soft_labels(name: str, logits: jax.Array, labels: jax.Array) -> bool:
    """Whether ``labels`` are soft labels: floating, of the logits' shape (a floating array of
    any other shape is an error)."""
    if not jnp.issubdtype(labels.dtype, jnp.floating):
        return False
    if labels.shape != logits.shape:
        # same rank: a distribution of the wrong width; other ranks: float class ids
        kind = LayerError if labels.ndim == logits.ndim else TypeError
        raise kind(f"{name}: labels must be integer class ids [...] or soft labels (floating "
                   f"probabilities) of the logits' shape [..., num_classes]; got logits "
                   f"{logits.shape} and {labels.dtype} labels {labels.shape}")
    return True


def softmax_cross_entropy(logits: jax.Array | Seq, labels: jax.Array, *,
                          label_smoothing: float = 0.0) -> jax.Array:
    """Mean cross-entropy of ``logits: [..., num_classes]`` against ``labels``: integer class
    ids ``[...]``, or soft labels ``float[..., num_classes]`` (the target distribution of each
    example, as :func:`fnn.layers.mixup` and :func:`fnn.layers.cutmix` return).

    With ``label_smoothing`` ``s``, the target puts ``1 - s`` on the label (or on the soft
    target) and spreads ``s`` evenly over all classes. An integer label outside
    ``[0, num_classes)`` makes the loss NaN, with or without smoothing, so that a train step
    skips the batch instead of learning from a label the head cannot represent (``fnn.train``'s
    tasks check labels on the host first). Soft labels are used as given: rows that do not sum
    to 1 are not rescaled.
    """
    name = "softmax_cross_entropy"
    logits, weights = _split(name, logits, -2)
    soft = _check_soft_labels(name, logits, labels)
    if not soft:
        _check_labels(name, logits, labels)
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"{name}: label_smoothing must be in [0, 1), got {label_smoothing!r}")
    logits = logits.astype(jnp.float32)
    if soft:
        targets = optax.smooth_labels(labels.astype(jnp.float32), label_smoothing)
        return _mean(optax.softmax_cross_entropy(logits, targets), weights)
    if not label_smoothing:
        per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    else:
        targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
        per_example = optax.softmax_cross_entropy(logits, targets)
    return _mean(_nan_outside(per_example, labels, logits.shape[-1]), weights)


def _nan_outside(values: jax.Array, labels: jax.Array, num_classes: int) -> jax.Array:
    """``values`` with NaN where a label is outside ``[0, num_classes)``."""
    inside = (labels >= 0) & (labels < num_classes)
    return jnp.where(inside, values, jnp.asarray(jnp.nan, values.dtype))


def _elementwise_mean(name: str, fn, outputs, targets: jax.Array) -> jax.Array:
    """The float32 mean of ``fn(outputs, targets)``, for outputs and targets of one shape (a
    ``Seq``'s outputs ``[..., time, ...]`` with the time axis after its lengths' axes)."""
    seq_rank = None if not isinstance(outputs, Seq) or outputs.lengths is None else \
        jnp.ndim(outputs.lengths)
    array = outputs.x if isinstance(outputs, Seq) else outputs
    if array.shape != targets.shape:
        raise LayerError(f"{name}: expected outputs and targets of the same shape, got "
                         f"{array.shape} and {targets.shape}")
    weights = None
    if seq_rank is not None:
        _, weights = _split(name, outputs, seq_rank - array.ndim)
    return _mean(fn(array.astype(jnp.float32), targets.astype(jnp.float32)), weights)


def binary_cross_entropy(logits: jax.Array | Seq, labels: jax.Array) -> jax.Array:
    """Mean sigmoid cross-entropy of ``logits: [...]`` against ``labels: [...]`` in [0, 1]."""
    return _elementwise_mean("binary_cross_entropy", optax.sigmoid_binary_cross_entropy,
                             logits, labels)


def mean_squared_error(predictions: jax.Array | Seq, targets: jax.Array) -> jax.Array:
    """Mean of ``(predictions - targets) ** 2`` over every element."""
    return _elementwise_mean("mean_squared_error", optax.squared_error, predictions, targets)


def accuracy(logits: jax.Array | Seq, labels: jax.Array) -> jax.Array:
    """Fraction of ``argmax(logits, -1) == labels``."""
    logits, weights = _split("accuracy", logits, -2)
    _check_labels("accuracy", logits, labels)
    return _mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32), weights)


def bits_per_char(logits: jax.Array | Seq, labels: jax.Array) -> jax.Array:
    """Mean cross-entropy in bits (``log2``, not ``ln``) of ``logits: [..., vocab]`` against
    integer ``labels: [...]``: a language model's bits per character (or per token)."""
    logits, weights = _split("bits_per_char", logits, -2)
    _check_labels("bits_per_char", logits, labels)
    nats = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    nats = _nan_outside(nats, labels, logits.shape[-1])
    return _mean(nats, weights) / jnp.log(jnp.asarray(2.0, jnp.float32))


LOSSES = {
    "softmax_cross_entropy": softmax_cross_entropy,
    "binary_cross_entropy": binary_cross_entropy,
    "mean_squared_error": mean_squared_error,
}


# ----------------------------------------------------------------------------- GAN losses
# Logits are the discriminator's raw scores, one per example (``[...]``): high means "real".

GAN_LOSSES = ("non_saturating", "hinge")


def _check_gan(name: str, kind: str, **logits: jax.Array) -> None:
    if kind not in GAN_LOSSES:
        raise ValueError(f"{name}: kind must be one of {', '.join(GAN_LOSSES)}, got {kind!r}")
    for arg, value in logits.items():
        if not jnp.issubdtype(jnp.result_type(value), jnp.floating):
            raise LayerError(f"{name}: expected floating {arg}, got {jnp.result_type(value)}")


def gan_discriminator_loss(real_logits: jax.Array, fake_logits: jax.Array, *,
                           kind: str = "non_saturating") -> jax.Array:
    """The discriminator's loss on a batch of real and a batch of generated examples.

    - ``"non_saturating"`` (Goodfellow et al., 2014): the cross-entropy of telling them apart,
      ``mean(softplus(-real)) + mean(softplus(fake))``.
    - ``"hinge"`` (Lim & Ye, 2017; with spectral normalisation, Miyato et al., 2018):
      ``mean(relu(1 - real)) + mean(relu(1 + fake))``.
    """
    _check_gan("gan_discriminator_loss", kind, real_logits=real_logits, fake_logits=fake_logits)
    real, fake = real_logits.astype(jnp.float32), fake_logits.astype(jnp.float32)
    if kind == "hinge":
        return jax.nn.relu(1 - real).mean() + jax.nn.relu(1 + fake).mean()
    return jax.nn.softplus(-real).mean() + jax.nn.softplus(fake).mean()


def gan_generator_loss(fake_logits: jax.Array, *, kind: str = "non_saturating") -> jax.Array:
    """The generator's loss on the discriminator's logits for generated examples:
    ``mean(softplus(-fake))`` (``"non_saturating"``: ``-log D(G(z))``, whose gradient does not
    vanish while D wins) or ``-mean(fake)`` (``"hinge"``)."""
    _check_gan("gan_generator_loss", kind, fake_logits=fake_logits)
    fake = fake_logits.astype(jnp.float32)
    if kind == "hinge":
        return -fake.mean()
    return jax.nn.softplus(-fake).mean()
