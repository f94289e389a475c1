"""Denoising diffusion (Ho et al., 2020): noise schedules, the forward (noising) process and
the samplers that run it backwards, for any denoiser that predicts the added noise.

    schedule = fnn.diffusion.cosine_schedule(1000)
    x_t = fnn.diffusion.add_noise(schedule, x0, t, noise)          # training inputs
    denoise = lambda x, t: model.apply(params, state, (x, t), train=False)[0]
    x0 = fnn.diffusion.ddim_sample(denoise, schedule, key, (16, 8, 8, 1), steps=50)

Conventions: timesteps are ``int32`` in ``[0, num_steps)``, step ``t`` adding noise of variance
``betas[t]``, so ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` with ``abar_t =
prod(1 - betas[:t + 1])``; data lie in ``[-1, 1]`` (the samplers clip their estimate of ``x_0``
to it, as DDPM's sampler does); a denoiser ``denoise(x_t, t) -> eps`` gets ``x_t: [B, ...]``
and ``t: int32[B]``. Classifier-free guidance (Ho & Salimans, 2021) is :func:`guided`.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Denoiser = Callable[[jax.Array, jax.Array], jax.Array]  # (x_t, t) -> predicted noise

__all__ = ["NoiseSchedule", "linear_schedule", "cosine_schedule", "SCHEDULES", "add_noise",
           "predict_x0", "ddpm_sample", "ddim_sample", "guided", "Denoiser"]


class NoiseSchedule(NamedTuple):
    """The variances of the forward process, ``float32[num_steps]`` each:
    ``betas`` (step ``t``'s noise variance) and ``alphas_cumprod`` (``abar_t``)."""

    betas: jax.Array
    alphas_cumprod: jax.Array

    @property
    def num_steps(self) -> int:
        return int(self.betas.shape[0])


def _schedule(betas: np.ndarray) -> NoiseSchedule:
    betas = np.asarray(betas, np.float64)
    return NoiseSchedule(jnp.asarray(betas, jnp.float32),
                         jnp.asarray(np.cumprod(1.0 - betas), jnp.float32))


def _check_steps(caller: str, num_steps) -> None:
    if not isinstance(num_steps, (int, np.integer)) or isinstance(num_steps, bool) \
            or num_steps < 2:
        raise ValueError(f"{caller}: num_steps must be an int >= 2, got {num_steps!r}")


def linear_schedule(num_steps: int = 1000, *, beta_start: float | None = None,
                    beta_end: float | None = None) -> NoiseSchedule:
    """DDPM's linear betas, from ``beta_start`` to ``beta_end`` over ``num_steps`` steps.

    The defaults are DDPM's ``1e-4`` and ``0.02`` at 1,000 steps, scaled by ``1000 /
    num_steps`` for other lengths (as Nichol & Dhariwal, 2021, do) so that the last step is
    noise whatever the length (``abar`` ends near ``4e-5``)."""
    _check_steps("linear_schedule", num_steps)
    scale = 1000 / num_steps
    start = 1e-4 * scale if beta_start is None else beta_start
    end = 0.02 * scale if beta_end is None else beta_end
    if not 0 < start <= end < 1:
        raise ValueError(f"linear_schedule: expected 0 < beta_start <= beta_end < 1, got "
                         f"{start} and {end}")
    return _schedule(np.linspace(start, end, num_steps))


def cosine_schedule(num_steps: int = 1000, *, offset: float = 0.008,
                    max_beta: float = 0.999) -> NoiseSchedule:
    """The cosine schedule of Nichol & Dhariwal (2021): ``abar(t) = f(t) / f(0)`` with ``f(t) =
    cos((t / T + offset) / (1 + offset) * pi / 2) ** 2``, each beta capped at ``max_beta``."""
    _check_steps("cosine_schedule", num_steps)
    if not 0 < max_beta < 1 or offset < 0:
        raise ValueError(f"cosine_schedule: expected offset >= 0 and 0 < max_beta < 1, got "
                         f"{offset} and {max_beta}")

    def f(t):
        return math.cos((t / num_steps + offset) / (1 + offset) * math.pi / 2) ** 2

    betas = [min(1 - f(i + 1) / f(i), max_beta) for i in range(num_steps)]
    return _schedule(np.asarray(betas))


SCHEDULES = {"linear": linear_schedule, "cosine": cosine_schedule}


def _per_example(values: jax.Array, t: jax.Array, ndim: int) -> jax.Array:
    """``values[t]`` shaped ``[B, 1, ...]`` to broadcast against a batch of rank ``ndim``."""
    return values[t].reshape(t.shape + (1,) * (ndim - t.ndim))


def add_noise(schedule: NoiseSchedule, x0: jax.Array, t: jax.Array,
              noise: jax.Array) -> jax.Array:
    """``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`` for ``x0, noise: [B, ...]`` and
    ``t: int[B]``."""
    abar = _per_example(schedule.alphas_cumprod, t, x0.ndim)
    return jnp.sqrt(abar) * x0 + jnp.sqrt(1 - abar) * noise


def predict_x0(schedule: NoiseSchedule, x_t: jax.Array, t: jax.Array,
               eps: jax.Array) -> jax.Array:
    """The ``x0`` that ``x_t`` and the predicted noise ``eps`` imply (:func:`add_noise`
    solved for ``x0``)."""
    abar = _per_example(schedule.alphas_cumprod, t, x_t.ndim)
    return (x_t - jnp.sqrt(1 - abar) * eps) / jnp.sqrt(abar)


def guided(denoise_conditional: Denoiser, denoise_unconditional: Denoiser,
           guidance: float) -> Denoiser:
    """Classifier-free guidance: ``eps_u + guidance * (eps_c - eps_u)``. ``guidance=1`` is the
    conditional model alone, ``0`` the unconditional one, larger values trade diversity for
    fidelity to the condition. ``guidance`` may be a traced scalar (one compiled sampler for
    every scale)."""
    if isinstance(guidance, (int, float)) and guidance == 1:  # a traced scale computes both
        return denoise_conditional

    def denoise(x, t):
        eps_u = denoise_unconditional(x, t)
        return eps_u + guidance * (denoise_conditional(x, t) - eps_u)

    return denoise


def _check_shape(caller: str, shape) -> tuple[int, ...]:
    shape = tuple(int(n) for n in shape)
    if len(shape) < 1 or min(shape) <= 0:
        raise ValueError(f"{caller}: shape must be [batch, ...] with every size positive, got "
                         f"{shape}")
    return shape


def ddpm_sample(denoise: Denoiser, schedule: NoiseSchedule, key: jax.Array,
                shape, *, clip: bool = True, return_chain: bool = False):
    """Ancestral sampling (DDPM, Algorithm 2) through every step, ``T - 1`` down to 0: from
    ``x_T ~ N(0, I)`` of ``shape`` each step draws ``x_{t-1}`` from the posterior
    ``q(x_{t-1} | x_t, x0_hat)``, ``x0_hat`` the denoiser's estimate (clipped to ``[-1, 1]``
    with ``clip``), whose variance is ``beta_tilde_t = beta_t (1 - abar_{t-1}) / (1 - abar_t)``;
    the last step returns its mean. Returns ``x_0: shape``; with ``return_chain`` also every
    ``x_t``, ``[T + 1, *shape]`` from ``x_T`` to ``x_0``."""
    shape = _check_shape("ddpm_sample", shape)
    betas, abar = schedule.betas, schedule.alphas_cumprod
    abar_prev = jnp.concatenate([jnp.ones((1,), abar.dtype), abar[:-1]])
    # the posterior's mean is c0 * x0_hat + ct * x_t
    c0 = betas * jnp.sqrt(abar_prev) / (1 - abar)
    ct = (1 - abar_prev) * jnp.sqrt(1 - betas) / (1 - abar)
    variance = betas * (1 - abar_prev) / (1 - abar)
    start_key, noise_key = jax.random.split(key)
    x_T = jax.random.normal(start_key, shape, jnp.float32)

    def step(x, t):
        ts = jnp.full(shape[:1], t, jnp.int32)
        x0 = predict_x0(schedule, x, ts, denoise(x, ts).astype(jnp.float32))
        if clip:
            x0 = jnp.clip(x0, -1.0, 1.0)
        mean = c0[t] * x0 + ct[t] * x
        z = jax.random.normal(jax.random.fold_in(noise_key, t), shape, jnp.float32)
        x = mean + jnp.where(t > 0, jnp.sqrt(variance[t]), 0.0) * z
        return x, x

    x0, chain = lax.scan(step, x_T, jnp.arange(schedule.num_steps - 1, -1, -1))
    return (x0, jnp.concatenate([x_T[None], chain])) if return_chain else x0


def ddim_sample(denoise: Denoiser, schedule: NoiseSchedule, key: jax.Array, shape, *,
                steps: int = 50, eta: float = 0.0, clip: bool = True,
                return_chain: bool = False):
    """DDIM sampling (Song et al., 2021) in ``steps`` evenly spaced timesteps of the schedule,
    from ``T - 1`` down (to 0 with two steps or more): ``x_prev = sqrt(abar_prev) x0_hat +
    sqrt(1 - abar_prev - sigma^2) eps + sigma z`` with ``sigma = eta * sqrt((1 - abar_prev) / (1 - abar) (1 - abar /
    abar_prev))``. ``eta=0`` is deterministic given ``x_T``; ``eta=1`` with every step is close
    to ancestral sampling. ``x0_hat`` is clipped to ``[-1, 1]`` with ``clip`` (and ``eps``
    recomputed from it). Returns ``x_0: shape``; with ``return_chain`` also ``[steps + 1,
    *shape]``, ``x_T`` to ``x_0``."""
    shape = _check_shape("ddim_sample", shape)
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) \
            or not 1 <= steps <= schedule.num_steps:
        raise ValueError(f"ddim_sample: steps must be an int in [1, {schedule.num_steps}] (the "
                         f"schedule's steps), got {steps!r}")
    if not eta >= 0:
        raise ValueError(f"ddim_sample: eta must be >= 0, got {eta!r}")
    # from the last step down, so that even one step starts from pure noise at T - 1
    times = np.unique(np.round(np.linspace(schedule.num_steps - 1, 0, steps)).astype(np.int32))
    times = jnp.asarray(times[::-1].copy())
    previous = jnp.concatenate([times[1:], jnp.full((1,), -1, jnp.int32)])
    abar = schedule.alphas_cumprod
    start_key, noise_key = jax.random.split(key)
    x_T = jax.random.normal(start_key, shape, jnp.float32)

    def step(x, tp):
        t, t_prev = tp
        ts = jnp.full(shape[:1], t, jnp.int32)
        eps = denoise(x, ts).astype(jnp.float32)
        x0 = predict_x0(schedule, x, ts, eps)
        if clip:
            x0 = jnp.clip(x0, -1.0, 1.0)
            eps = (x - jnp.sqrt(abar[t]) * x0) / jnp.sqrt(1 - abar[t])
        a_prev = jnp.where(t_prev >= 0, abar[jnp.maximum(t_prev, 0)], 1.0)
        sigma = eta * jnp.sqrt((1 - a_prev) / (1 - abar[t]) * (1 - abar[t] / a_prev))
        z = jax.random.normal(jax.random.fold_in(noise_key, t), shape, jnp.float32)
        x = (jnp.sqrt(a_prev) * x0 + jnp.sqrt(jnp.maximum(1 - a_prev - sigma ** 2, 0.0)) * eps
             + sigma * z)
        return x, x

    x0, chain = lax.scan(step, x_T, (times, previous))
    return (x0, jnp.concatenate([x_T[None], chain])) if return_chain else x0
