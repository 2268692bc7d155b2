"""PyTorch <-> Flax parameter conversion: names, layouts and checkpoint files."""

from vmc_jax.hub.conversion.layout import flax_to_torch, torch_name, torch_to_flax
from vmc_jax.hub.conversion.readers import find_weights_file, read_state_dict

__all__ = ["flax_to_torch", "torch_name", "torch_to_flax", "find_weights_file", "read_state_dict"]
