"""Reading clips and prompts: parity of the resize with PyTorch, and errors that name the file."""

import io
import os

import imageio.v3 as iio
import numpy as np
import pytest
from PIL import Image

from vmc_jax import video_io
from vmc_jax.prompts import appearance_invariant, embed_prompts


def write_frames(folder, frames, names=None):
    os.makedirs(folder, exist_ok=True)
    for i, frame in enumerate(frames):
        iio.imwrite(os.path.join(folder, names[i] if names else f"{i + 1}.png"), frame)


def test_resize_matches_torch_bilinear_antialias(tmp_path):
    """As the released data pipeline (F.interpolate bilinear, antialias) to 1e-5 (measured 4e-7)."""
    torch = pytest.importorskip("torch", reason="torch is not installed (pip install -e '.[test]')")
    frames = np.random.default_rng(0).integers(0, 256, size=(3, 90, 130, 3), dtype=np.uint8)
    write_frames(tmp_path / "clip", frames)
    ours = video_io.load_clip(str(tmp_path / "clip"), 3, 40, 64)
    pixels = torch.from_numpy(frames.astype(np.float32)).permute(0, 3, 1, 2) / 255 * 2 - 1
    ref = torch.nn.functional.interpolate(pixels, size=(40, 64), mode="bilinear", antialias=True)
    np.testing.assert_allclose(ours, ref.permute(0, 2, 3, 1).numpy(), atol=1e-5)


def test_selection_natural_order_and_reverse(tmp_path):
    frames = np.stack([np.full((8, 8, 3), 20 * i, np.uint8) for i in range(12)])
    write_frames(tmp_path / "clip", frames, names=[f"frame{i}.png" for i in range(12)])
    clip = video_io.load_clip(str(tmp_path / "clip"), 3, 8, 8, stride=2, start=1)
    np.testing.assert_allclose(clip[:, 0, 0, 0], (np.array([20, 60, 100]) / 127.5) - 1, atol=1e-6)
    backwards = video_io.load_clip(str(tmp_path / "clip"), 3, 8, 8, stride=2, start=1, reverse=True)
    np.testing.assert_array_equal(backwards, clip[::-1])


def test_video_files_round_trip(tmp_path):
    frames = np.random.default_rng(1).uniform(-1, 1, size=(5, 40, 64, 3)).astype(np.float32)
    for ext in ("gif", "mp4"):
        path = str(tmp_path / f"clip.{ext}")
        video_io.save_video(frames, path)
        assert video_io.read_frames(path).shape == (5, 40, 64, 3)
    assert video_io.load_clip(str(tmp_path / "clip.gif"), 5, 40, 64).shape == (5, 40, 64, 3)


def test_errors_name_the_problem(tmp_path):
    write_frames(tmp_path / "mixed", [np.zeros((8, 8, 3), np.uint8), np.zeros((8, 10, 3), np.uint8)])
    with pytest.raises(ValueError, match=r"2.png' is 10x8, the first frame is 8x8"):
        video_io.read_frames(str(tmp_path / "mixed"))
    write_frames(tmp_path / "short", [np.zeros((8, 8, 3), np.uint8)] * 3)
    with pytest.raises(ValueError, match=r"has 3 frames; num_frames=8 with stride=1 from start=0 needs 8"):
        video_io.load_clip(str(tmp_path / "short"), 8, 8, 8)
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    with pytest.raises(ValueError, match="cannot read video .*broken.mp4"):
        video_io.read_frames(str(tmp_path / "broken.mp4"))
    with pytest.raises(FileNotFoundError, match="video not found"):
        video_io.read_frames(str(tmp_path / "missing.mp4"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ValueError, match="no frames"):
        video_io.read_frames(str(tmp_path / "empty"))


@pytest.mark.parametrize("prompt, invariant", [
    ("a car is moving in the forest", "a car is moving"),
    ("a car is moving, underwater", "a car is moving"),
    ("a tiger is walking on the snow", "a tiger is walking"),
    ("two sharks are moving", "two sharks are moving"),
    ("pills are falling.", "pills are falling"),
])
def test_appearance_invariant_prompt(prompt, invariant):
    assert appearance_invariant(prompt) == invariant


def few_colour_frames(held):
    """8 frames of 8 colours (a gif stores them exactly) with frames ``held`` equal to the one before."""
    rng = np.random.default_rng(2)
    palette = rng.integers(0, 256, (8, 3))
    frames = palette[rng.integers(0, 8, (8, 12, 16))].astype(np.uint8)
    for i in held:
        frames[i] = frames[i - 1]
    return frames


@pytest.mark.parametrize("held", [(2, 5, 6), range(1, 8)])
def test_save_video_gif_keeps_held_frames(tmp_path, held):
    """Pillow merges a frame equal to the one before into it; the gif still reads back as 8 frames."""
    pixels = few_colour_frames(held)
    path = str(tmp_path / "held.gif")
    video_io.save_video(pixels.astype(np.float32) / 127.5 - 1, path, fps=6)
    np.testing.assert_array_equal(video_io.read_frames(path), pixels)


def test_a_gif_with_merged_frames_reads_by_duration(tmp_path):
    """A stop-and-go clip saved by imageio (no comment of ours): frames count by their duration."""
    pixels = few_colour_frames((2, 5, 6))
    path = str(tmp_path / "imageio.gif")
    iio.imwrite(path, pixels, duration=100, loop=0)
    np.testing.assert_array_equal(video_io.read_frames(path), pixels)


def read_one_frame(tmp_path, name, write):
    """The frame that ``write(path)`` saves as ``name``, read back as a one-frame folder."""
    folder = tmp_path / name.split(".")[0]
    os.makedirs(folder)
    write(str(folder / name))
    return video_io.read_frames(str(folder))[0]


def test_frames_of_other_kinds_read_as_8_bit_rgb(tmp_path):
    """16-bit grey scaled to 8 bits (not values up to 65535), palette in colour, transparency over black."""
    grey = np.arange(64, dtype=np.uint16).reshape(8, 8) * 1040
    frame = read_one_frame(tmp_path, "grey16.png", Image.fromarray(grey).save)
    np.testing.assert_array_equal(frame, np.repeat(np.round(grey / 257).astype(np.uint8)[..., None], 3, -1))
    assert video_io.load_clip(str(tmp_path / "grey16"), 1, 8, 8).max() <= 1.0

    rgb = np.random.default_rng(3).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    palette = Image.fromarray(rgb).quantize(16)
    frame = read_one_frame(tmp_path, "palette.png", palette.save)
    np.testing.assert_array_equal(frame, np.asarray(palette.convert("RGB")))

    alpha = np.full((8, 8, 1), 255, np.uint8)
    alpha[:4] = 0
    frame = read_one_frame(tmp_path, "rgba.png", Image.fromarray(np.concatenate([rgb, alpha], -1)).save)
    np.testing.assert_array_equal(frame, np.where(alpha == 255, rgb, 0))


def test_float_frames_are_refused(tmp_path):
    os.makedirs(tmp_path / "float")
    Image.fromarray(np.zeros((8, 8), np.float32)).save(tmp_path / "float" / "1.png", format="TIFF")
    with pytest.raises(ValueError, match=r"^'.*1.png': floating-point pixels \(Pillow mode F\) are not read"):
        video_io.read_frames(str(tmp_path / "float"))


def gif_announcing(side, tmp_path, after_a_small_frame=False):
    """A gif of a few bytes whose (first or second) frame announces side x side pixels."""
    raw = b"GIF89a" + side.to_bytes(2, "little") * 2 + b"\x00\x00\x00"
    if after_a_small_frame:
        buffer = io.BytesIO()
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(buffer, format="GIF")
        raw = buffer.getvalue()[:-1]  # without the trailer
    path = tmp_path / "bomb.gif"
    path.write_bytes(raw + b"," + bytes(4) + side.to_bytes(2, "little") * 2 + b"\x00\x02\x02\x4c\x01\x00;")
    return str(path)


@pytest.mark.parametrize("side, after_a_small_frame", [(9000, False), (60000, False), (60000, True)])
def test_huge_frames_are_refused_before_decoding(tmp_path, side, after_a_small_frame):
    """9000: over our limit; 60000: past Pillow's decompression-bomb limit; or a later frame enlarging the gif."""
    with pytest.raises(ValueError, match=r"^'.*bomb.gif': a frame of .* pixels; frames are limited to 67108864 "
                                         r"pixels \(8192x8192\)$"):
        video_io.read_frames(gif_announcing(side, tmp_path, after_a_small_frame))


def test_a_prompt_embeds_the_same_alone_or_with_others(tiny_pipeline_flax, tmp_path):
    """Two workdirs whose caches were filled with different prompt sets hold the same bits for a shared prompt."""
    prompt = "a blue square is moving"
    alone = embed_prompts(tiny_pipeline_flax, [prompt], str(tmp_path / "alone"))[prompt]
    others = ["", "a red square is moving to the left, slowly, on the snow", "x"]
    together = embed_prompts(tiny_pipeline_flax, [*others, prompt], str(tmp_path / "together"))
    np.testing.assert_array_equal(together[prompt], alone)
    assert not np.array_equal(together[others[1]], alone)
