"""The latent models' VAE: loading it (hub or converted folder) and moving between images and latents.

A hub folder is a diffusers model folder: ``config.json`` plus ``diffusion_pytorch_model``
``[.fp16].safetensors`` / ``.bin`` (or a shard index). A converted folder is the one
:func:`vmc_jax.hub.converted_store.save_model` writes (``config.json`` + orbax ``params/``).
"""

from __future__ import annotations

import functools
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from vmc_jax.hub.weights import load_params, model_config
from vmc_jax.models.vae import AutoencoderKL, VAEConfig

VAE_WEIGHTS = ("diffusion_pytorch_model",)

# Mid-block attention weight names in checkpoints of older diffusers (AttentionBlock); diffusers renames them on load.
_LEGACY_ATTENTION = re.compile(r"^(?P<prefix>.*\.attentions\.\d+\.)(?P<old>query|key|value|proj_attn)\.(?P<leaf>\w+)$")
_RENAMED = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def load_vae(path: str, dtype: Any = None, **module_options) -> tuple[AutoencoderKL, Any]:
    """Loads an AutoencoderKL from a hub model folder or a converted folder: (module, params).

    ``dtype`` casts the params (None keeps the checkpoint's dtype, e.g. fp16 stays fp16);
    ``module_options`` go to the module (``dtype`` there is the compute dtype, float32 by default).
    """
    config, source = model_config(path)
    vae = AutoencoderKL(VAEConfig.from_dict(config, source=source), **module_options)
    return vae, load_params(path, vae, VAE_WEIGHTS, dtype, adapt=_rename_legacy_attention)


def _rename_legacy_attention(state_dict: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Renames old AttentionBlock weights (query / key / value / proj_attn) to diffusers' current names."""

    def rename(name: str) -> str:
        match = _LEGACY_ATTENTION.match(name)
        return f"{match['prefix']}{_RENAMED[match['old']]}.{match['leaf']}" if match else name

    return {rename(name): value for name, value in state_dict.items()}


@functools.partial(jax.jit, static_argnums=0)
def encode_to_latents(vae: AutoencoderKL, params: Any, images: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    """Images or videos in [-1, 1] to diffusion latents: posterior mean (a sample, given rng) * scaling_factor."""
    mean, logvar = vae.apply({"params": params}, images, method=vae.encode)
    if rng is not None:
        mean = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
    return mean * vae.config.scaling_factor


@functools.partial(jax.jit, static_argnums=0)
def decode_latents(vae: AutoencoderKL, params: Any, latents: jax.Array) -> jax.Array:
    """Scaled latents (as a diffusion model produces them) back to images (or videos)."""
    return vae.apply({"params": params}, latents / vae.config.scaling_factor, method=vae.decode)
