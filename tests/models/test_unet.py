"""The diffusion U-Net: shapes at 8x8x1 and 32x32x3, the param tree sized by its arguments,
conditioning on timesteps and labels (the null label included), determinism, gradients for every
param, and errors."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnn
from fnn.models import UNet
from helpers import run


def _spec(shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype)


def _inputs(batch=4, size=8, channels=1, labels=None, seed=1):
    x = jax.random.normal(jax.random.key(seed), (batch, size, size, channels))
    t = jnp.arange(batch, dtype=jnp.int32) * 250
    return (x, t) if labels is None else (x, t, jnp.asarray(labels, jnp.int32))


def _shapes(tree):
    return jax.tree.map(jnp.shape, tree)


def test_default_shapes_and_param_tree():
    model = UNet()
    params, state = jax.eval_shape(model.init, jax.random.key(0), (_spec((5, 8, 8, 1)),
                                                                    _spec((5,), jnp.int32)))
    assert state == {}
    assert fnn.param_count(params) == 701_345
    assert sorted(params) == ["conditioning", "down0", "down1", "middle", "out", "stem", "up0",
                              "up1"]
    assert _shapes(params["conditioning"]) == {"time": {"dense1": {"b": (128,), "w": (32, 128)},
                                                        "dense2": {"b": (128,), "w": (128, 128)}}}
    assert params["stem"]["w"].shape == (3, 3, 1, 32)
    # attention at the lowest level (4x4) only, a downsampling between the levels
    assert sorted(params["down0"]) == ["block1", "downsample"]
    assert sorted(params["down1"]) == ["attention1", "block1"]
    assert sorted(params["middle"]) == ["attention", "block1", "block2"]
    assert sorted(params["up1"]) == ["attention1", "attention2", "block1", "block2", "upsample"]
    assert sorted(params["up0"]) == ["block1", "block2"]
    # a block that changes the width has a 1x1 skip; its time projection matches its width
    block = _shapes(params["down1"]["block1"])
    assert block["conv1"]["w"] == (3, 3, 32, 64) and block["skip"]["w"] == (1, 1, 32, 64)
    assert block["time"]["w"] == (128, 64) and "skip" not in params["middle"]["block1"]
    # the way up concatenates the skips: up1 gets the down1 block's and the downsampling's
    assert params["up1"]["block1"]["conv1"]["w"].shape == (3, 3, 64 + 64, 64)
    assert params["up1"]["block2"]["conv1"]["w"].shape == (3, 3, 64 + 32, 64)
    assert params["up0"]["block1"]["conv1"]["w"].shape == (3, 3, 64 + 32, 32)
    assert params["up0"]["block2"]["conv1"]["w"].shape == (3, 3, 32 + 32, 32)
    assert params["out"]["conv"]["w"].shape == (3, 3, 32, 1)
    y, _ = jax.eval_shape(model.apply, params, state, (_spec((5, 8, 8, 1)),
                                                       _spec((5,), jnp.int32)))
    assert y.shape == (5, 8, 8, 1)


def test_32x32_rgb_with_three_levels_and_labels():
    model = UNet(channels=3, features=16, multipliers=(1, 2, 2), num_res_blocks=2,
                 num_classes=10)
    inputs = (_spec((2, 32, 32, 3)), _spec((2,), jnp.float32), _spec((2,), jnp.int32))
    params, state = jax.eval_shape(model.init, jax.random.key(0), inputs)
    assert sorted(params["down0"]) == ["block1", "block2", "downsample"]
    assert sorted(params["down2"]) == ["attention1", "attention2", "block1", "block2"]
    assert sorted(params["up2"]) == ["attention1", "attention2", "attention3", "block1",
                                     "block2", "block3", "upsample"]
    assert params["conditioning"]["label"]["table"].shape == (11, 64)  # + the null label
    y, _ = jax.eval_shape(model.apply, params, state, inputs)
    assert y.shape == (2, 32, 32, 3)


def test_param_counts_grow_with_the_arguments():
    def count(**kwargs):
        inputs = (_spec((1, 8, 8, 1)), _spec((1,), jnp.int32)) + (
            (_spec((1,), jnp.int32),) if "num_classes" in kwargs else ())
        params, _ = jax.eval_shape(UNet(**kwargs).init, jax.random.key(0), inputs)
        return fnn.param_count(params)

    base = count()
    assert count(features=16) < base < count(num_res_blocks=2) < count(num_res_blocks=3)
    assert count(num_classes=10) == base + 11 * 128
    assert count(time_features=64) < base
    no_attention = count(attention_levels=())
    # two in the way up, one on the way down, one in the middle, each 64 channels wide
    assert base - no_attention == 4 * (2 * 64 + 4 * (64 * 64 + 64))


def test_a_real_forward_pass_at_8x8_and_with_extra_batch_axes():
    model = UNet(features=8, num_heads=2, num_groups=4)
    x, t = _inputs()
    params, state = model.init(jax.random.key(0), (x, t))
    y, new_state = run(model, params, (x, t), state)
    assert y.shape == x.shape and y.dtype == jnp.float32 and new_state == {}
    assert np.all(np.isfinite(np.asarray(y)))
    # any batch axes: [2, 2, H, W, C] with t [2, 2] gives the same per example
    y2, _ = run(model, params, (x.reshape(2, 2, 8, 8, 1), t.reshape(2, 2)), state)
    np.testing.assert_allclose(np.asarray(y2).reshape(y.shape), np.asarray(y), rtol=1e-5,
                               atol=1e-5)


def test_timesteps_and_labels_change_the_output_and_the_null_label_is_accepted():
    model = UNet(features=8, num_heads=2, num_groups=4, num_classes=3)
    x, t, labels = _inputs(batch=2, labels=[0, 3])
    params, state = model.init(jax.random.key(0), (x, t, labels))
    apply = jax.jit(lambda inputs: model.apply(params, state, inputs)[0])
    y = np.asarray(apply((x, t, labels)))
    assert np.all(np.isfinite(y))
    # another timestep: another output
    assert np.abs(np.asarray(apply((x, t + 100, labels))) - y).max() > 1e-3
    # another label, and the null label (3) against a class (0 -> 3, 3 -> 1)
    y_other = np.asarray(apply((x, t, jnp.array([3, 1], jnp.int32))))
    assert np.abs(y_other[0] - y[0]).max() > 1e-3 and np.abs(y_other[1] - y[1]).max() > 1e-3
    # float timesteps with the same values give the same output as the ints
    np.testing.assert_allclose(np.asarray(apply((x, t.astype(jnp.float32), labels))), y,
                               rtol=1e-5, atol=1e-5)
    # each example's output depends on its own conditioning only
    y_swapped = np.asarray(apply((x, t, labels.at[1].set(2))))
    np.testing.assert_array_equal(y_swapped[0], y[0])
    # ids past the null label are refused (eagerly)
    with pytest.raises(fnn.ShapeError, match=r"Embedding at conditioning/label: expected ids in "
                                             r"\[0, 4\), got 4"):
        model.apply(params, state, (x, t, jnp.array([0, 4], jnp.int32)))


def test_deterministic_and_every_param_gets_a_finite_nonzero_gradient():
    model = UNet(features=8, num_heads=2, num_groups=4, num_classes=2, dropout=0.1)
    inputs = _inputs(batch=3, labels=[0, 1, 2])
    params, state = model.init(jax.random.key(0), inputs)
    again, _ = model.init(jax.random.key(0), inputs)
    jax.tree.map(np.testing.assert_array_equal, params, again)
    noise = jax.random.normal(jax.random.key(5), inputs[0].shape)

    def loss(p, key):
        y, _ = model.apply(p, state, inputs, key=key, train=True)
        return jnp.mean(jnp.square(y - noise))

    grad = jax.jit(jax.grad(loss))
    grads = grad(params, jax.random.key(2))
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        g = np.asarray(g)
        assert np.all(np.isfinite(g)), path
        assert np.any(g != 0), path
    # the same key drops the same units; another key others
    jax.tree.map(np.testing.assert_array_equal, grads, grad(params, jax.random.key(2)))
    assert not np.allclose(np.asarray(loss(params, jax.random.key(3))),
                           np.asarray(loss(params, jax.random.key(2))))
    with pytest.raises(fnn.MissingKeyError, match=r"^Dropout at down0/block1/drop"):
        model.apply(params, state, inputs, train=True)


def _message(text):
    return "^" + re.escape(text) + "$"


def test_input_errors():
    plain, labelled = UNet(features=8, num_heads=2), UNet(features=8, num_heads=2, num_classes=3)
    x, t = _spec((2, 8, 8, 1)), _spec((2,), jnp.int32)
    labels = _spec((2,), jnp.int32)
    key = jax.random.key(0)
    with pytest.raises(fnn.ShapeError, match=_message(
            "UNet: expected input (x_t [..., H, W, 1], t [...]), got (float32[2, 8, 8, 1], "
            "int32[2], int32[2]): labels need a model built with num_classes")):
        plain.init(key, (x, t, labels))
    with pytest.raises(fnn.ShapeError, match=_message(
            "UNet: expected input (x_t [..., H, W, 1], t [...], labels int[...]), got "
            "(float32[2, 8, 8, 1], int32[2]): a model built with num_classes takes labels (the "
            "id 3 is the null label, for no class)")):
        labelled.init(key, (x, t))
    with pytest.raises(fnn.ShapeError, match=_message(
            "UNet: expected input (x_t [..., H, W, 1], t [...]), got (float32[2, 7, 7, 1], "
            "int32[2]): H and W must be divisible by 2 (2 ** (len(multipliers) - 1), the "
            "downsampling)")):
        plain.init(key, (_spec((2, 7, 7, 1)), t))
    with pytest.raises(fnn.ShapeError, match=re.escape("got (float32[2, 8, 8, 3], int32[2])")):
        plain.init(key, (_spec((2, 8, 8, 3)), t))
    with pytest.raises(fnn.ShapeError, match=re.escape(
            ": t must be int or float with x_t's batch axes [2]")):
        plain.init(key, (x, _spec((3,), jnp.int32)))
    with pytest.raises(fnn.ShapeError, match=re.escape(
            ": labels must be int with x_t's batch axes [2]")):
        labelled.init(key, (x, t, _spec((2,), jnp.float32)))
    with pytest.raises(fnn.ShapeError, match=_message(
            "UNet: expected input (x_t [..., H, W, 1], t [...]), got float32[2, 8, 8, 1]")):
        plain.init(key, x)
    # the checks run at apply too, naming the path
    params, state = plain.init(key, (x, t))
    with pytest.raises(fnn.ShapeError, match=r"^UNet at denoiser: expected input"):
        fnn.serial(denoiser=plain).apply({"denoiser": params}, {},
                                          (jnp.zeros((2, 8, 8, 1)), jnp.zeros((2, 1))))


def test_construction_errors():
    with pytest.raises(ValueError, match=r"attention_levels must be indices into multipliers "
                                         r"\(0 to 1\), got \(2,\)"):
        UNet(attention_levels=(2,))
    with pytest.raises(ValueError, match=re.escape(
            "every level's width (features * multipliers = [12, 24]) must be divisible by "
            "num_groups=8")):
        UNet(features=12)
    with pytest.raises(ValueError, match=r"must be divisible by num_heads=3"):
        UNet(num_heads=3)
    with pytest.raises(ValueError, match=r"dropout is a drop probability"):
        UNet(dropout=1.0)
    with pytest.raises(ValueError, match=r"num_classes must be a positive integer"):
        UNet(num_classes=0)
