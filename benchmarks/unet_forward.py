"""Forward-pass timing of the Flax Show-1 UNet against the PyTorch reference, side by side.

One run times, on identical weights and inputs:

  * flax fp32   the Flax UNet, jitted, fp32 params and compute;
  * flax bf16   the same params (fp32) with bf16 compute (``model.clone(dtype=bfloat16)``);
  * torch fp32  Show-1's own ``UNet3DConditionModel`` (diffusers 0.19.3), eval mode,
                ``torch.no_grad()``, fp32 (only with ``--reference-python`` and ``--show1-src``).

and reports the jit compile time, the per-call time (median of ``--repeats`` calls after
``--warmup`` calls, each waited for with ``block_until_ready``), the Flax / PyTorch time ratio,
and how far each Flax output is from the PyTorch one.

Design: the reference needs diffusers 0.19.3 (what Show-1 was written against), which cannot
share an environment with the project's newer diffusers / transformers. So this script runs in
the project's environment and, for the PyTorch side, starts itself again under the reference
environment's interpreter (``--reference-python``, e.g. a venv with torch, diffusers==0.19.3,
huggingface_hub<0.26, numpy, safetensors) in a worker mode that imports only numpy, torch and
Show-1 (from ``--show1-src``, a checkout of the Show-1 repository; nothing of it is copied
here). The two sides exchange the inputs and the output through an ``.npz`` file in a temporary
folder, and run one after the other, so they never compete for the CPU cores.

Weights: a hub-style model folder (``config.json`` + ``diffusion_pytorch_model[.fp16].safetensors``),
by default the small keyframe-model fixture of the tests; the Flax side loads it with
``vmc_jax.load_unet`` (fp16 weights upcast to fp32), the reference builds the model from the
config and loads the same tensors upcast to fp32.

Example (CPU)::

    python benchmarks/unet_forward.py --reference-python /work/refenv/bin/python \\
        --show1-src /path/to/Show-1 --batch 2 --frames 8 --height 40 --width 64 --json out.json

Timings on shared machines vary: compare the ratios of one run, not absolute seconds across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MODEL = os.path.join(REPO, "tests", "fixtures", "show1_keyframes", "unet")
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")


def read_config(folder: str) -> dict:
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        return json.load(f)


def make_inputs(config: dict, batch: int, frames: int, height: int, width: int, seq: int,
                seed: int) -> dict[str, np.ndarray]:
    """Random inputs in the PyTorch layout: sample (b, c, f, h, w), timesteps, text states [, labels]."""
    rng = np.random.default_rng(seed)
    text_dim = config.get("encoder_hid_dim") or config.get("cross_attention_dim")
    text_dim = text_dim[0] if isinstance(text_dim, (list, tuple)) else text_dim
    io = {
        "sample": rng.standard_normal((batch, config["in_channels"], frames, height, width)).astype(np.float32),
        "timesteps": rng.integers(0, 1000, size=(batch,)).astype(np.int64),
        "encoder_hidden_states": rng.standard_normal((batch, seq, text_dim)).astype(np.float32),
    }
    if config.get("class_embed_type") == "timestep":
        io["class_labels"] = rng.integers(0, 1000, size=(batch,)).astype(np.int64)
    elif config.get("num_class_embeds"):
        io["class_labels"] = rng.integers(0, config["num_class_embeds"], size=(batch,)).astype(np.int64)
    return io


def time_calls(call, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


# ----------------------------------------------------------------------------- Flax side

def run_flax(folder: str, io: dict[str, np.ndarray], warmup: int, repeats: int) -> dict[str, dict]:
    import jax
    import jax.numpy as jnp

    sys.path.insert(0, REPO)
    import vmc_jax
    model32, params = vmc_jax.load_unet(folder, dtype=np.float32)
    params = jax.device_put(params)
    labels = jnp.asarray(io["class_labels"]) if "class_labels" in io else None
    inputs = (jnp.asarray(np.transpose(io["sample"], (0, 2, 3, 4, 1))), jnp.asarray(io["timesteps"]),
              jnp.asarray(io["encoder_hidden_states"]))
    results = {}
    for label, model in (("flax fp32", model32), ("flax bf16", model32.clone(dtype=jnp.bfloat16))):
        def forward(p, sample, t, text, labels, model=model):
            return model.apply({"params": p}, sample, t, text, labels).astype(jnp.float32)

        start = time.perf_counter()
        compiled = jax.jit(forward).lower(params, *inputs, labels).compile()
        compile_s = time.perf_counter() - start
        out = compiled(params, *inputs, labels)
        out.block_until_ready()
        times = time_calls(lambda: compiled(params, *inputs, labels).block_until_ready(), warmup, repeats)
        results[label] = dict(
            compile_s=compile_s, times_s=times,
            out=np.transpose(np.asarray(out), (0, 4, 1, 2, 3)),  # back to (b, c, f, h, w)
        )
    return results


# ----------------------------------------------------------------------------- PyTorch side

def torch_worker(args: argparse.Namespace) -> None:
    """Runs under the reference interpreter: times Show-1's UNet on the inputs in ``--io``."""
    sys.path.insert(0, os.path.abspath(args.show1_src))
    import safetensors.torch
    import torch
    from showone.models.unet_3d_condition import UNet3DConditionModel

    folder = args.model
    model = UNet3DConditionModel.from_config(read_config(folder))
    weights = next((os.path.join(folder, n) for n in WEIGHT_NAMES if os.path.isfile(os.path.join(folder, n))), None)
    if weights is None:
        raise SystemExit(f"no weights in {folder!r}: looked for {', '.join(WEIGHT_NAMES)}")
    model.load_state_dict({k: v.float() for k, v in safetensors.torch.load_file(weights).items()}, strict=True)
    model.float().eval()

    io = dict(np.load(args.io))
    inputs = [torch.from_numpy(io["sample"]), torch.from_numpy(io["timesteps"]),
              torch.from_numpy(io["encoder_hidden_states"])]
    kwargs = {"class_labels": torch.from_numpy(io["class_labels"])} if "class_labels" in io else {}

    with torch.no_grad():
        def call():
            return model(*inputs, return_dict=False, **kwargs)[0]

        start = time.perf_counter()
        out = call()  # the first call: what torch has instead of a compile step
        first_s = time.perf_counter() - start
        times = time_calls(call, args.warmup, args.repeats)
    np.savez(args.result, out=out.numpy(), times_s=np.asarray(times), first_s=first_s,
             threads=torch.get_num_threads(), torch_version=torch.__version__)


def run_torch(args: argparse.Namespace, io: dict[str, np.ndarray]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        io_path, result_path = os.path.join(tmp, "io.npz"), os.path.join(tmp, "result.npz")
        np.savez(io_path, **io)
        command = [args.reference_python, os.path.abspath(__file__), "--torch-worker",
                   "--show1-src", args.show1_src, "--model", args.model, "--io", io_path,
                   "--result", result_path, "--warmup", str(args.warmup), "--repeats", str(args.repeats)]
        subprocess.run(command, check=True)
        result = dict(np.load(result_path))
    return dict(first_call_s=float(result["first_s"]), times_s=result["times_s"].tolist(), out=result["out"],
                threads=int(result["threads"]), torch_version=str(result["torch_version"]))


# ----------------------------------------------------------------------------- report

def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="hub-style UNet folder (config.json + weights)")
    parser.add_argument("--reference-python", help="interpreter of the reference environment (diffusers 0.19.3)")
    parser.add_argument("--show1-src", help="Show-1 checkout (holds showone/); needed with --reference-python")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--height", type=int, default=40)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--seq", type=int, default=77, help="text length (T5 max length in VMC)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--io", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.model = os.path.abspath(args.model)

    if args.torch_worker:
        torch_worker(args)
        return
    if bool(args.reference_python) != bool(args.show1_src):
        parser.error("--reference-python and --show1-src go together")

    config = read_config(args.model)
    io = make_inputs(config, args.batch, args.frames, args.height, args.width, args.seq, args.seed)
    rows = run_flax(args.model, io, args.warmup, args.repeats)
    reference = run_torch(args, io) if args.reference_python else None

    import jax

    shape = f"batch {args.batch}, {args.frames} frames, {args.height}x{args.width}, text {args.seq}"
    print(f"model {args.model}\ninputs {shape}; jax {jax.__version__} on {jax.devices()[0].device_kind}, "
          f"{os.cpu_count()} CPUs visible"
          + (f"; torch {reference['torch_version']} with {reference['threads']} threads" if reference else ""))
    header = f"{'':<11} {'compile s':>10} {'median s':>10} {'min s':>9} {'vs torch':>9} {'max |diff|':>11} {'rel diff':>9}"
    print(header + "\n" + "-" * len(header))
    report = dict(model=args.model, batch=args.batch, frames=args.frames, height=args.height, width=args.width,
                  seq=args.seq, warmup=args.warmup, repeats=args.repeats, jax_version=jax.__version__,
                  device=jax.devices()[0].device_kind, results={})
    ref_median = statistics.median(reference["times_s"]) if reference else None
    scale = float(np.abs(reference["out"]).max()) if reference else None
    for label, row in list(rows.items()) + ([("torch fp32", reference)] if reference else []):
        median = statistics.median(row["times_s"])
        entry = dict(median_s=median, min_s=min(row["times_s"]), times_s=row["times_s"])
        cells = [f"{row['compile_s']:>10.2f}" if "compile_s" in row else f"{'-':>10}"]
        if "compile_s" in row:
            entry["compile_s"] = row["compile_s"]
        else:
            entry["first_call_s"] = row["first_call_s"]
        cells += [f"{median:>10.4f}", f"{min(row['times_s']):>9.4f}"]
        if reference and label != "torch fp32":
            diff = float(np.abs(row["out"] - reference["out"]).max())
            entry.update(ratio_vs_torch=median / ref_median, max_abs_diff=diff, rel_diff=diff / scale)
            cells += [f"{median / ref_median:>9.2f}", f"{diff:>11.3g}", f"{diff / scale:>9.2g}"]
        else:
            cells += [f"{'1.00' if reference else '-':>9}", f"{'-':>11}", f"{'-':>9}"]
        print(f"{label:<11} " + " ".join(cells))
        report["results"][label] = entry
    if reference:
        print(f"(torch has no compile step; its first call took {reference['first_call_s']:.2f} s; "
              f"rel diff = max |diff| / max |torch output| = {scale:.3g})")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
