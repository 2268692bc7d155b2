"""Text encoders: loading T5 / CLIP text checkpoints (hub folders or converted ones), their
tokenizers, and encoding prompts the way the reference pipelines do.

A hub folder is a transformers model folder: ``config.json`` plus ``model.safetensors``,
``pytorch_model.bin`` or a sharded index. A converted folder (``save_converted``) is the same
``config.json`` beside an orbax checkpoint of the Flax params in ``params/``.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from vmc_jax.conversion.layout import torch_to_flax
from vmc_jax.conversion.readers import find_weights_file, read_state_dict
from vmc_jax.models.clip import CLIPTextEncoder
from vmc_jax.models.t5 import T5Encoder

TextEncoder = T5Encoder | CLIPTextEncoder

# config.json `model_type` -> module class; `architectures` names for configs without a model_type.
_FAMILIES: dict[str, type[TextEncoder]] = {"t5": T5Encoder, "clip_text_model": CLIPTextEncoder}
_ARCHITECTURES = {"T5EncoderModel": "t5", "T5ForConditionalGeneration": "t5", "CLIPTextModel": "clip_text_model"}
_WEIGHT_STEMS = ("model", "pytorch_model")
_PARAMS_DIR = "params"


def read_config(folder: str) -> dict:
    """The ``config.json`` of a model folder, with an error naming the folder when it is missing."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config.json in {folder!r}: expected a transformers text encoder folder")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def text_encoder_from_config(config: Mapping[str, Any], dtype: Any = jnp.float32) -> TextEncoder:
    """The Flax module (compute ``dtype``) for a transformers config dict, chosen by model_type or architectures."""
    model_type = config.get("model_type")
    if model_type is None:
        known = [_ARCHITECTURES[a] for a in config.get("architectures", []) if a in _ARCHITECTURES]
        model_type = known[0] if known else None
    if model_type not in _FAMILIES:
        raise ValueError(
            f"unsupported text encoder: model_type={config.get('model_type')!r}, "
            f"architectures={config.get('architectures')!r}; supported model_type: {', '.join(_FAMILIES)}"
        )
    return _FAMILIES[model_type].from_hf_config(config, dtype=dtype)


def load_text_encoder(path: str, dtype: Any = None) -> tuple[TextEncoder, dict]:
    """Loads a text encoder from a hub model folder or a converted folder: (module, params).

    ``dtype`` casts the params and sets the module's compute dtype; None keeps the stored dtype
    (an fp16 checkpoint stays fp16) and computes in float32. Tensors are read and converted one
    by one, so peak host memory stays near one copy of the params.
    """
    config = read_config(path)
    module = text_encoder_from_config(config, dtype=dtype or jnp.float32)
    abstract = _abstract_params(module)
    if os.path.isdir(os.path.join(path, _PARAMS_DIR)):
        return module, _restore_converted(os.path.join(path, _PARAMS_DIR), abstract, dtype)
    weights = find_weights_file(path, _WEIGHT_STEMS)
    state_dict = type(module).adapt_state_dict(read_state_dict(weights), source=weights)
    # dtype=None here: tensors stay file-mapped until _to_device_arrays copies (and casts) each one
    flat = traverse_util.flatten_dict(torch_to_flax(state_dict, abstract, source=weights))
    return module, _to_device_arrays(flat, dtype)


def save_converted(folder: str, config: Mapping[str, Any], params: Any) -> None:
    """Writes a converted text encoder: ``params/`` (orbax) then ``config.json``, each atomically.

    Orbax writes into a temporary folder and renames it when complete; config.json is written
    last (temporary file + rename), so a folder with a config.json is always whole.
    """
    target = os.path.join(os.path.abspath(folder), _PARAMS_DIR)
    if os.path.exists(target):
        raise FileExistsError(f"{target!r} already exists; choose an empty folder")
    text_encoder_from_config(config)  # refuse configs that could not be loaded back
    os.makedirs(folder, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(target, params)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".config.json.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(dict(config), f, indent=2)
    os.replace(tmp, os.path.join(folder, "config.json"))


def load_tokenizer(path: str) -> Any:
    """The transformers tokenizer saved with a checkpoint: ``path/tokenizer/`` or ``path`` itself; never downloads."""
    folder = os.path.join(path, "tokenizer")
    if not os.path.isdir(folder):
        if not os.path.isfile(os.path.join(path, "tokenizer_config.json")):
            raise FileNotFoundError(
                f"no tokenizer in {path!r}: expected a tokenizer/ folder (or tokenizer_config.json) there"
            )
        folder = path
    from transformers import AutoTokenizer  # heavy import, needed only here

    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def encode_prompts(
    tokenizer: Any, encoder: TextEncoder, params: Any, prompts: str | Sequence[str], max_length: int = 77
) -> tuple[jax.Array, np.ndarray]:
    """Tokenizes and encodes prompts as the reference pipelines do: (hidden states, attention mask).

    T5 (Show-1 / IF ``encode_prompt``): the text is lowercased and stripped (their
    ``clean_caption=False`` preprocessing), padded to ``max_length``, and the padding is masked
    inside the encoder. CLIP (diffusers' text-to-video pipelines): padded to ``max_length`` and
    encoded without a mask, as those pipelines do when the config has no ``use_attention_mask``;
    the tokenizer's mask is still returned.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    is_t5 = isinstance(encoder, T5Encoder)
    if is_t5:
        prompts = [p.lower().strip() for p in prompts]
    tokens = tokenizer(
        prompts, padding="max_length", max_length=max_length, truncation=True,
        add_special_tokens=True, return_tensors="np",
    )
    mask = tokens["attention_mask"]
    hidden = _apply(encoder, params, tokens["input_ids"], mask if is_t5 else None)
    return hidden, mask


@functools.partial(jax.jit, static_argnums=0)
def _apply(encoder: TextEncoder, params: Any, input_ids: np.ndarray, mask: np.ndarray | None) -> jax.Array:
    return encoder.apply({"params": params}, input_ids, mask)


def _abstract_params(module: TextEncoder) -> Any:
    ids = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(lambda: module.init(jax.random.key(0), ids))["params"]


def _to_device_arrays(flat: dict, dtype: Any) -> dict:
    """Copies each leaf to the default device and casts it there, one tensor at a time.

    ``flat`` is emptied as it goes and each copy is waited for (transfers are asynchronous), so a
    tensor's file mapping is released before the next one is read: peak host memory stays near
    one copy of the params in their final dtype.
    """
    out = {}
    for path in list(flat):
        array = jax.device_put(flat.pop(path))
        out[path] = (array if dtype is None else array.astype(dtype)).block_until_ready()
    return traverse_util.unflatten_dict(out)


def _restore_converted(params_dir: str, abstract: Any, dtype: Any) -> dict:
    stored = ocp.StandardCheckpointer().metadata(params_dir).item_metadata.tree
    stored_flat = traverse_util.flatten_dict(dict(stored))
    expected_flat = traverse_util.flatten_dict(abstract)
    stored_shapes = {"/".join(k): tuple(v.shape) for k, v in stored_flat.items()}
    expected_shapes = {"/".join(k): tuple(v.shape) for k, v in expected_flat.items()}
    if stored_shapes != expected_shapes:
        problems = [f"missing {k}" for k in expected_shapes.keys() - stored_shapes.keys()]
        problems += [f"unexpected {k}" for k in stored_shapes.keys() - expected_shapes.keys()]
        problems += [
            f"{k}: stored {stored_shapes[k]}, model {expected_shapes[k]}"
            for k in expected_shapes.keys() & stored_shapes.keys() if stored_shapes[k] != expected_shapes[k]
        ]
        raise ValueError(f"{params_dir} does not fit the model:\n  " + "\n  ".join(sorted(problems)))
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = traverse_util.unflatten_dict({
        k: jax.ShapeDtypeStruct(v.shape, dtype or stored_flat[k].dtype, sharding=sharding)
        for k, v in expected_flat.items()
    })
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(params_dir, target)
