"""``vmc-jax export``: the tuned parameters alone, in Show-1's PyTorch names, as a safetensors file.

It reads only the UNet's config.json and the newest readable checkpoint: neither the UNet weights
nor the training clip are needed. Load the file into the PyTorch UNet with
``unet.load_state_dict(safetensors.torch.load_file(out), strict=False)``.
"""

from __future__ import annotations

import os

import ml_collections
import numpy as np

from vmc_jax import files
from vmc_jax.errors import JobError
from vmc_jax.hub import converted_store
from vmc_jax.hub.unet_loading import build_unet, to_torch_state_dict
from vmc_jax.jobs import checkpoints, workdir


def export_tuned(config: ml_collections.ConfigDict, job_dir: str, out: str, overwrite: bool = False,
                 strict: bool = False) -> str:
    """Writes the tuned delta of the workdir's newest readable checkpoint to ``out``; returns ``out``."""
    if not out.endswith(".safetensors"):
        raise ValueError(f"--out {out!r}: the delta is written as safetensors; name it *.safetensors")
    files.refuse_existing(out, overwrite)
    store = checkpoints.TrainCheckpoints(workdir.checkpoints_dir(job_dir), strict=strict, create=False)
    step, state = store.restore_latest()
    if step is None:
        raise JobError(f"no checkpoint in {store.directory} to export")
    unet_folder = os.path.join(config.pretrained, "unet")
    state_dict = to_torch_state_dict(build_unet(converted_store.read_config(unet_folder), source=unet_folder),
                                     state["tuned"])
    bad = sorted(name for name, value in state_dict.items() if not np.all(np.isfinite(value)))
    if bad:
        raise JobError(f"checkpoint step {step} in {store.directory} has non-finite values in {len(bad)} "
                       f"tensors (first: {bad[0]}); not exporting it")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    return files.write_safetensors(out, state_dict, metadata={"format": "pt", "step": str(step)})
