"""DDIM inversion: the released formula, reconstruction, and the sharded version."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("torch", reason="torch is not installed (pip install -e '.[test]')")
from diffusers import DDIMScheduler
from helpers import fixture_inputs, load_fixture

from vmc_jax import keyframe_sampling, sampling, schedulers

RELEASED_INVERSION_CONFIG = keyframe_sampling.RELEASED_INVERSION_SCHEDULER


@pytest.fixture(scope="module")
def keyframes():
    model, params, io, _ = load_fixture("show1_keyframes")
    sample, _, text, _ = fixture_inputs(io)
    return model, params, jnp.clip(sample * 0.5, -1, 1), text


def test_official_inversion_matches_the_released_next_step(keyframes):
    """Our scan vs the Tune-A-Video loop stated step by step with diffusers' DDIM scheduler (torch)
    for timesteps and alphas, on the fixture UNet: within 1e-4 relative (measured 1.8e-5; the
    statement runs in float64, ours in float32)."""
    model, params, x0, text = keyframes
    steps = 5
    ours = keyframe_sampling.ddim_invert(model, params, x0, text, schedulers.from_config(RELEASED_INVERSION_CONFIG),
                                 steps, method="official", return_trajectory=True)

    reference = DDIMScheduler.from_config(RELEASED_INVERSION_CONFIG)
    reference.set_timesteps(steps)
    acp = reference.alphas_cumprod.numpy().astype(np.float64)
    apply = jax.jit(model.apply)
    latent = np.asarray(x0, np.float64)
    trajectory = [latent]
    for i in range(steps):
        t = int(reference.timesteps[len(reference.timesteps) - i - 1])
        eps = np.asarray(apply({"params": params}, jnp.asarray(latent, jnp.float32), jnp.full((2,), t), text))[..., :3]
        t_cur, t_next = min(t - 1000 // reference.num_inference_steps, 999), t
        a_cur = acp[t_cur] if t_cur >= 0 else float(reference.final_alpha_cumprod)
        x0_pred = (latent - (1 - a_cur) ** 0.5 * eps) / a_cur**0.5
        latent = acp[t_next] ** 0.5 * x0_pred + (1 - acp[t_next]) ** 0.5 * eps
        trajectory.append(latent)
    trajectory = np.stack(trajectory)
    assert ours.shape == trajectory.shape
    error = np.abs(np.asarray(ours) - trajectory).max() / np.abs(trajectory).max()
    assert error <= 1e-4, error


def test_invert_then_sample_reconstructs(keyframes):
    """Inverting 50 DDIM steps and sampling them back recovers the clip: max error 0.02
    (measured 0.0098, mean 0.0016). The random fixture UNet is made a smooth epsilon model by
    scaling its output layer by 0.01; a random full-scale network is chaotic, not a denoiser."""
    model, params, x0, text = keyframes
    params = {**params, "conv_out": jax.tree.map(lambda p: p * 0.01, params["conv_out"])}
    scheduler = schedulers.from_config({"_class_name": "DDPMScheduler", "beta_schedule": "scaled_linear",
                                        "beta_start": 0.00085, "beta_end": 0.012,
                                        "variance_type": "learned_range"})
    x_T = keyframe_sampling.ddim_invert(model, params, x0, text, scheduler, 50)
    assert np.abs(np.asarray(x_T) - np.asarray(x0)).max() > 0.5  # it did move to noise level

    def denoise(x, t, params, text):
        return model.apply({"params": params}, x, jnp.full((x.shape[0],), t), text)

    back = sampling.sample_loop(keyframe_sampling.as_ddim(scheduler), denoise, x_T, 50, denoise_args=(params, text))
    assert np.abs(np.asarray(back) - np.asarray(x0)).max() <= 0.02


def test_inversion_of_a_v_prediction_model(keyframes):
    """A v-prediction model is inverted with the noise it implies, eps = sqrt(acp[t]) v + sqrt(1 - acp[t]) x,
    written out here step by step in float64: within 1e-4 relative (4 frames of 16x16, 3 steps)."""
    model, params, x0, text = keyframes
    x0 = x0[:, :4, :16, :16]
    scheduler = schedulers.from_config({"_class_name": "DDIMScheduler", "prediction_type": "v_prediction"})
    ours = keyframe_sampling.ddim_invert(model, params, x0, text, scheduler, 3)

    apply = jax.jit(model.apply)
    acp = np.asarray(scheduler.alphas_cumprod, np.float64)
    x = np.asarray(x0, np.float64)
    for t, a_cur, a_next in zip(*keyframe_sampling.inversion_schedule(scheduler, 3)):
        v = np.asarray(apply({"params": params}, jnp.asarray(x, jnp.float32), jnp.full((2,), t), text))[..., :3]
        eps = acp[t] ** 0.5 * v + (1 - acp[t]) ** 0.5 * x
        x = a_next ** 0.5 * (x - (1 - a_cur) ** 0.5 * eps) / a_cur ** 0.5 + (1 - a_next) ** 0.5 * eps
    error = np.abs(np.asarray(ours) - x).max() / np.abs(x).max()
    assert error <= 1e-4, error


def test_sharded_inversion_equals_single_device_runs(keyframes, caplog):
    model, params, x0, text = keyframes
    assert jax.local_device_count() == 4
    clips = jnp.concatenate([x0, -x0])
    texts = jnp.concatenate([text, text[::-1]])
    scheduler = schedulers.from_config(RELEASED_INVERSION_CONFIG)
    singles = np.concatenate([
        np.asarray(keyframe_sampling.ddim_invert(model, params, clips[i:i + 1], texts[i:i + 1], scheduler, 3))
        for i in range(4)
    ])
    spread = keyframe_sampling.sharded_ddim_invert(model, params, clips, texts, scheduler, 3)
    np.testing.assert_allclose(np.asarray(spread), singles, rtol=1e-5, atol=1e-5)

    flipped = clips[:, ::-1]
    with caplog.at_level(logging.WARNING), jax.log_compiles(True):
        again = keyframe_sampling.sharded_ddim_invert(model, params, flipped, texts, scheduler, 3)
    assert not [r for r in caplog.records if "Compiling" in r.getMessage()], "second call recompiled"
    with caplog.at_level(logging.WARNING):
        padded = keyframe_sampling.sharded_ddim_invert(model, params, clips[:3], texts[:3], scheduler, 3)
    assert "sharded_ddim_invert: a batch of 3 padded to 4" in caplog.text
    np.testing.assert_allclose(np.asarray(padded), singles[:3], rtol=1e-5, atol=1e-5)
    assert not np.allclose(np.asarray(again), singles)


def test_unknown_method_is_an_error():
    with pytest.raises(ValueError, match="unknown inversion method 'exact'"):
        keyframe_sampling.inversion_schedule(schedulers.from_config(RELEASED_INVERSION_CONFIG), 10, method="exact")
