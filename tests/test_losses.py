"""Losses and metrics against numpy, their errors, and their masked means over a ``Seq``'s valid
positions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnn
from fnn.losses import (accuracy, binary_cross_entropy, bits_per_char, mean_squared_error,
                        softmax_cross_entropy)


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_softmax_cross_entropy_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 5)).astype(np.float32)
    labels = rng.integers(0, 5, size=6).astype(np.int32)
    logp = _log_softmax(logits.astype(np.float64))
    expected = -logp[np.arange(6), labels].mean()
    np.testing.assert_allclose(softmax_cross_entropy(logits, labels), expected, rtol=1e-6)
    # label smoothing s: target (1 - s) * onehot + s / K
    s = 0.2
    target = (1 - s) * np.eye(5)[labels] + s / 5
    expected = -(target * logp).sum(-1).mean()
    np.testing.assert_allclose(softmax_cross_entropy(logits, labels, label_smoothing=s),
                               expected, rtol=1e-6)


def test_binary_cross_entropy_mse_accuracy_match_numpy():
    logits = np.array([-2.0, 0.0, 3.0], np.float32)
    labels = np.array([0.0, 1.0, 1.0], np.float32)
    p = 1 / (1 + np.exp(-logits.astype(np.float64)))
    expected = -(labels * np.log(p) + (1 - labels) * np.log(1 - p)).mean()
    np.testing.assert_allclose(binary_cross_entropy(logits, labels), expected, rtol=1e-6)
    np.testing.assert_allclose(mean_squared_error(logits, labels), ((logits - labels) ** 2).mean(),
                               rtol=1e-6)
    z = np.array([[1.0, 2.0], [3.0, 0.0], [0.0, 1.0], [5.0, 4.0]], np.float32)
    np.testing.assert_allclose(accuracy(z, np.array([1, 0, 0, 1], np.int32)), 0.5)


def test_loss_errors():
    with pytest.raises(TypeError, match="labels must be integer class ids"):
        softmax_cross_entropy(jnp.zeros((2, 3)), jnp.zeros((2,)))
    with pytest.raises(fnn.LayerError, match=r"logits \(2, 3\) and labels \(3,\)"):
        softmax_cross_entropy(jnp.zeros((2, 3)), jnp.zeros((3,), jnp.int32))

def _padded_logits():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(3, 5, 4)).astype(np.float32)
    labels = rng.integers(0, 4, size=(3, 5)).astype(np.int32)
    return logits, labels, np.array([5, 2, 0], np.int32)


def test_losses_of_a_seq_count_only_the_valid_positions():
    logits, labels, lengths = _padded_logits()
    seq = fnn.Seq(jnp.asarray(logits), lengths=jnp.asarray(lengths))
    valid = np.arange(5)[None, :] < lengths[:, None]  # 7 valid positions
    logp = _log_softmax(logits.astype(np.float64))
    nll = -np.take_along_axis(logp, labels[..., None], -1)[..., 0]
    np.testing.assert_allclose(softmax_cross_entropy(seq, labels), nll[valid].mean(), rtol=1e-6)
    np.testing.assert_allclose(bits_per_char(seq, labels), nll[valid].mean() / np.log(2),
                               rtol=1e-6)
    hits = logits.argmax(-1) == labels
    np.testing.assert_allclose(accuracy(seq, labels), hits[valid].mean(), rtol=1e-6)
    s = 0.1
    target = (1 - s) * np.eye(4)[labels] + s / 4
    smoothed = -(target * logp).sum(-1)
    np.testing.assert_allclose(softmax_cross_entropy(seq, labels, label_smoothing=s),
                               smoothed[valid].mean(), rtol=1e-6)
    # padded positions carry no weight: changing them changes nothing
    garbage = np.where(valid[..., None], logits, 1e4).astype(np.float32)
    np.testing.assert_allclose(softmax_cross_entropy(seq.with_x(jnp.asarray(garbage)), labels),
                               nll[valid].mean(), rtol=1e-6)
    # without lengths every position counts
    np.testing.assert_allclose(softmax_cross_entropy(fnn.Seq(jnp.asarray(logits)), labels),
                               nll.mean(), rtol=1e-6)


def test_elementwise_losses_of_a_seq_count_only_the_valid_positions():
    rng = np.random.default_rng(2)
    out = rng.normal(size=(2, 4, 3)).astype(np.float32)
    target = rng.normal(size=(2, 4, 3)).astype(np.float32)
    lengths = np.array([1, 3], np.int32)
    valid = np.arange(4)[None, :] < lengths[:, None]
    seq = fnn.Seq(jnp.asarray(out), lengths=jnp.asarray(lengths))
    np.testing.assert_allclose(mean_squared_error(seq, target),
                               ((out - target) ** 2)[valid].mean(), rtol=1e-6)
    probs = rng.random(size=(2, 4, 3)).astype(np.float32)
    p = 1 / (1 + np.exp(-out.astype(np.float64)))
    bce = -(probs * np.log(p) + (1 - probs) * np.log(1 - p))
    np.testing.assert_allclose(binary_cross_entropy(seq, probs), bce[valid].mean(), rtol=1e-5)


def test_a_seq_with_no_valid_position_gives_zero_and_finite_gradients():
    logits, labels, _ = _padded_logits()
    lengths = jnp.zeros((3,), jnp.int32)

    def loss(z):
        return softmax_cross_entropy(fnn.Seq(z, lengths=lengths), labels)

    value, grad = jax.value_and_grad(loss)(jnp.asarray(logits))
    assert float(value) == 0.0
    assert np.all(np.asarray(grad) == 0.0)


def test_seq_lengths_of_the_wrong_shape_are_rejected():
    logits, labels, _ = _padded_logits()
    with pytest.raises(fnn.LayerError, match=r"softmax_cross_entropy: expected lengths of shape "
                                             r"\(3,\) .* got \(2,\)"):
        softmax_cross_entropy(fnn.Seq(jnp.asarray(logits), lengths=jnp.ones((2,), jnp.int32)),
                              labels)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_a_label_outside_the_head_gives_a_nan_loss_with_or_without_smoothing(smoothing):
    logits = jnp.zeros((4, 5))
    inside = jnp.array([0, 1, 4, 2], jnp.int32)
    assert np.isfinite(float(softmax_cross_entropy(logits, inside, label_smoothing=smoothing)))
    for bad in (5, 7, -1):  # out of range on either side
        labels = inside.at[2].set(bad)
        loss = softmax_cross_entropy(logits, labels, label_smoothing=smoothing)
        assert np.isnan(float(loss)), (bad, float(loss))
        assert np.isnan(float(bits_per_char(logits, labels)))
    # a padded position's label is not read: garbage there keeps the loss finite
    seq = fnn.Seq(jnp.zeros((1, 3, 5)), lengths=jnp.array([2]))
    labels = jnp.array([[1, 2, 99]], jnp.int32)
    assert np.isfinite(float(softmax_cross_entropy(seq, labels, label_smoothing=smoothing)))


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_one_hot_soft_labels_give_the_integer_label_loss(smoothing):
    rng = np.random.default_rng(3)
    logits = jnp.asarray(rng.normal(size=(2, 6, 5)).astype(np.float32))
    labels = jnp.asarray(rng.integers(0, 5, size=(2, 6)).astype(np.int32))
    soft = jax.nn.one_hot(labels, 5, dtype=jnp.float32)
    for given in (logits, fnn.Seq(logits, lengths=jnp.array([6, 2], jnp.int32))):
        np.testing.assert_allclose(softmax_cross_entropy(given, soft, label_smoothing=smoothing),
                                   softmax_cross_entropy(given, labels,
                                                         label_smoothing=smoothing),
                                   rtol=1e-6)


def test_soft_labels_match_numpy():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(6, 5)).astype(np.float32)
    soft = rng.random(size=(6, 5))
    soft = (soft / soft.sum(-1, keepdims=True)).astype(np.float32)
    logp = _log_softmax(logits.astype(np.float64))
    expected = -(soft * logp).sum(-1).mean()
    np.testing.assert_allclose(softmax_cross_entropy(logits, soft), expected, rtol=1e-6)
    s = 0.1
    smoothed = (1 - s) * soft + s / 5
    np.testing.assert_allclose(softmax_cross_entropy(logits, soft, label_smoothing=s),
                               -(smoothed * logp).sum(-1).mean(), rtol=1e-6)
    # bfloat16 soft labels are read in float32; the loss is float32
    loss = softmax_cross_entropy(jnp.asarray(logits), jnp.asarray(soft, jnp.bfloat16))
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, expected, rtol=1e-2)
    # the gradient with respect to the logits is softmax - target, over the batch
    grad = jax.grad(softmax_cross_entropy)(jnp.asarray(logits), jnp.asarray(soft))
    np.testing.assert_allclose(grad, (np.exp(logp) - soft) / 6, atol=1e-6)


def test_soft_labels_of_the_wrong_shape_are_rejected():
    logits = jnp.zeros((4, 5))
    with pytest.raises(fnn.LayerError, match=r"softmax_cross_entropy: labels must be integer "
                                             r"class ids \[\.\.\.\] or soft labels .* got logits "
                                             r"\(4, 5\) and float32 labels \(4, 3\)"):
        softmax_cross_entropy(logits, jnp.full((4, 3), 1 / 3))
    with pytest.raises(TypeError, match=r"got logits \(4, 5\) and float32 labels \(4,\)"):
        softmax_cross_entropy(logits, jnp.zeros((4,)))
