"""The one training loop of every job: steps from the restored step to the end, metrics fetched every
few steps, checkpoints, stops on a signal, a time budget or a step, and a hook after each step.

A job gives it a step function and where things go; the loop owns the schedule. A run resumed from
the checkpoint of a stopped one ends as an uninterrupted run ends, bit for bit and with the same
metric rows (the rows after the restored step are dropped, and written again); the rows also go to
TensorBoard, and a run that ends draws their curves (`vmc_jax.jobs.curves`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence, TypeVar

import jax
import numpy as np
from tqdm import tqdm

from vmc_jax import files, parallel
from vmc_jax.errors import TrainingDiverged
from vmc_jax.jobs import curves, preemption

State = TypeVar("State")
# Steps fetched together: (step, its metrics on the host, one dict per clip).
Fetched = list[tuple[int, list[dict[str, np.ndarray]]]]


@dataclasses.dataclass(frozen=True)
class Settings:
    """When the loop logs, checkpoints and stops."""

    steps: int
    log_every: int
    checkpoint_every: int
    time_budget_s: float = 0  # > 0: checkpoint and stop once the loop has run this many seconds (resumable)
    stop_at: int = 0  # > 0: checkpoint and stop after this step
    non_finite: str = "skip"  # a step whose loss or gradients are not finite: "stop" the run, or "skip" it
    lr: float = 0.0  # named when a non-finite step stops the run
    description: str = "training"  # the progress bar's

    @classmethod
    def from_config(cls, train: Any, description: str) -> "Settings":
        """The settings of a job's train section (typed or a ConfigDict; fields it lacks keep their defaults)."""
        return cls(train.steps, train.log_every, train.checkpoint_every, getattr(train, "time_budget_s", 0),
                   getattr(train, "stop_at", 0), getattr(train, "non_finite", "skip"), train.lr, description)


class Checkpoints(Protocol):
    """Where the loop saves the state (`vmc_jax.jobs.checkpoints.TrainCheckpoints` is one)."""

    def save(self, step: int, state: Any) -> None: ...

    def wait(self) -> None: ...


@dataclasses.dataclass(frozen=True)
class MetricsFiles:
    """The JSON-lines files the metrics go to, one per clip, and ``rows(fetched, seconds_per_step)``: the
    rows of each file for the fetched steps. ``stacked``: the step's metrics have a leading clip axis,
    entry i for ``paths[i]`` (the entries after them pad the axis)."""

    paths: Sequence[str]
    rows: Callable[[Fetched, float], Sequence[Sequence[Mapping[str, Any]]]]
    stacked: bool = False

    def per_clip(self, metrics: Mapping[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        if not self.stacked:
            return [dict(metrics)]
        return [{k: np.asarray(v)[i] for k, v in metrics.items()} for i in range(len(self.paths))]


def run(settings: Settings, step: Callable[[State, int], tuple[State, Mapping[str, jax.Array]]], state: State,
        start: int, checkpoints: Checkpoints, metrics: MetricsFiles, signals: preemption.StopOnSignal, workdir: str,
        after_step: Callable[[State, int], None] | None = None) -> State:
    """Takes steps ``start`` to ``settings.steps`` (or to ``stop_at``, or to a stop) of
    ``step(state, i) -> (state, metrics)`` (``i`` from 0; device metrics with "loss" and "finite");
    returns the last state.

    Every process of a job runs it; only the main one writes rows and shows the bar. After step n: the
    pending metrics are fetched every ``log_every`` steps and before a checkpoint (no host round trip a
    step); a checkpoint every ``checkpoint_every`` steps, at the end and before any stop; a signal raises
    ``signals.stopped`` (naming ``workdir``); a spent time budget or ``stop_at`` ends the loop with a
    warning; then ``after_step(state, n)``.
    """
    main = parallel.is_main_process()
    end = min(settings.steps, settings.stop_at) if settings.stop_at else settings.steps
    if start >= end and start < settings.steps:
        logging.warning("at step %d of %d already, not before train.stop_at=%d: no step taken", start,
                        settings.steps, settings.stop_at)
    for path in metrics.paths if main else ():
        files.drop_log_rows_after(path, start)  # a killed run's later rows
    events = curves.EventWriters(metrics.paths, start) if main else None
    pending, skipped, last_checkpoint = [], [], start or None
    began, window = time.perf_counter(), _Window()
    try:
        with tqdm(total=settings.steps, initial=start, desc=settings.description, unit="step",
                  disable=not main) as bar:
            for i in range(start, end):
                state, device_metrics = step(state, i)
                done = i + 1
                if i == start:  # it compiles: the rate and ETA count from the next step on
                    jax.block_until_ready(device_metrics)
                    window.first_step_done()
                else:
                    window.step_done()
                pending.append((done, device_metrics))
                bar.update()
                signalled = signals.should_stop(done)
                stop = _stop_reason(settings, done, time.perf_counter() - began)
                checkpointing = signalled or stop or done % settings.checkpoint_every == 0 or done == settings.steps
                if checkpointing or done % settings.log_every == 0:
                    fetched = [(n, metrics.per_clip(m)) for n, m in jax.device_get(pending)]  # waits for the steps
                    seconds = window.seconds_per_step()
                    skipped += _non_finite(fetched)
                    if main:
                        rows_per_log = metrics.rows(fetched, seconds)
                        for path, rows in zip(metrics.paths, rows_per_log):
                            files.append_json_lines(path, rows)
                        events.write(rows_per_log)
                    logging.info("%s", log_line(settings, fetched, seconds))
                    pending = []
                    window.restart()
                    if skipped and settings.non_finite == "stop":
                        raise _diverged(settings, skipped[0], last_checkpoint)
                if checkpointing:
                    with window.paused():
                        checkpoints.save(done, state)
                    last_checkpoint = done
                if signalled:  # before the hook: a preempted machine has seconds left
                    raise signals.stopped(done, settings.steps, workdir)
                if stop:
                    logging.warning("stopped at step %d of %d (%s); run again to resume", done, settings.steps, stop)
                    break
                if after_step:
                    with window.paused():
                        after_step(state, done)
    finally:  # a stopped run still finishes writing its last checkpoint
        checkpoints.wait()
        if events:
            events.close()
    if skipped:
        logging.warning("skipped %d non-finite steps (first: step %d)", len(skipped), skipped[0])
    for path in metrics.paths if main else ():
        curves.plot_curves(path, settings.log_every)
    return state


def log_line(settings: Settings, fetched: Fetched, seconds_per_step: float) -> str:
    """The progress line of a fetch: each clip's last loss and its mean over the fetched steps, steps/s, ETA."""
    done = fetched[-1][0]
    losses = np.array([[float(m["loss"]) for m in clips] for _, clips in fetched])  # (steps, clips)
    seconds_per_step = max(seconds_per_step, 1e-9)

    def numbers(values: np.ndarray) -> str:
        return " ".join(f"{x:.4g}" for x in values)

    return (f"step {done}/{settings.steps}: loss {numbers(losses[-1])} (mean {numbers(losses.mean(axis=0))} "
            f"over {len(fetched)} steps), {1 / seconds_per_step:.2f} steps/s, "
            f"ETA {(settings.steps - done) * seconds_per_step:.0f} s")


def _stop_reason(settings: Settings, done: int, elapsed_s: float) -> str | None:
    """Why to stop after step ``done`` before the end, if the settings say so."""
    if done >= settings.steps:
        return None
    if settings.time_budget_s and elapsed_s > settings.time_budget_s:
        return f"train.time_budget_s={settings.time_budget_s} spent"
    return f"train.stop_at={done}" if done == settings.stop_at else None


def _non_finite(fetched: Fetched) -> list[int]:
    """The fetched steps whose loss or gradients were not finite for some clip."""
    return [n for n, clips in fetched if not all(bool(m["finite"]) for m in clips)]


def _diverged(settings: Settings, step: int, last_checkpoint: int | None) -> TrainingDiverged:
    return TrainingDiverged(
        f"step {step}: the loss or the gradients are not finite (config.train.lr={settings.lr}); stopped, "
        f"last checkpoint: step {last_checkpoint}. Lower the learning rate, or set config.train.non_finite=skip "
        "to skip such steps")


class _Window:
    """The seconds a step took since the last fetch, leaving out checkpointing, the hook and the run's
    first step (its compilation), unless that is all there is."""

    def __init__(self) -> None:
        self.first_s = None
        self.restart()

    def restart(self) -> None:
        self.start, self.paused_s, self.steps = time.perf_counter(), 0.0, 0

    def step_done(self) -> None:
        self.steps += 1

    def first_step_done(self) -> None:
        """After the run's first step has finished: its time is kept apart."""
        self.first_s = time.perf_counter() - self.start - self.paused_s
        self.restart()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        began = time.perf_counter()
        try:
            yield
        finally:
            self.paused_s += time.perf_counter() - began

    def seconds_per_step(self) -> float:
        if self.steps == 0:  # only the first step since the last fetch
            return self.first_s
        return (time.perf_counter() - self.start - self.paused_s) / self.steps
