"""Flatten and Reshape against numpy's reshape; both refuse a ``Seq``."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnn
from helpers import init_apply


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


SEQ = fnn.Seq(jnp.zeros((2, 5, 6), jnp.float32), lengths=jnp.array([5, 2], jnp.int32))
SEQ_TEXT = "Seq(x=float32[2, 5, 6], lengths=int32[2])"


@pytest.mark.parametrize("layer,expected", [
    (fnn.Flatten(1), "at least 2 axes"),
    (fnn.Flatten(-2), "at least 2 axes"),
    (fnn.Reshape((30,), 1), "[*lead, *rest] with prod(rest) == 30"),
    (fnn.Reshape((2, -1), -1), "[*lead, *rest] with prod(rest) divisible by 2"),
], ids=["Flatten", "Flatten_time_axis", "Reshape", "Reshape_features"])
def test_reshape_layers_refuse_a_seq(layer, expected):
    """Flattening or reshaping would move the time axis away from the lengths: a Seq is a
    ShapeError naming the layer and showing the Seq, at apply and at init."""
    message = f"^{re.escape(f'{layer.name}: expected input {expected}, got {SEQ_TEXT}')}$"
    with pytest.raises(fnn.ShapeError, match=message):
        layer.apply({}, {}, SEQ)
    with pytest.raises(fnn.ShapeError, match=message):
        layer.init(jax.random.key(0), SEQ)


def test_reshape_size_checked():
    with pytest.raises(fnn.ShapeError, match=re.escape(
            "Reshape: expected input [*lead, *rest] with prod(rest) == 7, got float32[2, 3, 4]")):
        fnn.Reshape((7,), 1).apply({}, {}, jnp.zeros((2, 3, 4), jnp.float32))


def test_start_axis_has_no_default_and_at_least_one_axis_is_flattened():
    # which axes are batch axes cannot be told from a shape: the caller says
    with pytest.raises(TypeError, match="start_axis"):
        fnn.Flatten()
    with pytest.raises(TypeError, match="start_axis"):
        fnn.Reshape((2, 2))
    with pytest.raises(TypeError, match=r"Flatten: start_axis must be an int .*got 1.5"):
        fnn.Flatten(1.5)
    # a rank-1 input has no axis after the first: an error, not [4, 1]
    with pytest.raises(fnn.ShapeError, match=r"^Flatten: expected input at least 2 axes, got "
                                             r"float32\[4\]$"):
        fnn.Flatten(1).apply({}, {}, jnp.zeros((4,)))
    assert fnn.Flatten(-1).apply({}, {}, jnp.zeros((4,)))[0].shape == (4,)

