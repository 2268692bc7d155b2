"""Chaining the cascade stages: checking stage folders and sizes up front, loading each stage's
models once for all prompts and only while it runs, and handing frames from stage to stage.

``config.cascade`` names one pipeline folder per stage (hub or ``vmc-jax convert`` output):
``interpolation`` (Show-1 interpolation), ``sr1_image`` (DeepFloyd IF-II), ``sr1`` (Show-1 sr1),
``sr2`` (Show-1 sr2, zeroscope-style). sr1 uses both ``sr1_image`` and ``sr1``. The job reads it
once into its typed section (`vmc_jax.jobs.config.Cascade`), which is what the functions here take.
"""

from __future__ import annotations

import os
from typing import Any, Callable, NamedTuple, Sequence

import jax
import numpy as np

from vmc_jax import cascade, schedulers
from vmc_jax.cascade import STAGES
from vmc_jax.hub import converted_store
from vmc_jax.hub.unet_loading import load_unet
from vmc_jax.jobs import config as jobs_config

# stage -> the config.cascade fields naming its folders.
STAGE_FOLDERS = {"interpolation": ("interpolation",), "sr1": ("sr1_image", "sr1"), "sr2": ("sr2",)}
# config.cascade field -> (UNet family, input channels, what it should be), to catch a wrong folder.
_EXPECTED_UNET = {
    "interpolation": ("show1", 7, "a Show-1 interpolation UNet (7 input channels)"),
    "sr1_image": ("unet2d", 6, "a DeepFloyd IF-II UNet2DConditionModel (6 input channels)"),
    "sr1": ("show1", 6, "a Show-1 sr1 UNet (6 input channels)"),
    "sr2": ("modelscope", 4, "a zeroscope-style UNet3DConditionModel (4 latent channels)"),
}
_PARTS = {"interpolation": ("unet", "scheduler"), "sr1_image": ("unet", "scheduler", "image_noising_scheduler"),
          "sr1": ("unet", "scheduler", "image_noising_scheduler"),
          "sr2": ("unet", "scheduler", "vae", "text_encoder", "tokenizer")}

StageMonitor = Callable[[str, Any], None]


def requested_stages(settings: jobs_config.Cascade, stages: Sequence[str] | None) -> list[str]:
    """The stages to run, in cascade order: ``stages`` (checked), or keyframes and every stage whose folders are set."""
    if not stages:
        return ["keyframes"] + [s for s, fields in STAGE_FOLDERS.items()
                                if all(getattr(settings, f) for f in fields)]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"--stages: unknown stage(s) {unknown}; expected some of {list(STAGES)}")
    if stages[0] != "keyframes" or sorted(stages, key=STAGES.index) != list(stages) or len(set(stages)) != len(stages):
        raise ValueError(f"--stages {','.join(stages)}: must start with keyframes and follow the order "
                         f"{','.join(STAGES)}")
    for stage in stages[1:]:
        for field in STAGE_FOLDERS[stage]:
            if not getattr(settings, field):
                raise ValueError(f"stage {stage!r} needs config.cascade.{field} (a pipeline folder); it is empty")
    return list(stages)


def check_stage_folders(settings: jobs_config.Cascade, stages: Sequence[str]) -> None:
    """Fails before any sampling when a stage folder is missing, incomplete or of the wrong kind."""
    from vmc_jax.models.unet_config import UNetConfig

    for stage in stages[1:]:
        for field in STAGE_FOLDERS[stage]:
            folder = getattr(settings, field)
            where = f"config.cascade.{field} = {folder!r}"
            if not os.path.isdir(folder):
                raise FileNotFoundError(f"{where}: no such folder")
            unet = os.path.join(folder, "unet")
            if not os.path.isfile(os.path.join(unet, converted_store.CONFIG_FILE)):
                raise FileNotFoundError(f"{where}: no unet/{converted_store.CONFIG_FILE} (expected a pipeline folder, "
                                        "hub or `vmc-jax convert` output)")
            unet_config = UNetConfig.from_dict(converted_store.read_config(unet), source=unet)
            family, channels, expected = _EXPECTED_UNET[field]
            in_channels = unet_config.in_channels
            if unet_config.family != family or in_channels != channels:
                raise ValueError(f"{where}: unet/ is a {unet_config.class_name} ({unet_config.family} family, "
                                 f"{in_channels} input channels), expected {expected}")
            missing = [p for p in _PARTS[field] if not os.path.isdir(os.path.join(folder, p))]
            if missing:
                raise FileNotFoundError(f"{where}: missing {', '.join(p + '/' for p in missing)} "
                                        "(expected a pipeline folder, hub or `vmc-jax convert` output)")


def _downsampling(folder: str, part: str) -> int:
    """The factor by which a model folder's UNet or VAE divides the spatial size."""
    return 2 ** (len(converted_store.read_config(os.path.join(folder, part))["block_out_channels"]) - 1)


def check_sizes(settings: jobs_config.Cascade, stages: Sequence[str], num_frames: int, height: int,
                width: int) -> None:
    """Refuses, before sampling, frame counts and sizes a stage cannot take, naming them."""
    sizes = {"keyframes": (num_frames, height, width)}
    if "interpolation" in stages:
        num_frames = (cascade.INTERPOLATION_WINDOW - 1) * (num_frames - 1) + 1
        sizes["interpolation"] = (num_frames, height, width)
    if "sr1" in stages:
        try:
            cascade.window_starts(num_frames, settings.sr1_window, settings.sr1_stride)
        except ValueError as err:
            raise ValueError(f"stage sr1 (config.cascade.sr1_window, sr1_stride): {err}") from err
        sizes["sr1"] = (num_frames, height * settings.sr1_scale, width * settings.sr1_scale)
    if "sr2" in stages:
        sizes["sr2"] = (num_frames, settings.sr2_height, settings.sr2_width)
    for stage, (frames, h, w) in sizes.items():
        for field in STAGE_FOLDERS.get(stage, ()):
            factor = _downsampling(getattr(settings, field), "unet")
            if field == "sr2":
                factor *= _downsampling(settings.sr2, "vae")
            if h % factor or w % factor:
                raise ValueError(f"stage {stage}: frames of {h}x{w} are not divisible by {factor}, "
                                 f"which config.cascade.{field}'s models need")


def checked_stages(job: jobs_config.Job, stages: Sequence[str] | None) -> list[str]:
    """``requested_stages`` of the job, with their folders and its clip size checked: the job calls
    it once, before any sampling (`run_cascade` checks nothing again)."""
    stages = requested_stages(job.cascade, stages)
    check_stage_folders(job.cascade, stages)
    check_sizes(job.cascade, stages, job.data.num_frames, job.data.height, job.data.width)
    return stages


def _stage_unet(folder: str) -> tuple[Any, Any, schedulers.Scheduler]:
    """A stage's UNet (params placed on the device once, for all its windows and prompts) and its scheduler."""
    model, params = load_unet(os.path.join(folder, "unet"), dtype=np.float32)
    return model, jax.device_put(params), schedulers.from_config(folder)


def _noising_scheduler(folder: str) -> schedulers.Scheduler:
    return schedulers.from_config(os.path.join(folder, "image_noising_scheduler"))


class _Run(NamedTuple):
    """What every stage of one cascade run shares: the prompts, their T5 states ``(1, L, d)`` (one
    per prompt), the empty prompt's, the PRNG key and the monitor."""

    prompts: tuple[str, ...]
    texts: tuple[jax.Array, ...]
    empty: jax.Array
    rng: jax.Array
    monitor: StageMonitor


def _interpolation(s: jobs_config.Cascade, videos: list[jax.Array], run: _Run) -> list[jax.Array]:
    model, params, scheduler = _stage_unet(s.interpolation)
    run.monitor("interpolation", params)
    return [cascade.interpolate_keyframes(model, params, scheduler, frames, text, run.empty, s.interpolation_steps,
                                          s.interpolation_guidance, rng=run.rng)
            for frames, text in zip(videos, run.texts)]


def _sr1(s: jobs_config.Cascade, videos: list[jax.Array], run: _Run) -> list[jax.Array]:
    sizes = [(frames.shape[1] * s.sr1_scale, frames.shape[2] * s.sr1_scale) for frames in videos]

    def first_frames() -> list[jax.Array]:  # IF-II's weights are released when this returns
        model, params, scheduler = _stage_unet(s.sr1_image)
        noising = _noising_scheduler(s.sr1_image)
        run.monitor("sr1_image", params)
        return [cascade.super_resolve_first_frame(
            model, params, scheduler, noising, frames[0], text, run.empty, *size, s.sr1_image_steps,
            s.sr1_image_guidance, s.sr1_image_noise_level, rng=run.rng)
            for frames, text, size in zip(videos, run.texts, sizes)]

    anchors = first_frames()
    model, params, scheduler = _stage_unet(s.sr1)
    noising = _noising_scheduler(s.sr1)
    run.monitor("sr1", params)
    return [cascade.super_resolve_windows(model, params, scheduler, noising, frames, anchor, text, run.empty, *size,
                                          s.sr1_steps, s.sr1_guidance, s.sr1_noise_level, s.sr1_window, s.sr1_stride,
                                          rng=run.rng)
            for frames, anchor, text, size in zip(videos, anchors, run.texts, sizes)]


def sr2_input(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """sr1 frames as the reference hands them to sr2: 8-bit (truncated), PIL-resized (bicubic), back to [-1, 1]."""
    from PIL import Image

    pixels = (np.clip(np.asarray(frames, np.float32) / 2 + 0.5, 0, 1) * 255).astype(np.uint8)
    resized = [np.asarray(Image.fromarray(p).resize((width, height), Image.BICUBIC)) for p in pixels]
    return np.stack(resized).astype(np.float32) / 255.0 * 2.0 - 1.0


def _sr2(s: jobs_config.Cascade, videos: list[jax.Array], run: _Run) -> list[jax.Array]:
    from vmc_jax.hub.text_loading import encode_prompts, load_text_encoder, load_tokenizer
    from vmc_jax.hub.vae_loading import load_vae

    encoder, encoder_params = load_text_encoder(os.path.join(s.sr2, "text_encoder"))
    tokenizer = load_tokenizer(s.sr2)
    clip_negative, *clip_texts = [encode_prompts(tokenizer, encoder, encoder_params, [prompt])[0]
                                  for prompt in (s.sr2_negative_prompt, *run.prompts)]
    del encoder_params  # the CLIP states are all sr2 needs from it
    model, params, scheduler = _stage_unet(s.sr2)
    vae, vae_params = load_vae(os.path.join(s.sr2, "vae"), dtype=np.float32)
    vae_params = jax.device_put(vae_params)
    run.monitor("sr2", (params, vae_params))
    return [cascade.video_to_video(model, params, vae, vae_params, scheduler,
                                   sr2_input(np.asarray(frames), s.sr2_height, s.sr2_width), clip_text,
                                   clip_negative, s.sr2_steps, s.sr2_strength, s.sr2_guidance, rng=run.rng)
            for frames, clip_text in zip(videos, clip_texts)]


_RUNNERS = {"interpolation": _interpolation, "sr1": _sr1, "sr2": _sr2}


def run_cascade(settings: jobs_config.Cascade, seed: int, stages: Sequence[str], keyframes: Sequence[np.ndarray],
                prompts: Sequence[str], texts: Sequence[jax.Array], empty_text: jax.Array,
                monitor: StageMonitor | None = None) -> dict[str, list[np.ndarray]]:
    """Runs ``stages`` (after "keyframes") on each prompt's ``(f, h, w, 3)`` keyframes; returns, per
    stage, its frames for each prompt in order.

    ``texts`` / ``empty_text``: each prompt's and the empty prompt's T5 states ``(1, L, d)``, computed
    once by the caller and reused by every pixel stage; sr2 encodes with its own CLIP. ``stages``
    as `checked_stages` returns them (nothing is checked here). Stage by stage: its models are
    loaded once, run for every prompt, and released before the next stage loads, so one stage's
    weights are held at a time; ``monitor(stage, params)`` is called once they are loaded (tests
    use it to measure what is held). Every stage draws from the same ``seed`` for every
    prompt, as the reference re-seeds each call.
    """
    if not len(keyframes) == len(prompts) == len(texts):
        raise ValueError(f"{len(keyframes)} keyframe videos, {len(prompts)} prompts and {len(texts)} text states: "
                         "need one each per prompt")
    run = _Run(tuple(prompts), tuple(texts), empty_text, jax.random.PRNGKey(seed), monitor or (lambda *_: None))
    videos, outputs = list(keyframes), {}
    for stage in stages if videos else ():  # no prompt: no stage loads its models
        if stage != "keyframes":
            videos = _RUNNERS[stage](settings, videos, run)
            outputs[stage] = [np.asarray(frames, np.float32) for frames in videos]
    return outputs
