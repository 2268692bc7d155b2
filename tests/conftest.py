"""Shared test setup and fixtures: float32 matmuls at full precision, four host devices, one XLA
compilation cache, the tiny pipeline, and a marker per kind of test from its folder (unit, parity,
end_to_end).

The helpers and constants the tests import are in helpers.py.
"""

import atexit
import os
import pathlib
import shutil
import tempfile

# Four host devices, so the multi-device code paths run on a CPU-only machine; set before jax starts.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
# One persistent compilation cache for the session, inherited by the jobs the end-to-end tests start
# as subprocesses: the same tiny programs are compiled by many tests and processes, each once here.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="vmc_jax_tests_xla_cache_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

TESTS = pathlib.Path(__file__).parent
KINDS = ("unit", "parity", "end_to_end")


def kind(item) -> str | None:
    """The kind of a test: the folder of tests/ it is in."""
    if item.path.is_relative_to(TESTS) and (folder := item.path.relative_to(TESTS).parts[0]) in KINDS:
        return folder
    return None


def pytest_collection_modifyitems(items):
    """Mark each test with its kind, so ``-m "not end_to_end"`` selects by kind, and run the fastest
    kinds first (a stable sort: each module's order, and its fixtures' grouping, kept). Under xdist
    (setup.cfg) the modules are handed out most tests first, xdist's own order."""
    for item in items:
        if item_kind := kind(item):
            item.add_marker(item_kind)
    items.sort(key=lambda item: (*KINDS, None).index(kind(item)))


def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto`` (setup.cfg): one worker per CPU this process may use, up to 8. A worker spends
    most of its time tracing and compiling on one core."""
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


@pytest.fixture(scope="module")
def fast_compile():
    """XLA without most optimizations for a module: its tiny jobs compile several times faster.

    Only for tests of behaviour (what moves, what is refused, what is written), never of numerics.
    """
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", False)


@pytest.fixture(scope="session")
def tiny_pipeline_flax(tmp_path_factory) -> str:
    """The tiny random Show-1 pipeline, converted: a job's ``config.pretrained``."""
    from vmc_jax.hub import tiny_pipeline
    from vmc_jax.jobs.convert import convert

    root = tmp_path_factory.mktemp("tiny")
    convert(tiny_pipeline.make_tiny_pipeline(str(root / "hub")), str(root / "flax"))
    return str(root / "flax")
