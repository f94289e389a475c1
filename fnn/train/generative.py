"""Learners of generative models: a GAN (two networks, two optimizers, alternating steps) and a
denoising diffusion model (a noise schedule, a timestep per example, an exponential moving
average of the weights). Both are :class:`~fnn.train.Learner` s, so the loop of
:func:`fnn.train.train_learner` trains them as it trains a classifier: progress, evaluation,
checkpoints, bit-exact resume, non-finite steps skipped, data parallel in every mode.

Data: each learner maps its batches from ``data_range`` (the data's own scale: ``(0, 1)`` for
:func:`fnn.data.load_digits`) to ``[-1, 1]``, where the networks work, and its ``sample``
returns examples in the data's scale again, clipped to ``data_range``.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax
from jax import lax

from fnn import diffusion as dm
from fnn.core import Layer, as_spec, batch_axis, describe
from fnn.losses import GAN_LOSSES, gan_discriminator_loss, gan_generator_loss
from fnn.train.learner import Learner
from fnn.train.state import TrainState, _compiled_init
from fnn.train.step import _all_finite, _as_varying, _mean_floating

# fold_in of the base key: the held-out metrics' key, a step the int32 step counter never reaches
# (step s trains with fold_in(key, s)), so no training step shares it
_EVAL_STREAM = 2 ** 32 - 1
_LABEL_STREAM = 0x6c626c  # the key of a diffusion step's label dropout


def _init(model: Layer, key: jax.Array, x: Any):
    leaves, treedef = jax.tree.flatten(as_spec(x))
    return _compiled_init(model.init, treedef, tuple(leaves), key)


def _optimizer_init(optimizer, params):
    with jax.numpy_dtype_promotion("standard"):  # as create_train_state
        return optimizer.init(params)


def _counters():
    return tuple(jnp.zeros((), jnp.int32) for _ in range(3))  # three buffers: donation


def _data_scale(caller: str, data_range: Sequence[float]):
    """Maps between the data's ``data_range`` and ``[-1, 1]``."""
    try:
        low, high = (float(v) for v in data_range)
    except (TypeError, ValueError):
        raise ValueError(f"{caller}: data_range must be (low, high), got {data_range!r}") from None
    if not low < high:
        raise ValueError(f"{caller}: data_range must have low < high, got {data_range!r}")

    def to_model(x):
        return (jnp.asarray(x, jnp.float32) - low) * (2.0 / (high - low)) - 1.0

    def to_data(x):
        return jnp.clip((x + 1.0) * ((high - low) / 2.0) + low, low, high)

    return to_model, to_data


def _check_num(caller: str, num) -> None:
    if not isinstance(num, int) or isinstance(num, bool) or num <= 0:
        raise ValueError(f"{caller}: num must be a positive int, got {num!r}")


def _device_key(key: jax.Array, axis_name: str | None) -> jax.Array:
    """Each device's own key under an axis (for the models' own draws: dropout)."""
    return key if axis_name is None else jax.random.fold_in(key, lax.axis_index(axis_name))


def _draw(sample, key: jax.Array, shape: tuple[int, ...], axis_name: str | None) -> jax.Array:
    """``sample(key, shape)`` for this device's rows of the global batch: under an axis each
    device draws the whole batch's numbers and keeps its own rows, so that a data-parallel step
    draws the latents, timesteps and noise of one device on the whole batch."""
    if axis_name is None:
        return sample(key, shape)
    rows, devices = shape[0], lax.axis_size(axis_name)
    whole = sample(key, (rows * devices,) + tuple(shape[1:]))
    return lax.dynamic_slice_in_dim(whole, lax.axis_index(axis_name) * rows, rows)


def _varying(params, axis_name: str | None):
    """Per-device copies of ``params`` (see :func:`fnn.train.train_step_fn`): the gradient of
    each device's loss is then its own, under ``pmap`` and ``shard_map`` alike."""
    if axis_name is None:
        return params
    return jax.tree.map(lambda p: _as_varying(p, axis_name), params)


def _mean(tree, axis_name: str | None):
    return tree if axis_name is None else lax.pmean(tree, axis_name)


def _update(optimizer, grads, opt_state, params):
    with jax.numpy_dtype_promotion("standard"):  # optax mixes Python scalars and int32 counts
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state


def _finish(ts: TrainState, ok: jax.Array, update) -> TrainState:
    """The train state after a step: the fields ``update()`` gives (a dict of new ``params``,
    ``state``, ...) where the step was finite (``ok``), the old ones (in the new dtypes) where
    it was not; the counters either way. A ``lax.cond``, as in :func:`fnn.train.train_step_fn`:
    the update runs in place on donated buffers, and a skipped step computes none."""
    shapes = jax.eval_shape(update)

    def keep():
        return jax.tree.map(lambda old, new: old.astype(new.dtype),
                            {name: getattr(ts, name) for name in shapes}, shapes)

    kept = lax.cond(ok, update, keep)
    skipped = ts.skipped + (~ok).astype(jnp.int32)
    bad_streak = jnp.where(ok, jnp.zeros_like(ts.bad_streak), ts.bad_streak + 1)
    return ts._replace(step=ts.step + 1, skipped=skipped, bad_streak=bad_streak, **kept)


# ----------------------------------------------------------------------------- GAN

def gan(generator: Layer, discriminator: Layer, optimizer: optax.GradientTransformation,
        discriminator_optimizer: optax.GradientTransformation | None = None, *,
        latent_features: int, loss: str = "non_saturating",
        data_range: Sequence[float] = (0.0, 1.0)) -> Learner:
    """A generative adversarial network (Goodfellow et al., 2014) as a learner.

    ``generator``: latents ``[B, latent_features]`` (standard normal) to examples shaped like
    the data, in ``[-1, 1]`` (a tanh output: :func:`fnn.models.DCGANGenerator`);
    ``discriminator``: examples to one logit each, ``[B]`` (or ``[B, 1]``). Each step first
    updates the discriminator with ``discriminator_optimizer`` (default ``optimizer``) on a
    real batch and a generated one, then the generator with ``optimizer`` against the updated
    discriminator on new latents; ``loss`` is ``"non_saturating"`` or ``"hinge"``
    (:func:`fnn.losses.gan_discriminator_loss`). Labels of the batches are not used.

    The train state holds both networks: ``params``, ``state`` and ``opt_state`` are dicts
    ``{"generator": ..., "discriminator": ...}``. Metrics: ``d_loss``, ``g_loss``, ``d_real``
    and ``d_fake`` (the discriminator's mean probability of "real" on each batch) and ``loss``,
    the sum of both losses; held out, the same on the task's held-out examples with fixed
    latents. A step whose losses or gradients (of either network) are not finite leaves both
    as they were. ``learner.sample(ts, key, num)`` returns ``num`` generated examples in the
    data's scale.

    A generator with BatchNorm updates its running statistics twice a step (on the batch it
    makes for the discriminator's update and on its own step's), so its effective momentum is
    the square of its own. ``d_real`` and ``d_fake`` are ``sigmoid`` of the logits: the
    discriminator's probabilities under the non-saturating loss, a monotone score under the
    hinge loss, whose logits are not log-odds.
    """
    if loss not in GAN_LOSSES:
        raise ValueError(f"gan: loss must be one of {', '.join(GAN_LOSSES)}, got {loss!r}")
    if not isinstance(latent_features, int) or isinstance(latent_features, bool) \
            or latent_features <= 0:
        raise ValueError(f"gan: latent_features must be a positive int, got {latent_features!r}")
    d_optimizer = optimizer if discriminator_optimizer is None else discriminator_optimizer
    to_model, to_data = _data_scale("gan", data_range)

    def latent_draw(key, shape):
        return jax.random.normal(key, shape, jnp.float32)

    def latents(key, n):
        return latent_draw(key, (n, latent_features))

    def logits_of(name, logits, n):
        if jnp.shape(logits) not in ((n,), (n, 1)):
            raise ValueError(f"gan: the discriminator must give one logit per example, [{n}] "
                             f"or [{n}, 1]; got {describe(logits)} on the {name} batch")
        return logits.reshape(n)

    def init(key, x):
        g_key, d_key, train_key = jax.random.split(key, 3)
        n = jnp.shape(x)[0]
        g_params, g_state = _init(generator, g_key, jax.ShapeDtypeStruct(
            (n, latent_features), jnp.float32))
        fake = jax.eval_shape(lambda p, s, z: generator.apply(p, s, z)[0], g_params, g_state,
                              jax.ShapeDtypeStruct((n, latent_features), jnp.float32))
        if (fake.shape, jnp.dtype(fake.dtype).kind) != (tuple(jnp.shape(x)), "f"):
            raise ValueError(f"gan: the generator's output {describe(fake)} must have the data's "
                             f"shape {tuple(jnp.shape(x))} (floating)")
        d_params, d_state = _init(discriminator, d_key, jax.ShapeDtypeStruct(
            jnp.shape(x), jnp.float32))
        params = {"generator": g_params, "discriminator": d_params}
        opt_state = {"generator": _optimizer_init(optimizer, g_params),
                     "discriminator": _optimizer_init(d_optimizer, d_params)}
        step, skipped, bad_streak = _counters()
        return TrainState(params, {"generator": g_state, "discriminator": d_state}, opt_state,
                          step, train_key, skipped, bad_streak)

    def discriminate(d_params, d_state, x, key, name):
        logits, d_state = discriminator.apply(d_params, d_state, x, key=key, train=True)
        return logits_of(name, logits, x.shape[0]), d_state

    def train_step_fn(axis_name):
        def step(ts: TrainState, x, y):
            del y  # a GAN learns the examples alone
            keys = jax.random.split(jax.random.fold_in(ts.key, ts.step), 6)
            model_keys = [_device_key(k, axis_name) for k in keys]
            real = to_model(x)
            n = real.shape[0]
            g_params, d_params = ts.params["generator"], ts.params["discriminator"]
            g_state, d_state = ts.state["generator"], ts.state["discriminator"]

            def d_objective(d_params, g_state):
                fake, g_state = generator.apply(
                    g_params, g_state, _draw(latent_draw, keys[0], (n, latent_features),
                                             axis_name), key=model_keys[1], train=True)
                real_logits, state = discriminate(d_params, d_state, real, model_keys[2],
                                                  "real")
                fake_logits, state = discriminate(d_params, state, lax.stop_gradient(fake),
                                                  jax.random.fold_in(model_keys[2], 1),
                                                  "generated")
                value = gan_discriminator_loss(real_logits, fake_logits, kind=loss)
                probs = (jax.nn.sigmoid(real_logits).mean(), jax.nn.sigmoid(fake_logits).mean())
                return value, (state, g_state, probs)

            with batch_axis(axis_name):
                (d_loss, (d_state_new, g_state, (d_real, d_fake))), d_grads = \
                    jax.value_and_grad(d_objective, has_aux=True)(
                        _varying(d_params, axis_name), g_state)
            d_grads, d_loss = _mean((d_grads, d_loss), axis_name)
            d_params_new, d_opt = _update(d_optimizer, d_grads, ts.opt_state["discriminator"],
                                          d_params)

            def g_objective(g_params, g_state):
                fake, g_state = generator.apply(
                    g_params, g_state, _draw(latent_draw, keys[3], (n, latent_features),
                                             axis_name), key=model_keys[4], train=True)
                logits, _ = discriminate(d_params_new, d_state_new, fake, model_keys[5],
                                         "generated")
                return gan_generator_loss(logits, kind=loss), g_state

            with batch_axis(axis_name):
                (g_loss, g_state), g_grads = jax.value_and_grad(g_objective, has_aux=True)(
                    _varying(g_params, axis_name), g_state)
            g_grads, g_loss, d_real, d_fake = _mean((g_grads, g_loss, d_real, d_fake),
                                                    axis_name)
            state = {"generator": g_state, "discriminator": d_state_new}
            if axis_name is not None:
                state = _mean_floating(state, axis_name)
            ok = _all_finite(d_loss, d_grads) & _all_finite(g_loss, g_grads)

            def update():  # the discriminator's update is made: the generator's step needs it
                g_params_new, g_opt = _update(optimizer, g_grads, ts.opt_state["generator"],
                                              g_params)
                return {"params": {"generator": g_params_new, "discriminator": d_params_new},
                        "state": state,
                        "opt_state": {"generator": g_opt, "discriminator": d_opt}}

            new_ts = _finish(ts, ok, update)
            metrics = {"loss": d_loss + g_loss, "d_loss": d_loss, "g_loss": g_loss,
                       "d_real": d_real, "d_fake": d_fake}
            return new_ts, metrics | {"skipped": new_ts.skipped, "bad_streak": new_ts.bad_streak}

        return step

    def eval_step(ts: TrainState, x, y):
        del y
        real = to_model(x)
        n = real.shape[0]
        key = jax.random.fold_in(ts.key, _EVAL_STREAM)
        fake = generate(ts, key, n, scaled=False)
        d_params, d_state = ts.params["discriminator"], ts.state["discriminator"]
        real_logits = logits_of("real", discriminator.apply(d_params, d_state, real)[0], n)
        fake_logits = logits_of("generated", discriminator.apply(d_params, d_state, fake)[0], n)
        d_loss = gan_discriminator_loss(real_logits, fake_logits, kind=loss)
        g_loss = gan_generator_loss(fake_logits, kind=loss)
        return {"loss": d_loss + g_loss, "d_loss": d_loss, "g_loss": g_loss,
                "d_real": jax.nn.sigmoid(real_logits).mean(),
                "d_fake": jax.nn.sigmoid(fake_logits).mean()}

    def generate(ts: TrainState, key: jax.Array, num: int, *, scaled: bool = True):
        fake, _ = generator.apply(ts.params["generator"], ts.state["generator"],
                                  latents(key, num))
        return to_data(fake) if scaled else fake

    def sample(ts: TrainState, key: jax.Array, num: int, **options):
        """``num`` generated examples in the data's scale; ``options``: ``latents`` (``[num,
        latent_features]``, instead of drawing them from ``key``)."""
        _check_num("gan sample", num)
        if set(options) - {"latents"}:
            raise TypeError(f"gan sample: unknown options {sorted(set(options) - {'latents'})} "
                            f"(a GAN takes latents=)")
        z = options.get("latents")
        if z is None:
            return _jitted_generate(generate, ts, key, num)
        z = jnp.asarray(z, jnp.float32)
        if z.shape != (num, latent_features):
            raise ValueError(f"gan sample: latents must be [{num}, {latent_features}] (num, "
                             f"latent_features), got {describe(z)}")
        fake, _ = generator.apply(ts.params["generator"], ts.state["generator"], z)
        return to_data(fake)

    return Learner(init, train_step_fn, eval_step, sample=sample)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _jitted_generate(generate, ts, key, num):
    return generate(ts, key, num)


# ----------------------------------------------------------------------------- diffusion

def diffusion(model: Layer, optimizer: optax.GradientTransformation,
              schedule: dm.NoiseSchedule, *, example_shape: Sequence[int],
              num_classes: int | None = None,
              label_dropout: float = 0.1, ema_decay: float = 0.999,
              data_range: Sequence[float] = (0.0, 1.0)) -> Learner:
    """A denoising diffusion model (DDPM, Ho et al., 2020) as a learner: epsilon prediction.

    Each step draws a timestep ``t`` per example uniformly from the ``schedule``'s steps and
    noise ``eps``, and trains ``model`` on the mean squared error between ``eps`` and its
    prediction from ``x_t`` (:func:`fnn.diffusion.add_noise`); ``example_shape`` is one
    example's shape (``(8, 8, 1)`` for the digits). ``model`` takes ``(x_t, t)``,
    or ``(x_t, t, labels)`` with ``num_classes`` (a class-conditional model such as
    :func:`fnn.models.UNet` with ``num_classes``): the batch's labels, each replaced with
    probability ``label_dropout`` by the null label ``num_classes`` so that the same model
    also learns the unconditional prediction that classifier-free guidance needs.

    The train state keeps ``ema``, an exponential moving average of the params with decay
    ``min(ema_decay, (1 + step) / (10 + step))`` (the warm-up makes early averages follow the
    fast-moving params), updated after each finite step; the held-out ``loss`` (the same
    objective at fixed timesteps and noise) and the samples use it.
    ``learner.sample(ts, key, num, labels=None, steps=None, guidance=1.0, eta=0.0,
    return_chain=False)``: DDIM in ``steps`` steps (:func:`fnn.diffusion.ddim_sample`), or
    ancestral DDPM sampling through every step with ``steps=None``; ``labels: int[num]`` for a
    conditional model (default: ``0, 1, ...`` cycling over the classes), ``guidance`` the
    classifier-free guidance scale (:func:`fnn.diffusion.guided`). With ``return_chain`` it
    returns ``(samples, chain)``, the chain ``[steps + 1, num, ...]`` from the starting noise to
    the samples, every ``x_t`` mapped to the data's scale and clipped to ``data_range`` like the
    samples.
    """
    if num_classes is not None and (not isinstance(num_classes, int)
                                    or isinstance(num_classes, bool) or num_classes <= 0):
        raise ValueError(f"diffusion: num_classes must be a positive int or None, got "
                         f"{num_classes!r}")
    if not 0 <= label_dropout < 1:
        raise ValueError(f"diffusion: label_dropout must be in [0, 1), got {label_dropout!r}")
    if not 0 <= ema_decay < 1:
        raise ValueError(f"diffusion: ema_decay must be in [0, 1), got {ema_decay!r}")
    if not isinstance(schedule, dm.NoiseSchedule):
        raise TypeError(f"diffusion: schedule must be a NoiseSchedule (fnn.diffusion."
                        f"cosine_schedule(...)), got {type(schedule).__name__}")
    to_model, to_data = _data_scale("diffusion", data_range)
    num_steps = schedule.num_steps
    example_shape = tuple(example_shape)
    if not example_shape or not all(isinstance(n, int) and n > 0 for n in example_shape):
        raise ValueError(f"diffusion: example_shape must be one example's shape, positive ints "
                         f"such as (8, 8, 1), got {example_shape!r}")

    def inputs(x_t, t, labels):
        return (x_t, t) if num_classes is None else (x_t, t, labels)

    def check_labels(y, n):
        if num_classes is None:
            return None
        if y is None or jnp.shape(y) != (n,) or not jnp.issubdtype(jnp.result_type(y),
                                                                   jnp.integer):
            raise ValueError(f"diffusion: a class-conditional model needs integer labels "
                             f"[{n}] with the batch, got {describe(y)}")
        return y.astype(jnp.int32)

    def init(key, x):
        init_key, train_key = jax.random.split(key)
        n = jnp.shape(x)[0]
        if tuple(jnp.shape(x)[1:]) != example_shape:
            raise ValueError(f"diffusion: the learner was built for examples {example_shape}, "
                             f"but the data's batches are {describe(x)}")
        spec = jax.ShapeDtypeStruct(jnp.shape(x), jnp.float32)
        t = jax.ShapeDtypeStruct((n,), jnp.int32)
        params, state = _init(model, init_key, inputs(spec, t, t))
        out = jax.eval_shape(lambda p, s, v: model.apply(p, s, v)[0], params, state,
                             inputs(spec, t, t))
        if tuple(out.shape) != tuple(spec.shape):
            raise ValueError(f"diffusion: the model predicts the noise, so its output must have "
                             f"the data's shape {tuple(spec.shape)}; got {describe(out)}")
        step, skipped, bad_streak = _counters()
        return TrainState(params, state, _optimizer_init(optimizer, params), step, train_key,
                          skipped, bad_streak, ema=jax.tree.map(jnp.copy, params))

    def denoising_loss(params, state, x0, labels, key, train, axis_name=None):
        t_key, noise_key, model_key = jax.random.split(key, 3)
        n = x0.shape[0]
        t = _draw(lambda k, shape: jax.random.randint(k, shape, 0, num_steps), t_key, (n,),
                  axis_name)
        noise = _draw(lambda k, shape: jax.random.normal(k, shape, jnp.float32), noise_key,
                      x0.shape, axis_name)
        x_t = dm.add_noise(schedule, x0, t, noise)
        eps, state = model.apply(params, state, inputs(x_t, t, labels),
                                 key=_device_key(model_key, axis_name) if train else None,
                                 train=train)
        return jnp.mean(jnp.square(eps.astype(jnp.float32) - noise)), state

    def train_step_fn(axis_name):
        def step(ts: TrainState, x, y):
            key = jax.random.fold_in(ts.key, ts.step)
            x0 = to_model(x)
            labels = check_labels(y, x0.shape[0])
            if labels is not None and label_dropout > 0:
                drop = _draw(lambda k, shape: jax.random.bernoulli(k, label_dropout, shape),
                             jax.random.fold_in(key, _LABEL_STREAM), labels.shape, axis_name)
                labels = jnp.where(drop, num_classes, labels)
            with batch_axis(axis_name):
                (value, state), grads = jax.value_and_grad(denoising_loss, has_aux=True)(
                    _varying(ts.params, axis_name), ts.state, x0, labels, key, True,
                    axis_name)
            grads, value = _mean((grads, value), axis_name)
            if axis_name is not None:
                state = _mean_floating(state, axis_name)
            ok = _all_finite(value, grads)

            def update():
                params, opt_state = _update(optimizer, grads, ts.opt_state, ts.params)
                step_f = ts.step.astype(jnp.float32)
                decay = jnp.minimum(ema_decay, (1 + step_f) / (10 + step_f))
                ema = jax.tree.map(lambda e, p: (decay * e + (1 - decay) * p).astype(e.dtype),
                                   ts.ema, params)
                return {"params": params, "state": state, "opt_state": opt_state, "ema": ema}

            new_ts = _finish(ts, ok, update)
            return new_ts, {"loss": value, "skipped": new_ts.skipped,
                            "bad_streak": new_ts.bad_streak}

        return step

    def eval_step(ts: TrainState, x, y):
        x0 = to_model(x)
        labels = check_labels(y, x0.shape[0])
        value, _ = denoising_loss(ts.ema, ts.state, x0, labels,
                                  jax.random.fold_in(ts.key, _EVAL_STREAM), False)
        return {"loss": value}

    def sample(ts: TrainState, key: jax.Array, num: int, *, labels=None,
               steps: int | None = None, guidance: float = 1.0, eta: float = 0.0,
               return_chain: bool = False):
        _check_num("diffusion sample", num)
        if num_classes is None:
            if labels is not None or guidance != 1:
                raise ValueError("diffusion sample: labels and guidance are for a "
                                 "class-conditional model; this one has no num_classes")
        else:
            labels = jnp.arange(num) % num_classes if labels is None else jnp.asarray(labels)
            if labels.shape != (num,) or not jnp.issubdtype(labels.dtype, jnp.integer):
                raise ValueError(f"diffusion sample: labels must be int[{num}], got "
                                 f"{describe(labels)}")
            if num and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
                raise ValueError(f"diffusion sample: labels must lie in [0, {num_classes}), "
                                 f"got {int(labels.min())} to {int(labels.max())}")
        if not guidance >= 0:
            raise ValueError(f"diffusion sample: guidance must be >= 0, got {guidance!r}")
        if steps is None and eta != 0:
            raise ValueError(f"diffusion sample: eta is DDIM's (give steps); ancestral sampling "
                             f"(steps=None) has its own noise, got eta={eta!r}")
        # the scale is traced: one compiled sampler serves every guidance but 1 (no guidance)
        return _jitted_sample(sampler, ts, key, labels, jnp.float32(guidance), num, steps,
                              num_classes is not None and guidance != 1, float(eta),
                              return_chain)

    def sampler(ts, key, labels, guidance, num, steps, use_guidance, eta, return_chain):
        def denoise_with(label_ids):
            def denoise(x_t, t):
                eps, _ = model.apply(ts.ema, ts.state, inputs(x_t, t, label_ids))
                return eps
            return denoise

        denoise = denoise_with(labels)
        if use_guidance:
            denoise = dm.guided(denoise, denoise_with(jnp.full_like(labels, num_classes)),
                                guidance)
        shape = (num,) + example_shape
        if steps is None:
            x0 = dm.ddpm_sample(denoise, schedule, key, shape, return_chain=return_chain)
        else:
            x0 = dm.ddim_sample(denoise, schedule, key, shape, steps=steps, eta=eta,
                                return_chain=return_chain)
        if return_chain:
            return to_data(x0[0]), to_data(x0[1])
        return to_data(x0)

    def check(ts, task):
        used = getattr(task, "num_classes", None)
        if num_classes is not None and used is not None and used > num_classes:
            raise ValueError(f"diffusion: num_classes is {num_classes} but the task's labels go "
                             f"up to {used - 1}: give num_classes={used}")

    return Learner(init, train_step_fn, eval_step, check=check, sample=sample)


@functools.partial(jax.jit, static_argnums=(0, 5, 6, 7, 8, 9))
def _jitted_sample(sampler, ts, key, labels, guidance, num, steps, use_guidance, eta,
                   return_chain):
    return sampler(ts, key, labels, guidance, num, steps, use_guidance, eta, return_chain)
