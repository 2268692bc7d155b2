"""Keyframe generation from inverted noise: guided sampling with the (tuned) keyframe UNet."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vmc_jax import inversion, sampling, schedulers
from vmc_jax.schedulers import Scheduler


@dataclasses.dataclass(frozen=True)
class UNetDenoiser:
    """``denoise_fn(x_t, t, params, text)`` of a UNet; keeps the variance channels only when the
    scheduler uses them. Equal for equal models, so the compiled sampling loop is reused.
    """

    model: nn.Module
    learned_variance: bool

    def __call__(self, x: jax.Array, t: jax.Array, params: Any, text: jax.Array) -> jax.Array:
        out = self.model.apply({"params": params}, x, jnp.full((x.shape[0],), t), text)
        return out if self.learned_variance else out[..., : x.shape[-1]]


def sample_keyframes(model: nn.Module, params: Any, scheduler: Scheduler, x_T: jax.Array, text: jax.Array,
                     negative_text: jax.Array, steps: int, guidance: float, rng: jax.Array | None = None,
                     noise: jax.Array | None = None) -> jax.Array:
    """Denoises ``x_T`` ``(b, f, h, w, c)`` with classifier-free guidance; returns frames in [-1, 1].

    ``text`` and ``negative_text`` are ``(1 or b, L, d)`` encoder states (Show-1 guides against
    the empty or a negative prompt). ``rng`` or ``noise`` feed the per-step noise (`sample_loop`).
    """
    batch = x_T.shape[0]
    both = jnp.concatenate([jnp.broadcast_to(negative_text, (batch, *negative_text.shape[1:])),
                            jnp.broadcast_to(text, (batch, *text.shape[1:]))])
    denoiser = UNetDenoiser(model, scheduler.variance_type == "learned_range")
    guided = sampling.classifier_free_guidance(denoiser, guidance)
    frames = sampling.sample_loop(scheduler, guided, x_T, steps, rng=rng, noise=noise,
                                  denoise_args=(params, both))
    return jnp.clip(frames, -1.0, 1.0)


def inversion_scheduler(model_scheduler: Scheduler, method: str, config_path: str | None) -> Scheduler:
    """The schedule to invert on: the model's own, or for "official" the given (default: released) config."""
    if config_path:
        return schedulers.from_config(config_path)
    if method == "official":
        return schedulers.from_config(inversion.RELEASED_INVERSION_SCHEDULER)
    return model_scheduler
