"""Seconds and achieved TFLOP/s of our four cases on an accelerator (GPU / TPU), fp32 and bf16.

The cases are ``vs_reference.py``'s (UNet forward batch 2, VMC train step batch 1, one DDIM
inversion step, one guided sampling step), compiled once per dtype; each figure is the median
of ``--repeats`` calls after a warm-up, for each of ``--runs`` runs. FLOPs are XLA's own count
of the compiled program (``compiled.cost_analysis()["flops"]``), so TFLOP/s = that / seconds.
fp32 keeps fp32 weights and compute (XLA's default matmul precision: TF32 on NVIDIA GPUs);
bf16 computes in bfloat16 with fp32 weights, as ``--config.model.dtype=bfloat16`` trains.

    python benchmarks/accelerator.py [--model UNET_FOLDER] [--widths 320,640,1280,1280] [--json out.json]

``--widths`` benchmarks a random-weight UNet of the model's architecture at those channel widths
(e.g. Show-1 base's 320/640/1280/1280, with its head size of 64) instead of the model's own, to see the chip at a load
that can fill it. There is no reference side here: the PyTorch comparison is ``vs_reference.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from unet_forward import DEFAULT_MODEL, REPO, read_config  # noqa: E402
from vs_reference import CASES, flax_cases, make_inputs, timed  # noqa: E402

DTYPES = ("float32", "bfloat16")


def write_wide_unet(model: str, widths: list[int], folder: str) -> str:
    """A random-weight copy of ``model``'s UNet config with ``widths`` as its block channels."""
    sys.path.insert(0, REPO)
    from vmc_jax.hub.tiny_pipeline import write_random_model
    from vmc_jax.hub.unet_loading import build_unet

    config = read_config(model)
    if len(widths) != len(config["block_out_channels"]):
        raise SystemExit(f"--widths {widths}: the model has {len(config['block_out_channels'])} levels")
    config = {**config, "block_out_channels": widths, "cross_attention_dim": widths[-1], "attention_head_dim": 64}
    write_random_model(folder, config, build_unet(config), "diffusion_pytorch_model.safetensors", seed=0)
    return folder


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="hub-style UNet folder (config.json + weights)")
    parser.add_argument("--widths", help="comma-separated block widths of a random-weight UNet of this architecture")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--height", type=int, default=40)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--seq", type=int, default=77)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--attention-impl", default="auto")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp

    with tempfile.TemporaryDirectory() as tmp:
        model = os.path.abspath(args.model)
        if args.widths:
            model = write_wide_unet(model, [int(w) for w in args.widths.split(",")], os.path.join(tmp, "unet"))
        io = make_inputs(read_config(model), args.frames, args.height, args.width, args.seq, seed=0)
        device = jax.devices()[0]
        print(f"{args.model}{' at widths ' + args.widths if args.widths else ''}: {args.frames} frames "
              f"{args.height}x{args.width}, text {args.seq}; jax {jax.__version__} on {device.device_kind} "
              f"({jax.default_backend()}), {args.attention_impl} attention", flush=True)
        print(f"{'dtype':9} {'case':8} {'compile s':>9} {'s per run':>24} {'GFLOP':>9} {'TFLOP/s (median)':>17}")
        results = {}
        for dtype in args.dtypes.split(","):
            start = time.perf_counter()
            cases = flax_cases(model, io, args.attention_impl, compute_dtype=jnp.dtype(dtype))
            compile_s = time.perf_counter() - start
            for case in args.cases.split(","):
                flops = float(cases["_compiled"][case].cost_analysis().get("flops", float("nan")))
                seconds = [timed(cases[case], args.repeats)[0] for _ in range(args.runs)]
                tflops = flops / statistics.median(seconds) / 1e12
                results[f"{dtype}/{case}"] = {"seconds": seconds, "flops": flops, "tflop_per_s": tflops,
                                              "compile_s_all_cases": compile_s}
                print(f"{dtype:9} {case:8} {compile_s:9.1f} {' '.join(f'{s * 1e3:7.2f}ms' for s in seconds):>24} "
                      f"{flops / 1e9:9.2f} {tflops:17.2f}", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), "device": device.device_kind, "jax": jax.__version__,
                       "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
