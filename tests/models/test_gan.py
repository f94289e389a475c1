"""DCGANGenerator and DCGANDiscriminator: shapes and param counts sized by their arguments, the
generator's range, determinism, gradients for every param, spectral norm, and errors."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnn
from fnn.models import DCGANDiscriminator, DCGANGenerator
from fnn.losses import gan_discriminator_loss, gan_generator_loss


def _spec(shape):
    return jax.ShapeDtypeStruct(shape, jnp.float32)


def generator_count(latent, image_size, channels, features):
    """Dense (no bias) + BatchNorm, then per step ConvTranspose 4x4 (no bias) + BatchNorm,
    then the 3x3 output convolution with its bias."""
    steps = int(np.log2(image_size)) - 2
    width = features * 2 ** steps
    count = latent * 16 * width + 2 * width
    for _ in range(steps):
        count += 16 * width * (width // 2) + 2 * (width // 2)
        width //= 2
    return count + 9 * width * channels + channels


def discriminator_count(image_size, channels, features, spectral_norm):
    """3x3 convolution with bias, per step a 4x4 convolution (bias with spectral norm, else
    BatchNorm), then the head on the 4x4 map."""
    steps = int(np.log2(image_size)) - 2
    width = features
    count = 9 * channels * width + width
    for _ in range(steps):
        count += 16 * width * 2 * width + 2 * width * (1 if spectral_norm else 2)
        width *= 2
    return count + 16 * width + 1


@pytest.mark.parametrize("latent, image_size, channels, features", [
    (64, 8, 1, 64), (16, 4, 1, 8), (32, 32, 3, 8), (8, 16, 2, 4)])
def test_generator_shapes_and_param_counts(latent, image_size, channels, features):
    model = DCGANGenerator(latent, image_size=image_size, channels=channels, features=features)
    params, state = jax.eval_shape(model.init, jax.random.key(0), _spec((5, latent)))
    assert fnn.param_count(params) == generator_count(latent, image_size, channels, features)
    steps = int(np.log2(image_size)) - 2
    assert sorted(params) == sorted(["project", "out"] + [f"norm{i}" for i in range(steps + 1)]
                                    + [f"up{i}" for i in range(1, steps + 1)])
    assert params["project"]["w"].shape == (latent, 16 * features * 2 ** steps)
    assert sorted(state) == [f"norm{i}" for i in range(steps + 1)]
    y, _ = jax.eval_shape(model.apply, params, state, _spec((5, latent)))
    assert y.shape == (5, image_size, image_size, channels)


@pytest.mark.parametrize("image_size, channels, features, spectral_norm", [
    (8, 1, 64, False), (8, 1, 64, True), (4, 3, 8, False), (32, 3, 8, True), (16, 1, 4, False)])
def test_discriminator_shapes_and_param_counts(image_size, channels, features, spectral_norm):
    model = DCGANDiscriminator(image_size=image_size, channels=channels, features=features,
                               spectral_norm=spectral_norm)
    x = _spec((2, 3, image_size, image_size, channels))
    params, state = jax.eval_shape(model.init, jax.random.key(0), x)
    assert fnn.param_count(params) == discriminator_count(image_size, channels, features,
                                                          spectral_norm)
    norms = [name for name in params if name.startswith("norm")]
    assert bool(norms) == (not spectral_norm and image_size > 4)
    if spectral_norm:  # every convolution and the head keep their power-iteration vectors
        assert sorted(state) == sorted(name for name in params)
        assert all(sorted(s) == ["u", "v"] for s in state.values())
    y, _ = jax.eval_shape(model.apply, params, state, x)
    assert y.shape == (2, 3)


def test_the_defaults_are_small():
    g, _ = jax.eval_shape(DCGANGenerator().init, jax.random.key(0), _spec((1, 64)))
    d, _ = jax.eval_shape(DCGANDiscriminator().init, jax.random.key(0), _spec((1, 8, 8, 1)))
    assert (fnn.param_count(g), fnn.param_count(d)) == (263_105, 134_017)


def test_generator_images_are_in_the_tanh_range_and_deterministic():
    model = DCGANGenerator(16, features=8)
    z = 10.0 * jax.random.normal(jax.random.key(1), (32, 16))
    params, state = model.init(jax.random.key(0), z)
    again, _ = model.init(jax.random.key(0), z)
    jax.tree.map(np.testing.assert_array_equal, params, again)
    for train in (False, True):
        images, _ = model.apply(params, state, z, train=train)
        images = np.asarray(images)
        assert images.min() >= -1.0 and images.max() <= 1.0
        assert images.std() > 0.01  # not a constant image
        np.testing.assert_array_equal(images, np.asarray(model.apply(params, state, z,
                                                                     train=train)[0]))
    other, _ = model.init(jax.random.key(1), z)
    assert not np.allclose(np.asarray(other["project"]["w"]), np.asarray(params["project"]["w"]))


@pytest.mark.parametrize("spectral_norm", [False, True])
def test_every_param_of_both_gets_a_finite_nonzero_gradient(spectral_norm):
    generator = DCGANGenerator(16, features=8)
    discriminator = DCGANDiscriminator(features=8, spectral_norm=spectral_norm)
    z = jax.random.normal(jax.random.key(1), (8, 16))
    real = jax.random.uniform(jax.random.key(2), (8, 8, 8, 1)) * 2 - 1
    gp, gs = generator.init(jax.random.key(0), z)
    dp, ds = discriminator.init(jax.random.key(3), real)

    def d_loss(dp):
        fake, _ = generator.apply(gp, gs, z, train=True)
        real_logits, _ = discriminator.apply(dp, ds, real, train=True)
        fake_logits, _ = discriminator.apply(dp, ds, fake, train=True)
        return gan_discriminator_loss(real_logits, fake_logits)

    def g_loss(gp):
        fake, _ = generator.apply(gp, gs, z, train=True)
        return gan_generator_loss(discriminator.apply(dp, ds, fake, train=True)[0])

    for grads in (jax.jit(jax.grad(d_loss))(dp), jax.jit(jax.grad(g_loss))(gp)):
        for path, g in jax.tree_util.tree_leaves_with_path(grads):
            g = np.asarray(g)
            assert np.all(np.isfinite(g)), path
            assert np.any(g != 0), path


def test_spectral_norm_discriminator_updates_u_v_in_training_only():
    model = DCGANDiscriminator(features=4, spectral_norm=True)
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))
    params, state = model.init(jax.random.key(0), x)
    _, eval_state = model.apply(params, state, x)
    jax.tree.map(np.testing.assert_array_equal, eval_state, state)
    _, train_state = model.apply(params, state, x, train=True)
    assert not np.allclose(np.asarray(train_state["conv1"]["u"]), np.asarray(state["conv1"]["u"]))


def test_errors():
    for size in (2, 6, 12, 8.0):
        with pytest.raises(ValueError, match=r"image_size must be a power of two >= 4"):
            DCGANGenerator(image_size=size)
        with pytest.raises(ValueError, match=r"image_size must be a power of two >= 4"):
            DCGANDiscriminator(image_size=size)
    with pytest.raises(fnn.ShapeError, match="^" + re.escape(
            "DCGANGenerator: expected input [..., 64], got float32[2, 32]") + "$"):
        DCGANGenerator().init(jax.random.key(0), jnp.zeros((2, 32)))
    with pytest.raises(fnn.ShapeError, match="^" + re.escape(
            "DCGANDiscriminator: expected input [..., 8, 8, 1], got float32[2, 16, 16, 1]") + "$"):
        DCGANDiscriminator().init(jax.random.key(0), jnp.zeros((2, 16, 16, 1)))
    model = DCGANDiscriminator(features=4)
    params, state = model.init(jax.random.key(0), jnp.zeros((2, 8, 8, 1)))
    with pytest.raises(fnn.ShapeError, match=re.escape("expected input [..., 8, 8, 1], got "
                                                       "float32[2, 8, 8, 3]")):
        model.apply(params, state, jnp.zeros((2, 8, 8, 3)))
