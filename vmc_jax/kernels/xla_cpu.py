"""XLA:CPU options that speed up this project's models, set before JAX starts its CPU backend.

YNNPACK, XLA:CPU's default library for dots and convolutions, runs the UNets' 3x3
convolutions (and their gradients) about half as fast as XLA's own Eigen convolutions on the
CPU measured (``benchmarks/README.md``); keeping YNNPACK for dot fusions only takes the
keyframe fixture's train step from ~1.55 s to ~0.98 s.

The option is safe only in a process with one CPU device. With several
(``--xla_force_host_platform_device_count=4``, ``JAX_NUM_CPU_DEVICES``) one compiled train step
of the tiny UNet at 8x40x64 gives a different loss on repeated calls (up to 1e-4 relative at
step 1, 2e-3 in the gradient norm; runs on one device, or without the option, repeat bit for
bit). It is a race, not a rounding order: the same executable, same inputs, gives different
values on repeated calls. Bisected: it needs the blocked attention, whose dots run as YNNPACK fusions inside
``lax.map`` / ``lax.scan`` loops, executed by several devices at once; with plain attention
(``attention_impl="xla"``), in eval mode, or for lone convolutions, dots and dropout the
repeated calls agree bit for bit.

So importing ``vmc_jax`` sets the option itself, but only while JAX's backend has not
started, only when the process will have one CPU device, only on the jaxlib versions it was
measured on (XLA aborts on flags it does not know), only when ``XLA_FLAGS`` does not already
name it, and never when ``VMC_JAX_XLA_CPU_FLAGS=0``. A mesh made on several CPU devices after
the option was set here (e.g. ``jax.config.update("jax_num_cpu_devices", 4)`` after the
import) is refused by :func:`check_devices`.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import sys
from typing import Mapping, Sequence

YNN_FUSION_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
CPU_FLAGS = (f"{YNN_FUSION_FLAG}=dot",)
MEASURED_JAXLIB = ("0.10.",)  # version prefixes on which CPU_FLAGS exist and were measured
_DEVICE_COUNT = re.compile(r"--xla_force_host_platform_device_count=(\d+)")
_set_here = False  # whether this process's XLA_FLAGS got CPU_FLAGS from apply_cpu_flags


def installed_jaxlib() -> str | None:
    """The installed jaxlib's version, without importing it."""
    try:
        return importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return None


def requested_cpu_devices(environ: Mapping[str, str], configured: int = -1) -> int:
    """How many CPU devices JAX's backend will make: ``jax_num_cpu_devices`` (``configured``,
    -1 if unset), else ``JAX_NUM_CPU_DEVICES``, else XLA_FLAGS' last device count, else 1."""
    if configured >= 0:
        return configured
    from_env = environ.get("JAX_NUM_CPU_DEVICES", "").strip()
    if from_env and int(from_env) >= 0:
        return int(from_env)
    counts = _DEVICE_COUNT.findall(environ.get("XLA_FLAGS", ""))
    return int(counts[-1]) if counts else 1


def apply_cpu_flags(environ: dict | None = None, jaxlib_version: str | None = None, configured: int = -1) -> bool:
    """Appends ``CPU_FLAGS`` to ``XLA_FLAGS`` where that is safe; returns whether it did.

    Takes effect only if JAX has not yet created its CPU backend; a flag already in
    ``XLA_FLAGS`` is left as the user set it. ``environ`` / ``jaxlib_version`` default to this
    process's (given explicitly in tests); ``configured``: ``jax_num_cpu_devices``.
    """
    global _set_here
    own = environ is None
    environ = os.environ if own else environ
    jaxlib_version = jaxlib_version or installed_jaxlib()
    if environ.get("VMC_JAX_XLA_CPU_FLAGS", "1") == "0" or jaxlib_version is None:
        return False
    current = environ.get("XLA_FLAGS", "")
    if (not jaxlib_version.startswith(MEASURED_JAXLIB) or YNN_FUSION_FLAG in current
            or requested_cpu_devices(environ, configured) != 1):
        return False
    environ["XLA_FLAGS"] = " ".join([current, *CPU_FLAGS]).strip()
    _set_here = _set_here or own
    return True


def apply_at_import() -> bool:
    """What ``import vmc_jax`` runs: :func:`apply_cpu_flags` if JAX's backends have not started."""
    if "jax" in sys.modules:
        from jax._src import xla_bridge

        if xla_bridge.backends_are_initialized():
            return False
        return apply_cpu_flags(configured=xla_bridge.num_cpu_devices.value)
    return apply_cpu_flags()


def withdraw_cpu_flags() -> None:
    """Takes ``CPU_FLAGS`` back out of ``XLA_FLAGS`` if they were set here: for a process that will make
    several CPU devices after importing vmc_jax (``vmc-jax plan --target=cpu:N``), before its backend starts."""
    global _set_here
    if _set_here:
        os.environ["XLA_FLAGS"] = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if f not in CPU_FLAGS)
        _set_here = False


def check_devices(devices: Sequence) -> None:
    """Refuses several CPU devices in a process whose XLA_FLAGS got ``CPU_FLAGS`` here (see above)."""
    cpu = [d for d in devices if d.platform == "cpu"]
    if _set_here and len(cpu) > 1:
        raise ValueError(f"this process has {len(cpu)} CPU devices, but importing vmc_jax set {CPU_FLAGS[0]}, which "
                         "is safe on one CPU device only; set the device count (XLA_FLAGS "
                         "--xla_force_host_platform_device_count, JAX_NUM_CPU_DEVICES) before importing vmc_jax, "
                         "or set VMC_JAX_XLA_CPU_FLAGS=0")
