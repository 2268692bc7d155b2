"""Shared test setup: float32 matmuls at full precision, the bundled fixtures, the tiny pipeline and its job config."""

import os

# Four host devices, so the multi-device code paths run on a CPU-only machine; set before jax starts.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures")
SHOW1_FIXTURES = ("show1_keyframes", "show1_interpolation", "show1_sr", "show1_crossattn")
CLIP = os.path.join(REPO, "configs", "assets", "moving_square.gif")
FAST_COMPILE_ENV = {"JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}  # fast_compile for a subprocess


@pytest.fixture(scope="module")
def fast_compile():
    """XLA without most optimizations for a module: its tiny jobs compile several times faster.

    Only for tests of behaviour (what moves, what is refused, what is written), never of numerics.
    """
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", False)


def channels_last(x: np.ndarray) -> jnp.ndarray:
    """PyTorch (b, c, ...) -> (b, ..., c)."""
    return jnp.asarray(np.moveaxis(x, 1, -1))


def fixture_inputs(io) -> tuple:
    """A Show-1 fixture's UNet inputs: (sample, timesteps, encoder_hidden_states, class_labels or None)."""
    labels = jnp.asarray(io["class_labels"]) if "class_labels" in io.files else None
    return (channels_last(io["sample"]), jnp.asarray(io["timesteps"]),
            jnp.asarray(io["encoder_hidden_states"]), labels)


def load_fixture(name: str) -> tuple:
    """(model, fp32 params, io.npz, folder) of the Show-1 fixture ``name``."""
    import vmc_jax

    folder = os.path.join(FIXTURES, name)
    model, params = vmc_jax.load_unet(os.path.join(folder, "unet"), dtype=np.float32)
    return model, params, np.load(os.path.join(folder, "io.npz")), folder


@pytest.fixture(scope="session")
def tiny_pipeline_flax(tmp_path_factory) -> str:
    """The tiny random Show-1 pipeline, converted: a job's ``config.pretrained``."""
    from vmc_jax import tiny_pipeline
    from vmc_jax.conversion.pipeline import convert

    root = tmp_path_factory.mktemp("tiny")
    convert(tiny_pipeline.make_tiny_pipeline(str(root / "hub")), str(root / "flax"))
    return str(root / "flax")


def tiny_config(pretrained: str, steps: int = 4):
    """The "tiny" job config on a 4-frame 16x32 clip without validation samples: seconds per run."""
    from configs import vmc as vmc_config

    config = vmc_config.get_config("tiny")
    config.pretrained = pretrained
    config.video = CLIP
    config.data.num_frames, config.data.height, config.data.width = 4, 16, 32
    config.train.steps = steps
    config.validation.every = 0
    return config
