"""vmc_jax: Video Motion Customization on the Show-1 cascade, in JAX / Flax."""

from vmc_jax.kernels import xla_cpu

xla_cpu.apply_at_import()  # the measured XLA:CPU option, where it is safe; before anything starts JAX

from vmc_jax import schedulers  # noqa: E402
from vmc_jax.hub.text_loading import encode_prompts, load_text_encoder, load_tokenizer  # noqa: E402
from vmc_jax.hub.unet_loading import load_unet, to_torch_state_dict  # noqa: E402
from vmc_jax.hub.vae_loading import decode_latents, encode_to_latents, load_vae  # noqa: E402
from vmc_jax.keyframe_sampling import ddim_invert, sharded_ddim_invert  # noqa: E402
from vmc_jax.sampling import classifier_free_guidance, sample_loop  # noqa: E402
from vmc_jax.training import motion_distillation_loss  # noqa: E402

__all__ = [
    "classifier_free_guidance", "ddim_invert", "decode_latents", "encode_prompts", "encode_to_latents",
    "load_text_encoder", "load_tokenizer", "load_unet", "load_vae", "motion_distillation_loss",
    "sample_loop", "schedulers", "sharded_ddim_invert", "to_torch_state_dict",
]
