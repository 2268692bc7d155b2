"""vmc_jax against the PyTorch reference in one run: UNet forward, VMC train step, one DDIM
inversion step, one guided sampling step; identical weights and inputs, fp32, on the CPU.

The cases (keyframe fixture UNet by default, 8 frames of 40x64, text of 77 tokens):

  forward   UNet forward, batch 2, no gradients;
  train     one VMC train step, batch 1: noise at a random timestep (DDPM schedule), the UNet in
            train mode (temporal-conv dropout), the "paper" motion-distillation loss, gradients of
            the temporal attentions' to_q / to_k / to_v only, clipping to norm 1, AdamW;
  invert    one DDIM inversion step, batch 1: a conditional forward and the DDIM update;
  guided    one classifier-free-guided DDIM sampling step: a batch-2 forward (unconditional and
            conditional), the guidance mix (scale 9) and the DDIM update.

Our side is jitted (compiled once, before any timing). The reference is Show-1's own
``UNet3DConditionModel`` (diffusers 0.19.3), run by this same file under the reference
interpreter (``--reference-python``) in a worker process that imports only numpy, torch and
Show-1 (from ``--show1-src``; nothing of it is copied here). The worker waits on a pipe while
our side runs, so the two never compete for the cores: for each of ``--runs`` runs and each
case, ours is timed, then the reference's, each the median of ``--repeats`` calls after a
warm-up. The ratio is ours / reference per run.

Reference environment (once)::

    python3.11 -m venv /work/refenv && /work/refenv/bin/pip install torch "numpy<2" safetensors \\
        diffusers==0.19.3 "huggingface_hub<0.26" "transformers<4.40"
    git clone https://github.com/showlab/Show-1 /work/src/showlab+Show-1

Run (a few minutes on 2 cores)::

    python benchmarks/vs_reference.py --reference-python /work/refenv/bin/python \\
        --show1-src /work/src/showlab+Show-1 [--json out.json]
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from unet_forward import DEFAULT_MODEL, REPO, WEIGHT_NAMES, read_config  # noqa: E402

CASES = ("forward", "train", "invert", "guided")
GUIDANCE_SCALE = 9.0
LEARNING_RATE = 1e-4
# DDIM noise levels of one step: alphas_cumprod at t = 500 and t = 480 of the DDPM linear schedule.
T_HIGH, T_LOW = 500, 480


def make_inputs(config: dict, frames: int, height: int, width: int, seq: int, seed: int) -> dict:
    """Every array both sides use, in the reference's (b, c, f, h, w) layout."""
    rng = np.random.default_rng(seed)
    text_dim = config.get("encoder_hid_dim") or config["cross_attention_dim"]
    video = (config["in_channels"], frames, height, width)
    return {
        "x2": rng.standard_normal((2, *video)).astype(np.float32),
        "x1": rng.standard_normal((1, *video)).astype(np.float32),
        "clip": rng.uniform(-1, 1, (1, *video)).astype(np.float32),
        "noise": rng.standard_normal((1, *video)).astype(np.float32),
        "t2": np.array([10, 500], np.int64),
        "t_train": np.array([321], np.int64),
        "text2": rng.standard_normal((2, seq, text_dim)).astype(np.float32),
    }


def alphas_cumprod() -> np.ndarray:
    """The DDPM linear schedule (1e-4 to 0.02 over 1000 steps), as diffusers' DDPMScheduler."""
    return np.cumprod(1 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64)).astype(np.float32)


def timed(call, repeats: int) -> tuple[float, float]:
    """Median wall and process-CPU seconds of ``repeats`` calls after one warm-up call.

    CPU seconds (all threads of the process) are the steadier figure on a loaded machine.
    """
    call()
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        call()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


# ----------------------------------------------------------------------------- our side

def flax_cases(folder: str, io: dict, attention_impl: str, compute_dtype=None) -> dict:
    """Compiled zero-argument callables (blocking until done), one per case, and under "_compiled"
    the compiled programs (for ``cost_analysis``). fp32 weights; ``compute_dtype`` (e.g. bfloat16)
    sets the dtype the layers compute in."""
    import jax
    import jax.numpy as jnp

    sys.path.insert(0, REPO)
    from vmc_jax import keyframe_sampling, schedulers, training
    from vmc_jax.hub.unet_loading import load_unet
    model, params = load_unet(folder, dtype=np.float32, attention_impl=attention_impl)
    if compute_dtype is not None:
        model = model.clone(dtype=compute_dtype)
    params = jax.device_put(params)

    def last(x):
        return jnp.asarray(np.moveaxis(x, 1, -1))

    x2, x1, clip, t2, text2 = last(io["x2"]), last(io["x1"]), last(io["clip"]), io["t2"], io["text2"]
    text1 = jnp.asarray(text2[1:])
    a = alphas_cumprod()
    a_high, a_low = jnp.float32(a[T_HIGH]), jnp.float32(a[T_LOW])
    channels = x1.shape[-1]

    def eps(p, x, t, text):
        return model.apply({"params": p}, x, t, text)[..., :channels]

    forward = jax.jit(lambda p, x, t, c: model.apply({"params": p}, x, t, c)).lower(params, x2, t2, text2).compile()

    def invert_fn(p, x):
        return keyframe_sampling.inversion_update(x, eps(p, x, jnp.array([T_LOW]), text1), a_low, a_high)

    def guided_fn(p, x):
        both = eps(p, jnp.concatenate([x, x]), jnp.array([T_HIGH, T_HIGH]), jnp.asarray(text2))
        guided = both[:1] + GUIDANCE_SCALE * (both[1:] - both[:1])
        return keyframe_sampling.inversion_update(x, guided, a_high, a_low)

    invert = jax.jit(invert_fn).lower(params, x1).compile()
    guided = jax.jit(guided_fn).lower(params, x1).compile()

    scheduler = schedulers.from_config({"_class_name": "DDPMScheduler"})
    tuned, frozen = training.split_params(params)
    tuned = jax.tree.map(jnp.copy, tuned)  # the step donates its state; the other cases keep these params
    optimizer = training.make_optimizer(LEARNING_RATE)
    step = training.make_train_step(model, scheduler, optimizer, "paper")
    state = training.TrainState.create(tuned, optimizer, jax.random.PRNGKey(0))
    train = step.lower(state, frozen, clip, text1).compile()
    holder = {"state": state}

    def train_call():
        holder["state"], metrics = train(holder["state"], frozen, clip, text1)
        jax.block_until_ready(metrics)

    return {
        "forward": lambda: forward(params, x2, t2, text2).block_until_ready(),
        "train": train_call,
        "invert": lambda: invert(params, x1).block_until_ready(),
        "guided": lambda: guided(params, x1).block_until_ready(),
        "_forward_out": lambda: np.moveaxis(np.asarray(forward(params, x2, t2, text2)), -1, 1),
        "_compiled": {"forward": forward, "train": train, "invert": invert, "guided": guided},
    }


# ----------------------------------------------------------------------------- reference side

def torch_worker(args: argparse.Namespace) -> None:
    """Runs under the reference interpreter: answers one JSON line per request on stdin."""
    sys.path.insert(0, os.path.abspath(args.show1_src))
    import re

    import safetensors.torch
    import torch
    from showone.models.unet_3d_condition import UNet3DConditionModel

    model = UNet3DConditionModel.from_config(read_config(args.model))
    weights = next(os.path.join(args.model, n) for n in WEIGHT_NAMES if os.path.isfile(os.path.join(args.model, n)))
    model.load_state_dict({k: v.float() for k, v in safetensors.torch.load_file(weights).items()}, strict=True)
    model.float()
    io = {k: torch.from_numpy(v) for k, v in np.load(args.io).items()}
    a = torch.from_numpy(alphas_cumprod())
    channels = io["x1"].shape[1]
    tuned_names = re.compile(r"temp_attentions\.\d+\.transformer_blocks\.\d+\.attn[12]\.to_[qkv]\.")
    tuned = [p for n, p in model.named_parameters() if tuned_names.search(n)]
    for n, p in model.named_parameters():
        p.requires_grad_(bool(tuned_names.search(n)))
    optimizer = torch.optim.AdamW(tuned, lr=LEARNING_RATE, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)

    def eps(x, t, text):
        return model(x, t, text, return_dict=False)[0][:, :channels]

    def ddim(x, e, a_cur, a_next):
        x0 = (x - (1 - a_cur).sqrt() * e) / a_cur.sqrt()
        return a_next.sqrt() * x0 + (1 - a_next).sqrt() * e

    def forward():
        model.eval()
        with torch.no_grad():
            return model(io["x2"], io["t2"], io["text2"], return_dict=False)[0]

    def invert():
        model.eval()
        with torch.no_grad():
            return ddim(io["x1"], eps(io["x1"], torch.tensor([T_LOW]), io["text2"][1:]), a[T_LOW], a[T_HIGH])

    def guided():
        model.eval()
        with torch.no_grad():
            both = eps(torch.cat([io["x1"], io["x1"]]), torch.tensor([T_HIGH, T_HIGH]), io["text2"])
            return ddim(io["x1"], both[:1] + GUIDANCE_SCALE * (both[1:] - both[:1]), a[T_HIGH], a[T_LOW])

    def train():
        model.train()
        t = io["t_train"]
        noisy = a[t].sqrt() * io["clip"] + (1 - a[t]).sqrt() * io["noise"]
        out = eps(noisy, t, io["text2"][1:])
        pred, true = out[:, :, 1:] - out[:, :, :-1], io["noise"][:, :, 1:] - io["noise"][:, :, :-1]
        flat = lambda r: r.transpose(1, 2).flatten(2)  # (b, f-1, c*h*w)  # noqa: E731
        loss = (1 - torch.nn.functional.cosine_similarity(flat(pred), flat(true), dim=-1)).mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tuned, 1.0)
        optimizer.step()

    calls = {"forward": forward, "train": train, "invert": invert, "guided": guided}
    print(json.dumps({"ready": True, "torch": torch.__version__, "threads": torch.get_num_threads()}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if request["case"] == "_forward_out":
            np.save(request["path"], forward().numpy())
            print(json.dumps({"done": True}), flush=True)
            continue
        wall, cpu = timed(calls[request["case"]], request["repeats"])
        print(json.dumps({"seconds": wall, "cpu_seconds": cpu}), flush=True)


class Reference:
    """The reference worker process, asked one case at a time."""

    def __init__(self, args: argparse.Namespace, io_path: str):
        command = [args.reference_python, os.path.abspath(__file__), "--torch-worker", "--show1-src",
                   args.show1_src, "--model", args.model, "--io", io_path]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = self._answer()

    def _answer(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise SystemExit(f"the reference worker exited (code {self.process.wait()})")
        return json.loads(line)

    def ask(self, **request) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return self._answer()

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


# ----------------------------------------------------------------------------- report

def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="hub-style UNet folder (config.json + weights)")
    parser.add_argument("--reference-python", help="interpreter of the reference environment (diffusers 0.19.3)")
    parser.add_argument("--show1-src", help="Show-1 checkout (holds showone/)")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--height", type=int, default=40)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--seq", type=int, default=77)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {CASES}")
    parser.add_argument("--attention-impl", default="auto")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--io", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.model = os.path.abspath(args.model)
    if args.torch_worker:
        torch_worker(args)
        return
    if not (args.reference_python and args.show1_src):
        parser.error("--reference-python and --show1-src are needed: this benchmark compares with the reference")
    cases = args.cases.split(",")
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        parser.error(f"unknown cases {unknown}; expected a subset of {CASES}")

    import jax

    io = make_inputs(read_config(args.model), args.frames, args.height, args.width, args.seq, seed=0)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        io_path = os.path.join(tmp, "io.npz")
        np.savez(io_path, **io)
        start = time.perf_counter()
        ours = flax_cases(args.model, io, args.attention_impl)
        compile_s = time.perf_counter() - start
        reference = Reference(args, io_path)
        reference.ask(case="_forward_out", path=os.path.join(tmp, "ref_out.npy"))
        ref_out = np.load(os.path.join(tmp, "ref_out.npy"))
        forward_diff = float(np.abs(ours["_forward_out"]() - ref_out).max())
        results = {case: {"ours_s": [], "reference_s": [], "ours_cpu_s": [], "reference_cpu_s": []}
                   for case in cases}
        for _ in range(args.runs):
            for case in cases:
                wall, cpu = timed(ours[case], args.repeats)
                answer = reference.ask(case=case, repeats=args.repeats)
                for key, value in (("ours_s", wall), ("ours_cpu_s", cpu), ("reference_s", answer["seconds"]),
                                   ("reference_cpu_s", answer["cpu_seconds"])):
                    results[case][key].append(value)
        reference.close()

    print(f"{args.model}: {args.frames} frames {args.height}x{args.width}, text {args.seq}, fp32; "
          f"jax {jax.__version__} ({args.attention_impl} attention, compile {compile_s:.0f} s) vs torch "
          f"{reference.info['torch']} ({reference.info['threads']} threads); {os.cpu_count()} CPUs; load average "
          f"{load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after")
    print(f"forward outputs differ by at most {forward_diff:.2g}")
    print(f"{'case':8} {'ours s (per run)':>22} {'reference s (per run)':>22} {'ratio per run':>16} "
          f"{'CPU-time ratio':>16}")
    for case, r in results.items():
        r["ratio"] = [o / t for o, t in zip(r["ours_s"], r["reference_s"])]
        r["cpu_ratio"] = [o / t for o, t in zip(r["ours_cpu_s"], r["reference_cpu_s"])]
        cells = [" ".join(f"{x:.3f}" for x in r[key]) for key in ("ours_s", "reference_s")]
        cells += [" ".join(f"{x:.2f}" for x in r[key]) for key in ("ratio", "cpu_ratio")]
        print(f"{case:8} {cells[0]:>22} {cells[1]:>22} {cells[2]:>16} {cells[3]:>16}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), "load_average": [load_before, os.getloadavg()],
                       "forward_max_abs_diff": forward_diff, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
