"""Pad against PyTorch's padding modules and ``F.pad`` on the CPU (NCHW moved to NHWC), the
gradient with respect to the input, and the errors."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnn
from helpers import f32, f64, rand, run


@pytest.fixture
def torch():
    return pytest.importorskip("torch", reason="torch is the reference (pip install torch)")


def nchw(x):
    return np.ascontiguousarray(np.moveaxis(np.asarray(x), -1, 1))


def nhwc(t):
    return np.moveaxis(t.detach().numpy(), 1, -1)


TORCH_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate",
               "circular": "circular"}

PAD_CASES = {
    # id: (spatial size, padding)
    "1d": ((6,), [(2, 3)]),
    "2d_int": ((4, 5), 2),
    "2d_pairs": ((4, 5), [(1, 0), (3, 2)]),
    "2d_zero_pairs": ((4, 5), [(0, 0), (0, 1)]),
    "3d": ((3, 4, 5), [(1, 2), (0, 3), (2, 1)]),
}


def _torch_pad(padding, n):
    """fnn's pairs (first spatial axis first) as F.pad's flat list (last axis first)."""
    pairs = [(padding, padding)] * n if isinstance(padding, int) else padding
    return [v for pair in reversed(pairs) for v in pair]


@pytest.mark.parametrize("mode", list(TORCH_MODES))
@pytest.mark.parametrize("spatial,padding", list(PAD_CASES.values()), ids=list(PAD_CASES))
def test_pad_matches_torch_f_pad(torch, spatial, padding, mode):
    value = 1.5 if mode == "zeros" else 0.0
    layer = fnn.Pad(padding, mode=mode, value=value)
    x = rand((2,) + spatial + (3,), 1)
    xt = torch.from_numpy(nchw(x)).requires_grad_()
    kwargs = dict(value=value) if mode == "zeros" else {}
    yt = torch.nn.functional.pad(xt, _torch_pad(padding, len(spatial)), mode=TORCH_MODES[mode],
                                 **kwargs)
    g = rand(nhwc(yt).shape, 2)
    yt.backward(torch.from_numpy(nchw(g)))
    y, vjp = jax.vjp(lambda v: layer.apply({}, {}, v)[0], f32(x))
    np.testing.assert_array_equal(f64(y), nhwc(yt))
    np.testing.assert_allclose(f64(vjp(f32(g))[0]), nhwc(xt.grad), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("module,padding,mode,shape", [
    ("ZeroPad2d", (1, 2, 0, 3), "zeros", (2, 3, 4, 5)),
    ("ReflectionPad1d", (2, 1), "reflect", (2, 3, 5)),
    ("ReflectionPad2d", (1, 2, 3, 0), "reflect", (2, 3, 4, 5)),
    ("ReplicationPad2d", (3, 1, 0, 2), "replicate", (2, 3, 4, 5)),
    ("ReplicationPad3d", (1, 0, 2, 1, 0, 2), "replicate", (1, 2, 3, 4, 5)),
    ("CircularPad2d", (2, 1, 1, 3), "circular", (2, 3, 4, 5)),
])
def test_pad_matches_torch_modules(torch, module, padding, mode, shape):
    """torch's (left, right, top, bottom, ...) are fnn's pairs, last spatial axis first."""
    x = rand(shape, 3)  # torch's layout
    expected = getattr(torch.nn, module)(padding)(torch.from_numpy(x))
    pairs = [tuple(padding[i:i + 2]) for i in range(0, len(padding), 2)][::-1]
    y, _ = run(fnn.Pad(pairs, mode=mode), {}, f32(np.moveaxis(x, 1, -1)))
    np.testing.assert_array_equal(f64(y), nhwc(expected))


def test_pad_constant_value_and_integers():
    x = jnp.arange(6, dtype=jnp.int32).reshape(1, 2, 3, 1)
    y, _ = run(fnn.Pad([(1, 0), (0, 1)], value=-1), {}, x)
    assert y.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(y)[0, ..., 0], [[-1, -1, -1, -1], [0, 1, 2, -1],
                                                             [3, 4, 5, -1]])


def test_pad_circular_wraps_around_again_past_the_axis():
    """Padding longer than the axis (which PyTorch refuses) keeps wrapping: numpy's "wrap"."""
    x = rand((2, 3, 2, 1), 4)
    y, _ = run(fnn.Pad([(4, 5), (3, 0)], mode="circular"), {}, f32(x))
    expected = np.pad(x, [(0, 0), (4, 5), (3, 0), (0, 0)], mode="wrap")
    np.testing.assert_array_equal(f64(y), expected)


def test_pad_batch_axes():
    layer = fnn.Pad(1, mode="reflect")
    x = f32(rand((2, 3, 4, 5, 2), 1))
    y, _ = run(layer, {}, x)
    flat, _ = run(layer, {}, x.reshape(6, 4, 5, 2))
    single, _ = run(layer, {}, x[1, 2])
    assert y.shape == (2, 3, 6, 7, 2)
    np.testing.assert_array_equal(np.asarray(y).reshape(flat.shape), np.asarray(flat))
    np.testing.assert_array_equal(np.asarray(single), np.asarray(flat[5]))


@pytest.mark.parametrize("make,message", [
    (lambda: fnn.Pad(-1), "Pad: padding must be an int >= 0 (two spatial axes, both sides) or "
                          "1-3 (low, high) pairs of ints >= 0, one per spatial axis, got -1"),
    (lambda: fnn.Pad([(1, -2)]), "Pad: padding must be an int >= 0"),
    (lambda: fnn.Pad([1, 2]), "Pad: padding must be an int >= 0"),
    (lambda: fnn.Pad([(1, 1)] * 4), "Pad: padding must be an int >= 0"),
    (lambda: fnn.Pad(1, mode="constant"),
     "Pad: mode must be one of ('zeros', 'reflect', 'replicate', 'circular'), got 'constant'"),
    (lambda: fnn.Pad(1, mode="reflect", value=1.0),
     "Pad: value is the constant of mode='zeros', got value=1.0 with mode='reflect'"),
])
def test_bad_hyper_parameters(make, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        make()


@pytest.mark.parametrize("layer,shape,message", [
    (fnn.Pad([(2, 3)], mode="reflect"), (2, 3, 4),
     "Pad: expected input [..., 1 spatial axes, features] of sizes at least (4): reflect "
     "padding must be smaller than the axis it pads (padding [(2, 3)]), got float32[2, 3, 4]"),
    (fnn.Pad(2, mode="reflect"), (1, 2, 5, 3),
     "Pad: expected input [..., 2 spatial axes, features] of sizes at least (3, 3): reflect "
     "padding must be smaller than the axis it pads (padding 2), got float32[1, 2, 5, 3]"),
    (fnn.Pad(1), (4, 3), "Pad: expected input [..., 2 spatial axes, features], got "
                         "float32[4, 3]"),
    (fnn.Pad([(1, 1)] * 3, mode="replicate"), (2, 3, 0, 2, 1),
     "Pad: expected input [..., 3 nonempty spatial axes, features] (replicate padding repeats "
     "what the axis holds), got float32[2, 3, 0, 2, 1]"),
])
def test_bad_input_is_an_error_at_init_and_apply(layer, shape, message):
    x = jnp.zeros(shape, jnp.float32)
    with pytest.raises(fnn.ShapeError, match=f"^{re.escape(message)}$"):
        layer.init(jax.random.key(0), x)
    with pytest.raises(fnn.ShapeError, match=f"^{re.escape(message)}$"):
        layer.apply({}, {}, x)


def test_pad_refuses_a_seq():
    seq = fnn.Seq(jnp.zeros((2, 5, 3)), lengths=jnp.array([5, 2], jnp.int32))
    with pytest.raises(fnn.ShapeError, match=re.escape(
            "Pad: expected input [..., 1 spatial axes, features], got Seq(x=float32[2, 5, 3], "
            "lengths=int32[2])")):
        fnn.Pad([(1, 1)]).apply({}, {}, seq)
