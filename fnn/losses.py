"""Losses and metrics: each takes a batch of model outputs and targets and returns a scalar
mean over the batch (float32 whatever the output dtype)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from fnn.core import LayerError


def _check_labels(name: str, logits: jax.Array, labels: jax.Array) -> None:
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"{name}: labels must be integer class ids, got {labels.dtype}")
    if logits.shape[:-1] != labels.shape:
        raise LayerError(f"{name}: expected logits [..., num_classes] and labels [...] with the "
                         f"same leading shape, got logits {logits.shape} and labels "
                         f"{labels.shape}")


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array, *,
                          label_smoothing: float = 0.0) -> jax.Array:
    """Mean cross-entropy of ``logits: [..., num_classes]`` against integer ``labels: [...]``.

    With ``label_smoothing`` ``s``, the target puts ``1 - s`` on the label and spreads ``s``
    evenly over all classes.
    """
    _check_labels("softmax_cross_entropy", logits, labels)
    logits = logits.astype(jnp.float32)
    if not label_smoothing:
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"softmax_cross_entropy: label_smoothing must be in [0, 1), "
                         f"got {label_smoothing!r}")
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    return optax.softmax_cross_entropy(logits, targets).mean()


def _elementwise_mean(name: str, fn, outputs: jax.Array, targets: jax.Array) -> jax.Array:
    """The float32 mean of ``fn(outputs, targets)``, for outputs and targets of one shape."""
    if outputs.shape != targets.shape:
        raise LayerError(f"{name}: expected outputs and targets of the same shape, got "
                         f"{outputs.shape} and {targets.shape}")
    return fn(outputs.astype(jnp.float32), targets.astype(jnp.float32)).mean()


def binary_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean sigmoid cross-entropy of ``logits: [...]`` against ``labels: [...]`` in [0, 1]."""
    return _elementwise_mean("binary_cross_entropy", optax.sigmoid_binary_cross_entropy,
                             logits, labels)


def mean_squared_error(predictions: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean of ``(predictions - targets) ** 2`` over every element."""
    return _elementwise_mean("mean_squared_error", optax.squared_error, predictions, targets)


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Fraction of ``argmax(logits, -1) == labels``."""
    _check_labels("accuracy", logits, labels)
    return jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))


def bits_per_char(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean cross-entropy in bits (``log2``, not ``ln``) of ``logits: [..., vocab]`` against
    integer ``labels: [...]``: a language model's bits per character (or per token)."""
    _check_labels("bits_per_char", logits, labels)
    nats = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    return nats.mean() / jnp.log(jnp.asarray(2.0, jnp.float32))


LOSSES = {
    "softmax_cross_entropy": softmax_cross_entropy,
    "binary_cross_entropy": binary_cross_entropy,
    "mean_squared_error": mean_squared_error,
}
