"""The XLA:CPU flags importing vmc_jax sets: when, how, and that JAX runs the UNet right with them."""

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
from helpers import OUTPUT_ATOL, REPO

from vmc_jax.kernels import xla_cpu

MEASURED = xla_cpu.MEASURED_JAXLIB[0] + "2"
FLAG = xla_cpu.CPU_FLAGS[0]
FOUR_DEVICES = "--xla_force_host_platform_device_count=4"


@pytest.mark.parametrize("environ, version, configured, expected, added", [
    ({}, MEASURED, -1, FLAG, True),
    ({"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}, MEASURED, -1,
     "--xla_force_host_platform_device_count=1 " + FLAG, True),
    ({"XLA_FLAGS": "--xla_cpu_enable_fast_math=false"}, MEASURED, -1, "--xla_cpu_enable_fast_math=false " + FLAG, True),
    # several CPU devices in the process: the option races there (see vmc_jax/kernels/xla_cpu.py)
    ({"XLA_FLAGS": FOUR_DEVICES}, MEASURED, -1, FOUR_DEVICES, False),
    ({"XLA_FLAGS": FOUR_DEVICES + " --xla_force_host_platform_device_count=1"}, MEASURED, -1,
     FOUR_DEVICES + " --xla_force_host_platform_device_count=1 " + FLAG, True),  # the last count wins, as in XLA
    ({"JAX_NUM_CPU_DEVICES": "2"}, MEASURED, -1, None, False),
    ({"JAX_NUM_CPU_DEVICES": "1", "XLA_FLAGS": FOUR_DEVICES}, MEASURED, -1, FOUR_DEVICES + " " + FLAG, True),
    ({}, MEASURED, 4, None, False),  # jax.config's jax_num_cpu_devices, set after `import jax`
    ({"XLA_FLAGS": f"{xla_cpu.YNN_FUSION_FLAG}=dot,eltwise"}, MEASURED, -1, f"{xla_cpu.YNN_FUSION_FLAG}=dot,eltwise",
     False),
    ({"VMC_JAX_XLA_CPU_FLAGS": "0"}, MEASURED, -1, None, False),
    ({}, "99.0.0", -1, None, False),  # not measured there: XLA aborts on flags it does not know
])
def test_flags_are_added_only_where_safe(environ, version, configured, expected, added):
    assert xla_cpu.apply_cpu_flags(environ, jaxlib_version=version, configured=configured) == added
    assert environ.get("XLA_FLAGS") == expected


def _import_vmc_jax(before: str = "", **environ: str) -> str:
    """XLA_FLAGS after `import vmc_jax` in a fresh interpreter whose environment has only `environ`."""
    unset = ("XLA_FLAGS", "VMC_JAX_XLA_CPU_FLAGS", "JAX_NUM_CPU_DEVICES")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    code = f"{before}\nimport os, vmc_jax\nprint(os.environ.get('XLA_FLAGS'))"
    done = subprocess.run([sys.executable, "-c", code], env={**env, **environ}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1]


@pytest.mark.skipif(not (xla_cpu.installed_jaxlib() or "").startswith(xla_cpu.MEASURED_JAXLIB),
                    reason="the flag is set only on the jaxlib versions it was measured on")
def test_importing_vmc_jax_sets_the_flag_only_for_one_cpu_device_and_a_backend_not_started():
    assert _import_vmc_jax() == FLAG
    assert _import_vmc_jax(XLA_FLAGS=FOUR_DEVICES) == FOUR_DEVICES
    assert _import_vmc_jax(VMC_JAX_XLA_CPU_FLAGS="0") == "None"
    assert _import_vmc_jax("import jax\njax.config.update('jax_num_cpu_devices', 2)") == "None"
    assert _import_vmc_jax("import jax\njax.devices()") == "None"  # too late to matter: not set


def test_a_mesh_over_several_cpu_devices_is_refused_after_the_flag_was_set_here(monkeypatch):
    devices = [SimpleNamespace(platform="cpu")] * 2
    xla_cpu.check_devices(devices)  # this test process: conftest asked for 4 devices, the flag was not set
    monkeypatch.setattr(xla_cpu, "_set_here", True)
    xla_cpu.check_devices(devices[:1])
    xla_cpu.check_devices([SimpleNamespace(platform="tpu")] * 4)
    with pytest.raises(ValueError, match="this process has 2 CPU devices, but importing vmc_jax set"):
        xla_cpu.check_devices(devices)


# The in-process tests run with XLA's defaults; this runs the keyframe fixture as `import vmc_jax` sets it up.
KEYFRAMES_WITH_FLAGS = """
import os, sys
sys.path.insert(0, {tests!r})
import helpers  # XLA_FLAGS is set to one device below
import jax, numpy as np
jax.config.update("jax_default_matmul_precision", "highest")  # as conftest.py sets it for the tests
model, params, io, _ = helpers.load_fixture("show1_keyframes")
out = jax.jit(lambda p, *a: model.apply({{"params": p}}, *a))(params, *helpers.fixture_inputs(io))
print(os.environ["XLA_FLAGS"])
print(float(np.abs(np.asarray(out) - np.moveaxis(io["out"], 1, -1)).max()))
"""


def test_the_keyframe_unet_matches_the_reference_under_the_flags():
    """JAX starts with the flags (XLA aborts on unknown ones) and the fixture parity holds."""
    env = {k: v for k, v in os.environ.items() if k != "VMC_JAX_XLA_CPU_FLAGS"}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    code = KEYFRAMES_WITH_FLAGS.format(tests=os.path.join(REPO, "tests"))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    flags, error = done.stdout.strip().splitlines()[-2:]
    applies = (xla_cpu.installed_jaxlib() or "").startswith(xla_cpu.MEASURED_JAXLIB)
    assert (FLAG in flags) == applies, flags
    assert float(error) <= OUTPUT_ATOL, error
