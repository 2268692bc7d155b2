"""Checking a job's config up front: every field known, every value in range, every path present."""

from __future__ import annotations

import difflib
import os
import re
from typing import Any, Callable

import jax.numpy as jnp
import ml_collections

from vmc_jax import checkpoints, inversion, training
from vmc_jax.cascade_runner import STAGES
from vmc_jax.models.unet_config import UNetConfig

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}  # train.compute_dtype -> dtype
LR_SCHEDULES = ("constant", "linear", "cosine")
NON_FINITE_POLICIES = ("stop", "skip")
PIPELINE_PARTS = ("unet", "text_encoder", "tokenizer", "scheduler")


def _at_least(low: int) -> Callable[[Any], str | None]:
    """An integer count of at least ``low``."""
    return lambda v: None if isinstance(v, int) and not isinstance(v, bool) and v >= low \
        else f"must be an integer of at least {low}"


def _non_negative(v: Any) -> str | None:
    return None if _is_number(v) and v >= 0 else "must be at least 0"


def _above(low: float) -> Callable[[Any], str | None]:
    return lambda v: None if _is_number(v) and v > low else f"must be greater than {low}"


def _within(low: float, high: float) -> Callable[[Any], str | None]:
    return lambda v: None if _is_number(v) and low <= v < high else f"must be in [{low}, {high})"


def _one_of(allowed: tuple) -> Callable[[Any], str | None]:
    return lambda v: None if v in allowed else f"is not one of {list(allowed)}"


def _of_type(*types: type) -> Callable[[Any], str | None]:
    names = " or ".join(t.__name__ for t in types)
    return lambda v: None if isinstance(v, types) and not (bool not in types and isinstance(v, bool)) \
        else f"must be a {names}"


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _regex(v: Any) -> str | None:
    try:
        re.compile(v)
    except (re.error, TypeError) as e:
        return f"is not a regular expression ({e})"
    return None


def _prompt_list(v: Any) -> str | None:
    return None if all(isinstance(p, str) for p in v) else "must be a list of strings"


def _path(v: Any) -> str | None:
    return None if os.path.exists(v) else "does not exist"


def _optional_path(v: Any) -> str | None:
    return None if not v or os.path.exists(v) else "does not exist"


# field -> check(value) returning the problem or None. These are all the fields a job reads.
FIELDS: dict[str, Callable[[Any], str | None]] = {
    "prompt": _of_type(str), "invariant_prompt": _of_type(str), "seed": _of_type(int),
    "data.num_frames": _at_least(2), "data.height": _at_least(1), "data.width": _at_least(1),
    "data.stride": _at_least(1), "data.start": _at_least(0), "data.reverse": _of_type(bool),
    "train.steps": _at_least(1), "train.lr": _above(0), "train.lr_schedule": _one_of(LR_SCHEDULES),
    "train.warmup_steps": _at_least(0), "train.b1": _within(0, 1), "train.b2": _within(0, 1),
    "train.eps": _above(0), "train.weight_decay": _non_negative, "train.clip_grad_norm": _above(0),
    "train.loss": _one_of(training.TRAIN_LOSS_KINDS), "train.batch_size": _at_least(1), "train.tuned_params": _regex,
    "train.remat": _of_type(bool), "train.compute_dtype": _one_of(tuple(COMPUTE_DTYPES)),
    "train.checkpoint_every": _at_least(1), "train.log_every": _at_least(1),
    "train.non_finite": _one_of(NON_FINITE_POLICIES),
    "mesh.clips": _of_type(int), "mesh.data": _of_type(int),
    "validation.prompts": _prompt_list, "validation.every": _at_least(0),
    "inversion.steps": _at_least(1), "inversion.method": _one_of(inversion.METHODS),
    "inversion.scheduler": _optional_path,
    "sampling.steps": _at_least(1), "sampling.guidance": _of_type(int, float),
    "sampling.negative_prompt": _of_type(str), "sampling.fps": _above(0),
    "validation.stages": lambda v: None if isinstance(v, (list, tuple)) and set(v) <= set(STAGES)
    else f"must be a list of stages among {list(STAGES)}",
    **{f"cascade.{stage}": _of_type(str) for stage in ("interpolation", "sr1_image", "sr1", "sr2")},
    **{f"cascade.{stage}_steps": _at_least(1) for stage in ("interpolation", "sr1_image", "sr1", "sr2")},
    **{f"cascade.{stage}_guidance": _of_type(int, float) for stage in ("interpolation", "sr1_image", "sr1", "sr2")},
    "cascade.sr1_image_noise_level": _within(0, 1000), "cascade.sr1_noise_level": _within(0, 1000),
    "cascade.sr1_window": _at_least(2), "cascade.sr1_stride": _at_least(1), "cascade.sr1_scale": _at_least(1),
    "cascade.sr2_strength": _above(0), "cascade.sr2_height": _at_least(1), "cascade.sr2_width": _at_least(1),
    "cascade.sr2_negative_prompt": _of_type(str), "cascade.fps": _above(0),
    "pretrained": _path, "video": _path,  # last: a bad value elsewhere is named even with the default paths
}


# config.clips.<name>.<field>: the clips of a job that tunes several at once (see clip_configs).
CLIP_FIELDS: dict[str, Callable[[Any], str | None]] = {
    "video": _path, "prompt": _of_type(str), "validation_prompts": _prompt_list}
_CLIP_FIELD = re.compile(rf"clips\.([A-Za-z0-9_-]+)\.({'|'.join(CLIP_FIELDS)})$")


def field_check(name: str) -> Callable[[Any], str | None] | None:
    """The check of config field ``name`` ("train.lr", "clips.car.video"...), or None for an unknown field."""
    match = _CLIP_FIELD.match(name)
    return CLIP_FIELDS[match[2]] if match else FIELDS.get(name)


def clip_configs(config: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
    """Clip name -> the one-clip job config of each of ``config.clips`` (its video, prompt and
    validation prompts in place of the job's, one clip on the mesh); {} for a one-clip job."""
    configs = {}
    for name, clip in (config.get("clips") or {}).items():
        one = ml_collections.ConfigDict(config.to_dict())
        one.clips = ml_collections.ConfigDict()
        one.video, one.prompt = clip.video, clip.prompt
        one.validation.prompts = list(clip.validation_prompts)
        one.mesh.clips = 1
        configs[name] = one
    return configs


def _flatten(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def did_you_mean(name: str, known: list[str]) -> str:
    """``'; did you mean "x"?'`` for the closest known name, or nothing."""
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return f'; did you mean "{close[0]}"?' if close else ""


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Fails fast with a ValueError naming the field and value the job would only trip over later."""
    flat = _flatten(config)
    for name in flat:
        if field_check(name) is None:
            raise ValueError(f"config.{name}: unknown field{did_you_mean(name, list(FIELDS))}")
    clip_fields = [f"clips.{clip}.{field}" for clip in config.get("clips") or {} for field in CLIP_FIELDS]
    for name in clip_fields:
        if name not in flat:
            raise ValueError(f"config.{name} is missing (see configs/vmc.py:all)")
        problem = field_check(name)(flat[name])
        if problem:
            raise ValueError(f"config.{name}={flat[name]!r} {problem}")
    for one in list(clip_configs(config).values()) or [config]:
        _validate_one_clip(one)


def _validate_one_clip(config: ml_collections.ConfigDict) -> None:
    flat = _flatten(config)
    for name, check in FIELDS.items():
        if name not in flat:
            raise ValueError(f"config.{name} is missing (see configs/vmc.py)")
        problem = check(flat[name])
        if problem:
            raise ValueError(f"config.{name}={flat[name]!r} {problem}")
    for part in PIPELINE_PARTS:
        if not os.path.isdir(os.path.join(config.pretrained, part)):
            raise FileNotFoundError(f"config.pretrained: {config.pretrained!r} has no {part}/ "
                                    "(expected a pipeline folder written by `vmc-jax convert`)")
    unet_folder = os.path.join(config.pretrained, "unet")
    factor = 2 ** UNetConfig.from_dict(checkpoints.read_config(unet_folder), source=unet_folder).num_downsamplers
    for name in ("data.height", "data.width"):
        if flat[name] % factor:
            raise ValueError(f"config.{name}={flat[name]} must be divisible by {factor} "
                             f"(the UNet in {unet_folder} downsamples by {factor})")
