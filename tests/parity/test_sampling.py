"""The jitted sampling loop against diffusers' (torch) scheduler step loops, and its behaviour.

The stand-in denoiser is the same float32 arithmetic in numpy / torch / JAX: the ideal noise
predictor for N(0, 0.5^2) data, k(t) x with k(t) = sigma_t / (0.25 alpha_t^2 + sigma_t^2) read from a
float32 table, plus a rational nonlinearity; where a model has learned-variance channels they are
x / (1 + |x|). Arrays are channels last here and channels first for diffusers.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
torch = pytest.importorskip("torch", reason="torch is not installed (pip install -e '.[test]')")
import diffusers
import diffusers.schedulers.scheduling_ddpm as diffusers_ddpm

from vmc_jax import schedulers
from vmc_jax.sampling import classifier_free_guidance, sample_loop

SHAPE = (2, 2, 4, 4, 3)  # (batch, frames, height, width, channels)
PARITY_TOL = 1e-5  # max abs error against diffusers' torch step loop (measured <= 1.4e-6)


def _gain(scheduler: schedulers.Scheduler) -> np.ndarray:
    acp = scheduler.alphas_cumprod
    return (np.sqrt(1 - acp) / (0.25 * acp + (1 - acp))).astype(np.float32)


def _jax_denoiser(scheduler, with_variance):
    gain = jnp.asarray(_gain(scheduler))

    def denoise(x, t):
        eps = gain[t] * x + 0.1 * x / (1 + x * x)
        return jnp.concatenate([eps, x / (1 + jnp.abs(x))], axis=-1) if with_variance else eps

    return denoise


def _torch_denoiser(scheduler, with_variance):
    gain = torch.from_numpy(_gain(scheduler))

    def denoise(x, t):
        eps = gain[t] * x + 0.1 * x / (1 + x * x)
        return torch.cat([eps, x / (1 + x.abs())], dim=1) if with_variance else eps

    return denoise


def _to_torch(x: np.ndarray) -> torch.Tensor:
    """(..., h, w, c) -> (images, c, h, w): the reference pipelines step a video frame by frame."""
    images = x.reshape(-1, *x.shape[-3:])
    return torch.from_numpy(np.moveaxis(images, -1, 1).copy())


def _diffusers_loop(config, num_steps, x_T, with_variance, noise=None, monkeypatch=None, eta=0.0):
    """diffusers' own step loop; `noise[i]` is the step's variance noise where the sampler draws one."""
    reference = getattr(diffusers, config["_class_name"]).from_config(config)
    reference.set_timesteps(num_steps)
    denoise = _torch_denoiser(schedulers.from_config(config), with_variance)
    current_noise = []
    if monkeypatch is not None:  # DDPM's step draws its own noise: hand it the prepared one
        monkeypatch.setattr(diffusers_ddpm, "randn_tensor", lambda *args, **kwargs: current_noise[-1])
    x = _to_torch(x_T)
    for i, t in enumerate(reference.timesteps):
        kwargs = {}
        if noise is not None:
            current_noise.append(_to_torch(noise[i]))
            if config["_class_name"] == "DDIMScheduler":
                kwargs = {"eta": eta, "variance_noise": current_noise[-1]}
        x = reference.step(denoise(x, int(t)), t, x, **kwargs).prev_sample
    return np.moveaxis(x.numpy(), 1, -1).reshape(x_T.shape)


def _check_parity(config, num_steps, with_variance=False, stochastic=False, monkeypatch=None, eta=0.0,
                  shape=SHAPE):
    """sample_loop against diffusers' loop from the same x_T (and per-step noise) to PARITY_TOL."""
    rng = np.random.default_rng(0)
    x_T = rng.standard_normal(shape, dtype=np.float32)
    noise = rng.standard_normal((num_steps, *shape), dtype=np.float32) if stochastic else None
    scheduler = schedulers.from_config(config, eta=eta)
    ours = sample_loop(scheduler, _jax_denoiser(scheduler, with_variance), jnp.asarray(x_T), num_steps,
                       noise=None if noise is None else jnp.asarray(noise))
    theirs = _diffusers_loop(config, num_steps, x_T, with_variance, noise, monkeypatch, eta)
    error = float(np.max(np.abs(np.asarray(ours) - theirs)))
    assert error <= PARITY_TOL, error
    assert np.abs(theirs - x_T).max() > 0.1  # the loop did denoise


DDIM = {"_class_name": "DDIMScheduler", "beta_schedule": "linear", "clip_sample": False}
# Stable Diffusion's PNDM-style settings, as the released VMC inversion config has them.
DDIM_SD = {**DDIM, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
           "set_alpha_to_one": False, "steps_offset": 1}


@pytest.mark.parametrize("config, num_steps, eta", [
    (DDIM, 50, 0.0),
    ({**DDIM, "timestep_spacing": "trailing"}, 30, 0.0),
    ({**DDIM, "timestep_spacing": "linspace", "clip_sample": True}, 25, 0.0),
    (DDIM_SD, 75, 0.0),
    ({**DDIM, "thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 1.5}, 40, 0.0),
    ({**DDIM, "prediction_type": "v_prediction", "beta_schedule": "squaredcos_cap_v2"}, 20, 0.0),
    ({**DDIM, "prediction_type": "sample", "clip_sample": True}, 20, 0.0),
    (DDIM, 20, 0.5),
])
def test_ddim_matches_diffusers(config, num_steps, eta):
    """DDIM (spacings, steps_offset 1, set_alpha_to_one False, clipping, thresholding, v / sample
    prediction, eta 0.5 with shared noise) matches DDIMScheduler's loop to 1e-5 max abs."""
    _check_parity(config, num_steps, stochastic=eta > 0, eta=eta)


# Show-1 keyframe-model style: cosine schedule, dynamic thresholding, learned variance channels.
DPM = {"_class_name": "DPMSolverMultistepScheduler", "beta_schedule": "squaredcos_cap_v2",
       "thresholding": True, "dynamic_thresholding_ratio": 0.95, "sample_max_value": 1.5,
       "variance_type": "learned_range", "algorithm_type": "dpmsolver++", "solver_order": 2}


@pytest.mark.parametrize("config, num_steps", [
    (DPM, 10),
    (DPM, 20),
    ({**DPM, "solver_order": 1}, 12),
    ({**DPM, "thresholding": False, "beta_schedule": "linear"}, 16),
    ({**DPM, "lower_order_final": False}, 8),
    ({**DPM, "final_sigmas_type": "sigma_min"}, 20),
    ({**DPM, "final_sigmas_type": "sigma_min", "euler_at_final": True}, 16),
    ({**DPM, "solver_type": "heun", "timestep_spacing": "leading", "steps_offset": 1}, 12),
    ({**DPM, "timestep_spacing": "trailing", "prediction_type": "v_prediction", "variance_type": None}, 15),
])
def test_dpm_solver_matches_diffusers(config, num_steps):
    """DPM-Solver++ (order 1 / 2, midpoint / heun, thresholding on / off, lower_order_final on /
    off, both final sigma types, euler_at_final) matches DPMSolverMultistepScheduler's loop to 1e-5 max abs."""
    _check_parity(config, num_steps, with_variance=config["variance_type"] == "learned_range")


# DeepFloyd IF-II style.
DDPM = {"_class_name": "DDPMScheduler", "beta_schedule": "squaredcos_cap_v2", "variance_type": "learned_range",
        "thresholding": True, "dynamic_thresholding_ratio": 0.95, "sample_max_value": 1.0}


@pytest.mark.parametrize("config, num_steps, with_variance", [
    (DDPM, 25, True),
    ({**DDPM, "thresholding": False, "timestep_spacing": "trailing"}, 20, True),
    ({**DDPM, "variance_type": "fixed_small", "beta_schedule": "linear"}, 20, False),
    ({**DDPM, "variance_type": "fixed_small_log", "steps_offset": 1}, 20, False),
    ({**DDPM, "variance_type": "fixed_large", "timestep_spacing": "linspace", "thresholding": False,
      "clip_sample_range": 0.8}, 20, False),
])
def test_ddpm_matches_diffusers(config, num_steps, with_variance, monkeypatch):
    """DDPM (learned_range, fixed_small[_log], fixed_large; thresholding) with the same per-step noise
    matches DDPMScheduler's loop to 1e-5 max abs."""
    _check_parity(config, num_steps, with_variance, stochastic=True, monkeypatch=monkeypatch)


def test_image_batches_threshold_per_image(monkeypatch):
    """An image batch (batch, h, w, c) is thresholded per image, as IF's image pipelines step it:
    DDPM with dynamic thresholding matches diffusers on (batch, c, h, w) to 1e-5 max abs."""
    _check_parity(DDPM, 25, True, stochastic=True, monkeypatch=monkeypatch, shape=(3, 4, 4, 3))


def test_thresholding_needs_images():
    scheduler = schedulers.from_config(DDPM)
    inputs = schedulers.StepInputs(*(a[0] for a in schedulers.step_inputs(scheduler, 10)))
    x = jnp.ones((2, 3, 6))
    with pytest.raises(ValueError, match=r"dynamic thresholding needs images .* shape \(2, 3, 6\)"):
        schedulers.step(scheduler, jnp.concatenate([x, x], -1), x, inputs, noise=x)


@pytest.mark.parametrize("config", [
    {**DDIM_SD, "set_alpha_to_one": True},
    {**DPM, "thresholding": False},
    {"_class_name": "DDPMScheduler", "beta_schedule": "linear", "clip_sample": False},
])
def test_perfect_denoiser_recovers_data(config):
    """A denoiser that returns the true noise of a known x0 (at every x_t) leads each sampler back
    to x0, to 1e-6 max abs (DDPM, whatever its noise: its last step has zero posterior variance)."""
    scheduler = schedulers.from_config(config)
    rng = np.random.default_rng(1)
    x0 = jnp.asarray(rng.uniform(-1, 1, SHAPE).astype(np.float32))

    def true_noise(x_t, t):
        a = schedulers.alpha_cumprod_at(scheduler, t)
        return (x_t - jnp.sqrt(a) * x0) / jnp.sqrt(1 - a)

    x_T = jnp.asarray(rng.standard_normal(SHAPE, dtype=np.float32))
    noise = jnp.asarray(rng.standard_normal((20, *SHAPE), dtype=np.float32))
    recovered = sample_loop(scheduler, true_noise, x_T, 20, noise=noise)
    np.testing.assert_allclose(recovered, x0, rtol=0, atol=1e-6)


def test_rng_draws_one_normal_per_step():
    """With `rng`, the loop equals the same loop fed split(rng, steps)[i]'s standard normal as the
    step-i noise (exactly, 0 error): the rng path and the injected-noise path are one sampler."""
    scheduler = schedulers.from_config(DDPM)
    denoise = _jax_denoiser(scheduler, with_variance=True)
    x_T = jnp.asarray(np.random.default_rng(2).standard_normal(SHAPE, dtype=np.float32))
    # Any key type works; rbg compiles far faster than threefry on CPU (its bits change under vmap, so
    # the reference draws key by key).
    key = jax.random.key(3, impl="rbg")
    noise = jnp.stack([jax.random.normal(k, SHAPE) for k in jax.random.split(key, 10)])
    np.testing.assert_array_equal(sample_loop(scheduler, denoise, x_T, 10, rng=key),
                                  sample_loop(scheduler, denoise, x_T, 10, noise=noise))
    assert not np.allclose(sample_loop(scheduler, denoise, x_T, 10, rng=jax.random.key(4, impl="rbg")),
                           sample_loop(scheduler, denoise, x_T, 10, rng=key))


def test_loop_compiles_once():
    """A second call with the same shapes (new values, new rng) reuses the compiled loop: the
    denoiser is traced once, and the jit cache holds one entry."""
    scheduler = schedulers.from_config(DDPM)
    traces = []
    base = _jax_denoiser(scheduler, with_variance=True)

    def denoise(x, t, scale):
        traces.append(1)
        return base(x, t) * scale

    before = sample_loop._cache_size()
    for seed in range(3):
        x_T = jax.random.normal(jax.random.key(seed), SHAPE)
        sample_loop(scheduler, denoise, x_T, 8, rng=jax.random.key(seed), denoise_args=(jnp.float32(seed),))
    assert len(traces) == 1
    assert sample_loop._cache_size() == before + 1


def test_shared_noise_is_one_draw_for_the_batch():
    """shared_noise: each step draws one noise for all batch items, so identical items stay equal,
    and equal the one-item run (exactly); without it, they part."""
    scheduler = schedulers.from_config(DDPM)
    denoise = _jax_denoiser(scheduler, with_variance=True)
    item = jnp.asarray(np.random.default_rng(6).standard_normal(SHAPE[1:], dtype=np.float32))
    key = jax.random.key(7, impl="rbg")
    shared = sample_loop(scheduler, denoise, jnp.stack([item] * 3), 6, rng=key, shared_noise=True)
    alone = sample_loop(scheduler, denoise, item[None], 6, rng=key, shared_noise=True)
    for x in shared:
        np.testing.assert_array_equal(x, alone[0])
    separate = sample_loop(scheduler, denoise, jnp.stack([item] * 3), 6, rng=key)
    assert not np.allclose(separate[0], separate[1])


def test_stochastic_sampler_needs_randomness():
    """DDPM without rng or noise is refused with a message naming `rng`."""
    scheduler = schedulers.from_config(DDPM)
    with pytest.raises(ValueError, match="rng"):
        sample_loop(scheduler, _jax_denoiser(scheduler, True), jnp.zeros(SHAPE), 4)


def test_classifier_free_guidance_matches_deepfloyd_if():
    """One batched call on [x, x]; eps = eps_u + w (eps_c - eps_u) on the first C channels, the
    variance channels from the conditional half: equal (1e-6) to the IF pipeline's arithmetic in
    torch. Equal wrappers compare equal, so jit caches hit."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal(SHAPE, dtype=np.float32)
    cond = np.stack([rng.standard_normal(SHAPE[1:-1] + (6,), dtype=np.float32) for _ in range(2)])  # [uncond, cond]
    calls = []

    def model_fn(x_in, t, states):
        calls.append(x_in.shape)
        return jnp.concatenate([x_in, x_in], axis=-1) * states * (t + 1)  # per-half output

    guided = classifier_free_guidance(model_fn, 7.0)
    states = jnp.repeat(jnp.asarray(cond), SHAPE[0], axis=0)  # batch [uncond] * b + [cond] * b
    ours = guided(jnp.asarray(x), jnp.int32(4), states)
    assert calls == [(2 * SHAPE[0],) + SHAPE[1:]]

    full = torch.from_numpy(np.moveaxis(np.asarray(model_fn(jnp.concatenate([x, x]), 4, states)), -1, 1).copy())
    uncond, text = full.chunk(2)
    uncond, _ = uncond.split(3, dim=1)
    text, variance = text.split(3, dim=1)
    reference = torch.cat([uncond + 7.0 * (text - uncond), variance], dim=1)
    np.testing.assert_allclose(ours, np.moveaxis(reference.numpy(), 1, -1), rtol=0, atol=1e-6)
    assert classifier_free_guidance(model_fn, 7) == guided


def test_guidance_rescale_matches_diffusers():
    """guidance_rescale 0.7 on a guided output: equal (1e-5) to diffusers' `rescale_noise_cfg` (torch's
    unbiased std per item); 0 leaves plain guidance; a value outside [0, 1] is refused."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    rng = np.random.default_rng(6)
    x = rng.standard_normal(SHAPE, dtype=np.float32)
    halves = rng.standard_normal((2 * SHAPE[0],) + SHAPE[1:], dtype=np.float32) * np.float32(3.0)

    def model_fn(x_in, t, out):
        return out

    ours = classifier_free_guidance(model_fn, 5.0, guidance_rescale=0.7)(jnp.asarray(x), jnp.int32(3), halves)
    uncond, text = torch.from_numpy(halves).chunk(2)
    guided = uncond + 5.0 * (text - uncond)
    reference = rescale_noise_cfg(guided, text, guidance_rescale=0.7)
    np.testing.assert_allclose(ours, reference.numpy(), rtol=0, atol=1e-5)
    plain = classifier_free_guidance(model_fn, 5.0)(jnp.asarray(x), jnp.int32(3), halves)
    np.testing.assert_allclose(plain, guided.numpy(), rtol=0, atol=1e-5)
    assert not np.allclose(ours, plain, atol=1e-3)
    with pytest.raises(ValueError, match="guidance_rescale 1.5: expected a value in"):
        classifier_free_guidance(model_fn, 5.0, guidance_rescale=1.5)
