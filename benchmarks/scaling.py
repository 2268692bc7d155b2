"""VMC train steps per second on 1, 2 and 4 devices of this host, a batch of 4 split over the mesh's
"data" axis: how the one sharding model scales here.

Each device count runs in its own process with that many host devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=N``). The step is the job's
(`training.make_train_step` under `jit` over `parallel.make_mesh`), on the keyframe fixture UNet
at 8x40x64 (``--model`` for another), compiled before timing; each run times ``--steps`` steps.

    python benchmarks/scaling.py [--counts 1,2,4] [--batch 4] [--json out.json]

On a CPU, N devices share the host's cores: XLA's CPU client runs each device's program on the
same thread pool, so more devices buy no more cores; the figure shows the overhead (or gain) of
splitting the same work, not what N accelerators would do.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from unet_forward import DEFAULT_MODEL, REPO, read_config  # noqa: E402


def worker(args: argparse.Namespace) -> None:
    """Runs in a process with ``args.count`` devices: prints one JSON line of steps per second."""
    import jax

    sys.path.insert(0, REPO)
    from vmc_jax import parallel, schedulers, training
    from vmc_jax.hub.unet_loading import load_unet
    mesh = parallel.make_mesh({"clips": 1, "data": -1})
    model, params = load_unet(args.model, dtype=np.float32)
    scheduler = schedulers.from_config({"_class_name": "DDPMScheduler"})
    tuned, frozen = training.split_params(params)
    optimizer = training.make_optimizer(1e-4)
    step = training.make_train_step(model, scheduler, optimizer, "paper")
    rng = np.random.default_rng(0)
    config = read_config(args.model)
    clip = rng.uniform(-1, 1, (args.frames, args.height, args.width, config["in_channels"])).astype(np.float32)
    clips = parallel.global_batch(mesh, np.repeat(clip[None], args.batch, axis=0), "data")
    text_dim = config.get("encoder_hid_dim") or config["cross_attention_dim"]
    text = parallel.put_global(mesh, rng.standard_normal((1, 77, text_dim)).astype(np.float32))
    frozen = parallel.put_global(mesh, frozen)
    state = jax.jit(lambda t: training.TrainState.create(t, optimizer, jax.random.PRNGKey(0)),
                    out_shardings=parallel.replicated(mesh))(parallel.put_global(mesh, tuned))
    state, metrics = step(state, frozen, clips, text)  # compiles
    jax.block_until_ready(metrics)
    rates = []
    for _ in range(args.runs):
        start = time.perf_counter()
        for _ in range(args.steps):
            state, metrics = step(state, frozen, clips, text)
        jax.block_until_ready(metrics)
        rates.append(args.steps / (time.perf_counter() - start))
    print(json.dumps({"devices": len(mesh.devices.flat), "steps_per_s": rates}), flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--counts", default="1,2,4", help="device counts to compare")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--height", type=int, default=40)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5, help="steps per timed run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.model = os.path.abspath(args.model)
    if args.worker:
        worker(args)
        return
    results = []
    print(f"{args.model}: batch {args.batch} of {args.frames}x{args.height}x{args.width}; {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")
    for count in (int(n) for n in args.counts.split(",")):
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={count}"}
        command = [sys.executable, os.path.abspath(__file__), "--worker", *(argv or sys.argv[1:])]
        out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
        result = json.loads(out.strip().splitlines()[-1])
        results.append(result)
        rates = result["steps_per_s"]
        print(f"{result['devices']} device(s): {statistics.median(rates):.3f} steps/s "
              f"(runs: {' '.join(f'{r:.3f}' for r in rates)})", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
