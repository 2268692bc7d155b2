"""``vmc-jax convert``: a hub pipeline folder (or one hub model folder) to Flax checkpoint folders.

A pipeline folder has ``model_index.json`` and one subfolder per component it lists. Each model
subfolder (``config.json`` and weights) is converted by the first entry of :data:`CONVERTERS`
that accepts its config, into a folder of ``config.json`` beside orbax ``params/`` that the same
loaders read back; the params keep their stored dtype. Subfolders without weights (tokenizer,
scheduler, feature extractor) and ``model_index.json`` are copied as they are; model folders no
converter accepts (a safety checker, a watermarker) are left out with a warning. Every output
is written to ``<name>.tmp`` and renamed when complete, so an interrupted run leaves no half
component behind.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from typing import Any, Callable

from tqdm import tqdm

from vmc_jax import checkpoints, text
from vmc_jax.loading import load_unet

logger = logging.getLogger(__name__)

MODEL_INDEX = "model_index.json"
# Files that make a folder a model folder (weights, or the shard indexes "*.index.json" / "*.index.fp16.json").
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".index.json", ".index.fp16.json", ".msgpack", ".ckpt", ".pt", ".pth",
                    ".h5")


class UnsupportedModel(ValueError):
    """A model folder no converter accepts; the message names its config file and class."""


def _load_vae(path: str) -> tuple[Any, Any]:
    """``vmc_jax.vae.load_vae``, imported only when a VAE is converted."""
    try:
        from vmc_jax.vae import load_vae
    except ModuleNotFoundError as e:
        if e.name != "vmc_jax.vae":
            raise
        raise NotImplementedError(f"{path}: converting an AutoencoderKL needs vmc_jax.vae, which is missing") from e
    return load_vae(path)


@dataclasses.dataclass(frozen=True)
class Converter:
    """One kind of model folder: which configs it takes, how it is loaded and how it is written."""

    kind: str
    config_key: str  # "_class_name" (diffusers) or "model_type" (transformers)
    values: tuple[str, ...]
    load: Callable[[str], tuple[Any, Any]]  # folder -> (module, params in their stored dtype)
    save: Callable[[str, dict[str, Any], Any], None]  # (folder, config, params)

    def accepts(self, config: dict[str, Any]) -> bool:
        """Whether ``config`` (a model's config.json) is of this kind."""
        return config.get(self.config_key) in self.values

    def __call__(self, src: str, dst: str) -> None:
        """Converts the model folder ``src`` into the Flax checkpoint folder ``dst``."""
        _, params = self.load(src)
        self.save(dst, checkpoints.read_config(src), params)


CONVERTERS: tuple[Converter, ...] = (
    Converter("UNet", "_class_name", ("UNet3DConditionModel", "UNet2DConditionModel"), load_unet,
              checkpoints.save_model),
    Converter("VAE", "_class_name", ("AutoencoderKL",), _load_vae, checkpoints.save_model),
    Converter("text encoder", "model_type", ("t5", "clip_text_model"), text.load_text_encoder,
              text.save_converted),
)


@dataclasses.dataclass(frozen=True)
class _Step:
    """One output of a conversion: ``write(path)`` fills ``path`` with what ``target`` will hold."""

    target: str
    write: Callable[[str], None]
    description: str


def convert(src: str, dst: str, overwrite: bool = False) -> list[str]:
    """Converts a hub pipeline folder (or one model folder) ``src`` into ``dst``; returns the paths written.

    For a pipeline, ``dst`` gets one entry per component and ``model_index.json``; for a model
    folder, ``dst`` is the converted folder itself. Existing non-empty outputs are refused unless
    ``overwrite``, and every target is checked before anything is written.
    """
    if not os.path.exists(src):
        raise FileNotFoundError(f"SRC not found: {src!r}")
    if os.path.isfile(os.path.join(src, MODEL_INDEX)):
        steps = _pipeline_steps(src, dst)
    elif os.path.isfile(os.path.join(src, checkpoints.CONFIG_FILE)) and _has_weights(src):
        steps = [_model_step(src, dst, os.path.basename(os.path.normpath(src)))]
    else:
        raise ValueError(
            f"{src!r} is neither a pipeline folder (no {MODEL_INDEX}) nor a model folder "
            f"({checkpoints.CONFIG_FILE} beside weights files)"
        )
    for step in steps:
        if _is_nonempty(step.target) and not overwrite:
            raise FileExistsError(f"{step.target} already exists; pass overwrite=True (--overwrite) to replace it")
    for step in tqdm(steps, desc="convert", unit="component", disable=None):
        _write_atomically(step.target, step.write)
        logger.info("%s", step.description)
    return [step.target for step in steps]


def converter_for(folder: str) -> Converter:
    """The converter for the model folder ``folder``, chosen by its config.json; UnsupportedModel if none."""
    config_path = os.path.join(folder, checkpoints.CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise UnsupportedModel(f"{folder}: weights without a {checkpoints.CONFIG_FILE}")
    config = checkpoints.read_config(folder)
    for converter in CONVERTERS:
        if converter.accepts(config):
            return converter
    found = {key: config[key] for key in ("_class_name", "model_type", "architectures") if key in config}
    supported = "; ".join(f"{c.kind}: {c.config_key} in {list(c.values)}" for c in CONVERTERS)
    raise UnsupportedModel(f"{config_path}: unknown model class {found or 'not named'} (supported: {supported})")


def _pipeline_steps(src: str, dst: str) -> list[_Step]:
    """model_index.json and every component it lists that exists and can be copied or converted."""
    index_path = os.path.join(src, MODEL_INDEX)
    with open(index_path, encoding="utf-8") as f:
        try:
            index = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{index_path}: not valid JSON ({e})") from e
    steps = [_Step(os.path.join(dst, MODEL_INDEX), lambda tmp: shutil.copyfile(index_path, tmp),
                   f"{MODEL_INDEX}: copied to {os.path.join(dst, MODEL_INDEX)}")]
    # components are listed as name: [library, class]; [null, null] marks an absent optional one
    names = [k for k, v in sorted(index.items()) if not k.startswith("_") and isinstance(v, list) and any(v)]
    for name in names:
        folder, target = os.path.join(src, name), os.path.join(dst, name)
        if not os.path.isdir(folder):
            logger.warning("skipping %s: %s lists it but there is no folder %s", name, MODEL_INDEX, folder)
        elif not _has_weights(folder):
            steps.append(_Step(target, lambda tmp, folder=folder: shutil.copytree(folder, tmp),
                               f"{name}: copied to {target}"))
        else:
            try:
                steps.append(_model_step(folder, target, name))
            except UnsupportedModel as e:
                logger.warning("skipping %s (vmc_jax has no converter for it): %s", name, e)
    return steps


def _model_step(folder: str, target: str, name: str) -> _Step:
    converter = converter_for(folder)
    return _Step(target, lambda tmp: converter(folder, tmp),
                 f"{name}: converted {converter.kind} {folder} to {target}")


def _has_weights(folder: str) -> bool:
    return any(entry.endswith(_WEIGHT_SUFFIXES) for entry in os.listdir(folder))


def _is_nonempty(path: str) -> bool:
    return os.path.isfile(path) or (os.path.isdir(path) and bool(os.listdir(path)))


def _write_atomically(target: str, write: Callable[[str], None]) -> None:
    """Writes ``target`` through ``write(target + ".tmp")`` and a rename, replacing what was there."""
    tmp = target + ".tmp"
    _remove(tmp)  # left by an interrupted run
    os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
    write(tmp)
    _remove(target)
    os.replace(tmp, target)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)
