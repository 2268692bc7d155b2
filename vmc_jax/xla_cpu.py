"""XLA:CPU options that speed up this project's models, set before JAX starts its CPU backend.

YNNPACK, XLA:CPU's default library for dots and convolutions, runs the UNets' 3x3
convolutions (and their gradients) about half as fast as XLA's own Eigen convolutions on the
CPU measured (``benchmarks/README.md``); keeping YNNPACK for dot fusions only takes the
keyframe fixture's train step from ~1.55 s to ~0.98 s. The ``vmc-jax`` command, the world
pretraining and the benchmarks call :func:`apply_cpu_flags` first; a program of your own can
do the same before its first JAX computation. Importing ``vmc_jax`` changes nothing.

The option is experimental and XLA aborts on flags it does not know, so it is set only on the
jaxlib versions it was measured on, only when ``XLA_FLAGS`` does not already name it, and
never when ``VMC_JAX_XLA_CPU_FLAGS=0``.
"""

from __future__ import annotations

import importlib.metadata
import os

YNN_FUSION_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
CPU_FLAGS = (f"{YNN_FUSION_FLAG}=dot",)
MEASURED_JAXLIB = ("0.10.",)  # version prefixes on which CPU_FLAGS exist and were measured


def installed_jaxlib() -> str | None:
    """The installed jaxlib's version, without importing it."""
    try:
        return importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return None


def apply_cpu_flags(environ: dict | None = None, jaxlib_version: str | None = None) -> bool:
    """Appends ``CPU_FLAGS`` to ``XLA_FLAGS`` where that is safe; returns whether it did.

    Takes effect only if JAX has not yet created its CPU backend; a flag already in
    ``XLA_FLAGS`` is left as the user set it.
    ``environ`` / ``jaxlib_version`` default to this process's (given explicitly in tests).
    """
    environ = os.environ if environ is None else environ
    jaxlib_version = jaxlib_version or installed_jaxlib()
    if environ.get("VMC_JAX_XLA_CPU_FLAGS", "1") == "0" or jaxlib_version is None:
        return False
    current = environ.get("XLA_FLAGS", "")
    if not jaxlib_version.startswith(MEASURED_JAXLIB) or YNN_FUSION_FLAG in current:
        return False
    environ["XLA_FLAGS"] = " ".join([current, *CPU_FLAGS]).strip()
    return True
