"""Seconds per VMC train step of a Show-1 UNet, fp32 and bf16 compute, and its memory.

A train step is the whole jitted update (noise, forward in train mode, the motion-distillation
loss, gradients of the tuned temporal-attention subset only, clipping, AdamW). Memory is XLA's
own account of the compiled step (arguments, outputs, temporaries), which on a GPU or TPU is
what the device must hold; on the CPU it is the peak of the step's buffers.

    python benchmarks/train_step.py --model tests/fixtures/show1_keyframes/unet --frames 8 \\
        --height 40 --width 64 [--remat] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from vmc_jax import schedulers, training
from vmc_jax.hub.unet_loading import load_unet


def measure(model, params, compute_dtype, clips, text, repeats: int) -> dict:
    """Compile and time one configuration of the train step."""
    model = model.clone(dtype=compute_dtype)
    scheduler = schedulers.from_config({"_class_name": "DDPMScheduler"})
    tuned, frozen = training.split_params(params)
    optimizer = training.make_optimizer(1e-4)
    step = training.make_train_step(model, scheduler, optimizer, "paper")
    state = training.TrainState.create(tuned, optimizer, jax.random.PRNGKey(0))
    start = time.perf_counter()
    compiled = step.lower(state, frozen, clips, text).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    times = []
    for _ in range(repeats + 1):  # the first call is a warm-up
        start = time.perf_counter()
        state, metrics = compiled(state, frozen, clips, text)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    total = memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
    return {"compile_s": compile_s, "step_s": statistics.median(times[1:]),
            "memory_mib": total / 2**20, "temp_mib": memory.temp_size_in_bytes / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tests/fixtures/show1_keyframes/unet")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--height", type=int, default=40)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--remat", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args()

    model, params = load_unet(args.model, dtype=np.float32, remat=args.remat)
    c = model.config
    clips = jax.random.uniform(jax.random.PRNGKey(1), (args.batch, args.frames, args.height, args.width,
                                                        c.in_channels), minval=-1, maxval=1)
    text = jax.random.normal(jax.random.PRNGKey(2), (1, 77, c.encoder_hid_dim or c.cross_attention_dim[0]))
    results = {name: measure(model, params, dtype, clips, text, args.repeats)
               for name, dtype in (("fp32", jnp.float32), ("bf16", jnp.bfloat16))}
    print(f"device: {jax.devices()[0].device_kind}; input {tuple(clips.shape)}; remat={args.remat}")
    print(f"{'compute':8} {'compile s':>10} {'step s':>8} {'memory MiB':>11} {'temp MiB':>9}")
    for name, r in results.items():
        print(f"{name:8} {r['compile_s']:10.1f} {r['step_s']:8.3f} {r['memory_mib']:11.1f} {r['temp_mib']:9.1f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), "device": jax.devices()[0].device_kind, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
