"""vmc_jax: Video Motion Customization on the Show-1 cascade, in JAX / Flax."""

from vmc_jax import schedulers
from vmc_jax.inversion import ddim_invert, pmap_ddim_invert
from vmc_jax.loading import load_unet, to_torch_state_dict
from vmc_jax.sampling import classifier_free_guidance, sample_loop
from vmc_jax.text import encode_prompts, load_text_encoder, load_tokenizer
from vmc_jax.training import motion_distillation_loss
from vmc_jax.vae import decode_latents, encode_to_latents, load_vae

__all__ = [
    "classifier_free_guidance", "ddim_invert", "decode_latents", "encode_prompts", "encode_to_latents",
    "load_text_encoder", "load_tokenizer", "load_unet", "load_vae", "motion_distillation_loss",
    "pmap_ddim_invert", "sample_loop", "schedulers", "to_torch_state_dict",
]
