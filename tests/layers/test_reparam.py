"""SpectralNorm and WeightNorm against PyTorch's ``spectral_norm`` and ``weight_norm`` on a
Linear and a Conv2d (weights, power-iteration vectors, outputs and gradients), the power
iteration against numpy's SVD, and the checks of params and state."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnn
from helpers import f32, f64, rand, run

TOL = dict(rtol=1e-5, atol=1e-5)


def _torch():
    return pytest.importorskip("torch", reason="torch is not installed (pip install -e "
                                                "'.[interop]')")


def _as_torch_weight(w):
    """fnn's ``[in, out]`` or ``[kh, kw, in, out]`` as PyTorch's ``[out, in]`` or
    ``[out, in, kh, kw]``."""
    w = np.asarray(w)
    return w.T if w.ndim == 2 else w.transpose(3, 2, 0, 1)


def _v_from_torch(v, w_shape):
    """PyTorch's ``v`` (over ``in, kh, kw``) in fnn's order (``kh, kw, in``)."""
    v = np.asarray(v)
    if len(w_shape) == 2:
        return v
    kh, kw, c_in, _ = w_shape
    return v.reshape(c_in, kh, kw).transpose(1, 2, 0).reshape(-1)


def _torch_pair(kind):
    """An fnn layer, its input, and the equal PyTorch module and input."""
    torch = _torch()
    if kind == "linear":
        layer, x = fnn.Dense(4), rand((3, 5), 1)
        module, tx = torch.nn.Linear(5, 4), torch.tensor(x)
    else:
        layer, x = fnn.Conv(4, (3, 3), padding=1), rand((2, 5, 5, 3), 1)
        module = torch.nn.Conv2d(3, 4, 3, padding=1)
        tx = torch.tensor(x.transpose(0, 3, 1, 2))
    return layer, x, module, tx


def _to_fnn_output(y):
    y = y.detach().numpy()
    return y if y.ndim == 2 else y.transpose(0, 2, 3, 1)


# ============================================================================= SpectralNorm

@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("num_iterations", [1, 3])
def test_spectral_norm_matches_torch_in_training_and_eval(kind, num_iterations):
    torch = _torch()
    torch.manual_seed(0)
    layer, x, module, tx = _torch_pair(kind)
    module = torch.nn.utils.spectral_norm(module, n_power_iterations=num_iterations)
    sn = fnn.SpectralNorm(layer, num_iterations=num_iterations)
    params, _ = sn.init(jax.random.key(0), x)
    w = np.asarray(params["w"])
    b = rand(params["b"].shape, 2)
    params = {"w": f32(w), "b": f32(b)}
    with torch.no_grad():
        module.weight_orig.copy_(torch.tensor(_as_torch_weight(w)))
        module.bias.copy_(torch.tensor(b))
    state = {"u": f32(module.weight_u.numpy()),
             "v": f32(_v_from_torch(module.weight_v.numpy(), w.shape))}

    module.train()
    y_torch = module(tx)
    y, new_state = run(sn, params, f32(x), state, train=True)
    np.testing.assert_allclose(f64(new_state["u"]), module.weight_u.numpy(), **TOL)
    np.testing.assert_allclose(f64(new_state["v"]),
                               _v_from_torch(module.weight_v.numpy(), w.shape), **TOL)
    np.testing.assert_allclose(f64(y), _to_fnn_output(y_torch), **TOL)
    # the normalised weight: the one the wrapped layer was applied with
    sigma = float(np.dot(new_state["u"], np.asarray(new_state["v"]) @ w.reshape(-1, w.shape[-1])))
    np.testing.assert_allclose(_as_torch_weight(w / sigma), module.weight.detach().numpy(), **TOL)

    module.eval()
    u_before = module.weight_u.clone()
    y_torch = module(tx)
    y, eval_state = run(sn, params, f32(x), new_state, train=False)
    assert torch.equal(module.weight_u, u_before)
    np.testing.assert_array_equal(np.asarray(eval_state["u"]), np.asarray(new_state["u"]))
    np.testing.assert_array_equal(np.asarray(eval_state["v"]), np.asarray(new_state["v"]))
    np.testing.assert_allclose(f64(y), _to_fnn_output(y_torch), **TOL)


@pytest.mark.parametrize("layer, shape", [
    (fnn.Dense(6), (2, 9)),
    (fnn.Conv(5, (3, 3)), (1, 6, 6, 4)),
    (fnn.ConvTranspose(3, (2, 2), strides=2), (1, 4, 4, 6)),
])
def test_spectral_norm_converges_to_the_largest_singular_value(layer, shape):
    sn = fnn.SpectralNorm(layer, num_iterations=50)
    x = f32(rand(shape, 1))
    params, state = sn.init(jax.random.key(1), x)
    for _ in range(4):
        _, state = run(sn, params, x, state, train=True)
    w = np.asarray(params["w"], np.float64)
    matrix = w.reshape(-1, w.shape[-1])
    top = np.linalg.svd(matrix, compute_uv=False)[0]
    u, v = f64(state["u"]), f64(state["v"])
    np.testing.assert_allclose(u @ (v @ matrix), top, rtol=1e-5)
    # the normalised weight has spectral norm 1
    normalized = matrix / (u @ (v @ matrix))
    np.testing.assert_allclose(np.linalg.svd(normalized, compute_uv=False)[0], 1.0, rtol=1e-5)


def test_spectral_norm_params_are_the_wrapped_layers_and_u_v_start_normalised():
    x = jnp.zeros((2, 8, 8, 3))
    params, state = fnn.SpectralNorm(fnn.Conv(4, (3, 3))).init(jax.random.key(0), x)
    plain, _ = fnn.Conv(4, (3, 3)).init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, plain)
    np.testing.assert_array_equal(np.asarray(params["w"]), np.asarray(plain["w"]))
    assert jax.tree.map(jnp.shape, state) == {"u": (4,), "v": (27,)}
    assert state["u"].dtype == jnp.float32
    for vector in state.values():
        np.testing.assert_allclose(np.linalg.norm(np.asarray(vector)), 1.0, rtol=1e-6)


def test_spectral_norm_nests_the_wrapped_layers_state_and_gradients_stop_at_u_v():
    model = fnn.SpectralNorm(fnn.serial(fnn.BatchNorm(), fnn.Dense(3)))
    x = f32(rand((4, 5), 1))
    with pytest.raises(fnn.ParamError, match=r"^SpectralNorm: expected params with a weight 'w'"):
        model.init(jax.random.key(0), x)
    # a layer with state of its own: a Dense after a BatchNorm, in one hand-made layer
    bn, dense = fnn.BatchNorm(), fnn.Dense(3)

    def init(key, x):
        p, s = dense.init(key, x)
        return p | {"bn": bn.init(key, x)[0]}, {"bn": bn.init(key, x)[1]}

    def apply(params, state, x, *, key=None, train=False):
        h, bn_state = bn.apply(params["bn"], state["bn"], x, train=train)
        return dense.apply({k: params[k] for k in ("w", "b")}, {}, h)[0], {"bn": bn_state}

    sn = fnn.SpectralNorm(fnn.Layer(init, apply, "BNDense"))
    params, state = sn.init(jax.random.key(0), x)
    assert sorted(state) == ["layer", "u", "v"] and sorted(state["layer"]["bn"]) == ["mean",
                                                                                  "var"]
    _, new_state = run(sn, params, x, state, train=True)
    assert not np.allclose(np.asarray(new_state["layer"]["bn"]["mean"]), 0.0)

    # u and v come from a power iteration with gradients stopped: the gradient is that of
    # w / sigma(w) with u, v held fixed
    layer = fnn.SpectralNorm(fnn.Dense(3))
    params, state = layer.init(jax.random.key(0), x)

    def loss(p):
        y, s = layer.apply(p, state, x, train=True)
        return jnp.sum(y ** 2), s

    grads, new = jax.grad(loss, has_aux=True)(params)
    u, v = new["u"], new["v"]

    def fixed(p):
        w = p["w"] / jnp.dot(u, v @ p["w"])
        return jnp.sum((x @ w + p["b"][None]) ** 2)

    reference = jax.grad(fixed)(params)
    np.testing.assert_allclose(np.asarray(grads["w"]), np.asarray(reference["w"]), **TOL)


def test_spectral_norm_state_checked_against_the_weight():
    layer = fnn.SpectralNorm(fnn.Dense(3))
    x = jnp.zeros((2, 5))
    params, state = layer.init(jax.random.key(0), x)
    with pytest.raises(fnn.ParamError, match=r"^SpectralNorm: expected state \{u: \[3\], v: "
                                             r"\[5\]\}, got .*v is float32\[4\], expected \[5\]$"):
        layer.apply(params, {**state, "v": jnp.zeros(4)}, x)
    with pytest.raises(fnn.ParamError, match=r"missing v"):
        layer.apply(params, {"u": state["u"]}, x)
    model = fnn.serial(head=layer)
    p, s = model.init(jax.random.key(0), x)
    with pytest.raises(fnn.ParamError, match=r"^SpectralNorm at head: expected params with a "
                                             r"weight 'w'"):
        model.apply({"head": {"b": p["head"]["b"]}}, s, x)
    with pytest.raises(ValueError, match=r"num_iterations must be a positive integer"):
        fnn.SpectralNorm(fnn.Dense(3), num_iterations=0)
    with pytest.raises(TypeError, match=r"layer must be a Layer"):
        fnn.SpectralNorm(3)


# ============================================================================= WeightNorm

@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_weight_norm_matches_torch_outputs_and_gradients(kind):
    torch = _torch()
    layer, x, module, tx = _torch_pair(kind)
    module = torch.nn.utils.parametrizations.weight_norm(module, dim=0)
    wn = fnn.WeightNorm(layer)
    params, _ = wn.init(jax.random.key(0), x)
    v, g, b = (rand(params[k].shape, seed) for seed, k in enumerate(("v", "g", "b"), start=3))
    params = {"v": f32(v), "g": f32(g), "b": f32(b)}
    original = module.parametrizations.weight.original0  # g, [out, 1, ...]
    with torch.no_grad():
        original.copy_(torch.tensor(g).reshape(original.shape))
        module.parametrizations.weight.original1.copy_(torch.tensor(_as_torch_weight(v)))
        module.bias.copy_(torch.tensor(b))
    y_torch = module(tx)
    y, _ = run(wn, params, f32(x))
    np.testing.assert_allclose(f64(y), _to_fnn_output(y_torch), **TOL)

    (y_torch ** 2).sum().backward()
    grads = jax.grad(lambda p: jnp.sum(wn.apply(p, {}, f32(x))[0] ** 2))(params)
    np.testing.assert_allclose(f64(grads["g"]), original.grad.numpy().reshape(-1), **TOL)
    np.testing.assert_allclose(_as_torch_weight(f64(grads["v"])),
                               module.parametrizations.weight.original1.grad.numpy(), **TOL)
    np.testing.assert_allclose(f64(grads["b"]), module.bias.grad.numpy(), **TOL)


def test_weight_norm_starts_at_the_wrapped_layers_weight():
    x = f32(rand((2, 6, 6, 3), 1))
    params, state = fnn.WeightNorm(fnn.Conv(4, (3, 3))).init(jax.random.key(0), x)
    plain, _ = fnn.Conv(4, (3, 3)).init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, params) == {"b": (4,), "g": (4,), "v": (3, 3, 3, 4)}
    np.testing.assert_allclose(f64(params["g"]),
                               np.linalg.norm(f64(plain["w"]).reshape(-1, 4), axis=0), **TOL)
    y, _ = run(fnn.WeightNorm(fnn.Conv(4, (3, 3))), params, x)
    np.testing.assert_allclose(f64(y), f64(run(fnn.Conv(4, (3, 3)), plain, x)[0]), **TOL)
    # scaling v changes nothing: only its direction counts
    y2, _ = run(fnn.WeightNorm(fnn.Conv(4, (3, 3))), {**params, "v": params["v"] * 3.0}, x)
    np.testing.assert_allclose(f64(y2), f64(y), **TOL)


def test_weight_norm_checks_its_params():
    layer = fnn.WeightNorm(fnn.Dense(3))
    x = jnp.zeros((2, 5))
    params, _ = layer.init(jax.random.key(0), x)
    with pytest.raises(fnn.ParamError, match=r"^WeightNorm: expected params \{g: \[3\]\}, got "
                                             r"\{g: float32\[2\]\}"):
        layer.apply({**params, "g": jnp.ones(2)}, {}, x)
    with pytest.raises(fnn.ParamError, match=r"^WeightNorm: expected params with a weight 'v'"):
        layer.apply({"w": params["v"], "b": params["b"]}, {}, x)
    with pytest.raises(fnn.ParamError, match=r"^WeightNorm: expected params with a weight 'w'"):
        fnn.WeightNorm(fnn.LayerNorm()).init(jax.random.key(0), x)
