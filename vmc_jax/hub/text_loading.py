"""Text encoders: loading T5 / CLIP text checkpoints (hub folders or converted ones), their
tokenizers, and encoding prompts the way the reference pipelines do.

A hub folder is a transformers model folder: ``config.json`` plus ``model.safetensors``,
``pytorch_model.bin`` or a sharded index. A converted folder (``save_converted``) is the same
``config.json`` beside an orbax checkpoint of the Flax params in ``params/``.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from vmc_jax.hub import converted_store
from vmc_jax.hub.weights import load_params, model_config
from vmc_jax.models.clip import CLIPTextEncoder
from vmc_jax.models.t5 import T5Encoder

TextEncoder = T5Encoder | CLIPTextEncoder

# config.json `model_type` -> module class; `architectures` names for configs without a model_type.
_FAMILIES: dict[str, type[TextEncoder]] = {"t5": T5Encoder, "clip_text_model": CLIPTextEncoder}
_ARCHITECTURES = {"T5EncoderModel": "t5", "T5ForConditionalGeneration": "t5", "CLIPTextModel": "clip_text_model"}
_WEIGHT_STEMS = ("model", "pytorch_model")


def text_encoder_from_config(config: Mapping[str, Any], dtype: Any = jnp.float32,
                             source: str = "config") -> TextEncoder:
    """The Flax module (compute ``dtype``) for a transformers config dict (read from ``source``, named in
    errors), chosen by model_type or architectures."""
    model_type = config.get("model_type")
    if model_type is None:
        known = [_ARCHITECTURES[a] for a in config.get("architectures", []) if a in _ARCHITECTURES]
        model_type = known[0] if known else None
    if model_type not in _FAMILIES:
        raise ValueError(
            f"{source}: unsupported text encoder: model_type={config.get('model_type')!r}, "
            f"architectures={config.get('architectures')!r}; supported model_type: {', '.join(_FAMILIES)}"
        )
    module = _FAMILIES[model_type]
    return module(module.CONFIG_CLASS.from_dict(config, source), dtype=dtype)


def load_text_encoder(path: str, dtype: Any = None) -> tuple[TextEncoder, dict]:
    """Loads a text encoder from a hub model folder or a converted folder: (module, params).

    ``dtype`` casts the params and sets the module's compute dtype; None keeps the stored dtype
    (an fp16 checkpoint stays fp16) and computes in float32. Tensors are read and converted one
    by one, so peak host memory stays near one copy of the params.
    """
    config, source = model_config(path)
    module = text_encoder_from_config(config, dtype=dtype or jnp.float32, source=source)
    # no cast here: hub tensors stay file-mapped until _to_device_arrays copies (and casts) each one
    params = load_params(path, module, _WEIGHT_STEMS,
                         adapt=lambda state_dict, source: type(module).adapt_state_dict(state_dict, source=source))
    return module, _to_device_arrays(traverse_util.flatten_dict(params), dtype)


def save_converted(folder: str, config: Mapping[str, Any], params: Any) -> None:
    """Writes a converted text encoder (``config.json`` beside orbax ``params/``) that loads back.

    The config is checked first, so no folder is written that ``load_text_encoder`` would refuse;
    ``converted_store.save_model`` then writes the params atomically (orbax writes into a temporary
    folder and renames it when complete) and config.json last (temporary file + rename).
    """
    text_encoder_from_config(config)
    converted_store.save_model(folder, dict(config), params)


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
    the tokenizer's mask is still returned. A prompt longer than ``max_length`` tokens is
    truncated, with a warning. Each prompt is encoded alone (a batch of one, one compile), so
    its states do not depend on which prompts share the call (batched, they move by ~1e-6).
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    is_t5 = isinstance(encoder, T5Encoder)
    if is_t5:
        prompts = [p.lower().strip() for p in prompts]
    for prompt, ids in zip(prompts, tokenizer(prompts, add_special_tokens=True)["input_ids"]):
        if len(ids) > max_length:
            logging.warning("prompt %r is %d tokens; the text encoder reads only the first %d",
                            prompt[:60] + ("..." if len(prompt) > 60 else ""), len(ids), max_length)
    tokens = tokenizer(
        prompts, padding="max_length", max_length=max_length, truncation=True,
        add_special_tokens=True, return_tensors="np",
    )
    mask = tokens["attention_mask"]
    rows = [_apply(encoder, params, ids[None], row[None] if is_t5 else None)
            for ids, row in zip(tokens["input_ids"], mask)]
    return jnp.concatenate(rows), mask


@functools.partial(jax.jit, static_argnums=0)
def _apply(encoder: TextEncoder, params: Any, input_ids: np.ndarray, mask: np.ndarray | None) -> jax.Array:
    return encoder.apply({"params": params}, input_ids, mask)


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
