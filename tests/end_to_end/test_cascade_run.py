"""The cascade chained from the config: `vmc-jax generate --stages ...` end to end on the tiny
pipelines, stage-folder and size errors raised before sampling, one stage's weights held at a time,
each stage's models loaded once for all prompts."""

import dataclasses
import os
import subprocess
import sys
from collections import Counter

import jax
import numpy as np
import pytest
from flax import traverse_util
from helpers import REPO

import vmc_jax.hub.text_loading
import vmc_jax.hub.vae_loading
from configs import vmc as vmc_configs
from vmc_jax import video_io
from vmc_jax.hub.tiny_pipeline import make_tiny_cascade, make_tiny_pipeline
from vmc_jax.jobs import cascade_runner, config as jobs_config

# Small frames keep the four stages to seconds: keyframes 8x16 -> sr1 32x64 -> sr2 16x32.
SIZES = dict(height=8, width=16, sr2_height=16, sr2_width=32)
STAGES = ["keyframes", "interpolation", "sr1", "sr2"]


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
            assert video_io.read_frames(path).shape == (*size, 3), (stage, ext)


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
    settings = jobs_config.Job.from_config(tiny_config(tiny)).cascade
    stages = cascade_runner.requested_stages(settings, None)
    assert stages == ["keyframes", "interpolation", "sr1", "sr2"]
    with pytest.raises(FileNotFoundError, match=r"config.cascade.sr2 = '.*nowhere': no such folder"):
        cascade_runner.check_stage_folders(dataclasses.replace(settings, sr2=str(tmp_path / "nowhere")), stages)
    settings = dataclasses.replace(settings, sr1_image=tiny["sr1"])
    with pytest.raises(ValueError, match="config.cascade.sr1_image .* expected a DeepFloyd IF-II"):
        cascade_runner.check_stage_folders(settings, stages)
    with pytest.raises(ValueError, match="sr1_stride.*cannot cover 37 frames with windows of 8 and stride 7"):
        cascade_runner.check_sizes(settings, stages, 10, 8, 16)
    with pytest.raises(ValueError, match="stage sr2: frames of 18x32 are not divisible by 4"):
        cascade_runner.check_sizes(dataclasses.replace(settings, sr2_height=18), stages, 8, 8, 16)
    with pytest.raises(ValueError, match="must start with keyframes"):
        cascade_runner.requested_stages(settings, ["sr1", "keyframes"])


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

    outputs = cascade_runner.run_cascade(jobs_config.Job.from_config(config).cascade, config.seed, STAGES,
                                         [keyframes], ["a blue square is moving"], [text], empty, monitor)
    assert list(held) == ["interpolation", "sr1_image", "sr1", "sr2"]
    smallest = min(weights for _, weights in held.values())
    for stage, (extra, weights) in held.items():
        print(f"{stage}: held {extra / 2**20:.2f} MiB beyond the start, its weights {weights / 2**20:.2f} MiB")
        assert weights <= extra < weights + smallest, stage
    assert live_bytes() - base < smallest
    assert {k: [v.shape for v in videos] for k, videos in outputs.items()} == {
        "interpolation": [(29, 8, 16, 3)], "sr1": [(29, 32, 64, 3)], "sr2": [(29, 16, 32, 3)]}


def test_each_stage_loads_its_models_once_for_all_prompts(tiny, monkeypatch):
    """Three prompts through every stage: each UNet, the sr2 VAE and its text encoder are read from
    disk once. The third prompt repeats the first (same keyframes and text): its videos are equal
    to the first's (every prompt draws from the seed), the second prompt's differ."""
    loads = Counter()

    def counted(loader):
        def load(path, *args, **kwargs):
            loads[os.path.relpath(path, os.path.dirname(tiny["sr2"]))] += 1
            return loader(path, *args, **kwargs)
        return load

    monkeypatch.setattr(cascade_runner, "load_unet", counted(cascade_runner.load_unet))
    monkeypatch.setattr(vmc_jax.hub.vae_loading, "load_vae", counted(vmc_jax.hub.vae_loading.load_vae))
    monkeypatch.setattr(vmc_jax.hub.text_loading, "load_text_encoder", counted(vmc_jax.hub.text_loading.load_text_encoder))
    rng = np.random.default_rng(1)
    keyframes = [rng.uniform(-1, 1, (8, 8, 16, 3)).astype(np.float32) for _ in range(2)]
    texts = [rng.normal(size=(1, 77, 32)).astype(np.float32) for _ in range(3)]
    prompts = ["a blue square is moving", "a red disc is moving", "a blue square is moving"]
    config = tiny_config(tiny)
    outputs = cascade_runner.run_cascade(jobs_config.Job.from_config(config).cascade, config.seed, STAGES,
                                         [*keyframes, keyframes[0]], prompts, [texts[0], texts[1], texts[0]],
                                         texts[2])
    assert loads == Counter({"interpolation/unet": 1, "sr1_image/unet": 1, "sr1/unet": 1, "sr2/unet": 1,
                             "sr2/vae": 1, "sr2/text_encoder": 1})
    for stage, videos in outputs.items():
        assert len(videos) == 3, stage
        np.testing.assert_array_equal(videos[0], videos[2], err_msg=stage)
        assert not np.allclose(videos[0], videos[1]), stage
