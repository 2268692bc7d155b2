"""Scheduler configs, schedule arrays, timesteps and add_noise against diffusers (torch, CPU)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
torch = pytest.importorskip("torch", reason="torch is not installed (pip install -e '.[test]')")
import diffusers

from vmc_jax import schedulers

CLASSES = ("DDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler")
# Stable Diffusion v1's scheduler_config.json: the kind of PNDM config the released VMC inverts with.
SD_PNDM = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.7.0.dev0", "beta_end": 0.012,
           "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
           "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
           "clip_sample": False}


def _reference(config):
    """The diffusers scheduler for a config; a PNDM config loaded into DDIM, as the released VMC does."""
    name = "DDIMScheduler" if config["_class_name"] == "PNDMScheduler" else config["_class_name"]
    return getattr(diffusers, name).from_config(config)


@pytest.mark.parametrize("name", CLASSES)
@pytest.mark.parametrize("beta_schedule, beta_start, beta_end", [
    ("linear", 0.0001, 0.02), ("linear", 0.00085, 0.012), ("scaled_linear", 0.00085, 0.012),
    ("scaled_linear", 0.0001, 0.02), ("squaredcos_cap_v2", 0.0001, 0.02)])
def test_schedule_arrays_equal_diffusers(name, beta_schedule, beta_start, beta_end):
    """betas and alphas_cumprod are bit-identical (0 error) to diffusers' float32 torch arrays."""
    config = {"_class_name": name, "beta_schedule": beta_schedule, "beta_start": beta_start, "beta_end": beta_end}
    ours, theirs = schedulers.from_config(config), _reference(config)
    np.testing.assert_array_equal(ours.betas, theirs.betas.numpy())
    np.testing.assert_array_equal(ours.alphas_cumprod, theirs.alphas_cumprod.numpy())
    assert ours.betas.dtype == ours.alphas_cumprod.dtype == np.float32


@pytest.mark.parametrize("name", ("DDPMScheduler", "DDIMScheduler"))
@pytest.mark.parametrize("beta_schedule", ("linear", "scaled_linear"))
def test_zero_terminal_snr_schedule_equals_diffusers(name, beta_schedule):
    """rescale_betas_zero_snr: the last alpha_bar is 0 and the arrays agree with diffusers' to float32
    rounding (its 1 - ratio of neighbouring alpha_bars; measured: betas 3.0e-6 absolute, alphas_cumprod
    3.8e-6 relative). DPM-Solver++, which diffusers special-cases there, refuses it (below)."""
    config = {"_class_name": name, "beta_schedule": beta_schedule, "beta_start": 0.00085, "beta_end": 0.012,
              "rescale_betas_zero_snr": True}
    ours, theirs = schedulers.from_config(config), _reference(config)
    np.testing.assert_allclose(ours.betas, theirs.betas.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(ours.alphas_cumprod, theirs.alphas_cumprod.numpy(), rtol=1e-5, atol=0)
    assert ours.alphas_cumprod[-1] == 0 and ours.betas[-1] == 1
    plain = schedulers.from_config({**config, "rescale_betas_zero_snr": False})
    assert ours.alphas_cumprod[0] == pytest.approx(plain.alphas_cumprod[0], rel=1e-6)
    x0, noise = np.ones((2, 4, 3), np.float32), np.random.default_rng(0).normal(size=(2, 4, 3)).astype(np.float32)
    last = np.array([ours.num_train_timesteps - 1] * 2)  # pure noise: no trace of the clean sample left
    np.testing.assert_array_equal(np.asarray(schedulers.add_noise(ours, x0, noise, last)), noise)


def test_trained_betas():
    """Explicit trained_betas replace the named schedule, bit-identical to diffusers."""
    betas = np.linspace(1e-4, 0.03, 50).tolist()
    config = {"_class_name": "DDPMScheduler", "num_train_timesteps": 50, "trained_betas": betas}
    np.testing.assert_array_equal(schedulers.from_config(config).alphas_cumprod,
                                  _reference(config).alphas_cumprod.numpy())


@pytest.mark.parametrize("name", CLASSES + ("PNDMScheduler",))
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps_offset", [0, 1])
def test_timesteps_equal_diffusers(name, spacing, steps_offset):
    """timesteps() equals set_timesteps() exactly for several step counts, divisors of 1000 or not."""
    config = {"_class_name": name, "timestep_spacing": spacing, "steps_offset": steps_offset}
    scheduler, reference = schedulers.from_config(config), _reference(config)
    for num_steps in (1, 7, 20, 25, 75, 999):
        reference.set_timesteps(num_steps)
        np.testing.assert_array_equal(schedulers.timesteps(scheduler, num_steps), reference.timesteps.numpy())


def test_step_inputs():
    """DDIM lands a fixed stride back (diffusers' rule, even with linspace spacing); DDPM and
    DPM-Solver++ land on the next timestep, -1 after the last; DPM-Solver++ is first order on its
    first step and, with a zero final sigma, on its last."""
    ddim = schedulers.step_inputs(schedulers.from_config({"_class_name": "DDIMScheduler",
                                                          "timestep_spacing": "linspace"}), 7)
    np.testing.assert_array_equal(ddim.t, [999, 832, 666, 500, 333, 166, 0])
    np.testing.assert_array_equal(ddim.prev_t, [857, 690, 524, 358, 191, 24, -1])
    dpm = schedulers.step_inputs(schedulers.from_config({"_class_name": "DPMSolverMultistepScheduler"}), 20)
    np.testing.assert_array_equal(dpm.prev_t, np.append(dpm.t[1:], -1))
    np.testing.assert_array_equal(dpm.second_order, [False] + [True] * 18 + [False])
    ddpm = schedulers.step_inputs(schedulers.from_config({"_class_name": "DDPMScheduler"}), 4)
    np.testing.assert_array_equal(ddpm.prev_t, [500, 250, 0, -1])
    assert not ddpm.second_order.any()


def test_step_inputs_from_a_later_step():
    """An img2img run (first_step 5 of 20) takes the full run's later steps, its first one first order."""
    dpm = schedulers.from_config({"_class_name": "DPMSolverMultistepScheduler"})
    full, late = schedulers.step_inputs(dpm, 20), schedulers.step_inputs(dpm, 20, first_step=5)
    np.testing.assert_array_equal(late.t, full.t[5:])
    np.testing.assert_array_equal(late.prev_t, full.prev_t[5:])
    np.testing.assert_array_equal(late.second_order, [False] + [True] * 13 + [False])


def test_alpha_cumprod_at_negative_timestep():
    """t < 0 (past the last step) reads 1 with set_alpha_to_one, else alphas_cumprod[0]."""
    for set_alpha_to_one, expected in ((True, 1.0), (False, None)):
        scheduler = schedulers.from_config({"_class_name": "DDIMScheduler", "set_alpha_to_one": set_alpha_to_one})
        expected = scheduler.alphas_cumprod[0] if expected is None else expected
        values = schedulers.alpha_cumprod_at(scheduler, jnp.array([-1, 0, 999]))
        np.testing.assert_array_equal(values, [expected, scheduler.alphas_cumprod[0], scheduler.alphas_cumprod[999]])


def _x0_and_noise(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal((3, 2, 4, 4, 3), dtype=np.float32) for _ in range(2))


@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler"])
def test_add_noise_and_velocity_match_diffusers(name):
    """add_noise and the v-prediction target equal diffusers' add_noise and get_velocity (max abs 1e-6)
    for per-sample and scalar timesteps. (DPMSolverMultistepScheduler.add_noise indexes its inference
    steps, not the training process.)"""
    config = {"_class_name": name, "beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction"}
    ours, theirs = schedulers.from_config(config), _reference(config)
    x0, noise = _x0_and_noise(0)
    t = np.array([0, 421, 999])
    expected = theirs.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
    np.testing.assert_allclose(schedulers.add_noise(ours, x0, noise, t), expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(schedulers.add_noise(ours, x0[1:2], noise[1:2], 421), expected[1:2], rtol=0, atol=1e-6)
    velocity = theirs.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
    np.testing.assert_allclose(schedulers.training_target(ours, x0, noise, t), velocity, rtol=0, atol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_predicted_noise_inverts_the_training_target(prediction_type):
    """A model that predicts its target exactly implies the true noise (max abs 1e-4; "sample" divides by
    sqrt(1 - acp[t]), 0.03 at t = 3)."""
    scheduler = schedulers.from_config({"_class_name": "DDIMScheduler", "prediction_type": prediction_type})
    x0, noise = _x0_and_noise(2)
    t = np.array([3, 421, 999])
    target = schedulers.training_target(scheduler, x0, noise, t)
    noisy = schedulers.add_noise(scheduler, x0, noise, t)
    np.testing.assert_allclose(schedulers.predicted_noise(scheduler, target, noisy, t), noise, rtol=0, atol=1e-4)


def test_from_config_sources(tmp_path):
    """A dict, a scheduler_config.json, its folder and a pipeline folder give the same Scheduler;
    keyword overrides replace config keys."""
    (tmp_path / "scheduler").mkdir()
    path = tmp_path / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps(SD_PNDM))
    from_dict = schedulers.from_config(SD_PNDM)
    for source in (path, path.parent, tmp_path):
        assert schedulers.from_config(source) == from_dict
    assert schedulers.from_config(str(path), eta=1.0).eta == 1.0
    with pytest.raises(FileNotFoundError, match="nowhere"):
        schedulers.from_config(tmp_path / "nowhere")


def test_pndm_config_reads_as_ddim():
    """Stable Diffusion's PNDM config becomes the DDIM sampler that DDIMScheduler.from_config makes
    of it: same settings, arrays and timesteps."""
    scheduler = schedulers.from_config(SD_PNDM)
    reference = _reference(SD_PNDM)
    reference.set_timesteps(50)
    assert (scheduler.algorithm, scheduler.set_alpha_to_one, scheduler.steps_offset, scheduler.clip_sample) == (
        "ddim", False, 1, False)
    assert scheduler.final_alpha_cumprod == reference.final_alpha_cumprod.item()
    np.testing.assert_array_equal(scheduler.alphas_cumprod, reference.alphas_cumprod.numpy())
    np.testing.assert_array_equal(schedulers.timesteps(scheduler, 50), reference.timesteps.numpy())


def test_scheduler_is_a_static_jit_argument():
    """Equal configs give equal, equally hashed Schedulers, so jit reuses its compiled function."""
    a = schedulers.from_config({"_class_name": "DDIMScheduler", "trained_betas": [0.1] * 1000})
    b = schedulers.from_config({"_class_name": "DDIMScheduler", "trained_betas": [0.1] * 1000})
    assert a == b and hash(a) == hash(b)
    traces = []
    noisy = jax.jit(lambda s, x: traces.append(1) or schedulers.add_noise(s, x, x, 10), static_argnums=0)
    noisy(a, jnp.ones(3))
    noisy(b, jnp.ones(3))
    assert len(traces) == 1


@pytest.mark.parametrize("config, key, value", [
    ({"_class_name": "EulerDiscreteScheduler"}, "_class_name", "EulerDiscreteScheduler"),
    ({}, "_class_name", "None"),
    ({"_class_name": "DDIMScheduler", "beta_schedule": "sigmoid"}, "beta_schedule", "sigmoid"),
    ({"_class_name": "DDIMScheduler", "timestep_spacing": "karras"}, "timestep_spacing", "karras"),
    ({"_class_name": "DDIMScheduler", "prediction_type": "flow_prediction"}, "prediction_type", "flow_prediction"),
    ({"_class_name": "DDPMScheduler", "variance_type": "learned"}, "variance_type", "learned"),
    ({"_class_name": "DPMSolverMultistepScheduler", "solver_order": 3}, "solver_order", "3"),
    ({"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver++"}, "algorithm_type",
     "sde-dpmsolver++"),
    ({"_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True}, "use_karras_sigmas", "True"),
    ({"_class_name": "DPMSolverMultistepScheduler", "final_sigmas_type": "max"}, "final_sigmas_type", "max"),
    ({"_class_name": "DPMSolverMultistepScheduler", "rescale_betas_zero_snr": True}, "rescale_betas_zero_snr",
     "True"),
])
def test_unsupported_config_is_refused(config, key, value):
    """An unknown class or unsupported option raises ValueError naming the key and the value."""
    with pytest.raises(ValueError, match=rf"'{key}'.*{value}"):
        schedulers.from_config(config)


def test_error_names_the_file(tmp_path):
    """A bad value read from a file is reported with the file's path."""
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps({"_class_name": "DDIMScheduler", "beta_schedule": "sigmoid"}))
    with pytest.raises(ValueError, match=rf"{path}.*'beta_schedule' = 'sigmoid'"):
        schedulers.from_config(tmp_path)


def test_learned_range_needs_variance_channels():
    """DDPM learned_range with a model output lacking the variance channels is refused, naming the
    channel counts."""
    scheduler = schedulers.from_config({"_class_name": "DDPMScheduler", "variance_type": "learned_range"})
    inputs = schedulers.step_inputs(scheduler, 10)
    x = jnp.zeros((1, 4, 4, 3))
    with pytest.raises(ValueError, match="6 channels"):
        schedulers.step(scheduler, x, x, schedulers.StepInputs(*(a[0] for a in inputs)), noise=x)
