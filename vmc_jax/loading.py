"""Loading models from hub folders or converted folders, and mapping params back to PyTorch."""

from __future__ import annotations

import os
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from vmc_jax import checkpoints
from vmc_jax.conversion import find_weights_file, flax_to_torch, read_state_dict, torch_to_flax
from vmc_jax.conversion.readers import LazyStateDict
from vmc_jax.models.unet import UNet
from vmc_jax.models.unet_config import UNetConfig

UNET_WEIGHTS = ("diffusion_pytorch_model",)


def build_unet(config: dict[str, Any], source: str = "config", **module_options) -> nn.Module:
    """The Flax UNet a diffusers ``config.json`` describes (``module_options``: dtype, remat)."""
    return UNet(UNetConfig.from_dict(config, source=source), **module_options)


def abstract_params(model: nn.Module) -> Any:
    """The shapes and dtypes of ``model``'s params, without allocating them."""
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), *model.dummy_inputs())["params"]


def load_params(path: str, model: nn.Module, weight_stems: tuple[str, ...], dtype: Any = None,
                adapt: Callable[[LazyStateDict, str], LazyStateDict] | None = None) -> Any:
    """``model``'s params from a converted folder or a hub folder's PyTorch weights.

    ``dtype`` casts them (None keeps the stored dtype); ``adapt(state_dict, file)`` renames or
    drops PyTorch tensors a family stores differently. Tensors are read one at a time.
    """
    shapes = abstract_params(model)
    if checkpoints.is_converted_model(path):
        return checkpoints.restore_params(path, shapes, dtype)
    weights = find_weights_file(path, weight_stems)
    state_dict = read_state_dict(weights)
    if adapt is not None:
        state_dict = adapt(state_dict, weights)
    return torch_to_flax(state_dict, shapes, dtype=dtype, source=weights)


def model_config(path: str) -> tuple[dict, str]:
    """The ``config.json`` of a model folder and its path (for error messages)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model folder not found: {path!r}")
    return checkpoints.read_config(path), os.path.join(path, checkpoints.CONFIG_FILE)


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
