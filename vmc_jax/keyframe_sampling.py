"""DDIM inversion: running the deterministic DDIM sampler backwards, clean video -> noise.

Each step moves ``x`` from the noise level ``a_cur`` up to ``a_next = alphas_cumprod[t]``,
using the noise the model predicts at timestep ``t`` (from the first ``C`` output channels, read
as the scheduler's ``prediction_type`` says; the rest are the learned variance). The whole loop
is one ``lax.scan`` under ``jit``; ``sharded_ddim_invert`` splits a batch of clips over the devices
of a mesh (`vmc_jax.parallel`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from vmc_jax import parallel, sampling, schedulers
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
    channels = x0.shape[-1]
    batch = x0.shape[0]
    text = jnp.broadcast_to(encoder_hidden_states, (batch, *encoder_hidden_states.shape[1:]))

    def step(x, xs):
        t, a_cur, a_next = xs
        out = model.apply({"params": params}, x, jnp.full((batch,), t), text)[..., :channels].astype(jnp.float32)
        eps = schedulers.predicted_noise(scheduler, out, x, t)
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


def sharded_ddim_invert(model: nn.Module, params: Any, x0: jax.Array, encoder_hidden_states: jax.Array,
                        scheduler: Scheduler, num_steps: int, method: str = "model",
                        return_trajectory: bool = False, mesh: Mesh | None = None) -> jax.Array:
    """:func:`ddim_invert` with the batch of clips split over the "data" axis of ``mesh``.

    One ``jit`` over the mesh (default: every device of the job on "data"), the sharding model of
    the whole library (the design card's "pmapped" inversion, without ``jax.pmap``).
    ``x0`` is the whole batch, the same on every process. A batch that does not divide the axis
    is padded with copies of its last clip and the padding is dropped from the result
    (`parallel` module policy). Returns a global array.
    """
    mesh = parallel.make_mesh() if mesh is None else mesh
    x0 = jnp.asarray(x0)
    text = jnp.broadcast_to(jnp.asarray(encoder_hidden_states), (x0.shape[0], *encoder_hidden_states.shape[1:]))
    (x0, text), batch = parallel.pad_batch((x0, text), mesh.shape["data"], "sharded_ddim_invert")
    x0, text = parallel.put_global(mesh, (x0, text), "data")
    params = parallel.put_global(mesh, params)
    out = _invert_jit(model, scheduler, num_steps, method, return_trajectory, params, x0, text)
    return out[:, :batch] if return_trajectory else out[:batch]


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
                     noise: jax.Array | None = None, guidance_rescale: float = 0.0) -> jax.Array:
    """Denoises ``x_T`` ``(b, f, h, w, c)`` with classifier-free guidance; returns frames in [-1, 1].

    ``text`` and ``negative_text`` are ``(1 or b, L, d)`` encoder states (Show-1 guides against
    the empty or a negative prompt). ``rng`` or ``noise`` feed the per-step noise (`sample_loop`).
    ``guidance_rescale``: see `sampling.classifier_free_guidance` (0: Show-1's plain guidance).
    """
    batch = x_T.shape[0]
    both = jnp.concatenate([jnp.broadcast_to(negative_text, (batch, *negative_text.shape[1:])),
                            jnp.broadcast_to(text, (batch, *text.shape[1:]))])
    denoiser = UNetDenoiser(model, scheduler.variance_type == "learned_range")
    guided = sampling.classifier_free_guidance(denoiser, guidance, guidance_rescale)
    frames = sampling.sample_loop(scheduler, guided, x_T, steps, rng=rng, noise=noise,
                                  denoise_args=(params, both))
    return jnp.clip(frames, -1.0, 1.0)


def inversion_scheduler(model_scheduler: Scheduler, method: str, config_path: str | None) -> Scheduler:
    """The schedule to invert on: the model's own, or for "official" the given (default: released) config."""
    if config_path:
        return schedulers.from_config(config_path)
    if method == "official":
        return schedulers.from_config(RELEASED_INVERSION_SCHEDULER)
    return model_scheduler


