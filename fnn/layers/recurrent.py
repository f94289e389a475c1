"""Recurrent layers: the cells ``SimpleRNNCell``, ``LSTMCell`` and ``GRUCell``, the time loop
``RNN`` and ``Bidirectional``, and the layers ``SimpleRNN``, ``LSTM`` and ``GRU`` (a cell in
``RNN``).

A *cell* describes one time step; :func:`RNN` turns any cell into a layer that runs it over a
sequence with one ``lax.scan``: ``LSTM(64)`` is ``RNN(LSTMCell(64))``. Layouts are
batch-major: ``x: [..., time, features]`` with any number of leading batch axes (none included,
so ``jax.vmap`` over single examples works). Variable-length batches come as a
:class:`~fnn.core.Seq` with ``lengths``, so a stack is ``serial(LSTM(64), Dropout(0.2),
LSTM(64))`` with or without them.

The cell contract
-----------------

A cell is a :class:`Cell` NamedTuple built by a factory (``LSTMCell(64)``)::

    params = cell.init(key, x)                      # x: array or ShapeDtypeStruct [..., in]
    projected = cell.project(params, x)             # [..., in] -> [..., gates]
    carry, h = cell.recur(params, carry, projected_t)   # one step: [..., gates] -> [..., features]
    carry, h = cell.step(params, carry, x_t)        # = recur(params, carry, project(params, x_t))
    carry = cell.initial_carry(batch_shape, dtype)  # zeros
    cell.in_features(params)                        # the input size the params expect
    ys, carry = cell.loop(params, x, mask, reverse, unroll)  # optional, or None: see below

The split between ``project`` and ``recur`` is what makes the layers fast: :func:`RNN` computes
the input projections of *all* time steps as one matrix product before the scan
(``[time, ..., in] @ w_i -> [time, ..., gates]``), and only the recurrent product
``h @ w_h`` is left inside the loop. ``project`` also adds the biases that do not depend on
``h``. A custom cell only has to provide these five functions to work with :func:`RNN` and
:func:`Bidirectional`.

A cell may also bring its own ``loop`` over a whole sequence, which :func:`RNN` then uses in
place of the generic scan; the LSTM does (see "The LSTM's loop" below).

The carry is a small NamedTuple: :class:`LSTMCarry` ``(h, c)`` for the LSTM and
:class:`RNNCarry` ``(h,)`` for the simple RNN and the GRU, every field ``[..., features]``. The
output of a step is the new ``h``.

Weight layout and equations (``x @ w`` convention, gates side by side along the last axis)
---------------------------------------------------------------------------------------------

``SimpleRNNCell``: params ``{"w_i": [in, H], "w_h": [H, H], "b": [H]}`` (``H`` the cell's
``features``)::

    h' = tanh(x @ w_i + h @ w_h + b)                  (the activation can be changed)

``LSTMCell``: params ``{"w_i": [in, 4H], "w_h": [H, 4H], "b": [4H]}``, gates ordered
**i, f, g, o** (input, forget, cell candidate, output; PyTorch's order)::

    i, f, g, o = split(x @ w_i + h @ w_h + b, 4)
    c' = sigmoid(f) * c + sigmoid(i) * tanh(g)
    h' = sigmoid(o) * tanh(c')

The forget-gate slice of ``b`` starts at ``forget_bias=1.0`` (the rest at zero), so that the
cell remembers by default. From PyTorch's ``nn.LSTM``: ``w_i = weight_ih.T``,
``w_h = weight_hh.T``, ``b = bias_ih + bias_hh``.

``GRUCell``: params ``{"w_i": [in, 3H], "w_h": [H, 3H], "b": [3H], "b_hn": [H]}``, gates ordered
**r, z, n** (reset, update, candidate), PyTorch's formulation (the reset gate multiplies the
recurrent term *after* its product)::

    x_r, x_z, x_n = split(x @ w_i + b, 3)
    h_r, h_z, h_n = split(h @ w_h, 3)
    r = sigmoid(x_r + h_r);  z = sigmoid(x_z + h_z)
    n = tanh(x_n + r * (h_n + b_hn))
    h' = (1 - z) * n + z * h

From PyTorch's ``nn.GRU``: ``w_i = weight_ih.T``, ``w_h = weight_hh.T``,
``b = bias_ih + concat(bias_hh[:2H], zeros(H))``, ``b_hn = bias_hh[2H:]``.

Initialisation: input weights ``w_i`` LeCun normal (variance ``1 / in``); recurrent weights
``w_h`` orthogonal, one ``[H, H]`` block per gate; biases zero (plus the LSTM forget bias).
Every factory takes ``w_i_init``, ``w_h_init`` (called once per gate with shape ``(H, H)``) and
``b_init`` as any ``jax.nn.initializers`` function.

Dtypes: ``param_dtype`` is the storage dtype, ``dtype`` the compute dtype (default: the input's,
``param_dtype`` for integer inputs). Parameters are cast to the compute dtype and the carry is
kept in it, so bfloat16 inputs run in bfloat16.

The LSTM's loop
---------------

Differentiating the generic scan stores every intermediate of the cell for every step (13
arrays ``[time, batch, hidden]``), multiplies ``h_t^T @ dz_t`` and accumulates the ``[H, 4H]``
gradient of ``w_h`` inside the backward loop, and multiplies by ``w_h`` transposed inside the
loop (a slower layout). The LSTM's ``loop`` is a ``jax.custom_jvp`` whose rule is written so
that its transpose, the backward pass, is lean:

- the forward loop overwrites the input projection ``p_t`` in place with the four gate
  derivatives ``d(c_t, h_t) / dz_t`` and stacks only ``f_t`` and ``o_t * tanh'(c_t)``, plus
  ``h_t``, which the output needs anyway;
- the tangent is linear in ``u_t = dp_t + db + h_{t-1} @ dw_h``, one matrix product for all
  steps outside the loop, so the gradients of ``w_h`` and ``b`` are single products and sums
  after the backward loop, whose body is one elementwise fusion and ``dz_t @ w_h^T``;
- ``b`` is added inside the loop instead of in a separate pass over ``[time, ..., 4H]``.

On the train step of an LSTM language model (``benchmarks/sequence_step.py``) this halves the
compiled step's temporary memory and makes it faster than the same network written by hand,
with the input projection before or inside the scan. The memory matters on XLA:CPU: glibc's
malloc hands out blocks above 32 MiB as fresh ``mmap``'ed pages, so a step whose temporary
buffers exceed that pays a page fault per 4 KiB touched on every call. Forward-mode
differentiation, ``vmap`` and higher derivatives work as for any JAX function.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.nn import initializers

from fnn.combinators import combiner
from fnn.core import (Children, Initializer, Layer, Params, Seq, align, array_of, check_positive,
                      check_rank, compute_dtype, expect_params, seq_lengths, shape_error)

Carry = Any  # a NamedTuple of arrays [..., features]


class RNNCarry(NamedTuple):
    """The carry of :func:`SimpleRNNCell` and :func:`GRUCell`: the hidden state
    ``h: [..., features]``."""

    h: jax.Array


class LSTMCarry(NamedTuple):
    """The carry of :func:`LSTMCell`: hidden state ``h`` and cell state ``c``, both
    ``[..., features]``."""

    h: jax.Array
    c: jax.Array


class Cell(NamedTuple):
    """One recurrent step, split into an input projection and a recurrence (see the module
    docstring for the contract). Run it over a sequence with :func:`RNN`."""

    init: Callable[[jax.Array, Any], Params]
    """``params = init(key, x)``; ``x`` an array or ``jax.ShapeDtypeStruct`` ``[..., in]``."""
    project: Callable[[Params, jax.Array], jax.Array]
    """``[..., in] -> [..., gates]``: the part of a step that does not depend on the carry."""
    recur: Callable[[Params, Carry, jax.Array], tuple[Carry, jax.Array]]
    """``carry, h = recur(params, carry, projected_t)`` with ``projected_t: [..., gates]``."""
    initial_carry: Callable[..., Carry]
    """``initial_carry(batch_shape, dtype=float32)``: the zero carry."""
    in_features: Callable[[Params], int]
    """The size of the input's last axis that ``params`` expect."""
    name: str = "Cell"
    features: int = 0
    loop: Callable[..., tuple[jax.Array, Carry]] | None = None
    """Optional: ``ys, carry = loop(params, x, mask, reverse, unroll)`` runs the whole
    sequence ``x: [time, ..., in]`` (time-major) from the zero carry and returns every step's
    output ``ys: [time, ..., features]`` and the final carry, with ``mask: bool[time, ...]`` or
    ``None`` meaning as in :func:`RNN`'s lengths. :func:`RNN` uses it in place of its scan
    over ``recur``; it must compute the same values."""

    def step(self, params: Params, carry: Carry, x_t: jax.Array) -> tuple[Carry, jax.Array]:
        """One time step on ``x_t: [..., in]``: ``recur(params, carry, project(params, x_t))``."""
        return self.recur(params, carry, self.project(params, x_t))


# ============================================================================= cells

def _init_weights(name: str, key: jax.Array, x: Any, features: int, gates: int,
                  w_i_init: Initializer, w_h_init: Initializer, b_init: Initializer,
                  param_dtype: Any) -> Params:
    check_rank(name, x, 1, "[..., in_features]")
    i_key, h_key, b_key = jax.random.split(key, 3)
    # orthogonal init runs a QR decomposition, which needs at least float32
    h_dtype = param_dtype if jnp.dtype(param_dtype).itemsize >= 4 else jnp.float32
    w_h = jnp.concatenate([w_h_init(k, (features, features), h_dtype)
                           for k in jax.random.split(h_key, gates)], axis=1).astype(param_dtype)
    return {"w_i": w_i_init(i_key, (x.shape[-1], gates * features), param_dtype),
            "w_h": w_h,
            "b": b_init(b_key, (gates * features,), param_dtype)}


def _projector(name: str, dtype: Any, param_dtype: Any) -> Callable[[Params, jax.Array], jax.Array]:
    """``x @ w_i + b`` in the compute dtype, for inputs ``[..., in]``."""

    def project(params, x):
        w = params["w_i"]
        if jnp.ndim(x) < 1 or x.shape[-1] != w.shape[0]:
            raise shape_error(name, f"[..., {w.shape[0]}]", x)
        dt = compute_dtype(dtype, x, param_dtype)
        y = jnp.matmul(x.astype(dt), w.astype(dt))
        return y + align(params["b"].astype(dt), y.ndim)

    return project


def _zeros(fields: int, features: int, carry_type: type) -> Callable[..., Carry]:
    def initial_carry(batch_shape=(), dtype=jnp.float32):
        shape = tuple(batch_shape) + (features,)
        return carry_type(*(jnp.zeros(shape, dtype) for _ in range(fields)))
    return initial_carry


def _in_features(params: Params) -> int:
    return params["w_i"].shape[0]


def SimpleRNNCell(features: int, *,
                  activation: Callable[[jax.Array], jax.Array] = jnp.tanh,
                  w_i_init: Initializer = initializers.lecun_normal(),
                  w_h_init: Initializer = initializers.orthogonal(),
                  b_init: Initializer = initializers.zeros,
                  param_dtype: Any = jnp.float32, dtype: Any = None) -> Cell:
    """The Elman cell ``h' = activation(x @ w_i + h @ w_h + b)``, a :class:`Cell` for
    :func:`RNN`.

    Shapes: ``x_t: [..., in_features] -> h: [..., features]``; carry ``RNNCarry(h)``; params
    ``{"w_i": [in_features, features], "w_h": [features, features], "b": [features]}``.

    >>> import jax, jax.numpy as jnp
    >>> params = SimpleRNNCell(4).init(jax.random.key(0), jnp.zeros((2, 3)))
    >>> jax.tree.map(jnp.shape, params)
    {'b': (4,), 'w_h': (4, 4), 'w_i': (3, 4)}
    """
    name = "SimpleRNNCell"
    check_positive(name, features=features)

    def init(key, x):
        return _init_weights(name, key, x, features, 1, w_i_init, w_h_init, b_init,
                             param_dtype)

    def recur(params, carry, p):
        dt = p.dtype
        h = activation(p + jnp.matmul(carry.h.astype(dt), params["w_h"].astype(dt)))
        return RNNCarry(h), h

    return Cell(init, _projector(name, dtype, param_dtype), recur,
                _zeros(1, features, RNNCarry), _in_features, name, features)


def LSTMCell(features: int, *, forget_bias: float = 1.0,
             w_i_init: Initializer = initializers.lecun_normal(),
             w_h_init: Initializer = initializers.orthogonal(),
             b_init: Initializer = initializers.zeros,
             param_dtype: Any = jnp.float32, dtype: Any = None) -> Cell:
    """The long short-term memory cell, a :class:`Cell` for :func:`RNN`.

    Shapes: ``x_t: [..., in_features] -> h: [..., features]``; carry ``LSTMCarry(h, c)``;
    params ``{"w_i": [in_features, 4 * features], "w_h": [features, 4 * features],
    "b": [4 * features]}``, gates ordered i, f, g, o (see the module docstring for the
    equations). The forget-gate slice of ``b`` starts at ``forget_bias`` (added to ``b_init``'s
    values).

    >>> import jax, jax.numpy as jnp
    >>> params = LSTMCell(4).init(jax.random.key(0), jnp.zeros((2, 3)))
    >>> jax.tree.map(jnp.shape, params)
    {'b': (16,), 'w_h': (4, 16), 'w_i': (3, 16)}
    >>> params["b"].reshape(4, 4)[:, 0]  # gates i, f, g, o
    Array([0., 1., 0., 0.], dtype=float32)
    """
    name = "LSTMCell"
    check_positive(name, features=features)
    n = features

    def init(key, x):
        params = _init_weights(name, key, x, n, 4, w_i_init, w_h_init, b_init, param_dtype)
        params["b"] = params["b"].at[n:2 * n].add(forget_bias)
        return params

    def recur(params, carry, p):
        dt = p.dtype
        _, c, _, h = _lstm_step(params["w_h"].astype(dt), None, carry.h.astype(dt),
                                carry.c.astype(dt), p)  # p includes the bias
        return LSTMCarry(h, c), h

    def loop(params, x, mask, reverse, unroll):
        dt = compute_dtype(dtype, x, param_dtype)
        w_i, w_h, b = (params[k].astype(dt) for k in ("w_i", "w_h", "b"))
        # all steps in one product, on x as a matrix [time * batch, in]: then the gradient of
        # w_i is x^T @ dp without a transposed copy of dp
        p = jnp.matmul(x.astype(dt).reshape(-1, x.shape[-1]), w_i)
        p = p.reshape(x.shape[:-1] + p.shape[-1:])  # [time, ..., 4H]
        ys, h, c = _lstm_loop(reverse, unroll, p, w_h, b, mask)
        return ys, LSTMCarry(h, c)

    return Cell(init, _projector(name, dtype, param_dtype), recur,
                _zeros(2, n, LSTMCarry), _in_features, name, n, loop)


# ----------------------------------------------------------------------------- the LSTM's loop
# Time-major throughout: p [time, ..., 4H] is x @ w_i without the bias, h and c [..., H],
# mask bool[time, ...] or None. See "The LSTM's loop" in the module docstring.

def _lstm_step(w_h: jax.Array, b: jax.Array | None, h: jax.Array, c: jax.Array,
               p_t: jax.Array):
    """One step on the input projection ``p_t`` (plus ``b`` unless ``None``): the activated
    gates ``(i, f, g, o)``, the new ``c``, ``tanh(c)`` and ``h``."""
    z = p_t + jnp.matmul(h, w_h) if b is None else p_t + align(b, p_t.ndim) + jnp.matmul(h, w_h)
    i, f, g, o = jnp.split(z, 4, axis=-1)
    i, f, g, o = jax.nn.sigmoid(i), jax.nn.sigmoid(f), jnp.tanh(g), jax.nn.sigmoid(o)
    c = f * c + i * g
    tanh_c = jnp.tanh(c)
    return (i, f, g, o), c, tanh_c, o * tanh_c


def _keep(m_t: jax.Array | None, new: jax.Array, old: Any) -> jax.Array:
    """``new`` where the step is valid (``m_t`` true or absent), else ``old``."""
    return new if m_t is None else jnp.where(_expand(m_t, new.ndim), new, old)


def _previous(stack: jax.Array, first: jax.Array, reverse: bool) -> jax.Array:
    """The carry before each step, from ``stack`` (the carry after each step) and ``first``
    (the carry before the first step the loop runs)."""
    if reverse:
        return jnp.concatenate([stack, first[None]], axis=0)[1:]
    return jnp.concatenate([first[None], stack], axis=0)[:-1]


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _lstm_loop(reverse: bool, unroll: int | bool, p: jax.Array, w_h: jax.Array, b: jax.Array,
               mask: jax.Array | None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Runs the LSTM from the zero carry: ``(ys [time, ..., H], h, c)``."""
    zeros = jnp.zeros(p.shape[1:-1] + w_h.shape[:1], p.dtype)

    def step(carry, inputs):
        (h, c), (p_t, m_t) = carry, inputs
        _, c_new, _, h_new = _lstm_step(w_h, b, h, c, p_t)
        return (_keep(m_t, h_new, h), _keep(m_t, c_new, c)), _keep(m_t, h_new, 0)

    (h, c), ys = lax.scan(step, (zeros, zeros), (p, mask), reverse=reverse, unroll=unroll)
    return ys, h, c


def _lstm_forward(reverse: bool, unroll: int | bool, p: jax.Array, w_h: jax.Array,
                  b: jax.Array, mask: jax.Array | None):
    """The loop of :func:`_lstm_loop`, keeping what its tangent needs: ``h`` after every step,
    the final ``(h, c)`` and the coefficients ``(kz, f, kc)`` of::

        dc_t = f_t * dc_{t-1} + sum_{i, f, g}(kz_t * dz_t)
        dh_t = sum_o(kz_t * dz_t) + kc_t * dc_t

    ``kz [time, ..., 4H]`` is written over ``p`` step by step (``p_t`` is dead once read), so
    no second buffer of that size is needed."""
    zeros = jnp.zeros(p.shape[1:-1] + w_h.shape[:1], p.dtype)

    def step(carry, inputs):
        (h, c, buffer), (t, m_t) = carry, inputs
        (i, f, g, o), c_new, tanh_c, h_new = _lstm_step(
            w_h, b, h, c, lax.dynamic_index_in_dim(buffer, t, keepdims=False))
        kz = jnp.concatenate([g * i * (1 - i), c * f * (1 - f), i * (1 - g * g),
                              tanh_c * o * (1 - o)], axis=-1)
        buffer = lax.dynamic_update_index_in_dim(buffer, kz, t, 0)
        h_new, c_new = _keep(m_t, h_new, h), _keep(m_t, c_new, c)
        return (h_new, c_new, buffer), (h_new, f, o * (1 - tanh_c * tanh_c))

    steps = jnp.arange(p.shape[0], dtype=jnp.int32)
    (h, c, kz), (hs, f, kc) = lax.scan(step, (zeros, zeros, p), (steps, mask), reverse=reverse,
                                       unroll=unroll)
    return hs, h, c, (kz, f, kc)


@_lstm_loop.defjvp
def _lstm_loop_jvp(reverse, unroll, primals, tangents):
    p, w_h, b, mask = primals
    dp, dw_h, db, _ = tangents
    hs, h, c, coefficients = _lstm_forward(reverse, unroll, p, w_h, b, mask)
    zeros = jnp.zeros_like(h)
    # the mask at full size [time, ..., H]: broadcasting it inside the loop would be stacked
    # for the backward pass three times over (once per use)
    valid = None if mask is None else jnp.broadcast_to(_expand(mask, hs.ndim), hs.shape)
    ys = _keep(valid, hs, 0)
    # everything that does not depend on the carry, for all steps at once: its transpose makes
    # the gradients of w_h and b single products/sums after the backward loop
    h_prev = _previous(hs, zeros, reverse).reshape(-1, h.shape[-1])
    u = dp + align(db, dp.ndim) + jnp.matmul(h_prev, dw_h).reshape(dp.shape)
    # dh @ w_h written as a contraction with w_h^T [4H, H]: its transpose in the backward loop
    # is then a plain product with w_h^T, a faster layout than contracting w_h's last axis
    w_t = w_h.T
    contract = (((h.ndim - 1,), (1,)), ((), ()))

    def step(carry, inputs):
        (dh, dc), (u_t, kz, f, kc, m_t) = carry, inputs
        e = (u_t + lax.dot_general(dh, w_t, contract)) * kz
        e_i, e_f, e_g, e_o = jnp.split(e, 4, axis=-1)
        dc_new = f * dc + e_i + e_f + e_g
        dh_new = e_o + kc * dc_new
        return (_keep(m_t, dh_new, dh), _keep(m_t, dc_new, dc)), _keep(m_t, dh_new, zeros)

    (dh, dc), dys = lax.scan(step, (zeros, zeros), (u, *coefficients, valid), reverse=reverse,
                             unroll=unroll)
    return (ys, h, c), (dys, dh, dc)


def GRUCell(features: int, *,
            w_i_init: Initializer = initializers.lecun_normal(),
            w_h_init: Initializer = initializers.orthogonal(),
            b_init: Initializer = initializers.zeros,
            param_dtype: Any = jnp.float32, dtype: Any = None) -> Cell:
    """The gated recurrent unit in PyTorch's formulation, a :class:`Cell` for :func:`RNN`.

    Shapes: ``x_t: [..., in_features] -> h: [..., features]``; carry ``RNNCarry(h)``; params
    ``{"w_i": [in_features, 3 * features], "w_h": [features, 3 * features],
    "b": [3 * features], "b_hn": [features]}``, gates ordered r, z, n; ``b_hn`` is the bias of
    the recurrent candidate term, inside the reset gate (see the module docstring).

    >>> import jax, jax.numpy as jnp
    >>> params = GRUCell(4).init(jax.random.key(0), jnp.zeros((2, 3)))
    >>> jax.tree.map(jnp.shape, params)
    {'b': (12,), 'b_hn': (4,), 'w_h': (4, 12), 'w_i': (3, 12)}
    """
    name = "GRUCell"
    check_positive(name, features=features)
    n = features

    def init(key, x):
        params = _init_weights(name, key, x, n, 3, w_i_init, w_h_init, b_init, param_dtype)
        params["b_hn"] = b_init(jax.random.fold_in(key, 3), (n,), param_dtype)
        return params

    def recur(params, carry, p):
        dt = p.dtype
        h = carry.h.astype(dt)
        hh = jnp.matmul(h, params["w_h"].astype(dt))
        x_r, x_z, x_n = jnp.split(p, 3, axis=-1)
        h_r, h_z, h_n = jnp.split(hh, 3, axis=-1)
        r = jax.nn.sigmoid(x_r + h_r)
        z = jax.nn.sigmoid(x_z + h_z)
        cand = jnp.tanh(x_n + r * (h_n + align(params["b_hn"].astype(dt), h_n.ndim)))
        h = (1 - z) * cand + z * h
        return RNNCarry(h), h

    return Cell(init, _projector(name, dtype, param_dtype), recur,
                _zeros(1, n, RNNCarry), _in_features, name, n)


# ============================================================================= the time loop

def _sequence(name: str, x: Any, in_features: int | None) -> tuple[jax.Array, jax.Array | None]:
    """The array ``[..., time, in_features]`` of ``x`` (an array or a ``Seq``) and its lengths
    (``None`` without), checked."""
    h = array_of(x)
    expected = f"[..., time, {'in_features' if in_features is None else in_features}]"
    if (isinstance(h, Seq) or not hasattr(h, "shape") or len(h.shape) < 2
            or (in_features is not None and h.shape[-1] != in_features)):
        raise shape_error(name, expected, x)
    return h, seq_lengths(name, x)


def _expand(mask: jax.Array, ndim: int) -> jax.Array:
    """``mask: [*batch]`` with trailing size-1 axes up to rank ``ndim``."""
    return mask.reshape(mask.shape + (1,) * (ndim - mask.ndim))


def _check_unroll(name: str, unroll: Any) -> None:
    if not isinstance(unroll, bool):
        check_positive(name, unroll=unroll)


def _run(cell: Cell, params: Params, x: jax.Array, lengths: jax.Array | None, *, reverse: bool,
         unroll: int | bool) -> tuple[jax.Array, Carry]:
    """Runs ``cell`` over ``x: [..., time, in]``; returns outputs ``[..., time, features]`` and
    the final carry."""
    x = jnp.moveaxis(x, -2, 0)  # time-major for the loop: [time, ..., in]
    steps = x.shape[0]
    # Step t only counts where t < length: past its end a sequence keeps its carry and
    # outputs zeros. In reverse the scan runs t = time-1 .. 0, so each sequence keeps the
    # initial carry through its padding and starts at its own last valid element.
    mask = None if lengths is None else (
        _expand(jnp.arange(steps, dtype=jnp.int32), lengths.ndim + 1) < lengths[None])
    if cell.loop is not None:
        ys, carry = cell.loop(params, x, mask, reverse, unroll)
        return jnp.moveaxis(ys, 0, -2), carry

    projected = cell.project(params, x)  # all time steps in one matrix product
    dt = projected.dtype
    # cast once, outside the loop: inside, recur's casts are no-ops
    params = jax.tree.map(lambda a: a.astype(dt) if jnp.issubdtype(a.dtype, jnp.floating) else a,
                          params)

    def step(carry, inputs):
        p_t, m_t = inputs
        new, y = cell.recur(params, carry, p_t)
        new = jax.tree.map(lambda n, o: _keep(m_t, n.astype(o.dtype), o), new, carry)
        return new, _keep(m_t, y, jnp.zeros_like(y))

    carry, ys = lax.scan(step, cell.initial_carry(tuple(x.shape[1:-1]), dt), (projected, mask),
                         reverse=reverse, unroll=unroll)
    return jnp.moveaxis(ys, 0, -2), carry


def _check_cell_params(name: str, cell: Cell, params: Params, x: Any) -> None:
    """The params against what ``cell.init`` makes (shapes only): for the input size the
    params were made for, so that an input of another size is blamed on the input."""
    try:
        in_features = cell.in_features(params)
    except (KeyError, TypeError, AttributeError, IndexError):
        h = array_of(x)
        in_features = h.shape[-1] if hasattr(h, "shape") and h.shape else 1
    spec = jax.ShapeDtypeStruct((1, int(in_features)), jnp.float32)
    expected = jax.eval_shape(cell.init, jax.random.key(0), spec)
    expect_params(name, params, jax.tree.map(lambda leaf: tuple(leaf.shape), expected))


def _layer_name(cell: Cell) -> str:
    """``"LSTM"`` for an ``LSTMCell``: the name of the layer that runs the cell."""
    return cell.name.removesuffix("Cell") or "RNN"


def RNN(cell: Cell, *, reverse: bool = False, unroll: int | bool = 1,
        return_carry: bool = False) -> Layer:
    """Runs a recurrent ``cell`` (:func:`LSTMCell`, :func:`GRUCell`, :func:`SimpleRNNCell`, or
    any :class:`Cell`) over a sequence with one ``lax.scan``.

    Shapes: ``x: [..., time, in_features] -> [..., time, features]``, every output step
    (any number of leading batch axes, none included). Params are the cell's own, e.g.
    ``{"w_i", "w_h", "b"}`` for an LSTM; no state. The input projection of all steps is one
    matrix product before the scan; only ``h @ w_h`` runs in the loop.

    - ``reverse=True`` runs from the last step to the first; outputs keep the input's order.
    - ``unroll``: steps per scan iteration (``lax.scan``'s ``unroll``); same results.
    - Lengths: give a ``Seq(x, lengths=...)`` with ``lengths: int[...]`` (the batch axes). Past
      each sequence's end the carry stops updating and the outputs are zero; the final carry is
      the one at the sequence's end. In reverse, each sequence runs from its own last valid
      step back to its first (the padding stays at the end). A ``Seq`` input gives a ``Seq``
      output, so ``serial(LSTM(64), Dropout(0.2), LSTM(64))`` stacks with or without lengths.
    - ``return_carry=True`` returns ``(y, carry)``, ``y`` being what is returned otherwise and
      ``carry`` the final carry (e.g. ``LSTMCarry(h, c)``, each ``[..., features]``; for
      ``reverse`` the carry after the first step).

    >>> import jax, jax.numpy as jnp
    >>> from fnn.core import Seq
    >>> layer = RNN(LSTMCell(4))
    >>> x = jnp.zeros((2, 7, 3))
    >>> params, state = layer.init(jax.random.key(0), x)
    >>> jax.tree.map(jnp.shape, params)
    {'b': (16,), 'w_h': (4, 16), 'w_i': (3, 16)}
    >>> y, state = layer.apply(params, state, Seq(x, lengths=jnp.array([7, 3])))
    >>> y.x.shape, y.lengths.tolist()
    ((2, 7, 4), [7, 3])
    """
    if isinstance(cell, Layer) and getattr(cell.apply, "runs_cell", False):
        raise TypeError(f"RNN: cell must be a Cell (LSTMCell(64), GRUCell(64), "
                        f"SimpleRNNCell(64), ...); {cell.name} is already a layer that runs a "
                        f"cell over time: use it as it is")
    if isinstance(cell, Layer):
        raise TypeError(f"RNN: cell must be a Cell (LSTMCell(64), GRUCell(64), "
                        f"SimpleRNNCell(64), ...), got the layer {cell.name}")
    if not isinstance(cell, Cell):
        raise TypeError(f"RNN: cell must be a Cell (LSTMCell(64), GRUCell(64), "
                        f"SimpleRNNCell(64), ...), got {type(cell).__name__}")
    name = _layer_name(cell)
    _check_unroll(name, unroll)

    def init(key, x):
        h, _ = _sequence(name, x, None)
        return cell.init(key, h), {}

    def apply(params, state, x, *, key=None, train=False):
        _check_cell_params(name, cell, params, x)
        h, lengths = _sequence(name, x, cell.in_features(params))
        outputs, carry = _run(cell, params, h, lengths, reverse=reverse, unroll=unroll)
        y = x.with_x(outputs) if isinstance(x, Seq) else outputs
        return ((y, carry) if return_carry else y), state

    apply.runs_cell = True  # so that RNN(LSTM(64)) is told it is already a layer
    return Layer(init, apply, name)


def SimpleRNN(features: int, *, reverse: bool = False, unroll: int | bool = 1,
              return_carry: bool = False, **cell_options: Any) -> Layer:
    """``RNN(SimpleRNNCell(features, **cell_options), reverse=..., unroll=...,
    return_carry=...)``: an Elman RNN layer. ``x: [..., time, in_features] -> [..., time,
    features]``; params ``{"w_i", "w_h", "b"}`` (see :func:`SimpleRNNCell` and :func:`RNN`)."""
    return RNN(SimpleRNNCell(features, **cell_options), reverse=reverse, unroll=unroll,
               return_carry=return_carry)


def LSTM(features: int, *, reverse: bool = False, unroll: int | bool = 1,
         return_carry: bool = False, **cell_options: Any) -> Layer:
    """``RNN(LSTMCell(features, **cell_options), reverse=..., unroll=..., return_carry=...)``:
    an LSTM layer. ``x: [..., time, in_features] -> [..., time, features]``; params
    ``{"w_i", "w_h", "b"}`` (see :func:`LSTMCell` and :func:`RNN`).

    >>> import jax, jax.numpy as jnp
    >>> layer = LSTM(4)
    >>> params, state = layer.init(jax.random.key(0), jnp.zeros((2, 7, 3)))
    >>> layer.apply(params, state, jnp.zeros((2, 7, 3)))[0].shape
    (2, 7, 4)
    """
    return RNN(LSTMCell(features, **cell_options), reverse=reverse, unroll=unroll,
               return_carry=return_carry)


def GRU(features: int, *, reverse: bool = False, unroll: int | bool = 1,
        return_carry: bool = False, **cell_options: Any) -> Layer:
    """``RNN(GRUCell(features, **cell_options), reverse=..., unroll=..., return_carry=...)``:
    a GRU layer. ``x: [..., time, in_features] -> [..., time, features]``; params
    ``{"w_i", "w_h", "b", "b_hn"}`` (see :func:`GRUCell` and :func:`RNN`)."""
    return RNN(GRUCell(features, **cell_options), reverse=reverse, unroll=unroll,
               return_carry=return_carry)


def Bidirectional(forward_cell: Cell, backward_cell: Cell | None = None, *,
                  combine: str | Callable[[tuple], Any] = "concat",
                  unroll: int | bool = 1, return_carry: bool = False) -> Layer:
    """Runs ``RNN(forward_cell)`` and ``RNN(backward_cell, reverse=True)`` on the same sequence
    and combines their outputs.

    Shapes: ``x: [..., time, in_features] -> [..., time, 2 * features]`` for
    ``combine="concat"`` (forward first); ``"add"`` gives ``[..., time, features]``,
    ``"tuple"`` the pair ``(forward, backward)``, and a function ``combine((forward, backward))``
    anything. ``backward_cell`` defaults to a cell like ``forward_cell`` (with its own params).
    Params: ``{"forward": ..., "backward": ...}``, each the cell's params.

    A ``Seq`` with lengths is taken as by :func:`RNN` (the backward direction starts at each
    sequence's own last valid step) and gives a ``Seq``. ``return_carry=True`` returns
    ``(y, (forward_carry, backward_carry))``.

    >>> import jax, jax.numpy as jnp
    >>> layer = Bidirectional(GRUCell(4))
    >>> params, state = layer.init(jax.random.key(0), jnp.zeros((2, 7, 3)))
    >>> sorted(params), layer.apply(params, state, jnp.zeros((2, 7, 3)))[0].shape
    (['backward', 'forward'], (2, 7, 8))
    """
    backward_cell = forward_cell if backward_cell is None else backward_cell
    for which, cell in (("forward_cell", forward_cell), ("backward_cell", backward_cell)):
        if not isinstance(cell, Cell):
            raise TypeError(f"Bidirectional: {which} must be a Cell (LSTMCell(64), "
                            f"GRUCell(64), ...), not a layer; got "
                            f"{getattr(cell, 'name', type(cell).__name__)}")
    combine_fn = combiner("Bidirectional", combine)
    directions = Children("Bidirectional", {
        "forward": RNN(forward_cell, unroll=unroll, return_carry=True),
        "backward": RNN(backward_cell, reverse=True, unroll=unroll, return_carry=True)})

    def init(key, x):
        child = directions.initializer(key)
        for direction in directions.layers:
            child(direction, x)
        return child.params, {}

    def apply(params, state, x, *, key=None, train=False):
        child = directions.runner(params, {}, None, train)
        (forward, forward_carry), (backward, backward_carry) = (
            child(direction, x) for direction in directions.layers)
        y = combine_fn((array_of(forward), array_of(backward)))
        y = x.with_x(y) if isinstance(x, Seq) else y
        return ((y, (forward_carry, backward_carry)) if return_carry else y), state

    apply.runs_cell = True
    return Layer(init, apply, "Bidirectional")
