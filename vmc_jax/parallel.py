"""One sharding model for every job: `jit` over a named device mesh, on one host or a pod slice.

The mesh has two axes, always in this order:
  "clips"  independent tuning problems (several clips tuned at once, each its own state);
  "data"   the batch of one problem (noisy copies of a clip, clips to invert, videos to sample).
Sizes come from `config.mesh` (`clips`, `data`); -1 takes the devices that are left.

Batch policy, the same everywhere: a batch that does not divide its mesh axis is padded with
copies of its last item, and what the padding computes is dropped (inversion, sampling) or
weighted zero (the training loss), so results do not depend on the device count.

On several hosts every process runs the same program; `initialize` joins them, the mesh spans
all their devices, each host feeds its own rows of a batch (`global_batch`) and only the main
process writes files.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from vmc_jax import peers
from vmc_jax.kernels import xla_cpu

AXES = ("clips", "data")


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, auto: bool = False, join_timeout_s: float = 300,
               heartbeat_timeout_s: float = 30) -> bool:
    """Joins a multi-process job (`jax.distributed`) if an address is given or `auto`; says whether it did.

    `auto`: let JAX discover the job (TPU VM slices, SLURM, ...). A job whose processes do not
    all join within `join_timeout_s`, or one whose peer is silent for `heartbeat_timeout_s`,
    ends with one line (`vmc_jax.peers`).
    """
    explicit = (coordinator, num_processes, process_id)
    if not auto and all(value is None for value in explicit):
        return False
    if not auto and any(value is None for value in explicit):
        raise ValueError("a multi-process job needs all of --coordinator, --num_processes and --process_id "
                         f"(got {coordinator!r}, {num_processes!r}, {process_id!r})")
    # Collectives between the CPU devices of different processes go through gloo (TPU / GPU have their own).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    peers.join(coordinator, num_processes, process_id, join_timeout_s, heartbeat_timeout_s)
    logging.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())
    return True


def is_main_process() -> bool:
    """Whether this process writes files (metrics, samples, exports) and shows progress bars."""
    return jax.process_index() == 0


def axis_sizes(sizes: Mapping[str, int], num_devices: int | None = None) -> tuple[int, ...]:
    """Resolves the sizes of `AXES` (-1: the devices that are left) for `num_devices` devices."""
    num_devices = jax.device_count() if num_devices is None else num_devices
    unknown = sorted(set(sizes) - set(AXES))
    if unknown:
        raise ValueError(f"config.mesh has unknown axes {unknown}; the axes are {list(AXES)}")
    resolved = [int(sizes.get(axis, 1)) for axis in AXES]
    if any(size == 0 or size < -1 for size in resolved) or resolved.count(-1) > 1:
        raise ValueError(f"config.mesh {dict(zip(AXES, resolved))}: sizes are positive, at most one is -1")
    known = math.prod(size for size in resolved if size != -1)
    if -1 in resolved:
        if num_devices % known:
            raise ValueError(f"config.mesh {dict(zip(AXES, resolved))}: {num_devices} devices do not divide by {known}")
        resolved[resolved.index(-1)] = num_devices // known
    if math.prod(resolved) != num_devices:
        raise ValueError(f"config.mesh {dict(zip(AXES, resolved))} needs {math.prod(resolved)} devices, "
                         f"there are {num_devices}")
    return tuple(resolved)


def make_mesh(sizes: Mapping[str, int] | None = None, devices: list | None = None) -> Mesh:
    """The ("clips", "data") mesh over all devices of the job (or ``devices``, e.g. a TPU topology's
    that `vmc_jax.jobs.plan` compiles for); default: every device on "data"."""
    xla_cpu.check_devices(jax.local_devices() if devices is None else devices)
    shape = axis_sizes(sizes or {"data": -1}, None if devices is None else len(devices))
    # Auto axes: XLA propagates the shardings of the inputs through the model (no annotations in it).
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (frozen weights, prompts)."""
    return NamedSharding(mesh, PartitionSpec())


def sharded(mesh: Mesh, *axes: str | None) -> NamedSharding:
    """Leading array axes split over the named mesh axes, e.g. `sharded(mesh, "data")`."""
    return NamedSharding(mesh, PartitionSpec(*axes))


def padded_size(size: int, multiple: int) -> int:
    """The batch size the policy pads `size` to: the next multiple of the axis size."""
    return -(-size // multiple) * multiple


def pad_batch(x: Any, multiple: int, name: str) -> tuple[Any, int]:
    """Pads every leaf's leading axis to a multiple of `multiple` with copies of its last item.

    Returns the padded tree and the real batch size (what to keep of the results); `name` says
    whose batch it is in the warning.
    """
    size = jax.tree.leaves(x)[0].shape[0]
    pad = padded_size(size, multiple) - size
    if pad:
        logging.warning("%s: a batch of %d padded to %d with copies of its last item (%d devices on its mesh axis)",
                        name, size, size + pad, multiple)
        x = jax.tree.map(lambda a: jnp.concatenate([a, jnp.repeat(a[-1:], pad, axis=0)]), x)
    return x, size


def host_rows(mesh: Mesh, size: int, *axes: str | None) -> slice:
    """The rows of a (size, ...) batch split along `axes` that this process's devices hold."""
    index_map = sharded(mesh, *axes).addressable_devices_indices_map((size,))
    starts = [index[0].start or 0 for index in index_map.values()]
    stops = [size if index[0].stop is None else index[0].stop for index in index_map.values()]
    return slice(min(starts), max(stops))


def global_batch(mesh: Mesh, batch: Any, *axes: str | None) -> Any:
    """The global arrays of a batch split along `axes`, each process giving only its own rows.

    `batch` is a tree of host arrays of the whole batch (its rows are cheap to make on every
    host, e.g. noisy copies of one clip); only this process's rows are read and transferred.
    """
    sharding = sharded(mesh, *axes)

    def place(a):
        a = np.asarray(a)
        return jax.make_array_from_process_local_data(sharding, a[host_rows(mesh, len(a), *axes)], a.shape)

    return jax.tree.map(place, batch)


def put_global(mesh: Mesh, value: Any, *axes: str | None) -> Any:
    """Places a host value that every process holds in full (e.g. the whole batch) on the mesh."""
    sharding = sharded(mesh, *axes)

    def place(a):
        a = np.asarray(a)
        return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])

    return jax.tree.map(place, value)


def fetch(x: Any) -> Any:
    """A (possibly multi-host) global array back on this host, whole, as numpy."""
    if jax.process_count() == 1:
        return jax.device_get(x)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(x, tiled=True)


def describe(mesh: Mesh) -> str:
    """"clips=1, data=4" for logs."""
    return ", ".join(f"{name}={size}" for name, size in mesh.shape.items())
