"""Data parallel on 8 simulated CPU devices: the pmap and sharded steps equal a single-device
step on the whole batch (one plain SGD step shows a gradient scaled by the device count
exactly), BatchNorm sees the whole batch, replicas stay identical, and bad input is rejected.

One model serves most tests: ``BatchNorm -> Dense(16) -> Relu -> Dense(3)``, with
``BatchNorm(axis_name=DATA_AXIS)`` under pmap and the plain ``BatchNorm()`` on one device and
under the sharded mode. BatchNorm comes first: a bias just before it would get a gradient that
is zero up to rounding, which Adam scales up to full steps of arbitrary sign."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import fnn
from fnn.core import Layer
from fnn.losses import softmax_cross_entropy
from fnn.train.parallel import (DATA_AXIS, MODES, data_mesh, data_parallel, replicate,
                                shard_batch, unreplicate)
from fnn.train.state import create_train_state
from fnn.train.step import train_step_fn

DEVICES = 8
BATCH = 16  # two rows per device


def _batch(seed: int, batch: int = BATCH):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((batch, 5)).astype(np.float32) * 2.0 + 1.0,
            rng.integers(0, 3, batch).astype(np.int32))


def _model(axis_name=None):
    return fnn.serial(fnn.BatchNorm(momentum=0.5, axis_name=axis_name), fnn.Dense(16),
                      fnn.Relu(), fnn.Dense(3))


# built once: the tests share each model's compiled init and steps
MODELS = {"plain": _model(), "synced": _model(DATA_AXIS)}
OPTIMIZERS = {"sgd": optax.sgd(0.5), "adam": optax.adam(1e-2)}
MODEL_OF_MODE = {"none": "plain", "pmap": "synced", "sharded": "plain", "shard_map": "synced",
                 "fsdp": "plain", "tensor": "plain"}


@functools.lru_cache(maxsize=None)
def _runner(mode: str, optimizer: str, model: str | None = None):
    return data_parallel(MODELS[model or MODEL_OF_MODE[mode]], OPTIMIZERS[optimizer],
                         softmax_cross_entropy, mode=mode)


def _initial(optimizer: str):
    """A new initial train state (the runners donate the one they are given); both models
    have the same params, so one compiled init serves them."""
    return create_train_state(MODELS["plain"], OPTIMIZERS[optimizer], jax.random.key(0),
                              _batch(0)[0])


def _numpy(state):
    return jax.tree.map(np.asarray, state._replace(key=jax.random.key_data(state.key)))


@functools.lru_cache(maxsize=None)
def _run(mode: str, optimizer: str, steps: int):
    """``steps`` steps on batches 0, 1, ...: (final state as numpy, last metrics as floats)."""
    runner = _runner(mode, optimizer)
    ts = runner.put_state(_initial(optimizer))
    for i in range(steps):
        ts, metrics = runner.step(ts, *runner.put_batch(*_batch(i)))
    return _numpy(runner.get_state(ts)), {k: float(v) for k, v in metrics.items()}


def _assert_close(got, expected, tol):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=tol, atol=tol), got,
                 expected)


def test_eight_devices_are_there():
    assert jax.device_count() == DEVICES


@pytest.mark.parametrize("mode", ["pmap", "sharded", "shard_map", "fsdp", "tensor"])
def test_one_sgd_step_and_twenty_adam_steps_equal_one_device(mode):
    for optimizer, steps in (("sgd", 1), ("adam", 20)):
        expected, expected_metrics = _run("none", optimizer, steps)
        got, metrics = _run(mode, optimizer, steps)
        _assert_close(got.params, expected.params, 1e-5)
        _assert_close(got.opt_state, expected.opt_state, 1e-5)
        # BatchNorm's running statistics are the whole batch's
        _assert_close(got.state, expected.state, 1e-5)
        assert metrics.keys() == expected_metrics.keys() == {"loss", "accuracy", "skipped",
                                                             "bad_streak"}
        _assert_close(metrics, expected_metrics, 1e-5)
        assert int(got.step) == steps and int(got.skipped) == 0


@pytest.mark.parametrize("mode", ["pmap", "sharded", "shard_map", "fsdp"])
def test_batchnorm_running_statistics_are_the_whole_batchs(mode):
    # by construction: one step from mean 0, var 1 with momentum 0.5
    first, _ = _run(mode, "sgd", 1)
    x = _batch(0)[0].astype(np.float64)
    np.testing.assert_allclose(first.state["0"]["mean"], 0.5 * x.mean(0), rtol=1e-5)
    np.testing.assert_allclose(first.state["0"]["var"], 0.5 + 0.5 * x.var(0), rtol=1e-5)


def test_pmap_gives_a_plain_batchnorm_the_whole_batchs_statistics():
    # BatchNorm() without an axis_name: the pmap step binds its device axis as the batch axis,
    # so the model normalises with the global batch's statistics as on one device (the same
    # model, in Python and in the CLI, whatever the mode)
    expected, _ = _run("none", "sgd", 1)
    runner = _runner("pmap", "sgd", model="plain")
    ts, _ = runner.step(runner.put_state(_initial("sgd")), *runner.put_batch(*_batch(0)))
    got = _numpy(runner.get_state(ts))
    _assert_close(got.params, expected.params, 1e-5)
    _assert_close(got.state, expected.state, 1e-5)
    replicas = np.asarray(ts.state["0"]["mean"])
    for r in range(DEVICES):
        np.testing.assert_array_equal(replicas[r], replicas[0])


def test_a_model_written_for_pmap_says_so_where_its_axis_is_not_bound():
    model = MODELS["synced"]  # BatchNorm(axis_name="data")
    x, y = _batch(0)
    params, state = model.init(jax.random.key(0), x)
    message = (r"BatchNorm at 0: averages its batch statistics over the mapped axis 'data', "
               r"which is not bound here: call the model inside the jax.pmap or shard_map over "
               r"'data' it was written for, or build it without axis_name")
    with pytest.raises(fnn.UnboundAxisError, match=message):
        model.apply(params, state, x, train=True)
    model.apply(params, state, x)  # evaluation needs no axis
    runner = data_parallel(model, OPTIMIZERS["sgd"], softmax_cross_entropy, mode="sharded")
    with pytest.raises(fnn.UnboundAxisError, match=message):
        runner.step(runner.put_state(_initial("sgd")), *runner.put_batch(x, y))


def test_pmap_replicas_stay_identical_and_get_state_outlives_donation():
    runner = _runner("pmap", "sgd")
    assert (runner.mode, runner.num_devices, runner.devices) == ("pmap", DEVICES,
                                                                 jax.devices())
    ts = runner.put_state(_initial("sgd"))
    assert ts.params["1"]["w"].shape == (DEVICES, 5, 16)
    for i in range(3):
        ts, metrics = runner.step(ts, *runner.put_batch(*_batch(i)))
    for leaf in jax.tree.leaves((ts.params, ts.state, ts.opt_state, ts.step)):
        replicas = np.asarray(leaf)
        for r in range(1, DEVICES):
            np.testing.assert_array_equal(replicas[r], replicas[0])
    assert metrics["loss"].shape == () and int(metrics["skipped"]) == 0
    state = runner.get_state(ts)
    before = jax.tree.map(np.array, state.params)
    ts, _ = runner.step(ts, *runner.put_batch(*_batch(3)))  # donates ts
    assert state.params["1"]["w"].shape == (5, 16)
    assert len(state.params["1"]["w"].devices()) == 1
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.params), before)
    assert int(state.step) == 3 and int(runner.get_state(ts).step) == 4


def test_sharded_state_is_replicated_and_get_state_gives_single_device_arrays():
    runner = _runner("sharded", "sgd")
    ts = runner.put_state(_initial("sgd"))
    x, y = runner.put_batch(*_batch(0))
    assert x.sharding.spec == P(DATA_AXIS) and x.addressable_shards[0].data.shape == (2, 5)
    ts, _ = runner.step(ts, x, y)
    assert ts.params["3"]["w"].sharding.is_fully_replicated
    state = runner.get_state(ts)
    runner.step(ts, *runner.put_batch(*_batch(1)))  # donates ts; state must stay readable
    assert all(len(a.devices()) == 1 for a in jax.tree.leaves(state))
    assert int(state.step) == 1 and np.asarray(state.params["3"]["w"]).shape == (16, 3)
    # an ordinary, un-parallel eval step takes it
    eval_step = fnn.train.make_eval_step(MODELS["plain"], softmax_cross_entropy)
    assert np.isfinite(float(eval_step(state.params, state.state, *_batch(2))["loss"]))


def test_pmap_over_one_device_is_the_plain_step():
    runner = data_parallel(MODELS["synced"], OPTIMIZERS["sgd"], softmax_cross_entropy,
                           mode="pmap", devices=jax.devices()[:1])
    ts, metrics = runner.step(runner.put_state(_initial("sgd")), *runner.put_batch(*_batch(0)))
    expected, expected_metrics = _run("none", "sgd", 1)
    got = _numpy(runner.get_state(ts))
    _assert_close((got.params, got.state), (expected.params, expected.state), 1e-6)
    _assert_close({k: float(v) for k, v in metrics.items()}, expected_metrics, 1e-6)


def test_shard_map_body_equals_one_device():
    # the same per-device body under jax.shard_map (check_vma on): one SGD step is the trap
    body = train_step_fn(MODELS["synced"], OPTIMIZERS["sgd"], softmax_cross_entropy,
                         axis_name=DATA_AXIS)
    step = jax.jit(jax.shard_map(body, mesh=data_mesh(), in_specs=(P(), P(DATA_AXIS),
                                                                   P(DATA_AXIS)),
                                 out_specs=(P(), P())))
    got, metrics = step(_initial("sgd"), *_batch(0))
    expected, expected_metrics = _run("none", "sgd", 1)
    got = _numpy(got)
    _assert_close((got.params, got.state), (expected.params, expected.state), 1e-6)
    _assert_close({k: float(v) for k, v in metrics.items()}, expected_metrics, 1e-6)


def test_each_device_draws_its_own_dropout_key():
    # a model whose output is a uniform draw from its key: the averaged loss must be the mean
    # of the draws with keys fold_in(fold_in(key, step), device)
    def init(key, x):
        return {"w": jnp.zeros((), jnp.float32)}, {}

    def apply(params, state, x, *, key=None, train=False):
        return params["w"] + jax.random.uniform(key, x.shape[:1]), state

    model = Layer(init, apply, "Draw")
    optimizer = optax.sgd(0.1)
    x, y = _batch(0)
    ts = create_train_state(model, optimizer, jax.random.key(0), x)
    runner = data_parallel(model, optimizer, lambda out, y: jnp.mean(out), {}, mode="pmap")
    _, metrics = runner.step(runner.put_state(ts), *runner.put_batch(x, y))
    step_key = jax.random.fold_in(ts.key, 0)
    draws = [jax.random.uniform(jax.random.fold_in(step_key, d), (BATCH // DEVICES,))
             for d in range(DEVICES)]
    np.testing.assert_allclose(float(metrics["loss"]), np.mean(draws), rtol=1e-6)
    assert not np.allclose(draws[0], draws[1])


@pytest.mark.parametrize("mode", ["pmap", "sharded", "shard_map", "fsdp"])
def test_a_batch_that_does_not_divide_by_the_devices_is_rejected(mode):
    runner = _runner(mode, "sgd")
    with pytest.raises(ValueError, match=rf"mode='{mode}'.*batch size 12 does not divide by "
                                         rf"the 8 devices"):
        runner.put_batch(*_batch(0, batch=12))
    with pytest.raises(ValueError, match=r"expected batch arrays \[batch, ...\], got a scalar"):
        runner.put_batch(np.float32(1.0), np.int32(0))


def test_data_parallel_checks_its_arguments():
    args = (MODELS["plain"], OPTIMIZERS["sgd"], softmax_cross_entropy)
    assert MODES == ("none", "pmap", "sharded", "shard_map", "fsdp", "tensor")
    with pytest.raises(ValueError, match=r"mode must be one of .*got 'tpu'"):
        data_parallel(*args, mode="tpu")
    with pytest.raises(ValueError, match="mode 'none' trains on one device, got 2 devices"):
        data_parallel(*args, mode="none", devices=jax.devices()[:2])
    with pytest.raises(ValueError, match="expected at least one device"):
        data_parallel(*args, mode="pmap", devices=[])
    runner = data_parallel(*args, mode="sharded", devices=jax.devices()[:2])
    assert runner.num_devices == 2
    assert repr(runner) == "DataParallel(mode='sharded', num_devices=2, mesh={'data': 2})"
    with pytest.raises(ValueError, match="mode 'pmap' replicates the train state, so it takes "
                                         "no mesh or sharding rules"):
        data_parallel(*args, mode="pmap", mesh={"data": 8})


def test_pmap_helpers_lay_out_replicas_and_rows():
    devices = jax.devices()[:4]
    tree = {"w": jnp.arange(6.0).reshape(2, 3), "key": jax.random.key(1)}
    replicated = replicate(tree, devices)
    assert replicated["w"].shape == (4, 2, 3) and replicated["key"].shape == (4,)
    assert [s.device for s in replicated["w"].addressable_shards] == devices
    np.testing.assert_array_equal(np.asarray(unreplicate(replicated)["w"]), tree["w"])
    rows = shard_batch(np.arange(8.0).reshape(8, 1), devices)
    assert rows.shape == (4, 2, 1)
    np.testing.assert_array_equal(rows.addressable_shards[1].data, [[[2.0], [3.0]]])
    assert isinstance(rows.sharding, NamedSharding)
    mesh = data_mesh(devices[::-1])
    assert mesh.axis_names == (DATA_AXIS,) and list(mesh.devices) == devices


def test_a_mixed_sharded_step_equals_one_device(key):
    """cutmix over the global batch: the sharded step mixes as the single-device step does."""
    model = fnn.serial(fnn.Flatten(-3), fnn.Dense(8), fnn.Relu(), fnn.Dense(3))
    rng = np.random.default_rng(1)
    x = rng.standard_normal((BATCH, 4, 4, 1)).astype(np.float32)
    y = rng.integers(0, 3, BATCH).astype(np.int32)

    def mix(mix_key, images, labels):
        return fnn.cutmix(mix_key, images, labels, 3, alpha=1.0)

    results = {}
    for mode in ("none", "sharded"):
        runner = data_parallel(model, optax.adam(1e-2), softmax_cross_entropy, mode=mode, mix=mix)
        pts = runner.put_state(create_train_state(model, optax.adam(1e-2), key, x))
        for _ in range(3):
            pts, metrics = runner.step(pts, *runner.put_batch(x, y))
        results[mode] = (runner.get_state(pts).params, float(metrics["loss"]))
    sharded, single = results["sharded"][0], results["none"][0]
    for got, want in zip(jax.tree.leaves(sharded), jax.tree.leaves(single)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert results["sharded"][1] == pytest.approx(results["none"][1], rel=1e-5)


@pytest.mark.parametrize("frozen", [False, True])
def test_model_state_is_averaged_over_the_devices(frozen, key):
    """A layer's state computed from each device's shard (no axis of its own) is the mean over
    the devices after a pmap step, as it is on one device on the whole batch."""
    from fnn.train import param_groups

    def init(layer_key, x):
        return {}, {"mean": jnp.zeros((), jnp.float32)}

    def apply(params, state, x, *, key=None, train=False):
        return x, ({"mean": jnp.mean(x)} if train else state)

    model = fnn.serial(Layer(init, apply, "MeanOfBatch"), head=fnn.Dense(3))
    opt = param_groups(optax.sgd(0.1), frozen="head/b") if frozen else optax.sgd(0.1)
    x, y = _batch(3)
    states = {}
    for mode in ("none", "pmap"):
        runner = data_parallel(model, opt, softmax_cross_entropy, mode=mode)
        pts, _ = runner.step(runner.put_state(create_train_state(model, opt, key, x)),
                             *runner.put_batch(x, y))
        states[mode] = float(runner.get_state(pts).state["0"]["mean"])
    assert states["pmap"] == pytest.approx(states["none"], rel=1e-6)
    assert states["none"] == pytest.approx(float(np.mean(x)), rel=1e-6)
