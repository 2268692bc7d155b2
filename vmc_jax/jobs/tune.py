"""The VMC tuning job: tune the keyframe UNet's temporal attention on one clip (or several at once),
validate, checkpoint; its steps run in the loop of `vmc_jax.jobs.loop`.

``train_and_evaluate(config, workdir)`` is what ``vmc-jax train`` runs. A killed run started
again with the same workdir resumes from its last readable checkpoint and ends bit-identical to
an uninterrupted one. The first non-finite step stops the run (``train.non_finite="stop"``) or
is skipped and counted ("skip"); no checkpoint ever holds its values. SIGTERM or SIGINT (a
preempted VM, a scheduler, Ctrl-C) stops it after the current step with a checkpoint, on every
process of a job at the same step (`vmc_jax.jobs.preemption`).

The step runs under ``jit`` on the ``config.mesh`` devices (`vmc_jax.parallel`), on one host or
several: every process runs the loop, feeds its own rows of the batch and writes its part of
each checkpoint; only the main process holds the lock and writes the config, metrics and samples.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable, Iterable

import jax
import ml_collections
import numpy as np

from vmc_jax import parallel, prompts, training
from vmc_jax.jobs import cascade_runner, checkpoints, config as jobs_config, generate, loop, preemption, workdir


def train_and_evaluate(config: ml_collections.ConfigDict, job_dir: str, strict: bool = False) -> training.TrainState:
    """Runs (or resumes) the tuning job in ``job_dir`` under its lock; returns the final train state.

    With ``config.clips``, every clip is tuned at once (its own tuned weights and optimizer state,
    over the mesh's "clips" axis, padded with copies of the last clip to a multiple of its size),
    each in its own one-clip job folder ``job_dir/<name>`` that ``generate`` and ``export`` read;
    the returned state is then stacked on a leading clip axis, in the order of ``config.clips``.
    ``strict``: refuse an unreadable latest checkpoint instead of resuming from the previous one.
    """
    job = jobs_config.Job.from_config(config)  # the one read of the ConfigDict: below, its typed sections
    os.makedirs(job_dir, exist_ok=True)
    with preemption.StopOnSignal() as signals:
        if not parallel.is_main_process():  # the main process holds the lock for the whole job
            return _train(job, job_dir, strict, signals)
        with workdir.TrainLock(job_dir):
            return _train(job, job_dir, strict, signals)


@dataclasses.dataclass(frozen=True)
class _ClipJob:
    """One clip of the job: its name ("" for a one-clip job), folder and one-clip config."""

    name: str
    folder: str
    config: jobs_config.Job

    @property
    def train_prompt(self) -> str:
        return self.config.invariant_prompt or prompts.appearance_invariant(self.config.prompt)


def _clip_jobs(job: jobs_config.Job, job_dir: str) -> list[_ClipJob]:
    per_clip = job.one_clip_jobs()
    if not per_clip:
        return [_ClipJob("", job_dir, job)]
    return [_ClipJob(name, os.path.join(job_dir, name), one) for name, one in per_clip.items()]


def _train(c: jobs_config.Job, job_dir: str, strict: bool, signals: preemption.StopOnSignal) -> training.TrainState:
    main = parallel.is_main_process()
    jobs = _clip_jobs(c, job_dir)
    stacked = bool(c.clips)
    mesh = parallel.make_mesh(dataclasses.asdict(c.mesh))
    if not stacked and mesh.shape["clips"] != 1:
        raise ValueError(f"config.mesh.clips={c.mesh.clips}: a one-clip job; give its devices to config.mesh.data, "
                         "or list several clips in config.clips")
    logging.info("mesh: %s; %d clip(s)", parallel.describe(mesh), len(jobs))
    stages = cascade_runner.checked_stages(c, list(c.validation.stages))  # before any sampling
    videos = [generate.training_clip(j.config) for j in jobs]  # what can refuse, before the first write
    model, params, scheduler = generate.load_keyframe_unet(c)
    texts = prompts.embed_prompts(c.pretrained, [*(j.train_prompt for j in jobs), "", c.sampling.negative_prompt,
                                                 *(p for j in jobs for p in j.config.validation.prompts)], job_dir)
    if main:
        workdir.save_config(job_dir, c.to_config())
        for job in jobs if stacked else ():
            os.makedirs(job.folder, exist_ok=True)
            workdir.save_config(job.folder, job.config.to_config())
    for job, video in zip(jobs, videos):
        logging.info("%straining prompt %r on %s (%d frames, %dx%d)", f"{job.name}: " if job.name else "",
                     job.train_prompt, job.config.video, *video.shape[:3])

    # The batch of noisy copies over the "data" axis; padding copies (batch policy) weigh nothing.
    # Several clips: stacked over the "clips" axis, padded with copies of the last (results dropped).
    batch = parallel.padded_size(c.train.batch_size, mesh.shape["data"])
    if batch != c.train.batch_size:
        logging.warning("train.batch_size=%d padded to %d for %d devices on the data axis (padding weighs 0)",
                        c.train.batch_size, batch, mesh.shape["data"])
    row_weights = (np.arange(batch) < c.train.batch_size).astype(np.float32)
    copies = [np.repeat(video[None], batch, axis=0) for video in videos]
    if stacked:
        n = parallel.padded_size(len(jobs), mesh.shape["clips"])
        padded = list(range(len(jobs))) + [len(jobs) - 1] * (n - len(jobs))
        clips = parallel.put_global(mesh, np.stack([copies[i] for i in padded]), "clips", "data")
        text = parallel.put_global(mesh, np.stack([texts[jobs[i].train_prompt][None] for i in padded]), "clips")
        weights = parallel.put_global(mesh, np.tile(row_weights, (n, 1)), "clips", "data")
    else:
        clips = parallel.global_batch(mesh, copies[0], "data")
        text = parallel.put_global(mesh, texts[jobs[0].train_prompt][None])
        weights = parallel.global_batch(mesh, row_weights, "data") if batch != c.train.batch_size else None

    tuned, frozen = training.split_params(params, c.train.tuned_params)
    frozen = parallel.put_global(mesh, frozen)  # once: the frozen weights stay on the devices
    schedule = training.lr_schedule(c.train.lr, c.train.lr_schedule, c.train.steps, c.train.warmup_steps)
    optimizer = training.make_optimizer(schedule, c.train.b1, c.train.b2, c.train.eps, c.train.weight_decay,
                                        c.train.clip_grad_norm)
    one_state = jax.jit(lambda t: training.TrainState.create(t, optimizer, jax.random.PRNGKey(c.seed)),
                        out_shardings=parallel.replicated(mesh))
    stores = [checkpoints.TrainCheckpoints(workdir.checkpoints_dir(j.folder), strict=strict) for j in jobs]
    # Made on the devices, placed as the step returns it: no copy through the host, no recompile on step 2.
    fresh = one_state(parallel.put_global(mesh, tuned))
    start, restored = _restore(stores, fresh, main)
    per_clip = restored or [fresh] * len(jobs)
    if stacked:  # each clip from its own checkpoint (or the start), with the seed a one-clip job of it has
        stack = jax.jit(lambda *states: jax.tree.map(lambda *leaves: jax.numpy.stack(leaves), *states),
                        out_shardings=parallel.sharded(mesh, "clips"))
        state = stack(*[per_clip[i] for i in padded])
    else:
        state = per_clip[0]
    if start is not None:
        logging.info("resumed from step %d", start)
    clip_state = jax.jit(lambda s, i: jax.tree.map(lambda x: x[i], s), out_shardings=parallel.replicated(mesh))

    def each_clip(state: training.TrainState) -> list[training.TrainState]:
        return [clip_state(state, i) for i in range(len(jobs))] if stacked else [state]

    def validate(state: training.TrainState, step: int) -> None:
        if c.validation.every and (step % c.validation.every == 0 or step == c.train.steps):
            _validate(jobs, videos, model, (training.merge_params(one.tuned, frozen) for one in each_clip(state)),
                      scheduler, texts, c.cascade, stages, step, main)

    train_step = training.make_train_step(model, scheduler, optimizer, c.train.loss, per_clip=stacked)
    metrics = loop.MetricsFiles([workdir.metrics_path(j.folder) for j in jobs], _metric_rows(schedule), stacked)
    state = loop.run(loop.Settings.from_config(c.train, "VMC tuning"),
                     lambda state, _: train_step(state, frozen, clips, text, weights), state, start or 0,
                     _ClipCheckpoints(stores, each_clip), metrics, signals, job_dir, after_step=validate)
    return jax.tree.map(lambda x: x[:len(jobs)], state) if stacked else state


@dataclasses.dataclass(frozen=True)
class _ClipCheckpoints:
    """Each clip's part of the train state in that clip's own store."""

    stores: list[checkpoints.TrainCheckpoints]
    each_clip: Callable[[training.TrainState], list[training.TrainState]]

    def save(self, step: int, state: training.TrainState) -> None:
        for store, one in zip(self.stores, self.each_clip(state)):
            store.save(step, one)

    def wait(self) -> None:
        for store in self.stores:
            store.wait()


def _restore(stores: list[checkpoints.TrainCheckpoints], like: training.TrainState,
             main: bool) -> tuple[int | None, list[training.TrainState] | None]:
    """(step, one state per clip) of the newest step every clip's store holds readable, or (None, None).

    A clip whose store went further (a run killed while writing a checkpoint of all clips) has
    its newer steps set aside, so every clip resumes from the same step.
    """
    restored = [store.restore_latest(like) for store in stores]
    steps = [step for step, _ in restored]
    start = None if None in steps else min(steps)
    for store, step in zip(stores, steps):
        if main and store.latest_step() != start:
            store.set_aside(newer_than=start)
    if start is None:
        return None, None
    if any(step != start for step in steps):
        restored = [store.restore_latest(like) for store in stores]
    return start, [state for _, state in restored]


def _validate(jobs: list[_ClipJob], videos: list[np.ndarray], model: Any, clip_params: Iterable[Any], scheduler: Any,
              texts: dict[str, np.ndarray], cascade_settings: jobs_config.Cascade, stages: list[str],
              step: int, main: bool) -> None:
    """Keyframe samples of each clip's validation prompts (``clip_params``: its tuned weights) into its
    samples folder, then the later ``stages`` of all of them in one cascade run (each stage loaded once)."""
    samples = []
    for job, video, params in zip(jobs, videos, clip_params):
        c, prompt_list = job.config, list(job.config.validation.prompts)
        one = generate.Samples(workdir.samples_dir(job.folder, f"step_{step}"), prompt_list,
                               generate.keyframe_videos(model, params, scheduler, video, texts, prompt_list,
                                                        c.inversion, c.sampling, c.seed))
        if main:
            generate.write_videos(one.videos, prompt_list, one.out_dir, c.sampling.fps, overwrite=True)
        samples.append(one)
    if main:  # the later stages run on the main process alone (the others wait at the next step)
        generate.write_cascade(cascade_settings, jobs[0].config.seed, stages, texts, samples, overwrite=True)


def _metric_rows(schedule: Callable[[int], Any]) -> Callable[[loop.Fetched, float], list[list[dict[str, float]]]]:
    """The metrics files' rows: one a step for each clip, with its learning rate."""
    def rows(fetched: loop.Fetched, seconds_per_step: float) -> list[list[dict[str, float]]]:
        return [[{"step": step, "lr": float(schedule(step - 1)),
                  **{k: float(v) for k, v in per_clip[clip].items() if k != "finite"}} for step, per_clip in fetched]
                for clip in range(len(fetched[0][1]))]
    return rows
