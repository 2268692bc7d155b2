"""Orbax checkpoints: converted models (config + params) and, for training, the tuned state."""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from vmc_jax import files

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


def is_converted_model(folder: str) -> bool:
    """Whether ``folder`` was written by :func:`save_model` (``vmc-jax convert``)."""
    return os.path.isdir(os.path.join(folder, PARAMS_DIR)) and os.path.isfile(os.path.join(folder, CONFIG_FILE))


def save_model(folder: str, config: dict[str, Any], params: Any) -> None:
    """Writes ``config.json`` and the params; orbax writes to a temporary folder and renames it."""
    folder = os.path.abspath(folder)
    os.makedirs(folder, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.join(folder, PARAMS_DIR), params, force=True)
        checkpointer.wait_until_finished()
    files.write_text_atomic(os.path.join(folder, CONFIG_FILE), json.dumps(config, indent=2, sort_keys=True))


def read_config(folder: str) -> dict[str, Any]:
    """The ``config.json`` of a model folder, with the file named in any error."""
    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {CONFIG_FILE} in {folder!r}")
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e


def restore_params(folder: str, abstract_params: Any, dtype: Any = None) -> Any:
    """Restores the params of a converted model onto the host, in their stored dtype or ``dtype``."""
    path = os.path.join(os.path.abspath(folder), PARAMS_DIR)
    with ocp.StandardCheckpointer() as checkpointer:
        stored = traverse_util.flatten_dict(checkpointer.metadata(path).item_metadata.tree)
        expected = traverse_util.flatten_dict(abstract_params)
        problems = [f"missing {'/'.join(k)}" for k in expected.keys() - stored.keys()]
        problems += [f"unexpected {'/'.join(k)}" for k in stored.keys() - expected.keys()]
        problems += [
            f"{'/'.join(k)}: stored {tuple(stored[k].shape)}, model {tuple(v.shape)}"
            for k, v in expected.items() if k in stored and tuple(stored[k].shape) != tuple(v.shape)
        ]
        if problems:
            raise ValueError(f"{path} does not fit the model: " + "; ".join(sorted(problems)))
        # Each process reads the whole model onto one of its own devices (any number of processes).
        local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = traverse_util.unflatten_dict(
            {k: jax.ShapeDtypeStruct(v.shape, dtype or stored[k].dtype, sharding=local) for k, v in expected.items()}
        )
        params = checkpointer.restore(path, target)
    return jax.tree.map(np.asarray, params)


