"""``vmc-jax plan``: compile a job's programs ahead of time for a TPU slice, GPUs or CPU devices.

Every program is the job's own jitted function (`training.make_train_step`, `inversion.ddim_invert`'s
loop, `keyframe_sampling.sample_keyframes`, the `cascade` stages), lowered on abstract params and inputs
(``jax.ShapeDtypeStruct`` with the job's shardings; nothing is allocated) at the sizes of the
config's model folders, and compiled for the target's devices. A TPU target needs libtpu
(``pip install -e ".[tpu]"``): ``jax.experimental.topologies`` gives a TPU topology's devices on
any host. For each program: compile time, XLA's memory (per chip) and cost analysis, and a
roofline time; the job time adds them up as the job runs them.

Sampling loops are compiled for one step (the same ``lax.scan`` with one trip) and counted once
per step; the scan's carry is all a longer loop adds to memory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections

from vmc_jax import cascade, keyframe_sampling, parallel, schedulers, training
from vmc_jax.errors import JobError
from vmc_jax.hub import tiny_pipeline
from vmc_jax.hub.unet_loading import build_unet
from vmc_jax.hub.weights import abstract_params, model_config
from vmc_jax.jobs import config as jobs_config
from vmc_jax.kernels import attention_core, xla_cpu

REAL_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs", "models")
GiB = 2**30
PLAN_STAGES = ("train", "keyframes", "cascade")  # the train step; inversion and sampling; the pixel stages after


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator chip: dense bf16 peak FLOP/s, HBM bandwidth (bytes/s) and HBM size (bytes)."""

    name: str
    peak_flops: float
    hbm_bandwidth: float
    hbm_bytes: float
    source: str


# Per chip, from the vendors' spec pages (cloud.google.com/tpu/docs/v5e, /v4, /v5p; nvidia.com H100 / H200
# datasheets, SXM, dense bf16 without sparsity).
CHIPS = {
    "v5e": Chip("TPU v5e", 197e12, 819e9, 16 * GiB, "cloud.google.com/tpu/docs/v5e"),
    "v4": Chip("TPU v4", 275e12, 1228e9, 32 * GiB, "cloud.google.com/tpu/docs/v4"),
    "v5p": Chip("TPU v5p", 459e12, 2765e9, 95 * GiB, "cloud.google.com/tpu/docs/v5p"),
    "h100": Chip("H100 SXM", 989e12, 3.35e12, 80e9, "nvidia.com H100 datasheet"),
    "h200": Chip("H200 SXM", 989e12, 4.8e12, 141e9, "nvidia.com H200 datasheet"),
}
_GPU_KINDS = {"H100": "h100", "H200": "h200"}  # device_kind substring -> CHIPS key


@dataclasses.dataclass(frozen=True)
class Target:
    """The devices a plan compiles for; ``chip`` None for the host CPU (no roofline)."""

    spec: str
    backend: str
    devices: list
    chip: Chip | None
    hbm_per_device: float
    chips_per_device: float  # < 1 where a chip shows several devices (v4's two TensorCores)


def parse_target(spec: str) -> Target:
    """``v5e:2x2``, ``v4:2x2x1``, ``v5p:2x2x1`` (a TPU topology), ``cpu:N`` or ``gpu:N``."""
    kind, _, shape = spec.partition(":")
    if kind in ("v5e", "v4", "v5p"):
        if not shape or not all(p.isdigit() and int(p) > 0 for p in shape.split("x")):
            raise ValueError(f"--target={spec}: a TPU target is KIND:TOPOLOGY, e.g. v5e:2x2 or v4:2x2x1")
        try:
            from jax.experimental import topologies

            devices = list(topologies.get_topology_desc(platform="tpu", topology_name=spec).devices)
        except Exception as e:  # no libtpu, or a topology libtpu does not know
            raise ValueError(f"--target={spec}: cannot get the TPU topology ({str(e).strip().splitlines()[0]}); "
                             'TPU targets need libtpu: pip install -e ".[tpu]"') from None
        chips = math.prod(int(p) for p in shape.split("x"))
        chip = CHIPS[kind]
        return Target(spec, "tpu", devices, chip, chip.hbm_bytes * chips / len(devices), chips / len(devices))
    if kind in ("cpu", "gpu") and shape.isdigit() and int(shape) > 0:
        count = int(shape)
        try:
            available = jax.devices(kind)
        except RuntimeError:
            available = []
        if len(available) < count:
            raise ValueError(f"--target={spec}: this process has {len(available)} {kind} devices"
                             + (" (its CPU backend had started; plan cpu:N from a fresh `vmc-jax plan`)"
                                if kind == "cpu" else ""))
        devices = available[:count]
        if kind == "cpu":
            memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")  # the host's, shared by its devices
            return Target(spec, "cpu", devices, None, memory / count, 1.0)
        name = next((key for sub, key in _GPU_KINDS.items() if sub in devices[0].device_kind), None)
        if name is None:
            raise ValueError(f"--target={spec}: no roofline figures for {devices[0].device_kind!r} "
                             f"(known: {', '.join(CHIPS[k].name for k in _GPU_KINDS.values())})")
        return Target(spec, "gpu", devices, CHIPS[name], CHIPS[name].hbm_bytes, 1.0)
    raise ValueError(f"--target={spec}: expected v5e:TOPOLOGY, v4:TOPOLOGY, v5p:TOPOLOGY, cpu:N or gpu:N")


def request_cpu_devices(spec: str) -> None:
    """Before JAX starts its CPU backend (the `vmc-jax plan` command): as many CPU devices as ``spec`` (cpu:N) plans for."""
    kind, _, count = spec.partition(":")
    if kind == "cpu" and count.isdigit() and int(count) > 0:
        if int(count) > 1:
            xla_cpu.withdraw_cpu_flags()  # safe on one CPU device only
        jax.config.update("jax_num_cpu_devices", int(count))


@dataclasses.dataclass
class ProgramPlan:
    """What compiling one program for the target says: memory per device, cost, time."""

    name: str
    runs: int  # how often the job runs it
    compile_s: float
    argument_bytes: int
    temp_bytes: int
    output_bytes: int
    alias_bytes: int
    bytes_per_chip: int
    hbm_bytes: float
    fits: bool
    flops: float
    bytes_accessed: float
    step_s: float | None  # roofline time of one run
    estimated_s: float | None  # runs * step_s

    def as_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Program:
    """A jitted function of the job, its abstract arguments, and how often the job runs it."""

    name: str
    function: Callable
    args: tuple
    kwargs: dict
    runs: int


def measure(program: Program, target: Target) -> ProgramPlan:
    """Lowers and compiles ``program`` for ``target``; XLA's memory and cost analysis, roofline time."""
    start = time.perf_counter()
    with attention_core.tracing_for(target.backend, len(target.devices)):
        compiled = program.function.lower(*program.args, **program.kwargs).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops, accessed = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
    per_chip = (memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
                - memory.alias_size_in_bytes)
    step_s = None
    if target.chip is not None:
        peak = target.chip.peak_flops * target.chips_per_device
        bandwidth = target.chip.hbm_bandwidth * target.chips_per_device
        step_s = max(flops / peak, accessed / bandwidth)
    return ProgramPlan(program.name, program.runs, round(compile_s, 2), memory.argument_size_in_bytes,
                       memory.temp_size_in_bytes, memory.output_size_in_bytes, memory.alias_size_in_bytes,
                       per_chip, target.hbm_per_device, per_chip <= target.hbm_per_device, flops, accessed, step_s,
                       None if step_s is None else step_s * program.runs)


def model_folder(path: str) -> str:
    """``path`` if it has its configs, else the real configs of the model of that name in configs/models."""
    if os.path.isfile(os.path.join(path, "unet", "config.json")):
        return path
    real = os.path.join(REAL_CONFIGS, os.path.basename(os.path.normpath(path)))
    if not os.path.isfile(os.path.join(real, "unet", "config.json")):
        raise ValueError(f"{path}: no unet/config.json there nor in {real} (give a pipeline folder or one of "
                         f"{sorted(d for d in os.listdir(REAL_CONFIGS) if os.path.isdir(os.path.join(REAL_CONFIGS, d)))})")
    return real


def _abstract(tree: Any, sharding: jax.sharding.Sharding) -> Any:
    """``tree``'s shapes and dtypes as arguments placed with ``sharding`` (nothing allocated)."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


def _unet(folder: str, **module_options) -> tuple[Any, Any]:
    """The module of ``folder``/unet and its abstract float32 params (as the jobs load them)."""
    config, source = model_config(os.path.join(folder, "unet"))
    model = build_unet(config, source=source, **module_options)
    return model, abstract_params(model)


def _scheduler(folder: str, part: str, default: dict) -> schedulers.Scheduler:
    path = os.path.join(folder, part)
    return schedulers.from_config(path) if os.path.isdir(path) else schedulers.from_config(default)


def _keyframe_model(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, dtype_name: str, remat: bool):
    """(module, abstract params, scheduler, abstract text states) of the job's keyframe UNet (with the
    job's ``attention``)."""
    folder = model_folder(config.pretrained)
    model, params = _unet(folder, dtype=jobs_config.COMPUTE_DTYPES[dtype_name], remat=remat,
                          attention_impl=config.attention)
    width = model.config.encoder_hid_dim or model.config.cross_attention_dim[0]
    text = jax.ShapeDtypeStruct((1, 77, width), jnp.float32, sharding=parallel.replicated(mesh))
    return model, params, _scheduler(folder, "scheduler", tiny_pipeline.SCHEDULER_CONFIG), text


def train_programs(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                   variants: list[tuple[str, bool]] | None = None) -> list[Program]:
    """The train step as train.py places it, per ``(compute_dtype, remat)`` variant (None: the config's)."""
    c = config
    replicated, rows = parallel.replicated(mesh), parallel.sharded(mesh, "data")
    programs = []
    for dtype_name, remat in variants or [(c.train.compute_dtype, c.train.remat)]:
        model, params, scheduler, text = _keyframe_model(c, mesh, dtype_name, remat)
        tuned, frozen = training.split_params(params, c.train.tuned_params)
        optimizer = training.make_optimizer(training.lr_schedule(c.train.lr, c.train.lr_schedule, c.train.steps,
                                                                 c.train.warmup_steps))
        state = jax.eval_shape(lambda t: training.TrainState.create(t, optimizer, jax.random.PRNGKey(0)), tuned)
        batch = parallel.padded_size(c.train.batch_size, mesh.shape["data"])
        clips = jax.ShapeDtypeStruct((batch, c.data.num_frames, c.data.height, c.data.width, model.config.in_channels),
                                     jnp.float32, sharding=rows)
        weights = None if batch == c.train.batch_size else jax.ShapeDtypeStruct((batch,), jnp.float32, sharding=rows)
        step = training.make_train_step(model, scheduler, optimizer, c.train.loss)
        programs.append(Program(f"train_step[{dtype_name},remat={'on' if remat else 'off'}]", step,
                                (_abstract(state, replicated), _abstract(frozen, replicated), clips, text, weights),
                                {}, c.train.steps))
    return programs


def keyframe_programs(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> list[Program]:
    """One step of the DDIM inversion loop and one of guided keyframe sampling (the validation's programs)."""
    c = config
    replicated = parallel.replicated(mesh)
    model, params, scheduler, text = _keyframe_model(c, mesh, c.train.compute_dtype, c.train.remat)
    params = _abstract(params, replicated)
    clip = jax.ShapeDtypeStruct((1, c.data.num_frames, c.data.height, c.data.width, model.config.in_channels),
                                jnp.float32, sharding=replicated)
    inv_scheduler = keyframe_sampling.inversion_scheduler(scheduler, c.inversion.method, c.inversion.scheduler)
    invert_args = (model, inv_scheduler, 1, c.inversion.method, False, params, clip, text)
    sample = jax.jit(keyframe_sampling.sample_keyframes, static_argnums=(0, 2, 6, 7))
    key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated)
    return [Program("inversion_step", keyframe_sampling._invert_jit, invert_args, {},  # ddim_invert's compiled loop
                    c.inversion.steps),
            Program("keyframe_sampling_step", sample, (model, params, scheduler, clip, text, text, 1,
                                                       c.sampling.guidance, key), {}, c.sampling.steps)]


def cascade_programs(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> list[Program]:
    """One step of each pixel stage after the keyframes: the interpolation batch, the IF-II first frame, one sr1 window."""
    c, d = config.cascade, config.data
    replicated = parallel.replicated(mesh)
    key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated)

    def video(*shape):
        return jax.ShapeDtypeStruct(shape, jnp.float32, sharding=replicated)

    programs = []
    folder = model_folder(c.interpolation or "show-1-interpolation")
    model, params = _unet(folder)
    text = video(1, 77, model.config.encoder_hid_dim)
    scheduler = _scheduler(folder, "scheduler", tiny_pipeline.SCHEDULER_CONFIG)
    programs.append(Program("interpolation_step", cascade.interpolate_keyframes,
                            (model, _abstract(params, replicated), scheduler, video(d.num_frames, d.height, d.width, 3),
                             text, text, 1, c.interpolation_guidance), {"rng": key}, c.interpolation_steps))
    frames = cascade.INTERPOLATION_WINDOW - 1
    num_frames = frames * (d.num_frames - 1) + 1
    height, width = d.height * c.sr1_scale, d.width * c.sr1_scale
    for stage, name, steps, guidance, level in (
            ("sr1_image", "IF-II-L-v1.0", c.sr1_image_steps, c.sr1_image_guidance, c.sr1_image_noise_level),
            ("sr1", "show-1-sr1", c.sr1_steps, c.sr1_guidance, c.sr1_noise_level)):
        folder = model_folder(c[stage] or name)
        model, params = _unet(folder)
        scheduler = _scheduler(folder, "scheduler", tiny_pipeline.SCHEDULER_CONFIG)
        noising = _scheduler(folder, "image_noising_scheduler", tiny_pipeline.NOISING_SCHEDULER_CONFIG)
        statics = dict(noising_scheduler=noising, height=height, width=width, steps=1, guidance=guidance,
                       noise_level=level, rng=key)
        if stage == "sr1_image":
            programs.append(Program("sr1_first_frame_step", cascade.super_resolve_first_frame,
                                    (model, _abstract(params, replicated), scheduler), dict(
                                        image=video(d.height, d.width, 3), text=text, negative_text=text, **statics),
                                    steps))
        else:
            windows = len(cascade.window_starts(num_frames, c.sr1_window, c.sr1_stride))
            programs.append(Program("sr1_window_step", cascade._super_resolve_window,  # super_resolve_windows' program
                                    (model, _abstract(params, replicated), scheduler), dict(
                                        low=video(c.sr1_window, d.height, d.width, 3),
                                        first_frame=video(height, width, 3), text=text, negative_text=text, **statics),
                                    steps * windows))
    return programs


def plan_job(config: ml_collections.ConfigDict, target: Target, stages: tuple[str, ...] = PLAN_STAGES,
             variants: list[tuple[str, bool]] | None = None,
             report: Callable[[ProgramPlan], None] | None = None) -> list[ProgramPlan]:
    """Compiles the job's programs (``stages``, some of PLAN_STAGES) for ``target``, one at a time."""
    mesh = parallel.make_mesh(config.mesh, devices=target.devices)
    programs = train_programs(config, mesh, variants) if "train" in stages else []
    programs += keyframe_programs(config, mesh) if "keyframes" in stages else []
    programs += cascade_programs(config, mesh) if "cascade" in stages else []
    plans = []
    for program in programs:
        plans.append(measure(program, target))
        if report:
            report(plans[-1])
    return plans


def job_seconds(plans: list[ProgramPlan]) -> float | None:
    """The roofline time of the whole job: every program as often as it runs (the train step of the config
    once: the first train_step listed)."""
    if any(p.estimated_s is None for p in plans):
        return None
    trains = [p for p in plans if p.name.startswith("train_step")]
    return sum(p.estimated_s for p in plans if p not in trains[1:])


def format_row(plan: ProgramPlan) -> str:
    est = "-" if plan.estimated_s is None else f"{plan.step_s * 1e3:9.2f} ms x{plan.runs:<5d} = {plan.estimated_s:8.1f} s"
    return (f"{plan.name:28} {plan.compile_s:7.1f} s  args {plan.argument_bytes / GiB:6.2f}  temp "
            f"{plan.temp_bytes / GiB:6.2f}  out {plan.output_bytes / GiB:6.2f}  = {plan.bytes_per_chip / GiB:6.2f} / "
            f"{plan.hbm_bytes / GiB:5.1f} GiB {'fits' if plan.fits else 'DOES NOT FIT'}  "
            f"{plan.flops / 1e12:9.3f} TFLOP {plan.bytes_accessed / 1e9:8.2f} GB  {est}")


def refusal(plans: list[ProgramPlan], target: Target, config: ml_collections.ConfigDict) -> str | None:
    """The one-line refusal of a plan with a program that does not fit, naming sizes and a fix; None if all fit."""
    over = [p for p in plans if not p.fits]
    if not over:
        return None
    worst = max(over, key=lambda p: p.bytes_per_chip)
    fixes = []
    if worst.name.startswith("train_step") and not config.train.remat:
        fixes.append("--config.train.remat=True")
    if config.train.compute_dtype == "float32":
        fixes.append("--config.train.compute_dtype=bfloat16")
    fixes.append("a chip with more memory per device (e.g. v5p)")
    return (f"{worst.name} needs {worst.bytes_per_chip / GiB:.2f} GiB per device (arguments "
            f"{worst.argument_bytes / GiB:.2f}, temporaries {worst.temp_bytes / GiB:.2f}, outputs "
            f"{worst.output_bytes / GiB:.2f}), {target.spec} has {target.hbm_per_device / GiB:.2f} GiB; "
            f"{len(over)} program(s) do not fit at {config.data.num_frames}x{config.data.height}x{config.data.width}, "
            f"batch {config.train.batch_size}; try {' or '.join(fixes)}")


def plan_command(config: ml_collections.ConfigDict, spec: str, json_path: str | None = None,
                 stages: list[str] | None = None, all_variants: bool = False) -> list[ProgramPlan]:
    """``vmc-jax plan``: prints a row per program and the job's time; refuses (JobError) a plan that does not fit."""
    from vmc_jax import files

    stages = list(stages or PLAN_STAGES)  # the config's folders need only their config.json (`model_folder`)
    unknown = sorted(set(stages) - set(PLAN_STAGES))
    if unknown:
        raise ValueError(f"--stages: unknown plan stages {unknown}; expected some of {list(PLAN_STAGES)}")
    target = parse_target(spec)
    variants = [(d, r) for d in ("bfloat16", "float32") for r in (True, False)] if all_variants else None
    if variants:  # the config's own first: the job time counts it
        variants.sort(key=lambda v: v != (config.train.compute_dtype, config.train.remat))
    chip = target.chip
    print(f"target {target.spec}: {len(target.devices)} devices"
          + (f", {chip.name}: {chip.peak_flops / 1e12:.0f} TFLOP/s bf16, {chip.hbm_bandwidth / 1e9:.0f} GB/s, "
             f"{target.hbm_per_device / GiB:.1f} GiB per device ({chip.source})" if chip else ""), flush=True)
    plans = plan_job(config, target, stages, variants,
                     report=lambda p: print(format_row(p), flush=True))
    total = job_seconds(plans)
    if total is not None:
        print(f"whole job (roofline, one prompt): {total:.0f} s = {total / 60:.1f} min")
    if json_path:
        files.write_text_atomic(json_path, json.dumps([p.as_json() for p in plans], indent=2) + "\n")
    message = refusal(plans, target, config)
    if message:
        raise JobError(message)
    return plans
