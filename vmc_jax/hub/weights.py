"""Reading any model folder: its config.json, and its params from a converted folder or PyTorch weights."""

from __future__ import annotations

import functools
import os
from typing import Any, Callable

import flax.linen as nn
import jax

from vmc_jax.hub import converted_store
from vmc_jax.hub.conversion import find_weights_file, read_state_dict, torch_to_flax
from vmc_jax.hub.conversion.readers import LazyStateDict


def abstract_params(model: nn.Module) -> Any:
    """The shapes and dtypes of ``model``'s params, without allocating them (a fresh tree each call)."""
    return jax.tree.map(lambda leaf: leaf, _traced_params(model))


@functools.lru_cache(maxsize=16)
def _traced_params(model: nn.Module) -> Any:
    """``abstract_params`` traced once per model config: tracing ``init`` costs seconds (more at real size)
    and a job asks for it several times (loading, exporting, planning)."""
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), *model.dummy_inputs())["params"]


def load_params(path: str, model: nn.Module, weight_stems: tuple[str, ...], dtype: Any = None,
                adapt: Callable[[LazyStateDict, str], LazyStateDict] | None = None) -> Any:
    """``model``'s params from a converted folder or a hub folder's PyTorch weights.

    ``dtype`` casts them (None keeps the stored dtype); ``adapt(state_dict, file)`` renames or
    drops PyTorch tensors a family stores differently. Tensors are read one at a time.
    """
    shapes = abstract_params(model)
    if converted_store.is_converted_model(path):
        return converted_store.restore_params(path, shapes, dtype)
    weights = find_weights_file(path, weight_stems)
    state_dict = read_state_dict(weights)
    if adapt is not None:
        state_dict = adapt(state_dict, weights)
    return torch_to_flax(state_dict, shapes, dtype=dtype, source=weights)


def model_config(path: str) -> tuple[dict, str]:
    """The ``config.json`` of a model folder and its path (for error messages)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model folder not found: {path!r}")
    return converted_store.read_config(path), os.path.join(path, converted_store.CONFIG_FILE)
