"""Shared test setup: float32 matmuls at full precision, paths of the bundled fixtures."""

import os

# Four host devices, so the multi-device code paths run on a CPU-only machine; set before jax starts.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
SHOW1_FIXTURES = ("show1_keyframes", "show1_interpolation", "show1_sr")


@pytest.fixture(scope="session")
def fixtures_dir() -> str:
    return FIXTURES
