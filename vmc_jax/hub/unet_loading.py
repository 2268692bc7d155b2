"""Loading the UNet (hub or converted folder) and mapping its params back to PyTorch names."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from vmc_jax.hub.conversion import flax_to_torch
from vmc_jax.hub.weights import abstract_params, load_params, model_config
from vmc_jax.models.unet import UNet
from vmc_jax.models.unet_config import UNetConfig

UNET_WEIGHTS = ("diffusion_pytorch_model",)


def build_unet(config: dict[str, Any], source: str = "config", **module_options) -> nn.Module:
    """The Flax UNet a diffusers ``config.json`` describes (``module_options``: dtype, remat)."""
    return UNet(UNetConfig.from_dict(config, source=source), **module_options)


def load_unet(path: str, dtype: Any = None, **module_options) -> tuple[nn.Module, Any]:
    """Loads a UNet from a hub model folder or a ``vmc-jax convert`` folder.

    ``dtype`` casts the params (None keeps the checkpoint's dtype); ``module_options`` go to the
    module (``dtype`` there is the compute dtype, e.g. ``load_unet(p, dtype=None, remat=True)``).
    """
    config, source = model_config(path)
    model = build_unet(config, source=source, **module_options)
    return model, load_params(path, model, UNET_WEIGHTS, dtype)


def to_torch_state_dict(model: nn.Module, tree: Any) -> dict[str, np.ndarray]:
    """PyTorch names and layouts for any tree shaped like (a subset of) ``model``'s params."""
    shapes = traverse_util.flatten_dict(abstract_params(model))
    for path, value in traverse_util.flatten_dict(jax.device_get(tree)).items():
        if path not in shapes:
            raise ValueError(f"{'/'.join(path)} is not a parameter of this model")
        if tuple(np.shape(value)) != tuple(shapes[path].shape):
            raise ValueError(f"{'/'.join(path)}: shape {tuple(np.shape(value))}, model has {tuple(shapes[path].shape)}")
    return flax_to_torch(tree)
