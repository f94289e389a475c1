"""Numerical checks of the layers against straightforward numpy reference implementations.

Every reference below is written independently of fnn (naive loops over output positions, NaN
padding for pooling, explicit scatter for transposed convolutions) and computes in float64; the
layers get float32 inputs and are compared with tight float32 tolerances.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnn

TOL = dict(rtol=1e-5, atol=1e-5)


# ============================================================================= helpers

def rand(shape, seed=0, low=None):
    """Standard-normal float32 data (or uniform in [low, low + 1) when ``low`` is given)."""
    rng = np.random.default_rng(seed)
    if low is not None:
        return (rng.random(shape) + low).astype(np.float32)
    return rng.standard_normal(shape).astype(np.float32)


def f32(a):
    return jnp.asarray(np.asarray(a, np.float32))


def f64(a):
    return np.asarray(a, np.float64)


def as_tuple(v, n):
    return (v,) * n if isinstance(v, int) else tuple(v)


def explicit_pads(padding, spatial, window, strides):
    """``padding`` ("SAME", "VALID", int, pairs) as one (low, high) pair per spatial axis, with
    the XLA/TensorFlow convention for SAME (the odd extra pad goes to the high side)."""
    n = len(spatial)
    if padding == "VALID":
        return [(0, 0)] * n
    if padding == "SAME":
        pads = []
        for size, win, s in zip(spatial, window, strides):
            out = -(-size // s)
            total = max((out - 1) * s + win - size, 0)
            pads.append((total // 2, total - total // 2))
        return pads
    if isinstance(padding, int):
        return [(padding, padding)] * n
    return [tuple(p) for p in padding]


@functools.lru_cache(maxsize=None)
def _jitted_apply(layer, train):
    return jax.jit(lambda p, s, v, k: layer.apply(p, s, v, key=k, train=train))


def run(layer, params, state, x, *, key=None, train=False):
    """``layer.apply`` under ``jax.jit``: one compilation per layer and input shape instead of
    one per operation, which keeps the file fast on a small CPU."""
    return _jitted_apply(layer, train)(params, state, x, key)


def init_apply(layer, x, params=None, **kwargs):
    """Applies ``layer`` to ``x`` with ``params`` (numpy arrays) in place of its initial ones.

    ``init`` is only traced (``jax.eval_shape``): the given params must have exactly the names
    and shapes it would create. Without ``params``, every parameter is drawn from numpy.
    """
    spec, state = jax.eval_shape(layer.init, jax.random.key(0), x)
    if params is None:
        params = {name: rand(leaf.shape, 100 + i) for i, (name, leaf) in enumerate(spec.items())}
    assert set(params) == set(spec), (set(params), set(spec))
    for name, value in params.items():
        assert spec[name].shape == np.shape(value), (name, spec[name].shape, np.shape(value))
    params = {name: f32(value) for name, value in params.items()}
    state = jax.tree.map(lambda leaf: jnp.zeros(leaf.shape, leaf.dtype), state)
    y, state = run(layer, params, state, x, **kwargs)
    return y, params, state


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


def pool_ref(x, window, strides, padding, kind, count_include_pad=True):
    """Naive pooling. x: [N, *spatial, C]. Padded positions are NaN: they never win a max, and
    they count in an average only with ``count_include_pad``."""
    x = f64(x)
    n = len(window)
    strides = window if strides is None else as_tuple(strides, n)
    pads = explicit_pads(padding, x.shape[1:1 + n], window, strides)
    x = np.pad(x, [(0, 0)] + pads + [(0, 0)], constant_values=np.nan)
    out_spatial = [(x.shape[1 + a] - window[a]) // strides[a] + 1 for a in range(n)]
    y = np.zeros((x.shape[0], *out_spatial, x.shape[-1]))
    for o in np.ndindex(*out_spatial):
        sl = tuple(slice(o[a] * strides[a], o[a] * strides[a] + window[a]) for a in range(n))
        patch = x[(slice(None),) + sl].reshape(x.shape[0], -1, x.shape[-1])
        if kind == "max":
            y[(slice(None),) + o] = np.nanmax(patch, axis=1)
        else:
            count = math.prod(window) if count_include_pad else np.sum(~np.isnan(patch), axis=1)
            y[(slice(None),) + o] = np.nansum(patch, axis=1) / count
    return y


def normalize_ref(x, mean, var, eps, scale=None, bias=None):
    y = (f64(x) - mean) / np.sqrt(var + eps)
    if scale is not None:
        y = y * f64(scale)
    if bias is not None:
        y = y + f64(bias)
    return y


def group_norm_ref(x, num_groups, start, scale, bias, eps):
    """Loops over every leading index and group; normalises that block of spatial positions and
    channels with its own mean and biased variance."""
    x = f64(x)
    c_g = x.shape[-1] // num_groups
    y = np.empty_like(x)
    for lead in np.ndindex(*x.shape[:start]):
        for g in range(num_groups):
            idx = lead + (Ellipsis, slice(g * c_g, (g + 1) * c_g))
            block = x[idx]
            y[idx] = (block - block.mean()) / np.sqrt(block.var() + eps)
    return y * f64(scale) + f64(bias)


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
    params, _ = layer.init(jax.random.key(7), x)
    assert params["w"].shape == (3, 3, 3, 4) and params["b"].shape == (4,)
    y, _ = run(layer, params, {}, x)
    np.testing.assert_allclose(f64(y), conv_ref(x, params["w"], params["b"], 2, "SAME"), **TOL)


@pytest.mark.parametrize("kernel_size,spatial", [(3, (7,)), ((3, 2), (5, 6)),
                                                 ((2, 2, 2), (3, 4, 3))], ids=["1d", "2d", "3d"])
def test_conv_batch_axes(kernel_size, spatial):
    """No batch axis, one, or two leading batch axes give the same result."""
    layer = fnn.Conv(3, kernel_size, strides=2, padding="SAME")
    x = f32(rand((2, 3) + spatial + (4,), 5))
    _, params, state = init_apply(layer, x)
    flat = x.reshape((6,) + x.shape[2:])
    y_flat, _ = run(layer, params, state, flat)
    y_two, _ = run(layer, params, state, x)
    assert y_two.shape == (2, 3) + y_flat.shape[1:]
    np.testing.assert_allclose(f64(y_two), f64(y_flat).reshape(y_two.shape), **TOL)
    y_single, _ = run(layer, params, state, x[1, 2])
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
    y_two, _ = run(layer, params, state, x)
    y_flat, _ = run(layer, params, state, x.reshape((6, 4, 3, 2)))
    np.testing.assert_allclose(f64(y_two), f64(y_flat).reshape(y_two.shape), **TOL)
    y_single, _ = run(layer, params, state, x[0, 1])
    np.testing.assert_allclose(f64(y_single), f64(y_flat[1]), **TOL)
    np.testing.assert_allclose(f64(y_flat), conv_transpose_ref(x.reshape((6, 4, 3, 2)),
                                                               params["w"], params["b"], 2),
                               **TOL)


# ============================================================================= pooling

POOL_CASES = {
    # id: (input shape, window, strides, padding)
    "1d_default": ((2, 9, 3), (3,), None, "VALID"),
    "1d_stride1": ((2, 9, 3), (3,), 1, "VALID"),
    "1d_overlap": ((2, 10, 3), (3,), 2, "VALID"),
    "1d_same": ((2, 10, 3), (3,), 2, "SAME"),
    "1d_same_default_strides": ((2, 10, 3), (4,), None, "SAME"),
    "1d_int_padding": ((2, 9, 3), (3,), 2, 1),
    "2d_default": ((2, 6, 7, 3), (2, 2), None, "VALID"),
    "2d_strides": ((2, 7, 7, 3), (3, 2), (2, 1), "VALID"),
    "2d_same": ((2, 7, 6, 3), (3, 3), 2, "SAME"),
    "2d_same_stride1": ((2, 5, 6, 3), (3, 2), 1, "SAME"),
    "2d_low_high_padding": ((2, 6, 5, 3), (3, 2), (2, 2), [(1, 2), (0, 1)]),
    "3d_same": ((2, 5, 4, 5, 2), (2, 3, 2), (2, 1, 2), "SAME"),
}


@pytest.mark.parametrize("shape,window,strides,padding", list(POOL_CASES.values()),
                         ids=list(POOL_CASES))
def test_max_pool(shape, window, strides, padding):
    x = f32(rand(shape, 1))
    y, _, _ = init_apply(fnn.MaxPool(window, strides, padding), x)
    expected = pool_ref(x, window, strides, padding, "max")
    assert y.shape == expected.shape
    np.testing.assert_allclose(f64(y), expected, **TOL)


@pytest.mark.parametrize("count_include_pad", [True, False])
@pytest.mark.parametrize("shape,window,strides,padding", list(POOL_CASES.values()),
                         ids=list(POOL_CASES))
def test_avg_pool(shape, window, strides, padding, count_include_pad):
    x = f32(rand(shape, 1))
    layer = fnn.AvgPool(window, strides, padding, count_include_pad=count_include_pad)
    y, _, _ = init_apply(layer, x)
    expected = pool_ref(x, window, strides, padding, "avg", count_include_pad)
    assert y.shape == expected.shape
    np.testing.assert_allclose(f64(y), expected, **TOL)


def test_avg_pool_count_include_pad_differs_at_the_border():
    """On ones, with padding: count_include_pad=False gives exactly 1 everywhere; True gives
    (real elements) / (window size) at the border."""
    x = jnp.ones((1, 4, 1), jnp.float32)
    y_incl, _, _ = init_apply(fnn.AvgPool(3, 1, 1, count_include_pad=True), x)
    y_excl, _, _ = init_apply(fnn.AvgPool(3, 1, 1, count_include_pad=False), x)
    np.testing.assert_allclose(f64(y_incl)[0, :, 0], [2 / 3, 1, 1, 2 / 3], **TOL)
    np.testing.assert_allclose(f64(y_excl)[0, :, 0], [1, 1, 1, 1], **TOL)


def test_max_pool_padding_never_wins():
    x = f32(rand((2, 5, 5, 2), 1, low=-5.0))  # all negative
    y, _, _ = init_apply(fnn.MaxPool((3, 3), 2, "SAME"), x)
    assert np.all(f64(y) < 0)
    np.testing.assert_allclose(f64(y), pool_ref(x, (3, 3), 2, "SAME", "max"), **TOL)


@pytest.mark.parametrize("layer", [fnn.MaxPool((2, 3), (1, 2), "SAME"),
                                   fnn.AvgPool((2, 3), (1, 2), "SAME", count_include_pad=False)],
                         ids=["max", "avg"])
def test_pool_batch_axes(layer):
    x = f32(rand((2, 3, 5, 6, 2), 1))
    y_two, _, _ = init_apply(layer, x)
    y_flat, _, _ = init_apply(layer, x.reshape((6, 5, 6, 2)))
    y_single, _, _ = init_apply(layer, x[1, 0])
    np.testing.assert_allclose(f64(y_two), f64(y_flat).reshape(y_two.shape), **TOL)
    np.testing.assert_allclose(f64(y_single), f64(y_flat[3]), **TOL)


@pytest.mark.parametrize("start_axis,axes", [(1, (1, 2)), (-3, (1, 2)), (2, (2,)), (-2, (2,)),
                                             (0, (0, 1, 2))])
@pytest.mark.parametrize("kind", ["avg", "max"])
def test_global_pool(kind, start_axis, axes):
    x = f32(rand((2, 3, 4, 5), 1))
    layer = fnn.GlobalAvgPool(start_axis) if kind == "avg" else fnn.GlobalMaxPool(start_axis)
    y, _, _ = init_apply(layer, x)
    expected = f64(x).mean(axis=axes) if kind == "avg" else f64(x).max(axis=axes)
    assert y.shape == expected.shape
    np.testing.assert_allclose(f64(y), expected, **TOL)


# ============================================================================= BatchNorm

def _bn_params_state(features, seed):
    params = {"scale": rand((features,), seed, low=0.5), "bias": rand((features,), seed + 1)}
    state = {"mean": f32(rand((features,), seed + 2)),
             "var": f32(rand((features,), seed + 3, low=0.5))}
    return params, state


@pytest.mark.parametrize("shape", [(8, 5), (4, 3, 5), (2, 3, 4, 5)])
@pytest.mark.parametrize("momentum", [0.9, 0.99, 0.0])
def test_batch_norm_train(shape, momentum):
    x = f32(rand(shape, 1) * 3 + 1)
    layer = fnn.BatchNorm(momentum=momentum, epsilon=1e-3)
    params, state = _bn_params_state(shape[-1], 10)
    y, new_state = run(layer, {k: f32(v) for k, v in params.items()}, state, x, train=True)
    axes = tuple(range(len(shape) - 1))
    mean, var = f64(x).mean(axes), f64(x).var(axes)  # biased variance
    np.testing.assert_allclose(f64(y), normalize_ref(x, mean, var, 1e-3, params["scale"],
                                                     params["bias"]), **TOL)
    assert new_state["mean"].dtype == jnp.float32 and new_state["var"].dtype == jnp.float32
    np.testing.assert_allclose(f64(new_state["mean"]),
                               momentum * f64(state["mean"]) + (1 - momentum) * mean, **TOL)
    np.testing.assert_allclose(f64(new_state["var"]),
                               momentum * f64(state["var"]) + (1 - momentum) * var, **TOL)


def test_batch_norm_eval_uses_running_statistics():
    x = f32(rand((4, 3, 5), 1) * 2)
    layer = fnn.BatchNorm()
    params, state = _bn_params_state(5, 20)
    y, new_state = run(layer, {k: f32(v) for k, v in params.items()}, state, x, train=False)
    np.testing.assert_allclose(
        f64(y), normalize_ref(x, f64(state["mean"]), f64(state["var"]), 1e-5, params["scale"],
                              params["bias"]), **TOL)
    np.testing.assert_array_equal(np.asarray(new_state["mean"]), np.asarray(state["mean"]))
    np.testing.assert_array_equal(np.asarray(new_state["var"]), np.asarray(state["var"]))


def test_batch_norm_init_state_and_defaults():
    x = f32(rand((6, 4), 1) * 2 + 3)
    layer = fnn.BatchNorm()
    params, state = layer.init(jax.random.key(0), x)
    np.testing.assert_array_equal(np.asarray(params["scale"]), np.ones(4))
    np.testing.assert_array_equal(np.asarray(params["bias"]), np.zeros(4))
    np.testing.assert_array_equal(np.asarray(state["mean"]), np.zeros(4))
    np.testing.assert_array_equal(np.asarray(state["var"]), np.ones(4))
    y, _ = run(layer, params, state, x, train=True)
    np.testing.assert_allclose(f64(y), normalize_ref(x, f64(x).mean(0), f64(x).var(0), 1e-5),
                               **TOL)


def test_batch_norm_running_statistics_accumulate():
    layer = fnn.BatchNorm(momentum=0.8)
    batches = [f32(rand((6, 2, 3), seed) * (seed + 1) + seed) for seed in range(4)]
    params, state = layer.init(jax.random.key(0), batches[0])
    mean_ref, var_ref = np.zeros(3), np.ones(3)
    for x in batches:
        _, state = run(layer, params, state, x, train=True)
        mean_ref = 0.8 * mean_ref + 0.2 * f64(x).mean((0, 1))
        var_ref = 0.8 * var_ref + 0.2 * f64(x).var((0, 1))
        np.testing.assert_allclose(f64(state["mean"]), mean_ref, **TOL)
        np.testing.assert_allclose(f64(state["var"]), var_ref, **TOL)
    x = batches[0]
    y, after = run(layer, params, state, x, train=False)
    np.testing.assert_allclose(f64(y), normalize_ref(x, mean_ref, var_ref, 1e-5), **TOL)
    np.testing.assert_array_equal(np.asarray(after["mean"]), np.asarray(state["mean"]))


def test_batch_norm_without_scale_and_bias():
    x = f32(rand((5, 4), 1))
    layer = fnn.BatchNorm(use_scale=False, use_bias=False)
    params, state = layer.init(jax.random.key(0), x)
    assert params == {}
    y, _ = run(layer, params, state, x, train=True)
    np.testing.assert_allclose(f64(y), normalize_ref(x, f64(x).mean(0), f64(x).var(0), 1e-5),
                               **TOL)


# ==================================================================== LayerNorm, RMSNorm, GroupNorm

@pytest.mark.parametrize("use_scale,use_bias", [(True, True), (True, False), (False, True),
                                                (False, False)])
def test_layer_norm(use_scale, use_bias):
    x = f32(rand((3, 4, 6), 1) * 2 + 1)
    scale, bias = rand((6,), 2, low=0.5), rand((6,), 3)
    params = {}
    if use_scale:
        params["scale"] = scale
    if use_bias:
        params["bias"] = bias
    y, _, _ = init_apply(fnn.LayerNorm(use_scale=use_scale, use_bias=use_bias), x, params)
    xd = f64(x)
    expected = normalize_ref(xd, xd.mean(-1, keepdims=True), xd.var(-1, keepdims=True), 1e-5,
                             params.get("scale"), params.get("bias"))
    np.testing.assert_allclose(f64(y), expected, **TOL)


def test_layer_norm_epsilon_and_no_batch_axis():
    x = f32(rand((5,), 1) * 0.01)  # small variance: epsilon matters
    y, _, _ = init_apply(fnn.LayerNorm(epsilon=1e-3), x, {"scale": rand((5,), 2),
                                                          "bias": rand((5,), 3)})
    xd = f64(x)
    expected = normalize_ref(xd, xd.mean(), xd.var(), 1e-3, rand((5,), 2), rand((5,), 3))
    np.testing.assert_allclose(f64(y), expected, **TOL)


@pytest.mark.parametrize("shape", [(6,), (3, 6), (2, 3, 6)])
@pytest.mark.parametrize("epsilon", [1e-6, 1e-1])
def test_rms_norm(shape, epsilon):
    x = f32(rand(shape, 1) + 0.5)
    scale = rand((6,), 2, low=0.5)
    y, _, _ = init_apply(fnn.RMSNorm(epsilon=epsilon), x, {"scale": scale})
    xd = f64(x)
    expected = xd / np.sqrt(np.mean(xd ** 2, -1, keepdims=True) + epsilon) * f64(scale)
    np.testing.assert_allclose(f64(y), expected, **TOL)


def test_rms_norm_without_scale():
    x = f32(rand((3, 4), 1))
    y, _, _ = init_apply(fnn.RMSNorm(use_scale=False), x, {})
    xd = f64(x)
    np.testing.assert_allclose(f64(y), xd / np.sqrt(np.mean(xd ** 2, -1, keepdims=True) + 1e-6),
                               **TOL)


@pytest.mark.parametrize("shape,num_groups,start_axis", [
    ((2, 4, 5, 6), 2, -3),
    ((2, 4, 5, 6), 3, 1),
    ((2, 4, 5, 6), 1, 1),    # one group: layer norm over H, W, C
    ((2, 4, 5, 6), 6, -3),   # one channel per group: instance norm
    ((2, 3, 4, 6), 2, 2),    # two leading axes, one spatial axis
    ((2, 3, 4, 6), 3, -2),
    ((3, 8), 4, 1),          # no spatial axes
    ((5, 6), 2, -1),
    ((4, 5, 6), 3, 0),       # a single example without a batch axis
])
def test_group_norm(shape, num_groups, start_axis):
    x = f32(rand(shape, 1) * 2 + 1)
    c = shape[-1]
    scale, bias = rand((c,), 2, low=0.5), rand((c,), 3)
    layer = fnn.GroupNorm(num_groups, start_axis=start_axis, epsilon=1e-3)
    y, _, _ = init_apply(layer, x, {"scale": scale, "bias": bias})
    start = start_axis + len(shape) if start_axis < 0 else start_axis
    expected = group_norm_ref(x, num_groups, start, scale, bias, 1e-3)
    np.testing.assert_allclose(f64(y), expected, **TOL)


def test_group_norm_negative_start_axis_matches_vmap():
    x = f32(rand((2, 3, 4, 5, 6), 1))
    params = {"scale": f32(rand((6,), 2, low=0.5)), "bias": f32(rand((6,), 3))}
    layer = fnn.GroupNorm(3, start_axis=-3)
    y, _ = run(layer, params, {}, x)
    y_vmap = jax.jit(jax.vmap(jax.vmap(lambda v: layer.apply(params, {}, v)[0])))(x)
    np.testing.assert_allclose(f64(y), f64(y_vmap), **TOL)
    expected = group_norm_ref(x, 3, 2, params["scale"], params["bias"], 1e-5)
    np.testing.assert_allclose(f64(y), expected, **TOL)


# ============================================================================= Dropout

@pytest.mark.parametrize("rate", [0.1, 0.5, 0.75])
def test_dropout_rate_and_scaling(rate):
    n = 1_000_000
    x = jnp.ones((1000, 1000), jnp.float32)
    y, _ = fnn.Dropout(rate).apply({}, {}, x, key=jax.random.key(3), train=True)
    y = np.asarray(y)
    assert y.dtype == np.float32 and y.shape == x.shape
    zero = y == 0
    # the fraction of zeros is binomial: five standard deviations
    bound = 5 * math.sqrt(rate * (1 - rate) / n)
    assert abs(zero.mean() - rate) < bound, (zero.mean(), rate, bound)
    np.testing.assert_allclose(y[~zero], 1 / (1 - rate), rtol=1e-6)


def test_dropout_keeps_values_scaled():
    x = f32(rand((50, 40), 1))
    y, _ = fnn.Dropout(0.3).apply({}, {}, x, key=jax.random.key(1), train=True)
    kept = np.asarray(y) != 0
    assert 0 < kept.mean() < 1
    np.testing.assert_allclose(f64(y)[kept], f64(x)[kept] / 0.7, rtol=1e-6)


def test_dropout_eval_is_identity():
    x = f32(rand((4, 5), 1))
    for key in (None, jax.random.key(0)):
        y, state = fnn.Dropout(0.5).apply({}, {}, x, key=key, train=False)
        np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
        assert state == {}


def test_dropout_rate_zero_and_one():
    x = f32(rand((4, 5), 1))
    y0, _ = fnn.Dropout(0.0).apply({}, {}, x, key=jax.random.key(0), train=True)
    np.testing.assert_array_equal(np.asarray(y0), np.asarray(x))
    y1, _ = fnn.Dropout(1.0).apply({}, {}, x, key=jax.random.key(0), train=True)
    assert y1.dtype == x.dtype and y1.shape == x.shape
    np.testing.assert_array_equal(np.asarray(y1), np.zeros((4, 5)))
    y_int_rate, _ = fnn.Dropout(1).apply({}, {}, x, key=jax.random.key(0), train=True)
    np.testing.assert_array_equal(np.asarray(y_int_rate), np.zeros((4, 5)))


def test_dropout_same_key_same_mask():
    x = jnp.ones((64, 64), jnp.float32)
    layer = fnn.Dropout(0.5)
    a, _ = layer.apply({}, {}, x, key=jax.random.key(5), train=True)
    b, _ = layer.apply({}, {}, x, key=jax.random.key(5), train=True)
    c, _ = layer.apply({}, {}, x, key=jax.random.key(6), train=True)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    # the same key under jit gives the same mask too
    d, _ = jax.jit(lambda k: layer.apply({}, {}, x, key=k, train=True))(jax.random.key(5))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(d))


# =========================================================================== Dense, Embedding, tied

@pytest.mark.parametrize("shape", [(5,), (3, 5), (2, 3, 5)])
@pytest.mark.parametrize("use_bias", [True, False])
def test_dense(shape, use_bias):
    x = f32(rand(shape, 1))
    params = {"w": rand((5, 4), 2)}
    if use_bias:
        params["b"] = rand((4,), 3)
    y, _, _ = init_apply(fnn.Dense(4, use_bias=use_bias), x, params)
    expected = f64(x) @ f64(params["w"]) + (f64(params["b"]) if use_bias else 0.0)
    assert y.shape == shape[:-1] + (4,)
    np.testing.assert_allclose(f64(y), expected, **TOL)


@pytest.mark.parametrize("ids", [np.array(3), np.array([0, 9, 3, 3]),
                                 np.array([[1, 2, 3], [9, 0, 4]])], ids=["0d", "1d", "2d"])
def test_embedding_lookup(ids):
    table = rand((10, 4), 1)
    ids_j = jnp.asarray(ids, jnp.int32)
    y, _, _ = init_apply(fnn.Embedding(10, 4), ids_j, {"table": table})
    assert y.shape == ids.shape + (4,) and y.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(y), table[ids])


@pytest.mark.parametrize("shape", [(4,), (2, 4), (2, 3, 4)])
def test_attend(shape):
    table = rand((7, 4), 1)
    h = f32(rand(shape, 2))
    logits = fnn.attend({"table": f32(table)}, h)
    assert logits.shape == shape[:-1] + (7,)
    np.testing.assert_allclose(f64(logits), f64(h) @ f64(table).T, **TOL)


def test_tied():
    model = fnn.tied(fnn.Embedding(7, 4), fnn.Dense(4))
    ids = jnp.asarray([[0, 6, 2], [3, 3, 1]], jnp.int32)
    spec, state = jax.eval_shape(model.init, jax.random.key(0), ids)
    assert jax.tree.map(lambda a: a.shape, spec) == {
        "embedding": {"table": (7, 4)}, "body": {"w": (4, 4), "b": (4,)}}
    table, w, b = rand((7, 4), 1), rand((4, 4), 2), rand((4,), 3)
    params = {"embedding": {"table": f32(table)}, "body": {"w": f32(w), "b": f32(b)}}
    logits, _ = run(model, params, state, ids)
    h = f64(table)[np.asarray(ids)] @ f64(w) + f64(b)
    np.testing.assert_allclose(f64(logits), h @ f64(table).T, **TOL)


# ============================================================================= Flatten, Reshape

@pytest.mark.parametrize("start_axis,expected", [(0, (120,)), (1, (2, 60)), (2, (2, 3, 20)),
                                                 (3, (2, 3, 4, 5)), (-1, (2, 3, 4, 5)),
                                                 (-2, (2, 3, 20)), (-3, (2, 60)),
                                                 (-4, (120,))])
def test_flatten(start_axis, expected):
    x = np.arange(120, dtype=np.float32).reshape(2, 3, 4, 5)
    y, _, _ = init_apply(fnn.Flatten(start_axis), jnp.asarray(x))
    assert y.shape == expected
    np.testing.assert_array_equal(np.asarray(y), x.reshape(expected))


@pytest.mark.parametrize("shape,start_axis,expected", [
    ((60,), 1, (2, 60)), ((-1,), 1, (2, 60)), ((6, 10), 1, (2, 6, 10)),
    ((5, -1), 2, (2, 3, 5, 4)), ((5, 4), -2, (2, 3, 5, 4)), ((2, -1), -3, (2, 2, 30)),
    ((10, 12), 0, (10, 12)), ((-1, 2, 3), -4, (20, 2, 3)),
])
def test_reshape(shape, start_axis, expected):
    x = np.arange(120, dtype=np.float32).reshape(2, 3, 4, 5)
    y, _, _ = init_apply(fnn.Reshape(shape, start_axis), jnp.asarray(x))
    assert y.shape == expected
    np.testing.assert_array_equal(np.asarray(y), x.reshape(expected))


def test_flatten_negative_start_axis_with_any_batch_axes():
    layer = fnn.Flatten(-3)
    for lead in [(), (2,), (2, 3)]:
        x = np.arange(math.prod(lead) * 24, dtype=np.float32).reshape(lead + (2, 3, 4))
        y, _, _ = init_apply(layer, jnp.asarray(x))
        np.testing.assert_array_equal(np.asarray(y), x.reshape(lead + (24,)))
