"""Keyframe generation: the keyframe UNet a job tunes, sampling from the inverted clip, ``vmc-jax generate``.

The seam for later cascade stages is :func:`keyframe_videos`: loaded model, params and prompt
states in, one keyframe video per prompt out.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vmc_jax import files, keyframe_sampling, prompts, schedulers, training, video_io
from vmc_jax.errors import JobError
from vmc_jax.hub.unet_loading import load_unet
from vmc_jax.hub.weights import model_config
from vmc_jax.jobs import cascade_runner, checkpoints, config as jobs_config, workdir
from vmc_jax.keyframe_sampling import inversion_scheduler, sample_keyframes
from vmc_jax.models.unet_config import UNetConfig
from vmc_jax.schedulers import Scheduler

VIDEO_FORMATS = ("gif", "mp4")
SAMPLES_INDEX = "samples.json"  # in each samples folder of `generate`: keyframe video file -> prompt
# A prompt's part of a file name: at most this many characters and UTF-8 bytes (whole characters), which
# leaves room in a 255-byte name for "<i>_", "_<stage>", "-<n>", the extension and the temporary name.
SLUG_CHARACTERS, SLUG_BYTES = 60, 100


def load_keyframe_unet(config: jobs_config.Job) -> tuple[nn.Module, Any, Scheduler]:
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


def training_clip(config: jobs_config.Job) -> np.ndarray:
    """The clip the job tunes on, ``(f, h, w, 3)`` in [-1, 1]."""
    d = config.data
    return video_io.load_clip(config.video, d.num_frames, d.height, d.width, d.stride, d.start, d.reverse)


def keyframe_videos(model: nn.Module, params: Any, scheduler: Scheduler, clip: np.ndarray,
                    texts: dict[str, np.ndarray], prompt_list: list[str], inversion_settings: jobs_config.Inversion,
                    sampling_settings: jobs_config.Sampling, seed: int) -> list[np.ndarray]:
    """One keyframe video ``(f, h, w, 3)`` in [-1, 1] per prompt, sampled from the noise ``clip`` inverts to
    with ``params`` (``sampling_settings.init`` "inverted", the same for every prompt) or from seeded
    random noise ("random": a draw of its own for each prompt, rows of one ``seed``'s draw).

    ``texts`` holds the encoder states of "" , the negative prompt and every prompt.
    """
    s = sampling_settings
    if s.init == "random":
        x_T = jax.random.normal(jax.random.PRNGKey(seed), (len(prompt_list), *clip.shape), jnp.float32)
    else:
        inv_scheduler = inversion_scheduler(scheduler, inversion_settings.method, inversion_settings.scheduler)
        x_T = keyframe_sampling.ddim_invert(model, params, clip[None], texts[""][None], inv_scheduler,
                                            inversion_settings.steps, method=inversion_settings.method)
        x_T = jnp.broadcast_to(x_T, (len(prompt_list), *clip.shape))
    return [np.asarray(sample_keyframes(model, params, scheduler, x_T[i:i + 1], texts[p][None],
                                        texts[s.negative_prompt][None], s.steps, s.guidance,
                                        jax.random.PRNGKey(seed), guidance_rescale=s.guidance_rescale)[0], np.float32)
            for i, p in enumerate(prompt_list)]


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
                video_io.save_video(video, f"{stem}.{ext}", fps=fps)
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


class Samples(NamedTuple):
    """The keyframe videos of some prompts, and the folder their files go to."""

    out_dir: str
    prompts: list[str]
    videos: list[np.ndarray]


def write_cascade(settings: jobs_config.Cascade, seed: int, stages: list[str], texts: dict[str, np.ndarray],
                  samples: list[Samples], overwrite: bool = False) -> list[str]:
    """Runs the cascade ``stages`` after the keyframe videos of all ``samples`` in one run (each stage's
    models loaded once for all their prompts); writes ``<i>_<prompt>_<stage>.gif/.mp4`` into each one's folder.

    ``texts`` holds the T5 states of "" and of every prompt.
    """
    prompt_list = [p for one in samples for p in one.prompts]
    outputs = cascade_runner.run_cascade(settings, seed, stages, [v for one in samples for v in one.videos],
                                         prompt_list, [texts[p][None] for p in prompt_list], texts[""][None])
    written, start = [], 0
    for one in samples:
        end = start + len(one.prompts)
        written += [path for stage, videos in outputs.items()
                    for path in write_videos(videos[start:end], one.prompts, one.out_dir, settings.fps, overwrite,
                                             f"_{stage}")]
        start = end
    return written


def generate_prompts(config: ml_collections.ConfigDict, job_dir: str, prompt_list: list[str],
                     stages: list[str] | None = None, allow_untuned: bool = False, strict: bool = False) -> list[str]:
    """``vmc-jax generate``: keyframe videos for ``prompt_list`` (default: the config's validation prompts)
    with the run's tuned weights, then the cascade ``stages`` (default: keyframes and every stage
    config.cascade gives a folder for); returns the files.

    Without a checkpoint it refuses, unless ``allow_untuned`` (then the pretrained weights are used).
    """
    job = jobs_config.Job.from_config(config)  # checked once; below, its typed sections
    prompt_list = list(prompt_list or job.validation.prompts)
    if not prompt_list:
        raise ValueError("no prompt given (--prompt), and config.validation.prompts is empty")
    stages = cascade_runner.checked_stages(job, stages)  # before any sampling
    check_file_names(prompt_list, stages, workdir.samples_dir(job_dir, ""))
    store = checkpoints.TrainCheckpoints(workdir.checkpoints_dir(job_dir), strict=strict, create=False)
    step, state = store.restore_latest()
    if step is None and not allow_untuned:
        raise JobError(f"no checkpoint in {store.directory}: run `vmc-jax train` first, "
                       "or pass --allow_untuned to sample with the pretrained weights")
    model, params, scheduler = load_keyframe_unet(job)
    tuned, frozen = training.split_params(params, job.train.tuned_params)
    if step is None:
        logging.warning("no checkpoint: sampling with the untuned pretrained weights (--allow_untuned)")
    params = jax.device_put(training.merge_params(tuned if step is None else state["tuned"], frozen))
    texts = prompts.embed_prompts(job.pretrained, ["", job.sampling.negative_prompt, *prompt_list], job_dir)
    videos = keyframe_videos(model, params, scheduler, training_clip(job), texts, prompt_list, job.inversion,
                             job.sampling, job.seed)
    del params  # the keyframe weights are not held while the later stages run
    out_dir = workdir.samples_dir(job_dir, f"generate_{step or 0}")
    keyframes = write_videos(videos, prompt_list, out_dir, job.sampling.fps)
    _record_prompts(out_dir, {path: prompt for path, prompt in zip(keyframes[::len(VIDEO_FORMATS)], prompt_list)})
    return keyframes + write_cascade(job.cascade, job.seed, stages, texts, [Samples(out_dir, prompt_list, videos)])


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
