"""Upsample, PixelShuffle and PixelUnshuffle against PyTorch on the CPU (float32, NCHW moved
to NHWC): values, gradients with respect to the input, shapes, and the errors."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnn
from helpers import f32, f64, rand, run

TOL = dict(rtol=1e-6, atol=1e-6)


@pytest.fixture
def torch():
    return pytest.importorskip("torch", reason="torch is the reference (pip install torch)")


def nchw(x):
    """fnn [N, *spatial, C] -> torch [N, C, *spatial] (numpy)."""
    return np.moveaxis(np.asarray(x), -1, 1)


def nhwc(t):
    return np.moveaxis(t.detach().numpy(), 1, -1)


def against_torch(torch, module, layer, x, seed=2):
    """``(y, expected, dx, expected_dx)``: the outputs of ``layer`` and of the torch ``module``
    on ``x`` (fnn's layout), and their gradients of ``sum(out * g)`` with respect to ``x``
    for a random ``g``, all in fnn's layout."""
    xt = torch.from_numpy(nchw(x).copy()).requires_grad_()
    yt = module(xt)
    g = rand(nhwc(yt).shape, seed)
    yt.backward(torch.from_numpy(nchw(g).copy()))
    y, vjp = jax.vjp(lambda v: layer.apply({}, {}, v)[0], f32(x))
    return f64(y), nhwc(yt), f64(vjp(f32(g))[0]), nhwc(xt.grad)


# ============================================================================= Upsample

TORCH_LINEAR = {1: "linear", 2: "bilinear", 3: "trilinear"}

UPSAMPLE_CASES = {
    # id: (spatial size, Upsample keyword arguments, per-axis arguments)
    "1d_scale2": ((5,), dict(scale_factor=(2,))),
    "1d_size7": ((5,), dict(size=(7,))),
    "1d_shrink": ((9,), dict(size=(4,))),
    "2d_scale2": ((4, 5), dict(scale_factor=2)),
    "2d_scale3_1": ((4, 5), dict(scale_factor=(3, 1))),
    "2d_float_scale": ((5, 7), dict(scale_factor=1.7)),
    "2d_shrink_scale": ((9, 8), dict(scale_factor=0.5)),
    "2d_size": ((4, 5), dict(size=(7, 13))),
    "2d_size_int": ((6, 4), dict(size=5)),
    "2d_size_one": ((6, 4), dict(size=(1, 3))),
    "3d_scale2": ((3, 4, 2), dict(scale_factor=(2, 2, 2))),
    "3d_size": ((3, 4, 5), dict(size=(5, 3, 9))),
}


def _torch_upsample(torch, n, kwargs, method, align_corners):
    def per_axis(v):  # fnn's plain number means two axes; torch takes it for any
        return v if isinstance(v, tuple) else (v,) * n
    args = {k: per_axis(v) for k, v in kwargs.items()}
    if "scale_factor" in args:  # fnn maps positions by in / out (see Upsample's docstring)
        args["recompute_scale_factor"] = True
    if method == "nearest":
        return torch.nn.Upsample(**args, mode="nearest")
    return torch.nn.Upsample(**args, mode=TORCH_LINEAR[n], align_corners=align_corners)


@pytest.mark.parametrize("method,align_corners", [("nearest", False), ("linear", False),
                                                  ("linear", True)],
                         ids=["nearest", "linear", "linear_align_corners"])
@pytest.mark.parametrize("spatial,kwargs", list(UPSAMPLE_CASES.values()), ids=list(UPSAMPLE_CASES))
def test_upsample_matches_torch(torch, spatial, kwargs, method, align_corners):
    layer = fnn.Upsample(**kwargs, method=method, align_corners=align_corners)
    x = rand((2,) + spatial + (3,), 1)
    module = _torch_upsample(torch, len(spatial), kwargs, method, align_corners)
    y, expected, dx, expected_dx = against_torch(torch, module, layer, x)
    assert y.shape == expected.shape
    np.testing.assert_allclose(y, expected, **TOL)
    np.testing.assert_allclose(dx, expected_dx, rtol=1e-5, atol=1e-5)
    assert np.all(np.isfinite(dx))


@pytest.mark.parametrize("size,out", [(2, 82), (5, 123), (7, 150), (3, 100)])
def test_upsample_nearest_rounds_the_bin_edges_as_torch(torch, size, out):
    """floor(i * in / out) in float32, as PyTorch computes it: for 2 -> 82 the exact integer
    arithmetic would pick other rows."""
    x = np.arange(size, dtype=np.float32).reshape(1, size, 1)
    y, _ = run(fnn.Upsample(size=(out,)), {}, f32(x))
    expected = torch.nn.functional.interpolate(torch.from_numpy(nchw(x).copy()), size=out)
    np.testing.assert_array_equal(np.asarray(y), nhwc(expected))


def test_upsample_batch_axes_and_integers():
    """Any number of leading batch axes (none included); nearest copies integer inputs."""
    layer = fnn.Upsample(2)
    x = jnp.arange(2 * 3 * 2 * 2 * 1).reshape(2, 3, 2, 2, 1)
    y, _ = run(layer, {}, x)
    assert y.shape == (2, 3, 4, 4, 1) and y.dtype == x.dtype
    np.testing.assert_array_equal(np.asarray(y), np.repeat(np.repeat(np.asarray(x), 2, 2), 2, 3))
    single, _ = run(layer, {}, x[1, 2])
    np.testing.assert_array_equal(np.asarray(single), np.asarray(y[1, 2]))


def test_upsample_linear_differs_from_an_antialiased_resize_when_shrinking():
    """jax.image.resize's linear method widens its kernel when shrinking; PyTorch's (and
    fnn's) interpolates between the two nearest inputs."""
    x = rand((1, 8, 8, 2), 3)
    y, _ = run(fnn.Upsample(size=(3, 3), method="linear"), {}, f32(x))
    resized = jax.image.resize(f32(x), (1, 3, 3, 2), "linear")
    assert np.abs(f64(y) - f64(resized)).max() > 1e-2


@pytest.mark.parametrize("make,message", [
    (lambda: fnn.Upsample(), "Upsample: give exactly one of scale_factor and size, got "
                             "scale_factor=None, size=None"),
    (lambda: fnn.Upsample(2, size=4), "Upsample: give exactly one of scale_factor and size"),
    (lambda: fnn.Upsample(2, method="bicubic"),
     "Upsample: method must be one of ('nearest', 'linear'), got 'bicubic'"),
    (lambda: fnn.Upsample(2, align_corners=True),
     "Upsample: align_corners=True needs method='linear', got 'nearest'"),
    (lambda: fnn.Upsample((2, 2, 2, 2)), "Upsample: scale_factor must be a positive number (two "
                                         "spatial axes) or a tuple of 1, 2 or 3 of them"),
    (lambda: fnn.Upsample(-1.0), "Upsample: scale_factor must be a positive number"),
    (lambda: fnn.Upsample(size=(4, 2.5)), "Upsample: size must be a positive int (two spatial "
                                          "axes) or a tuple of 1, 2 or 3 of them (one per "
                                          "spatial axis), got (4, 2.5)"),
    (lambda: fnn.PixelShuffle(0), "PixelShuffle: factor must be a positive integer, got 0"),
    (lambda: fnn.PixelUnshuffle(1.5), "PixelUnshuffle: factor must be a positive integer"),
])
def test_bad_hyper_parameters(make, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        make()


@pytest.mark.parametrize("layer,x,message", [
    (fnn.Upsample(2), jnp.zeros((4, 3)),
     "Upsample: expected input [..., 2 spatial axes, features], got float32[4, 3]"),
    (fnn.Upsample((2, 2, 2)), jnp.zeros((4, 3, 2)),
     "Upsample: expected input [..., 3 spatial axes, features], got float32[4, 3, 2]"),
    (fnn.Upsample(0.2), jnp.zeros((1, 4, 6, 3)),
     "Upsample: expected input [..., 2 spatial axes, features] of sizes that "
     "scale_factor=0.2 leaves at least 1, got float32[1, 4, 6, 3]"),
    (fnn.Upsample(2, method="linear"), jnp.zeros((1, 4, 6, 3), jnp.int32),
     "Upsample: expected a floating-point input [..., 2 spatial axes, features], got "
     "int32[1, 4, 6, 3]"),
    (fnn.Upsample((2,)), fnn.Seq(jnp.zeros((2, 5, 3))),
     "Upsample: expected input [..., 1 spatial axes, features], got Seq(x=float32[2, 5, 3])"),
    (fnn.PixelShuffle(2), jnp.zeros((1, 4, 4, 6)),
     "PixelShuffle: expected input [..., H, W, C * 4] (channels divisible by factor ** 2 = 4), "
     "got float32[1, 4, 4, 6]"),
    (fnn.PixelShuffle(2), jnp.zeros((4, 8)),
     "PixelShuffle: expected input [..., H, W, C * 4] (channels divisible by factor ** 2 = 4), "
     "got float32[4, 8]"),
    (fnn.PixelUnshuffle(3), jnp.zeros((1, 6, 4, 2)),
     "PixelUnshuffle: expected input [..., H, W, C] (H and W divisible by factor=3), got "
     "float32[1, 6, 4, 2]"),
])
def test_bad_input_is_an_error_at_init_and_apply(layer, x, message):
    with pytest.raises(fnn.ShapeError, match=f"^{re.escape(message)}$"):
        layer.init(jax.random.key(0), x)
    with pytest.raises(fnn.ShapeError, match=f"^{re.escape(message)}$"):
        layer.apply({}, {}, x)


def test_resample_layers_take_no_params():
    with pytest.raises(fnn.ParamError, match=re.escape("Upsample: expected params {}, got "
                                                       "{w: float32[2]}: unexpected w")):
        fnn.Upsample(2).apply({"w": jnp.zeros(2)}, {}, jnp.zeros((1, 2, 2, 1)))


# ============================================================================= PixelShuffle

@pytest.mark.parametrize("factor,shape", [(2, (2, 3, 4, 8)), (3, (1, 2, 2, 18)), (1, (2, 3, 3, 2))])
def test_pixel_shuffle_matches_torch(torch, factor, shape):
    x = rand(shape, 1)
    y, expected, dx, expected_dx = against_torch(torch, torch.nn.PixelShuffle(factor),
                                                 fnn.PixelShuffle(factor), x)
    np.testing.assert_array_equal(y, expected)
    np.testing.assert_array_equal(dx, expected_dx)


def test_pixel_shuffle_channel_order():
    """Input channel c * r * r + i * r + j goes to output channel c at offset (i, j)."""
    r, c = 2, 3
    x = jnp.arange(c * r * r, dtype=jnp.float32).reshape(1, 1, c * r * r)  # one pixel
    y, _ = run(fnn.PixelShuffle(r), {}, x)
    assert y.shape == (r, r, c)
    for ch in range(c):
        for i in range(r):
            for j in range(r):
                assert float(y[i, j, ch]) == ch * r * r + i * r + j


@pytest.mark.parametrize("factor,shape", [(2, (2, 4, 6, 3)), (3, (1, 6, 3, 2))])
def test_pixel_unshuffle_matches_torch_and_inverts_the_shuffle(torch, factor, shape):
    x = rand(shape, 1)
    y, expected, dx, expected_dx = against_torch(torch, torch.nn.PixelUnshuffle(factor),
                                                 fnn.PixelUnshuffle(factor), x)
    np.testing.assert_array_equal(y, expected)
    np.testing.assert_array_equal(dx, expected_dx)
    back, _ = run(fnn.PixelShuffle(factor), {}, f32(y))
    np.testing.assert_array_equal(f64(back), f64(x))


def test_pixel_shuffle_batch_axes():
    x = f32(rand((2, 3, 2, 2, 8), 1))
    y, _ = run(fnn.PixelShuffle(2), {}, x)
    flat, _ = run(fnn.PixelShuffle(2), {}, x.reshape(6, 2, 2, 8))
    single, _ = run(fnn.PixelShuffle(2), {}, x[1, 0])
    assert y.shape == (2, 3, 4, 4, 2)
    np.testing.assert_array_equal(np.asarray(y).reshape(flat.shape), np.asarray(flat))
    np.testing.assert_array_equal(np.asarray(single), np.asarray(flat[3]))
