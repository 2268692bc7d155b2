"""The paper's CLIP metrics for real videos: text alignment and frame consistency.

Text alignment is the mean cosine between each frame's CLIP image embedding and the prompt's
CLIP text embedding; frame consistency the mean cosine between the image embeddings of
consecutive frames. Weights are the user's: a transformers ``CLIPModel`` folder (e.g. a download
of ``openai/clip-vit-base-patch32``: ``config.json``, weights, tokenizer files), or separate
``CLIPVisionModelWithProjection`` / ``CLIPTextModelWithProjection`` folders.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from vmc_jax import files, video_io
from vmc_jax.hub.unet_loading import load_params, model_config
from vmc_jax.models.clip_vision import CLIPTextProjectionEncoder, CLIPVisionEncoder

# The normalisation every released CLIP uses (transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_WEIGHT_STEMS = ("model", "pytorch_model")
METRICS = ("clip_text_alignment", "clip_frame_consistency")


def load_clip_tower(path: str, tower: type[CLIPVisionEncoder] | type[CLIPTextProjectionEncoder]) -> tuple[Any, dict]:
    """One tower (module, float32 params) from a hub ``CLIPModel`` folder or that tower's own folder."""
    config, source = model_config(path)
    module = tower(tower.CONFIG_CLASS.from_dict(config, source))
    return module, load_params(path, module, _WEIGHT_STEMS, adapt=tower.adapt_state_dict)


def preprocess(frames: np.ndarray, image_size: int, mean=CLIP_MEAN, std=CLIP_STD) -> jax.Array:
    """Frames ``(f, h, w, 3)`` (uint8, or float in [0, 1]) as CLIP input: the short side resized to
    ``image_size`` (bicubic, antialiased), the centre cropped square, normalised by ``mean`` / ``std``.

    This follows CLIPImageProcessor's steps with jax's resize, which differs from PIL's bicubic
    by a few grey levels; metrics compare videos preprocessed alike.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected frames (f, h, w, 3), got shape {frames.shape}")
    images = jnp.asarray(frames, jnp.float32) / (255.0 if frames.dtype == np.uint8 else 1.0)
    height, width = images.shape[1:3]
    scale = image_size / min(height, width)
    resized_h, resized_w = max(round(height * scale), image_size), max(round(width * scale), image_size)
    images = jax.image.resize(images, (len(images), resized_h, resized_w, 3), "cubic", antialias=True)
    top, left = (resized_h - image_size) // 2, (resized_w - image_size) // 2
    images = images[:, top:top + image_size, left:left + image_size]
    return (images - jnp.asarray(mean)) / jnp.asarray(std)


def _unit(x: jax.Array) -> jax.Array:
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def clip_frame_consistency(image_embeds: jax.Array) -> float:
    """Mean cosine between consecutive frames' image embeddings ``(f, d)``, f >= 2 (1 = no change at all)."""
    if image_embeds.ndim != 2 or image_embeds.shape[0] < 2:
        raise ValueError(f"frame consistency needs embeddings (frames >= 2, dim), got shape {image_embeds.shape}")
    unit = _unit(jnp.asarray(image_embeds, jnp.float32))
    return float(jnp.mean(jnp.sum(unit[1:] * unit[:-1], axis=-1)))


def clip_text_alignment(image_embeds: jax.Array, text_embed: jax.Array) -> float:
    """Mean over frames of the cosine between each image embedding ``(f, d)`` and the text embedding ``(d,)``."""
    if image_embeds.ndim != 2 or jnp.shape(text_embed) != image_embeds.shape[-1:]:
        raise ValueError(f"text alignment needs image embeddings (f, d) and a text embedding (d,), got "
                         f"{image_embeds.shape} and {jnp.shape(text_embed)}")
    unit = _unit(jnp.asarray(image_embeds, jnp.float32))
    return float(jnp.mean(unit @ _unit(jnp.asarray(text_embed, jnp.float32))))


@dataclasses.dataclass(frozen=True)
class ClipScorer:
    """Both CLIP towers and the tokenizer, loaded once to score many videos."""

    vision: CLIPVisionEncoder
    vision_params: Any
    text: CLIPTextProjectionEncoder
    text_params: Any
    tokenizer: Any

    @classmethod
    def load(cls, path: str) -> "ClipScorer":
        """From a hub ``CLIPModel`` folder (tokenizer files in it or in ``tokenizer/``)."""
        from vmc_jax.hub.text_loading import load_tokenizer  # transformers, needed only for prompts

        vision, vision_params = load_clip_tower(path, CLIPVisionEncoder)
        text, text_params = load_clip_tower(path, CLIPTextProjectionEncoder)
        return cls(vision, vision_params, text, text_params, load_tokenizer(path))

    def image_embeddings(self, frames: np.ndarray) -> jax.Array:
        """``(f, d)`` image embeddings of frames (uint8, or float in [0, 1])."""
        return _apply(self.vision, self.vision_params, preprocess(frames, self.vision.config.image_size))

    def text_embedding(self, prompt: str) -> jax.Array:
        """``(d,)`` text embedding of a prompt (padded to the model's length, as CLIP was trained)."""
        tokens = self.tokenizer([prompt], padding="max_length", truncation=True,
                                max_length=self.text.config.max_position_embeddings, return_tensors="np")
        return _apply(self.text, self.text_params, tokens["input_ids"])[0]

    def scores(self, frames: np.ndarray, prompt: str) -> dict[str, float]:
        """The paper's two metrics of one video and its prompt."""
        image_embeds = self.image_embeddings(frames)
        return dict(zip(METRICS, (clip_text_alignment(image_embeds, self.text_embedding(prompt)),
                                  clip_frame_consistency(image_embeds))))


def evaluate_videos(scorer: ClipScorer, samples: Mapping[str, str], out_dir: str | None = None) -> dict[str, Any]:
    """Both metrics of each video file of ``samples`` (path -> its prompt) and their means as
    {"summary", "clips"}; given ``out_dir``, written there as ``metrics.json``."""
    per_clip = [{"video": path, "prompt": prompt, **scorer.scores(video_io.read_frames(path), prompt)}
                for path, prompt in samples.items()]
    result = {"summary": {name: float(np.mean([c[name] for c in per_clip])) for name in METRICS}, "clips": per_clip}
    if out_dir is not None:
        files.write_text_atomic(os.path.join(out_dir, "metrics.json"), json.dumps(result, indent=2) + "\n")
    return result


@functools.partial(jax.jit, static_argnums=0)
def _apply(module: Any, params: Any, inputs: jax.Array) -> jax.Array:
    return module.apply({"params": params}, inputs)
