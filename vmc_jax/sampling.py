"""Jitted diffusion sampling: the whole denoising loop as one `lax.scan`, and classifier-free guidance.

A denoiser is any callable `denoise_fn(x_t, t, *denoise_args) -> model_output`:
  x_t            float32 (batch, ..., channels), channels last;
  t              the integer training timestep, an int32 scalar array;
  denoise_args   arrays passed through `sample_loop` (e.g. the model parameters and text states);
  model_output   like x_t, or with twice its channels: the prediction then the learned-range
                 variance value (DeepFloyd IF / Show-1 models).
`sample_loop` takes `denoise_fn` as a static jit argument: reuse the same function object to reuse
the compiled loop, and pass large arrays (weights) through `denoise_args` rather than closing over
them, so that they are arguments of the compiled program, not constants baked into it, and new
values (e.g. tuned weights) do not recompile.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from vmc_jax import schedulers
from vmc_jax.schedulers import Scheduler

DenoiseFn = Callable[..., jax.Array]


@functools.partial(jax.jit, static_argnames=("scheduler", "denoise_fn", "num_inference_steps", "first_step",
                                             "shared_noise"))
def sample_loop(
    scheduler: Scheduler,
    denoise_fn: DenoiseFn,
    x_T: jax.Array,
    num_inference_steps: int,
    rng: jax.Array | None = None,
    noise: jax.Array | None = None,
    denoise_args: tuple = (),
    first_step: int = 0,
    shared_noise: bool = False,
) -> jax.Array:
    """Denoise x_T into x_0 with `scheduler`'s sampler in one jitted `lax.scan` over the steps.

    rng: PRNG key feeding the per-step noise of stochastic samplers (DDPM, DDIM with eta > 0).
    noise: instead of rng, the per-step noise itself, shape (steps, *draw), to reproduce another
      implementation's draws. Both are unused by deterministic samplers.
    first_step: the run's steps before it are skipped (an img2img strength: x_T is then the data
      noised to that step's timestep, see `schedulers.step_inputs`).
    shared_noise: each step draws one noise of shape draw = x_T.shape[1:], shared by every item of
      the batch (the cascade's windows, which the reference runs as calls re-seeded alike);
      otherwise draw = x_T.shape.
    Returns float32 x_0 shaped like x_T. See the module docstring for `denoise_fn`.
    """
    inputs = schedulers.step_inputs(scheduler, num_inference_steps, first_step)
    x = x_T.astype(jnp.float32)
    draw_shape = x.shape[1:] if shared_noise else x.shape
    draws = None
    if scheduler.needs_noise:
        if noise is None and rng is None:
            raise ValueError(f"the {scheduler.algorithm} sampler adds noise: pass `rng` (or `noise`)")
        if noise is not None and noise.shape != (len(inputs.t), *draw_shape):
            raise ValueError(f"noise has shape {noise.shape}, expected {(len(inputs.t), *draw_shape)}")
        draws = jax.random.split(rng, len(inputs.t)) if noise is None else noise

    def body(carry, step_xs):
        x, state = carry
        step_inputs, draw = step_xs
        model_output = denoise_fn(x, step_inputs.t, *denoise_args)
        if draw is not None:
            draw = jax.random.normal(draw, draw_shape, jnp.float32) if noise is None else draw
            draw = jnp.broadcast_to(draw, x.shape)
        return schedulers.step(scheduler, model_output, x, step_inputs, state, draw), None

    (x, _), _ = jax.lax.scan(body, (x, schedulers.init_state(scheduler, x)), (inputs, draws))
    return x


@dataclasses.dataclass(frozen=True)
class _Guided:
    """`classifier_free_guidance`'s denoiser; equal for equal arguments, so jit caches hit."""

    model_fn: DenoiseFn
    guidance_scale: float
    guidance_rescale: float = 0.0

    def __call__(self, x_t: jax.Array, t: jax.Array, *args: Any) -> jax.Array:
        out = self.model_fn(jnp.concatenate([x_t, x_t]), t, *args)
        uncond, cond = jnp.split(out, 2)
        channels = x_t.shape[-1]
        eps_uncond, eps_cond = uncond[..., :channels], cond[..., :channels]
        eps = eps_uncond + self.guidance_scale * (eps_cond - eps_uncond)
        if self.guidance_rescale:
            eps = self.guidance_rescale * eps * (_item_std(eps_cond) / _item_std(eps)) + (1 - self.guidance_rescale) * eps
        return jnp.concatenate([eps, cond[..., channels:]], axis=-1)


def _item_std(x: jax.Array) -> jax.Array:
    """The standard deviation (n - 1 in the denominator, as torch's) of each batch item, shaped to broadcast."""
    return jnp.std(x, axis=tuple(range(1, x.ndim)), ddof=1, keepdims=True)


def classifier_free_guidance(model_fn: DenoiseFn, guidance_scale: float, guidance_rescale: float = 0.0) -> DenoiseFn:
    """Wrap `model_fn` into a guided denoiser that runs the unconditional and conditional passes
    as one batch, as DeepFloyd IF / Show-1 do.

    model_fn(x, t, *args) is called once with x = concat([x_t, x_t]) along the batch axis and
    must condition the first half unconditionally (negative prompt) and the second half on the
    prompt (e.g. text states concat([negative, positive])). The guided output is
    eps_u + guidance_scale * (eps_c - eps_u) on the first `x_t.shape[-1]` channels; any further
    (learned variance) channels are the conditional half's. ``guidance_rescale`` (Lin et al. 2024,
    section 3.4; diffusers' ``guidance_rescale``) mixes in that much of the guided output rescaled to
    the conditional one's standard deviation per item: with a zero terminal SNR schedule, plain
    guidance overshoots near pure noise. The returned denoiser has the `denoise_fn(x_t, t, *args)`
    signature of `sample_loop`.
    """
    if not 0.0 <= guidance_rescale <= 1.0:
        raise ValueError(f"guidance_rescale {guidance_rescale}: expected a value in [0, 1]")
    return _Guided(model_fn, float(guidance_scale), float(guidance_rescale))
