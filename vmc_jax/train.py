"""The VMC tuning loop: tune the keyframe UNet's temporal attention on one clip, validate, checkpoint.

``train_and_evaluate(config, workdir)`` is what ``vmc-jax train`` runs. A killed run started
again with the same workdir resumes from its last readable checkpoint and ends bit-identical to
an uninterrupted one. The first non-finite step stops the run (``train.non_finite="stop"``) or
is skipped and counted ("skip"); no checkpoint ever holds its values.

The step runs under ``jit`` on the ``config.mesh`` devices (`vmc_jax.parallel`), on one host or
several: every process runs this loop, feeds its own rows of the batch and writes its part of
each checkpoint; only the main process holds the lock and writes the config, metrics and samples.
"""

from __future__ import annotations

import json
import logging
import os

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from vmc_jax import cascade_runner, checkpoints, files, generate, job_config, parallel, prompts, training, workdir
from vmc_jax.errors import TrainingDiverged


def train_and_evaluate(config: ml_collections.ConfigDict, job_dir: str, strict: bool = False) -> training.TrainState:
    """Runs (or resumes) the tuning job in ``job_dir`` under its lock; returns the final train state.

    ``strict``: refuse an unreadable latest checkpoint instead of resuming from the previous one.
    """
    job_config.validate_config(config)
    os.makedirs(job_dir, exist_ok=True)
    if not parallel.is_main_process():  # the main process holds the lock for the whole job
        return _train(config, job_dir, strict)
    with workdir.TrainLock(job_dir):
        return _train(config, job_dir, strict)


def _train(config: ml_collections.ConfigDict, job_dir: str, strict: bool) -> training.TrainState:
    c = config
    main = parallel.is_main_process()
    mesh = parallel.make_mesh(c.mesh)
    if mesh.shape["clips"] != 1:
        raise ValueError(f"config.mesh.clips={c.mesh.clips}: a training job tunes one clip; "
                         "give its devices to config.mesh.data")
    logging.info("mesh: %s", parallel.describe(mesh))
    stages = cascade_runner.checked_stages(c, list(c.validation.stages))  # before any sampling
    if main:
        workdir.save_config(job_dir, c)
    model, params, scheduler = generate.load_keyframe_unet(c)
    train_prompt = c.invariant_prompt or prompts.appearance_invariant(c.prompt)
    texts = prompts.embed_prompts(c.pretrained, [train_prompt, "", c.sampling.negative_prompt, *c.validation.prompts],
                                  job_dir)
    clip = generate.training_clip(c)
    logging.info("training prompt %r on %s (%d frames, %dx%d)", train_prompt, c.video, *clip.shape[:3])

    # The batch of noisy copies over the "data" axis; padding copies (batch policy) weigh nothing.
    batch = parallel.padded_size(c.train.batch_size, mesh.shape["data"])
    clips = parallel.global_batch(mesh, np.repeat(clip[None], batch, axis=0), "data")
    weights = None
    if batch != c.train.batch_size:
        logging.warning("train.batch_size=%d padded to %d for %d devices on the data axis (padding weighs 0)",
                        c.train.batch_size, batch, mesh.shape["data"])
        weights = parallel.global_batch(mesh, (np.arange(batch) < c.train.batch_size).astype(np.float32), "data")

    tuned, frozen = training.split_params(params, c.train.tuned_params)
    frozen = parallel.put_global(mesh, frozen)  # once: the frozen weights stay on the devices
    schedule = training.lr_schedule(c.train.lr, c.train.lr_schedule, c.train.steps, c.train.warmup_steps)
    optimizer = training.make_optimizer(schedule, c.train.b1, c.train.b2, c.train.eps, c.train.weight_decay,
                                        c.train.clip_grad_norm)
    # Made on the devices, placed as the step returns it: no copy through the host, no recompile on step 2.
    state = jax.jit(lambda t: training.TrainState.create(t, optimizer, jax.random.PRNGKey(c.seed)),
                    out_shardings=parallel.replicated(mesh))(parallel.put_global(mesh, tuned))
    store = checkpoints.TrainCheckpoints(workdir.checkpoints_dir(job_dir), strict=strict)
    start, restored = store.restore_latest(state)
    if start is not None:
        state = restored
        logging.info("resumed from step %d", start)
    if start != store.latest_step() and main:
        store.set_aside(newer_than=start)
    metrics_path = workdir.metrics_path(job_dir)
    if main:
        _truncate_metrics(metrics_path, int(state.step))

    train_step = training.make_train_step(model, scheduler, optimizer, c.train.loss)
    text = parallel.put_global(mesh, texts[train_prompt][None])
    pending, skipped = [], []  # device metrics, fetched every log_every steps so the loop never waits on the host
    try:  # a stopped run still finishes writing its last checkpoint
        for step in tqdm(range(int(state.step), c.train.steps), initial=int(state.step), total=c.train.steps,
                         desc="VMC tuning", unit="step", disable=not main):
            state, metrics = train_step(state, frozen, clips, text, weights)
            pending.append((step + 1, metrics))
            done = step + 1
            if done % c.train.log_every == 0 or done == c.train.steps or done % c.train.checkpoint_every == 0:
                skipped += _log_metrics(metrics_path if main else None, pending, schedule)
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
                if main:  # the later stages run on the main process alone (the others wait at the next step)
                    out_dir = workdir.samples_dir(job_dir, f"step_{done}")
                    generate.write_videos(videos, list(c.validation.prompts), out_dir, c.sampling.fps, overwrite=True)
                    generate.write_cascade(c, videos, texts, list(c.validation.prompts), stages, out_dir,
                                           overwrite=True)
    finally:
        store.wait()
    if skipped:
        logging.warning("skipped %d non-finite steps (first: step %d)", len(skipped), skipped[0])
    return state


def _log_metrics(path: str | None, pending: list, schedule) -> list[int]:
    """Appends a row per step to ``path`` (None: this process writes nothing); returns the steps
    whose loss or gradients were not finite (every process, so all of them stop together)."""
    rows, non_finite = [], []
    for step, metrics in jax.device_get(pending):
        if not metrics.pop("finite"):
            non_finite.append(step)
        rows.append({"step": step, "lr": float(schedule(step - 1)), **{k: float(v) for k, v in metrics.items()}})
    if path is not None:
        with open(path, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    return non_finite


def _truncate_metrics(path: str, step: int) -> None:
    """Drops rows a killed run logged after its last checkpoint, so a resumed log has no repeats."""
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        rows = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    files.write_text_atomic(path, "".join(rows))
