"""Native CPU kernels: built from ``vmc_jax/kernels/*.cc`` on first use, cached, run through XLA's FFI.

XLA:CPU computes attention as separate passes over each block of scores; the FlashAttention
forward and backward passes of ``kernels/flash_attention_cpu.cc`` keep a block in cache through
all of them (measured in ``benchmarks/README.md``). It is compiled with the host's C++ compiler (``$CXX``,
else ``c++``) for the CPU it runs on (``-march=native``), against the FFI headers that jaxlib
ships, and cached under ``$VMC_JAX_KERNEL_CACHE`` (default ``~/.cache/vmc_jax/kernels``) by a
hash of the source, the compiler command, jaxlib's version and the CPU. The shared library is
written atomically, so concurrent first uses are safe.

Without a compiler, on a failed build, or with ``VMC_JAX_CPU_KERNELS=0``, nothing is built and
attention keeps XLA's blocked form; :func:`unavailable_reason` says why (one log line).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile

import jax

KERNEL_DIR = os.path.dirname(os.path.abspath(__file__))
FLASH_ATTENTION_SOURCE = "flash_attention_cpu.cc"
FLASH_FORWARD = "vmc_flash_attention_forward"
FLASH_BACKWARD = "vmc_flash_attention_backward"
# FFI target name -> the handler's symbol in the built library.
FLASH_ATTENTION_TARGETS = {FLASH_FORWARD: "VmcFlashAttentionForward", FLASH_BACKWARD: "VmcFlashAttentionBackward"}
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")

_log = logging.getLogger(__name__)


def cache_dir() -> str:
    """Where built kernels are kept: ``$VMC_JAX_KERNEL_CACHE``, else ``~/.cache/vmc_jax/kernels``."""
    return os.environ.get("VMC_JAX_KERNEL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "vmc_jax", "kernels")


def _cpu_identity() -> str:
    """What -march=native compiles for: the CPU's model and feature flags where Linux says them."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            lines = [line for line in f if line.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def build(source: str) -> str:
    """The path of ``kernels/<source>`` compiled into a shared library (built once, then cached)."""
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler: {compiler!r} is not on PATH (set $CXX)")
    path = os.path.join(KERNEL_DIR, source)
    with open(path, "rb") as f:
        code = f.read()
    command = [compiler, *_FLAGS, "-I", jax.ffi.include_dir()]
    key = hashlib.sha256(b"\0".join([code, " ".join(command).encode(), jax.lib.__version__.encode(),
                                     _cpu_identity().encode()])).hexdigest()[:16]
    library = os.path.join(cache_dir(), f"{os.path.splitext(source)[0]}-{key}.so")
    if os.path.exists(library):
        return library
    os.makedirs(cache_dir(), exist_ok=True)
    fd, partial = tempfile.mkstemp(suffix=".so.partial", dir=cache_dir())
    os.close(fd)
    try:
        result = subprocess.run([*command, path, "-o", partial], capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(f"compiling {path} failed:\n{result.stderr.strip()[-2000:]}")
        os.replace(partial, library)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return library


@functools.lru_cache(maxsize=None)
def _register_flash_attention() -> str | None:
    """Builds and registers the attention kernels; None when that worked, else the reason."""
    if os.environ.get("VMC_JAX_CPU_KERNELS", "1") == "0":
        return "VMC_JAX_CPU_KERNELS=0"
    try:
        library = ctypes.cdll.LoadLibrary(build(FLASH_ATTENTION_SOURCE))
        for target, symbol in FLASH_ATTENTION_TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    except (OSError, RuntimeError, AttributeError) as e:
        _log.warning("CPU attention kernel not built (%s); using XLA's blocked attention", e)
        return str(e).splitlines()[0]
    return None


def unavailable_reason() -> str | None:
    """Why the CPU attention kernels cannot run here (building them on first call), or None."""
    return _register_flash_attention()
