"""DDIM inversion: running the deterministic DDIM sampler backwards, clean video -> noise.

Each step moves ``x`` from the noise level ``a_cur`` up to ``a_next = alphas_cumprod[t]``,
using the model's epsilon at timestep ``t`` (the first ``C`` output channels; the rest are the
learned variance). The whole loop is one ``lax.scan`` under ``jit``; ``pmap_ddim_invert``
spreads a batch of clips over the local devices.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vmc_jax import schedulers
from vmc_jax.schedulers import Scheduler

METHODS = ("model", "official")

# The scheduler config the released VMC inverts with: Stable Diffusion's PNDM config, read as DDIM.
RELEASED_INVERSION_SCHEDULER = {
    "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "trained_betas": None, "clip_sample": False,
}


def as_ddim(scheduler: Scheduler) -> Scheduler:
    """The deterministic DDIM sampler on ``scheduler``'s noise schedule and timestep spacing,
    ending at alpha 1 (the clean data): the sampler that :func:`ddim_invert` ("model") inverts.
    """
    return dataclasses.replace(scheduler, algorithm="ddim", eta=0.0, set_alpha_to_one=True,
                               clip_sample=False, thresholding=False)


def inversion_schedule(scheduler: Scheduler, num_steps: int, method: str = "model") -> tuple[np.ndarray, ...]:
    """Per step, ascending: the model timestep ``t``, and the cumulative alphas ``a_cur`` -> ``a_next``.

    "model": the exact reverse of ``as_ddim(scheduler)``'s steps, so sampling back with that
    sampler retraces them. "official": the released VMC / Tune-A-Video ``next_step``: DDIM
    timesteps of the given config (its own ``steps_offset`` and ``set_alpha_to_one``),
    ``t_cur = min(t - T // num_steps, T - 1)``, the final alpha where ``t_cur < 0``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown inversion method {method!r}; expected one of {METHODS}")
    ddim = as_ddim(scheduler) if method == "model" else dataclasses.replace(scheduler, algorithm="ddim")
    inputs = schedulers.step_inputs(ddim, num_steps)
    t = inputs.t[::-1]
    if method == "model":
        t_cur = inputs.prev_t[::-1]
    else:
        total = scheduler.num_train_timesteps
        t_cur = np.minimum(t - total // num_steps, total - 1)
    acp = ddim.alphas_cumprod
    a_cur = np.where(t_cur >= 0, acp[np.maximum(t_cur, 0)], ddim.final_alpha_cumprod).astype(np.float32)
    return t.astype(np.int32), a_cur, acp[t].astype(np.float32)


def inversion_update(x: jax.Array, eps: jax.Array, a_cur: jax.Array, a_next: jax.Array) -> jax.Array:
    """One deterministic DDIM step up the noise levels: x at ``a_cur`` -> x at ``a_next``."""
    x0_pred = (x - jnp.sqrt(1 - a_cur) * eps) / jnp.sqrt(a_cur)
    return jnp.sqrt(a_next) * x0_pred + jnp.sqrt(1 - a_next) * eps


def _invert(model: nn.Module, scheduler: Scheduler, num_steps: int, method: str, return_trajectory: bool,
            params: Any, x0: jax.Array, encoder_hidden_states: jax.Array) -> jax.Array:
    if scheduler.prediction_type != "epsilon":
        raise ValueError(f"DDIM inversion needs an epsilon-predicting model, the scheduler says "
                         f"prediction_type={scheduler.prediction_type!r}")
    channels = x0.shape[-1]
    batch = x0.shape[0]
    text = jnp.broadcast_to(encoder_hidden_states, (batch, *encoder_hidden_states.shape[1:]))

    def step(x, xs):
        t, a_cur, a_next = xs
        eps = model.apply({"params": params}, x, jnp.full((batch,), t), text)[..., :channels].astype(jnp.float32)
        x = inversion_update(x, eps, a_cur, a_next)
        return x, x if return_trajectory else None

    x_T, path = jax.lax.scan(step, x0.astype(jnp.float32), inversion_schedule(scheduler, num_steps, method))
    return jnp.concatenate([x0[None].astype(jnp.float32), path]) if return_trajectory else x_T


_STATIC = ("model", "scheduler", "num_steps", "method", "return_trajectory")
_invert_jit = jax.jit(_invert, static_argnames=_STATIC)


def ddim_invert(model: nn.Module, params: Any, x0: jax.Array, encoder_hidden_states: jax.Array,
                scheduler: Scheduler, num_steps: int, method: str = "model",
                return_trajectory: bool = False) -> jax.Array:
    """Inverts clean videos ``x0`` ``(b, f, h, w, c)`` to the noise x_T, in one compiled loop.

    ``encoder_hidden_states`` ``(b or 1, L, d)`` condition every step (VMC inverts with the empty
    prompt). ``return_trajectory`` returns the ``num_steps + 1`` latents from x0 to x_T instead,
    stacked on a new leading axis. See :func:`inversion_schedule` for the two methods.
    """
    return _invert_jit(model, scheduler, num_steps, method, return_trajectory, params, jnp.asarray(x0),
                       jnp.asarray(encoder_hidden_states))


@functools.lru_cache(maxsize=None)
def _pmapped(model: nn.Module, scheduler: Scheduler, num_steps: int, method: str, return_trajectory: bool):
    run = functools.partial(_invert, model, scheduler, num_steps, method, return_trajectory)
    return jax.pmap(run, in_axes=(None, 0, 0))


def pmap_ddim_invert(model: nn.Module, params: Any, x0: jax.Array, encoder_hidden_states: jax.Array,
                     scheduler: Scheduler, num_steps: int, method: str = "model",
                     return_trajectory: bool = False) -> jax.Array:
    """:func:`ddim_invert` with the batch of clips split over all local devices (``jax.pmap``).

    A batch that does not divide by the device count is padded with copies of its last clip
    (a warning says so) and the padding is dropped from the result.
    """
    devices = jax.local_device_count()
    x0 = jnp.asarray(x0)
    batch = x0.shape[0]
    text = jnp.broadcast_to(jnp.asarray(encoder_hidden_states), (batch, *encoder_hidden_states.shape[1:]))
    pad = -batch % devices
    if pad:
        logging.warning("pmap_ddim_invert: padding a batch of %d clips to %d for %d devices",
                        batch, batch + pad, devices)
        x0 = jnp.concatenate([x0, jnp.repeat(x0[-1:], pad, axis=0)])
        text = jnp.concatenate([text, jnp.repeat(text[-1:], pad, axis=0)])

    def shard(a):
        return a.reshape(devices, -1, *a.shape[1:])

    out = _pmapped(model, scheduler, num_steps, method, return_trajectory)(params, shard(x0), shard(text))
    if return_trajectory:  # (devices, steps + 1, b / devices, ...) -> (steps + 1, b, ...)
        out = jnp.moveaxis(out, 0, 1)
        return out.reshape(out.shape[0], -1, *out.shape[3:])[:, :batch]
    return out.reshape(-1, *out.shape[2:])[:batch]
