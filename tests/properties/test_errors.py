"""Bad input gets a clear error: the layer's path, and expected versus got."""

import jax
import jax.numpy as jnp
import pytest

import fnn
from fnn.models import MLP, ResNet


def test_shape_mismatch_names_the_path_and_expected_versus_got(key):
    encoder = fnn.serial(fnn.Dense(64), fnn.Relu(), fnn.Dense(64))
    model = fnn.serial(encoder=encoder, head=fnn.Dense(10))
    params, state = model.init(key, jnp.zeros((32, 16)))
    params["head"]["w"] = jnp.zeros((63, 10))  # a head that expects 63 features
    with pytest.raises(fnn.ShapeError,
                       match=r"^Dense at head: expected input \[\.\.\., 63\], got float32\[32, 64\]$"):
        model.apply(params, state, jnp.zeros((32, 16)))
    with pytest.raises(fnn.ShapeError,
                       match=r"^Dense at encoder/0: expected input \[\.\.\., 16\], "
                             r"got float32\[32, 15\]$"):
        model.apply(params, state, jnp.zeros((32, 15)))


def test_errors_are_raised_at_trace_time_under_jit(key):
    model = fnn.serial(fnn.Dense(4), fnn.Dense(2))
    params, state = model.init(key, jnp.zeros((3, 5)))
    with pytest.raises(fnn.ShapeError, match=r"Dense at 0: expected input \[\.\.\., 5\]"):
        jax.jit(model.apply)(params, state, jnp.zeros((3, 6)))


def test_nested_paths_in_models(key):
    model = ResNet((1, 1), num_classes=3, features=4, stem="small")
    params, state = model.init(key, jnp.zeros((1, 8, 8, 1)))
    with pytest.raises(fnn.ShapeError, match=r"^Conv at stem/conv: expected input "
                                             r"\[\.\.\., 2 spatial axes, 1\], got float32\[1, 8, 8, 3\]$"):
        model.apply(params, state, jnp.zeros((1, 8, 8, 3)))


def test_init_errors_name_the_path(key):
    model = fnn.serial(fnn.Flatten(1), block=fnn.serial(fnn.Dense(4), fnn.Conv(3, (3, 3))))
    with pytest.raises(fnn.ShapeError, match=r"^Conv at block/1: expected input "
                                             r"\[\.\.\., 2 spatial axes, in_features\], got float32\[2, 4\]$"):
        model.init(key, jnp.zeros((2, 3, 3)))


def test_rank_errors(key):
    with pytest.raises(fnn.ShapeError, match=r"^MaxPool: expected input \[\.\.\., 2 spatial axes, "
                                             r"features\], got float32\[4, 4\]$"):
        fnn.MaxPool((2, 2)).init(key, jnp.zeros((4, 4)))
    with pytest.raises(fnn.ShapeError, match=r"^Dense: expected input \[\.\.\., in_features\], "
                                             r"got float32\[\]$"):
        fnn.Dense(3).init(key, jnp.zeros(()))
    with pytest.raises(fnn.ShapeError, match=r"GroupNorm: .*divisible by num_groups=4, "
                                             r"got float32\[2, 3, 3, 6\]"):
        fnn.GroupNorm(4, start_axis=1).init(key, jnp.zeros((2, 3, 3, 6)))
    with pytest.raises(fnn.ShapeError, match=r"Embedding: expected input integer ids"):
        fnn.Embedding(5, 2).init(key, jnp.zeros((2, 3)))


def test_missing_key_shows_the_corrected_call(key):
    model = MLP([8], 2, dropout=0.5)
    params, state = model.init(key, jnp.zeros((4, 3)))
    with pytest.raises(fnn.MissingKeyError,
                       match=r"^Dropout at dropout1 is stochastic and needs a random key when "
                             r"train=True; call apply\(params, state, x, "
                             r"key=jax.random.key\(0\), train=True\)$"):
        model.apply(params, state, jnp.zeros((4, 3)), train=True)
    # evaluation needs no key
    model.apply(params, state, jnp.zeros((4, 3)))


def test_unknown_arguments_are_rejected(key):
    with pytest.raises(TypeError, match="unexpected keyword argument 'feature'"):
        fnn.Dense(features=3, feature=4)
    with pytest.raises(TypeError, match="unexpected keyword argument 'momentun'"):
        fnn.BatchNorm(momentun=0.9)
    layer = fnn.Dense(3)
    params, state = layer.init(key, jnp.zeros((1, 2)))
    with pytest.raises(TypeError, match="unexpected keyword argument 'training'"):
        layer.apply(params, state, jnp.zeros((1, 2)), training=True)
    with pytest.raises(TypeError, match="train must be a Python bool"):
        fnn.serial(layer).apply({"0": params}, {}, jnp.zeros((1, 2)), train=jnp.array(True))


@pytest.mark.parametrize("make, message", [
    (lambda: fnn.Dense(0), r"Dense: features must be a positive integer, got 0"),
    (lambda: fnn.Dropout(1.5), r"Dropout: rate is the drop probability and must be in \[0, 1\]"),
    (lambda: fnn.Conv(4, (3, 3), strides=(1, 0)), r"Conv: strides must be a positive int or 2"),
    (lambda: fnn.Conv(4, (3, 3), padding="FULL"), r"Conv: padding must be 'SAME', 'VALID'"),
    (lambda: fnn.Conv(5, (3, 3), feature_group_count=2), r"features \(5\) must be divisible"),
    (lambda: fnn.Conv(4, (1, 1, 1, 1)), r"kernel_size must have 1, 2 or 3 entries"),
    (lambda: fnn.MaxPool((2, 2), padding=[(1, 1)]), r"padding needs 2 \(low, high\) pairs"),
    (lambda: fnn.Reshape((-1, -1), 1), r"at most one -1"),
    (lambda: fnn.BatchNorm(momentum=2.0), r"momentum must be in \[0, 1\]"),
    (lambda: fnn.GroupNorm(0, start_axis=1), r"num_groups must be a positive integer"),
    (lambda: fnn.serial(), r"serial needs at least one layer"),
    (lambda: fnn.serial(fnn.Dense), r"child '0' must be a Layer"),
    (lambda: fnn.branch(fnn.Dense(2), combine="max"), r"combine must be one of"),
    (lambda: fnn.activation("relu7"), r"unknown activation 'relu7'"),
    (lambda: ResNet(block="wide"), r"block must be 'basic' or 'bottleneck'"),
])
def test_bad_hyper_parameters(make, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make()


def test_residual_and_branch_shape_mismatch(key):
    res = fnn.residual(fnn.Dense(3))
    params, state = fnn.Dense(3).init(key, jnp.zeros((2, 5)))
    with pytest.raises(fnn.LayerError, match=r"residual: the body's output \(2, 3\) does not "
                                             r"match the shortcut's \(2, 5\)"):
        res.init(key, jnp.zeros((2, 5)))
    br = fnn.branch(fnn.Dense(3), fnn.Dense(4), combine="add")
    with pytest.raises(fnn.LayerError, match=r"branch: cannot combine outputs "
                                             r"float32\[2, 3\], float32\[2, 4\] with 'add'"):
        br.init(key, jnp.zeros((2, 5)))
