"""Reading PyTorch checkpoints (safetensors, sharded or not, and .bin) tensor by tensor."""

from __future__ import annotations

import functools
import json
import os
import pickle
from typing import Callable

import ml_dtypes
import numpy as np

# In order of preference: full precision first, then the fp16 "variant" files of the hub.
_SUFFIXES = (".safetensors", ".fp16.safetensors", ".bin", ".fp16.bin")

LazyStateDict = dict[str, Callable[[], np.ndarray]]


def find_weights_file(folder: str, stems: tuple[str, ...]) -> str:
    """The weights file (or shard index) of a hub model folder, e.g. stems=("diffusion_pytorch_model",)."""
    candidates = []
    for stem in stems:
        for suffix in _SUFFIXES:
            candidates += [stem + suffix, stem + suffix + ".index.json"]
        # transformers names fp16 shard indexes "<stem>.safetensors.index.fp16.json"
        candidates += [f"{stem}.{kind}.index.fp16.json" for kind in ("safetensors", "bin")]
    for name in candidates:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"no weights in {folder!r}: looked for {', '.join(candidates)}"
    )


def read_state_dict(path: str) -> LazyStateDict:
    """Maps tensor names to loaders of numpy arrays, reading each tensor only when called.

    ``path`` is a ``.safetensors`` or ``.bin`` file or a ``*.index.json`` shard index.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path!r}")
    if path.endswith(".index.json"):
        with open(path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        folder = os.path.dirname(path)
        shards = {shard: read_state_dict(os.path.join(folder, shard)) for shard in set(weight_map.values())}
        return {name: shards[shard][name] for name, shard in weight_map.items()}
    if path.endswith(".safetensors"):
        return _read_safetensors(path)
    if path.endswith(".bin"):
        return _read_torch_bin(path)
    raise ValueError(f"unknown checkpoint format: {path!r} (expected .safetensors, .bin or .index.json)")


_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def _read_safetensors(path: str) -> LazyStateDict:
    """Memory-maps a safetensors file (any dtype, bf16 included) without copying it into memory.

    The header is checked against the file first: its length, each tensor's dtype, shape and
    byte range, so a truncated or corrupt file is refused naming the file and the tensor.
    """
    file_size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            header_size = int.from_bytes(f.read(8), "little")
            if file_size < 8 or header_size > file_size - 8:
                raise ValueError(f"header length {header_size} but the file has {file_size} bytes (truncated or "
                                 "not a safetensors file)")
            header = json.loads(f.read(header_size))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read safetensors header of {path!r}: {e}") from e
    header.pop("__metadata__", None)
    data_start = 8 + header_size
    for name, entry in header.items():
        _check_tensor_entry(path, name, entry, file_size - data_start)

    def load(name: str) -> np.ndarray:
        entry = header[name]
        begin, end = entry["data_offsets"]
        data = np.memmap(path, dtype=np.uint8, mode="r", offset=data_start + begin, shape=(end - begin,))
        return data.view(_SAFETENSORS_DTYPES[entry["dtype"]]).reshape(entry["shape"])

    return {name: functools.partial(load, name) for name in header}


def _check_tensor_entry(path: str, name: str, entry: object, data_size: int) -> None:
    """Raises a ValueError naming ``path`` and tensor ``name`` if its header entry does not fit the file."""
    try:
        dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
    except (TypeError, KeyError, ValueError) as e:
        raise ValueError(f"{path!r}: tensor {name!r} has a malformed header entry {entry!r}") from e
    if dtype not in _SAFETENSORS_DTYPES:
        raise ValueError(f"{path!r}: tensor {name!r} has unsupported dtype {dtype}")
    expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(_SAFETENSORS_DTYPES[dtype]).itemsize
    if not 0 <= begin <= end or end - begin != expected:
        raise ValueError(f"{path!r}: tensor {name!r} of shape {shape} ({dtype}) needs {expected} bytes, "
                         f"its header gives bytes {begin}..{end}")
    if end > data_size:
        raise ValueError(f"{path!r}: tensor {name!r} ends at byte {end} of the data, which has only {data_size} "
                         "bytes (truncated file?)")


def _read_torch_bin(path: str) -> LazyStateDict:
    """A PyTorch ``.bin`` of tensors only: its pickle is read with ``weights_only``, never run."""
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"reading {path!r} needs PyTorch; convert it to safetensors or install torch") from e
    try:
        state_dict = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError:  # torch's text would suggest running the file's code: never say that
        raise ValueError(f"{path!r} holds pickled objects other than tensors; only a weights-only .bin is read "
                         "(convert the checkpoint to safetensors)") from None
    except (RuntimeError, EOFError) as e:  # not a torch.save zip file, or a truncated one
        reason = str(e).strip().strip("'").splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"cannot read {path!r} as a PyTorch checkpoint: {reason}") from e

    def load(name: str) -> np.ndarray:
        tensor = state_dict[name]
        if tensor.dtype == torch.bfloat16:
            return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return tensor.numpy()

    return {name: functools.partial(load, name) for name in state_dict}
