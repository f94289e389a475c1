"""The jitted train and eval steps: they lower the loss, count steps, update model state, and
give per-example gradients equal to a Python loop."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fnn
from fnn.data import load_digits
from fnn.losses import softmax_cross_entropy
from fnn.models import MLP, LeNet
from fnn.train import create_train_state, make_eval_step, make_train_step
from fnn.train.step import train_step_fn


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
    model = LeNet(10, features=(4, 8), kernel_size=3, hidden_features=16)
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


def test_the_default_metrics_fit_the_loss(key):
    # a regression loss gets no accuracy (which needs class ids), a classification loss does
    model = fnn.Dense(3)
    x, y = jnp.ones((4, 2)), jnp.zeros((4, 3))
    ts = create_train_state(model, optax.sgd(0.1), key, x)
    step = make_train_step(model, optax.sgd(0.1), fnn.losses.mean_squared_error)
    ts, metrics = step(ts, x, y)
    assert set(metrics) == {"loss", "skipped", "bad_streak"}
    evaluate = make_eval_step(model, fnn.losses.binary_cross_entropy)
    assert set(evaluate(ts.params, ts.state, x, y)) == {"loss"}
    classes = make_eval_step(model, softmax_cross_entropy)
    assert set(classes(ts.params, ts.state, x, jnp.zeros(4, jnp.int32))) == {"loss", "accuracy"}
    runner = fnn.train.data_parallel(model, optax.sgd(0.1), fnn.losses.mean_squared_error,
                                     mode="sharded")
    _, metrics = runner.step(runner.put_state(ts), *runner.put_batch(np.ones((8, 2), np.float32),
                                                                      np.zeros((8, 3), np.float32)))
    assert set(metrics) == {"loss", "skipped", "bad_streak"}


def test_stepping_a_consumed_train_state_again_says_what_happened(key):
    model = fnn.Dense(3)
    x, y = jnp.ones((4, 2)), jnp.zeros(4, jnp.int32)
    step = make_train_step(model, optax.sgd(0.1), softmax_cross_entropy)
    old = create_train_state(model, optax.sgd(0.1), key, x)
    new, _ = step(old, x, y)
    with pytest.raises(ValueError, match=r"^train step: the train state given was already "
                                         r"consumed: a step donates"):
        step(old, x, y)  # a notebook cell run twice
    step(new, x, y)  # the returned state steps on
    kept = make_train_step(model, optax.sgd(0.1), softmax_cross_entropy, donate=False)
    again = create_train_state(model, optax.sgd(0.1), key, x)
    kept(again, x, y)
    kept(again, x, y)  # without donation an old state can be stepped again


def test_a_mixed_step_is_a_step_on_the_mixed_batch(key):
    """mix=mixup: the step is a plain step on the batch mixup makes with the step's mix key;
    the metrics take the class with the larger share."""
    import functools

    from fnn.train.step import _MIX_STREAM

    model = fnn.serial(fnn.Flatten(-3), fnn.Dense(16), fnn.Relu(), fnn.Dense(4))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 4, 4, 1)).astype(np.float32)
    y = rng.integers(0, 4, 8).astype(np.int32)
    opt = optax.sgd(0.1)
    mix = functools.partial(fnn.mixup, num_classes=4, alpha=0.4)
    ts = create_train_state(model, opt, key, x)
    mixed_step = jax.jit(train_step_fn(model, opt, softmax_cross_entropy, mix=mix))
    plain_step = jax.jit(train_step_fn(model, opt, softmax_cross_entropy))
    after, metrics = mixed_step(ts, x, y)
    mix_key = jax.random.fold_in(jax.random.fold_in(ts.key, ts.step), _MIX_STREAM)
    mixed_x, soft = mix(mix_key, x, y)
    assert not np.allclose(mixed_x, x)
    expected, plain_metrics = plain_step(ts, mixed_x, soft)
    for got, want in zip(jax.tree.leaves(after.params), jax.tree.leaves(expected.params)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(metrics["loss"], plain_metrics["loss"], rtol=1e-6)
    logits, _ = model.apply(ts.params, ts.state, mixed_x)
    dominant = np.argmax(np.asarray(soft), -1)
    assert float(metrics["accuracy"]) == pytest.approx(
        float(np.mean(np.argmax(np.asarray(logits), -1) == dominant)))
