"""The GAN and diffusion learners (fnn.train.gan, fnn.train.diffusion) and the diffusion
process (fnn.diffusion): each step against a reference written out by hand, the samplers
against an oracle denoiser, skipping of non-finite steps, data parallel against one device,
and the learners in the loop (evaluation, checkpoints, resume)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fnn
from fnn import diffusion as dm
from fnn.losses import gan_discriminator_loss, gan_generator_loss
from fnn.data import load_digits
from fnn.train import classification_task, data_parallel, diffusion, gan, train_learner
from fnn.train.generative import _EVAL_STREAM, _LABEL_STREAM

LATENT = 4


def _generator():
    return fnn.serial(fnn.Dense(16), fnn.Tanh(), fnn.Dense(12), fnn.Tanh(),
                      fnn.Reshape((2, 2, 3), start_axis=-1))


def _discriminator():
    return fnn.serial(fnn.Flatten(-3), fnn.Dense(8), fnn.LeakyRelu(0.2), fnn.Dense(1))


def _images(n=8, seed=0):
    return jax.random.uniform(jax.random.key(seed), (n, 2, 2, 3))


def _denoiser(num_classes=None):
    """A small model of ``(x_t, t)`` or ``(x_t, t, labels)`` -> noise ``[B, 2, 2, 3]``."""
    net = fnn.serial(fnn.Dense(16), fnn.Silu(), fnn.Dense(12))
    table = None if num_classes is None else fnn.Embedding(num_classes + 1, 4)

    def features(params, x):
        x_t, t = x[0], x[1]
        parts = [x_t.reshape(x_t.shape[0], -1),
                 jnp.sin(t.astype(jnp.float32)[:, None] * jnp.arange(1.0, 5.0)[None] / 10)]
        if table is not None:
            parts.append(table.apply(params["table"], {}, x[2])[0])
        return jnp.concatenate(parts, -1)

    def init(key, x):
        k1, k2 = jax.random.split(key)
        params = {}
        if table is not None:
            params["table"] = table.init(k2, x[2])[0]
        width = 12 + 4 + (0 if table is None else 4)
        params["net"] = net.init(k1, jax.ShapeDtypeStruct((x[0].shape[0], width),
                                                          jnp.float32))[0]
        return params, {}

    def apply(params, state, x, *, key=None, train=False):
        out, _ = net.apply(params["net"], {}, features(params, x))
        return out.reshape(x[0].shape), state

    return fnn.Layer(init, apply, "Denoiser")


def _close(a, b, tol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


# ----------------------------------------------------------------------------- GAN

def test_gan_step_equals_the_alternating_updates_written_out():
    g, d = _generator(), _discriminator()
    learner = gan(g, d, optax.sgd(0.1), optax.sgd(0.05), latent_features=LATENT, loss="hinge")
    x = _images()
    ts = learner.init(jax.random.key(0), x)
    new, metrics = jax.jit(learner.train_step_fn(None))(ts, x, jnp.zeros(8, jnp.int32))

    keys = jax.random.split(jax.random.fold_in(ts.key, 0), 6)
    real = x * 2 - 1  # data_range (0, 1) -> [-1, 1]
    gp, dp = ts.params["generator"], ts.params["discriminator"]
    z = jax.random.normal(keys[0], (8, LATENT))
    fake, _ = g.apply(gp, {}, z)

    def d_loss(dp):
        return gan_discriminator_loss(d.apply(dp, {}, real)[0][:, 0],
                                      d.apply(dp, {}, fake)[0][:, 0], kind="hinge")

    d_value, d_grads = jax.value_and_grad(d_loss)(dp)
    dp_new = jax.tree.map(lambda p, g_: p - 0.05 * g_, dp, d_grads)

    def g_loss(gp):
        return gan_generator_loss(d.apply(dp_new, {}, g.apply(gp, {}, jax.random.normal(
            keys[3], (8, LATENT)))[0])[0][:, 0], kind="hinge")

    g_value, g_grads = jax.value_and_grad(g_loss)(gp)
    gp_new = jax.tree.map(lambda p, g_: p - 0.1 * g_, gp, g_grads)
    _close(new.params, {"generator": gp_new, "discriminator": dp_new}, 1e-5)
    np.testing.assert_allclose(metrics["d_loss"], d_value, rtol=1e-6)
    np.testing.assert_allclose(metrics["g_loss"], g_value, rtol=1e-6)
    np.testing.assert_allclose(metrics["loss"], d_value + g_value, rtol=1e-6)
    assert int(new.step) == 1 and int(metrics["skipped"]) == 0


@pytest.mark.parametrize("kind", ["non_saturating", "hinge"])
def test_gan_losses_against_their_formulas(kind):
    real = jnp.array([2.0, -0.5, 0.3])
    fake = jnp.array([-1.5, 0.7, 1.2])
    sp = lambda v: np.log1p(np.exp(v))  # noqa: E731
    r, f = np.asarray(real), np.asarray(fake)
    if kind == "hinge":
        d_ref = np.maximum(0, 1 - r).mean() + np.maximum(0, 1 + f).mean()
        g_ref = -f.mean()
    else:
        d_ref = sp(-r).mean() + sp(f).mean()
        g_ref = sp(-f).mean()
    np.testing.assert_allclose(gan_discriminator_loss(real, fake, kind=kind), d_ref, rtol=1e-6)
    np.testing.assert_allclose(gan_generator_loss(fake, kind=kind), g_ref, rtol=1e-6)
    with pytest.raises(ValueError, match="kind must be one of non_saturating, hinge, got 'w'"):
        gan_generator_loss(fake, kind="w")


def test_gan_skips_a_non_finite_step_and_leaves_both_networks():
    learner = gan(_generator(), _discriminator(), optax.adam(1e-2), latent_features=LATENT)
    x = _images()
    ts = learner.init(jax.random.key(0), x)
    step = jax.jit(learner.train_step_fn(None))
    bad = x.at[0, 0, 0, 0].set(jnp.nan)
    new, metrics = step(ts, bad, jnp.zeros(8, jnp.int32))
    assert int(metrics["skipped"]) == 1 and int(metrics["bad_streak"]) == 1
    assert int(new.step) == 1
    for name in ("params", "state", "opt_state"):
        _close(getattr(new, name), getattr(ts, name), 0)
    good, metrics = step(new, x, jnp.zeros(8, jnp.int32))
    assert int(metrics["bad_streak"]) == 0 and int(metrics["skipped"]) == 1
    assert not np.allclose(good.params["generator"]["0"]["w"], ts.params["generator"]["0"]["w"])


def test_gan_errors_name_what_is_wrong():
    with pytest.raises(ValueError, match="gan: loss must be one of non_saturating, hinge"):
        gan(_generator(), _discriminator(), optax.sgd(0.1), latent_features=4, loss="wgan")
    wide = gan(fnn.serial(fnn.Dense(12), fnn.Reshape((2, 2, 3), start_axis=-1)),
               _discriminator(), optax.sgd(0.1), latent_features=LATENT)
    with pytest.raises(ValueError, match=r"generator's output float32\[8, 2, 2, 3\] must have "
                                         r"the data's shape \(8, 4, 4, 1\)"):
        wide.init(jax.random.key(0), jnp.zeros((8, 4, 4, 1)))
    two = gan(_generator(), fnn.serial(fnn.Flatten(-3), fnn.Dense(2)), optax.sgd(0.1),
              latent_features=LATENT)
    ts = two.init(jax.random.key(0), _images())
    with pytest.raises(ValueError, match=r"one logit per example, \[8\] or \[8, 1\]; got "
                                         r"float32\[8, 2\] on the real batch"):
        two.train_step_fn(None)(ts, _images(), None)


def test_gan_samples_are_in_the_data_scale():
    learner = gan(_generator(), _discriminator(), optax.sgd(0.1), latent_features=LATENT,
                  data_range=(0.0, 16.0))
    ts = learner.init(jax.random.key(0), _images())
    samples = learner.sample(ts, jax.random.key(1), 5)
    assert samples.shape == (5, 2, 2, 3)
    assert 0 <= float(samples.min()) and float(samples.max()) <= 16
    z = jax.random.normal(jax.random.key(3), (2, LATENT))
    expected = (learner.sample(ts, None, 2, latents=z))
    raw, _ = _generator().apply(ts.params["generator"], ts.state["generator"], z)
    _close(expected, (raw + 1) * 8, 1e-6)


# ----------------------------------------------------------------------------- diffusion

def test_linear_and_cosine_schedules_against_their_formulas():
    linear = dm.linear_schedule(200)
    betas = np.linspace(1e-4 * 5, 0.02 * 5, 200)
    np.testing.assert_allclose(linear.betas, betas, rtol=1e-6)
    np.testing.assert_allclose(linear.alphas_cumprod, np.cumprod(1 - betas), rtol=1e-5)
    cosine = dm.cosine_schedule(100)
    f = lambda t: np.cos((t / 100 + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
    abar = f(np.arange(1, 101)) / f(0)
    np.testing.assert_allclose(cosine.alphas_cumprod[:99], abar[:99], rtol=1e-5)
    assert float(cosine.betas.max()) == pytest.approx(0.999)  # capped
    assert float(linear.alphas_cumprod[-1]) < 1e-3 and float(cosine.alphas_cumprod[-1]) < 1e-3
    with pytest.raises(ValueError, match="num_steps must be an int >= 2, got 1"):
        dm.cosine_schedule(1)


def test_add_noise_and_predict_x0_invert_each_other():
    schedule = dm.cosine_schedule(50)
    x0, noise = _images(4, 1), jax.random.normal(jax.random.key(2), (4, 2, 2, 3))
    t = jnp.array([0, 10, 30, 49])
    x_t = dm.add_noise(schedule, x0, t, noise)
    abar = np.asarray(schedule.alphas_cumprod)[np.asarray(t)][:, None, None, None]
    np.testing.assert_allclose(x_t, np.sqrt(abar) * x0 + np.sqrt(1 - abar) * noise, rtol=1e-6)
    _close(dm.predict_x0(schedule, x_t, t, noise), x0, 2e-4)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "ddim-eta1"])
def test_samplers_with_the_ideal_denoiser_of_one_point_return_that_point(sampler):
    """For data that is a single point, the exact noise prediction is known in closed form;
    every sampler must then land on the point."""
    schedule = dm.linear_schedule(100)
    point = jnp.linspace(-0.8, 0.6, 12).reshape(2, 2, 3)

    def ideal(x, t):
        abar = schedule.alphas_cumprod[t][:, None, None, None]
        return (x - jnp.sqrt(abar) * point[None]) / jnp.sqrt(1 - abar)

    key = jax.random.key(0)
    if sampler == "ddpm":
        x0, chain = dm.ddpm_sample(ideal, schedule, key, (3, 2, 2, 3), return_chain=True)
        assert chain.shape == (101, 3, 2, 2, 3)
    else:
        x0, chain = dm.ddim_sample(ideal, schedule, key, (3, 2, 2, 3), steps=10,
                                   eta=1.0 if sampler == "ddim-eta1" else 0.0,
                                   return_chain=True)
        assert chain.shape == (11, 3, 2, 2, 3)
    np.testing.assert_allclose(x0, jnp.broadcast_to(point, x0.shape), atol=1e-4)
    _close(chain[-1], x0, 0)
    assert float(jnp.abs(chain[0]).mean()) > 0.5  # it starts from noise


@pytest.mark.parametrize("sampler, steps", [("ddpm", None), ("ddim", 1), ("ddim", 200),
                                            ("ddim-eta1", 1000)])
def test_samplers_with_the_ideal_denoiser_of_gaussian_data_draw_that_gaussian(sampler, steps):
    """Data ``N(m, s^2)`` per element: the exact noise prediction is ``E[eps | x_t] =
    sqrt(1 - abar) (x_t - sqrt(abar) m) / (abar s^2 + 1 - abar)``; the samples' mean and
    spread must be ``m`` and ``s``, which needs every step's posterior right (the one-point
    test above only checks the last step). One DDIM step from ``x_T`` gives ``E[x_0 | x_T]``,
    ``m`` itself: DDIM is deterministic, and one step of it is no sample."""
    schedule = dm.linear_schedule(1000)
    m, s = 0.3, 0.1

    def ideal(x, t):
        abar = schedule.alphas_cumprod[t][:, None]
        return jnp.sqrt(1 - abar) * (x - jnp.sqrt(abar) * m) / (abar * s ** 2 + 1 - abar)

    key, shape = jax.random.key(3), (4000, 4)
    if sampler == "ddpm":
        x0 = dm.ddpm_sample(ideal, schedule, key, shape, clip=False)
    else:
        x0 = dm.ddim_sample(ideal, schedule, key, shape, steps=steps, clip=False,
                            eta=1.0 if sampler == "ddim-eta1" else 0.0)
    assert float(jnp.mean(x0)) == pytest.approx(m, abs=0.005)
    assert float(jnp.std(x0)) == (pytest.approx(0, abs=1e-3) if steps == 1
                                  else pytest.approx(s, rel=0.06))


def test_ddim_with_eta_zero_is_deterministic_and_checks_its_steps():
    schedule = dm.cosine_schedule(20)
    denoise = lambda x, t: 0.1 * x  # noqa: E731
    a = dm.ddim_sample(denoise, schedule, jax.random.key(0), (2, 3), steps=5)
    b = dm.ddim_sample(denoise, schedule, jax.random.key(0), (2, 3), steps=5)
    _close(a, b, 0)
    with pytest.raises(ValueError, match=r"steps must be an int in \[1, 20\]"):
        dm.ddim_sample(denoise, schedule, jax.random.key(0), (2, 3), steps=21)


def test_guidance_mixes_the_two_predictions():
    cond = lambda x, t: x + 1.0  # noqa: E731
    uncond = lambda x, t: x * 0.0  # noqa: E731
    x = jnp.ones((2, 3))
    _close(dm.guided(cond, uncond, 3.0)(x, None), 3.0 * (x + 1.0), 1e-6)
    _close(dm.guided(cond, uncond, 1.0)(x, None), x + 1.0, 0)
    _close(dm.guided(cond, uncond, 0.0)(x, None), jnp.zeros_like(x), 0)


def test_diffusion_step_equals_the_objective_written_out():
    model = _denoiser(num_classes=3)
    schedule = dm.cosine_schedule(50)
    learner = diffusion(model, optax.sgd(0.1), schedule, example_shape=(2, 2, 3), num_classes=3,
                        label_dropout=0.5, ema_decay=0.9)
    x, y = _images(), jnp.array([0, 1, 2, 0, 1, 2, 0, 1], jnp.int32)
    ts = learner.init(jax.random.key(0), x)
    _close(ts.ema, ts.params, 0)
    new, metrics = jax.jit(learner.train_step_fn(None))(ts, x, y)

    key = jax.random.fold_in(ts.key, 0)
    drop = jax.random.bernoulli(jax.random.fold_in(key, _LABEL_STREAM), 0.5, (8,))
    labels = jnp.where(drop, 3, y)
    assert 0 < int(drop.sum()) < 8  # some labels became the null label
    t_key, noise_key, _ = jax.random.split(key, 3)
    t = jax.random.randint(t_key, (8,), 0, 50)
    noise = jax.random.normal(noise_key, x.shape)
    x_t = dm.add_noise(schedule, x * 2 - 1, t, noise)

    def loss(params):
        return jnp.mean((model.apply(params, {}, (x_t, t, labels))[0] - noise) ** 2)

    value, grads = jax.value_and_grad(loss)(ts.params)
    params = jax.tree.map(lambda p, g: p - 0.1 * g, ts.params, grads)
    _close(new.params, params, 1e-5)
    np.testing.assert_allclose(metrics["loss"], value, rtol=1e-6)
    decay = min(0.9, 1 / 10)  # the warm-up at step 0
    _close(new.ema, jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ts.ema, params), 1e-6)


def test_diffusion_eval_uses_the_moving_average_at_a_fixed_key():
    model = _denoiser()
    schedule = dm.cosine_schedule(50)
    learner = diffusion(model, optax.sgd(0.1), schedule, example_shape=(2, 2, 3))
    x = _images()
    ts = learner.init(jax.random.key(0), x)
    ts = ts._replace(params=jax.tree.map(lambda p: p * 0, ts.params))  # only ema is used
    got = jax.jit(learner.eval_step)(ts, x, None)["loss"]
    t_key, noise_key, _ = jax.random.split(jax.random.fold_in(ts.key, _EVAL_STREAM), 3)
    t = jax.random.randint(t_key, (8,), 0, 50)
    noise = jax.random.normal(noise_key, x.shape)
    eps, _ = model.apply(ts.ema, {}, (dm.add_noise(schedule, x * 2 - 1, t, noise), t))
    np.testing.assert_allclose(got, jnp.mean((eps - noise) ** 2), rtol=1e-6)


def test_diffusion_samples_labels_guidance_and_errors():
    learner = diffusion(_denoiser(num_classes=3), optax.sgd(0.1), dm.cosine_schedule(20),
                        example_shape=(2, 2, 3), num_classes=3, data_range=(0.0, 16.0))
    x = _images()
    ts = learner.init(jax.random.key(0), x)
    a = learner.sample(ts, jax.random.key(1), 4, steps=5, labels=jnp.array([0, 1, 2, 0]))
    assert a.shape == (4, 2, 2, 3) and 0 <= float(a.min()) and float(a.max()) <= 16
    guided = learner.sample(ts, jax.random.key(1), 4, steps=5, labels=jnp.array([0, 1, 2, 0]),
                            guidance=3.0)
    assert not np.allclose(a, guided)
    full = learner.sample(ts, jax.random.key(1), 2, labels=jnp.array([1, 2]))  # ancestral
    assert full.shape == (2, 2, 2, 3)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\), got 0 to 3"):
        learner.sample(ts, jax.random.key(1), 2, labels=jnp.array([0, 3]))
    with pytest.raises(ValueError, match="a class-conditional model needs integer labels"):
        learner.train_step_fn(None)(ts, x, None)
    with pytest.raises(ValueError, match=r"built for examples \(2, 2, 3\), but the data's "
                                         r"batches are float32\[8, 4, 4, 1\]"):
        learner.init(jax.random.key(0), jnp.zeros((8, 4, 4, 1)))
    plain = diffusion(_denoiser(), optax.sgd(0.1), dm.cosine_schedule(20),
                      example_shape=(2, 2, 3))
    ts = plain.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="labels and guidance are for a class-conditional"):
        plain.sample(ts, jax.random.key(1), 2, labels=jnp.array([0, 1]))
    with pytest.raises(ValueError, match="labels and guidance are for a class-conditional"):
        plain.sample(ts, jax.random.key(1), 2, guidance=2.0)
    with pytest.raises(ValueError, match="eta is DDIM's"):
        plain.sample(ts, jax.random.key(1), 2, eta=0.5)
    with pytest.raises(ValueError, match=r"diffusion: num_classes is 3 but the task's labels go "
                                         r"up to 9: give num_classes=10"):
        learner.check(ts, classification_task(load_digits(), 16))


def test_diffusion_skips_a_non_finite_step_ema_included():
    learner = diffusion(_denoiser(), optax.adam(1e-2), dm.cosine_schedule(20),
                        example_shape=(2, 2, 3))
    x = _images()
    ts = learner.init(jax.random.key(0), x)
    new, metrics = jax.jit(learner.train_step_fn(None))(ts, x.at[1].set(jnp.inf), None)
    assert int(metrics["skipped"]) == 1
    for name in ("params", "opt_state", "ema"):
        _close(getattr(new, name), getattr(ts, name), 0)


# ----------------------------------------------------------------------------- in the loop

def _task(n=64, batch=16):
    images = np.asarray(jax.random.uniform(jax.random.key(5), (n, 2, 2, 3)))
    labels = np.arange(n, dtype=np.int32) % 3
    split = fnn.data.Split(images, labels, images[:16], labels[:16])
    return classification_task(split, batch)


def _learners():
    return {"gan": gan(_generator(), _discriminator(), optax.adam(1e-2), latent_features=LATENT),
            "diffusion": diffusion(_denoiser(3), optax.adam(1e-2), dm.cosine_schedule(20),
                                   example_shape=(2, 2, 3), num_classes=3)}


@pytest.mark.parametrize("name", ["gan", "diffusion"])
@pytest.mark.parametrize("mode", ["pmap", "sharded"])
def test_data_parallel_equals_one_device(name, mode):
    learner = _learners()[name]
    task = _task()
    ts = learner.init(jax.random.key(0), task.example)
    one = data_parallel(learner, mode="none", donate=False)
    many = data_parallel(learner, mode=mode, devices=jax.devices()[:4], donate=False)
    a, b = one.put_state(ts), many.put_state(ts)
    for step in range(3):
        x, y = task.batch(step)
        a, ma = one.step(a, *one.put_batch(x, y))
        b, mb = many.step(b, *many.put_batch(x, y))
    a, b = one.get_state(a), many.get_state(b)
    _close((a.params, a.state, a.ema), (b.params, b.state, b.ema), 2e-5)
    np.testing.assert_allclose(float(ma["loss"]), float(mb["loss"]), rtol=1e-5)


@pytest.mark.parametrize("mode", ["pmap", "sharded"])
def test_a_dcgan_with_batchnorm_in_data_parallel_equals_one_device(mode):
    """BatchNorm in both networks: the statistics of the whole batch, the running statistics
    averaged, params and state as on one device."""
    from fnn.models import DCGANDiscriminator, DCGANGenerator

    images = np.asarray(jax.random.uniform(jax.random.key(5), (32, 8, 8, 1)))
    labels = np.zeros(32, np.int32)
    task = classification_task(fnn.data.Split(images, labels, images[:8], labels[:8]), 16)
    learner = gan(DCGANGenerator(4, features=4), DCGANDiscriminator(features=4),
                  optax.adam(1e-2), latent_features=4)
    ts = learner.init(jax.random.key(0), task.example)
    one = data_parallel(learner, mode="none", donate=False)
    many = data_parallel(learner, mode=mode, devices=jax.devices()[:4], donate=False)
    a, b = one.put_state(ts), many.put_state(ts)
    for step in range(2):
        x, y = task.batch(step)
        a, _ = one.step(a, *one.put_batch(x, y))
        b, _ = many.step(b, *many.put_batch(x, y))
    a, b = one.get_state(a), many.get_state(b)
    assert jax.tree.leaves(a.state["generator"])  # running statistics were kept
    _close((a.params, a.state), (b.params, b.state), 2e-5)


@pytest.mark.parametrize("name", ["gan", "diffusion"])
def test_the_loop_resumes_a_generative_run_bit_exactly(tmp_path, name):
    task = _task()
    options = dict(num_steps=12, eval_every=4, progress=False, checkpoint_every=4)
    whole, history = train_learner(_learners()[name], task, checkpoint_dir=tmp_path / "whole",
                                   **options)
    seen = []
    train_learner(_learners()[name], task, checkpoint_dir=tmp_path / "cut",
                  on_eval=lambda step, ts: seen.append(step), **options | {"num_steps": 8})
    assert seen == [4, 8]
    resumed, history2 = train_learner(_learners()[name], task, checkpoint_dir=tmp_path / "cut",
                                      resume=True, **options)
    _close(resumed._replace(key=None), whole._replace(key=None), 0)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa
    assert strip(history2) == strip(history)
    assert {"test_loss", "train_loss"} <= set(history[-1])
    if name == "gan":
        assert {"train_d_loss", "train_g_loss", "test_d_real", "test_d_fake"} <= set(history[-1])


def test_the_models_train_on_32x32_colour_images():
    """The DCGAN pair and the U-Net sized by their arguments: one step of each learner on
    32x32x3 images, and samples of that shape (the U-Net at two levels, without attention:
    its 32x32 shapes at more levels are tests/models/test_unet.py's)."""
    from fnn.models import DCGANDiscriminator, DCGANGenerator, UNet

    x = jax.random.uniform(jax.random.key(0), (4, 32, 32, 3))
    y = jnp.array([0, 1, 2, 1], jnp.int32)
    learners = [
        gan(DCGANGenerator(8, image_size=32, channels=3, features=4),
            DCGANDiscriminator(image_size=32, channels=3, features=4, spectral_norm=True),
            optax.adam(1e-3), latent_features=8),
        diffusion(UNet(channels=3, features=8, multipliers=(1, 2), attention_levels=(),
                       num_classes=3), optax.adam(1e-3), dm.cosine_schedule(10),
                  example_shape=(32, 32, 3), num_classes=3)]
    for learner in learners:
        ts = learner.init(jax.random.key(1), x)
        new, metrics = jax.jit(learner.train_step_fn(None))(ts, x, y)
        assert int(metrics["skipped"]) == 0 and np.isfinite(float(metrics["loss"]))
        options = {"steps": 2} if new.ema is not None else {}
        assert learner.sample(new, jax.random.key(2), 2, **options).shape == (2, 32, 32, 3)


def test_one_compiled_sampler_serves_every_guidance_scale():
    from fnn.train.generative import _jitted_sample

    learner = diffusion(_denoiser(num_classes=3), optax.sgd(0.1), dm.cosine_schedule(20),
                        example_shape=(2, 2, 3), num_classes=3)
    ts = learner.init(jax.random.key(0), _images())
    labels = jnp.array([0, 1, 2, 0])
    learner.sample(ts, jax.random.key(1), 4, steps=3, labels=labels, guidance=2.0)
    before = _jitted_sample._cache_size()
    outs = [learner.sample(ts, jax.random.key(1), 4, steps=3, labels=labels, guidance=g)
            for g in (0.0, 3.0, 5.5)]
    assert _jitted_sample._cache_size() == before
    assert not np.allclose(outs[1], outs[2])


def test_gan_sample_checks_its_latents():
    learner = gan(_generator(), _discriminator(), optax.sgd(0.1), latent_features=LATENT)
    ts = learner.init(jax.random.key(0), _images())
    with pytest.raises(ValueError, match=r"latents must be \[16, 4\] \(num, latent_features\), "
                                         r"got float32\[3, 4\]"):
        learner.sample(ts, None, 16, latents=jnp.zeros((3, LATENT)))
