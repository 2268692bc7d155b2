"""The VMC job: tune the keyframe UNet's temporal attention on one clip, validate, checkpoint.

``train_and_evaluate(config, workdir)`` is what ``vmc-jax train`` runs. A killed run started
again with the same workdir resumes from its last checkpoint and ends bit-identical to an
uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from vmc_jax import cascade_runner, checkpoints, data, generate, inversion, prompts, schedulers, training
from vmc_jax.loading import load_unet, to_torch_state_dict

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class Job:
    """What the train, generate and export commands share: the config, the model, the prompts."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        validate_config(config)
        self.config = config
        self.workdir = workdir
        os.makedirs(workdir, exist_ok=True)
        model, self.params = load_unet(os.path.join(config.pretrained, "unet"), dtype=np.float32)
        self.model = model.clone(dtype=COMPUTE_DTYPES[config.train.compute_dtype], remat=config.train.remat)
        self.scheduler = schedulers.from_config(os.path.join(config.pretrained, "scheduler"))
        self.train_prompt = config.invariant_prompt or prompts.appearance_invariant(config.prompt)
        self.checkpoints = checkpoints.TrainCheckpoints(os.path.join(workdir, "checkpoints"))

    def embeddings(self, texts: list[str]) -> dict[str, np.ndarray]:
        return prompts.embed_prompts(self.config.pretrained, texts, self.workdir)

    def clip(self) -> np.ndarray:
        d = self.config.data
        return data.load_clip(self.config.video, d.num_frames, d.height, d.width, d.stride, d.start, d.reverse)

    def tuned_params(self) -> Any:
        """The tuned subset from the last checkpoint (the pretrained values before any)."""
        tuned, _ = training.split_params(self.params, self.config.train.tuned_params)
        step = self.checkpoints.latest_step()
        return tuned if step is None else self.checkpoints.restore_tuned(step)

    def generate(self, params: Any, clip: np.ndarray, texts: dict[str, np.ndarray], prompt_list: list[str],
                 out_dir: str, stages: list[str] = ("keyframes",)) -> list[str]:
        """Inverts the clip with ``params`` and samples one keyframe video per prompt into ``out_dir``,
        then runs the later cascade ``stages`` on it (``<n>_<prompt>_<stage>.gif/.mp4``)."""
        c = self.config
        inv_scheduler = generate.inversion_scheduler(self.scheduler, c.inversion.method, c.inversion.scheduler)
        x_T = inversion.ddim_invert(self.model, params, clip[None], texts[""][None], inv_scheduler,
                                    c.inversion.steps, method=c.inversion.method)
        os.makedirs(out_dir, exist_ok=True)
        written = []
        for i, prompt in enumerate(prompt_list):
            frames = generate.sample_keyframes(
                self.model, params, self.scheduler, x_T, texts[prompt][None], texts[c.sampling.negative_prompt][None],
                c.sampling.steps, c.sampling.guidance, jax.random.PRNGKey(c.seed))
            for ext in ("gif", "mp4"):
                path = os.path.join(out_dir, f"{i}_{_slug(prompt)}.{ext}")
                data.save_video(np.asarray(frames[0], np.float32), path, fps=c.sampling.fps)
                written.append(path)
            later = cascade_runner.run_cascade(c, frames[0], prompt, texts[prompt][None], texts[""][None], stages)
            for stage, video in later.items():
                for ext in ("gif", "mp4"):
                    written.append(os.path.join(out_dir, f"{i}_{_slug(prompt)}_{stage}.{ext}"))
                    data.save_video(video, written[-1], fps=c.cascade.fps)
        return written


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Fails fast, naming the field, on a config value the job would only trip over later."""
    choices = {
        "train.compute_dtype": (config.train.compute_dtype, tuple(COMPUTE_DTYPES)),
        "train.loss": (config.train.loss, training.LOSS_KINDS),
        "train.lr_schedule": (config.train.lr_schedule, ("constant", "linear", "cosine")),
        "inversion.method": (config.inversion.method, inversion.METHODS),
    }
    for field, (value, allowed) in choices.items():
        if value not in allowed:
            raise ValueError(f"config.{field}={value!r}; expected one of {list(allowed)}")
    positive = {"train.steps": config.train.steps, "train.batch_size": config.train.batch_size,
                "train.checkpoint_every": config.train.checkpoint_every, "train.log_every": config.train.log_every,
                "inversion.steps": config.inversion.steps, "sampling.steps": config.sampling.steps}
    for field, value in positive.items():
        if value < 1:
            raise ValueError(f"config.{field}={value!r} must be at least 1")
    for field, path in (("pretrained", config.pretrained), ("video", config.video)):
        if not os.path.exists(path):
            raise FileNotFoundError(f"config.{field}: {path!r} does not exist")
    for part in ("unet", "text_encoder", "tokenizer", "scheduler"):
        if not os.path.isdir(os.path.join(config.pretrained, part)):
            raise FileNotFoundError(f"config.pretrained: {config.pretrained!r} has no {part}/ "
                                    "(expected a pipeline folder written by `vmc-jax convert`)")


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in text.lower()).strip("_")[:60] or "empty"


def _data_sharding(batch: int) -> NamedSharding | None:
    """Splits the batch of clips over the local devices when it divides evenly."""
    devices = jax.local_devices()
    if len(devices) == 1 or batch % len(devices):
        return None
    return NamedSharding(Mesh(np.array(devices), ("data",)), PartitionSpec("data"))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> training.TrainState:
    """Runs (or resumes) the tuning job in ``workdir``; returns the final train state."""
    job = Job(config, workdir)
    c = config
    stages = cascade_runner.checked_stages(c, list(c.validation.stages))
    checkpoints.write_text_atomic(os.path.join(workdir, "config.json"), c.to_json(indent=2))
    texts = job.embeddings([job.train_prompt, "", c.sampling.negative_prompt, *c.validation.prompts])
    clip = job.clip()
    logging.info("training prompt %r on %s (%d frames, %dx%d)", job.train_prompt, c.video, *clip.shape[:3])

    clips = np.repeat(clip[None], c.train.batch_size, axis=0)
    sharding = _data_sharding(c.train.batch_size)
    clips = jax.device_put(clips, sharding) if sharding else jnp.asarray(clips)

    tuned, frozen = training.split_params(job.params, c.train.tuned_params)
    replicated = NamedSharding(sharding.mesh, PartitionSpec()) if sharding else None
    frozen = jax.device_put(frozen, replicated)  # once: the frozen weights stay on the devices
    schedule = training.lr_schedule(c.train.lr, c.train.lr_schedule, c.train.steps, c.train.warmup_steps)
    optimizer = training.make_optimizer(schedule, c.train.b1, c.train.b2, c.train.eps, c.train.weight_decay,
                                        c.train.clip_grad_norm)
    state = training.TrainState.create(tuned, optimizer, jax.random.PRNGKey(c.seed))
    start = job.checkpoints.latest_step()
    if start is not None:
        state = job.checkpoints.restore(start, state)
        logging.info("resumed from step %d", start)
    state = jax.device_put(state, replicated)  # placed as the step returns it: no recompile on step 2
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    _truncate_metrics(metrics_path, int(state.step))

    train_step = training.make_train_step(job.model, job.scheduler, optimizer, c.train.loss)
    text = jnp.asarray(texts[job.train_prompt])[None]
    pending = []  # device metrics, fetched every log_every steps so the loop never waits on the host
    for step in tqdm(range(int(state.step), c.train.steps), initial=int(state.step), total=c.train.steps,
                     desc="VMC tuning", unit="step"):
        state, metrics = train_step(state, frozen, clips, text)
        pending.append((step + 1, metrics))
        done = step + 1
        if done % c.train.log_every == 0 or done == c.train.steps or done % c.train.checkpoint_every == 0:
            _append_metrics(metrics_path, pending, schedule)
            pending = []
        if done % c.train.checkpoint_every == 0 or done == c.train.steps:
            job.checkpoints.save(done, state)
        if c.validation.every and (done % c.validation.every == 0 or done == c.train.steps):
            params = training.merge_params(state.tuned, frozen)
            job.generate(params, clip, texts, list(c.validation.prompts),
                         os.path.join(workdir, "samples", f"step_{done}"), stages)
    job.checkpoints.wait()
    return state


def _append_metrics(path: str, pending: list, schedule) -> None:
    with open(path, "a", encoding="utf-8") as f:
        for step, metrics in jax.device_get(pending):
            row = {"step": step, "lr": float(schedule(step - 1)), **{k: float(v) for k, v in metrics.items()}}
            f.write(json.dumps(row) + "\n")


def _truncate_metrics(path: str, step: int) -> None:
    """Drops rows a killed run logged after its last checkpoint, so a resumed log has no repeats."""
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        rows = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    checkpoints.write_text_atomic(path, "".join(rows))


def generate_prompts(config: ml_collections.ConfigDict, workdir: str, prompt_list: list[str],
                     stages: list[str] | None = None) -> list[str]:
    """``vmc-jax generate``: videos for ``prompt_list`` with the run's tuned weights, through the
    cascade ``stages`` (default: keyframes and every stage whose folder config.cascade gives)."""
    if not prompt_list:
        raise ValueError("no prompt given (--prompt)")
    stages = cascade_runner.checked_stages(config, stages)
    job = Job(config, workdir)
    _, frozen = training.split_params(job.params, config.train.tuned_params)
    params = jax.device_put(training.merge_params(job.tuned_params(), frozen))
    texts = job.embeddings(["", config.sampling.negative_prompt, *prompt_list])
    step = job.checkpoints.latest_step() or 0
    return job.generate(params, job.clip(), texts, prompt_list, os.path.join(workdir, "samples", f"generate_{step}"),
                        stages)


def export_tuned(config: ml_collections.ConfigDict, workdir: str, out: str) -> str:
    """``vmc-jax export``: the tuned parameters alone, in Show-1's PyTorch names, as safetensors.

    Load it into the PyTorch UNet with ``unet.load_state_dict(load_file(out), strict=False)``.
    """
    from safetensors.numpy import save_file

    job = Job(config, workdir)
    if job.checkpoints.latest_step() is None:
        raise FileNotFoundError(f"no checkpoint in {os.path.join(workdir, 'checkpoints')} to export")
    state_dict = to_torch_state_dict(job.model, job.tuned_params())
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp"
    save_file(state_dict, tmp, metadata={"format": "pt", "step": str(job.checkpoints.latest_step())})
    os.replace(tmp, out)
    return out
