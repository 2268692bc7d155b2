"""The one mapping between Flax parameter paths and PyTorch state-dict names and layouts.

Flax modules in vmc_jax are named after their PyTorch counterparts, with the members of a
PyTorch ``ModuleList`` / ``Sequential`` named ``<attr>_<index>`` (``down_blocks.0`` becomes
``down_blocks_0``). A leaf's Flax name says its layout: ``kernel`` is a transposed ``weight``
(dense ``(in, out)``, conv ``(*window, in, out)``), ``scale`` and ``embedding`` are a
``weight`` as is, any other name is kept. Conversion in both directions is driven by the Flax
parameter tree, so a missing, unexpected or misshapen tensor is always reported by name.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Mapping

import jax
import numpy as np
from flax import traverse_util

# PyTorch attributes that are ModuleLists or Sequentials in the models vmc_jax loads.
LIST_ATTRIBUTES = frozenset({
    "attentions", "block", "conv1", "conv2", "conv3", "conv4", "down_blocks", "downsamplers",
    "layer", "layers", "net", "resnets", "temp_attentions", "temp_convs", "to_out",
    "transformer_blocks", "up_blocks", "upsamplers",
})
_LIST_MEMBER = re.compile(r"^(?P<attr>.+)_(?P<index>\d+)$")


def torch_name(path: Iterable[str]) -> str:
    """The PyTorch state-dict name of the Flax parameter at ``path``."""
    *modules, leaf = path
    parts = []
    for name in modules:
        match = _LIST_MEMBER.match(name)
        if match and match["attr"] in LIST_ATTRIBUTES:
            parts += [match["attr"], match["index"]]
        else:
            parts.append(name)
    parts.append("weight" if leaf in ("kernel", "scale", "embedding") else leaf)
    return ".".join(parts)


def _kernel_to_torch(x: np.ndarray) -> np.ndarray:
    # dense (in, out) -> (out, in); conv (*window, in, out) -> (out, in, *window)
    return np.transpose(x, (x.ndim - 1, x.ndim - 2, *range(x.ndim - 2)))


def _kernel_to_flax(x: np.ndarray) -> np.ndarray:
    return np.transpose(x, (*range(2, x.ndim), 1, 0))


def _layout(leaf: str, to_torch: bool) -> Callable[[np.ndarray], np.ndarray]:
    if leaf != "kernel":
        return lambda x: x
    return _kernel_to_torch if to_torch else _kernel_to_flax


def torch_to_flax(
    state_dict: Mapping[str, Any],
    abstract_params: Any,
    dtype: Any = None,
    source: str = "state dict",
) -> dict:
    """Builds the Flax params shaped like ``abstract_params`` from a PyTorch state dict.

    ``state_dict`` maps names to arrays (or to zero-argument callables that load one, so a large
    checkpoint is read tensor by tensor). ``dtype`` casts every tensor; None keeps the stored
    dtype. Raises ValueError naming every missing key, unexpected key and shape mismatch.
    """
    flat = traverse_util.flatten_dict(abstract_params)
    params, missing, mismatched = {}, [], []
    used = set()
    for path, spec in flat.items():
        name = torch_name(path)
        if name not in state_dict:
            missing.append(f"{name} (expected {_torch_shape(path[-1], spec.shape)})")
            continue
        used.add(name)
        value = state_dict[name]
        value = np.asarray(value() if callable(value) else value)
        value = _layout(path[-1], to_torch=False)(value)
        if tuple(value.shape) != tuple(spec.shape):
            mismatched.append(
                f"{name}: checkpoint {_torch_shape(path[-1], value.shape)}, "
                f"model {_torch_shape(path[-1], spec.shape)}"
            )
            continue
        params[path] = value.astype(dtype) if dtype is not None else value
    unexpected = sorted(set(state_dict) - used)
    problems = []
    if missing:
        problems.append("missing keys: " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected keys: " + ", ".join(unexpected))
    if mismatched:
        problems.append("shape mismatches: " + "; ".join(mismatched))
    if problems:
        raise ValueError(f"{source} does not fit the model:\n  " + "\n  ".join(problems))
    return traverse_util.unflatten_dict(params)


def flax_to_torch(tree: Any) -> dict[str, np.ndarray]:
    """Maps any params-shaped tree (params, gradients, a tuned subset) to PyTorch names and layouts."""
    flat = traverse_util.flatten_dict(jax.device_get(tree))
    return {
        torch_name(path): np.ascontiguousarray(_layout(path[-1], to_torch=True)(np.asarray(value)))
        for path, value in flat.items()
    }


def _torch_shape(leaf: str, shape: tuple) -> tuple:
    if leaf != "kernel":
        return tuple(shape)
    shape = tuple(shape)
    return (shape[-1], shape[-2], *shape[:-2])
