"""Non-finite steps are skipped inside the jitted step: a NaN batch, a NaN in one device's shard,
an infinite loss and a finite loss with a NaN gradient leave params, model state and optimizer
state bit-identical, are counted in ``skipped``/``bad_streak``, keep the replicas identical, and
the next good step trains as if the bad batches had never come."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fnn
from fnn.core import Layer
from fnn.losses import mean_squared_error
from fnn.train.parallel import DATA_AXIS, data_parallel
from fnn.train.state import create_train_state

BATCH = 16  # two rows per device on 8 devices
BAD_ROW = 7  # a row of device 3's shard under pmap and sharded


def _model(axis_name=None):
    # BatchNorm first: a bias just before it would get a gradient that is zero up to rounding,
    # which Adam scales up to full steps of arbitrary sign (no use for comparing runs)
    return fnn.serial(fnn.BatchNorm(momentum=0.5, axis_name=axis_name), fnn.Dense(8),
                      fnn.Relu(), fnn.Dense(3))


MODELS = {"none": _model(), "pmap": _model(DATA_AXIS), "sharded": _model()}
OPTIMIZER = optax.adam(1e-2)


@functools.lru_cache(maxsize=None)
def _runner(mode: str):
    return data_parallel(MODELS[mode], OPTIMIZER, mean_squared_error, {}, mode=mode)


def _batch(seed: int):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((BATCH, 5)).astype(np.float32),
            rng.standard_normal((BATCH, 3)).astype(np.float32))


def _initial():
    return create_train_state(MODELS["none"], OPTIMIZER, jax.random.key(0), _batch(0)[0])


def _host(state):
    """The trained part of a train state as numpy arrays."""
    return jax.tree.map(np.asarray, (state.params, state.state, state.opt_state))


def _assert_same(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


def _assert_replicas_equal(ts, mode):
    for leaf in jax.tree.leaves((ts.params, ts.state, ts.opt_state, ts.skipped)):
        if mode == "pmap":
            copies = list(np.asarray(leaf))
        else:
            copies = [np.asarray(shard.data) for shard in leaf.addressable_shards]
        for copy in copies[1:]:
            np.testing.assert_array_equal(copy, copies[0])


@pytest.mark.parametrize("mode", ["none", "pmap", "sharded"])
def test_nan_and_inf_steps_change_nothing_and_are_counted(mode):
    runner = _runner(mode)
    nan_x, nan_y = _batch(1)
    nan_x[BAD_ROW, 2] = np.nan  # one element of one device's shard
    inf_x, inf_y = _batch(2)
    inf_y[BAD_ROW, 0] = np.inf  # a finite model output, an infinite loss
    good = _batch(3)

    ts = runner.put_state(_initial())
    ts, _ = runner.step(ts, *runner.put_batch(*_batch(0)))
    before = _host(runner.get_state(ts))
    expected_counts = [(1, 1), (2, 2)]
    for (x, y), (skipped, streak), loss_is in zip([(nan_x, nan_y), (inf_x, inf_y)],
                                                  expected_counts, [np.isnan, np.isposinf]):
        ts, metrics = runner.step(ts, *runner.put_batch(x, y))
        assert loss_is(float(metrics["loss"]))
        assert (int(metrics["skipped"]), int(metrics["bad_streak"])) == (skipped, streak)
        assert metrics["skipped"].dtype == metrics["bad_streak"].dtype == jnp.int32
        _assert_same(_host(runner.get_state(ts)), before)  # params, BatchNorm stats, Adam
        if mode != "none":
            _assert_replicas_equal(ts, mode)
    ts, metrics = runner.step(ts, *runner.put_batch(*good))
    assert (int(metrics["skipped"]), int(metrics["bad_streak"])) == (2, 0)
    assert np.isfinite(float(metrics["loss"]))
    final = runner.get_state(ts)
    assert (int(final.step), int(final.skipped), int(final.bad_streak)) == (4, 2, 0)

    # the good step continues from the state before the bad ones: it equals a run that never
    # saw them (no dropout, so the skipped step numbers change nothing)
    plain = _runner("none")
    reference = plain.put_state(_initial())
    for batch in (_batch(0), good):
        reference, _ = plain.step(reference, *plain.put_batch(*batch))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 _host(final), _host(reference))
    if mode == "none":
        _assert_same(_host(final), _host(reference))


def test_a_finite_loss_with_a_nan_gradient_is_skipped():
    # |x @ w| written as sqrt(square(.)): at an all-zero input row the value is 0 (finite) but
    # the derivative of sqrt at 0 is infinite, and inf * 0 makes the gradient of w NaN
    def init(key, x):
        return {"w": jax.random.normal(key, (x.shape[-1], 3))}, {}

    def apply(params, state, x, *, key=None, train=False):
        return jnp.sqrt(jnp.square(x @ params["w"])), state

    model = Layer(init, apply, "Abs")
    runner = data_parallel(model, OPTIMIZER, mean_squared_error, {}, mode="none")
    x, y = _batch(0)
    ts = runner.put_state(create_train_state(model, OPTIMIZER, jax.random.key(0), x))
    before = _host(runner.get_state(ts))
    x[4] = 0.0
    ts, metrics = runner.step(ts, x, y)
    assert np.isfinite(float(metrics["loss"]))
    assert (int(metrics["skipped"]), int(metrics["bad_streak"])) == (1, 1)
    _assert_same(_host(runner.get_state(ts)), before)
    ts, metrics = runner.step(ts, *_batch(1))
    assert (int(metrics["skipped"]), int(metrics["bad_streak"])) == (1, 0)
    assert not np.array_equal(np.asarray(runner.get_state(ts).params["w"]), before[0]["w"])
