"""Diffusion noise schedules and sampler updates (DDPM, DDIM, DPM-Solver++) as pure JAX functions.

A `Scheduler` is a frozen, hashable record of a diffusers scheduler config, meant to be a static
argument of `jax.jit`. Its schedule arrays (`betas`, `alphas_cumprod`) are float32 numpy arrays
equal bit for bit to the ones diffusers computes in torch. A sampling run is:

    inputs = step_inputs(scheduler, num_inference_steps)    # numpy, one row per step (static)
    state = init_state(scheduler, x)                         # multistep memory (DPM-Solver++)
    x, state = step(scheduler, model_output, x, inputs_i, state, noise_i)   # per step, traceable

`vmc_jax.sampling.sample_loop` runs exactly that under one `lax.scan`.

Arrays are channels last with the batch first: `x` is (batch, ..., channels). The one step
computation that reduces over the sample, dynamic thresholding's quantile, is taken per image,
over the trailing (height, width, channels) axes: an image batch (batch, h, w, c) per element,
a video (batch, frames, h, w, c) per frame. That is what the reference pipelines do: Show-1's
pixel stages and diffusers' video pipelines reshape the video to (batch * frames, c, h, w)
before `scheduler.step`, and IF's image stages step (batch, c, h, w). A model output
with twice the channels of `x` holds the prediction (epsilon, x0 or v) in its first half and the
learned-range variance value (in [-1, 1]) in its second half, as DeepFloyd IF / Show-1 predict.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

ALGORITHMS = ("ddpm", "ddim", "dpmsolver++")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")  # what the model's output is (see `training_target`)

# Values each setting may take; a config holding any other value is refused.
_ALLOWED: dict[str, tuple] = {
    "algorithm": ALGORITHMS,
    "beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
    "prediction_type": PREDICTION_TYPES,
    "timestep_spacing": ("leading", "trailing", "linspace"),
    "variance_type": ("fixed_small", "fixed_small_log", "fixed_large", "learned_range"),
    "solver_order": (1, 2),
    "solver_type": ("midpoint", "heun"),
}

# diffusers options implemented only at one value (their default, or DPM-Solver++ itself).
_FIXED_OPTIONS: dict[str, Any] = {
    "algorithm_type": "dpmsolver++",
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_lu_lambdas": False,
    "use_flow_sigmas": False,
    "use_dynamic_shifting": False,
    "lambda_min_clipped": -math.inf,
}

_COMMON_KEYS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "steps_offset": 0,
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "sample_max_value": 1.0,
}
_DDIM_KEYS = {"timestep_spacing": "leading", "clip_sample": True, "clip_sample_range": 1.0,
              "set_alpha_to_one": True, "eta": 0.0, "rescale_betas_zero_snr": False}
# _class_name -> (algorithm, the config keys it reads with diffusers' defaults). Other keys are
# ignored, as diffusers ignores them. A PNDM config is read the way `DDIMScheduler.from_config`
# reads it: the released VMC inverts with Stable Diffusion's PNDM config loaded into DDIM.
_CLASSES: dict[str, tuple[str, dict[str, Any]]] = {
    "DDPMScheduler": ("ddpm", {"timestep_spacing": "leading", "clip_sample": True, "clip_sample_range": 1.0,
                               "variance_type": "fixed_small", "rescale_betas_zero_snr": False}),
    "DDIMScheduler": ("ddim", _DDIM_KEYS),
    "PNDMScheduler": ("ddim", _DDIM_KEYS),
    "DPMSolverMultistepScheduler": ("dpmsolver++", {
        "timestep_spacing": "linspace", "solver_order": 2, "solver_type": "midpoint",
        "lower_order_final": True, "euler_at_final": False, "final_sigmas_type": "zero",
        "rescale_betas_zero_snr": False}),  # read to be refused: diffusers moves its last alpha_bar off 0
}
_FINAL_SIGMAS = {"zero": True, "sigma_min": False}  # final_sigmas_type -> set_alpha_to_one


def _unsupported(key: str, value: Any, allowed: tuple) -> ValueError:
    return ValueError(f"scheduler option {key!r} = {value!r} is not supported "
                      f"(supported: {', '.join(map(repr, allowed))})")


@dataclasses.dataclass(frozen=True)
class Scheduler:
    """Settings of one diffusers scheduler; hashable, so it can be a static jit argument.

    `set_alpha_to_one`: the cumulative alpha after the last step is 1 (otherwise
    `alphas_cumprod[0]`); DDIM's option of that name, DPM-Solver++'s `final_sigmas_type="zero"`.
    `eta` is DDIM's noise weight (a `step` argument in diffusers). Settings an algorithm does not
    use are ignored by it (DPM-Solver++ never clips, only thresholds, as in diffusers).
    """

    algorithm: str
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 0.0001
    beta_end: float = 0.02
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    set_alpha_to_one: bool = True
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    variance_type: str = "fixed_small"
    eta: float = 0.0
    solver_order: int = 2
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    rescale_betas_zero_snr: bool = False  # DDIM / DDPM: the betas rescaled so that the last timestep has no signal

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str = "scheduler config") -> "Scheduler":
        """Reads a diffusers scheduler config dict (see `from_config`); errors name ``source``."""
        try:
            return _from_dict(dict(raw))
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from err

    def __post_init__(self) -> None:
        for key, allowed in _ALLOWED.items():
            if getattr(self, key) not in allowed:
                raise _unsupported(key, getattr(self, key), allowed)
        if self.rescale_betas_zero_snr and self.algorithm == "dpmsolver++":
            raise _unsupported("rescale_betas_zero_snr", True, (False,))
        if self.trained_betas is not None and len(self.trained_betas) != self.num_train_timesteps:
            raise ValueError(f"scheduler option 'trained_betas' has {len(self.trained_betas)} values, "
                             f"'num_train_timesteps' is {self.num_train_timesteps}")

    @functools.cached_property
    def betas(self) -> np.ndarray:
        """The training noise schedule, float32, equal to diffusers' torch computation."""
        betas = self._named_betas()
        return _zero_terminal_snr(betas) if self.rescale_betas_zero_snr else betas

    def _named_betas(self) -> np.ndarray:
        if self.trained_betas is not None:
            return np.asarray(self.trained_betas, np.float32)
        if self.beta_schedule == "linear":
            return _torch_linspace_f32(self.beta_start, self.beta_end, self.num_train_timesteps)
        if self.beta_schedule == "scaled_linear":
            return _torch_linspace_f32(self.beta_start**0.5, self.beta_end**0.5, self.num_train_timesteps) ** 2
        # squaredcos_cap_v2: alpha_bar(s) = cos^2((s + 0.008) / 1.008 * pi / 2), in float64, beta <= 0.999.
        alpha_bar = np.cos((np.arange(self.num_train_timesteps + 1) / self.num_train_timesteps + 0.008)
                           / 1.008 * math.pi / 2) ** 2
        return np.minimum(1 - alpha_bar[1:] / alpha_bar[:-1], 0.999).astype(np.float32)

    @functools.cached_property
    def alphas_cumprod(self) -> np.ndarray:
        """Cumulative product of 1 - beta: float32 factors multiplied in float64, as torch.cumprod does."""
        return _cumprod_f32(1 - self.betas)

    @property
    def final_alpha_cumprod(self) -> np.float32:
        """The cumulative alpha a step lands on when it goes past the last timestep."""
        return np.float32(1.0) if self.set_alpha_to_one else self.alphas_cumprod[0]

    @property
    def needs_noise(self) -> bool:
        """Whether `step` adds fresh Gaussian noise (DDPM, DDIM with eta > 0)."""
        return self.algorithm == "ddpm" or (self.algorithm == "ddim" and self.eta > 0)


def _cumprod_f32(factors: np.ndarray) -> np.ndarray:
    """torch.cumprod of float32 factors: multiplied in float64, rounded once to float32."""
    return np.cumprod(factors.astype(np.float64)).astype(np.float32)


def _zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Betas whose sqrt(alpha_bar) is shifted to end at 0 and scaled to keep its first value (Lin et al.,
    "Common Diffusion Noise Schedules and Sample Steps are Flawed", 2024), in float32 as diffusers does:
    the last timestep is pure noise, so a model sampled from noise is trained on what it starts from."""
    root = np.sqrt(_cumprod_f32(np.float32(1) - betas))
    first, last = root[0], root[-1]
    alpha_bar = ((root - last) * (first / (first - last))) ** 2
    return (np.float32(1) - np.concatenate([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])).astype(np.float32)


def _torch_linspace_f32(start: float, end: float, num: int) -> np.ndarray:
    """torch.linspace(start, end, num, dtype=float32) bit for bit.

    torch takes a float32 step and rounds start + step * i (first half) or end - step * (num-1-i)
    (second half) once; the float64 product of a float32 step and i < 2**29 is exact.
    """
    first, last = np.float32(start), np.float32(end)
    step = np.float64((last - first) / np.float32(num - 1))
    i = np.arange(num)
    values = np.where(i < num // 2, np.float64(first) + step * i, np.float64(last) - step * (num - 1 - i))
    return values.astype(np.float32)


def from_config(config: dict[str, Any] | str | os.PathLike, **overrides: Any) -> Scheduler:
    """Build a Scheduler from a diffusers scheduler config (a dict, a `scheduler_config.json`, its
    folder, or a pipeline folder with a `scheduler/` subfolder); `overrides` replace config keys
    (e.g. `eta=1.0`, `timestep_spacing="trailing"`).

    `_class_name` picks the algorithm (DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler;
    PNDMScheduler is read as DDIM). Unknown classes and unsupported option values raise ValueError
    naming the key and the value (and the file, when read from one).
    """
    source = "scheduler config"
    if not isinstance(config, dict):
        source = _config_file(os.fspath(config))
        with open(source, encoding="utf-8") as f:
            config = json.load(f)
    return Scheduler.from_dict({**config, **overrides}, source)


def _config_file(path: str) -> str:
    for candidate in (path, os.path.join(path, "scheduler_config.json"),
                      os.path.join(path, "scheduler", "scheduler_config.json")):
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(f"no scheduler_config.json at {path!r}")


def _from_dict(config: dict[str, Any]) -> Scheduler:
    name = config.get("_class_name")
    if name not in _CLASSES:
        raise _unsupported("_class_name", name, tuple(_CLASSES))
    for key, value in _FIXED_OPTIONS.items():
        if config.get(key, value) != value:
            raise _unsupported(key, config[key], (value,))
    algorithm, class_keys = _CLASSES[name]
    settings = {**_COMMON_KEYS, **class_keys}
    settings.update((key, config[key]) for key in settings if key in config)
    if algorithm == "dpmsolver++":
        final = settings.pop("final_sigmas_type")
        if final not in _FINAL_SIGMAS:
            raise _unsupported("final_sigmas_type", final, tuple(_FINAL_SIGMAS))
        settings["set_alpha_to_one"] = _FINAL_SIGMAS[final]
    if settings["trained_betas"] is not None:
        settings["trained_betas"] = tuple(float(b) for b in settings["trained_betas"])
    return Scheduler(algorithm, **settings)


def timesteps(scheduler: Scheduler, num_inference_steps: int) -> np.ndarray:
    """The model timesteps of a sampling run, descending, as diffusers' `set_timesteps` makes them."""
    total = scheduler.num_train_timesteps
    if not 1 <= num_inference_steps <= total:
        raise ValueError(f"num_inference_steps = {num_inference_steps} must be in [1, {total}]")
    # DPM-Solver++ spaces one point more and drops the last (t = 0) for "linspace" and "leading".
    num = num_inference_steps + (scheduler.algorithm == "dpmsolver++")
    if scheduler.timestep_spacing == "linspace":
        steps = np.linspace(0, total - 1, num).round()[::-1][:num_inference_steps]
    elif scheduler.timestep_spacing == "leading":
        steps = (np.arange(num) * (total // num))[::-1][:num_inference_steps] + scheduler.steps_offset
    else:
        steps = np.round(np.arange(total, 0, -total / num_inference_steps)) - 1
    return steps.astype(np.int32)


class StepInputs(NamedTuple):
    """Per-step inputs of a sampling run; as numpy arrays stacked over steps, the xs of a scan."""

    t: Any  # model timestep (int32)
    prev_t: Any  # timestep the update lands on; -1: past the end (`final_alpha_cumprod`)
    second_order: Any  # bool: DPM-Solver++ takes its second-order update


def step_inputs(scheduler: Scheduler, num_inference_steps: int, first_step: int = 0) -> StepInputs:
    """Timesteps, landing timesteps and DPM-Solver++ orders of a run (numpy, static per step count).

    ``first_step`` starts the run later (an img2img strength skips the first steps, as diffusers'
    ``get_timesteps`` does); the first step taken is first order, with no earlier step to use.
    """
    t = timesteps(scheduler, num_inference_steps)
    if scheduler.algorithm == "ddim":  # diffusers' DDIM steps back a fixed stride, whatever the spacing
        prev_t = t - scheduler.num_train_timesteps // num_inference_steps
    else:  # the run's next timestep (current diffusers; 0.19.3's DDPM used the DDIM stride, same for "leading")
        prev_t = np.append(t[1:], -1)
    index = np.arange(len(t))
    first_order_final = scheduler.set_alpha_to_one or scheduler.euler_at_final or (
        scheduler.lower_order_final and len(t) < 15)
    second_order = ((scheduler.algorithm == "dpmsolver++") & (scheduler.solver_order == 2) & (index > first_step)
                    & ~((index == len(t) - 1) & first_order_final))
    return StepInputs(t[first_step:], np.maximum(prev_t, -1).astype(np.int32)[first_step:], second_order[first_step:])


class MultistepState(NamedTuple):
    """DPM-Solver++'s memory: the previous step's data prediction and its timestep."""

    prev_x0: jax.Array
    prev_t: jax.Array


def init_state(scheduler: Scheduler, x: jax.Array) -> MultistepState | tuple:
    """The carry `step` starts from: empty for one-step algorithms."""
    if scheduler.algorithm == "dpmsolver++":
        return MultistepState(jnp.zeros_like(x, jnp.float32), jnp.zeros((), jnp.int32))
    return ()


def alpha_cumprod_at(scheduler: Scheduler, t: jax.Array | int) -> jax.Array:
    """alphas_cumprod[t], and `final_alpha_cumprod` where t < 0 (a step past the end)."""
    t = jnp.asarray(t)
    return jnp.where(t >= 0, jnp.asarray(scheduler.alphas_cumprod)[jnp.maximum(t, 0)],
                     scheduler.final_alpha_cumprod)


def _alpha_cumprod_like(scheduler: Scheduler, t: jax.Array | int, x: jax.Array) -> jax.Array:
    """alphas_cumprod at ``t`` (scalar or per batch item) shaped to broadcast against ``x``."""
    a = alpha_cumprod_at(scheduler, t)
    return a.reshape(a.shape + (1,) * (x.ndim - a.ndim))


def add_noise(scheduler: Scheduler, x0: jax.Array, noise: jax.Array, t: jax.Array | int) -> jax.Array:
    """Forward diffusion q(x_t | x_0): sqrt(acp[t]) x0 + sqrt(1 - acp[t]) noise; t scalar or per batch."""
    a = _alpha_cumprod_like(scheduler, t, x0)
    return jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * noise


def training_target(scheduler: Scheduler, x0: jax.Array, noise: jax.Array, t: jax.Array | int) -> jax.Array:
    """What the model learns to predict at x_t = `add_noise(x0, noise, t)`: the noise, the clean sample,
    or the velocity sqrt(acp[t]) noise - sqrt(1 - acp[t]) x0 (as the scheduler's ``prediction_type``)."""
    if scheduler.prediction_type == "epsilon":
        return noise
    if scheduler.prediction_type == "sample":
        return x0
    a = _alpha_cumprod_like(scheduler, t, x0)
    return jnp.sqrt(a) * noise - jnp.sqrt(1 - a) * x0


def predicted_noise(scheduler: Scheduler, prediction: jax.Array, x: jax.Array, t: jax.Array | int) -> jax.Array:
    """The noise in ``x`` (at timestep ``t``, scalar or per batch item) that the model's ``prediction`` implies."""
    if scheduler.prediction_type == "epsilon":
        return prediction
    return _x0_and_eps(scheduler, prediction, x, _alpha_cumprod_like(scheduler, t, x))[1]


def predicted_sample(scheduler: Scheduler, prediction: jax.Array, x: jax.Array, t: jax.Array | int) -> jax.Array:
    """The clean sample x0 that the model's ``prediction`` at ``x`` (timestep ``t``, scalar or per batch
    item) implies, unclipped."""
    return _x0_and_eps(scheduler, prediction, x, _alpha_cumprod_like(scheduler, t, x))[0]


def step(
    scheduler: Scheduler,
    model_output: jax.Array,
    x: jax.Array,
    inputs: StepInputs,
    state: MultistepState | tuple = (),
    noise: jax.Array | None = None,
) -> tuple[jax.Array, MultistepState | tuple]:
    """One sampler update x_t -> x_prev (float32), as the diffusers scheduler's `step` computes it.

    inputs: one row of `step_inputs` (scalars). state: from `init_state` or the previous step.
    noise: standard normal like `x`, required when `scheduler.needs_noise`.
    """
    if scheduler.needs_noise and noise is None:
        raise ValueError(f"the {scheduler.algorithm} update adds noise: pass `noise`")
    channels = x.shape[-1]
    model_output = model_output.astype(jnp.float32)
    prediction, variance_value = model_output[..., :channels], model_output[..., channels:]
    a_t = alpha_cumprod_at(scheduler, inputs.t)
    a_prev = alpha_cumprod_at(scheduler, inputs.prev_t)
    x0, eps = _x0_and_eps(scheduler, prediction, x, a_t)
    x0 = _clip_x0(scheduler, x0)

    if scheduler.algorithm == "ddim":
        std = scheduler.eta * jnp.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
        x_prev = jnp.sqrt(a_prev) * x0 + jnp.sqrt(1 - a_prev - std**2) * eps
        return (x_prev + std * noise if scheduler.eta > 0 else x_prev), state
    if scheduler.algorithm == "ddpm":
        alpha_t = a_t / a_prev
        mean = (jnp.sqrt(a_prev) * (1 - alpha_t) / (1 - a_t)) * x0 + (jnp.sqrt(alpha_t) * (1 - a_prev) / (1 - a_t)) * x
        std = _ddpm_std(scheduler, a_t, a_prev, variance_value, channels)
        return mean + jnp.where(inputs.t > 0, std, 0.0) * noise, state
    return _dpm_solver_update(scheduler, x, x0, a_t, a_prev, inputs, state), MultistepState(x0, inputs.t)


def _x0_and_eps(scheduler: Scheduler, prediction: jax.Array, x: jax.Array, a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Data and noise predictions from the model's epsilon, x0 or v prediction."""
    sqrt_a, sqrt_b = jnp.sqrt(a), jnp.sqrt(1 - a)
    if scheduler.prediction_type == "epsilon":
        return (x - sqrt_b * prediction) / sqrt_a, prediction
    if scheduler.prediction_type == "sample":
        return prediction, (x - sqrt_a * prediction) / sqrt_b
    return sqrt_a * x - sqrt_b * prediction, sqrt_a * prediction + sqrt_b * x


def _clip_x0(scheduler: Scheduler, x0: jax.Array) -> jax.Array:
    """Imagen's dynamic thresholding per image (see the module docstring), else plain clipping, if configured."""
    if scheduler.thresholding:
        if x0.ndim < 4:
            raise ValueError(f"dynamic thresholding needs images (batch, ..., height, width, channels), "
                             f"got a sample of shape {x0.shape}")
        images = jnp.abs(x0.reshape(*x0.shape[:-3], -1))
        s = jnp.quantile(images, scheduler.dynamic_thresholding_ratio, axis=-1, keepdims=True)
        s = jnp.clip(s, 1.0, scheduler.sample_max_value)[..., None, None]
        return jnp.clip(x0, -s, s) / s
    if scheduler.clip_sample and scheduler.algorithm != "dpmsolver++":
        return jnp.clip(x0, -scheduler.clip_sample_range, scheduler.clip_sample_range)
    return x0


def _ddpm_std(scheduler: Scheduler, a_t: jax.Array, a_prev: jax.Array, variance_value: jax.Array,
              channels: int) -> jax.Array:
    """Standard deviation of the DDPM posterior for the configured variance type."""
    beta = 1 - a_t / a_prev
    posterior_variance = jnp.maximum((1 - a_prev) / (1 - a_t) * beta, 1e-20)
    if scheduler.variance_type == "fixed_large":
        return jnp.sqrt(beta)
    if scheduler.variance_type != "learned_range":  # fixed_small, fixed_small_log
        return jnp.sqrt(posterior_variance)
    if variance_value.shape[-1] != channels:
        raise ValueError(f"variance_type 'learned_range' needs a model output of {2 * channels} channels "
                         f"(prediction, variance value), got {channels + variance_value.shape[-1]}")
    frac = (variance_value + 1) / 2
    return jnp.exp(0.5 * (frac * jnp.log(beta) + (1 - frac) * jnp.log(posterior_variance)))


def _dpm_solver_update(scheduler: Scheduler, x: jax.Array, x0: jax.Array, a_t: jax.Array, a_next: jax.Array,
                       inputs: StepInputs, state: MultistepState) -> jax.Array:
    """Multistep DPM-Solver++ (data prediction) of order 1, or 2 where `inputs.second_order`."""
    def log_snr(a):  # lambda = log(alpha / sigma); +inf where a = 1
        return jnp.log(jnp.sqrt(a)) - jnp.log(jnp.sqrt(1 - a))

    alpha_next = jnp.sqrt(a_next)
    h = log_snr(a_next) - log_snr(a_t)
    expm1 = jnp.exp(-h) - 1
    x_next = (jnp.sqrt(1 - a_next) / jnp.sqrt(1 - a_t)) * x - (alpha_next * expm1) * x0
    # Second order: a correction along D1 = (x0 - prev_x0) / r, r = (previous step size) / h.
    r = (log_snr(a_t) - log_snr(alpha_cumprod_at(scheduler, state.prev_t))) / h
    if scheduler.solver_type == "midpoint":
        coefficient = -0.5 * alpha_next * expm1 / r
    else:
        coefficient = alpha_next * (expm1 / h + 1) / r
    return x_next + jnp.where(inputs.second_order, coefficient, 0.0) * (x0 - state.prev_x0)
