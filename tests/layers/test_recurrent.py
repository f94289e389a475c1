"""Recurrent layers (fnn/layers/recurrent.py): the cells against numpy references of the standard
(PyTorch-documented) equations, the scan against a Python loop, lengths against running each
sequence alone, reverse and bidirectional runs, the layers ``LSTM``/``GRU``/``SimpleRNN`` against
``RNN(cell)``, stacks with dropout, transformations, the input projection outside the loop, the
LSTM's own loop (a ``jax.custom_jvp``) against the generic scan, and errors.

References compute in float64 from PyTorch-layout weights (``weight_ih: [gates * H, in]``,
``weight_hh``, ``bias_ih``, ``bias_hh``), mapped to fnn's params by the rules documented in
``fnn.layers.recurrent``; the layers get float32 inputs. Layers are built once (cached), so that
each (layer, input structure) compiles once for the whole file.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnn
from fnn.core import Seq
from fnn.layers.recurrent import (GRU, LSTM, RNN, Bidirectional, Cell, GRUCell, LSTMCarry,
                                  LSTMCell, RNNCarry, SimpleRNN, SimpleRNNCell)
from helpers import count_dots, f64, make_params, rand, run, walk

TOL = dict(rtol=2e-5, atol=2e-5)
B, T, F, H = 4, 6, 5, 3  # batch, time, input features, hidden size
CELLS = {"SimpleRNN": SimpleRNNCell, "LSTM": LSTMCell, "GRU": GRUCell}
LAYERS = {"SimpleRNN": SimpleRNN, "LSTM": LSTM, "GRU": GRU}
GATES = {"SimpleRNN": 1, "LSTM": 4, "GRU": 3}
LENGTHS = np.array([6, 3, 1, 0], np.int32)  # full, partial, one step, empty


# ============================================================================= helpers

def randn(shape, seed=0, scale=1.0):
    return scale * rand(shape, seed)


def out(layer, params, x):
    """The output of ``layer.apply`` under ``jit`` (helpers.run, one compilation per layer and
    input structure)."""
    return run(layer, params, x)[0]


def torch_weights(kind, seed=0):
    """Random PyTorch-layout weights for one layer: ``weight_ih: [G * H, F]``, ``weight_hh:
    [G * H, H]``, ``bias_ih``, ``bias_hh: [G * H]``."""
    g = GATES[kind] * H
    return {"weight_ih": randn((g, F), seed, 0.6), "weight_hh": randn((g, H), seed + 1, 0.6),
            "bias_ih": randn((g,), seed + 2, 0.3), "bias_hh": randn((g,), seed + 3, 0.3)}


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
    w_ih, w_hh, b_ih, b_hh = (f64(tw[k]) for k in ("weight_ih", "weight_hh", "bias_ih",
                                                    "bias_hh"))
    x = f64(x)
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
    jax.tree.map(lambda u, v: np.testing.assert_allclose(f64(u), f64(v), **(tol or TOL)), a, b)


def alone(layer, params, x, lengths):
    """Runs each sequence alone, sliced to its length (batch of one)."""
    return [out(layer, params, x[b:b + 1, :n]) for b, n in enumerate(lengths)]


def row(tree, b):
    return jax.tree.map(lambda a: a[b], tree)


# ============================================================================= numerics

@pytest.mark.parametrize("kind", CELLS)
def test_matches_numpy_reference_of_the_standard_equations(kind):
    _, params, x = setup(kind)
    y, carry = out(rnn(kind), params, x)
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
    y, last = out(rnn(kind), params, x)
    close(y, jnp.stack(outputs, axis=1))
    close(last, carry)
    if kind == "LSTM":  # the loop is the same for every cell
        for unroll in (2, 3):
            close(out(rnn(kind, unroll=unroll), params, x), (y, last))


@pytest.mark.parametrize("kind", CELLS)
def test_reverse_equals_forward_on_the_flipped_sequence(kind):
    _, params, x = setup(kind, seed=2)
    y_rev, carry_rev = out(rnn(kind, reverse=True), params, x)
    y_fwd, carry_fwd = out(rnn(kind), params, jnp.flip(x, axis=1))
    close(y_rev, jnp.flip(y_fwd, axis=1))
    close(carry_rev, carry_fwd)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_lengths_equal_running_each_sequence_alone(reverse):
    _, params, x = setup("LSTM", seed=3)
    layer = rnn("LSTM", reverse=reverse)
    y, carry = out(layer, params, Seq(x, lengths=jnp.asarray(LENGTHS)))
    assert isinstance(y, Seq)
    np.testing.assert_array_equal(y.lengths, LENGTHS)  # the lengths pass through
    for b, (n, (y_b, carry_b)) in enumerate(zip(LENGTHS, alone(layer, params, x, LENGTHS))):
        close(y.x[b, :n], y_b[0])
        np.testing.assert_array_equal(y.x[b, n:], 0)  # padded outputs are zero
        close(row(carry, b), row(carry_b, 0))  # the carry at the sequence's end
    # an empty sequence keeps the initial (zero) carry
    np.testing.assert_array_equal(carry.h[3], 0)
    np.testing.assert_array_equal(carry.c[3], 0)


def test_reverse_with_lengths_starts_at_each_sequences_last_valid_step():
    _, params, x = setup("GRU", seed=4)
    y, carry = out(rnn("GRU", reverse=True), params, Seq(x, lengths=jnp.asarray(LENGTHS)))
    for b, n in enumerate(LENGTHS[:3]):
        y_ref, h_ref, _ = reference("GRU", torch_weights("GRU", seed=4),
                                    np.flip(np.asarray(x[b:b + 1, :n]), axis=1))
        close(y.x[b, :n], np.flip(y_ref[0], axis=0))
        close(carry.h[b], h_ref[0])


def test_bidirectional_with_lengths_equals_running_each_sequence_alone():
    cell, forward, x = setup("LSTM", seed=5)
    backward = to_fnn("LSTM", torch_weights("LSTM", seed=6))
    layer = Bidirectional(cell, return_carry=True)
    params = {"forward": forward, "backward": backward}
    assert (jax.tree.map(jnp.shape, jax.eval_shape(layer.init, jax.random.key(0), x)[0])
            == jax.tree.map(jnp.shape, params))
    seq = Seq(x, lengths=jnp.asarray(LENGTHS))
    y, carries = out(layer, params, seq)
    assert isinstance(y, Seq) and y.x.shape == (B, T, 2 * H)
    np.testing.assert_array_equal(y.lengths, LENGTHS)
    for b, (n, (y_b, carries_b)) in enumerate(zip(LENGTHS, alone(layer, params, x, LENGTHS))):
        close(y.x[b, :n], y_b[0])
        np.testing.assert_array_equal(y.x[b, n:], 0)
        close(row(carries, b), row(carries_b, 0))
    # forward half first, then the reverse RNN
    (y_f, _), (y_r, _) = (out(rnn("LSTM", reverse=r), p, seq)
                          for r, p in ((False, forward), (True, backward)))
    close(y.x, jnp.concatenate([y_f.x, y_r.x], axis=-1))


def test_bidirectional_combine_modes():
    x = jnp.asarray(rand((B, T, F), 7))
    layer = Bidirectional(make_cell("GRU"), make_cell("SimpleRNN"), combine="tuple")
    params = make_params(layer, x, seed=21)
    assert set(params["forward"]) == {"w_i", "w_h", "b", "b_hn"}
    assert set(params["backward"]) == {"w_i", "w_h", "b"}
    f, b = out(layer, params, x)
    close(f, out(rnn("GRU"), params["forward"], x)[0])
    close(b, out(rnn("SimpleRNN", reverse=True), params["backward"], x)[0])
    custom = Bidirectional(make_cell("GRU"), make_cell("SimpleRNN"),
                           combine=lambda uv: uv[0] * uv[1] + uv[0])
    close(out(custom, params, x), f * b + f)
    added = Bidirectional(make_cell("GRU"), make_cell("SimpleRNN"), combine="add")
    assert jax.eval_shape(added.apply, params, {}, x)[0].shape == (B, T, H)


def test_stacking_with_serial_keeps_the_lengths(key):
    model = fnn.serial(RNN(make_cell("LSTM")), RNN(make_cell("GRU"), reverse=True))
    _, _, x = setup("LSTM", seed=8)
    lengths = jnp.asarray(LENGTHS)
    spec, state = jax.eval_shape(model.init, key, Seq(x, lengths=lengths))
    assert jax.tree.map(jnp.shape, spec) == {
        "0": {"b": (4 * H,), "w_h": (H, 4 * H), "w_i": (F, 4 * H)},
        "1": {"b": (3 * H,), "b_hn": (H,), "w_h": (H, 3 * H), "w_i": (H, 3 * H)}}
    params = make_params(model, Seq(x, lengths=lengths), seed=20)
    y = out(model, params, Seq(x, lengths=lengths))
    h, _ = out(rnn("LSTM"), params["0"], Seq(x, lengths=lengths))
    expected, _ = out(rnn("GRU", reverse=True), params["1"], h)
    close(y.x, expected.x)
    np.testing.assert_array_equal(y.lengths, LENGTHS)
    # without lengths, plain arrays flow through
    assert jax.eval_shape(model.apply, params, state, x)[0].shape == (B, T, H)


# ============================================================================= the layers

STACK = fnn.serial(fnn.LSTM(8), fnn.Dropout(0.2), fnn.LSTM(6))


def test_a_stack_with_dropout_on_lengths_in_eval_and_training():
    """serial(LSTM(8), Dropout(0.2), LSTM(6)) on a Seq with lengths: evaluation equals each
    sequence alone on its valid prefix; training draws the dropout mask from the key the serial
    gives its child "1" (fold_in(key, 1)) and applies it between the two LSTMs."""
    x = jnp.asarray(rand((B, T, F), 40))
    lengths = jnp.asarray(LENGTHS)
    params = make_params(STACK, Seq(x, lengths=lengths), seed=41)
    assert jax.tree.map(jnp.shape, params) == {
        "0": {"b": (32,), "w_h": (8, 32), "w_i": (F, 32)},
        "2": {"b": (24,), "w_h": (6, 24), "w_i": (8, 24)}}
    y, state = run(STACK, params, Seq(x, lengths=lengths))
    assert isinstance(y, Seq) and y.x.shape == (B, T, 6) and state == {}
    np.testing.assert_array_equal(y.lengths, LENGTHS)
    for b, n in enumerate(LENGTHS):
        alone_b, _ = run(STACK, params, x[b:b + 1, :n])
        close(y.x[b, :n], alone_b[0])
        np.testing.assert_array_equal(y.x[b, n:], 0)

    drop_key = jax.random.key(7)
    y_train, _ = run(STACK, params, Seq(x, lengths=lengths), key=drop_key, train=True)
    assert isinstance(y_train, Seq)
    np.testing.assert_array_equal(y_train.lengths, LENGTHS)
    first, second = fnn.LSTM(8), fnn.LSTM(6)
    h = out(first, params["0"], Seq(x, lengths=lengths)).x
    keep = jax.random.bernoulli(jax.random.fold_in(drop_key, 1), 0.8, h.shape)
    dropped = np.where(np.asarray(keep), f64(h) / 0.8, 0.0)
    assert 0 < np.mean(~np.asarray(keep)) < 0.5  # the mask does drop something
    expected = out(second, params["2"], Seq(jnp.asarray(dropped, jnp.float32), lengths=lengths))
    close(y_train.x, expected.x)
    assert not np.allclose(f64(y_train.x), f64(y.x), atol=1e-3)  # dropout acted in training
    for b, n in enumerate(LENGTHS):
        np.testing.assert_array_equal(y_train.x[b, n:], 0)
    with pytest.raises(fnn.MissingKeyError, match=r"^Dropout at 1 is stochastic"):
        STACK.apply(params, {}, Seq(x, lengths=lengths), train=True)


@pytest.mark.parametrize("kind", LAYERS)
def test_layers_equal_rnn_of_the_cell(kind):
    """fnn.LSTM(H) is RNN(LSTMCell(H)) (and so for GRU, SimpleRNN): same name, params, outputs;
    reverse, unroll and return_carry are passed to the RNN, other options to the cell."""
    _, params, x = setup(kind, seed=30)
    seq = Seq(x, lengths=jnp.asarray(LENGTHS))
    assert LAYERS[kind](H).name == kind and RNN(make_cell(kind)).name == kind
    spec, state = jax.eval_shape(LAYERS[kind](H).init, jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, spec) == jax.tree.map(jnp.shape, params) and state == {}
    for reverse, return_carry in ((False, False), (True, True)):
        layer = LAYERS[kind](H, reverse=reverse, unroll=2, return_carry=return_carry)
        got = out(layer, params, seq)
        y_ref, carry_ref = out(rnn(kind, reverse=reverse), params, seq)
        if return_carry:
            close(got[0].x, y_ref.x)
            close(got[1], carry_ref)
        else:
            assert isinstance(got, Seq)
            close(got.x, y_ref.x)
        jaxpr = jax.make_jaxpr(lambda p, s: layer.apply(p, {}, s)[0])(params, seq).jaxpr
        scans = [eqn for eqn in walk(jaxpr) if eqn.primitive.name == "scan"]
        assert [(s.params["reverse"], s.params["unroll"]) for s in scans] == [(reverse, 2)]
    # cell options reach the cell
    key = jax.random.key(1)
    options = {"LSTM": dict(forget_bias=3.0), "GRU": dict(b_init=jax.nn.initializers.ones),
               "SimpleRNN": dict(b_init=jax.nn.initializers.ones)}[kind]
    layer_params, _ = LAYERS[kind](H, **options).init(key, x)
    cell_params, _ = RNN(CELLS[kind](H, **options)).init(key, x)
    jax.tree.map(np.testing.assert_array_equal, layer_params, cell_params)
    assert not np.array_equal(layer_params["b"], RNN(make_cell(kind)).init(key, x)[0]["b"])
    if kind == "SimpleRNN":  # the activation is a cell option too
        relu = SimpleRNN(H, activation=jax.nn.relu)
        close(out(relu, params, x), out(RNN(SimpleRNNCell(H, activation=jax.nn.relu)), params, x))
        assert not np.allclose(f64(out(relu, params, x)), f64(out(rnn(kind), params, x)[0]))


def test_layers_are_refused_where_a_cell_is_expected():
    for layer in (fnn.LSTM(4), fnn.GRU(4), fnn.SimpleRNN(4)):
        with pytest.raises(TypeError, match=rf"^RNN: cell must be a Cell .*; {layer.name} is "
                                            r"already a layer .*use it as it is$"):
            RNN(layer)
        with pytest.raises(TypeError, match=rf"^Bidirectional: forward_cell must be a Cell "
                                            rf".*not a layer; got {layer.name}$"):
            Bidirectional(layer)
    with pytest.raises(TypeError, match=r"^Bidirectional: backward_cell must be a Cell .*not a "
                                        r"layer; got GRU$"):
        Bidirectional(LSTMCell(4), fnn.GRU(4))


# ============================================================================= transformations

def test_vmap_over_examples_equals_the_batched_call():
    _, params, x = setup("LSTM", seed=9)
    layer = rnn("LSTM", reverse=True)
    lengths = jnp.asarray(LENGTHS)
    # each example alone has no batch axis: x [time, features], lengths int[]
    apply = lambda x, n: layer.apply(params, {}, Seq(x, lengths=n))[0]  # noqa: E731
    per_example = jax.jit(jax.vmap(apply))(x, lengths)
    close(per_example, out(layer, params, Seq(x, lengths=lengths)))
    # several batch axes
    y2, _ = out(layer, params, Seq(x.reshape(2, 2, T, F), lengths=lengths.reshape(2, 2)))
    close(y2.x, per_example[0].x.reshape(2, 2, T, H))


def test_jit_equals_eager_and_eval_shape_agrees():
    _, params, x = setup("GRU", seed=10)
    layer = rnn("GRU", reverse=True)
    xs = Seq(x, lengths=jnp.asarray(LENGTHS))
    eager = layer.apply(params, {}, xs)[0]
    jitted = out(layer, params, xs)
    close(eager, jitted, rtol=1e-5, atol=1e-6)
    spec = jax.eval_shape(lambda p, x: layer.apply(p, {}, x)[0], params, xs)
    assert jax.tree.structure(spec) == jax.tree.structure(jitted)
    for s, r in zip(jax.tree.leaves(spec), jax.tree.leaves(jitted)):
        assert (s.shape, s.dtype) == (r.shape, r.dtype)


def test_gradients_are_finite_and_reach_every_parameter():
    _, params, x = setup("LSTM", seed=11)
    layer = rnn("LSTM", reverse=True)

    def loss(params, x):
        y, _ = layer.apply(params, {}, Seq(x, lengths=jnp.asarray(LENGTHS)))[0]
        return jnp.sum(jnp.square(y.x))

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
    y16, carry16 = out(layer, params, x.astype(jnp.bfloat16))
    assert y16.dtype == jnp.bfloat16
    assert all(leaf.dtype == jnp.bfloat16 for leaf in carry16)
    y32, _ = out(layer, params, x)
    np.testing.assert_allclose(np.asarray(y16, np.float32), y32, atol=0.05)


def test_the_input_projection_is_outside_the_scan():
    for kind, lengths in (("LSTM", None), ("LSTM", LENGTHS), ("GRU", None), ("SimpleRNN", None)):
        _, params, x = setup(kind)
        xs = x if lengths is None else Seq(x, lengths=jnp.asarray(lengths))
        jaxpr = jax.make_jaxpr(lambda p, x: rnn(kind).apply(p, {}, x)[0])(params, xs).jaxpr
        scans = [eqn for eqn in walk(jaxpr) if eqn.primitive.name == "scan"]
        assert len(scans) == 1
        assert count_dots(scans[0].params["jaxpr"].jaxpr) == 1, kind  # h @ w_h only
        assert count_dots(jaxpr) == 2, kind  # plus x @ w_i, once for all steps


# ============================================================================= init

def test_default_initialisation(key):
    params = LSTMCell(8).init(key, jax.ShapeDtypeStruct((2, 10, 16), jnp.float32))
    b = np.asarray(params["b"]).reshape(4, 8)
    np.testing.assert_array_equal(b, [[0] * 8, [1] * 8, [0] * 8, [0] * 8])  # i, f, g, o
    w_h = np.asarray(params["w_h"]).reshape(8, 4, 8)
    for g in range(4):  # each gate's recurrent block is orthogonal
        np.testing.assert_allclose(w_h[:, g].T @ w_h[:, g], np.eye(8), atol=1e-5)
    assert 0.5 < np.var(np.asarray(params["w_i"])) * 16 < 1.5  # LeCun normal: variance 1 / in
    custom = GRUCell(8, w_i_init=jax.nn.initializers.ones, b_init=jax.nn.initializers.ones,
                     param_dtype=jnp.bfloat16).init(key, jnp.zeros((3, 2)))
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(custom))
    np.testing.assert_array_equal(np.asarray(custom["w_i"], np.float32), 1)
    np.testing.assert_array_equal(np.asarray(custom["b_hn"], np.float32), 1)
    carry = LSTMCell(4).initial_carry((2, 3), jnp.bfloat16)
    assert carry.h.shape == carry.c.shape == (2, 3, 4) and carry.c.dtype == jnp.bfloat16
    assert (LSTMCell(4).name, GRUCell(4).name, SimpleRNNCell(4).name) == (
        "LSTMCell", "GRUCell", "SimpleRNNCell")
    assert LSTMCell(4).features == GRUCell(5).features - 1 == 4


def test_a_custom_cell_runs_in_rnn():
    """The contract is small: a leaky integrator h' = 0.5 h + x @ w as a Cell."""
    def recur(params, carry, u):
        h = 0.5 * carry.h + u
        return RNNCarry(h), h

    cell = Cell(init=lambda key, x: {"w": jnp.ones((x.shape[-1], 2))},
                project=lambda params, x: x @ params["w"], recur=recur,
                initial_carry=lambda shape, dtype=jnp.float32: RNNCarry(
                    jnp.zeros((*shape, 2), dtype)),
                in_features=lambda params: params["w"].shape[0], name="Leaky", features=2)
    x = jnp.ones((1, 3, 1))
    params, _ = RNN(cell).init(jax.random.key(0), x)
    y, _ = RNN(cell).apply(params, {}, x)
    np.testing.assert_allclose(y[0, :, 0], [1, 1.5, 1.75])
    assert RNN(cell).name == "Leaky"


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
        RNN(GRUCell(3)).init(key, jnp.zeros((6,)))
    model = fnn.serial(fnn.LSTM(4), fnn.Dense(2), Bidirectional(GRUCell(3)))
    mparams, state = jax.eval_shape(model.init, key, x)
    mparams["2"]["backward"]["w_i"] = jax.ShapeDtypeStruct((3, 9), jnp.float32)
    with pytest.raises(fnn.ShapeError, match=r"^GRU at 2/backward: expected input "
                                             r"\[\.\.\., time, 3\], got float32\[4, 6, 2\]"):
        jax.eval_shape(model.apply, mparams, state, x)
    cell = make_cell("SimpleRNN")
    with pytest.raises(fnn.ShapeError, match=r"^SimpleRNNCell: expected input \[\.\.\., 5\], "
                                             r"got float32\[4, 4\]"):
        cell.step(setup("SimpleRNN")[1], cell.initial_carry((4,)), x[:, 0, :4])


def test_lengths_errors(key):
    _, params, x = setup("GRU")
    layer = rnn("GRU")
    with pytest.raises(fnn.ShapeError, match=r"^GRU: expected lengths int\[4\] \(the batch "
                                             r"axes of x float32\[4, 6, 5\]\), "
                                             r"got int32\[4, 1\]$"):
        layer.apply(params, {}, Seq(x, lengths=jnp.zeros((4, 1), jnp.int32)))
    with pytest.raises(fnn.ShapeError, match=r"expected lengths int\[4\] .* got float32\[4\]$"):
        layer.apply(params, {}, Seq(x, lengths=jnp.zeros((4,))))
    with pytest.raises(fnn.ShapeError, match=r"^GRU at forward: expected lengths int\[4\]"):
        Bidirectional(GRUCell(3)).init(key, Seq(x, lengths=jnp.zeros((3,), jnp.int32)))
    # the old tuple input (x, lengths) is no longer read: it is refused, not misread
    with pytest.raises(fnn.ShapeError, match=r"^GRU: expected input \[\.\.\., time, 5\], "
                                             r"got tuple$"):
        layer.apply(params, {}, (x, jnp.zeros((4,), jnp.int32)))


def test_bad_hyper_parameters_are_rejected():
    for factory in (SimpleRNNCell, LSTMCell, GRUCell, SimpleRNN, LSTM, GRU):
        cell_name = factory.__name__.removesuffix("Cell") + "Cell"
        with pytest.raises(ValueError, match=rf"^{cell_name}: features must be a positive "
                                             r"integer, got 0$"):
            factory(0)
    with pytest.raises(ValueError, match=r"^LSTMCell: features must be a positive integer, "
                                         r"got 2.5$"):
        LSTMCell(2.5)
    with pytest.raises(ValueError, match=r"^LSTM: unroll must be a positive integer, got 0$"):
        RNN(LSTMCell(2), unroll=0)
    with pytest.raises(ValueError, match=r"^GRU: unroll must be a positive integer, got 0$"):
        GRU(2, unroll=0)
    with pytest.raises(TypeError, match=r"^RNN: cell must be a Cell .*got the layer Dense$"):
        RNN(fnn.Dense(3))
    with pytest.raises(TypeError, match=r"^RNN: cell must be a Cell .*got str$"):
        RNN("lstm")
    with pytest.raises(ValueError, match=r"^Bidirectional: combine must be one of \['add', "
                                         r"'concat', 'tuple'\] or a function, got 'mean'$"):
        Bidirectional(LSTMCell(3), combine="mean")


# ============================================================================= the LSTM's loop
# ``Cell.loop``, a ``jax.custom_jvp``, against the generic scan over the same cell's ``recur``:
# values, gradients, forward-mode and second derivatives, with lengths, reverse, unroll and any
# number of batch axes; the shape of its backward pass (one matrix product per step, weight
# gradients outside the loops, less memory); and the ``loop`` contract for custom cells.

LB, LT, LF = 3, 5, 4  # batch, time, input features of the loop tests (hidden size H)
LOOP_LENGTHS = np.array([5, 2, 0], np.int32)  # full, partial, empty
LOOP_TOL = dict(rtol=2e-5, atol=2e-6)


def lstm_params(seed=0):
    """Random LSTM params, larger than the default init so that every gate saturates a bit."""
    return {"w_i": jnp.asarray(randn((LF, 4 * H), seed, 0.7)),
            "w_h": jnp.asarray(randn((H, 4 * H), seed + 1, 0.7)),
            "b": jnp.asarray(randn((4 * H,), seed + 2, 0.5))}


@functools.lru_cache(maxsize=None)
def loop_layers(reverse=False, unroll=1):
    """``(fused, generic)``: RNN over the LSTM cell with its own loop, and over the same cell
    with the loop removed (the generic scan over ``recur``)."""
    cell = LSTMCell(H)
    return tuple(RNN(c, reverse=reverse, unroll=unroll, return_carry=True)
                 for c in (cell, cell._replace(loop=None)))


def objective(layer, x, lengths):
    """A scalar that depends on every output and on the final ``(h, c)``."""
    def f(params, x):
        y, carry = layer.apply(params, {}, x if lengths is None else Seq(x, lengths=lengths))[0]
        y = y if lengths is None else y.x
        weights = jnp.cos(jnp.arange(y.size, dtype=y.dtype)).reshape(y.shape)
        return jnp.sum(weights * y) + jnp.sum(jnp.sin(carry.h)) + 2 * jnp.sum(jnp.cos(carry.c))
    return f


CASES = [  # (reverse, unroll, with lengths, leading shape of x)
    (False, 1, False, (LB,)),
    (True, 1, True, (LB,)),
    (True, 1, True, (1, LB)),  # two batch axes
    (False, 2, True, ()),  # no batch axis, two steps per iteration
]


@pytest.mark.parametrize("reverse, unroll, with_lengths, lead", CASES)
def test_loop_values_and_gradients_equal_the_generic_scan(reverse, unroll, with_lengths, lead):
    params = lstm_params()
    x = jnp.asarray(rand((LB, LT, LF), 3))
    x = x.reshape(lead + (LT, LF)) if lead else x[0]
    lengths = None
    if with_lengths:
        lengths = (jnp.asarray(LOOP_LENGTHS).reshape(lead) if lead
                   else jnp.asarray(LOOP_LENGTHS[1]))

    @functools.partial(jax.jit, static_argnums=0)
    def outputs_value_and_grads(layer_index):
        layer = loop_layers(reverse, unroll)[layer_index]
        outputs = layer.apply(params, {}, x if lengths is None else Seq(x, lengths=lengths))[0]
        return outputs, jax.value_and_grad(objective(layer, x, lengths), argnums=(0, 1))(
            params, x)

    fused, generic = outputs_value_and_grads(0), outputs_value_and_grads(1)
    close(fused, generic, **LOOP_TOL)
    assert all(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(fused[1][1]))


def test_forward_mode_and_second_derivatives_equal_the_generic_scan():
    fused, generic = loop_layers(reverse=True)
    params, x = lstm_params(1), jnp.asarray(rand((LB, LT, LF), 4))
    lengths = jnp.asarray(LOOP_LENGTHS)
    tangent = jax.tree.map(lambda p: jnp.asarray(randn(p.shape, 5, 0.1)), params)

    @functools.partial(jax.jit, static_argnums=0)
    def derivatives(layer_index):
        f = objective((fused, generic)[layer_index], x, lengths)
        forward_mode = jax.jvp(lambda p: f(p, x), (params,), (tangent,))
        hessian_vector = jax.jvp(jax.grad(lambda p: f(p, x)), (params,), (tangent,))
        return forward_mode, hessian_vector

    close(derivatives(0), derivatives(1), **LOOP_TOL)


def test_per_example_gradients_under_vmap_equal_the_batched_ones():
    fused, _ = loop_layers()
    params, x = lstm_params(2), jnp.asarray(rand((LB, LT, LF), 6))
    loss = lambda p, x: objective(fused, x[None], None)(p, x[None])  # noqa: E731
    per_example = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0)))(params, x)
    summed = jax.jit(jax.grad(lambda p: sum(loss(p, x[b]) for b in range(LB))))(params)
    close(jax.tree.map(lambda g: g.sum(0), per_example), summed, rtol=2e-5, atol=2e-5)


def test_bfloat16_loop_runs_in_bfloat16_and_matches_float32():
    fused, _ = loop_layers()
    params, x = lstm_params(3), jnp.asarray(rand((LB, LT, LF), 7))

    @jax.jit
    def run_both(x):
        return fused.apply(params, {}, x)[0], jax.grad(objective(fused, x, None), argnums=1)(
            params, x)

    ((y16, carry16), grads16), ((y32, _), grads32) = run_both(x.astype(jnp.bfloat16)), run_both(x)
    assert y16.dtype == carry16.h.dtype == carry16.c.dtype == grads16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y16, np.float32), y32, atol=0.05)
    np.testing.assert_allclose(np.asarray(grads16, np.float32), grads32, atol=0.1, rtol=0.05)


def test_every_loop_of_the_gradient_has_one_matrix_product_per_step():
    """Forward: h @ w_h only; backward: dz @ w_h^T only. The input projection, its gradients and
    the gradient of w_h are products over all steps at once, outside the loops (the generic
    scan's backward loop also computes h^T @ dz every step)."""
    params, x = lstm_params(), jnp.asarray(rand((LB, LT, LF), 8))
    for lengths in (None, jnp.asarray(LOOP_LENGTHS)):
        grad = jax.grad(objective(loop_layers()[0], x, lengths), argnums=(0, 1))
        jaxpr = jax.make_jaxpr(grad)(params, x).jaxpr
        scans = [eqn for eqn in walk(jaxpr) if eqn.primitive.name == "scan"]
        assert len(scans) == 2
        assert [count_dots(scan.params["jaxpr"].jaxpr) for scan in scans] == [1, 1]
        # x @ w_i, h_prev @ dw_h (transposed: h_prev^T @ dz), dz @ w_i^T, x^T @ dz, the 2 loops
        assert count_dots(jaxpr) == 6
    generic = jax.make_jaxpr(jax.grad(objective(loop_layers()[1], x, None)))(params, x).jaxpr
    scans = [eqn for eqn in walk(generic) if eqn.primitive.name == "scan"]
    assert sorted(count_dots(scan.params["jaxpr"].jaxpr) for scan in scans) == [1, 2]


def test_the_gradient_needs_less_temporary_memory_than_the_generic_scan():
    """Compiled temporary buffers of a jitted gradient, at a size where the stacked per-step
    arrays dominate: the generic scan keeps 13 arrays [time, batch, hidden] for the backward
    pass; the loop keeps the gate derivatives in the input projection's buffer."""
    x, params = jnp.zeros((16, 32, 8)), jax.tree.map(
        lambda s: jnp.zeros(s.shape), jax.eval_shape(LSTMCell(64).init, jax.random.key(0),
                                                     jnp.zeros((8,))))
    temp = {}
    for name, cell in (("loop", LSTMCell(64)), ("generic", LSTMCell(64)._replace(loop=None))):
        loss = lambda p, x: jnp.sum(RNN(cell).apply(p, {}, x)[0] ** 2)  # noqa: E731, B023
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile()
        temp[name] = compiled.memory_analysis().temp_size_in_bytes
    assert temp["loop"] < 0.6 * temp["generic"], temp


def test_only_the_lstm_brings_its_own_loop():
    assert LSTMCell(2).loop is not None
    assert GRUCell(2).loop is None and SimpleRNNCell(2).loop is None


def test_rnn_calls_a_cells_loop_with_time_major_input_and_the_mask():
    """A cell whose loop is a running sum (``h_t = h_{t-1} + x_t``, masked steps keep ``h`` and
    output 0) gives the same as the generic scan over its ``recur``."""
    def recur(params, carry, u):
        h = carry.h + u
        return RNNCarry(h), h

    def loop(params, x, mask, reverse, unroll):
        assert x.shape[0] == LT and (mask is None or mask.shape == (LT, LB))  # time-major
        x = x if mask is None else jnp.where(mask[..., None], x, 0)
        ys = jax.lax.cumsum(x, axis=0, reverse=reverse)
        last = ys[0] if reverse else ys[-1]
        return (ys if mask is None else jnp.where(mask[..., None], ys, 0)), RNNCarry(last)

    cell = Cell(init=lambda key, x: {}, project=lambda params, x: x, recur=recur,
                initial_carry=lambda shape, dtype=jnp.float32: RNNCarry(
                    jnp.zeros((*shape, LF), dtype)),
                in_features=lambda params: LF, name="Sum", features=LF, loop=loop)
    x, lengths = jnp.asarray(rand((LB, LT, LF), 9)), jnp.asarray(LOOP_LENGTHS)
    for reverse in (False, True):
        for xs in (x, Seq(x, lengths=lengths)):
            got = RNN(cell, reverse=reverse, return_carry=True).apply({}, {}, xs)[0]
            ref = RNN(cell._replace(loop=None), reverse=reverse, return_carry=True).apply(
                {}, {}, xs)[0]
            close(got, ref, **LOOP_TOL)


def test_recurrent_layers_check_their_params_against_their_cells():
    x = jnp.zeros((2, 5, 3))
    other, _ = fnn.LSTM(6).init(jax.random.key(0), x)
    with pytest.raises(fnn.ParamError, match=r"^LSTM: expected params \{b: \[16\], w_h: "
                                             r"\[4, 16\], w_i: \[3, 16\]\}, got .*: b is "
                                             r"float32\[24\], expected \[16\]$"):
        fnn.LSTM(4).apply(other, {}, x)  # another width's params: not a silent [2, 5, 6]
    params, _ = fnn.GRU(4).init(jax.random.key(0), x)
    del params["w_h"]
    with pytest.raises(fnn.ParamError, match=r"^GRU: .*: missing w_h$"):
        fnn.GRU(4).apply(params, {}, x)
    wide, _ = fnn.Bidirectional(fnn.LSTMCell(5)).init(jax.random.key(0), x)
    with pytest.raises(fnn.ParamError, match=r"^LSTM at forward: expected params"):
        fnn.Bidirectional(fnn.LSTMCell(3)).apply(wide, {}, x)
    # the right params and an input of another size: the input is blamed
    params, _ = fnn.LSTM(4).init(jax.random.key(0), x)
    with pytest.raises(fnn.ShapeError, match=r"^LSTM: expected input \[\.\.\., time, 3\], got "
                                             r"float32\[2, 5, 7\]$"):
        fnn.LSTM(4).apply(params, {}, jnp.zeros((2, 5, 7)))
