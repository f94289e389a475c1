"""Conv and ConvTranspose against naive numpy references (loops over output positions, an
explicit scatter for the transposed convolution) computed in float64; the layers get float32
inputs and are compared with tight float32 tolerances. Grouped ConvTranspose and SeparableConv
also against PyTorch. Then the checks of their params against their hyper-parameters, and
their refusal of a ``Seq``."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnn
from helpers import as_tuple, explicit_pads, f32, f64, init_apply, rand, run

TOL = dict(rtol=1e-5, atol=1e-5)


# ============================================================================= numpy references

def conv_ref(x, w, b=None, strides=1, padding="VALID", dilation=1, groups=1):
    """Naive cross-correlation. x: [N, *spatial, C]; w: [*kernel, C // groups, F]; b: [F]."""
    x, w = f64(x), f64(w)
    n = w.ndim - 2
    kernel = w.shape[:n]
    strides, dilation = as_tuple(strides, n), as_tuple(dilation, n)
    eff = [d * (k - 1) + 1 for k, d in zip(kernel, dilation)]
    pads = explicit_pads(padding, x.shape[1:1 + n], eff, strides)
    x = np.pad(x, [(0, 0)] + pads + [(0, 0)])
    out_spatial = [(x.shape[1 + i] - eff[i]) // strides[i] + 1 for i in range(n)]
    cin_g, features = w.shape[-2], w.shape[-1]
    f_g = features // groups
    y = np.zeros((x.shape[0], *out_spatial, features))
    for o in np.ndindex(*out_spatial):
        for k in np.ndindex(*kernel):
            i = tuple(o[a] * strides[a] + k[a] * dilation[a] for a in range(n))
            patch = x[(slice(None),) + i]  # [N, C]
            for g in range(groups):
                y[(slice(None),) + o + (slice(g * f_g, (g + 1) * f_g),)] += (
                    patch[:, g * cin_g:(g + 1) * cin_g] @ w[k][:, g * f_g:(g + 1) * f_g])
    if b is not None:
        y = y + f64(b)
    return y


def conv_transpose_ref(x, w, b=None, strides=1, dilation=1):
    """VALID transposed convolution as a scatter: out[i * s + k * d] += x[i] @ w[k].
    x: [N, *spatial, C]; w: [*kernel, C, F]; the output is
    ``(in - 1) * s + d * (k - 1) + 1`` long on each spatial axis."""
    x, w = f64(x), f64(w)
    n = w.ndim - 2
    kernel = w.shape[:n]
    strides, dilation = as_tuple(strides, n), as_tuple(dilation, n)
    spatial = x.shape[1:1 + n]
    out_spatial = [(spatial[a] - 1) * strides[a] + dilation[a] * (kernel[a] - 1) + 1
                   for a in range(n)]
    y = np.zeros((x.shape[0], *out_spatial, w.shape[-1]))
    for i in np.ndindex(*spatial):
        for k in np.ndindex(*kernel):
            o = tuple(i[a] * strides[a] + k[a] * dilation[a] for a in range(n))
            y[(slice(None),) + o] += x[(slice(None),) + i] @ w[k]
    if b is not None:
        y = y + f64(b)
    return y


# ============================================================================= Conv

CONV_CASES = {
    # id: (input shape [N, *spatial, C], features, kernel_size, Conv keyword arguments)
    "1d_same": ((2, 9, 4), 3, 3, {}),
    "1d_valid": ((2, 9, 4), 3, 3, dict(padding="VALID")),
    "1d_valid_stride2": ((2, 9, 4), 3, 3, dict(padding="VALID", strides=2)),
    "1d_same_stride2": ((2, 10, 4), 3, 4, dict(padding="SAME", strides=2)),
    "1d_same_stride3_even_kernel": ((2, 10, 3), 2, 2, dict(padding="SAME", strides=3)),
    "1d_int_padding": ((2, 9, 4), 3, 3, dict(padding=2)),
    "1d_low_high_padding": ((2, 9, 4), 3, 3, dict(padding=[(2, 0)], strides=2)),
    "1d_dilation": ((2, 11, 4), 3, 3, dict(padding="VALID", dilation=2)),
    "1d_dilation_same": ((2, 11, 4), 3, 3, dict(padding="SAME", dilation=3)),
    "1d_groups": ((2, 9, 4), 6, 3, dict(feature_group_count=2)),
    "1d_depthwise": ((2, 9, 4), 8, 3, dict(feature_group_count=4, padding="VALID")),
    "1d_no_bias": ((2, 9, 4), 3, 3, dict(use_bias=False)),
    "2d_same": ((2, 7, 6, 3), 4, (3, 3), {}),
    "2d_valid": ((2, 7, 6, 3), 4, (3, 2), dict(padding="VALID")),
    "2d_strides": ((2, 7, 6, 3), 4, (3, 3), dict(padding="SAME", strides=(2, 1))),
    "2d_valid_strides2": ((2, 8, 7, 3), 4, (3, 3), dict(padding="VALID", strides=2)),
    "2d_int_padding": ((2, 5, 6, 3), 2, (3, 3), dict(padding=1, strides=2)),
    "2d_low_high_padding": ((2, 5, 6, 3), 2, (3, 2), dict(padding=[(1, 0), (0, 2)])),
    "2d_dilation": ((2, 8, 7, 3), 4, (2, 3), dict(padding="VALID", dilation=(2, 1))),
    "2d_dilation_same_strides": ((2, 8, 7, 3), 4, (3, 3),
                                 dict(padding="SAME", dilation=2, strides=2)),
    "2d_groups": ((2, 6, 5, 6), 9, (3, 3), dict(feature_group_count=3, strides=(1, 2))),
    "2d_depthwise": ((2, 6, 5, 4), 4, (3, 3), dict(feature_group_count=4)),
    "3d_same": ((2, 4, 5, 4, 2), 3, (3, 3, 3), {}),
    "3d_valid_strides": ((2, 5, 4, 5, 2), 3, (2, 3, 2), dict(padding="VALID", strides=(2, 1, 2))),
    "3d_padding_dilation_groups": ((1, 5, 4, 5, 4), 4, (2, 2, 3),
                                   dict(padding=[(1, 1), (0, 1), (2, 0)], dilation=(2, 1, 1),
                                        feature_group_count=2)),
}


@pytest.mark.parametrize("shape,features,kernel_size,kwargs", list(CONV_CASES.values()),
                         ids=list(CONV_CASES))
def test_conv_matches_naive_cross_correlation(shape, features, kernel_size, kwargs):
    layer = fnn.Conv(features, kernel_size, **kwargs)
    x = f32(rand(shape, 1))
    groups = kwargs.get("feature_group_count", 1)
    kernel = as_tuple(kernel_size, 1 if isinstance(kernel_size, int) else len(kernel_size))
    w = rand(kernel + (shape[-1] // groups, features), 2)
    params = {"w": w}
    if kwargs.get("use_bias", True):
        params["b"] = rand((features,), 3)
    y, _, _ = init_apply(layer, x, params)
    expected = conv_ref(x, w, params.get("b"), kwargs.get("strides", 1),
                        kwargs.get("padding", "SAME"), kwargs.get("dilation", 1), groups)
    assert y.shape == expected.shape
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(f64(y), expected, **TOL)


def test_conv_with_its_own_init_params():
    x = f32(rand((2, 6, 5, 3), 4))
    layer = fnn.Conv(4, (3, 3), strides=2)
    params, _ = jax.jit(layer.init)(jax.random.key(7), x)
    assert params["w"].shape == (3, 3, 3, 4) and params["b"].shape == (4,)
    y, _ = run(layer, params, x)
    np.testing.assert_allclose(f64(y), conv_ref(x, params["w"], params["b"], 2, "SAME"), **TOL)


@pytest.mark.parametrize("kernel_size,spatial", [(3, (7,)), ((3, 2), (5, 6)),
                                                 ((2, 2, 2), (3, 4, 3))], ids=["1d", "2d", "3d"])
def test_conv_batch_axes(kernel_size, spatial):
    """No batch axis, one, or two leading batch axes give the same result."""
    layer = fnn.Conv(3, kernel_size, strides=2, padding="SAME")
    x = f32(rand((2, 3) + spatial + (4,), 5))
    _, params, state = init_apply(layer, x)
    flat = x.reshape((6,) + x.shape[2:])
    y_flat, _ = run(layer, params, flat, state)
    y_two, _ = run(layer, params, x, state)
    assert y_two.shape == (2, 3) + y_flat.shape[1:]
    np.testing.assert_allclose(f64(y_two), f64(y_flat).reshape(y_two.shape), **TOL)
    y_single, _ = run(layer, params, x[1, 2], state)
    assert y_single.shape == y_flat.shape[1:]
    np.testing.assert_allclose(f64(y_single), f64(y_flat[5]), **TOL)


# ============================================================================= ConvTranspose

CONV_T_VALID_CASES = {
    # id: (input shape, features, kernel_size, strides, dilation)
    "1d_s1": ((2, 5, 3), 4, 3, 1, 1),
    "1d_s2": ((2, 5, 3), 4, 3, 2, 1),
    "1d_s2_k2": ((2, 5, 3), 4, 2, 2, 1),
    "1d_s2_d2": ((2, 5, 3), 4, 3, 2, 2),
    "2d_s1": ((2, 4, 3, 3), 2, (3, 2), 1, 1),
    "2d_s2": ((2, 4, 3, 3), 2, (3, 3), 2, 1),
    "2d_s21": ((2, 4, 3, 3), 2, (2, 3), (2, 1), (1, 2)),
}


@pytest.mark.parametrize("shape,features,kernel_size,strides,dilation",
                         list(CONV_T_VALID_CASES.values()), ids=list(CONV_T_VALID_CASES))
def test_conv_transpose_valid_matches_scatter(shape, features, kernel_size, strides, dilation):
    layer = fnn.ConvTranspose(features, kernel_size, strides=strides, padding="VALID",
                              dilation=dilation)
    x = f32(rand(shape, 1))
    n = len(shape) - 2
    w = rand(as_tuple(kernel_size, n) + (shape[-1], features), 2)
    b = rand((features,), 3)
    y, _, _ = init_apply(layer, x, {"w": w, "b": b})
    expected = conv_transpose_ref(x, w, b, strides, dilation)
    assert y.shape == expected.shape
    np.testing.assert_allclose(f64(y), expected, **TOL)


@pytest.mark.parametrize("kernel_size,strides,dilation", [(1, 2, 1), (2, 3, 1), (1, 3, 1),
                                                          (2, 4, 2)],
                         ids=["k1_s2", "k2_s3", "k1_s3", "k2_d2_s4"])
def test_conv_transpose_valid_stride_larger_than_kernel(kernel_size, strides, dilation):
    """The docstring's VALID size ``(in - 1) * strides + dilation * (kernel - 1) + 1`` and the
    scatter form hold also when the stride exceeds the (dilated) kernel."""
    layer = fnn.ConvTranspose(2, kernel_size, strides=strides, padding="VALID",
                              dilation=dilation)
    x = f32(rand((1, 3, 2), 1))
    w = rand((kernel_size, 2, 2), 2)
    y, _, _ = init_apply(layer, x, {"w": w, "b": np.zeros(2, np.float32)})
    expected = conv_transpose_ref(x, w, None, strides, dilation)
    assert y.shape == expected.shape, (
        f"VALID ConvTranspose(kernel={kernel_size}, strides={strides}) on length 3: got "
        f"{y.shape[1]}, documented (3 - 1) * {strides} + {dilation} * ({kernel_size} - 1) + 1 = "
        f"{expected.shape[1]}")
    np.testing.assert_allclose(f64(y), expected, **TOL)


@pytest.mark.parametrize("padding,crops", [(1, [(1, 1)]), ([(0, 2)], [(0, 2)]),
                                           ([(2, 1), (1, 0)], [(2, 1), (1, 0)])])
def test_conv_transpose_explicit_padding_crops_the_full_output(padding, crops):
    """An int or (low, high) pairs crop the VALID (full) output, as PyTorch's padding does."""
    n = len(crops)
    shape = (2,) + (4, 3)[:n] + (2,)
    kernel = (3, 2)[:n]
    x = f32(rand(shape, 1))
    w = rand(kernel + (2, 3), 2)
    layer = fnn.ConvTranspose(3, kernel, strides=2, padding=padding, use_bias=False)
    y, _, _ = init_apply(layer, x, {"w": w})
    full = conv_transpose_ref(x, w, None, 2, 1)
    index = (slice(None),) + tuple(slice(lo, full.shape[1 + i] - hi)
                                   for i, (lo, hi) in enumerate(crops)) + (slice(None),)
    np.testing.assert_allclose(f64(y), full[index], **TOL)


@pytest.mark.parametrize("shape,kernel_size,strides", [
    ((2, 5, 3), 3, 1), ((2, 5, 3), 3, 2), ((2, 5, 3), 4, 2), ((2, 5, 3), 1, 2),
    ((2, 4, 3, 3), (3, 3), 2), ((2, 4, 3, 3), (3, 2), (1, 2)),
])
def test_conv_transpose_same_shape(shape, kernel_size, strides):
    n = len(shape) - 2
    layer = fnn.ConvTranspose(5, kernel_size, strides=strides, padding="SAME")
    x = f32(rand(shape, 1))
    y, _, _ = init_apply(layer, x)
    expected = tuple(d * s for d, s in zip(shape[1:-1], as_tuple(strides, n)))
    assert y.shape == (shape[0],) + expected + (5,)


def _conv_vjp_vs_conv_transpose(x_shape, kernel_size, strides, dilation, padding, seed=0):
    """Returns (vjp of Conv w.r.t. its input at cotangent g, ConvTranspose(g)) where the Conv
    kernel is [*k, in, out] and the ConvTranspose kernel the same with in/out swapped."""
    n = len(x_shape) - 2
    c_in, c_out = x_shape[-1], 4
    kernel = as_tuple(kernel_size, n)
    w = rand(kernel + (c_in, c_out), seed + 1)
    conv = fnn.Conv(c_out, kernel_size, strides=strides, padding=padding, dilation=dilation,
                    use_bias=False)
    conv_t = fnn.ConvTranspose(c_in, kernel_size, strides=strides, padding=padding,
                               dilation=dilation, use_bias=False)
    x = f32(rand(x_shape, seed + 2))
    y, vjp = jax.vjp(lambda v: conv.apply({"w": f32(w)}, {}, v)[0], x)
    g = f32(rand(y.shape, seed + 3))
    (dx,) = vjp(g)
    w_t = np.swapaxes(w, -1, -2)  # [*k, out, in]: ConvTranspose maps Conv's outputs to inputs
    y_t, _, _ = init_apply(conv_t, g, {"w": w_t})
    return dx, y_t


@pytest.mark.parametrize("x_shape,kernel_size,strides,dilation", [
    ((2, 9, 3), 3, 1, 1),
    ((2, 9, 3), 3, 2, 1),
    ((2, 10, 3), 4, 2, 1),
    ((2, 11, 3), 3, 2, 2),
    ((2, 9, 3), 3, 3, 1),
    ((2, 7, 9, 2), (3, 3), 2, 1),
    ((2, 7, 9, 2), (3, 2), (2, 3), (1, 2)),
])
def test_conv_transpose_valid_is_vjp_of_conv(x_shape, kernel_size, strides, dilation):
    """(in - keff) is a multiple of the stride, so the VJP covers the whole Conv input."""
    dx, y_t = _conv_vjp_vs_conv_transpose(x_shape, kernel_size, strides, dilation, "VALID")
    assert y_t.shape == dx.shape
    np.testing.assert_allclose(f64(y_t), f64(dx), **TOL)


def test_conv_transpose_valid_is_vjp_of_conv_stride_larger_than_kernel():
    """Conv(kernel 1, stride 2, VALID) maps length 5 to 3; its VJP maps 3 back to 5."""
    dx, y_t = _conv_vjp_vs_conv_transpose((2, 5, 3), 1, 2, 1, "VALID")
    assert y_t.shape == dx.shape
    np.testing.assert_allclose(f64(y_t), f64(dx), **TOL)


@pytest.mark.parametrize("x_shape,kernel_size,strides", [
    ((2, 8, 3), 3, 1), ((2, 8, 3), 3, 2), ((2, 8, 3), 4, 2), ((2, 9, 3), 5, 3),
    ((2, 8, 3), 1, 2), ((2, 6, 8, 2), (3, 4), 2),
])
def test_conv_transpose_same_is_vjp_of_same_conv(x_shape, kernel_size, strides):
    """SAME ConvTranspose on ``in`` positions is the VJP of a SAME Conv on ``in * stride``."""
    dx, y_t = _conv_vjp_vs_conv_transpose(x_shape, kernel_size, strides, 1, "SAME")
    assert y_t.shape == dx.shape
    np.testing.assert_allclose(f64(y_t), f64(dx), **TOL)


def test_conv_transpose_batch_axes():
    layer = fnn.ConvTranspose(3, (2, 3), strides=2, padding="VALID")
    x = f32(rand((2, 3, 4, 3, 2), 5))
    _, params, state = init_apply(layer, x)
    y_two, _ = run(layer, params, x, state)
    y_flat, _ = run(layer, params, x.reshape((6, 4, 3, 2)), state)
    np.testing.assert_allclose(f64(y_two), f64(y_flat).reshape(y_two.shape), **TOL)
    y_single, _ = run(layer, params, x[0, 1], state)
    np.testing.assert_allclose(f64(y_single), f64(y_flat[1]), **TOL)
    np.testing.assert_allclose(f64(y_flat), conv_transpose_ref(x.reshape((6, 4, 3, 2)),
                                                               params["w"], params["b"], 2),
                               **TOL)


# ======================================================================= grouped ConvTranspose

def _grouped_transpose_kernel(w, groups):
    """Conv's kernel [*k, C / groups, F] (C -> F) as the kernel of the ConvTranspose that is
    its transpose (F -> C): each group's block [C / groups, F / groups] swapped, giving
    [*k, F / groups, C]."""
    n = w.ndim - 2
    c_g, features = w.shape[-2], w.shape[-1]
    blocks = w.reshape(w.shape[:n] + (c_g, groups, features // groups))
    return np.swapaxes(blocks, -1, -3).reshape(w.shape[:n] + (features // groups, groups * c_g))


@pytest.mark.parametrize("x_shape,kernel_size,strides,padding,groups", [
    ((2, 9, 4), 3, 2, "VALID", 2),
    ((2, 8, 6), 4, 2, "SAME", 3),
    ((2, 7, 9, 4), (3, 3), 2, "VALID", 4),
    ((2, 6, 8, 6), (3, 2), (2, 1), "SAME", 2),
])
def test_grouped_conv_transpose_is_vjp_of_grouped_conv(x_shape, kernel_size, strides, padding,
                                                       groups):
    n = len(x_shape) - 2
    c_in, c_out = x_shape[-1], 2 * groups
    kernel = as_tuple(kernel_size, n)
    w = rand(kernel + (c_in // groups, c_out), 1)
    conv = fnn.Conv(c_out, kernel_size, strides=strides, padding=padding, use_bias=False,
                    feature_group_count=groups)
    x = f32(rand(x_shape, 2))
    y, vjp = jax.vjp(lambda v: conv.apply({"w": f32(w)}, {}, v)[0], x)
    g = f32(rand(y.shape, 3))
    (dx,) = vjp(g)
    conv_t = fnn.ConvTranspose(c_in, kernel_size, strides=strides, padding=padding,
                               use_bias=False, feature_group_count=groups)
    y_t, _, _ = init_apply(conv_t, g, {"w": _grouped_transpose_kernel(w, groups)})
    assert y_t.shape == dx.shape
    np.testing.assert_allclose(f64(y_t), f64(dx), **TOL)


@pytest.fixture
def torch():
    return pytest.importorskip("torch", reason="torch is the reference (pip install torch)")


def torch_transpose_kernel(weight, groups):
    """torch's ConvTranspose weight [in, out / groups, *k] as fnn's [*k, in / groups, out]."""
    c_in, out_g = weight.shape[:2]
    n = weight.ndim - 2
    w = weight.reshape((groups, c_in // groups, out_g) + weight.shape[2:])
    w = np.transpose(w, tuple(range(3, 3 + n)) + (1, 0, 2))
    return w.reshape(weight.shape[2:] + (c_in // groups, groups * out_g))


@pytest.mark.parametrize("dims,groups,stride,padding,output_padding,dilation", [
    (1, 2, 2, 1, 1, 1), (2, 1, 2, 1, 1, 1), (2, 2, 2, 1, 1, 1), (2, 3, 3, 0, 2, 1),
    (2, 6, 1, 1, 0, 2), (2, 2, (2, 1), (1, 0), (1, 0), 1), (3, 2, 2, 1, 0, 1)])
def test_grouped_conv_transpose_matches_torch(torch, dims, groups, stride, padding,
                                              output_padding, dilation):
    conv = getattr(torch.nn, f"ConvTranspose{dims}d")
    m = conv(12, 6, 3, stride=stride, padding=padding, output_padding=output_padding,
             dilation=dilation, groups=groups)
    pads = as_tuple(padding, dims)
    crops = [(p, p - q) for p, q in zip(pads, as_tuple(output_padding, dims))]
    layer = fnn.ConvTranspose(6, (3,) * dims, strides=stride, dilation=dilation, padding=crops,
                              feature_group_count=groups)
    x = rand((2, 12) + (5,) * dims, 1)  # torch's layout
    xt = torch.from_numpy(x).requires_grad_()
    yt = m(xt)
    g = rand(yt.shape, 2)
    yt.backward(torch.from_numpy(g))
    weight = m.weight.detach().numpy()
    params = {"w": f32(torch_transpose_kernel(weight, groups)), "b": f32(m.bias.detach())}
    x_nhwc = f32(np.moveaxis(x, 1, -1))

    def loss(p, v):
        return jnp.sum(layer.apply(p, {}, v)[0] * f32(np.moveaxis(g, 1, -1)))

    y, _ = run(layer, params, x_nhwc)
    dp, dx = jax.grad(loss, argnums=(0, 1))(params, x_nhwc)
    np.testing.assert_allclose(f64(y), np.moveaxis(yt.detach().numpy(), 1, -1), **TOL)
    np.testing.assert_allclose(f64(dx), np.moveaxis(xt.grad.numpy(), 1, -1), **TOL)
    np.testing.assert_allclose(f64(dp["w"]), torch_transpose_kernel(m.weight.grad.numpy(),
                                                                    groups), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(f64(dp["b"]), m.bias.grad.numpy(), rtol=1e-4, atol=1e-4)


def test_grouped_conv_transpose_params_and_errors():
    layer = fnn.ConvTranspose(6, (3, 3), feature_group_count=3)
    params, _ = layer.init(jax.random.key(0), jnp.zeros((1, 4, 4, 9)))
    assert jax.tree.map(jnp.shape, params) == {"w": (3, 3, 3, 6), "b": (6,)}
    with pytest.raises(ValueError, match=re.escape(
            "ConvTranspose: features (5) must be divisible by feature_group_count (3)")):
        fnn.ConvTranspose(5, (3, 3), feature_group_count=3)
    with pytest.raises(fnn.ShapeError, match=re.escape(
            "ConvTranspose: expected input [..., 2 spatial axes, in_features divisible by "
            "feature_group_count=3], got float32[1, 4, 4, 8]")):
        layer.init(jax.random.key(0), jnp.zeros((1, 4, 4, 8)))
    with pytest.raises(fnn.ShapeError, match=re.escape(
            "ConvTranspose: expected input [..., 2 spatial axes, 9], got float32[1, 4, 4, 6]")):
        layer.apply(params, {}, jnp.zeros((1, 4, 4, 6)))
    with pytest.raises(fnn.ParamError, match=re.escape(
            "ConvTranspose: expected params {w: [3, 3, in_features // groups, 6], b: [6]}, got "
            "{w: float32[3, 3, 3, 2], b: float32[6]}: w is float32[3, 3, 3, 2], expected "
            "[3, 3, in_features // groups, 6]")):
        layer.apply({"w": jnp.zeros((3, 3, 3, 2)), "b": jnp.zeros(6)}, {},
                    jnp.zeros((1, 4, 4, 9)))


# ============================================================================= SeparableConv

SEPARABLE_CASES = {
    # id: (input shape, features, kernel_size, SeparableConv keyword arguments)
    "1d": ((2, 9, 3), 4, 3, {}),
    "2d_multiplier": ((2, 7, 6, 3), 5, (3, 3), dict(depth_multiplier=2)),
    "2d_valid_strides_dilation": ((2, 9, 8, 4), 3, (3, 2),
                                  dict(padding="VALID", strides=2, dilation=(2, 1))),
    "2d_padding_no_bias": ((2, 5, 6, 2), 3, (3, 3), dict(padding=1, use_bias=False,
                                                         depth_multiplier=3)),
    "3d": ((1, 4, 5, 4, 2), 3, (2, 2, 3), dict(strides=(1, 2, 1))),
}


@pytest.mark.parametrize("shape,features,kernel_size,kwargs", list(SEPARABLE_CASES.values()),
                         ids=list(SEPARABLE_CASES))
def test_separable_conv_is_a_depthwise_then_a_pointwise_conv(shape, features, kernel_size,
                                                             kwargs):
    layer = fnn.SeparableConv(features, kernel_size, **kwargs)
    x = f32(rand(shape, 1))
    params, state = layer.init(jax.random.key(0), x)
    assert state == {}
    multiplier = kwargs.get("depth_multiplier", 1)
    mid = shape[-1] * multiplier
    n = len(shape) - 2
    kernel = as_tuple(kernel_size, n)
    expected_shapes = {"depthwise": {"w": kernel + (1, mid)},
                       "pointwise": {"w": (1,) * n + (mid, features)}}
    if kwargs.get("use_bias", True):
        expected_shapes["pointwise"]["b"] = (features,)
    assert jax.tree.map(jnp.shape, params) == expected_shapes
    params = jax.tree.map(lambda p: f32(rand(p.shape, 7)), params)
    y, _ = run(layer, params, x)
    conv_kwargs = {k: v for k, v in kwargs.items() if k in ("strides", "padding", "dilation")}
    depthwise = fnn.Conv(mid, kernel_size, feature_group_count=shape[-1], use_bias=False,
                         **conv_kwargs)
    pointwise = fnn.Conv(features, (1,) * n, use_bias=kwargs.get("use_bias", True))
    h, _ = run(depthwise, params["depthwise"], x)
    expected, _ = run(pointwise, params["pointwise"], h)
    np.testing.assert_allclose(f64(y), f64(expected), **TOL)
    reference = conv_ref(conv_ref(x, params["depthwise"]["w"], None, conv_kwargs.get("strides", 1),
                                  conv_kwargs.get("padding", "SAME"),
                                  conv_kwargs.get("dilation", 1), shape[-1]),
                         params["pointwise"]["w"], params["pointwise"].get("b"))
    np.testing.assert_allclose(f64(y), reference, **TOL)


def test_separable_conv_matches_torch(torch):
    """torch: Conv2d(in, in * m, k, groups=in, bias=False), then Conv2d(in * m, features, 1)."""
    c, m, features = 3, 2, 5
    depthwise = torch.nn.Conv2d(c, c * m, 3, stride=2, padding=1, groups=c, bias=False)
    pointwise = torch.nn.Conv2d(c * m, features, 1)
    x = rand((2, c, 7, 8), 1)
    xt = torch.from_numpy(x).requires_grad_()
    yt = pointwise(depthwise(xt))
    g = rand(yt.shape, 2)
    yt.backward(torch.from_numpy(g))
    layer = fnn.SeparableConv(features, (3, 3), depth_multiplier=m, strides=2, padding=1)
    # torch [out, in / groups, *k] -> fnn [*k, in / groups, out]
    params = {"depthwise": {"w": f32(np.moveaxis(depthwise.weight.detach().numpy(), (0, 1),
                                                 (-1, -2)))},
              "pointwise": {"w": f32(np.moveaxis(pointwise.weight.detach().numpy(), (0, 1),
                                                 (-1, -2))),
                            "b": f32(pointwise.bias.detach())}}
    x_nhwc = f32(np.moveaxis(x, 1, -1))

    def loss(p, v):
        return jnp.sum(layer.apply(p, {}, v)[0] * f32(np.moveaxis(g, 1, -1)))

    y, _ = run(layer, params, x_nhwc)
    dp, dx = jax.grad(loss, argnums=(0, 1))(params, x_nhwc)
    np.testing.assert_allclose(f64(y), np.moveaxis(yt.detach().numpy(), 1, -1), **TOL)
    np.testing.assert_allclose(f64(dx), np.moveaxis(xt.grad.numpy(), 1, -1), **TOL)
    np.testing.assert_allclose(f64(dp["depthwise"]["w"]),
                               np.moveaxis(depthwise.weight.grad.numpy(), (0, 1), (-1, -2)),
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(f64(dp["pointwise"]["b"]), pointwise.bias.grad.numpy(),
                               rtol=1e-4, atol=1e-4)


def test_separable_conv_errors():
    layer = fnn.SeparableConv(4, (3, 3), depth_multiplier=2)
    x = jnp.zeros((1, 5, 5, 3))
    params, _ = layer.init(jax.random.key(0), x)
    with pytest.raises(fnn.ShapeError, match=re.escape(
            "SeparableConv: expected input [..., 2 spatial axes, 3], got float32[1, 5, 5, 2]")):
        layer.apply(params, {}, jnp.zeros((1, 5, 5, 2)))
    with pytest.raises(fnn.ShapeError, match=re.escape(
            "SeparableConv: expected input [..., 2 spatial axes, in_features], got "
            "float32[5, 3]")):
        layer.init(jax.random.key(0), jnp.zeros((5, 3)))
    bad = {"depthwise": params["depthwise"], "pointwise": {"w": jnp.zeros((1, 1, 5, 4)),
                                                           "b": jnp.zeros(4)}}
    with pytest.raises(fnn.ParamError, match=re.escape(
            "SeparableConv: expected params {depthwise: {w: [3, 3, 1, 6]}, pointwise: {w: [1, 1, "
            "6, 4], b: [4]}}, got {depthwise: {w: float32[3, 3, 1, 6]}, pointwise: {w: "
            "float32[1, 1, 5, 4], b: float32[4]}}: pointwise/w is float32[1, 1, 5, 4], expected "
            "[1, 1, 6, 4]")):
        layer.apply(bad, {}, x)
    odd = {"depthwise": {"w": jnp.zeros((3, 3, 1, 5))},
           "pointwise": {"w": jnp.zeros((1, 1, 5, 4)), "b": jnp.zeros(4)}}
    with pytest.raises(fnn.ParamError, match=re.escape(
            "SeparableConv: the depthwise kernel's 5 channels are not in_features * "
            "depth_multiplier=2")):
        layer.apply(odd, {}, x)
    with pytest.raises(ValueError, match=re.escape(
            "SeparableConv: depth_multiplier must be a positive int or 1 of them, got 0")):
        fnn.SeparableConv(4, 3, depth_multiplier=0)
    with pytest.raises(fnn.ShapeError, match=re.escape(
            "Conv at depthwise: expected input [..., H >= 3, W >= 3, features]")):
        fnn.SeparableConv(4, (3, 3), padding="VALID").init(jax.random.key(0),
                                                           jnp.zeros((1, 2, 5, 3)))


# ============================================================================= a Seq is refused

SEQ = fnn.Seq(jnp.zeros((2, 5, 3), jnp.float32), lengths=jnp.array([5, 2], jnp.int32))
SEQ_TEXT = "Seq(x=float32[2, 5, 3], lengths=int32[2])"


@pytest.mark.parametrize("name,layer", [("Conv", fnn.Conv(4, 3)),
                                        ("ConvTranspose", fnn.ConvTranspose(4, 3)),
                                        ("SeparableConv", fnn.SeparableConv(4, 3))])
def test_conv_refuses_a_seq(name, layer):
    """A convolution would mix padded positions into valid ones: a Seq is a ShapeError, at init
    and at apply, naming the layer and showing the Seq."""
    params, _ = jax.eval_shape(layer.init, jax.random.key(0), SEQ.x)
    message = (f"{name}: expected input [..., 1 spatial axes, in_features], got {SEQ_TEXT}")
    with pytest.raises(fnn.ShapeError, match=f"^{re.escape(message)}$"):
        layer.apply(params, {}, SEQ)
    with pytest.raises(fnn.ShapeError, match=f"^{re.escape(message)}$"):
        layer.init(jax.random.key(0), SEQ)


# ============================================================================= params checked

def _expected_message(name, expected, got, detail):
    return re.escape(f"{name}: expected params {expected}, got {got}: {detail}")


CONV_PARAM_CASES = {
    # id: (layer, input shape, params shapes, expected text, detail)
    "kernel_size": (fnn.Conv(4, (3, 3)), (2, 5, 5, 3), {"w": (3, 2, 3, 4), "b": (4,)},
                    "{w: [3, 3, in_features // groups, 4], b: [4]}",
                    "w is float32[3, 2, 3, 4], expected [3, 3, in_features // groups, 4]"),
    "features": (fnn.Conv(5, (3, 3)), (2, 5, 5, 3), {"w": (3, 3, 3, 4), "b": (4,)},
                 "{w: [3, 3, in_features // groups, 5], b: [5]}",
                 "w is float32[3, 3, 3, 4], expected [3, 3, in_features // groups, 5]"),
    "kernel_rank": (fnn.Conv(4, 3), (2, 5, 3), {"w": (3, 3, 3, 4), "b": (4,)},
                    "{w: [3, in_features // groups, 4], b: [4]}",
                    "w is float32[3, 3, 3, 4], expected [3, in_features // groups, 4]"),
    "bias_shape": (fnn.Conv(4, 3), (2, 5, 3), {"w": (3, 3, 4), "b": (3,)},
                   "{w: [3, in_features // groups, 4], b: [4]}", "b is float32[3], expected [4]"),
    "missing_b": (fnn.Conv(4, 3), (2, 5, 3), {"w": (3, 3, 4)},
                  "{w: [3, in_features // groups, 4], b: [4]}", "missing b"),
    "unexpected_b": (fnn.Conv(4, 3, use_bias=False), (2, 5, 3), {"w": (3, 3, 4), "b": (4,)},
                     "{w: [3, in_features // groups, 4]}", "unexpected b"),
    "transpose_kernel": (fnn.ConvTranspose(4, (2, 3)), (2, 5, 5, 3), {"w": (3, 2, 3, 4),
                                                                      "b": (4,)},
                         "{w: [2, 3, in_features, 4], b: [4]}",
                         "w is float32[3, 2, 3, 4], expected [2, 3, in_features, 4]"),
    "transpose_features": (fnn.ConvTranspose(4, 2), (2, 5, 3), {"w": (2, 3, 5), "b": (5,)},
                           "{w: [2, in_features, 4], b: [4]}",
                           "w is float32[2, 3, 5], expected [2, in_features, 4]"),
}


@pytest.mark.parametrize("layer,shape,shapes,expected,detail", list(CONV_PARAM_CASES.values()),
                         ids=list(CONV_PARAM_CASES))
def test_conv_params_checked_against_hyper_parameters(layer, shape, shapes, expected, detail):
    params = {k: jnp.zeros(s, jnp.float32) for k, s in shapes.items()}
    got = "{" + ", ".join(f"{k}: float32[{', '.join(map(str, s))}]"
                          for k, s in shapes.items()) + "}"
    with pytest.raises(fnn.ParamError,
                       match=f"^{_expected_message(layer.name, expected, got, detail)}$"):
        layer.apply(params, {}, jnp.zeros(shape, jnp.float32))


def test_conv_input_channels_blamed_on_the_input():
    """Params that fit the layer but not the input: a ShapeError about the input (with groups,
    the channels the kernel takes times feature_group_count)."""
    layer = fnn.Conv(4, (3, 3), feature_group_count=2)
    params = {"w": jnp.zeros((3, 3, 2, 4), jnp.float32), "b": jnp.zeros(4, jnp.float32)}
    with pytest.raises(fnn.ShapeError, match=re.escape(
            "Conv: expected input [..., 2 spatial axes, 4], got float32[2, 5, 5, 3]")):
        layer.apply(params, {}, jnp.zeros((2, 5, 5, 3), jnp.float32))


def test_conv_param_error_names_its_path():
    model = fnn.serial(fnn.Conv(4, 3), fnn.Relu(), fnn.Conv(2, 3))
    x = jnp.zeros((2, 6, 3), jnp.float32)
    params = {"0": {"w": jnp.zeros((3, 3, 4), jnp.float32), "b": jnp.zeros(4, jnp.float32)},
              "2": {"w": jnp.zeros((2, 4, 2), jnp.float32), "b": jnp.zeros(2, jnp.float32)}}
    with pytest.raises(fnn.ParamError, match=re.escape(
            "Conv at 2: expected params {w: [3, in_features // groups, 2], b: [2]}, got "
            "{w: float32[2, 4, 2], b: float32[2]}: w is float32[2, 4, 2], expected "
            "[3, in_features // groups, 2]")):
        model.apply(params, {}, x)


@pytest.mark.parametrize("layer, x_shape, message", [
    (fnn.Conv(3, (5, 5), padding="VALID"), (2, 3, 8, 1),
     r"^Conv: expected input \[\.\.\., H >= 5, W >= 5, features\] \(the smallest that the kernel "
     r"5x5 with padding 'VALID' takes: a smaller input gives an empty output\), got "
     r"float32\[2, 3, 8, 1\]$"),
    (fnn.Conv(3, (3, 3), padding="VALID", dilation=2), (1, 4, 4, 1), r"H >= 5, W >= 5"),
    (fnn.Conv(3, 4, padding=1), (2, 1, 3), r"\[\.\.\., L >= 2, features\]"),
    (fnn.MaxPool((3, 3)), (2, 2, 8, 1), r"^MaxPool: expected input \[\.\.\., H >= 3, W >= 3"),
    (fnn.AvgPool((2, 2, 2)), (1, 4, 1, 4, 2), r"^AvgPool: .*D >= 2, H >= 2, W >= 2"),
])
def test_an_empty_output_is_an_error_naming_the_smallest_input(layer, x_shape, message):
    x = jnp.zeros(x_shape)
    with pytest.raises(fnn.ShapeError, match=message):
        layer.init(jax.random.key(0), x)
    with pytest.raises(fnn.ShapeError, match=message):
        layer.apply(make_ok_params(layer, x_shape), {}, x)


def make_ok_params(layer, x_shape):
    """Params for ``layer`` from an input large enough to give an output."""
    big = jnp.zeros(x_shape[:1] + tuple(16 for _ in x_shape[1:-1]) + x_shape[-1:])
    return layer.init(jax.random.key(0), big)[0]


def test_a_lenet_given_images_without_a_channel_axis_says_where_they_vanish():
    # [2, 28, 28] read as one image 2 x 28 with 28 channels: the second pool would be empty
    with pytest.raises(fnn.ShapeError, match=r"^MaxPool at pool2: expected input \[\.\.\., "
                                             r"H >= 2, W >= 2, features\] .*got float32\[1, 14, "
                                             r"64\]$"):
        fnn.models.LeNet().init(jax.random.key(0), jnp.zeros((2, 28, 28)))
