"""Shared test setup: float32 matmuls at full precision, the bundled fixtures, the tiny pipeline and its job config."""

import os

# Four host devices, so the multi-device code paths run on a CPU-only machine; set before jax starts.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures")
SHOW1_FIXTURES = ("show1_keyframes", "show1_interpolation", "show1_sr", "show1_crossattn")
CLIP = os.path.join(REPO, "configs", "assets", "moving_square.gif")


@pytest.fixture(scope="session")
def fixtures_dir() -> str:
    return FIXTURES


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
