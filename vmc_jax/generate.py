"""Keyframe generation: the keyframe UNet a job tunes, sampling from the inverted clip, ``vmc-jax generate``.

The seam for later cascade stages is :func:`keyframe_videos`: loaded model, params and prompt
states in, one keyframe video per prompt out.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vmc_jax import (cascade_runner, checkpoints, data, files, inversion, prompts, sampling, schedulers,
                     training, workdir)
from vmc_jax.errors import JobError
from vmc_jax.jobs import config as jobs_config
from vmc_jax.loading import load_unet
from vmc_jax.models.unet_config import UNetConfig
from vmc_jax.schedulers import Scheduler
from vmc_jax.weights import model_config

VIDEO_FORMATS = ("gif", "mp4")
SAMPLES_INDEX = "samples.json"  # in each samples folder of `generate`: keyframe video file -> prompt
# A prompt's part of a file name: at most this many characters and UTF-8 bytes (whole characters), which
# leaves room in a 255-byte name for "<i>_", "_<stage>", "-<n>", the extension and the temporary name.
SLUG_CHARACTERS, SLUG_BYTES = 60, 100


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


def load_keyframe_unet(config: ml_collections.ConfigDict) -> tuple[nn.Module, Any, Scheduler]:
    """The pretrained keyframe UNet (compute dtype and remat from ``config.train``, attention core from
    ``config.attention``), its params and scheduler.

    An image UNet (2D, e.g. DeepFloyd IF) is refused before its weights are read: VMC tunes a video model.
    """
    unet_dir = os.path.join(config.pretrained, "unet")
    unet_config = UNetConfig.from_dict(*model_config(unet_dir))
    if not unet_config.is_video:
        raise ValueError(f"config.pretrained = {config.pretrained!r}: unet/ is a {unet_config.class_name}, an image "
                         "model; VMC tunes a video UNet (UNet3DConditionModel, Show-1's keyframe model)")
    model, params = load_unet(unet_dir, dtype=np.float32)
    model = model.clone(dtype=jobs_config.COMPUTE_DTYPES[config.train.compute_dtype], remat=config.train.remat,
                        attention_impl=config.attention)
    return model, params, schedulers.from_config(os.path.join(config.pretrained, "scheduler"))


def training_clip(config: ml_collections.ConfigDict) -> np.ndarray:
    """The clip the job tunes on, ``(f, h, w, 3)`` in [-1, 1]."""
    d = config.data
    return data.load_clip(config.video, d.num_frames, d.height, d.width, d.stride, d.start, d.reverse)


def keyframe_videos(model: nn.Module, params: Any, scheduler: Scheduler, clip: np.ndarray,
                    texts: dict[str, np.ndarray], prompt_list: list[str], inversion_settings: jobs_config.Inversion,
                    sampling_settings: jobs_config.Sampling, seed: int) -> list[np.ndarray]:
    """One keyframe video ``(f, h, w, 3)`` in [-1, 1] per prompt, sampled from the noise ``clip`` inverts to
    with ``params`` (``sampling_settings.init`` "inverted") or from seeded random noise ("random").

    ``texts`` holds the encoder states of "" , the negative prompt and every prompt.
    """
    s = sampling_settings
    if s.init == "random":
        x_T = jax.random.normal(jax.random.PRNGKey(seed), (1, *clip.shape), jnp.float32)
    else:
        inv_scheduler = inversion_scheduler(scheduler, inversion_settings.method, inversion_settings.scheduler)
        x_T = inversion.ddim_invert(model, params, clip[None], texts[""][None], inv_scheduler,
                                    inversion_settings.steps, method=inversion_settings.method)
    return [np.asarray(sample_keyframes(model, params, scheduler, x_T, texts[p][None], texts[s.negative_prompt][None],
                                        s.steps, s.guidance, jax.random.PRNGKey(seed))[0], np.float32)
            for p in prompt_list]


def write_videos(videos: list[np.ndarray], prompt_list: list[str], out_dir: str, fps: float,
                 overwrite: bool = False, suffix: str = "") -> list[str]:
    """Writes each video as ``<i>_<prompt><suffix>.gif`` and ``.mp4``; unless ``overwrite``, a taken name
    gets ``-2``... Names are chosen and written under the folder's lock, so runs at once never share one."""
    written = []
    with files.locked(os.path.join(out_dir, SAMPLES_INDEX)):
        for i, (video, prompt) in enumerate(zip(videos, prompt_list)):
            stem = os.path.join(out_dir, _file_stem(i, prompt, suffix))
            if not overwrite:
                stem = _unused_stem(stem)
            for ext in VIDEO_FORMATS:
                data.save_video(video, f"{stem}.{ext}", fps=fps)
                written.append(f"{stem}.{ext}")
    return written


def _unused_stem(stem: str) -> str:
    """``stem`` or ``stem-2``, ``stem-3``... the first for which no video format exists yet."""
    n = 1
    candidate = stem
    while any(os.path.lexists(f"{candidate}.{ext}") for ext in VIDEO_FORMATS):
        n += 1
        candidate = f"{stem}-{n}"
    return candidate


def _file_stem(index: int, prompt: str, suffix: str = "") -> str:
    return f"{index}_{_slug(prompt)}{suffix}"


def _slug(text: str) -> str:
    slug = "".join(ch if ch.isalnum() else "_" for ch in text.lower()).strip("_")[:SLUG_CHARACTERS]
    return slug.encode()[:SLUG_BYTES].decode("utf-8", "ignore") or "empty"  # "ignore": a cut character is dropped


def check_file_names(prompt_list: list[str], stages: list[str], out_dir: str) -> None:
    """Refuses, before any sampling, prompts whose video files the file system of ``out_dir`` cannot name."""
    stems = [_file_stem(i, p, suffix) for i, p in enumerate(prompt_list)
             for suffix in ["", *(f"_{stage}" for stage in stages if stage != "keyframes")]]
    files.check_name_fits(out_dir, max(stems, key=lambda stem: len(stem.encode())) + f"-999.{VIDEO_FORMATS[0]}")


def write_cascade(config: ml_collections.ConfigDict, videos: list[np.ndarray], texts: dict[str, np.ndarray],
                  prompt_list: list[str], stages: list[str], out_dir: str, overwrite: bool = False) -> list[str]:
    """Runs the cascade ``stages`` after the keyframe ``videos``; writes ``<i>_<prompt>_<stage>.gif/.mp4``."""
    by_stage: dict[str, list[np.ndarray]] = {}
    for video, prompt in zip(videos, prompt_list):
        outputs = cascade_runner.run_cascade(config, video, prompt, texts[prompt][None], texts[""][None], stages)
        for stage, frames in outputs.items():
            by_stage.setdefault(stage, []).append(frames)
    return [path for stage, stage_videos in by_stage.items()
            for path in write_videos(stage_videos, prompt_list, out_dir, config.cascade.fps, overwrite, f"_{stage}")]


def generate_prompts(config: ml_collections.ConfigDict, job_dir: str, prompt_list: list[str],
                     stages: list[str] | None = None, allow_untuned: bool = False, strict: bool = False) -> list[str]:
    """``vmc-jax generate``: keyframe videos for ``prompt_list`` (default: the config's validation prompts)
    with the run's tuned weights, then the cascade ``stages`` (default: keyframes and every stage
    config.cascade gives a folder for); returns the files.

    Without a checkpoint it refuses, unless ``allow_untuned`` (then the pretrained weights are used).
    """
    prompt_list = list(prompt_list or config.validation.prompts)
    if not prompt_list:
        raise ValueError("no prompt given (--prompt), and config.validation.prompts is empty")
    jobs_config.Job.from_config(config)
    stages = cascade_runner.checked_stages(config, stages)  # before any sampling
    check_file_names(prompt_list, stages, workdir.samples_dir(job_dir, ""))
    store = checkpoints.TrainCheckpoints(workdir.checkpoints_dir(job_dir), strict=strict, create=False)
    step, state = store.restore_latest()
    if step is None and not allow_untuned:
        raise JobError(f"no checkpoint in {store.directory}: run `vmc-jax train` first, "
                       "or pass --allow_untuned to sample with the pretrained weights")
    model, params, scheduler = load_keyframe_unet(config)
    tuned, frozen = training.split_params(params, config.train.tuned_params)
    if step is None:
        logging.warning("no checkpoint: sampling with the untuned pretrained weights (--allow_untuned)")
    params = jax.device_put(training.merge_params(tuned if step is None else state["tuned"], frozen))
    texts = prompts.embed_prompts(config.pretrained, ["", config.sampling.negative_prompt, *prompt_list], job_dir)
    videos = keyframe_videos(model, params, scheduler, training_clip(config), texts, prompt_list, config.inversion,
                             config.sampling, config.seed)
    del params  # the keyframe weights are not held while the later stages run
    out_dir = workdir.samples_dir(job_dir, f"generate_{step or 0}")
    keyframes = write_videos(videos, prompt_list, out_dir, config.sampling.fps)
    _record_prompts(out_dir, {path: prompt for path, prompt in zip(keyframes[::len(VIDEO_FORMATS)], prompt_list)})
    return keyframes + write_cascade(config, videos, texts, prompt_list, stages, out_dir)


def _record_prompts(out_dir: str, samples: dict[str, str]) -> None:
    """Adds ``samples`` (keyframe video file -> its prompt) to ``out_dir``'s SAMPLES_INDEX, which
    ``vmc-jax evaluate`` reads; file names are relative to ``out_dir``. Under the folder's lock, so
    that runs at once each add theirs."""
    path = os.path.join(out_dir, SAMPLES_INDEX)
    with files.locked(path):
        index = {}
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                index = json.load(f)
        index.update({os.path.relpath(file, out_dir): prompt for file, prompt in samples.items()})
        files.write_text_atomic(path, json.dumps(index, indent=2) + "\n")
