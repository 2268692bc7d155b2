"""The cascade stages against their reference pipelines (tests/fixtures/cascade, made by
weights_conversion/make_cascade_fixtures.py from Show-1 / diffusers 0.19.3 on the tiny random
stage pipelines, 2 sampler steps, every random draw injected).

Tolerances: 1e-4 absolute on each stage output (the issue's bar; see the report for measured
errors); the batched interpolation equals the windows run one by one to 1e-5.
"""

import hashlib
import os

import helpers
import jax.numpy as jnp
import numpy as np
import pytest

import vmc_jax
from vmc_jax import cascade, schedulers
from vmc_jax.hub.tiny_pipeline import make_tiny_cascade

FIXTURES = os.path.join(helpers.FIXTURES, "cascade")
ATOL = 1e-4


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory) -> dict[str, str]:
    return make_tiny_cascade(str(tmp_path_factory.mktemp("cascade")))


def load_fixture(pipelines: dict[str, str], stage: str) -> dict:
    """The stage's golden data, after checking it was made from these tiny weights."""
    data = dict(np.load(os.path.join(FIXTURES, f"{stage}.npz")))
    with open(os.path.join(pipelines[stage], "unet", "diffusion_pytorch_model.safetensors"), "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == str(data["weights_sha256"]), \
            f"{stage}: the tiny pipeline changed; rerun weights_conversion/make_cascade_fixtures.py"
    return data


def load_stage(folder: str):
    model, params = vmc_jax.load_unet(os.path.join(folder, "unet"), dtype=np.float32)
    return model, params, schedulers.from_config(folder)


def test_interpolation_matches_show1(pipelines):
    d = load_fixture(pipelines, "interpolation")
    model, params, scheduler = load_stage(pipelines["interpolation"])
    noise = cascade.StageNoise(d["init"], steps=d["steps"])
    out = cascade.interpolate_keyframes(model, params, scheduler, d["keyframes"], d["text"], d["negative_text"],
                                        int(d["num_steps"]), float(d["guidance"]), noise=noise)
    assert out.shape == (29, 16, 24, 3)
    error = float(np.abs(np.asarray(out) - d["out"]).max())
    print(f"max abs error {error:.2e}")
    assert error <= ATOL, error



def test_batched_interpolation_equals_sequential_windows(pipelines):
    """All windows in one batch equal the windows run one at a time and assembled in the reference's
    order (later window overwrites the shared keyframe), to 1e-5. One sampler step (t = 0): with
    more steps, float32 round-off that depends on the batch size is amplified by (2g - 1) / sqrt(alpha_bar)
    (measured 2.9e-5 at 2 steps); the shared draws over many steps are checked against the reference
    (7 separate pipeline calls) in test_interpolation_matches_show1.
    """
    d = dict(np.load(os.path.join(FIXTURES, "interpolation.npz")))
    model, params, scheduler = load_stage(pipelines["interpolation"])
    noise = cascade.StageNoise(d["init"], steps=d["steps"][:1])

    def run(keyframes):
        return np.asarray(cascade.interpolate_keyframes(model, params, scheduler, keyframes, d["text"],
                                                        d["negative_text"], 1, float(d["guidance"]), noise=noise))

    batched = run(d["keyframes"])
    windows = [run(d["keyframes"][i:i + 2]) for i in range(7)]
    sequential = np.concatenate([w[:-1] for w in windows] + [windows[-1][-1:]])
    error = float(np.abs(batched - sequential).max())
    print(f"batched vs sequential {error:.2e}")
    assert error <= 1e-5, error


def test_sr1_first_frame_matches_if_ii(pipelines):
    d = load_fixture(pipelines, "sr1_image")
    folder = pipelines["sr1_image"]
    model, params, scheduler = load_stage(folder)
    noising = schedulers.from_config(os.path.join(folder, "image_noising_scheduler"))
    out = cascade.super_resolve_first_frame(
        model, params, scheduler, noising, d["image"], d["text"], d["negative_text"], *d["out"].shape[:2],
        int(d["num_steps"]), float(d["guidance"]), int(d["noise_level"]),
        noise=cascade.StageNoise(d["init"], d["augmentation"], d["steps"]))
    error = float(np.abs(np.asarray(out) - d["out"]).max())
    print(f"max abs error {error:.2e}")
    assert error <= ATOL, error


def test_sr1_windows_match_show1(pipelines):
    d = load_fixture(pipelines, "sr1")
    folder = pipelines["sr1"]
    model, params, scheduler = load_stage(folder)
    noising = schedulers.from_config(os.path.join(folder, "image_noising_scheduler"))
    out = cascade.super_resolve_windows(
        model, params, scheduler, noising, d["frames"], d["first_frame"], d["text"], d["negative_text"],
        *d["out"].shape[1:3], int(d["num_steps"]), float(d["guidance"]), int(d["noise_level"]), int(d["window"]),
        int(d["stride"]), noise=cascade.StageNoise(d["init"], d["augmentation"], d["steps"]))
    error = float(np.abs(np.asarray(out) - d["out"]).max())
    print(f"max abs error {error:.2e}")
    assert error <= ATOL, error


def test_sr2_matches_video_to_video(pipelines):
    d = load_fixture(pipelines, "sr2")
    folder = pipelines["sr2"]
    model, params, scheduler = load_stage(folder)
    vae, vae_params = vmc_jax.load_vae(os.path.join(folder, "vae"), dtype=np.float32)
    encoder, encoder_params = vmc_jax.load_text_encoder(os.path.join(folder, "text_encoder"))
    tokenizer = vmc_jax.load_tokenizer(folder)
    text, _ = vmc_jax.encode_prompts(tokenizer, encoder, encoder_params, [str(d["prompt"])])
    negative, _ = vmc_jax.encode_prompts(tokenizer, encoder, encoder_params, [str(d["negative_prompt"])])
    video = 2.0 * d["video01"] - 1.0
    out = cascade.video_to_video(model, params, vae, vae_params, scheduler, video, text, negative,
                                 int(d["num_steps"]), float(d["strength"]), float(d["guidance"]),
                                 noise=cascade.StageNoise(d["init"], d["posterior"]))
    error = float(np.abs(np.asarray(out) - d["out"]).max())
    print(f"max abs error {error:.2e}")
    assert error <= ATOL, error


def test_window_and_strength_arithmetic():
    assert cascade.window_starts(29, 8, 7) == [0, 7, 14, 21]
    with pytest.raises(ValueError, match="cannot cover 30 frames with windows of 8 and stride 7"):
        cascade.window_starts(30, 8, 7)
    assert cascade.strength_first_step(50, 0.8) == 10  # diffusers: 50 - int(50 * 0.8)
    with pytest.raises(ValueError, match="strength = 0"):
        cascade.strength_first_step(50, 0.0)


def test_resize_matches_align_corners_definition():
    """Bilinear with aligned corners: the corners are kept and a 2 -> 5 resize blends in quarters."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 4, 3)).astype(np.float32))
    y = cascade.resize_frames(x, 5, 7)
    np.testing.assert_allclose(y[:, [0, -1]][:, :, [0, -1]], x[:, [0, -1]][:, :, [0, -1]], atol=1e-6)
    np.testing.assert_allclose(cascade.resize_matrix(2, 5)[:, 1], [0, 0.25, 0.5, 0.75, 1], atol=0)
