"""A job's config, typed: one frozen dataclass a section, each field with its default and its check.

``configs/vmc.py`` starts from :func:`defaults` (these defaults as a ``ConfigDict``) and changes what
its argument needs; :meth:`Job.from_config` checks every field once (an unknown name gets the
closest known one) and returns the typed settings that the jobs hand down: below the jobs, library
functions take one section (``Sampling``, ``Inversion``, ...) or plain values, never the ConfigDict.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from typing import Any, Callable, Mapping

import jax.numpy as jnp
import ml_collections

from vmc_jax import keyframe_sampling, training
from vmc_jax.cascade import STAGES
from vmc_jax.hub import converted_store
from vmc_jax.kernels import attention_core
from vmc_jax.models.unet_config import UNetConfig

Check = Callable[[Any], "str | None"]  # a value -> what is wrong with it, or None
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}  # train.compute_dtype -> dtype
LR_SCHEDULES = ("constant", "linear", "cosine")
NON_FINITE_POLICIES = ("stop", "skip")
SAMPLING_INITS = ("inverted", "random")
PIPELINE_PARTS = ("unet", "text_encoder", "tokenizer", "scheduler")
CASCADE_STAGE_FIELDS = ("interpolation", "sr1_image", "sr1", "sr2")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _at_least(low: int) -> Check:
    """An integer count of at least ``low``."""
    return lambda v: None if isinstance(v, int) and not isinstance(v, bool) and v >= low \
        else f"must be an integer of at least {low}"


def _non_negative(v: Any) -> str | None:
    return None if _is_number(v) and v >= 0 else "must be at least 0"


def _above(low: float) -> Check:
    return lambda v: None if _is_number(v) and v > low else f"must be greater than {low}"


def _within(low: float, high: float) -> Check:
    return lambda v: None if _is_number(v) and low <= v < high else f"must be in [{low}, {high})"


def _one_of(allowed: tuple) -> Check:
    return lambda v: None if v in allowed else f"is not one of {list(allowed)}"


def _of_type(*types: type) -> Check:
    names = " or ".join(t.__name__ for t in types)
    return lambda v: None if isinstance(v, types) and not (bool not in types and isinstance(v, bool)) \
        else f"must be a {names}"


def _regex(v: Any) -> str | None:
    try:
        re.compile(v)
    except (re.error, TypeError) as e:
        return f"is not a regular expression ({e})"
    return None


def _strings(v: Any) -> str | None:
    return None if isinstance(v, (list, tuple)) and all(isinstance(p, str) for p in v) \
        else "must be a list of strings"


def _stages(v: Any) -> str | None:
    return None if isinstance(v, (list, tuple)) and set(v) <= set(STAGES) \
        else f"must be a list of stages among {list(STAGES)}"


def _path(v: Any) -> str | None:
    return None if isinstance(v, str) and os.path.exists(v) else "does not exist"


def _optional_path(v: Any) -> str | None:
    return None if v == "" or _path(v) is None else "does not exist"


def _field(default: Any, check: Check) -> Any:
    """A dataclass field with its default and its check (``field.metadata["check"]``)."""
    if isinstance(default, (list, tuple)):
        return dataclasses.field(default_factory=lambda: tuple(default), metadata={"check": check})
    return dataclasses.field(default=default, metadata={"check": check})


@dataclasses.dataclass(frozen=True)
class Data:
    """Which frames of the video the job tunes on, at what size (``vmc_jax.video_io.load_clip``)."""

    num_frames: int = _field(8, _at_least(2))
    height: int = _field(40, _at_least(1))
    width: int = _field(64, _at_least(1))
    stride: int = _field(1, _at_least(1))
    start: int = _field(0, _at_least(0))
    reverse: bool = _field(False, _of_type(bool))


@dataclasses.dataclass(frozen=True)
class Train:
    """The tuning run: optimizer, loss, tuned parameters, compute and its checkpoint and log cadence."""

    steps: int = _field(400, _at_least(1))
    lr: float = _field(1e-4, _above(0))
    lr_schedule: str = _field("constant", _one_of(LR_SCHEDULES))
    warmup_steps: int = _field(0, _at_least(0))
    b1: float = _field(0.9, _within(0, 1))
    b2: float = _field(0.999, _within(0, 1))
    eps: float = _field(1e-8, _above(0))
    weight_decay: float = _field(1e-2, _non_negative)
    clip_grad_norm: float = _field(1.0, _above(0))
    loss: str = _field("paper", _one_of(training.TRAIN_LOSS_KINDS))  # "official": the released code's
    batch_size: int = _field(1, _at_least(1))  # noisy copies of the clip a step, split over the data axis
    tuned_params: str = _field(training.TEMPORAL_ATTENTION_QKV, _regex)  # over "/"-joined param paths
    remat: bool = _field(True, _of_type(bool))
    compute_dtype: str = _field("float32", _one_of(tuple(COMPUTE_DTYPES)))
    checkpoint_every: int = _field(100, _at_least(1))
    log_every: int = _field(10, _at_least(1))
    non_finite: str = _field("stop", _one_of(NON_FINITE_POLICIES))  # a non-finite step stops the run, or is skipped


@dataclasses.dataclass(frozen=True)
class Mesh:
    """Sizes of the ("clips", "data") mesh axes, -1 for the rest of the devices (``vmc_jax.parallel``)."""

    clips: int = _field(1, _of_type(int))
    data: int = _field(-1, _of_type(int))


@dataclasses.dataclass(frozen=True)
class Validation:
    """Samples written while tuning: of these prompts, every ``every`` steps (0: none), through ``stages``."""

    prompts: tuple[str, ...] = _field((), _strings)
    every: int = _field(100, _at_least(0))
    stages: tuple[str, ...] = _field(("keyframes",), _stages)


@dataclasses.dataclass(frozen=True)
class Inversion:
    """DDIM inversion of the clip: steps, "model" or "official" (the release's), and the schedule to use."""

    steps: int = _field(75, _at_least(1))
    method: str = _field("model", _one_of(keyframe_sampling.METHODS))
    scheduler: str = _field("", _optional_path)  # a scheduler config; empty: the model's (or the release's)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Keyframe sampling: where it starts, DDIM steps, classifier-free guidance, negative prompt, frame rate."""

    # "inverted": the clip's DDIM-inverted noise (VMC); "random": seeded noise (the model's own baseline)
    init: str = _field("inverted", _one_of(SAMPLING_INITS))
    steps: int = _field(75, _at_least(1))
    guidance: float = _field(9.0, _of_type(int, float))
    # 0 for Show-1; the share of the guided output rescaled to the conditional one's spread (models of
    # a zero terminal SNR schedule, as the world model's, whose plain guidance overshoots)
    guidance_rescale: float = _field(0.0, _within(0.0, 1.0))
    negative_prompt: str = _field("", _of_type(str))
    fps: float = _field(4.0, _above(0))


@dataclasses.dataclass(frozen=True)
class Cascade:
    """The stages after the keyframes: a pipeline folder each (empty: skipped) and the release's settings."""

    interpolation: str = _field("", _of_type(str))
    sr1_image: str = _field("", _of_type(str))  # DeepFloyd IF-II: sr1's first frame
    sr1: str = _field("", _of_type(str))
    sr2: str = _field("", _of_type(str))
    interpolation_steps: int = _field(75, _at_least(1))
    interpolation_guidance: float = _field(4.0, _of_type(int, float))
    sr1_image_steps: int = _field(70, _at_least(1))
    sr1_image_guidance: float = _field(4.0, _of_type(int, float))
    sr1_image_noise_level: int = _field(150, _within(0, 1000))
    sr1_steps: int = _field(125, _at_least(1))
    sr1_guidance: float = _field(7.0, _of_type(int, float))
    sr1_noise_level: int = _field(250, _within(0, 1000))
    sr1_window: int = _field(8, _at_least(2))
    sr1_stride: int = _field(7, _at_least(1))
    sr1_scale: int = _field(4, _at_least(1))
    sr2_steps: int = _field(50, _at_least(1))
    sr2_guidance: float = _field(15.0, _of_type(int, float))
    sr2_strength: float = _field(0.8, _above(0))
    sr2_height: int = _field(320, _at_least(1))
    sr2_width: int = _field(576, _at_least(1))
    sr2_negative_prompt: str = _field("low resolution, blur", _of_type(str))
    fps: float = _field(8.0, _above(0))


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """``vmc-jax evaluate``: the world evaluator on world jobs; on real videos, the CLIP metrics with this model."""

    clip: str = _field("", _optional_path)  # a hub CLIPModel folder (e.g. openai/clip-vit-base-patch32)


@dataclasses.dataclass(frozen=True)
class Clip:
    """One of several clips tuned at once (``config.clips.<name>``): its video and prompts."""

    video: str = _field("", _path)
    prompt: str = _field("", _of_type(str))
    validation_prompts: tuple[str, ...] = _field((), _strings)


SECTIONS = {"data": Data, "train": Train, "mesh": Mesh, "validation": Validation, "inversion": Inversion,
            "sampling": Sampling, "cascade": Cascade, "evaluation": Evaluation}


@dataclasses.dataclass(frozen=True)
class Job:
    """A tuning job's whole config, checked (see the module docstring)."""

    pretrained: str = _field("checkpoints/show-1-base", _path)  # a folder written by `vmc-jax convert`
    video: str = _field("", _path)  # a video file or a folder of frames
    prompt: str = _field("", _of_type(str))
    invariant_prompt: str = _field("", _of_type(str))  # empty: prompts.appearance_invariant(prompt)
    seed: int = _field(12345, _of_type(int))
    # The attention core of the keyframe UNet: "auto" (each backend's kernel where it applies) or one of
    # attention_core.IMPLEMENTATIONS, e.g. "blocked" for one program on 1 or N CPU devices.
    attention: str = _field("auto", _one_of(attention_core.IMPLEMENTATIONS))
    clips: Mapping[str, Clip] = dataclasses.field(default_factory=dict)  # name -> Clip; empty: one clip
    data: Data = dataclasses.field(default_factory=Data)
    train: Train = dataclasses.field(default_factory=Train)
    mesh: Mesh = dataclasses.field(default_factory=Mesh)
    validation: Validation = dataclasses.field(default_factory=Validation)
    inversion: Inversion = dataclasses.field(default_factory=Inversion)
    sampling: Sampling = dataclasses.field(default_factory=Sampling)
    cascade: Cascade = dataclasses.field(default_factory=Cascade)
    evaluation: Evaluation = dataclasses.field(default_factory=Evaluation)

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> "Job":
        """The checked job of ``config`` (a field it leaves out takes its default): a ValueError
        (FileNotFoundError for a missing pipeline part) names the first unknown field or bad value,
        before anything runs."""
        given = dict(config.items())
        names = [k for k in given if k not in SECTIONS and k != "clips"]
        names += [f"{s}.{k}" for s in SECTIONS for k in (given.get(s) or {})]
        for name in names:
            if name not in FIELDS:
                raise ValueError(f"config.{name}: unknown field{did_you_mean(name, list(FIELDS))}")
        job = cls(**{k: _checked(k, v, FIELDS[k]) for k, v in given.items() if k in _TOP_FIELDS},
                  clips={name: _section(Clip, clip, f"clips.{name}", required=True)
                         for name, clip in (given.get("clips") or {}).items()},
                  **{s: _section(kind, given.get(s), s) for s, kind in SECTIONS.items()})
        for one in list(job.one_clip_jobs().values()) or [job]:
            one._check_files()
        return job

    def one_clip_jobs(self) -> dict[str, "Job"]:
        """Clip name -> the one-clip job of each of ``clips`` (its video, prompt and validation prompts in
        place of the job's, one clip on the mesh); {} for a one-clip job."""
        return {name: dataclasses.replace(
            self, clips={}, video=clip.video, prompt=clip.prompt, mesh=dataclasses.replace(self.mesh, clips=1),
            validation=dataclasses.replace(self.validation, prompts=clip.validation_prompts))
            for name, clip in self.clips.items()}

    def to_config(self) -> ml_collections.ConfigDict:
        """The job as a ConfigDict (lists for tuples), e.g. to save beside a run."""
        return ml_collections.ConfigDict(_plain(dataclasses.asdict(self)))

    def _check_files(self) -> None:
        """The pipeline's parts are there and the frames divide into the UNet's downsampling."""
        for name in ("pretrained", "video"):
            problem = _path(getattr(self, name))
            if problem:
                raise ValueError(f"config.{name}={getattr(self, name)!r} {problem}")
        for part in PIPELINE_PARTS:
            if not os.path.isdir(os.path.join(self.pretrained, part)):
                raise FileNotFoundError(f"config.pretrained: {self.pretrained!r} has no {part}/ "
                                        "(expected a pipeline folder written by `vmc-jax convert`)")
        unet_folder = os.path.join(self.pretrained, "unet")
        factor = 2 ** UNetConfig.from_dict(converted_store.read_config(unet_folder), source=unet_folder).num_downsamplers
        for name in ("height", "width"):
            if getattr(self.data, name) % factor:
                raise ValueError(f"config.data.{name}={getattr(self.data, name)} must be divisible by {factor} "
                                 f"(the UNet in {unet_folder} downsamples by {factor})")


_TOP_FIELDS = {f.name: f.metadata["check"] for f in dataclasses.fields(Job) if "check" in f.metadata}


def _checked(name: str, value: Any, check: Check) -> Any:
    """``value`` (lists as tuples) if ``check`` passes; the job's own paths are checked with its files."""
    if name not in ("pretrained", "video"):
        problem = check(value)
        if problem:
            raise ValueError(f"config.{name}={value!r} {problem}")
    return tuple(value) if isinstance(value, list) else value


def _section(kind: type, values: Mapping[str, Any] | None, name: str, required: bool = False) -> Any:
    """The ``kind`` dataclass of the config section ``values`` (unknown keys refused by the caller);
    a field left out takes its default, unless ``required``."""
    values = dict(values or {})
    fields = {f.name: f.metadata["check"] for f in dataclasses.fields(kind)}
    for key in fields if required else ():
        if key not in values:
            raise ValueError(f"config.{name}.{key} is missing (see configs/vmc.py:all)")
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"config.{name}.{unknown[0]}: unknown field{did_you_mean(unknown[0], list(fields))}")
    return kind(**{key: _checked(f"{name}.{key}", value, fields[key]) for key, value in values.items()})


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return list(value) if isinstance(value, tuple) else value


def defaults() -> ml_collections.ConfigDict:
    """Every field of a job with its default, as the ConfigDict that ``configs/*.py`` start from."""
    return Job().to_config()


# "train.lr" -> its check: every field a job reads (config.clips.<name>.<field> aside, see field_check).
FIELDS: dict[str, Check] = {**_TOP_FIELDS, **{f"{s}.{f.name}": f.metadata["check"]
                                              for s, kind in SECTIONS.items() for f in dataclasses.fields(kind)}}
_CLIP_FIELD = re.compile(rf"clips\.([A-Za-z0-9_-]+)\.({'|'.join(f.name for f in dataclasses.fields(Clip))})$")


def field_check(name: str) -> Check | None:
    """The check of config field ``name`` ("train.lr", "clips.car.video"...), or None for an unknown field."""
    match = _CLIP_FIELD.match(name)
    return Clip.__dataclass_fields__[match[2]].metadata["check"] if match else FIELDS.get(name)


def did_you_mean(name: str, known: list[str]) -> str:
    """``'; did you mean "x"?'`` for the closest known name, or nothing."""
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return f'; did you mean "{close[0]}"?' if close else ""
