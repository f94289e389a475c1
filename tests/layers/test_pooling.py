"""MaxPool, AvgPool and global pooling against a naive numpy reference (NaN padding, float64),
global pooling of a ``Seq`` over its valid positions, and adaptive pooling against PyTorch."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnn
from helpers import as_tuple, explicit_pads, f32, f64, init_apply, rand, run

TOL = dict(rtol=1e-5, atol=1e-5)


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


# ============================================================================= MaxPool, AvgPool

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


@pytest.mark.parametrize("name,layer", [("MaxPool", fnn.MaxPool(2)), ("AvgPool", fnn.AvgPool(2))])
def test_pool_refuses_a_seq(name, layer):
    seq = fnn.Seq(jnp.zeros((2, 6, 3), jnp.float32), lengths=jnp.array([6, 3], jnp.int32))
    message = re.escape(f"{name}: expected input [..., 1 spatial axes, features], got "
                        f"Seq(x=float32[2, 6, 3], lengths=int32[2])")
    with pytest.raises(fnn.ShapeError, match=f"^{message}$"):
        layer.apply({}, {}, seq)
    with pytest.raises(fnn.ShapeError, match=f"^{message}$"):
        layer.init(jax.random.key(0), seq)


# ============================================================================= global pooling

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


GLOBAL_AVG, GLOBAL_MAX = fnn.GlobalAvgPool(-2), fnn.GlobalMaxPool(-2)


def _seq_pool_ref(x, lengths, kind):
    """A loop over the sequences: the mean or max over the first ``length`` positions of each,
    zero for an empty one. x: [*batch, T, C]; lengths: [*batch]."""
    x = f64(x)
    y = np.zeros(x.shape[:-2] + x.shape[-1:])
    for b in np.ndindex(*x.shape[:-2]):
        valid = x[b][:lengths[b]]
        if len(valid):
            y[b] = valid.mean(0) if kind == "avg" else valid.max(0)
    return y


@pytest.mark.parametrize("kind", ["avg", "max"])
@pytest.mark.parametrize("batch,lengths", [((4,), [5, 3, 1, 0]), ((2, 3), [[5, 0, 2], [4, 1, 5]])],
                         ids=["one_batch_axis", "two_batch_axes"])
def test_global_pool_seq_over_valid_positions(kind, batch, lengths):
    """GlobalAvgPool(-2)/GlobalMaxPool(-2) on Seq(x [..., T, C], lengths): a plain array, the
    mean/max over each sequence's valid positions (an empty one gives 0); what the padded
    positions hold (huge values, inf, nan) changes nothing."""
    layer = GLOBAL_AVG if kind == "avg" else GLOBAL_MAX
    lengths = np.asarray(lengths, np.int32)
    x = rand(batch + (5, 3), 1)
    y, _ = run(layer, {}, fnn.Seq(f32(x), lengths=jnp.asarray(lengths)))
    assert not isinstance(y, fnn.Seq)
    assert y.shape == batch + (3,) and y.dtype == jnp.float32
    expected = _seq_pool_ref(x, lengths, kind)
    np.testing.assert_allclose(f64(y), expected, **TOL)
    assert np.all(f64(y)[lengths == 0] == 0)
    padded = np.arange(5) >= lengths[..., None]  # [*batch, T]
    for junk in (1e30, -1e30, np.inf, -np.inf, np.nan):
        x_junk = np.where(padded[..., None], np.float32(junk), x)
        y_junk, _ = run(layer, {}, fnn.Seq(f32(x_junk), lengths=jnp.asarray(lengths)))
        np.testing.assert_array_equal(np.asarray(y_junk), np.asarray(y), err_msg=str(junk))


@pytest.mark.parametrize("kind", ["avg", "max"])
def test_global_pool_seq_full_lengths_and_no_lengths_match_the_plain_call(kind):
    layer = GLOBAL_AVG if kind == "avg" else GLOBAL_MAX
    x = f32(rand((3, 5, 2), 2))
    plain, _ = run(layer, {}, x)
    full, _ = run(layer, {}, fnn.Seq(x, lengths=jnp.full((3,), 5, jnp.int32)))
    no_lengths, _ = run(layer, {}, fnn.Seq(x, positions=jnp.arange(5, dtype=jnp.int32)))
    np.testing.assert_allclose(f64(full), f64(plain), **TOL)
    np.testing.assert_array_equal(np.asarray(no_lengths), np.asarray(plain))


def test_global_max_pool_seq_keeps_a_valid_minus_inf():
    """-inf at every valid position is the maximum, as in the unmasked max (not finfo.min)."""
    x = jnp.full((2, 3, 2), -jnp.inf, jnp.float32).at[1, 1:].set(5.0)
    y, _ = run(GLOBAL_MAX, {}, fnn.Seq(x, lengths=jnp.array([2, 1], jnp.int32)))
    np.testing.assert_array_equal(np.asarray(y), [[-np.inf, -np.inf], [-np.inf, -np.inf]])


@pytest.mark.parametrize("name,start_axis", [("GlobalAvgPool", 0), ("GlobalAvgPool", -3),
                                             ("GlobalMaxPool", 0), ("GlobalMaxPool", -4)])
def test_global_pool_seq_needs_the_time_axis(name, start_axis):
    """A Seq is pooled over its time axis only: pooling the batch or a spatial axis with it is
    a ShapeError, at init as at apply."""
    layer = getattr(fnn, name)(start_axis)
    x = jnp.zeros((2, 4, 5, 3), jnp.float32)
    seq = fnn.Seq(x, lengths=jnp.zeros((2, 4), jnp.int32))
    message = re.escape(f"{name}: expected input a Seq [..., time, features] pooled over its "
                        f"time axis only (start_axis=-2), got Seq(x=float32[2, 4, 5, 3], "
                        f"lengths=int32[2, 4])")
    with pytest.raises(fnn.ShapeError, match=f"^{message}$"):
        layer.apply({}, {}, seq)
    with pytest.raises(fnn.ShapeError, match=f"^{message}$"):
        layer.init(jax.random.key(0), seq)


@pytest.mark.parametrize("lengths", [jnp.array([5.0, 2.0], jnp.float32),
                                     jnp.array([5, 2, 1], jnp.int32),
                                     jnp.array([[5], [2]], jnp.int32)],
                         ids=["float", "too_long", "extra_axis"])
def test_global_pool_seq_lengths_checked(lengths):
    seq = fnn.Seq(jnp.zeros((2, 5, 3), jnp.float32), lengths=lengths)
    got = fnn.core.describe(lengths)
    with pytest.raises(fnn.ShapeError, match=re.escape(
            f"GlobalAvgPool: expected lengths int[2] (the batch axes of x float32[2, 5, 3]), "
            f"got {got}")):
        GLOBAL_AVG.apply({}, {}, seq)


def test_global_pooling_has_no_default_and_minus_3_pools_images_with_any_batch_axes():
    # which axes are batch axes cannot be told from a shape: the caller says
    for factory in (fnn.GlobalAvgPool, fnn.GlobalMaxPool, fnn.Flatten):
        with pytest.raises(TypeError, match="start_axis"):
            factory()
    with pytest.raises(TypeError, match="start_axis"):
        fnn.GroupNorm(2)
    # the README's promise: jax.vmap over single images pools the same axes as the batch
    x = jnp.asarray(rand((3, 4, 5, 2), seed=9))
    for layer, reduce in ((fnn.GlobalAvgPool(-3), np.mean), (fnn.GlobalMaxPool(-3), np.max)):
        batched = layer.apply({}, {}, x)[0]
        single = jax.vmap(lambda image: layer.apply({}, {}, image)[0])(x)
        np.testing.assert_allclose(batched, reduce(np.asarray(x), axis=(1, 2)), rtol=1e-6)
        np.testing.assert_allclose(single, batched, rtol=1e-6)


# ============================================================================= adaptive pooling

@pytest.fixture
def torch():
    return pytest.importorskip("torch", reason="torch is the reference (pip install torch)")


ADAPTIVE_CASES = {
    # id: (spatial size, output_size)
    "1d_divisible": ((8,), (4,)),
    "1d_non_divisible": ((7,), (3,)),
    "1d_larger_output": ((3,), (5,)),
    "2d_int": ((6, 6), 3),
    "2d_non_divisible": ((7, 5), (3, 2)),
    "2d_one": ((5, 4), (1, 1)),
    "2d_larger_output": ((3, 5), (5, 7)),
    "3d": ((7, 5, 6), (3, 2, 4)),
}


def _adaptive_bins_ref(x, output_size, kind):
    """A loop over the output positions: each bin [floor(i * in / out), ceil((i + 1) * in /
    out)) of every axis, pooled. x: [N, *spatial, C], float64."""
    x = f64(x)
    n = len(output_size)
    spatial = x.shape[1:1 + n]
    y = np.zeros((x.shape[0],) + tuple(output_size) + x.shape[-1:])
    for o in np.ndindex(*output_size):
        index = tuple(slice(o[a] * spatial[a] // output_size[a],
                            -(-(o[a] + 1) * spatial[a] // output_size[a])) for a in range(n))
        block = x[(slice(None),) + index].reshape(x.shape[0], -1, x.shape[-1])
        y[(slice(None),) + o] = block.mean(1) if kind == "avg" else block.max(1)
    return y


@pytest.mark.parametrize("kind", ["avg", "max"])
@pytest.mark.parametrize("spatial,output_size", list(ADAPTIVE_CASES.values()),
                         ids=list(ADAPTIVE_CASES))
def test_adaptive_pool_matches_torch(torch, spatial, output_size, kind):
    n = len(spatial)
    sizes = (output_size,) * 2 if isinstance(output_size, int) else output_size
    layer = (fnn.AdaptiveAvgPool if kind == "avg" else fnn.AdaptiveMaxPool)(output_size)
    module = getattr(torch.nn, f"Adaptive{kind.capitalize()}Pool{n}d")(sizes)
    x = rand((2,) + spatial + (3,), 1)
    xt = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1))).requires_grad_()
    yt = module(xt)
    g = rand((2,) + sizes + (3,), 2)
    yt.backward(torch.from_numpy(np.ascontiguousarray(np.moveaxis(g, -1, 1))))
    y, vjp = jax.vjp(lambda v: layer.apply({}, {}, v)[0], f32(x))
    expected = np.moveaxis(yt.detach().numpy(), 1, -1)
    assert y.shape == expected.shape == (2,) + sizes + (3,)
    np.testing.assert_allclose(f64(y), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(f64(y), _adaptive_bins_ref(x, sizes, kind), **TOL)
    np.testing.assert_allclose(f64(vjp(f32(g))[0]), np.moveaxis(xt.grad.numpy(), 1, -1),
                               rtol=1e-6, atol=1e-6)


def test_adaptive_max_pool_gradient_goes_to_the_first_maximum(torch):
    """Ties (ReLU zeros, flat backgrounds): the whole gradient of a bin goes to its first
    maximum in row-major order, as in PyTorch."""
    x = np.zeros((1, 5, 4, 1), np.float32)
    x[0, 1, 0, 0] = x[0, 0, 1, 0] = 2.0  # a tie across rows in the first bin
    xt = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1))).requires_grad_()
    torch.nn.AdaptiveMaxPool2d((2, 2))(xt).sum().backward()
    grad = jax.grad(lambda v: fnn.AdaptiveMaxPool(2).apply({}, {}, v)[0].sum())(f32(x))
    expected = np.moveaxis(xt.grad.numpy(), 1, -1)
    np.testing.assert_array_equal(np.asarray(grad), expected)
    assert expected[0, 0, 1, 0] == 1 and expected[0, 1, 0, 0] == 0


def test_adaptive_pool_batch_axes_and_integers():
    x = jnp.arange(2 * 3 * 5 * 4 * 2).reshape(2, 3, 5, 4, 2)
    y, _ = run(fnn.AdaptiveMaxPool((2, 3)), {}, x)
    assert y.shape == (2, 3, 2, 3, 2) and y.dtype == x.dtype
    np.testing.assert_array_equal(np.asarray(y), _adaptive_bins_ref(x.reshape(6, 5, 4, 2),
                                                                     (2, 3), "max")
                                  .reshape(y.shape))
    x = f32(rand((2, 3, 5, 4, 2), 1))
    flat, _ = run(fnn.AdaptiveAvgPool((2, 3)), {}, x.reshape(6, 5, 4, 2))
    single, _ = run(fnn.AdaptiveAvgPool((2, 3)), {}, x[1, 1])
    np.testing.assert_allclose(f64(single), f64(flat[4]), **TOL)


@pytest.mark.parametrize("make,message", [
    (lambda: fnn.AdaptiveAvgPool(0), "AdaptiveAvgPool: output_size must be a positive integer "
                                     "or a tuple of them, got (0, 0)"),
    (lambda: fnn.AdaptiveMaxPool((2, 2, 2, 2)), "AdaptiveMaxPool: output_size must be an int "
                                                "(two spatial axes) or a tuple of 1, 2 or 3 "
                                                "ints, one per spatial axis, got (2, 2, 2, 2)"),
])
def test_adaptive_pool_bad_hyper_parameters(make, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        make()


@pytest.mark.parametrize("layer,x,message", [
    (fnn.AdaptiveAvgPool(2), jnp.zeros((4, 3)),
     "AdaptiveAvgPool: expected input [..., 2 spatial axes, features], got float32[4, 3]"),
    (fnn.AdaptiveMaxPool((2,)), jnp.zeros((2, 0, 3)),
     "AdaptiveMaxPool: expected input [..., 1 nonempty spatial axes, features], got "
     "float32[2, 0, 3]"),
    (fnn.AdaptiveAvgPool(2), jnp.zeros((1, 4, 4, 3), jnp.int32),
     "AdaptiveAvgPool: expected a floating-point input [..., 2 spatial axes, features], got "
     "int32[1, 4, 4, 3]"),
    (fnn.AdaptiveAvgPool((3,)), fnn.Seq(jnp.zeros((2, 6, 3))),
     "AdaptiveAvgPool: expected input [..., 1 spatial axes, features], got "
     "Seq(x=float32[2, 6, 3])"),
])
def test_adaptive_pool_bad_input(layer, x, message):
    with pytest.raises(fnn.ShapeError, match=f"^{re.escape(message)}$"):
        layer.apply({}, {}, x)
