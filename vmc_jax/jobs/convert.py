"""``vmc-jax convert``: a hub pipeline folder (or one hub model folder) to Flax checkpoint folders.

A pipeline folder has ``model_index.json`` and one subfolder per component it lists. Each model
subfolder (``config.json`` and weights) is converted by the first entry of :data:`CONVERTERS`
that accepts its config, into a folder of ``config.json`` beside orbax ``params/`` that the same
loaders read back; the params keep their stored dtype. Subfolders without weights (tokenizer,
scheduler, feature extractor) and ``model_index.json`` are copied as they are; model folders no
converter accepts (a safety checker, a watermarker) are left out with a warning, but a pipeline's
UNet must convert. The destination is built in a hidden folder beside it and renamed when
complete, so a failed or interrupted run leaves nothing under its name.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from typing import Any, Callable

from tqdm import tqdm

from vmc_jax import files
from vmc_jax.hub import converted_store, text_loading
from vmc_jax.hub.unet_loading import load_unet

logger = logging.getLogger(__name__)

MODEL_INDEX = "model_index.json"
# Files that make a folder a model folder (weights, or the shard indexes "*.index.json" / "*.index.fp16.json").
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".index.json", ".index.fp16.json", ".msgpack", ".ckpt", ".pt", ".pth",
                    ".h5")
# Components a pipeline is converted for: one that its model_index.json lists must convert.
REQUIRED_COMPONENTS = ("unet",)


class UnsupportedModel(ValueError):
    """A model folder no converter accepts; the message names its config file and class."""


def _load_vae(path: str) -> tuple[Any, Any]:
    """``vmc_jax.hub.vae_loading.load_vae``, imported only when a VAE is converted."""
    try:
        from vmc_jax.hub.vae_loading import load_vae
    except ModuleNotFoundError as e:
        if e.name != "vmc_jax.hub.vae_loading":
            raise
        raise NotImplementedError(f"{path}: converting an AutoencoderKL needs vmc_jax.hub.vae_loading, which is missing") from e
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
        self.save(dst, converted_store.read_config(src), params)


CONVERTERS: tuple[Converter, ...] = (
    Converter("UNet", "_class_name", ("UNet3DConditionModel", "UNet2DConditionModel"), load_unet,
              converted_store.save_model),
    Converter("VAE", "_class_name", ("AutoencoderKL",), _load_vae, converted_store.save_model),
    Converter("text encoder", "model_type", ("t5", "clip_text_model"), text_loading.load_text_encoder,
              text_loading.save_converted),
)


@dataclasses.dataclass(frozen=True)
class _Step:
    """One output of a conversion: ``write(path)`` fills ``path`` with what ``dst/name`` will hold ("": ``dst``)."""

    name: str
    write: Callable[[str], None]
    description: str


def convert(src: str, dst: str, overwrite: bool = False) -> list[str]:
    """Converts a hub pipeline folder (or one model folder) ``src`` into ``dst``; returns the paths written.

    For a pipeline, ``dst`` gets one entry per component and ``model_index.json``; for a model
    folder, ``dst`` is the converted folder itself. An existing ``dst`` (other than an empty
    folder) is refused unless ``overwrite``, which replaces it whole once the new one is complete.
    """
    if not os.path.exists(src):
        raise FileNotFoundError(f"SRC not found: {src!r}")
    if os.path.isfile(os.path.join(src, MODEL_INDEX)):
        steps = _pipeline_steps(src, dst)
    elif os.path.isfile(os.path.join(src, converted_store.CONFIG_FILE)) and _has_weights(src):
        steps = [_model_step(src, "", dst)]
    else:
        raise ValueError(
            f"{src!r} is neither a pipeline folder (no {MODEL_INDEX}) nor a model folder "
            f"({converted_store.CONFIG_FILE} beside weights files)"
        )
    with files.atomic_dir(dst, overwrite) as tmp:
        for step in tqdm(steps, desc="convert", unit="component", disable=None):
            step.write(os.path.join(tmp, step.name) if step.name else tmp)
            logger.info("%s", step.description)
    return [os.path.join(dst, step.name) if step.name else dst for step in steps]


def converter_for(folder: str) -> Converter:
    """The converter for the model folder ``folder``, chosen by its config.json; UnsupportedModel if none."""
    config_path = os.path.join(folder, converted_store.CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise UnsupportedModel(f"{folder}: weights without a {converted_store.CONFIG_FILE}")
    config = converted_store.read_config(folder)
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
    steps = [_Step(MODEL_INDEX, lambda path: shutil.copyfile(index_path, path),
                   f"{MODEL_INDEX}: copied to {os.path.join(dst, MODEL_INDEX)}")]
    # components are listed as name: [library, class]; [null, null] marks an absent optional one
    names = [k for k, v in sorted(index.items()) if not k.startswith("_") and isinstance(v, list) and any(v)]
    for name in names:
        folder, target = os.path.join(src, name), os.path.join(dst, name)
        if not os.path.isdir(folder):
            _skip(name, f"{index_path} lists it but there is no folder {folder}")
        elif not _has_weights(folder):
            if name in REQUIRED_COMPONENTS:
                _skip(name, f"{folder} has no weights file ({', '.join('*' + s for s in _WEIGHT_SUFFIXES)})")
            else:
                steps.append(_Step(name, lambda path, folder=folder: shutil.copytree(folder, path),
                                   f"{name}: copied to {target}"))
        else:
            try:
                steps.append(_model_step(folder, name, target))
            except UnsupportedModel as e:
                _skip(name, f"vmc_jax has no converter for it: {e}")
    return steps


def _skip(name: str, reason: str) -> None:
    """Leaves the component ``name`` out with a warning; a required one (the UNet) is an error instead."""
    if name in REQUIRED_COMPONENTS:
        raise ValueError(f"cannot convert the pipeline's {name}: {reason}")
    logger.warning("skipping %s: %s", name, reason)


def _model_step(folder: str, name: str, target: str) -> _Step:
    """Converts the model folder ``folder`` into ``dst/name`` (``name`` "": ``dst`` itself), that is ``target``."""
    converter = converter_for(folder)
    return _Step(name, lambda path: converter(folder, path),
                 f"{name or os.path.basename(os.path.normpath(folder))}: converted {converter.kind} {folder} "
                 f"to {target}")


def _has_weights(folder: str) -> bool:
    return any(entry.endswith(_WEIGHT_SUFFIXES) and not entry.startswith(".") for entry in os.listdir(folder))
