"""Inspection: parameter counts, the summary table with FLOPs, the record of layer calls and the
intermediate outputs captured as values (under jit, inside repeat's scan and remat)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import fnn
from fnn.inspection import Summary, capture_intermediates, flops, record_layers


def test_param_count_and_bytes(key):
    model = fnn.serial(fnn.Dense(10), fnn.Dense(5, param_dtype=jnp.bfloat16))
    params, _ = model.init(key, jnp.zeros((1, 4)))
    assert fnn.param_count(params) == 4 * 10 + 10 + 10 * 5 + 5
    assert fnn.param_bytes(params) == (4 * 10 + 10) * 4 + (10 * 5 + 5) * 2


def _dense_flops(batch, fan_in, features):
    return 2 * batch * fan_in * features + batch * features  # multiply-adds, then the bias


def test_summary_lists_every_layer_with_its_flops():
    model = fnn.serial(encoder=fnn.serial(fnn.Dense(16), fnn.Relu()), head=fnn.Dense(3))
    table = fnn.summary(model, jax.ShapeDtypeStruct((7, 5), jnp.float32))
    assert isinstance(table, Summary) and isinstance(table, str)
    assert repr(table) == str(table)  # a notebook shows the table, not an escaped string
    lines = table.splitlines()
    assert lines[0].split() == ["path", "layer", "output", "params", "bytes", "flops"]
    rows = [line.split() for line in lines[2:-2]]
    dense, relu, head = _dense_flops(7, 5, 16), 7 * 16, _dense_flops(7, 16, 3)
    total = dense + relu + head
    assert rows[0] == ["serial", "float32[7,", "3]", "147", "588", f"{total:,}"]
    assert rows[1] == ["encoder", "serial", "float32[7,", "16]", "96", "384", f"{dense + relu:,}"]
    assert rows[2] == ["encoder/0", "Dense", "float32[7,", "16]", "96", "384", f"{dense:,}"]
    assert rows[3] == ["encoder/1", "Relu", "float32[7,", "16]", "0", "0", f"{relu:,}"]
    assert rows[4] == ["head", "Dense", "float32[7,", "3]", "51", "204", f"{head:,}"]
    assert lines[-1] == (f"total: 147 parameters, 588 bytes; state: 0 values; {total:,} FLOPs "
                         f"per call")
    plain = fnn.summary(model, jax.ShapeDtypeStruct((7, 5), jnp.float32), flops=False)
    assert plain.splitlines()[0].split() == ["path", "layer", "output", "params", "bytes"]
    assert plain.splitlines()[-1] == "total: 147 parameters, 588 bytes; state: 0 values"


def test_flops_count_a_scan_body_as_many_times_as_it_runs():
    w = jnp.ones((64, 64))

    def loop(x):
        return lax.scan(lambda c, _: (c @ w, None), x, None, length=10)[0]

    x = jnp.ones((8, 64))
    body = 2 * 8 * 64 * 64
    assert flops(lambda x: x @ w, x) == body
    # XLA alone counts the body once; the loop's own counter adds a few operations per loop
    assert 10 * body <= flops(loop, x) <= 10 * body + 8
    nested = flops(lambda x: lax.scan(lambda c, _: (loop(c), None), x, None, length=3)[0], x)
    assert 30 * body <= nested <= 30 * body + 40


def test_summary_counts_every_copy_of_repeat_and_every_step_of_an_rnn():
    x = jax.ShapeDtypeStruct((2, 4), jnp.float32)
    table = fnn.summary(fnn.repeat(fnn.Dense(4), 3), x)
    rows = {line.split()[0]: line.split() for line in table.splitlines()[2:-2] if line[0] != " "}
    one = _dense_flops(2, 4, 4)
    assert rows["layers"][-1] == f"{3 * one:,}"  # the three copies of the body
    repeat = int(table.splitlines()[2].split()[-1].replace(",", ""))  # the repeat itself
    assert 3 * one <= repeat <= 3 * one + 8  # with its loop counter
    seq = jax.ShapeDtypeStruct((2, 6, 3), jnp.float32)
    lstm = int(fnn.summary(fnn.LSTM(5), seq).splitlines()[2].split()[-1].replace(",", ""))
    # at least the recurrent products h @ w_h of all 6 steps (2 * 2 * 5 * 20 each) and the
    # input projection of all steps (2 * 12 * 3 * 20)
    assert lstm >= 6 * 2 * 2 * 5 * 20 + 2 * 12 * 3 * 20


def test_record_layers_lists_every_child_parent_first():
    model = fnn.serial(fnn.Dense(4), encoder=fnn.serial(fnn.Dense(3), fnn.Relu()))
    x = jnp.ones((2, 5))
    params, state = model.init(jax.random.key(0), x)
    with record_layers() as rows:
        y, _ = model.apply(params, state, x)
    assert [(row.path, row.name) for row in rows] == [
        ("0", "Dense"), ("encoder", "serial"), ("encoder/0", "Dense"), ("encoder/1", "Relu")]
    assert rows[-1].output is y and rows[2].params is params["encoder"]["0"]
    assert rows[2].input.shape == (2, 4) and rows[2].copies == 1
    assert fnn.core._OBSERVERS.get() == ()  # recording stops with the block


def _model():
    block = fnn.serial(fnn.Dense(4), fnn.Tanh())
    return fnn.serial(pre=fnn.Dense(4), blocks=fnn.repeat(block, 3),
                      tail=fnn.remat(fnn.serial(fnn.Dense(4), fnn.Relu())))


def test_intermediates_are_values_inside_repeat_and_remat_and_under_jit(key):
    model = _model()
    x = jnp.linspace(-1, 1, 10).reshape(2, 5)
    params, state = model.init(key, x)
    y, _, outputs = jax.jit(lambda p, s, x: capture_intermediates(model, p, s, x))(
        params, state, x)
    assert list(outputs) == sorted(outputs)
    assert set(outputs) == {"pre", "blocks", "blocks/layers", "blocks/layers/0",
                            "blocks/layers/1", "tail", "tail/0", "tail/1"}
    # by construction: the copies one after another, with copy i's params
    h = outputs["pre"]
    for i in range(3):
        p = jax.tree.map(lambda a: a[i], params["blocks"]["layers"])
        dense = h @ p["0"]["w"] + p["0"]["b"][None]
        np.testing.assert_allclose(outputs["blocks/layers/0"][i], dense, rtol=1e-5, atol=1e-6)
        h = jnp.tanh(dense)
        np.testing.assert_allclose(outputs["blocks/layers/1"][i], h, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(outputs["blocks"], h, rtol=1e-5, atol=1e-6)
    tail = jnp.maximum(h @ params["tail"]["0"]["w"] + params["tail"]["0"]["b"][None], 0)
    np.testing.assert_allclose(outputs["tail/1"], tail, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(outputs["tail"], y, rtol=0, atol=0)


def test_capture_changes_neither_outputs_nor_gradients(key):
    model = _model()
    x = jnp.linspace(-1, 1, 10).reshape(2, 5)
    params, state = model.init(key, x)

    def plain(p):
        return jnp.sum(model.apply(p, state, x)[0] ** 2)

    def captured(p):
        y, _, outputs = capture_intermediates(model, p, state, x)
        return jnp.sum(y ** 2) + 0.0 * jnp.sum(outputs["blocks/layers/1"])

    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
                 jax.grad(plain)(params), jax.jit(jax.grad(captured))(params))
    # outside capture_intermediates nothing is collected
    with record_layers() as rows:
        model.apply(params, state, x)
    assert rows and fnn.core._CAPTURED.get() is None


def test_check_params_lists_every_difference_by_path(key):
    model = fnn.serial(fnn.Dense(4), fnn.BatchNorm(), head=fnn.Dense(3))
    x = jnp.zeros((2, 5))
    params, state = model.init(key, x)
    fnn.check_params(model, params, state, x)  # what init makes fits
    other, _ = fnn.serial(fnn.Dense(4), fnn.BatchNorm(), head=fnn.Dense(5)).init(key, x)
    del other["0"]["b"]
    other["extra"] = {"w": jnp.zeros(2)}
    state = {"1": {"mean": state["1"]["mean"].astype(jnp.bfloat16), "var": state["1"]["var"]}}
    with pytest.raises(fnn.ParamError) as error:
        fnn.check_params(model, other, state, x)
    message = str(error.value)
    assert message.startswith("check_params: serial's params and state differ from what its "
                              "init makes for x float32[2, 5]: ")
    assert "params['0']['b']: missing (expected float32[4])" in message
    assert "params['extra']['w']: unexpected float32[2]" in message
    assert "params['head']['b']: expected float32[3], got float32[5]" in message
    assert "params['head']['w']: expected float32[4, 3], got float32[4, 5]" in message
    assert "state['1']['mean']: expected float32[4], got bfloat16[4]" in message
