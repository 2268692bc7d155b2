"""The world evaluator: perfect scores on the world's own clips, and each perturbation shows up as its error."""

import json

import numpy as np
import pytest

from vmc_jax import world, world_evaluation

HEIGHT, WIDTH, FRAMES = 40, 64, 8
# a path that stays in frame after the shift used below
PATH = np.stack([np.linspace(12, 40, FRAMES), np.linspace(12, 22, FRAMES)], -1)
SHIFT = np.array([4.0, 3.0])


def render(colour="red", shape="square", background="snow", centres=PATH):
    return world.render(centres, shape, 6.0, colour, background, HEIGHT, WIDTH)[0]


@pytest.mark.parametrize("size", [(8, 16, 24), (8, 40, 64)])
def test_world_clips_are_read_as_drawn(size):
    for seed in range(30):
        clip = world.make_clip(seed, *size)
        reading = world_evaluation.read_clip(clip.video)
        assert (reading.colour, reading.shape, reading.background) == (clip.colour, clip.shape, clip.background)
        assert reading.found.all()
        # on a clean clip the membership is the coverage mask itself, so the track is the mask's centroid
        ys, xs = np.mgrid[0:size[1], 0:size[2]]
        area = clip.mask.sum(axis=(1, 2))
        centroid = np.stack([(clip.mask * xs).sum(axis=(1, 2)), (clip.mask * ys).sum(axis=(1, 2))], -1) / area[:, None]
        np.testing.assert_allclose(reading.track, centroid, atol=1e-4)


def test_a_clip_against_itself_scores_perfectly():
    clip = world.make_clip(5)
    metrics, _, _ = world_evaluation.compare(clip.video, clip.prompt, clip.video, clip.prompt)
    assert metrics["motion_error_px"] == 0.0
    assert metrics["appearance_ok"] and metrics["found_fraction"] == 1.0
    assert metrics["colour_leak"] is None and metrics["background_leak"] is None


def test_a_shifted_object_shows_the_shift_as_motion_error():
    prompt = world.prompt_for("red", "square", "snow")
    metrics, _, _ = world_evaluation.compare(render(), prompt, render(centres=PATH + SHIFT), prompt)
    # an integer shift moves the same pixels, so the error is the shift's length
    assert metrics["motion_error_px"] == pytest.approx(np.linalg.norm(SHIFT), abs=1e-4)
    assert metrics["appearance_ok"]


def test_recolouring_fails_appearance_and_kept_colour_is_leakage():
    source = world.prompt_for("red", "square", "snow")
    target = world.prompt_for("yellow", "square", "grass")
    leaked, _, _ = world_evaluation.compare(render(), source, render(), target)
    assert not leaked["colour_ok"] and not leaked["background_ok"] and not leaked["appearance_ok"]
    assert leaked["colour_leak"] and leaked["background_leak"]
    transferred, _, _ = world_evaluation.compare(render(), source, render("yellow", background="grass"), target)
    assert transferred["appearance_ok"] and transferred["motion_error_px"] == pytest.approx(0, abs=1e-4)
    assert transferred["colour_leak"] is False and transferred["background_leak"] is False


@pytest.mark.parametrize("shape", ["disc", "triangle"])
def test_another_shape_fails_shape(shape):
    prompt = world.prompt_for("red", "square", "snow")
    metrics, _, _ = world_evaluation.compare(render(), prompt, render(shape=shape), prompt)
    assert metrics["shape"] == shape and not metrics["shape_ok"] and metrics["colour_ok"]


def test_noise_like_a_sampler_leaves_the_reading_intact():
    rng = np.random.default_rng(0)
    prompt = world.prompt_for("purple", "triangle", "desert")
    clean = render("purple", "triangle", "desert")
    noisy = np.clip(clean + rng.normal(0, 0.05, clean.shape), 0, 1)
    metrics, _, _ = world_evaluation.compare(clean, prompt, noisy, prompt)
    assert metrics["appearance_ok"]
    assert metrics["motion_error_px"] < 0.25  # 0.09 px at most over 60 random clips


def test_a_blank_clip_finds_no_object_and_scores_the_worst_error():
    prompt = world.prompt_for("red", "disc", "sea")
    blank = np.broadcast_to(np.array(world.BACKGROUNDS["sea"][0], np.float32), (FRAMES, HEIGHT, WIDTH, 3))
    metrics, _, _ = world_evaluation.compare(render("red", "disc", "sea"), prompt, blank, prompt)
    assert metrics["found_fraction"] == 0 and not metrics["appearance_ok"] and metrics["fill_ratio"] is None
    assert metrics["motion_error_px"] == pytest.approx(np.hypot(HEIGHT, WIDTH))


def test_evaluate_world_clips_writes_metrics_and_gifs(tmp_path):
    import imageio.v3 as iio

    source = world.prompt_for("red", "square", "snow")
    targets = [world.prompt_for("yellow", "square", "grass"), source]
    generated = [render("yellow", background="grass"), render(centres=PATH + SHIFT)]
    result = world_evaluation.evaluate_world_clips([render()] * 2, [source] * 2, generated, targets, str(tmp_path))
    assert json.loads((tmp_path / "metrics.json").read_text()) == result
    summary = result["summary"]
    assert summary["motion_error_px"] == pytest.approx(np.linalg.norm(SHIFT) / 2, abs=1e-4)
    assert summary["appearance_ok"] == 1.0 and summary["colour_leak"] == 0.0
    gif = iio.imread(tmp_path / "0_side_by_side.gif")
    assert gif.shape[:3] == (FRAMES, HEIGHT * 4, 2 * WIDTH * 4 + 8)


def test_evaluate_files_reads_videos(tmp_path):
    import imageio.v3 as iio

    prompt = world.prompt_for("orange", "disc", "space")
    clip = world.make_clip(2, FRAMES, HEIGHT, WIDTH, colour="orange", shape="disc", background="space")
    path = str(tmp_path / "clip.gif")
    iio.imwrite(path, (clip.video * 255).round().astype(np.uint8), extension=".gif", duration=250, loop=0)
    result = world_evaluation.evaluate_files(path, prompt, {path: prompt}, str(tmp_path / "eval"))
    assert result["summary"]["appearance_ok"] == 1.0
    assert result["summary"]["motion_error_px"] < 0.3  # the gif palette and a resize to the same size


def test_model_range_frames_are_refused():
    with pytest.raises(ValueError, match=r"float frames must be in \[0, 1\]"):
        world_evaluation.read_clip(np.full((2, 8, 8, 3), -1.0, np.float32))


def test_samples_are_judged_by_appearance_and_steadiness():
    prompts = [world.prompt_for("red", "square", "snow"), world.prompt_for("pink", "disc", "sea")]
    steady = render()
    jumpy = render("red", "disc", "sea", centres=PATH[[0, 7, 1, 6, 2, 5, 3, 4]])
    result = world_evaluation.evaluate_samples([steady, jumpy], prompts)
    first, second = result["clips"]
    assert first["appearance_ok"] and first["track_jerk_px"] < 0.25  # constant velocity: pixel-grid bias only
    assert not second["colour_ok"] and second["shape_ok"] and second["background_ok"]
    assert second["track_jerk_px"] > 10
    assert result["summary"]["appearance_ok"] == 0.5 and result["summary"]["motion_error_px"] is None


def test_noise_holds_no_object():
    noise = np.random.default_rng(3).uniform(0, 1, (FRAMES, HEIGHT, WIDTH, 3)).astype(np.float32)
    reading = world_evaluation.read_clip(noise)
    assert not reading.found.any() and reading.shape == "none"


@pytest.mark.parametrize("rgb", [(0.0, 0.55, 0.45), (0.45, 0.3, 0.15)])  # teal and brown: no world background
def test_a_background_far_from_every_name_is_none(rgb):
    clip = render(background="grass")
    grass = np.array(world.BACKGROUNDS["grass"][0], np.float32)
    recoloured = np.where(np.all(np.isclose(clip, grass), -1, keepdims=True), np.float32(rgb), clip)
    metrics = world_evaluation.appearance(world_evaluation.read_clip(recoloured), world.prompt_for("red", "square", "grass"))
    assert metrics["background"] == "none" and not metrics["background_ok"]
    assert metrics["colour"] == "red"  # the object is still named


def test_an_object_colour_between_names_is_none():
    clip = render()
    red = np.array(world.COLOURS["red"], np.float32)
    grey = np.where(np.all(np.isclose(clip, red), -1, keepdims=True), np.float32(0.45), clip)
    assert world_evaluation.read_clip(grey).colour == "none"
    assert world_evaluation.name_cutoff(world.COLOURS) < np.linalg.norm(np.float32(0.45) - red)


def test_background_flicker_is_the_spread_of_frame_backgrounds():
    clip = render()
    assert world_evaluation.read_clip(clip).background_flicker == pytest.approx(0.0, abs=1e-6)
    # every other frame's background brighter by d in each channel: the RMS distance from the mean is d * sqrt(3) / 2
    d = 0.04
    steps = np.where(np.arange(FRAMES) % 2 == 0, d, 0.0).astype(np.float32)[:, None, None, None]
    snow = np.all(np.isclose(clip, np.array(world.BACKGROUNDS["snow"][0], np.float32)), -1, keepdims=True)
    flickering = np.where(snow, clip - steps, clip)
    metrics = world_evaluation.appearance(world_evaluation.read_clip(flickering), world.prompt_for("red", "square", "snow"))
    assert metrics["background_flicker"] == pytest.approx(d * np.sqrt(3) / 2, rel=1e-3)
    assert metrics["background_ok"]


def test_evaluate_files_pairs_frames_one_to_one(tmp_path):
    """A sample with another number of frames than the input (selection) is refused, not cut to the shorter."""
    from vmc_jax import video_io

    prompt = world.prompt_for("orange", "disc", "space")
    clip = world.make_clip(2, FRAMES, HEIGHT, WIDTH, colour="orange", shape="disc", background="space")
    path, short = str(tmp_path / "clip.mp4"), str(tmp_path / "short.mp4")
    video_io.save_video(clip.video * 2 - 1, path)
    video_io.save_video(clip.video[:-1] * 2 - 1, short)
    with pytest.raises(ValueError, match=rf"'.*short.mp4' has {FRAMES - 1} frames, the input '.*clip.mp4' {FRAMES}"):
        world_evaluation.evaluate_files(path, prompt, {short: prompt}, str(tmp_path / "eval"))
    first_frames = world_evaluation.evaluate_files(path, prompt, {short: prompt}, str(tmp_path / "eval"),
                                             num_frames=FRAMES - 1)
    assert first_frames["summary"]["clips"] == 1
