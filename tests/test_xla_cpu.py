"""The XLA:CPU flags the command-line tools set: when, how, and that JAX runs the UNet right with them."""

import os
import subprocess
import sys

import pytest

from vmc_jax import xla_cpu
from test_unet import OUTPUT_ATOL

MEASURED = xla_cpu.MEASURED_JAXLIB[0] + "2"
FLAG = xla_cpu.CPU_FLAGS[0]


@pytest.mark.parametrize("environ, version, expected, added", [
    ({}, MEASURED, FLAG, True),
    ({"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}, MEASURED,
     "--xla_force_host_platform_device_count=4 " + FLAG, True),
    ({"XLA_FLAGS": f"{xla_cpu.YNN_FUSION_FLAG}=dot,eltwise"}, MEASURED, f"{xla_cpu.YNN_FUSION_FLAG}=dot,eltwise", False),
    ({"VMC_JAX_XLA_CPU_FLAGS": "0"}, MEASURED, None, False),
    ({}, "99.0.0", None, False),  # not measured there: XLA aborts on flags it does not know
])
def test_flags_are_added_only_where_safe(environ, version, expected, added):
    assert xla_cpu.apply_cpu_flags(environ, jaxlib_version=version) == added
    assert environ.get("XLA_FLAGS") == expected


# The in-process tests run with XLA's defaults; this runs the keyframe fixture as the CLI does.
KEYFRAMES_WITH_FLAGS = """
import os, sys
sys.path.insert(0, {tests!r})
import conftest  # the tests' XLA_FLAGS and float32 matmul precision
from vmc_jax.xla_cpu import apply_cpu_flags
apply_cpu_flags()
import jax, numpy as np
model, params, io, _ = conftest.load_fixture("show1_keyframes")
out = jax.jit(lambda p, *a: model.apply({{"params": p}}, *a))(params, *conftest.fixture_inputs(io))
print(os.environ["XLA_FLAGS"])
print(float(np.abs(np.asarray(out) - np.moveaxis(io["out"], 1, -1)).max()))
"""


def test_the_keyframe_unet_matches_the_reference_under_the_cli_flags():
    """JAX starts with the flags (XLA aborts on unknown ones) and the fixture parity holds."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "VMC_JAX_XLA_CPU_FLAGS")}
    code = KEYFRAMES_WITH_FLAGS.format(tests=os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    flags, error = done.stdout.strip().splitlines()[-2:]
    applies = (xla_cpu.installed_jaxlib() or "").startswith(xla_cpu.MEASURED_JAXLIB)
    assert (FLAG in flags) == applies, flags
    assert float(error) <= OUTPUT_ATOL, error
