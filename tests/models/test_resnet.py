"""ResNet: torchvision's parameter counts for ResNet-18 and ResNet-50 (the layouts match), the
block structure, and the small stem on digit-sized images."""

import jax
import jax.numpy as jnp

import fnn
from fnn.models import ResNet


def _params(model, shape):
    return jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct(shape, jnp.float32))


def test_resnet18_and_resnet50_have_torchvisions_parameter_counts():
    # torchvision.models.resnet18().parameters() and resnet50(): 11,689,512 and 25,557,032
    params, state = _params(ResNet((2, 2, 2, 2)), (1, 224, 224, 3))
    assert fnn.param_count(params) == 11_689_512
    assert sorted(params) == ["head", "stage1", "stage2", "stage3", "stage4", "stem"]
    assert sorted(params["stage2"]["block1"]) == ["bn1", "bn2", "conv1", "conv2", "shortcut"]
    params, _ = _params(ResNet((3, 4, 6, 3), block="bottleneck"), (1, 224, 224, 3))
    assert fnn.param_count(params) == 25_557_032
    assert sorted(params["stage1"]["block1"]) == ["bn1", "bn2", "bn3", "conv1", "conv2", "conv3",
                                                  "shortcut"]
    # BatchNorm running statistics live in the state, one mean and var per channel
    assert state["stem"]["bn"]["mean"].shape == (64,)


def test_small_stem_keeps_the_resolution_and_features_set_the_widths():
    model = ResNet((1, 1), num_classes=10, features=8, stem="small")
    params, state = _params(model, (2, 8, 8, 1))
    assert params["stem"]["conv"]["w"].shape == (3, 3, 1, 8)
    assert params["stage2"]["block1"]["conv1"]["w"].shape == (3, 3, 8, 16)
    assert params["head"]["w"].shape == (16, 10)
    y, _ = jax.eval_shape(model.apply, params, state, jax.ShapeDtypeStruct((2, 8, 8, 1),
                                                                           jnp.float32))
    assert y.shape == (2, 10)
