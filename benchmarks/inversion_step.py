"""One DDIM inversion step inside the compiled loop (``ddim_invert``: one ``lax.scan``) against
a Python loop of jitted single steps, on the same UNet and inputs.

    python benchmarks/inversion_step.py --model tests/fixtures/show1_keyframes/unet --steps 10 \\
        --frames 8 --height 40 --width 64
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from vmc_jax import keyframe_sampling, schedulers
from vmc_jax.hub.unet_loading import load_unet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tests/fixtures/show1_keyframes/unet")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--height", type=int, default=40)
    parser.add_argument("--width", type=int, default=64)
    args = parser.parse_args()

    model, params = load_unet(args.model, dtype=np.float32)
    c = model.config
    x0 = jax.random.uniform(jax.random.PRNGKey(0), (1, args.frames, args.height, args.width, c.in_channels),
                            minval=-1, maxval=1)
    text = jax.random.normal(jax.random.PRNGKey(1), (1, 77, c.encoder_hid_dim or c.cross_attention_dim[0]))
    scheduler = schedulers.from_config(keyframe_sampling.RELEASED_INVERSION_SCHEDULER)

    jax.block_until_ready(keyframe_sampling.ddim_invert(model, params, x0, text, scheduler, args.steps))  # compile
    start = time.perf_counter()
    looped = jax.block_until_ready(keyframe_sampling.ddim_invert(model, params, x0, text, scheduler, args.steps))
    scan_step = (time.perf_counter() - start) / args.steps

    @jax.jit
    def one_step(x, t, a_cur, a_next):
        eps = model.apply({"params": params}, x, jnp.full((1,), t), text)[..., : x.shape[-1]]
        return keyframe_sampling.inversion_update(x, eps, a_cur, a_next)

    schedule = keyframe_sampling.inversion_schedule(scheduler, args.steps, "model")
    jax.block_until_ready(one_step(x0, *(s[0] for s in schedule)))  # compile
    start = time.perf_counter()
    x = x0
    for t, a_cur, a_next in zip(*schedule):
        x = one_step(x, t, a_cur, a_next)
    jax.block_until_ready(x)
    python_step = (time.perf_counter() - start) / args.steps
    print(f"device {jax.devices()[0].device_kind}, input {tuple(x0.shape)}, {args.steps} steps")
    print(f"compiled scan: {scan_step:.3f} s/step; python loop of jitted steps: {python_step:.3f} s/step; "
          f"ratio {python_step / scan_step:.2f}; trajectories differ by {float(jnp.abs(x - looped).max()):.2e}")


if __name__ == "__main__":
    main()
