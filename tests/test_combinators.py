"""Combinators: param trees, values by construction, keys, summary."""

import jax
import jax.numpy as jnp
import numpy as np

import fnn


def _shapes(tree):
    return jax.tree.map(jnp.shape, tree)


def test_serial_threads_shapes_and_names_children(key):
    model = fnn.serial(fnn.Dense(8), fnn.Relu(), fnn.Dropout(0.1), head=fnn.Dense(3))
    params, state = model.init(key, jax.ShapeDtypeStruct((4, 5), jnp.float32))
    # parameter-free layers add nothing; positions stay stable
    assert _shapes(params) == {"0": {"w": (5, 8), "b": (8,)}, "head": {"w": (8, 3), "b": (3,)}}
    assert state == {}
    x = jnp.arange(20.0).reshape(4, 5) / 20
    y, _ = model.apply(params, state, x)
    p = jax.tree.map(np.asarray, params)
    h = np.maximum(np.asarray(x) @ p["0"]["w"] + p["0"]["b"], 0)
    np.testing.assert_allclose(y, h @ p["head"]["w"] + p["head"]["b"], rtol=1e-5, atol=1e-6)


def test_named_nests_params(key):
    params, _ = fnn.named("encoder", fnn.Dense(2)).init(key, jnp.zeros((1, 3)))
    assert _shapes(params) == {"encoder": {"w": (3, 2), "b": (2,)}}


def test_branch_combines_by_construction(key):
    x = jnp.arange(6.0).reshape(2, 3)
    double = fnn.Lambda(lambda v: 2 * v)
    square = fnn.Lambda(jnp.square)
    y, _ = fnn.branch(double, square).apply({}, {}, x)
    np.testing.assert_array_equal(y, np.concatenate([2 * x, x ** 2], -1))
    y, _ = fnn.branch(double, square, combine="add").apply({}, {}, x)
    np.testing.assert_array_equal(y, 2 * x + x ** 2)
    y, _ = fnn.branch(a=double, b=square, combine="tuple").apply({}, {}, x)
    np.testing.assert_array_equal(y[0], 2 * x)
    np.testing.assert_array_equal(y[1], x ** 2)
    y, _ = fnn.branch(double, square, combine=lambda ys: ys[0] * ys[1]).apply({}, {}, x)
    np.testing.assert_array_equal(y, 2 * x ** 3)


def test_branch_params_are_named(key):
    params, _ = fnn.branch(left=fnn.Dense(2), right=fnn.Dense(3)).init(key, jnp.zeros((1, 4)))
    assert set(params) == {"left", "right"}


def test_residual_adds_the_input(key):
    body = fnn.Dense(4)
    params, state = fnn.residual(body).init(key, jnp.zeros((2, 4)))
    assert set(params) == {"body"}
    x = jax.random.normal(key, (2, 4))
    y, _ = fnn.residual(body).apply(params, state, x)
    np.testing.assert_allclose(y, body.apply(params["body"], {}, x)[0] + x, rtol=1e-6)
    shortcut = fnn.Dense(4)
    params, state = fnn.residual(body, shortcut).init(key, jnp.zeros((2, 3)))
    assert set(params) == {"body", "shortcut"}


def test_children_get_different_keys(key):
    model = fnn.serial(fnn.Dropout(0.5), fnn.Dropout(0.5))
    x = jnp.ones((1000,))
    # each dropout draws its own mask: after two, about a quarter survive (not half)
    y, _ = model.apply({}, {}, x, key=key, train=True)
    assert 0.2 < float(jnp.mean(y > 0)) < 0.3
    y2, _ = model.apply({}, {}, x, key=key, train=True)
    np.testing.assert_array_equal(y, y2)  # same key, same masks


def test_state_is_threaded_through_combinators(key):
    model = fnn.serial(fnn.Dense(3), norm=fnn.BatchNorm(momentum=0.5))
    params, state = model.init(key, jnp.zeros((8, 2)))
    assert _shapes(state) == {"norm": {"mean": (3,), "var": (3,)}}
    x = jax.random.normal(key, (8, 2)) + 3
    _, new_state = model.apply(params, state, x, train=True)
    h = np.asarray(fnn.Dense(3).apply(params["0"], {}, x)[0])
    np.testing.assert_allclose(new_state["norm"]["mean"], 0.5 * h.mean(0), rtol=1e-5)
    _, eval_state = model.apply(params, new_state, x)
    assert eval_state is new_state or jax.tree.all(jax.tree.map(np.array_equal, eval_state,
                                                                new_state))


def test_param_count_and_bytes(key):
    model = fnn.serial(fnn.Dense(10), fnn.Dense(5, param_dtype=jnp.bfloat16))
    params, _ = model.init(key, jnp.zeros((1, 4)))
    assert fnn.param_count(params) == 4 * 10 + 10 + 10 * 5 + 5
    assert fnn.param_bytes(params) == (4 * 10 + 10) * 4 + (10 * 5 + 5) * 2


def test_summary_lists_every_layer():
    model = fnn.serial(encoder=fnn.serial(fnn.Dense(16), fnn.Relu()), head=fnn.Dense(3))
    table = fnn.summary(model, jax.ShapeDtypeStruct((7, 5), jnp.float32))
    lines = table.splitlines()
    assert lines[0].split() == ["path", "layer", "output", "params", "bytes"]
    rows = [line.split() for line in lines[2:-2]]
    assert rows[0] == ["serial", "float32[7,", "3]", "147", "588"]
    assert rows[1] == ["encoder", "serial", "float32[7,", "16]", "96", "384"]
    assert rows[2] == ["encoder/0", "Dense", "float32[7,", "16]", "96", "384"]
    assert rows[3] == ["encoder/1", "Relu", "float32[7,", "16]", "0", "0"]
    assert rows[4] == ["head", "Dense", "float32[7,", "3]", "51", "204"]
    assert lines[-1] == "total: 147 parameters, 588 bytes; state: 0 values"


def test_init_accepts_arrays_and_specs(key):
    model = fnn.serial(fnn.Conv(4, (3, 3)), fnn.Flatten(), fnn.Dense(2))
    p1, _ = model.init(key, jnp.zeros((2, 5, 5, 3)))
    p2, _ = model.init(key, jax.ShapeDtypeStruct((2, 5, 5, 3), jnp.float32))
    jax.tree.map(np.testing.assert_array_equal, p1, p2)


def test_init_under_jit_matches_eager(key):
    model = fnn.serial(fnn.Dense(4), fnn.BatchNorm(), fnn.Dense(2))
    eager = model.init(key, jnp.zeros((3, 5)))
    jitted = jax.jit(model.init)(key, jnp.zeros((3, 5)))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), eager, jitted)
