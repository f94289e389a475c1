"""Losses, data, train and eval steps, per-example gradients, determinism."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fnn
from fnn.data import batches, load_digits
from fnn.losses import (accuracy, binary_cross_entropy, mean_squared_error,
                        softmax_cross_entropy)
from fnn.models import MLP, LeNet
from fnn.train import create_train_state, fit, make_eval_step, make_train_step, plot_history


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


def test_digits_split_is_fixed_and_disjoint():
    data = load_digits()
    assert data.x_train.shape == (1438, 8, 8, 1) and data.x_test.shape == (359, 8, 8, 1)
    assert data.x_train.dtype == np.float32 and data.y_train.dtype == np.int32
    assert 0.0 <= data.x_train.min() and data.x_train.max() <= 1.0
    assert set(np.unique(data.y_test)) == set(range(10))
    from sklearn.datasets import load_digits as sklearn_digits
    images = sklearn_digits().images
    np.testing.assert_array_equal(data.x_test[0, ..., 0] * 16, images[4])
    np.testing.assert_array_equal(data.x_train[4, ..., 0] * 16, images[5])


def test_batches_cover_the_data_and_are_reproducible():
    x = np.arange(10)[:, None]
    y = np.arange(10)
    epoch1 = list(batches(x, y, 3, seed=0, epoch=1))
    assert [len(b[1]) for b in epoch1] == [3, 3, 3]  # the remainder is dropped
    seen = np.concatenate([b[1] for b in epoch1])
    assert len(set(seen)) == 9
    again = list(batches(x, y, 3, seed=0, epoch=1))
    for (xa, ya), (xb, yb) in zip(epoch1, again):
        np.testing.assert_array_equal(ya, yb)
    other = np.concatenate([b[1] for b in batches(x, y, 3, seed=0, epoch=2)])
    assert not np.array_equal(seen, other)
    ordered = list(batches(x, y, 4, drop_remainder=False))
    np.testing.assert_array_equal(np.concatenate([b[1] for b in ordered]), y)
    with pytest.raises(ValueError, match="larger than the data"):
        list(batches(x, y, 11))


def test_train_step_lowers_the_loss_and_counts_steps(key):
    data = load_digits()
    model = MLP([32], 10, flatten_axes=3)
    optimizer = optax.adam(1e-2)
    ts = create_train_state(model, optimizer, key, data.x_train[:64])
    step = make_train_step(model, optimizer, softmax_cross_entropy)
    evaluate = make_eval_step(model, softmax_cross_entropy)
    x, y = data.x_train[:64], data.y_train[:64]
    before = evaluate(ts.params, ts.state, x, y)
    for _ in range(20):
        ts, metrics = step(ts, x, y)
    after = evaluate(ts.params, ts.state, x, y)
    assert int(ts.step) == 20
    assert float(after["loss"]) < 0.5 * float(before["loss"])
    assert float(after["accuracy"]) > 0.9
    assert set(metrics) == {"loss", "accuracy", "skipped", "bad_streak"}
    assert int(metrics["skipped"]) == 0 and int(metrics["bad_streak"]) == 0


def test_train_step_updates_batchnorm_state(key):
    model = fnn.serial(fnn.Dense(4), fnn.BatchNorm(momentum=0.5), fnn.Dense(3))
    optimizer = optax.sgd(0.1)
    x = jax.random.normal(key, (16, 5))
    y = jnp.arange(16, dtype=jnp.int32) % 3
    ts = create_train_state(model, optimizer, key, x)
    step = make_train_step(model, optimizer, softmax_cross_entropy, donate=False)
    new_ts, _ = step(ts, x, y)
    h = np.asarray(fnn.Dense(4).apply(ts.params["0"], {}, x)[0])
    np.testing.assert_allclose(new_ts.state["1"]["mean"], 0.5 * h.mean(0), rtol=1e-5, atol=1e-6)


def test_per_example_gradients_equal_a_python_loop(key):
    model = LeNet(10, features=(4, 8), kernel_size=3, hidden=16)
    data = load_digits()
    x, y = data.x_train[:6], data.y_train[:6]
    params, state = model.init(key, x)

    def loss(params, xi, yi):  # one example: xi [8, 8, 1], yi []
        logits, _ = model.apply(params, state, xi)
        return softmax_cross_entropy(logits[None], yi[None])

    per_example = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0, 0)))(params, x, y)
    grad_one = jax.jit(jax.grad(loss))
    for i in range(len(x)):
        expected = grad_one(params, x[i], y[i])
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a[i], b, rtol=1e-4, atol=1e-6),
                     per_example, expected)


def test_fit_is_deterministic_and_learns(tmp_path):
    data = load_digits()
    small = data._replace(x_train=data.x_train[:512], y_train=data.y_train[:512])

    def run():
        return fit(MLP([64], 10, flatten_axes=3, dropout=0.1), optax.adam(3e-3), small,
                   softmax_cross_entropy, epochs=5, batch_size=32, seed=7, progress=False)

    ts1, history = run()
    ts2, _ = run()
    jax.tree.map(np.testing.assert_array_equal, ts1.params, ts2.params)
    assert [row["epoch"] for row in history] == [1, 2, 3, 4, 5]
    assert history[-1]["test_accuracy"] > 0.85
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    fig = plot_history(history, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [ax.get_title() for ax in fig.axes] == ["accuracy", "loss"]
