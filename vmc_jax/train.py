"""The VMC tuning loop: tune the keyframe UNet's temporal attention on one clip, validate, checkpoint.

``train_and_evaluate(config, workdir)`` is what ``vmc-jax train`` runs. A killed run started
again with the same workdir resumes from its last readable checkpoint and ends bit-identical to
an uninterrupted one. The first non-finite step stops the run (``train.non_finite="stop"``) or
is skipped and counted ("skip"); no checkpoint ever holds its values.
"""

from __future__ import annotations

import json
import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from vmc_jax import cascade_runner, checkpoints, files, generate, job_config, prompts, training, workdir
from vmc_jax.errors import TrainingDiverged


def _data_sharding(batch: int) -> NamedSharding | None:
    """Splits the batch of clips over the local devices when it divides evenly."""
    devices = jax.local_devices()
    if len(devices) == 1 or batch % len(devices):
        return None
    return NamedSharding(Mesh(np.array(devices), ("data",)), PartitionSpec("data"))


def train_and_evaluate(config: ml_collections.ConfigDict, job_dir: str, strict: bool = False) -> training.TrainState:
    """Runs (or resumes) the tuning job in ``job_dir`` under its lock; returns the final train state.

    ``strict``: refuse an unreadable latest checkpoint instead of resuming from the previous one.
    """
    job_config.validate_config(config)
    os.makedirs(job_dir, exist_ok=True)
    with workdir.TrainLock(job_dir):
        return _train(config, job_dir, strict)


def _train(config: ml_collections.ConfigDict, job_dir: str, strict: bool) -> training.TrainState:
    c = config
    stages = cascade_runner.checked_stages(c, list(c.validation.stages))  # before any sampling
    workdir.save_config(job_dir, c)
    model, params, scheduler = generate.load_keyframe_unet(c)
    train_prompt = c.invariant_prompt or prompts.appearance_invariant(c.prompt)
    texts = prompts.embed_prompts(c.pretrained, [train_prompt, "", c.sampling.negative_prompt, *c.validation.prompts],
                                  job_dir)
    clip = generate.training_clip(c)
    logging.info("training prompt %r on %s (%d frames, %dx%d)", train_prompt, c.video, *clip.shape[:3])

    clips = np.repeat(clip[None], c.train.batch_size, axis=0)
    sharding = _data_sharding(c.train.batch_size)
    clips = jax.device_put(clips, sharding) if sharding else jnp.asarray(clips)

    tuned, frozen = training.split_params(params, c.train.tuned_params)
    replicated = NamedSharding(sharding.mesh, PartitionSpec()) if sharding else None
    frozen = jax.device_put(frozen, replicated)  # once: the frozen weights stay on the devices
    schedule = training.lr_schedule(c.train.lr, c.train.lr_schedule, c.train.steps, c.train.warmup_steps)
    optimizer = training.make_optimizer(schedule, c.train.b1, c.train.b2, c.train.eps, c.train.weight_decay,
                                        c.train.clip_grad_norm)
    state = training.TrainState.create(tuned, optimizer, jax.random.PRNGKey(c.seed))
    store = checkpoints.TrainCheckpoints(workdir.checkpoints_dir(job_dir), strict=strict)
    start, restored = store.restore_latest(state)
    if start is not None:
        state = restored
        logging.info("resumed from step %d", start)
    if start != store.latest_step():
        store.set_aside(newer_than=start)
    state = jax.device_put(state, replicated)  # placed as the step returns it: no recompile on step 2
    metrics_path = workdir.metrics_path(job_dir)
    _truncate_metrics(metrics_path, int(state.step))

    train_step = training.make_train_step(model, scheduler, optimizer, c.train.loss)
    text = jnp.asarray(texts[train_prompt])[None]
    pending, skipped = [], []  # device metrics, fetched every log_every steps so the loop never waits on the host
    try:  # a stopped run still finishes writing its last checkpoint
        for step in tqdm(range(int(state.step), c.train.steps), initial=int(state.step), total=c.train.steps,
                         desc="VMC tuning", unit="step"):
            state, metrics = train_step(state, frozen, clips, text)
            pending.append((step + 1, metrics))
            done = step + 1
            if done % c.train.log_every == 0 or done == c.train.steps or done % c.train.checkpoint_every == 0:
                skipped += _append_metrics(metrics_path, pending, schedule)
                pending = []
                if skipped and c.train.non_finite == "stop":
                    raise TrainingDiverged(
                        f"step {skipped[0]}: the loss or the gradients are not finite (config.train.lr={c.train.lr}); "
                        f"stopped, last checkpoint: step {store.latest_step()}. Lower the learning rate, or set "
                        "config.train.non_finite=skip to skip such steps")
            if done % c.train.checkpoint_every == 0 or done == c.train.steps:
                store.save(done, state)
            if c.validation.every and (done % c.validation.every == 0 or done == c.train.steps):
                videos = generate.keyframe_videos(model, training.merge_params(state.tuned, frozen), scheduler, clip,
                                                  texts, list(c.validation.prompts), c)
                out_dir = workdir.samples_dir(job_dir, f"step_{done}")
                generate.write_videos(videos, list(c.validation.prompts), out_dir, c.sampling.fps, overwrite=True)
                generate.write_cascade(c, videos, texts, list(c.validation.prompts), stages, out_dir, overwrite=True)
    finally:
        store.wait()
    if skipped:
        logging.warning("skipped %d non-finite steps (first: step %d)", len(skipped), skipped[0])
    return state


def _append_metrics(path: str, pending: list, schedule) -> list[int]:
    """Appends a row per step; returns the steps whose loss or gradients were not finite."""
    non_finite = []
    with open(path, "a", encoding="utf-8") as f:
        for step, metrics in jax.device_get(pending):
            if not metrics.pop("finite"):
                non_finite.append(step)
            row = {"step": step, "lr": float(schedule(step - 1)), **{k: float(v) for k, v in metrics.items()}}
            f.write(json.dumps(row) + "\n")
    return non_finite


def _truncate_metrics(path: str, step: int) -> None:
    """Drops rows a killed run logged after its last checkpoint, so a resumed log has no repeats."""
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        rows = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    files.write_text_atomic(path, "".join(rows))
