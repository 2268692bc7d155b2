"""vmc_jax: Video Motion Customization on the Show-1 cascade, in JAX / Flax."""

from vmc_jax.loading import load_unet, to_torch_state_dict

__all__ = ["load_unet", "to_torch_state_dict"]
