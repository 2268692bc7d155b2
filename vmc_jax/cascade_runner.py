"""Chaining the cascade stages from the config: checking stage folders and sizes up front, loading
each stage's models only while it runs, and handing frames from stage to stage.

``config.cascade`` names one pipeline folder per stage (hub or ``vmc-jax convert`` output):
``interpolation`` (Show-1 interpolation), ``sr1_image`` (DeepFloyd IF-II), ``sr1`` (Show-1 sr1),
``sr2`` (Show-1 sr2, zeroscope-style). sr1 uses both ``sr1_image`` and ``sr1``.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from vmc_jax import cascade, checkpoints, schedulers
from vmc_jax.loading import load_unet

STAGES = ("keyframes", "interpolation", "sr1", "sr2")
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


def requested_stages(config: ml_collections.ConfigDict, stages: list[str] | None) -> list[str]:
    """The stages to run, in cascade order: ``stages`` (checked), or keyframes and every stage whose folders are set."""
    folders = config.cascade
    if not stages:
        return ["keyframes"] + [s for s, fields in STAGE_FOLDERS.items() if all(folders[f] for f in fields)]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"--stages: unknown stage(s) {unknown}; expected some of {list(STAGES)}")
    if stages[0] != "keyframes" or sorted(stages, key=STAGES.index) != list(stages) or len(set(stages)) != len(stages):
        raise ValueError(f"--stages {','.join(stages)}: must start with keyframes and follow the order "
                         f"{','.join(STAGES)}")
    for stage in stages[1:]:
        for field in STAGE_FOLDERS[stage]:
            if not folders[field]:
                raise ValueError(f"stage {stage!r} needs config.cascade.{field} (a pipeline folder); it is empty")
    return list(stages)


def check_stage_folders(config: ml_collections.ConfigDict, stages: list[str]) -> None:
    """Fails before any sampling when a stage folder is missing, incomplete or of the wrong kind."""
    from vmc_jax.models.unet_config import UNetConfig

    for stage in stages[1:]:
        for field in STAGE_FOLDERS[stage]:
            folder = config.cascade[field]
            where = f"config.cascade.{field} = {folder!r}"
            if not os.path.isdir(folder):
                raise FileNotFoundError(f"{where}: no such folder")
            unet = os.path.join(folder, "unet")
            if not os.path.isfile(os.path.join(unet, checkpoints.CONFIG_FILE)):
                raise FileNotFoundError(f"{where}: no unet/{checkpoints.CONFIG_FILE} (expected a pipeline folder, "
                                        "hub or `vmc-jax convert` output)")
            unet_config = UNetConfig.from_dict(checkpoints.read_config(unet), source=unet)
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
    return 2 ** (len(checkpoints.read_config(os.path.join(folder, part))["block_out_channels"]) - 1)


def check_sizes(config: ml_collections.ConfigDict, stages: list[str], num_frames: int, height: int,
                width: int) -> None:
    """Refuses, before sampling, frame counts and sizes a stage cannot take, naming them."""
    c = config.cascade
    sizes = {"keyframes": (num_frames, height, width)}
    if "interpolation" in stages:
        num_frames = (cascade.INTERPOLATION_WINDOW - 1) * (num_frames - 1) + 1
        sizes["interpolation"] = (num_frames, height, width)
    if "sr1" in stages:
        try:
            cascade.window_starts(num_frames, c.sr1_window, c.sr1_stride)
        except ValueError as err:
            raise ValueError(f"stage sr1 (config.cascade.sr1_window, sr1_stride): {err}") from err
        sizes["sr1"] = (num_frames, height * c.sr1_scale, width * c.sr1_scale)
    if "sr2" in stages:
        sizes["sr2"] = (num_frames, c.sr2_height, c.sr2_width)
    for stage, (frames, h, w) in sizes.items():
        for field in STAGE_FOLDERS.get(stage, ()):
            factor = _downsampling(c[field], "unet")
            if field == "sr2":
                factor *= _downsampling(c[field], "vae")
            if h % factor or w % factor:
                raise ValueError(f"stage {stage}: frames of {h}x{w} are not divisible by {factor}, "
                                 f"which config.cascade.{field}'s models need")


def checked_stages(config: ml_collections.ConfigDict, stages: list[str] | None) -> list[str]:
    """``requested_stages``, with their folders and the config's clip size checked: call before sampling."""
    stages = requested_stages(config, stages)
    check_stage_folders(config, stages)
    check_sizes(config, stages, config.data.num_frames, config.data.height, config.data.width)
    return stages


def _stage_unet(folder: str) -> tuple[Any, Any, schedulers.Scheduler]:
    """A stage's UNet (params placed on the device once, for all its windows) and its scheduler."""
    model, params = load_unet(os.path.join(folder, "unet"), dtype=np.float32)
    return model, jax.device_put(params), schedulers.from_config(folder)


def _noising_scheduler(folder: str) -> schedulers.Scheduler:
    return schedulers.from_config(os.path.join(folder, "image_noising_scheduler"))


def _interpolation(c: ml_collections.ConfigDict, frames: jax.Array, texts: dict, rng: jax.Array,
                   monitor: StageMonitor) -> jax.Array:
    model, params, scheduler = _stage_unet(c.interpolation)
    monitor("interpolation", params)
    return cascade.interpolate_keyframes(model, params, scheduler, frames, texts["text"], texts["empty"],
                                         c.interpolation_steps, c.interpolation_guidance, rng=rng)


def _sr1(c: ml_collections.ConfigDict, frames: jax.Array, texts: dict, rng: jax.Array,
         monitor: StageMonitor) -> jax.Array:
    height, width = frames.shape[1] * c.sr1_scale, frames.shape[2] * c.sr1_scale

    def first_frame() -> jax.Array:  # IF-II's weights are released when this returns
        model, params, scheduler = _stage_unet(c.sr1_image)
        monitor("sr1_image", params)
        return cascade.super_resolve_first_frame(
            model, params, scheduler, _noising_scheduler(c.sr1_image), frames[0], texts["text"], texts["empty"],
            height, width, c.sr1_image_steps, c.sr1_image_guidance, c.sr1_image_noise_level, rng=rng)

    anchor = first_frame()
    model, params, scheduler = _stage_unet(c.sr1)
    monitor("sr1", params)
    return cascade.super_resolve_windows(model, params, scheduler, _noising_scheduler(c.sr1), frames, anchor,
                                         texts["text"], texts["empty"], height, width, c.sr1_steps, c.sr1_guidance,
                                         c.sr1_noise_level, c.sr1_window, c.sr1_stride, rng=rng)


def sr2_input(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """sr1 frames as the reference hands them to sr2: 8-bit (truncated), PIL-resized (bicubic), back to [-1, 1]."""
    from PIL import Image

    pixels = (np.clip(np.asarray(frames, np.float32) / 2 + 0.5, 0, 1) * 255).astype(np.uint8)
    resized = [np.asarray(Image.fromarray(p).resize((width, height), Image.BICUBIC)) for p in pixels]
    return np.stack(resized).astype(np.float32) / 255.0 * 2.0 - 1.0


def _sr2(c: ml_collections.ConfigDict, frames: jax.Array, texts: dict, rng: jax.Array,
         monitor: StageMonitor) -> jax.Array:
    from vmc_jax.text import encode_prompts, load_text_encoder, load_tokenizer
    from vmc_jax.vae import load_vae

    encoder, encoder_params = load_text_encoder(os.path.join(c.sr2, "text_encoder"))
    tokenizer = load_tokenizer(c.sr2)
    clip_text, _ = encode_prompts(tokenizer, encoder, encoder_params, [texts["prompt"]])
    clip_negative, _ = encode_prompts(tokenizer, encoder, encoder_params, [c.sr2_negative_prompt])
    del encoder_params  # the CLIP states are all sr2 needs from it
    model, params, scheduler = _stage_unet(c.sr2)
    vae, vae_params = load_vae(os.path.join(c.sr2, "vae"), dtype=np.float32)
    vae_params = jax.device_put(vae_params)
    monitor("sr2", (params, vae_params))
    video = sr2_input(np.asarray(frames), c.sr2_height, c.sr2_width)
    return cascade.video_to_video(model, params, vae, vae_params, scheduler, video, clip_text, clip_negative,
                                  c.sr2_steps, c.sr2_strength, c.sr2_guidance, rng=rng)


_RUNNERS = {"interpolation": _interpolation, "sr1": _sr1, "sr2": _sr2}


def run_cascade(config: ml_collections.ConfigDict, keyframes: jax.Array, prompt: str, text: jax.Array,
                empty_text: jax.Array, stages: list[str], monitor: StageMonitor | None = None) -> dict[str, np.ndarray]:
    """Runs ``stages`` (after "keyframes") on ``(f, h, w, 3)`` keyframes; returns each stage's frames.

    ``text`` / ``empty_text``: the prompt's and the empty prompt's T5 states ``(1, L, d)``, computed
    once by the caller and reused by every pixel stage; sr2 encodes with its own CLIP. Folders
    and sizes are checked before any stage runs. A stage's models are loaded when it starts and
    released when it ends; ``monitor(stage, params)`` is called once they are loaded (tests use it
    to measure what is held). Every stage draws from the same ``config.seed``, as the reference
    re-seeds each call.
    """
    stages = [s for s in stages if s != "keyframes"]
    check_stage_folders(config, ["keyframes", *stages])
    check_sizes(config, ["keyframes", *stages], *keyframes.shape[:3])
    texts = {"prompt": prompt, "text": text, "empty": empty_text}
    rng = jax.random.PRNGKey(config.seed)
    frames, outputs = keyframes, {}
    for stage in stages:
        frames = _RUNNERS[stage](config.cascade, frames, texts, rng, monitor or (lambda *_: None))
        outputs[stage] = np.asarray(frames, np.float32)
    return outputs


def cascade_config() -> ml_collections.ConfigDict:
    """``config.cascade``: stage folders (empty: skipped) and the released settings of each stage."""
    return ml_collections.ConfigDict(dict(
        interpolation="", sr1_image="", sr1="", sr2="",
        interpolation_steps=75, interpolation_guidance=4.0,
        sr1_image_steps=70, sr1_image_guidance=4.0, sr1_image_noise_level=150,
        sr1_steps=125, sr1_guidance=7.0, sr1_noise_level=250, sr1_window=8, sr1_stride=7, sr1_scale=4,
        sr2_steps=50, sr2_guidance=15.0, sr2_strength=0.8, sr2_height=320, sr2_width=576,
        sr2_negative_prompt="low resolution, blur", fps=8.0,
    ))
