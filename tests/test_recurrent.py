"""Recurrent layers: cells against numpy references of the standard (PyTorch-documented)
equations, the scan against a Python loop, lengths against running each sequence alone, reverse
and bidirectional runs, transformations, the input projection outside the loop, and errors.

References compute in float64 from PyTorch-layout weights (``weight_ih: [gates * H, in]``,
``weight_hh``, ``bias_ih``, ``bias_hh``), mapped to fnn's params by the rules documented in
``fnn.layers.recurrent``; the layers get float32 inputs.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnn
from fnn.layers.recurrent import (GRU, LSTM, RNN, Bidirectional, Cell, LSTMCarry, RNNCarry,
                                  SimpleRNN)
from refutil import count_dots, walk

TOL = dict(rtol=2e-5, atol=2e-5)
B, T, F, H = 4, 6, 5, 3  # batch, time, input features, hidden size
CELLS = {"SimpleRNN": SimpleRNN, "LSTM": LSTM, "GRU": GRU}
GATES = {"SimpleRNN": 1, "LSTM": 4, "GRU": 3}


# ============================================================================= helpers

def rand(shape, seed=0, scale=1.0):
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _jitted(layer):
    return jax.jit(lambda p, x: layer.apply(p, {}, x)[0])


def run(layer, params, x):
    """``layer.apply`` under ``jax.jit`` (one compilation per layer and input shape)."""
    return _jitted(layer)(params, x)


def torch_weights(kind, seed=0):
    """Random PyTorch-layout weights for one layer: ``weight_ih: [G * H, F]``, ``weight_hh:
    [G * H, H]``, ``bias_ih``, ``bias_hh: [G * H]``."""
    g = GATES[kind] * H
    return {"weight_ih": rand((g, F), seed, 0.6), "weight_hh": rand((g, H), seed + 1, 0.6),
            "bias_ih": rand((g,), seed + 2, 0.3), "bias_hh": rand((g,), seed + 3, 0.3)}


def to_fnn(kind, tw):
    """The documented mapping from PyTorch's weights to fnn's params."""
    params = {"w_i": tw["weight_ih"].T, "w_h": tw["weight_hh"].T}
    if kind == "GRU":
        zeros = np.zeros(H, np.float32)
        params["b"] = tw["bias_ih"] + np.concatenate([tw["bias_hh"][:2 * H], zeros])
        params["b_hn"] = tw["bias_hh"][2 * H:]
    else:
        params["b"] = tw["bias_ih"] + tw["bias_hh"]
    return {k: jnp.asarray(v) for k, v in params.items()}


def sigmoid(v):
    return 1 / (1 + np.exp(-v))


def reference(kind, tw, x):
    """The PyTorch-documented equations in float64. x: [B, T, F] -> outputs [B, T, H] and the
    final (h, c) (c only for the LSTM)."""
    w_ih, w_hh, b_ih, b_hh = (np.asarray(tw[k], np.float64)
                              for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
    x = np.asarray(x, np.float64)
    h = np.zeros((x.shape[0], H))
    c = np.zeros((x.shape[0], H))
    W = lambda w, k: w[k * H:(k + 1) * H]  # noqa: E731 - the k-th gate's rows
    b = lambda v, k: v[k * H:(k + 1) * H]  # noqa: E731
    outputs = []
    for t in range(x.shape[1]):
        xt = x[:, t]
        if kind == "SimpleRNN":
            h = np.tanh(xt @ w_ih.T + b_ih + h @ w_hh.T + b_hh)
        elif kind == "LSTM":
            i = sigmoid(xt @ W(w_ih, 0).T + b(b_ih, 0) + h @ W(w_hh, 0).T + b(b_hh, 0))
            f = sigmoid(xt @ W(w_ih, 1).T + b(b_ih, 1) + h @ W(w_hh, 1).T + b(b_hh, 1))
            g = np.tanh(xt @ W(w_ih, 2).T + b(b_ih, 2) + h @ W(w_hh, 2).T + b(b_hh, 2))
            o = sigmoid(xt @ W(w_ih, 3).T + b(b_ih, 3) + h @ W(w_hh, 3).T + b(b_hh, 3))
            c = f * c + i * g
            h = o * np.tanh(c)
        else:  # GRU
            r = sigmoid(xt @ W(w_ih, 0).T + b(b_ih, 0) + h @ W(w_hh, 0).T + b(b_hh, 0))
            z = sigmoid(xt @ W(w_ih, 1).T + b(b_ih, 1) + h @ W(w_hh, 1).T + b(b_hh, 1))
            n = np.tanh(xt @ W(w_ih, 2).T + b(b_ih, 2)
                        + r * (h @ W(w_hh, 2).T + b(b_hh, 2)))
            h = (1 - z) * n + z * h
        outputs.append(h)
    return np.stack(outputs, axis=1), h, c


# Cells and layers are built once, so that ``run`` compiles each (layer, input shape) once for
# the whole file: this keeps the file fast on a small CPU.

@functools.lru_cache(maxsize=None)
def make_cell(kind):
    return CELLS[kind](H)


@functools.lru_cache(maxsize=None)
def rnn(kind, reverse=False, unroll=1):
    """``RNN(cell, ..., return_carry=True)``: outputs and the final carry."""
    return RNN(make_cell(kind), reverse=reverse, unroll=unroll, return_carry=True)


def setup(kind, seed=0):
    """The cell, fnn params from random PyTorch-layout weights, and an input [B, T, F]."""
    cell = make_cell(kind)
    x = jnp.asarray(rand((B, T, F), seed + 10))
    params = to_fnn(kind, torch_weights(kind, seed))
    spec = jax.eval_shape(lambda: cell.init(jax.random.key(0), x))
    assert jax.tree.map(jnp.shape, spec) == jax.tree.map(jnp.shape, params)
    return cell, params, x


def close(a, b, **tol):
    jax.tree.map(lambda u, v: np.testing.assert_allclose(np.asarray(u, np.float64),
                                                         np.asarray(v, np.float64),
                                                         **(tol or TOL)), a, b)




LENGTHS = np.array([6, 3, 1, 0], np.int32)  # full, partial, one step, empty


def alone(layer, params, x, lengths):
    """Runs each sequence alone, sliced to its length (batch of one)."""
    return [run(layer, params, x[b:b + 1, :n]) for b, n in enumerate(lengths)]


def row(tree, b):
    return jax.tree.map(lambda a: a[b], tree)


# ============================================================================= numerics

@pytest.mark.parametrize("kind", CELLS)
def test_matches_numpy_reference_of_the_standard_equations(kind):
    _, params, x = setup(kind)
    y, carry = run(rnn(kind), params, x)
    y_ref, h_ref, c_ref = reference(kind, torch_weights(kind), x)
    close(y, y_ref)
    close(carry.h, h_ref)
    if kind == "LSTM":
        assert isinstance(carry, LSTMCarry)
        close(carry.c, c_ref)
    else:
        assert isinstance(carry, RNNCarry)


@pytest.mark.parametrize("kind", CELLS)
def test_scan_equals_a_python_loop_over_step(kind):
    cell, params, x = setup(kind, seed=1)
    carry = cell.initial_carry((B,), jnp.float32)
    outputs = []
    for t in range(T):
        carry, y_t = cell.step(params, carry, x[:, t])
        outputs.append(y_t)
    y, last = run(rnn(kind), params, x)
    close(y, jnp.stack(outputs, axis=1))
    close(last, carry)
    if kind == "LSTM":  # the loop is the same for every cell
        for unroll in (2, 3):
            close(run(rnn(kind, unroll=unroll), params, x), (y, last))


@pytest.mark.parametrize("kind", CELLS)
def test_reverse_equals_forward_on_the_flipped_sequence(kind):
    _, params, x = setup(kind, seed=2)
    y_rev, carry_rev = run(rnn(kind, reverse=True), params, x)
    y_fwd, carry_fwd = run(rnn(kind), params, jnp.flip(x, axis=1))
    close(y_rev, jnp.flip(y_fwd, axis=1))
    close(carry_rev, carry_fwd)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_lengths_equal_running_each_sequence_alone(reverse):
    _, params, x = setup("LSTM", seed=3)
    layer = rnn("LSTM", reverse=reverse)
    (y, lengths), carry = run(layer, params, (x, jnp.asarray(LENGTHS)))
    np.testing.assert_array_equal(lengths, LENGTHS)  # the lengths pass through
    for b, (n, (y_b, carry_b)) in enumerate(zip(LENGTHS, alone(layer, params, x, LENGTHS))):
        close(y[b, :n], y_b[0])
        np.testing.assert_array_equal(y[b, n:], 0)  # padded outputs are zero
        close(row(carry, b), row(carry_b, 0))  # the carry at the sequence's end
    # an empty sequence keeps the initial (zero) carry
    np.testing.assert_array_equal(carry.h[3], 0)
    np.testing.assert_array_equal(carry.c[3], 0)


def test_reverse_with_lengths_starts_at_each_sequences_last_valid_step():
    _, params, x = setup("GRU", seed=4)
    (y, _), carry = run(rnn("GRU", reverse=True), params, (x, jnp.asarray(LENGTHS)))
    for b, n in enumerate(LENGTHS[:3]):
        y_ref, h_ref, _ = reference("GRU", torch_weights("GRU", seed=4),
                                    np.flip(np.asarray(x[b:b + 1, :n]), axis=1))
        close(y[b, :n], np.flip(y_ref[0], axis=0))
        close(carry.h[b], h_ref[0])


def test_bidirectional_with_lengths_equals_running_each_sequence_alone():
    cell, forward, x = setup("LSTM", seed=5)
    backward = to_fnn("LSTM", torch_weights("LSTM", seed=6))
    layer = Bidirectional(cell, return_carry=True)
    params = {"forward": forward, "backward": backward}
    assert (jax.tree.map(jnp.shape, jax.eval_shape(layer.init, jax.random.key(0), x)[0])
            == jax.tree.map(jnp.shape, params))
    (y, _), carries = run(layer, params, (x, jnp.asarray(LENGTHS)))
    assert y.shape == (B, T, 2 * H)
    for b, (n, (y_b, carries_b)) in enumerate(zip(LENGTHS, alone(layer, params, x, LENGTHS))):
        close(y[b, :n], y_b[0])
        np.testing.assert_array_equal(y[b, n:], 0)
        close(row(carries, b), row(carries_b, 0))
    # forward half first, then the reverse RNN
    ((y_f, _), _), ((y_r, _), _) = (run(rnn("LSTM", reverse=r), p, (x, jnp.asarray(LENGTHS)))
                                    for r, p in ((False, forward), (True, backward)))
    close(y, jnp.concatenate([y_f, y_r], axis=-1))


def test_bidirectional_combine_modes():
    x = jnp.asarray(rand((B, T, F), 7))
    layer = Bidirectional(make_cell("GRU"), make_cell("SimpleRNN"), combine="tuple")
    spec, _ = jax.eval_shape(layer.init, jax.random.key(0), x)
    params = jax.tree.map(lambda s: jnp.asarray(rand(s.shape, 21, 0.5)), spec)
    assert set(params["forward"]) == {"w_i", "w_h", "b", "b_hn"}
    assert set(params["backward"]) == {"w_i", "w_h", "b"}
    f, b = run(layer, params, x)
    close(b, run(rnn("SimpleRNN", reverse=True), params["backward"], x)[0])
    custom = Bidirectional(make_cell("GRU"), make_cell("SimpleRNN"), combine=lambda uv: uv[0] * uv[1] + uv[0])
    close(run(custom, params, x), f * b + f)
    added = Bidirectional(make_cell("GRU"), make_cell("SimpleRNN"), combine="add")
    assert jax.eval_shape(added.apply, params, {}, x)[0].shape == (B, T, H)


def test_stacking_with_serial_keeps_the_lengths(key):
    model = fnn.serial(RNN(make_cell("LSTM")), RNN(make_cell("GRU"), reverse=True))
    _, _, x = setup("LSTM", seed=8)
    lengths = jnp.asarray(LENGTHS)
    spec, state = jax.eval_shape(model.init, key, (x, lengths))
    assert jax.tree.map(jnp.shape, spec) == {
        "0": {"b": (4 * H,), "w_h": (H, 4 * H), "w_i": (F, 4 * H)},
        "1": {"b": (3 * H,), "b_hn": (H,), "w_h": (H, 3 * H), "w_i": (H, 3 * H)}}
    params = jax.tree.map(lambda s: jnp.asarray(rand(s.shape, 20, 0.5)), spec)
    y, out_lengths = run(model, params, (x, lengths))
    (h, _), _ = run(rnn("LSTM"), params["0"], (x, lengths))
    (expected, _), _ = run(rnn("GRU", reverse=True), params["1"], (h, lengths))
    close(y, expected)
    np.testing.assert_array_equal(out_lengths, LENGTHS)
    # without lengths, plain arrays flow through
    assert jax.eval_shape(model.apply, params, state, x)[0].shape == (B, T, H)


# ============================================================================= transformations

def test_vmap_over_examples_equals_the_batched_call():
    _, params, x = setup("LSTM", seed=9)
    layer = rnn("LSTM", reverse=True)
    lengths = jnp.asarray(LENGTHS)
    # each example alone has no batch axis: x [time, features], lengths int[]
    apply = lambda x, n: layer.apply(params, {}, (x, n))[0]  # noqa: E731
    per_example = jax.jit(jax.vmap(apply))(x, lengths)
    close(per_example, run(layer, params, (x, lengths)))
    # several batch axes
    (y2, _), _ = run(layer, params, (x.reshape(2, 2, T, F), lengths.reshape(2, 2)))
    close(y2, per_example[0][0].reshape(2, 2, T, H))


def test_jit_equals_eager_and_eval_shape_agrees():
    _, params, x = setup("GRU", seed=10)
    layer = rnn("GRU", reverse=True)
    xs = (x, jnp.asarray(LENGTHS))
    eager = layer.apply(params, {}, xs)[0]
    jitted = run(layer, params, xs)
    close(eager, jitted, rtol=1e-5, atol=1e-6)
    spec = jax.eval_shape(lambda p, x: layer.apply(p, {}, x)[0], params, xs)
    assert jax.tree.structure(spec) == jax.tree.structure(jitted)
    for s, r in zip(jax.tree.leaves(spec), jax.tree.leaves(jitted)):
        assert (s.shape, s.dtype) == (r.shape, r.dtype)


def test_gradients_are_finite_and_reach_every_parameter():
    _, params, x = setup("LSTM", seed=11)
    layer = rnn("LSTM", reverse=True)

    def loss(params, x):
        (y, _), _ = layer.apply(params, {}, (x, jnp.asarray(LENGTHS)))[0]
        return jnp.sum(jnp.square(y))

    grads, gx = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
    for g in jax.tree.leaves((grads, gx)):
        assert np.all(np.isfinite(np.asarray(g)))
    for g in jax.tree.leaves(grads):
        assert np.any(np.asarray(g) != 0)
    # nothing flows from the padding
    np.testing.assert_array_equal(gx[1, 3:], 0)
    np.testing.assert_array_equal(gx[3], 0)


@pytest.mark.parametrize("kind", CELLS)
def test_bfloat16_inputs_run_in_bfloat16(kind):
    _, params, x = setup(kind, seed=12)
    layer = rnn(kind)
    y16, carry16 = run(layer, params, x.astype(jnp.bfloat16))
    assert y16.dtype == jnp.bfloat16
    assert all(leaf.dtype == jnp.bfloat16 for leaf in carry16)
    y32, _ = run(layer, params, x)
    np.testing.assert_allclose(np.asarray(y16, np.float32), y32, atol=0.05)


def test_the_input_projection_is_outside_the_scan():
    for kind, lengths in (("LSTM", None), ("LSTM", LENGTHS), ("GRU", None), ("SimpleRNN", None)):
        _, params, x = setup(kind)
        xs = x if lengths is None else (x, jnp.asarray(lengths))
        jaxpr = jax.make_jaxpr(lambda p, x: rnn(kind).apply(p, {}, x)[0])(params, xs).jaxpr
        scans = [eqn for eqn in walk(jaxpr) if eqn.primitive.name == "scan"]
        assert len(scans) == 1
        assert count_dots(scans[0].params["jaxpr"].jaxpr) == 1, kind  # h @ w_h only
        assert count_dots(jaxpr) == 2, kind  # plus x @ w_i, once for all steps


# ============================================================================= init

def test_default_initialisation(key):
    params = LSTM(8).init(key, jax.ShapeDtypeStruct((2, 10, 16), jnp.float32))
    b = np.asarray(params["b"]).reshape(4, 8)
    np.testing.assert_array_equal(b, [[0] * 8, [1] * 8, [0] * 8, [0] * 8])  # i, f, g, o
    w_h = np.asarray(params["w_h"]).reshape(8, 4, 8)
    for g in range(4):  # each gate's recurrent block is orthogonal
        np.testing.assert_allclose(w_h[:, g].T @ w_h[:, g], np.eye(8), atol=1e-5)
    assert 0.5 < np.var(np.asarray(params["w_i"])) * 16 < 1.5  # LeCun normal: variance 1 / in
    custom = GRU(8, w_i_init=jax.nn.initializers.ones, b_init=jax.nn.initializers.ones,
                 param_dtype=jnp.bfloat16).init(key, jnp.zeros((3, 2)))
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(custom))
    np.testing.assert_array_equal(np.asarray(custom["w_i"], np.float32), 1)
    np.testing.assert_array_equal(np.asarray(custom["b_hn"], np.float32), 1)
    carry = LSTM(4).initial_carry((2, 3), jnp.bfloat16)
    assert carry.h.shape == carry.c.shape == (2, 3, 4) and carry.c.dtype == jnp.bfloat16


def test_a_custom_cell_runs_in_rnn():
    """The contract is small: a leaky integrator h' = 0.5 h + x @ w as a Cell."""
    def recur(params, carry, u):
        h = 0.5 * carry.h + u
        return RNNCarry(h), h

    cell = Cell(init=lambda key, x: {"w": jnp.ones((x.shape[-1], 2))},
                project=lambda params, x: x @ params["w"], recur=recur,
                initial_carry=lambda shape, dtype=jnp.float32: RNNCarry(
                    jnp.zeros((*shape, 2), dtype)),
                in_features=lambda params: params["w"].shape[0], name="Leaky", hidden_size=2)
    x = jnp.ones((1, 3, 1))
    params, _ = RNN(cell).init(jax.random.key(0), x)
    y, _ = RNN(cell).apply(params, {}, x)
    np.testing.assert_allclose(y[0, :, 0], [1, 1.5, 1.75])


# ============================================================================= errors

def test_input_shape_errors_name_the_layer(key):
    _, params, x = setup("LSTM")
    layer = RNN(make_cell("LSTM"))
    with pytest.raises(fnn.ShapeError, match=r"^LSTM: expected input \[\.\.\., time, 5\], "
                                             r"got float32\[4, 6, 4\]"):
        jax.jit(lambda x: layer.apply(params, {}, x))(x[..., :4])  # at trace time
    with pytest.raises(fnn.ShapeError, match=r"^LSTM: expected input \[\.\.\., time, 5\], "
                                             r"got float32\[5\]$"):
        layer.apply(params, {}, x[0, 0])
    with pytest.raises(fnn.ShapeError, match=r"^GRU: expected input \[\.\.\., time, "
                                             r"in_features\], got float32\[6\]$"):
        RNN(GRU(3)).init(key, jnp.zeros((6,)))
    model = fnn.serial(RNN(LSTM(4)), fnn.Dense(2), Bidirectional(GRU(3)))
    mparams, state = jax.eval_shape(model.init, key, x)
    mparams["2"]["backward"]["w_i"] = jax.ShapeDtypeStruct((3, 9), jnp.float32)
    with pytest.raises(fnn.ShapeError, match=r"^GRU at 2/backward: expected input "
                                             r"\[\.\.\., time, 3\], got float32\[4, 6, 2\]"):
        jax.eval_shape(model.apply, mparams, state, x)
    cell = make_cell("SimpleRNN")
    with pytest.raises(fnn.ShapeError, match=r"^SimpleRNN: expected input \[\.\.\., 5\], "
                                             r"got float32\[4, 4\]"):
        cell.step(setup("SimpleRNN")[1], cell.initial_carry((4,)), x[:, 0, :4])


def test_lengths_errors(key):
    _, params, x = setup("GRU")
    layer = rnn("GRU")
    with pytest.raises(fnn.ShapeError, match=r"^GRU: expected lengths int\[4\] \(the batch "
                                             r"axes of the input float32\[4, 6, 5\]\), "
                                             r"got int32\[4, 1\]$"):
        layer.apply(params, {}, (x, jnp.zeros((4, 1), jnp.int32)))
    with pytest.raises(fnn.ShapeError, match=r"expected lengths int\[4\] .* got float32\[4\]$"):
        layer.apply(params, {}, (x, jnp.zeros((4,))))
    with pytest.raises(fnn.ShapeError, match=r"^GRU at forward: expected lengths int\[4\]"):
        Bidirectional(GRU(3)).init(key, (x, jnp.zeros((3,), jnp.int32)))
    with pytest.raises(fnn.LayerError, match=r"^GRU: expected input x \[\.\.\., time, features\] "
                                             r"or a tuple \(x, lengths\), got a tuple of 3 items$"):
        layer.apply(params, {}, (x, jnp.zeros((4,), jnp.int32), None))


def test_bad_hyper_parameters_are_rejected():
    for factory in (SimpleRNN, LSTM, GRU):
        with pytest.raises(ValueError, match=rf"^{factory.__name__}: hidden_size must be a "
                                             r"positive integer, got 0$"):
            factory(0)
    with pytest.raises(ValueError, match=r"^LSTM: hidden_size must be a positive integer, "
                                         r"got 2.5$"):
        LSTM(2.5)
    with pytest.raises(ValueError, match=r"^LSTM: unroll must be a positive integer, got 0$"):
        RNN(LSTM(2), unroll=0)
    with pytest.raises(TypeError, match=r"^RNN: cell must be a Cell .*got Layer$"):
        RNN(fnn.Dense(3))
    with pytest.raises(TypeError, match=r"^Bidirectional: forward_cell must be a Cell .*not a "
                                        r"layer; got Layer$"):
        Bidirectional(RNN(LSTM(3)))
    with pytest.raises(ValueError, match=r"^Bidirectional: combine must be one of \['add', "
                                         r"'concat', 'tuple'\] or a function, got 'mean'$"):
        Bidirectional(LSTM(3), combine="mean")
