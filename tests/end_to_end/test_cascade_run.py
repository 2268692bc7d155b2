"""The cascade chained from the config: `vmc-jax generate --stages ...` end to end on the tiny
pipelines, stage-folder and size errors raised before sampling, one stage's weights held at a time."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import traverse_util

from configs import vmc as vmc_configs
from helpers import REPO
from vmc_jax import cascade_runner, data
from vmc_jax.tiny_pipeline import make_tiny_cascade, make_tiny_pipeline

# Small frames keep the four stages to seconds: keyframes 8x16 -> sr1 32x64 -> sr2 16x32.
SIZES = dict(height=8, width=16, sr2_height=16, sr2_width=32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny")
    return {"keyframes": make_tiny_pipeline(str(root / "base")), **make_tiny_cascade(str(root / "cascade"))}


def tiny_config(tiny: dict[str, str]):
    config = vmc_configs.get_config("tiny")
    config.pretrained = tiny["keyframes"]
    config.video = os.path.join(REPO, "configs", "assets", "moving_square.gif")
    config.data.update(height=SIZES["height"], width=SIZES["width"])
    config.cascade.update({stage: tiny[stage] for stage in ("interpolation", "sr1_image", "sr1", "sr2")})
    config.cascade.update(sr2_height=SIZES["sr2_height"], sr2_width=SIZES["sr2_width"])
    return config


def cli_flags(tiny: dict[str, str]) -> list[str]:
    flags = [f"--config={os.path.join(REPO, 'configs', 'vmc.py')}:tiny", f"--config.pretrained={tiny['keyframes']}",
             f"--config.video={os.path.join(REPO, 'configs', 'assets', 'moving_square.gif')}",
             f"--config.data.height={SIZES['height']}", f"--config.data.width={SIZES['width']}",
             f"--config.cascade.sr2_height={SIZES['sr2_height']}", f"--config.cascade.sr2_width={SIZES['sr2_width']}"]
    return flags + [f"--config.cascade.{stage}={tiny[stage]}" for stage in ("interpolation", "sr1_image", "sr1", "sr2")]


def vmc_jax_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": REPO}
    return subprocess.run([sys.executable, "-c", "from vmc_jax.cli import run; run()", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)


def test_generate_writes_every_stage(tiny, tmp_path):
    result = vmc_jax_cli("generate", f"--workdir={tmp_path / 'run'}", "--prompt=a blue square is moving",
                         "--stages=keyframes,interpolation,sr1,sr2", "--allow_untuned", *cli_flags(tiny))
    assert result.returncode == 0, result.stderr[-3000:]
    sizes = {"interpolation": (29, 8, 16), "sr1": (29, 32, 64), "sr2": (29, 16, 32)}
    printed = result.stdout.split()
    for stage, size in sizes.items():
        for ext in ("gif", "mp4"):
            path = str(tmp_path / "run" / "samples" / "generate_0" / f"0_a_blue_square_is_moving_{stage}.{ext}")
            assert path in printed
            assert data.read_frames(path).shape == (*size, 3), (stage, ext)


def test_wrong_stage_folder_is_refused_before_sampling(tiny, tmp_path):
    flags = [f for f in cli_flags(tiny) if not f.startswith("--config.cascade.sr1=")]
    result = vmc_jax_cli("generate", f"--workdir={tmp_path / 'run'}", "--prompt=a blue square is moving",
                         *flags, f"--config.cascade.sr1={tiny['interpolation']}", "--allow_untuned")
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.startswith(
        f"vmc-jax: error: config.cascade.sr1 = {tiny['interpolation']!r}: unet/ is a UNet3DConditionModel")
    assert "expected a Show-1 sr1 UNet" in result.stderr
    assert not (tmp_path / "run" / "samples").exists()


def test_stage_folder_and_size_errors(tiny, tmp_path):
    config = tiny_config(tiny)
    stages = cascade_runner.requested_stages(config, None)
    assert stages == ["keyframes", "interpolation", "sr1", "sr2"]
    config.cascade.sr2 = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"config.cascade.sr2 = '.*nowhere': no such folder"):
        cascade_runner.check_stage_folders(config, stages)
    config.cascade.sr2 = tiny["sr2"]
    config.cascade.sr1_image = tiny["sr1"]
    with pytest.raises(ValueError, match="config.cascade.sr1_image .* expected a DeepFloyd IF-II"):
        cascade_runner.check_stage_folders(config, stages)
    with pytest.raises(ValueError, match="sr1_stride.*cannot cover 37 frames with windows of 8 and stride 7"):
        cascade_runner.check_sizes(config, stages, 10, 8, 16)
    with pytest.raises(ValueError, match="stage sr2: frames of 18x32 are not divisible by 4"):
        config.cascade.sr2_height = 18
        cascade_runner.check_sizes(config, stages, 8, 8, 16)
    with pytest.raises(ValueError, match="must start with keyframes"):
        cascade_runner.requested_stages(config, ["sr1", "keyframes"])


def live_bytes() -> int:
    return sum(a.nbytes for a in jax.live_arrays())


def tree_bytes(tree) -> int:
    return sum(np.asarray(x).nbytes for x in traverse_util.flatten_dict(tree).values()) if isinstance(tree, dict) \
        else sum(tree_bytes(t) for t in tree)


def test_only_one_stage_holds_weights(tiny):
    """At each stage, what is held beyond the start is that stage's weights plus small arrays
    (frames, text states): less than any other stage's weights; after the run, only outputs."""
    config = tiny_config(tiny)
    rng = np.random.default_rng(0)
    keyframes = rng.uniform(-1, 1, (8, 8, 16, 3)).astype(np.float32)
    text, empty = (rng.normal(size=(1, 77, 32)).astype(np.float32) for _ in range(2))
    base = live_bytes()
    held = {}

    def monitor(stage, params):
        held[stage] = (live_bytes() - base, tree_bytes(params))

    outputs = cascade_runner.run_cascade(config, keyframes, "a blue square is moving", text, empty,
                                         ["keyframes", "interpolation", "sr1", "sr2"], monitor)
    assert list(held) == ["interpolation", "sr1_image", "sr1", "sr2"]
    smallest = min(weights for _, weights in held.values())
    for stage, (extra, weights) in held.items():
        print(f"{stage}: held {extra / 2**20:.2f} MiB beyond the start, its weights {weights / 2**20:.2f} MiB")
        assert weights <= extra < weights + smallest, stage
    assert live_bytes() - base < smallest
    assert {k: v.shape for k, v in outputs.items()} == {
        "interpolation": (29, 8, 16, 3), "sr1": (29, 32, 64, 3), "sr2": (29, 16, 32, 3)}
