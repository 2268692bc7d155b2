"""Prompts: the appearance-invariant training prompt, and text embeddings cached in the workdir."""

from __future__ import annotations

import hashlib
import os
import re
from typing import Sequence

import numpy as np

from vmc_jax import files
from vmc_jax.hub import text_loading

# Words that start the description of a scene ("... in the forest", "... on the snow").
_SCENE_WORDS = ("in", "on", "at", "through", "under", "over", "above", "across", "along", "near", "into",
                "inside", "beside", "by", "underwater", "with")
_SCENE = re.compile(r",|\b(" + "|".join(_SCENE_WORDS) + r")\b", re.IGNORECASE)
CACHE_FILE = "prompt_embeddings.npz"


def appearance_invariant(prompt: str) -> str:
    """The subject and its motion without the scene: cut at the first comma or scene preposition.

    "A car is moving in the forest" -> "A car is moving". VMC tunes with such a prompt so the
    temporal attention learns the motion, not the look; set ``invariant_prompt`` to override.
    """
    match = _SCENE.search(prompt)
    kept = prompt[: match.start()] if match else prompt
    kept = kept.strip(" ,.")
    if not kept:
        raise ValueError(f"the appearance-invariant rule leaves nothing of {prompt!r}; set invariant_prompt")
    return kept


def _key(pretrained: str, prompt: str) -> str:
    return hashlib.sha256(f"{os.path.abspath(pretrained)}\0{prompt}".encode()).hexdigest()


def embed_prompts(pretrained: str, prompts: Sequence[str], cache_dir: str) -> dict[str, np.ndarray]:
    """Text-encoder states ``(L, d)`` per prompt, computed once and cached in ``cache_dir``.

    The encoder (``pretrained/text_encoder``) is loaded only when a prompt is missing from the
    cache, and released before returning, so it never sits in memory beside training.
    """
    path = os.path.join(cache_dir, CACHE_FILE)
    cached = dict(np.load(path)) if os.path.isfile(path) else {}
    missing = sorted({p for p in prompts if _key(pretrained, p) not in cached})
    if missing:
        encoder, params = text_loading.load_text_encoder(os.path.join(pretrained, "text_encoder"))
        tokenizer = text_loading.load_tokenizer(pretrained)
        hidden, _ = text_loading.encode_prompts(tokenizer, encoder, params, missing)
        new = {_key(pretrained, p): np.asarray(h, np.float32) for p, h in zip(missing, hidden)}
        del encoder, params
        cached.update(new)
        _add_to_cache(path, new)
    return {p: cached[_key(pretrained, p)] for p in prompts}


def _add_to_cache(path: str, new: dict[str, np.ndarray]) -> None:
    """Adds ``new`` to the cache file ``path`` under its lock, re-reading it there: a run at once in the
    same workdir may have added prompts of its own since this one read it."""
    with files.locked(path):
        stored = dict(np.load(path)) if os.path.isfile(path) else {}
        with files.atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: np.savez adds no ".npz"
            np.savez(f, **{**stored, **new})
