"""The Show-1 cascade after the keyframes, one pure jitted function per stage.

    interpolate_keyframes       8 keyframes -> 29 frames (all 5-frame windows in one batch)
    super_resolve_first_frame   the first frame by DeepFloyd IF-II (2D UNet), the sr1 anchor
    super_resolve_windows       sr1: windows of 8 frames, stride 7, each anchored on its first frame
    video_to_video              sr2: zeroscope-style latent video-to-video (VAE + CLIP text + UNet3D)

Frames are channels last, ``(frames, height, width, 3)`` in [-1, 1] (raw sampler outputs, as the
reference pipelines pass them on with ``output_type="pt"``). Text states are encoder outputs
``(1, length, dim)``. Each stage function is jitted with its models, schedulers and step counts
static, so it compiles once per shape; the denoising loop is `sampling.sample_loop` (one ``lax.scan``),
with one per-step draw shared by the windows (``shared_noise``).

Random draws follow the reference, where every window is a pipeline call re-seeded to the same
seed: all windows share one initial noise, one noise augmentation and one per-step noise draw.
Pass ``rng`` (a PRNG key) or, to reproduce another implementation's draws, ``noise``
(a ``StageNoise``). Dynamic thresholding takes its quantile per frame (``schedulers.step`` does
so for video samples), as the Show-1 pipelines do by reshaping before ``scheduler.step``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vmc_jax import sampling, schedulers
from vmc_jax.schedulers import Scheduler

STAGES = ("keyframes", "interpolation", "sr1", "sr2")  # the cascade, in order; a job runs a prefix of it

INTERPOLATION_WINDOW = 5  # a keyframe, three new frames, the next keyframe


class StageNoise(NamedTuple):
    """Explicit random draws of one stage window (shared by every window), channels last.

    init: the initial noise (or, for sr2, the noise added to the encoded video).
    augmentation: the noise of the low-resolution condition (SR stages) or the VAE posterior
      sample (sr2); None where the stage draws none.
    steps: per-step sampler noise ``(steps, *init.shape)``; None for deterministic samplers.
    """

    init: jax.Array
    augmentation: jax.Array | None = None
    steps: jax.Array | None = None


def resize_matrix(size_in: int, size_out: int) -> np.ndarray:
    """``(size_out, size_in)`` float32 weights of linear interpolation with aligned corners,
    computed as torch's ``F.interpolate(..., align_corners=True)`` does (float32 scale and index)."""
    scale = np.float32(size_in - 1) / np.float32(size_out - 1) if size_out > 1 else np.float32(0)
    source = scale * np.arange(size_out, dtype=np.float32)
    low = np.minimum(np.floor(source).astype(np.int64), size_in - 1)
    frac = (source - low.astype(np.float32)).astype(np.float32)
    high = np.minimum(low + 1, size_in - 1)
    weights = np.zeros((size_out, size_in), np.float32)
    np.add.at(weights, (np.arange(size_out), low), 1 - frac)
    np.add.at(weights, (np.arange(size_out), high), frac)
    return weights


def resize_frames(frames: jax.Array, height: int, width: int) -> jax.Array:
    """Bilinear resize with aligned corners of ``(..., h, w, c)`` frames (torch's align_corners=True)."""
    rows = resize_matrix(frames.shape[-3], height)
    cols = resize_matrix(frames.shape[-2], width)
    return jnp.einsum("Hh,...hwc,Ww->...HWc", rows, frames, cols, precision=jax.lax.Precision.HIGHEST)


@dataclasses.dataclass(frozen=True)
class ConditionedUNet:
    """``denoise_fn(x, t, params, text, condition, noise_level)``: the UNet on concat(x, condition).

    ``condition`` (channels last, one per window, or None) is repeated over the guidance halves;
    ``noise_level`` (or None) goes in as ``class_labels``. Keeps the variance channels only when
    the scheduler uses them. Equal for equal models, so compiled stages are reused.
    """

    model: nn.Module
    learned_variance: bool

    def __call__(self, x: jax.Array, t: jax.Array, params: Any, text: jax.Array, condition: jax.Array | None,
                 noise_level: jax.Array | None) -> jax.Array:
        batch = x.shape[0]
        if condition is not None:
            x_in = jnp.concatenate([x, jnp.concatenate([condition] * (batch // condition.shape[0]))], axis=-1)
        else:
            x_in = x
        labels = None if noise_level is None else jnp.full((batch,), noise_level)
        out = self.model.apply({"params": params}, x_in, jnp.full((batch,), t), text, labels)
        return out if self.learned_variance else out[..., : x.shape[-1]]


def _guided_text(text: jax.Array, negative_text: jax.Array, windows: int) -> jax.Array:
    """concat([negative] * windows, [text] * windows): the batch the guided denoiser runs."""
    return jnp.concatenate([jnp.broadcast_to(t, (windows, *t.shape[1:])) for t in (negative_text, text)])


def _guided_unet(model: nn.Module, scheduler: Scheduler, guidance: float) -> sampling.DenoiseFn:
    return sampling.classifier_free_guidance(ConditionedUNet(model, scheduler.variance_type == "learned_range"),
                                             guidance)


def _draw(rng: jax.Array | None, noise: StageNoise | None, init_shape: tuple, augmentation_shape: tuple | None
          ) -> tuple[jax.Array, jax.Array | None, jax.Array | None, jax.Array | None]:
    """(initial noise, augmentation noise, step rng, step noise) from ``rng`` or the given ``noise``."""
    if (rng is None) == (noise is None):
        raise ValueError("pass exactly one of `rng` and `noise`")
    if noise is not None:
        if noise.init.shape != init_shape:
            raise ValueError(f"noise.init has shape {noise.init.shape}, expected {init_shape}")
        shape = None if noise.augmentation is None else noise.augmentation.shape
        if augmentation_shape is not None and shape != augmentation_shape:
            raise ValueError(f"noise.augmentation has shape {shape}, expected {augmentation_shape}")
        return noise.init, noise.augmentation, None, noise.steps
    init_key, augmentation_key, step_key = jax.random.split(rng, 3)
    augmentation = None if augmentation_shape is None else jax.random.normal(augmentation_key, augmentation_shape)
    return jax.random.normal(init_key, init_shape), augmentation, step_key, None


_STAGE_STATICS = ("model", "scheduler", "steps", "guidance")


@functools.partial(jax.jit, static_argnames=_STAGE_STATICS)
def interpolate_keyframes(model: nn.Module, params: Any, scheduler: Scheduler, keyframes: jax.Array,
                          text: jax.Array, negative_text: jax.Array, steps: int, guidance: float,
                          rng: jax.Array | None = None, noise: StageNoise | None = None) -> jax.Array:
    """Show-1 interpolation: ``(n, h, w, 3)`` keyframes -> ``(4 (n - 1) + 1, h, w, 3)`` frames.

    Each consecutive pair is a 5-frame window; all ``n - 1`` windows are denoised as one batch.
    The UNet input is noisy (3) + condition (3: the end frames blended linearly over the window)
    + mask (1: ones on the end frames). Window i fills frames 4i..4i+4; a later window overwrites
    the frame it shares with the one before, as the reference's loop does.
    """
    n, h, w, c = keyframes.shape
    if n < 2:
        raise ValueError(f"interpolation needs at least 2 keyframes, got {n}")
    ends = jnp.stack([keyframes[:-1], keyframes[1:]], axis=1)  # (windows, 2, h, w, c)
    blend = resize_matrix(2, INTERPOLATION_WINDOW)
    condition = jnp.einsum("ft,nthwc->nfhwc", blend, ends, precision=jax.lax.Precision.HIGHEST)
    mask = np.zeros((INTERPOLATION_WINDOW, 1, 1, 1), np.float32)
    mask[[0, -1]] = 1
    mask = jnp.broadcast_to(mask, (n - 1, INTERPOLATION_WINDOW, h, w, 1))
    init, _, step_rng, step_noise = _draw(rng, noise, (INTERPOLATION_WINDOW, h, w, c), None)
    x_T = jnp.broadcast_to(init, (n - 1, *init.shape))
    args = (params, _guided_text(text, negative_text, n - 1), jnp.concatenate([condition, mask], -1), None)
    windows = sampling.sample_loop(scheduler, _guided_unet(model, scheduler, guidance), x_T, steps, rng=step_rng,
                                   noise=step_noise, denoise_args=args, shared_noise=True)
    return jnp.concatenate([windows[:, :-1].reshape(-1, h, w, c), windows[-1, -1:]])


def _noised_condition(noising_scheduler: Scheduler, low: jax.Array, height: int, width: int, noise_level: int,
                      augmentation: jax.Array) -> jax.Array:
    """The SR condition: low-res frames upscaled (bilinear, aligned corners) and noised at ``noise_level``."""
    return schedulers.add_noise(noising_scheduler, resize_frames(low, height, width), augmentation, noise_level)


_SR_STATICS = (*_STAGE_STATICS, "noising_scheduler", "height", "width", "noise_level")


@functools.partial(jax.jit, static_argnames=_SR_STATICS)
def super_resolve_first_frame(model: nn.Module, params: Any, scheduler: Scheduler, noising_scheduler: Scheduler,
                              image: jax.Array, text: jax.Array, negative_text: jax.Array, height: int, width: int,
                              steps: int, guidance: float, noise_level: int, rng: jax.Array | None = None,
                              noise: StageNoise | None = None) -> jax.Array:
    """DeepFloyd IF-II image super-resolution of one ``(h, w, 3)`` frame to ``(height, width, 3)``.

    The 2D UNet sees concat(noisy, condition): the frame upscaled and noised by
    ``noising_scheduler`` at ``noise_level``, which is also its class label.
    """
    init, augmentation, step_rng, step_noise = _draw(rng, noise, (height, width, 3), (height, width, 3))
    condition = _noised_condition(noising_scheduler, image, height, width, noise_level, augmentation)
    args = (params, _guided_text(text, negative_text, 1), condition[None], jnp.asarray(noise_level))
    out = sampling.sample_loop(scheduler, _guided_unet(model, scheduler, guidance), init[None], steps, rng=step_rng,
                               noise=step_noise, denoise_args=args, shared_noise=True)
    return out[0]


@functools.partial(jax.jit, static_argnames=_SR_STATICS)
def _super_resolve_window(model: nn.Module, params: Any, scheduler: Scheduler, noising_scheduler: Scheduler,
                          low: jax.Array, first_frame: jax.Array, text: jax.Array, negative_text: jax.Array,
                          height: int, width: int, steps: int, guidance: float, noise_level: int,
                          rng: jax.Array | None = None, noise: StageNoise | None = None) -> jax.Array:
    """One sr1 window: ``low`` ``(f, h, w, 3)`` -> ``(f, height, width, 3)``, its first frame anchored."""
    shape = (low.shape[0], height, width, 3)
    init, augmentation, step_rng, step_noise = _draw(rng, noise, shape, shape)
    condition = _noised_condition(noising_scheduler, low, height, width, noise_level, augmentation)
    condition = condition.at[0].set(first_frame)  # the clean anchor frame replaces the noised one
    args = (params, _guided_text(text, negative_text, 1), condition[None], jnp.asarray(noise_level))
    out = sampling.sample_loop(scheduler, _guided_unet(model, scheduler, guidance), init[None], steps, rng=step_rng,
                               noise=step_noise, denoise_args=args, shared_noise=True)
    return out[0]


def window_starts(num_frames: int, window: int, stride: int) -> list[int]:
    """Start frames of the sr1 windows; refuses frame counts the windows do not cover exactly."""
    if window < 2 or not 1 <= stride < window:
        raise ValueError(f"sr1 window {window} and stride {stride}: need window >= 2 and 1 <= stride < window")
    if num_frames < window or (num_frames - window) % stride:
        raise ValueError(f"sr1 cannot cover {num_frames} frames with windows of {window} and stride {stride} "
                         f"(needs frames = {window} + k * {stride})")
    return list(range(0, num_frames - window + 1, stride))


def super_resolve_windows(model: nn.Module, params: Any, scheduler: Scheduler, noising_scheduler: Scheduler,
                          frames: jax.Array, first_frame: jax.Array, text: jax.Array, negative_text: jax.Array,
                          height: int, width: int, steps: int, guidance: float, noise_level: int, window: int,
                          stride: int, rng: jax.Array | None = None, noise: StageNoise | None = None) -> jax.Array:
    """Show-1 sr1: ``(n, h, w, 3)`` -> ``(n, height, width, 3)`` by overlapping windows, in order.

    The first window is anchored on ``first_frame`` (the IF-II frame), each later one on the
    previous window's output at its first frame; a later window overwrites the shared frame.
    Every window uses the same draws (``rng`` or ``noise``), as the re-seeded reference does.
    Each window is one call of the same compiled function.
    """
    starts = window_starts(frames.shape[0], window, stride)
    out = jnp.zeros((frames.shape[0], height, width, 3), jnp.float32)
    anchor = first_frame
    for start in starts:
        high = _super_resolve_window(model, params, scheduler, noising_scheduler, frames[start:start + window],
                                     anchor, text, negative_text, height, width, steps, guidance, noise_level,
                                     rng=rng, noise=noise)
        if start + stride < frames.shape[0]:
            anchor = high[stride]  # the previous output at the next window's first frame
        out = out.at[start:start + window].set(high)
    return out


def _vae_map(vae: nn.Module, vae_params: Any, frames: jax.Array, method: str) -> Any:
    """Runs ``vae.<method>`` one frame at a time (the reference's VAE slicing): bounded memory."""
    return jax.lax.map(lambda f: jax.tree.map(lambda a: a[0], vae.apply({"params": vae_params}, f[None],
                                                                          method=getattr(vae, method))), frames)


def strength_first_step(steps: int, strength: float) -> int:
    """The first step an img2img run of ``strength`` takes (diffusers' ``get_timesteps``)."""
    if not 0 < strength <= 1:
        raise ValueError(f"strength = {strength} must be in (0, 1]")
    return steps - min(int(steps * strength), steps)


@functools.partial(jax.jit, static_argnames=("model", "vae", "scheduler", "steps", "strength", "guidance"))
def video_to_video(model: nn.Module, params: Any, vae: nn.Module, vae_params: Any, scheduler: Scheduler,
                   video: jax.Array, text: jax.Array, negative_text: jax.Array, steps: int, strength: float,
                   guidance: float, rng: jax.Array | None = None, noise: StageNoise | None = None) -> jax.Array:
    """sr2 (zeroscope ``VideoToVideoSDPipeline``): ``(f, H, W, 3)`` frames in [-1, 1] -> decoded frames.

    The video is VAE-encoded frame by frame (posterior sample), noised to the run's first timestep
    after ``strength`` skips the first steps, denoised with CLIP text guidance, and decoded frame
    by frame. ``noise.augmentation`` is the posterior sample's noise, ``noise.init`` the added noise.
    """
    first = strength_first_step(steps, strength)
    mean, logvar = _vae_map(vae, vae_params, video, "encode")
    init, posterior, step_rng, step_noise = _draw(rng, noise, mean.shape, mean.shape)
    latents = (mean + jnp.exp(0.5 * logvar) * posterior) * vae.config.scaling_factor
    t_first = int(schedulers.step_inputs(scheduler, steps, first).t[0])
    x_T = schedulers.add_noise(scheduler, latents, init, t_first)
    args = (params, _guided_text(text, negative_text, 1), None, None)
    latents = sampling.sample_loop(scheduler, _guided_unet(model, scheduler, guidance), x_T[None], steps,
                                   rng=step_rng, noise=step_noise, denoise_args=args, first_step=first,
                                   shared_noise=True)[0]
    return _vae_map(vae, vae_params, latents / vae.config.scaling_factor, "decode")
