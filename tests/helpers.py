"""Shared test helpers and constants (fixtures and hooks are in conftest.py): the repository's
paths, the bundled Show-1 fixtures and their tolerances, and the tiny job config.

`tests` is on pytest's python path (setup.cfg), so every folder imports them as ``from helpers import ...``.
"""

import os
import socket

import jax
import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures")
SHOW1_FIXTURES = ("show1_keyframes", "show1_interpolation", "show1_sr", "show1_crossattn")
CLIP = os.path.join(REPO, "configs", "assets", "moving_square.gif")
FAST_COMPILE_ENV = {"JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}  # fast_compile for a subprocess

# The Show-1 UNet against its fixtures: output max abs error, gradient error relative to the
# gradient's largest element (measured values in parity/test_unet.py).
OUTPUT_ATOL = 1e-4
GRAD_RTOL = 1e-4


def channels_last(x: np.ndarray) -> jnp.ndarray:
    """PyTorch (b, c, ...) -> (b, ..., c)."""
    return jnp.asarray(np.moveaxis(x, 1, -1))


def fixture_inputs(io) -> tuple:
    """A Show-1 fixture's UNet inputs: (sample, timesteps, encoder_hidden_states, class_labels or None)."""
    labels = jnp.asarray(io["class_labels"]) if "class_labels" in io.files else None
    return (channels_last(io["sample"]), jnp.asarray(io["timesteps"]),
            jnp.asarray(io["encoder_hidden_states"]), labels)


def load_fixture(name: str) -> tuple:
    """(model, fp32 params, io.npz, folder) of the Show-1 fixture ``name``."""
    import vmc_jax

    folder = os.path.join(FIXTURES, name)
    model, params = vmc_jax.load_unet(os.path.join(folder, "unet"), dtype=np.float32)
    return model, params, np.load(os.path.join(folder, "io.npz")), folder


def output_and_tuned_grads(model, params, io):
    """The output and the gradient of sum(out * grad_proj) w.r.t. the tuned params, in one program."""
    from vmc_jax.training import merge_params, split_params

    tuned, frozen = split_params(params)

    def run(tuned, inputs, proj):
        out, pullback = jax.vjp(lambda t: model.apply({"params": merge_params(t, frozen)}, *inputs), tuned)
        return out, pullback(proj)[0]

    return jax.jit(run)(tuned, fixture_inputs(io), channels_last(io["grad_proj"]))


def uncached(env: dict[str, str]) -> dict[str, str]:
    """``env`` without the session's compilation cache (conftest.py), for the processes of a
    multi-process job: a 2-process resume from cached executables failed to set up its gloo
    collectives ("Gloo context initialization failed"), a fresh compile did not."""
    return {key: value for key, value in env.items() if key != "JAX_COMPILATION_CACHE_DIR"}


def free_port() -> int:
    """A localhost port free now: a multi-process job's coordinator."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def tiny_config(pretrained: str, steps: int = 4):
    """The "tiny" job config on a 4-frame 16x32 clip without validation samples: seconds per run."""
    from configs import vmc as vmc_config

    config = vmc_config.get_config("tiny")
    config.pretrained = pretrained
    config.video = CLIP
    config.data.num_frames, config.data.height, config.data.width = 4, 16, 32
    config.train.steps = steps
    config.validation.every = 0
    return config
