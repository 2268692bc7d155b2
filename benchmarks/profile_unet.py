"""Where the time of our forward or train step goes: a ``jax.profiler`` trace summed by UNet part.

Runs one case of ``vs_reference.py`` (keyframe fixture, 8x40x64, fp32) under the profiler and sums
the time of every XLA op by the part of the UNet its ``op_name`` names (spatial / temporal
attention, resnet, temporal convolution, other) and by operation. Ops that XLA:CPU hands to
Eigen's thread pool (its convolutions) are not in the trace: their time shows as the time in
which no traced op runs, printed last. With ``--reference-python`` (the reference environment of
``vs_reference.py``) it prints ``torch.profiler``'s table of one forward of Show-1's UNet on the
same weights and inputs instead.

    PYTHONPATH=$PWD python benchmarks/profile_unet.py --case forward   # or train, invert, guided
    PYTHONPATH=$PWD python benchmarks/profile_unet.py --reference-python /work/refenv/bin/python \
        --show1-src /work/src/showlab+Show-1
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from unet_forward import DEFAULT_MODEL, WEIGHT_NAMES, read_config  # noqa: E402
from vs_reference import CASES, flax_cases, make_inputs  # noqa: E402

PARTS = (("temp_attentions", "temporal attention"), ("temp_convs", "temporal conv"),
         ("attentions_", "spatial attention"), ("resnet", "resnet"), ("samplers", "resnet"))
NOT_OPS = ("ThunkExecutor", "SlinkyThreadPool", "ThreadpoolListener", "while", "end:")


def op_part(hlo: str, op: str) -> str:
    """'<part> <operation>' of an HLO instruction, from the op_name of its metadata."""
    line = re.search(r"\n\s*%?" + re.escape(op) + r" = [^\n]*", hlo)
    name = re.search(r'op_name="([^"]*)"', line.group(0)) if line else None
    name = name.group(1) if name else ""
    part = next((label for key, label in PARTS if key in name), "other")
    backward = " (backward)" if "transpose(" in name else ""
    return f"{part}{backward}: {name.rsplit('/', 1)[-1] or op.split('.')[0]}"


def reference_profile(args: argparse.Namespace) -> None:
    """Runs under the reference interpreter: torch.profiler's table of one forward (batch 2)."""
    sys.path.insert(0, os.path.abspath(args.show1_src))
    import safetensors.torch
    import torch
    from showone.models.unet_3d_condition import UNet3DConditionModel

    config = read_config(args.model)
    model = UNet3DConditionModel.from_config(config)
    weights = next(os.path.join(args.model, n) for n in WEIGHT_NAMES if os.path.isfile(os.path.join(args.model, n)))
    model.load_state_dict({k: v.float() for k, v in safetensors.torch.load_file(weights).items()}, strict=True)
    model.float().eval()
    io = make_inputs(config, 8, 40, 64, 77, 0)
    inputs = [torch.from_numpy(io[k]) for k in ("x2", "t2", "text2")]
    with torch.no_grad():
        model(*inputs), model(*inputs)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            model(*inputs)
    print(profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", default="forward", choices=CASES)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--top", type=int, default=25, help="rows of the per-operation table")
    parser.add_argument("--reference-python", help="profile the PyTorch reference's forward with this interpreter")
    parser.add_argument("--show1-src", help="Show-1 checkout (holds showone/); with --reference-python")
    parser.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.torch_worker:
        reference_profile(args)
        return
    if args.reference_python:
        if not args.show1_src:
            parser.error("--reference-python needs --show1-src")
        subprocess.run([args.reference_python, os.path.abspath(__file__), "--torch-worker", "--model", args.model,
                        "--show1-src", args.show1_src, "--top", str(args.top)], check=True)
        return

    import jax

    cases = flax_cases(args.model, make_inputs(read_config(args.model), 8, 40, 64, 77, 0), "auto")
    call = cases[args.case]
    call(), call()  # compiled in flax_cases; two warm-up calls
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            call()
        trace = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)[0]
        events = json.load(gzip.open(trace))["traceEvents"]
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    ops = sorted((e for e in events if e.get("ph") == "X" and "Eigen" in threads.get((e["pid"], e["tid"]), "")
                  and not e["name"].startswith(NOT_OPS)), key=lambda e: e["ts"])
    hlo = cases["_compiled"][args.case].as_text()

    by_part, by_op = collections.Counter(), collections.Counter()
    for e in ops:
        label = op_part(hlo, e["name"])
        by_op[label] += e["dur"] / 1e3
        by_part[label.split(":")[0]] += e["dur"] / 1e3
    idle, end = 0.0, ops[0]["ts"]
    for e in ops:
        idle += max(0.0, e["ts"] - end) / 1e3
        end = max(end, e["ts"] + e["dur"])
    span = (end - ops[0]["ts"]) / 1e3

    print(f"{args.case}: {span:.0f} ms from the first op to the last; ms of op time by part:")
    for part, ms in by_part.most_common():
        print(f"  {ms:8.1f}  {part}")
    print(f"by operation (top {args.top}):")
    for label, ms in by_op.most_common(args.top):
        print(f"  {ms:8.1f}  {label}")
    print(f"  {idle:8.1f}  no traced op running (Eigen's convolutions, waits)")


if __name__ == "__main__":
    main()
