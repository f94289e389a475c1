"""The LSTM's own loop (``Cell.loop``, a ``jax.custom_jvp``) against the generic scan over the
same cell's ``recur``: values, gradients, forward-mode and second derivatives, with lengths,
reverse, unroll and any number of batch axes; the shape of its backward pass (one matrix
product per step, weight gradients outside the loops, less memory); and the ``loop`` contract
for custom cells."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fnn.layers.recurrent import GRU, LSTM, RNN, Cell, RNNCarry, SimpleRNN
from refutil import count_dots, walk

B, T, F, H = 3, 5, 4, 3  # batch, time, input features, hidden size
LENGTHS = np.array([5, 2, 0], np.int32)  # full, partial, empty
TOL = dict(rtol=2e-5, atol=2e-6)


def rand(shape, seed, scale=1.0):
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def lstm_params(seed=0):
    """Random LSTM params, larger than the default init so that every gate saturates a bit."""
    return {"w_i": rand((F, 4 * H), seed, 0.7), "w_h": rand((H, 4 * H), seed + 1, 0.7),
            "b": rand((4 * H,), seed + 2, 0.5)}


@functools.lru_cache(maxsize=None)
def layers(reverse=False, unroll=1):
    """``(fused, generic)``: RNN over the LSTM with its own loop, and over the same cell with
    the loop removed (the generic scan over ``recur``)."""
    cell = LSTM(H)
    return tuple(RNN(c, reverse=reverse, unroll=unroll, return_carry=True)
                 for c in (cell, cell._replace(loop=None)))


def objective(layer, x, lengths):
    """A scalar that depends on every output and on the final ``(h, c)``."""
    def f(params, x):
        y, carry = layer.apply(params, {}, x if lengths is None else (x, lengths))[0]
        y = y if lengths is None else y[0]
        weights = jnp.cos(jnp.arange(y.size, dtype=y.dtype)).reshape(y.shape)
        return jnp.sum(weights * y) + jnp.sum(jnp.sin(carry.h)) + 2 * jnp.sum(jnp.cos(carry.c))
    return f


def close(a, b, **tol):
    jax.tree.map(lambda u, v: np.testing.assert_allclose(np.asarray(u), np.asarray(v),
                                                         **(tol or TOL)), a, b)




# ============================================================================= values, derivatives

CASES = [  # (reverse, unroll, with lengths, leading shape of x)
    (False, 1, False, (B,)),
    (True, 1, True, (B,)),
    (True, 1, True, (1, B)),  # two batch axes
    (False, 2, True, ()),  # no batch axis, two steps per iteration
]


@pytest.mark.parametrize("reverse, unroll, with_lengths, lead", CASES)
def test_loop_values_and_gradients_equal_the_generic_scan(reverse, unroll, with_lengths, lead):
    params = lstm_params()
    x = rand((B, T, F), 3).reshape(lead + (T, F)) if lead else rand((T, F), 3)
    lengths = None
    if with_lengths:
        lengths = jnp.asarray(LENGTHS).reshape(lead) if lead else jnp.asarray(LENGTHS[1])

    @functools.partial(jax.jit, static_argnums=0)
    def outputs_value_and_grads(layer_index):
        layer = layers(reverse, unroll)[layer_index]
        outputs = layer.apply(params, {}, x if lengths is None else (x, lengths))[0]
        return outputs, jax.value_and_grad(objective(layer, x, lengths), argnums=(0, 1))(
            params, x)

    fused, generic = outputs_value_and_grads(0), outputs_value_and_grads(1)
    close(fused, generic)
    assert all(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(fused[1][1]))


def test_forward_mode_and_second_derivatives_equal_the_generic_scan():
    fused, generic = layers(reverse=True)
    params, x, lengths = lstm_params(1), rand((B, T, F), 4), jnp.asarray(LENGTHS)
    tangent = jax.tree.map(lambda p: rand(p.shape, 5, 0.1), params)

    @functools.partial(jax.jit, static_argnums=0)
    def derivatives(layer_index):
        f = objective((fused, generic)[layer_index], x, lengths)
        forward_mode = jax.jvp(lambda p: f(p, x), (params,), (tangent,))
        hessian_vector = jax.jvp(jax.grad(lambda p: f(p, x)), (params,), (tangent,))
        return forward_mode, hessian_vector

    close(derivatives(0), derivatives(1))


def test_per_example_gradients_under_vmap_equal_the_batched_ones():
    fused, _ = layers()
    params, x = lstm_params(2), rand((B, T, F), 6)
    loss = lambda p, x: objective(fused, x[None], None)(p, x[None])  # noqa: E731
    per_example = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0)))(params, x)
    summed = jax.jit(jax.grad(lambda p: sum(loss(p, x[b]) for b in range(B))))(params)
    close(jax.tree.map(lambda g: g.sum(0), per_example), summed, rtol=2e-5, atol=2e-5)


def test_bfloat16_loop_runs_in_bfloat16_and_matches_float32():
    fused, _ = layers()
    params, x = lstm_params(3), rand((B, T, F), 7)

    @jax.jit
    def run(x):
        return fused.apply(params, {}, x)[0], jax.grad(objective(fused, x, None), argnums=1)(
            params, x)

    ((y16, carry16), grads16), ((y32, _), grads32) = run(x.astype(jnp.bfloat16)), run(x)
    assert y16.dtype == carry16.h.dtype == carry16.c.dtype == grads16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y16, np.float32), y32, atol=0.05)
    np.testing.assert_allclose(np.asarray(grads16, np.float32), grads32, atol=0.1, rtol=0.05)


# ============================================================================= the backward pass

def test_every_loop_of_the_gradient_has_one_matrix_product_per_step():
    """Forward: h @ w_h only; backward: dz @ w_h^T only. The input projection, its gradients and
    the gradient of w_h are products over all steps at once, outside the loops (the generic
    scan's backward loop also computes h^T @ dz every step)."""
    params, x = lstm_params(), rand((B, T, F), 8)
    for lengths in (None, jnp.asarray(LENGTHS)):
        grad = jax.grad(objective(layers()[0], x, lengths), argnums=(0, 1))
        jaxpr = jax.make_jaxpr(grad)(params, x).jaxpr
        scans = [eqn for eqn in walk(jaxpr) if eqn.primitive.name == "scan"]
        assert len(scans) == 2
        assert [count_dots(scan.params["jaxpr"].jaxpr) for scan in scans] == [1, 1]
        # x @ w_i, h_prev @ dw_h (transposed: h_prev^T @ dz), dz @ w_i^T, x^T @ dz, the 2 loops
        assert count_dots(jaxpr) == 6
    generic = jax.make_jaxpr(jax.grad(objective(layers()[1], x, None)))(params, x).jaxpr
    scans = [eqn for eqn in walk(generic) if eqn.primitive.name == "scan"]
    assert sorted(count_dots(scan.params["jaxpr"].jaxpr) for scan in scans) == [1, 2]


def test_the_gradient_needs_less_temporary_memory_than_the_generic_scan():
    """Compiled temporary buffers of a jitted gradient, at a size where the stacked per-step
    arrays dominate: the generic scan keeps 13 arrays [time, batch, hidden] for the backward
    pass; the loop keeps the gate derivatives in the input projection's buffer."""
    x, params = jnp.zeros((16, 32, 8)), jax.tree.map(
        lambda s: jnp.zeros(s.shape), jax.eval_shape(LSTM(64).init, jax.random.key(0),
                                                     jnp.zeros((8,))))
    temp = {}
    for name, cell in (("loop", LSTM(64)), ("generic", LSTM(64)._replace(loop=None))):
        loss = lambda p, x: jnp.sum(RNN(cell).apply(p, {}, x)[0] ** 2)  # noqa: E731, B023
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile()
        temp[name] = compiled.memory_analysis().temp_size_in_bytes
    assert temp["loop"] < 0.6 * temp["generic"], temp


# ============================================================================= the contract

def test_only_the_lstm_brings_its_own_loop():
    assert LSTM(2).loop is not None
    assert GRU(2).loop is None and SimpleRNN(2).loop is None


def test_rnn_calls_a_cells_loop_with_time_major_input_and_the_mask():
    """A cell whose loop is a running sum (``h_t = h_{t-1} + x_t``, masked steps keep ``h`` and
    output 0) gives the same as the generic scan over its ``recur``."""
    def recur(params, carry, u):
        h = carry.h + u
        return RNNCarry(h), h

    def loop(params, x, mask, reverse, unroll):
        assert x.shape[0] == T and (mask is None or mask.shape == (T, B))  # time-major
        x = x if mask is None else jnp.where(mask[..., None], x, 0)
        ys = jax.lax.cumsum(x, axis=0, reverse=reverse)
        last = ys[0] if reverse else ys[-1]
        return (ys if mask is None else jnp.where(mask[..., None], ys, 0)), RNNCarry(last)

    cell = Cell(init=lambda key, x: {}, project=lambda params, x: x, recur=recur,
                initial_carry=lambda shape, dtype=jnp.float32: RNNCarry(
                    jnp.zeros((*shape, F), dtype)),
                in_features=lambda params: F, name="Sum", hidden_size=F, loop=loop)
    x, lengths = rand((B, T, F), 9), jnp.asarray(LENGTHS)
    for reverse in (False, True):
        for xs in (x, (x, lengths)):
            out = RNN(cell, reverse=reverse, return_carry=True).apply({}, {}, xs)[0]
            ref = RNN(cell._replace(loop=None), reverse=reverse, return_carry=True).apply(
                {}, {}, xs)[0]
            close(out, ref)
