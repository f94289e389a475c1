"""Precision policies (fnn.precision) and rematerialisation (fnn.combinators.remat): two ways to
trade exactness or compute for memory, each checked to change nothing else."""

import dataclasses

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fnn
from fnn.combinators import remat
from fnn.data import batches, load_digits
from fnn.losses import softmax_cross_entropy
from fnn.models import MLP
from fnn.precision import Policy, with_policy
from fnn.train import create_train_state, make_eval_step, make_train_step


# Small shapes shared by every test (and by the descriptor table), so that each parameter
# initialiser compiles once: x [4, 5] -> Dense(4) -> Dense(3).
X = jax.random.normal(jax.random.key(1), (4, 5))


def _init(model, x=X, seed=0):
    return model.init(jax.random.key(seed), x)


def _specs(model, x=X):
    """The params and state of ``model`` as ``ShapeDtypeStruct``s: enough to trace it."""
    return jax.eval_shape(model.init, jax.random.key(0), x)


def _mlp():
    return fnn.serial(fnn.Dense(4), fnn.Relu(), fnn.Dense(3))


def _eqns(jaxpr):
    """Every equation of a jaxpr, including those of nested jaxprs (scans, checkpoints, jits)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    yield from _eqns(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    yield from _eqns(sub)


def _dot_dtypes(fn, *args) -> set[str]:
    """The operand dtypes of every matmul and convolution in ``fn``'s jaxpr."""
    names = {"dot_general", "conv_general_dilated"}
    return {v.aval.dtype.name for eqn in _eqns(jax.make_jaxpr(fn)(*args).jaxpr)
            if eqn.primitive.name in names for v in eqn.invars}


# ----------------------------------------------------------------------------- Policy

def test_policy_defaults_presets_and_names():
    policy = Policy()
    assert (policy.param_dtype, policy.compute_dtype, policy.output_dtype) == (
        jnp.float32, jnp.bfloat16, jnp.float32)
    assert Policy.parse("bfloat16") == policy
    assert Policy.parse("float16").compute_dtype == jnp.float16
    assert Policy.parse("float32") == Policy(compute_dtype="float32")
    assert str(Policy.parse("float16")) == "Policy(float16)"
    assert str(Policy(output_dtype=jnp.bfloat16)) == (
        "Policy(param=float32, compute=bfloat16, output=bfloat16)")
    assert hash(Policy(compute_dtype="bfloat16")) == hash(policy)  # usable as a static argument


def test_policy_rejects_bad_dtypes_and_names():
    with pytest.raises(TypeError, match="compute_dtype must be a floating dtype .* got int32"):
        Policy(compute_dtype=jnp.int32)
    with pytest.raises(TypeError, match="param_dtype must be a floating dtype .* got 'nope'"):
        Policy(param_dtype="nope")
    with pytest.raises(TypeError, match="output_dtype must be a floating dtype .* got None"):
        Policy(output_dtype=None)
    with pytest.raises(ValueError, match=r"unknown precision policy 'bf16'; expected one of "
                                         r"\['bfloat16', 'float16', 'float32'\]"):
        Policy.parse("bf16")
    with pytest.raises(dataclasses.FrozenInstanceError):
        Policy().compute_dtype = jnp.float16
    with pytest.raises(TypeError, match="policy must be a Policy"):
        with_policy(fnn.Dense(3), "bfloat16")
    with pytest.raises(TypeError, match="model must be a Layer"):
        with_policy(lambda x: x, Policy())


# ----------------------------------------------------------------------------- with_policy

def test_policy_dtypes_of_params_outputs_and_gradients():
    model = with_policy(_mlp(), Policy.parse("bfloat16"))
    assert model.name == "Policy(bfloat16)"
    params, state = _init(model, jax.ShapeDtypeStruct(X.shape, X.dtype))
    assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    y, _ = model.apply(params, state, X)
    assert y.dtype == jnp.float32 and y.shape == (4, 3)

    grads = jax.grad(lambda p: jnp.sum(model.apply(p, state, X)[0]))(params)
    assert jax.tree.map(lambda g: g.dtype, grads) == jax.tree.map(lambda p: p.dtype, params)
    # the same params and tree as the bare model; close values, computed with 8-bit mantissas
    bare = _mlp()
    assert jax.tree.structure(params) == jax.tree.structure(_specs(bare)[0])
    y32, _ = bare.apply(params, state, X)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y32), atol=0.05, rtol=0.05)
    assert not np.array_equal(np.asarray(y), np.asarray(y32))  # really rounded to bfloat16


def test_policy_computes_every_matmul_in_the_compute_dtype():
    x = jax.ShapeDtypeStruct((2, 8, 8, 1), jnp.float32)
    for name in ["bfloat16", "float16", "float32"]:
        model = with_policy(fnn.models.LeNet(10, features=(4, 8), kernel_size=3,
                                             hidden_features=16),
                            Policy.parse(name))
        params, state = _specs(model, x)

        def loss(p, x):
            return jnp.sum(model.apply(p, state, x)[0])

        # forward and backward: every dot and convolution, of the model and of its gradient
        assert _dot_dtypes(jax.grad(loss), params, x) == {name}


def test_policy_leaves_integer_inputs_alone():
    seen = []

    def record(inputs):
        seen.append(jax.tree.map(lambda a: a.dtype, inputs))
        return inputs

    model = with_policy(fnn.Lambda(record), Policy())
    ids = jnp.array([[1, 2, 3], [4, 5, 6]], jnp.int32)
    mask = jnp.array([True, False])
    params, state = _init(model, (X, ids, mask))
    y, _ = model.apply(params, state, (X, ids, mask))
    assert seen[-1] == (jnp.bfloat16, jnp.int32, jnp.bool_)
    assert (y[0].dtype, y[1].dtype, y[2].dtype) == (jnp.float32, jnp.int32, jnp.bool_)
    np.testing.assert_array_equal(np.asarray(y[1]), np.asarray(ids))


def test_policy_keeps_batchnorm_statistics_in_float32():
    bare = fnn.serial(fnn.Dense(4), fnn.BatchNorm(momentum=0.5))
    model = with_policy(bare, Policy())
    x = jax.random.normal(jax.random.key(1), (16, 5)) * 3.0 + 1.0
    params, state = _init(model, x)
    assert state["1"]["mean"].dtype == jnp.float32
    y, new_state = model.apply(params, state, x, train=True)
    assert jax.tree.map(lambda s: s.dtype, new_state) == jax.tree.map(lambda s: s.dtype, state)
    _, new_state32 = bare.apply(params, state, x, train=True)
    # the statistics of bfloat16 activations: within bfloat16's rounding of the float32 ones
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                         rtol=0.02, atol=0.02),
                 new_state, new_state32)
    assert not np.allclose(np.asarray(new_state["1"]["mean"]), 0.0)
    # normalised per feature: mean ~0, variance ~1 over the batch
    np.testing.assert_allclose(np.asarray(y).mean(0), 0.0, atol=0.05)
    np.testing.assert_allclose(np.asarray(y).var(0), 1.0, atol=0.05)


def test_policy_stores_params_in_param_dtype():
    bare = fnn.Dense(4, param_dtype=jnp.bfloat16)  # a model that stores bfloat16 itself
    params, _ = _specs(with_policy(bare, Policy()))
    assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    params, _ = _specs(with_policy(fnn.Dense(4), Policy(param_dtype=jnp.bfloat16)))
    assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}


def test_policy_float32_is_the_bare_model():
    bare = fnn.serial(fnn.Dense(4), fnn.Gelu(), fnn.LayerNorm(), fnn.Dense(3))
    model = with_policy(bare, Policy.parse("float32"))
    params, state = _init(model)
    np.testing.assert_array_equal(np.asarray(model.apply(params, state, X)[0]),
                                  np.asarray(bare.apply(params, state, X)[0]))


def test_policy_errors_name_the_models_path():
    model = with_policy(fnn.serial(fnn.Dense(4), encoder=fnn.serial(fnn.Dense(3))), Policy())
    params, state = _specs(model)
    with pytest.raises(fnn.ShapeError, match=r"Dense at 0: expected input \[..., 5\], got "
                                             r"bfloat16\[2, 6\]"):
        jax.eval_shape(model.apply, params, state, jnp.zeros((2, 6)))


def _accuracy_after_training(model, ts, data, epochs=4, batch_size=64):
    step = make_train_step(model, OPTIMIZER, softmax_cross_entropy, donate=False)
    for epoch in range(epochs):
        for xb, yb in batches(data.x_train, data.y_train, batch_size, seed=0, epoch=epoch):
            ts, _ = step(ts, xb, yb)
    evaluate = make_eval_step(model, softmax_cross_entropy)
    return ts, float(evaluate(ts.params, ts.state, data.x_test, data.y_test)["accuracy"])


OPTIMIZER = optax.adam(3e-3)


def test_bfloat16_training_reaches_float32_accuracy():
    data = load_digits()
    bare = MLP([64], 10, flatten_axes=3)
    # the same initial params for both: the policy stores the bare model's float32 params
    start = create_train_state(bare, OPTIMIZER, jax.random.key(0), data.x_train[:64])
    _, acc32 = _accuracy_after_training(bare, start, data)
    ts16, acc16 = _accuracy_after_training(with_policy(bare, Policy()), start, data)
    assert {p.dtype for p in jax.tree.leaves(ts16.params)} == {jnp.dtype(jnp.float32)}
    assert acc32 > 0.9 and acc16 > 0.9, (acc32, acc16)
    assert abs(acc32 - acc16) < 0.02, (acc32, acc16)


# ----------------------------------------------------------------------------- remat

def test_remat_equals_the_plain_layer_in_values_gradients_and_state():
    block = fnn.serial(fnn.Dense(4), fnn.BatchNorm(momentum=0.5), fnn.Gelu(), fnn.Dropout(0.3),
                       fnn.Dense(3))
    wrapped = remat(block)
    assert wrapped.name == "remat(serial)"
    params, state = _init(block)
    assert jax.tree.map(jnp.shape, _specs(wrapped)) == jax.tree.map(jnp.shape, (params, state))

    def loss(layer):
        def fn(p, x):
            y, new_state = layer.apply(p, state, x, key=jax.random.key(5), train=True)
            return jnp.sum(jnp.sin(y)), (y, new_state)
        return jax.jit(jax.value_and_grad(fn, argnums=(0, 1), has_aux=True))

    (v1, (y1, s1)), g1 = loss(block)(params, X)
    (v2, (y2, s2)), g2 = loss(wrapped)(params, X)
    # dropout drew the same mask: the key reaches the layer, in the forward pass and in the
    # recomputation
    for a, b in zip(jax.tree.leaves((v1, y1, s1, g1)), jax.tree.leaves((v2, y2, s2, g2))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    y_eval, _ = wrapped.apply(params, state, X)
    np.testing.assert_allclose(np.asarray(y_eval), np.asarray(block.apply(params, state, X)[0]),
                               rtol=1e-6)


def _remat_eqns(layer):
    params, state = _specs(layer)
    grad = jax.grad(lambda p: jnp.sum(jnp.tanh(layer.apply(p, state, X)[0])))
    return [eqn for eqn in _eqns(jax.make_jaxpr(grad)(params).jaxpr)
            if eqn.primitive.name.startswith("remat")]  # jax.checkpoint's primitive


def test_remat_puts_a_checkpoint_in_the_gradient():
    policy = jax.checkpoint_policies.dots_saveable
    for layer, expected in [(remat(fnn.Dense(4)), (None, True)),
                            (remat(fnn.Dense(4), policy=policy, prevent_cse=False),
                             (policy, False))]:
        remats = _remat_eqns(layer)
        assert remats, "no checkpoint in the gradient's jaxpr"
        assert {(eqn.params["policy"], eqn.params["prevent_cse"]) for eqn in remats} == {expected}
    assert not _remat_eqns(fnn.Dense(4))


def test_remat_errors():
    with pytest.raises(TypeError, match="remat: layer must be a Layer"):
        remat(jnp.tanh)
    with pytest.raises(TypeError, match="remat: policy must be a jax.checkpoint_policies entry"):
        remat(fnn.Dense(3), policy="dots_saveable")
    with pytest.raises(TypeError, match="prevent_cse must be a bool"):
        remat(fnn.Dense(3), prevent_cse=None)
    layer = fnn.serial(fnn.Dense(4), remat(fnn.serial(fnn.Dense(3))))
    params, state = _specs(layer)
    params["1"]["0"]["w"] = jax.ShapeDtypeStruct((2, 3), jnp.float32)
    with pytest.raises(fnn.ShapeError, match=r"Dense at 1/0: expected input \[..., 2\], got "
                                             r"float32\[4, 4\]"):
        jax.eval_shape(layer.apply, params, state, X)
    with pytest.raises(TypeError, match="train must be a Python bool"):
        remat(fnn.Dense(4)).apply(params["0"], {}, X, train=jnp.array(True))
