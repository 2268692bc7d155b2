"""Reading clips and prompts: parity of the resize with PyTorch, and errors that name the file."""

import os

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from vmc_jax import data
from vmc_jax.prompts import appearance_invariant, embed_prompts


def write_frames(folder, frames, names=None):
    os.makedirs(folder, exist_ok=True)
    for i, frame in enumerate(frames):
        iio.imwrite(os.path.join(folder, names[i] if names else f"{i + 1}.png"), frame)


def test_resize_matches_torch_bilinear_antialias(tmp_path):
    """As the released data pipeline (F.interpolate bilinear, antialias) to 1e-5 (measured 4e-7)."""
    frames = np.random.default_rng(0).integers(0, 256, size=(3, 90, 130, 3), dtype=np.uint8)
    write_frames(tmp_path / "clip", frames)
    ours = data.load_clip(str(tmp_path / "clip"), 3, 40, 64)
    pixels = torch.from_numpy(frames.astype(np.float32)).permute(0, 3, 1, 2) / 255 * 2 - 1
    ref = torch.nn.functional.interpolate(pixels, size=(40, 64), mode="bilinear", antialias=True)
    np.testing.assert_allclose(ours, ref.permute(0, 2, 3, 1).numpy(), atol=1e-5)


def test_selection_natural_order_and_reverse(tmp_path):
    frames = np.stack([np.full((8, 8, 3), 20 * i, np.uint8) for i in range(12)])
    write_frames(tmp_path / "clip", frames, names=[f"frame{i}.png" for i in range(12)])
    clip = data.load_clip(str(tmp_path / "clip"), 3, 8, 8, stride=2, start=1)
    np.testing.assert_allclose(clip[:, 0, 0, 0], (np.array([20, 60, 100]) / 127.5) - 1, atol=1e-6)
    backwards = data.load_clip(str(tmp_path / "clip"), 3, 8, 8, stride=2, start=1, reverse=True)
    np.testing.assert_array_equal(backwards, clip[::-1])


def test_video_files_round_trip(tmp_path):
    frames = np.random.default_rng(1).uniform(-1, 1, size=(5, 40, 64, 3)).astype(np.float32)
    for ext in ("gif", "mp4"):
        path = str(tmp_path / f"clip.{ext}")
        data.save_video(frames, path)
        assert data.read_frames(path).shape == (5, 40, 64, 3)
    assert data.load_clip(str(tmp_path / "clip.gif"), 5, 40, 64).shape == (5, 40, 64, 3)


def test_errors_name_the_problem(tmp_path):
    write_frames(tmp_path / "mixed", [np.zeros((8, 8, 3), np.uint8), np.zeros((8, 10, 3), np.uint8)])
    with pytest.raises(ValueError, match=r"2.png' is 10x8, the first frame is 8x8"):
        data.read_frames(str(tmp_path / "mixed"))
    write_frames(tmp_path / "short", [np.zeros((8, 8, 3), np.uint8)] * 3)
    with pytest.raises(ValueError, match=r"has 3 frames; num_frames=8 with stride=1 from start=0 needs 8"):
        data.load_clip(str(tmp_path / "short"), 8, 8, 8)
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    with pytest.raises(ValueError, match="cannot read video .*broken.mp4"):
        data.read_frames(str(tmp_path / "broken.mp4"))
    with pytest.raises(FileNotFoundError, match="video not found"):
        data.read_frames(str(tmp_path / "missing.mp4"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ValueError, match="no frames"):
        data.read_frames(str(tmp_path / "empty"))


@pytest.mark.parametrize("prompt, invariant", [
    ("a car is moving in the forest", "a car is moving"),
    ("a car is moving, underwater", "a car is moving"),
    ("a tiger is walking on the snow", "a tiger is walking"),
    ("two sharks are moving", "two sharks are moving"),
    ("pills are falling.", "pills are falling"),
])
def test_appearance_invariant_prompt(prompt, invariant):
    assert appearance_invariant(prompt) == invariant


def test_a_prompt_embeds_the_same_alone_or_with_others(tiny_pipeline_flax, tmp_path):
    """Two workdirs whose caches were filled with different prompt sets hold the same bits for a shared prompt."""
    prompt = "a blue square is moving"
    alone = embed_prompts(tiny_pipeline_flax, [prompt], str(tmp_path / "alone"))[prompt]
    others = ["", "a red square is moving to the left, slowly, on the snow", "x"]
    together = embed_prompts(tiny_pipeline_flax, [*others, prompt], str(tmp_path / "together"))
    np.testing.assert_array_equal(together[prompt], alone)
    assert not np.array_equal(together[others[1]], alone)
