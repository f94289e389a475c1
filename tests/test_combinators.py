"""Combinators: param trees, values by construction, keys, state and ``Seq`` inputs; and
``repeat`` (``num`` copies of a layer in one ``lax.scan``) against the copies applied one after
another by hand: params and state stacked per copy, each copy's key, a ``Seq``'s side inputs
given to every copy while only its array is carried, rematerialisation, tracing the layer once
whatever the depth, nothing leaking out of the scan's trace, and errors."""

import contextlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnn
from fnn.combinators import repeat
from fnn.core import Layer, Seq, array_of
from fnn.layers.transformer import DecoderBlock, EncoderBlock
from helpers import f64, make_params, rand, run, walk


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


def test_init_accepts_arrays_and_specs(key):
    model = fnn.serial(fnn.Conv(4, (3, 3)), fnn.Flatten(-3), fnn.Dense(2))
    p1, _ = model.init(key, jnp.zeros((2, 5, 5, 3)))
    p2, _ = model.init(key, jax.ShapeDtypeStruct((2, 5, 5, 3), jnp.float32))
    jax.tree.map(np.testing.assert_array_equal, p1, p2)


def test_init_under_jit_matches_eager(key):
    model = fnn.serial(fnn.Dense(4), fnn.BatchNorm(), fnn.Dense(2))
    eager = model.init(key, jnp.zeros((3, 5)))
    jitted = jax.jit(model.init)(key, jnp.zeros((3, 5)))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), eager, jitted)


def test_serial_branch_and_residual_pass_a_seq_through(key):
    x = jnp.arange(24.0).reshape(2, 3, 4) / 24
    seq = fnn.Seq(x, lengths=jnp.array([3, 1]))
    model = fnn.serial(fnn.residual(fnn.Dense(4)), fnn.branch(fnn.Dense(2), fnn.Tanh()))
    params, state = model.init(key, seq)
    y, _ = model.apply(params, state, seq)
    plain, _ = model.apply(params, state, x)
    assert isinstance(y, fnn.Seq) and y.lengths is seq.lengths
    np.testing.assert_allclose(y.x, plain, rtol=1e-6)
    assert y.x.shape == (2, 3, 6)


# ============================================================================= repeat

TOL = dict(rtol=2e-5, atol=2e-5)
B, T, F = 2, 5, 8


def layer_slice(stacked, i):
    return jax.tree.map(lambda a: a[i], stacked)


def by_hand(block, params, x, num, **kwargs):
    """The copies of ``block`` applied in turn with ``params["layers"]``' slices; a ``Seq``'s
    array is carried and its side inputs given to every copy."""
    h = x
    for i in range(num):
        y, _ = run(block, layer_slice(params["layers"], i), h, **kwargs)
        h = x.with_x(array_of(y)) if isinstance(x, Seq) else y
    return h


def close(a, b, **tol):
    jax.tree.map(lambda u, v: np.testing.assert_allclose(f64(u), f64(v), **(tol or TOL)), a, b)


@contextlib.contextmanager
def raises(error, pattern):
    """``pytest.raises`` matching the message alone (``str`` of the error: errors raised inside
    ``vmap`` or ``scan`` also carry JAX's traceback note, which ``pytest.raises(match=)``
    would see)."""
    with pytest.raises(error) as info:
        yield
    assert re.search(pattern, str(info.value)), str(info.value)


# ============================================================================= values

def test_repeat_equals_copies_applied_in_turn(key):
    block = fnn.serial(fnn.Dense(F), fnn.Relu())
    model = repeat(block, 3)
    x = jnp.asarray(rand((B, F), 1))
    params, state = model.init(key, x)
    assert jax.tree.map(jnp.shape, params) == {"layers": {"0": {"w": (3, F, F), "b": (3, F)}}}
    assert state == {}
    # copies are initialised with different keys: copy i with fold_in(key, i)
    assert not np.allclose(params["layers"]["0"]["w"][0], params["layers"]["0"]["w"][1])
    first, _ = block.init(jax.random.fold_in(key, 1), x)
    close(layer_slice(params["layers"], 1), first)
    y, new_state = run(model, params, x)
    assert new_state == {}
    h = f64(x)
    for i in range(3):
        p = layer_slice(params["layers"], i)["0"]
        h = np.maximum(h @ f64(p["w"]) + f64(p["b"]), 0)
    close(y, h)
    # unroll changes the loop, not the result
    y2, _ = repeat(block, 3, unroll=2).apply(params, state, x)
    close(y2, y)


def test_repeat_of_encoder_blocks_with_dropout_keys(key):
    block = EncoderBlock(2, 16, dropout=0.2)
    model = repeat(block, 3)
    x = jnp.asarray(rand((B, T, F), 2))
    params = make_params(model, x)
    assert params["layers"]["attention"]["query"]["w"].shape == (3, F, 2, 4)
    drop_key = jax.random.key(5)
    y, _ = run(model, params, x, key=drop_key, train=True)
    h = x
    for i in range(3):  # copy i gets fold_in(key, i)
        h, _ = run(block, layer_slice(params["layers"], i), h,
                   key=jax.random.fold_in(drop_key, i), train=True)
    close(y, h)


def test_repeat_remat_gives_equal_values_and_gradients(key):
    block = EncoderBlock(2, 16, norm="rms", activation="swiglu")
    x = jnp.asarray(rand((B, T, F), 3))
    plain, remat = repeat(block, 2), repeat(block, 2, remat=True)
    params = make_params(plain, x)

    def loss(model):
        return lambda p, x: jnp.sum(jnp.sin(model.apply(p, {}, x)[0]))

    v1, g1 = jax.jit(jax.value_and_grad(loss(plain), argnums=(0, 1)))(params, x)
    v2, g2 = jax.jit(jax.value_and_grad(loss(remat), argnums=(0, 1)))(params, x)
    np.testing.assert_allclose(float(v1), float(v2), rtol=1e-6)
    close(g1, g2)
    assert "remat" in str(jax.make_jaxpr(loss(remat))(params, x))  # jax.checkpoint's primitive
    assert "remat" not in str(jax.make_jaxpr(loss(plain))(params, x))
    # a jax.checkpoint policy is accepted as well
    dense = fnn.serial(fnn.Dense(F), fnn.Tanh())
    small = [repeat(dense, 2, remat=r) for r in (False, jax.checkpoint_policies.dots_saveable)]
    p = make_params(small[0], x)
    g1, g2 = (jax.jit(jax.grad(loss(model)))(p, x) for model in small)
    close(g1, g2)


def test_repeat_stacks_state_per_copy(key):
    block = fnn.serial(fnn.Dense(3), fnn.BatchNorm(momentum=0.5))
    model = repeat(block, 2)
    x = jnp.asarray(rand((6, 3), 4))
    params, state = model.init(key, x)
    assert jax.tree.map(jnp.shape, state) == {"layers": {"1": {"mean": (2, 3), "var": (2, 3)}}}
    y, new_state = run(model, params, x, state, train=True)
    h = x
    for i in range(2):
        h, s = block.apply(layer_slice(params["layers"], i), layer_slice(state["layers"], i), h,
                           train=True)
        for name in ("mean", "var"):
            close(new_state["layers"]["1"][name][i], s["1"][name])
    close(y, h)
    # the copies see different inputs, so their statistics differ
    assert not np.allclose(new_state["layers"]["1"]["mean"][0],
                           new_state["layers"]["1"]["mean"][1])
    # evaluation mode leaves the statistics alone
    _, eval_state = run(model, params, x, new_state)
    jax.tree.map(np.testing.assert_array_equal, eval_state, new_state)


def test_repeat_traces_the_block_once_whatever_the_depth(key):
    block = EncoderBlock(2, 16)
    x = jax.ShapeDtypeStruct((B, T, F), jnp.float32)
    counts = []
    for num in (2, 24):
        model = repeat(block, num)
        params, state = jax.eval_shape(model.init, key, x)
        jaxpr = jax.make_jaxpr(lambda p, x: model.apply(p, state, x)[0])(params, x)
        counts.append((len(jaxpr.jaxpr.eqns), sum(1 for _ in walk(jaxpr.jaxpr))))
    assert counts[0] == counts[1]


# ============================================================================= side inputs

SIDE_LENGTHS = jnp.asarray([5, 3], jnp.int32)
SIDE_MASK = jnp.asarray(np.tril(np.ones((T, T), bool)) | np.eye(T, k=2, dtype=bool))


def side_cases():
    x = jnp.asarray(rand((B, T, F), 30))
    memory = jnp.asarray(rand((B, 3, 6), 31))
    return [(EncoderBlock(2, 16), Seq(x, lengths=SIDE_LENGTHS, mask=SIDE_MASK)),
            (DecoderBlock(2, 16, cross=True),
             Seq(x, lengths=SIDE_LENGTHS, memory=memory, memory_lengths=SIDE_LENGTHS - 2))]


@pytest.mark.parametrize("case", [0, 1], ids=["lengths_mask", "lengths_memory"])
def test_repeat_gives_a_seqs_side_inputs_to_every_copy(case):
    """lengths, mask and memory reach every copy (the copies applied in turn by hand, each given
    the Seq's side inputs); the output is the Seq with the last copy's array."""
    block, seq = side_cases()[case]
    model = repeat(block, 2, remat=True)
    params = make_params(model, seq)
    y, _ = run(model, params, seq)
    assert isinstance(y, Seq)
    expected = by_hand(block, params, seq, 2)
    close(y.x, expected.x)
    for field, given in zip(seq._fields[1:], seq[1:]):
        if given is None:
            assert getattr(y, field) is None, field
        else:
            np.testing.assert_array_equal(getattr(y, field), given, err_msg=field)
    # the side inputs matter in the second copy: without them there it would differ
    first, _ = run(block, layer_slice(params["layers"], 0), seq)
    second, _ = run(block, layer_slice(params["layers"], 1), Seq(first.x, memory=seq.memory))
    assert not np.allclose(f64(second.x), f64(y.x), atol=1e-4)


def test_repeat_carries_only_the_array():
    """A copy that changes the side inputs of its output does not change those the next copy
    gets: each copy adds the Seq's lengths to the array and returns lengths zero."""
    def apply(params, state, x, *, key=None, train=False):
        step = x.lengths.astype(x.x.dtype)[:, None, None]
        return Seq(x.x + step, lengths=jnp.zeros_like(x.lengths)), state

    adder = Layer(lambda key, x: ({}, {}), apply, "Adder")
    x = jnp.asarray(rand((B, T, F), 32))
    y, _ = run(repeat(adder, 3), {}, Seq(x, lengths=SIDE_LENGTHS))
    close(y.x, f64(x) + 3 * f64(SIDE_LENGTHS)[:, None, None])
    np.testing.assert_array_equal(y.lengths, SIDE_LENGTHS)


def test_nothing_leaks_out_of_the_scan(key):
    """The same repeat layer is traced again for other inputs (a Seq with or without some side
    inputs, other values) with no tracer leaking between traces, and gradients reach the side
    inputs through every copy."""
    block, seq = side_cases()[1]
    model = repeat(block, 2)
    params = make_params(model, seq)
    other = seq._replace(memory_lengths=jnp.asarray([1, 3], jnp.int32))

    def loss(apply_seq, memory):
        return jnp.sum(jnp.sin(apply_seq(seq._replace(memory=memory)).x))

    with jax.checking_leaks():
        spec, _ = jax.eval_shape(model.init, key, seq)
        plain_spec, _ = jax.eval_shape(model.init, key, Seq(seq.x, memory=seq.memory))
        assert jax.tree.map(jnp.shape, spec) == jax.tree.map(jnp.shape, plain_spec)
        apply = jax.jit(model.apply)
        y, _ = apply(params, {}, seq)
        y_other, _ = apply(params, {}, other)  # not served from the first call's side inputs
        g = jax.jit(jax.grad(lambda m: loss(lambda s: model.apply(params, {}, s)[0], m)))(
            seq.memory)
    close(y.x, by_hand(block, params, seq, 2).x)
    close(y_other.x, by_hand(block, params, other, 2).x)
    assert not np.allclose(f64(y_other.x), f64(y.x), atol=1e-4)

    def copies_in_turn(s):
        h = s
        for i in range(2):
            h = s.with_x(block.apply(layer_slice(params["layers"], i), {}, h)[0].x)
        return h

    close(g, jax.jit(jax.grad(lambda m: loss(copies_in_turn, m)))(seq.memory))
    assert np.all(np.asarray(g[1, 1:]) == 0)  # memory_lengths [3, 1]: padding gets none
    assert np.any(np.asarray(g[1, 0]) != 0)


# ============================================================================= errors

def unwrap():
    """A layer that returns the plain array of a Seq."""
    return Layer(lambda key, x: ({}, {}), lambda p, s, x, **kw: (array_of(x), s), "Unwrap")


def test_repeat_errors(key):
    with raises(fnn.LayerError, r"^repeat: the repeated layer Dense must map its input to an "
                                r"output of the same shape.*maps float32\[2, 5\] to "
                                r"float32\[2, 3\]$"):
        repeat(fnn.Dense(3), 2).init(key, jnp.zeros((2, 5)))
    model = fnn.serial(body=repeat(fnn.Dense(5), 2))
    params, state = model.init(key, jnp.zeros((2, 5)))
    unstacked = {"body": {"layers": layer_slice(params["body"]["layers"], 0)}}
    with pytest.raises(fnn.LayerError, match=r"^repeat at body: expected params stacked over 2 "
                                             r"copies"):
        model.apply(unstacked, state, jnp.zeros((2, 5)))
    with pytest.raises(ValueError, match="^repeat: num must be a positive integer"):
        repeat(fnn.Dense(5), 0)
    with pytest.raises(ValueError, match="^repeat: unroll"):
        repeat(fnn.Dense(5), 2, unroll=0)
    with pytest.raises(ValueError, match="^repeat: remat must be a bool"):
        repeat(fnn.Dense(5), 2, remat="yes")
    with pytest.raises(TypeError, match="^repeat: layer must be a Layer"):
        repeat(fnn.LSTMCell(4), 2)  # a cell is not a layer


def test_repeat_refuses_a_layer_that_changes_the_array(key):
    """On a Seq, each copy must map the array to one of the same shape and dtype, in a Seq: a
    LayerError naming repeat (and its path), at init and at apply."""
    seq = Seq(jnp.zeros((2, 5, 4)), lengths=jnp.asarray([5, 2], jnp.int32))
    described = r"Seq\(x=float32\[2, 5, 4\], lengths=int32\[2\]\)"
    with raises(fnn.LayerError, rf"^repeat: the repeated layer Dense must map .* maps "
                                rf"{described} to Seq\(x=float32\[2, 5, 3\], "
                                rf"lengths=int32\[2\]\)$"):
        repeat(fnn.Dense(3), 2).init(key, seq)
    shrink = fnn.Lambda(lambda v: v[..., :2])
    with pytest.raises(fnn.LayerError, match=rf"^repeat at deep: the repeated layer .* maps "
                                             rf"{described} to Seq\(x=float32\[2, 5, 2\]"):
        fnn.serial(deep=repeat(shrink, 2)).apply({}, {}, seq)  # apply checks without init
    cast = fnn.Lambda(lambda v: v.astype(jnp.bfloat16))
    with pytest.raises(fnn.LayerError, match=rf"^repeat: .* maps {described} to "
                                             rf"Seq\(x=bfloat16\[2, 5, 4\]"):
        repeat(cast, 2).apply({}, {}, seq)
    with raises(fnn.LayerError, rf"^repeat: the repeated layer Unwrap .* maps {described} to "
                                rf"float32\[2, 5, 4\]$"):
        repeat(unwrap(), 3).init(key, seq)


def test_params_of_another_model_are_refused_naming_the_entry(key):
    model = fnn.serial(fnn.Dense(4), fnn.Relu(), head=fnn.Dense(3))
    x = jnp.zeros((2, 5))
    params, state = model.init(key, x)
    extra = params | {"extra": {"w": jnp.zeros(2)}}
    with pytest.raises(fnn.ParamError, match=r"^serial: unexpected params entries 'extra' \(its "
                                             r"children are '0', '1', 'head'\)$"):
        model.apply(extra, state, x)
    # a parameter-free layer given params (e.g. a tree shifted by one position)
    shifted = {"0": params["0"], "1": params["head"], "head": params["head"]}
    with pytest.raises(fnn.ParamError, match=r"^Relu at 1: expected params \{\}, got \{w: "
                                             r"float32\[4, 3\], b: float32\[3\]\}: "
                                             r"unexpected w, b$"):
        model.apply(shifted, state, x)
    with pytest.raises(fnn.ParamError, match=r"^repeat: unexpected params entries 'other'"):
        block = fnn.repeat(fnn.Dense(5), 2)
        p, s = block.init(key, jnp.zeros((2, 5)))
        block.apply(p | {"other": {}}, s, jnp.zeros((2, 5)))
