"""The training loop of every job (`vmc_jax.jobs.loop`) on a toy step over a tiny pytree: resuming,
stops, metrics fetched only when logged, the non-finite policy, one metrics file per stacked clip,
the TensorBoard events and the curves' PNG."""

import glob
import json
import logging
import struct
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vmc_jax.errors import TrainingDiverged, TrainingStopped
from vmc_jax.jobs import curves, loop, preemption

SETTINGS = loop.Settings(steps=7, log_every=2, checkpoint_every=3, lr=0.1)


@jax.jit
def toy_step(state, i):
    """Moves ``w`` by an amount that depends on the step, so a resume from the wrong step shows."""
    w = state["w"] * 0.9 + 0.01 * i
    loss = jnp.sum(w ** 2)
    return {"w": w, "count": state["count"] + 1}, {"loss": loss, "finite": jnp.isfinite(loss)}


def fresh():
    return {"w": jnp.arange(3, dtype=jnp.float32), "count": jnp.int32(0)}


class MemoryCheckpoints:
    """The saved states by step, on the host."""

    def __init__(self):
        self.saved = {}

    def save(self, step, state):
        self.saved[step] = jax.tree.map(np.asarray, state)

    def wait(self):
        pass


def per_step_rows(fetched, seconds_per_step):
    return [[{"step": n, "loss": float(clips[i]["loss"])} for n, clips in fetched] for i in range(len(fetched[0][1]))]


def run(tmp_path, name, settings=SETTINGS, step=toy_step, state=None, start=0, store=None, signals=None, **kwargs):
    """(final state, checkpoints, metrics file) of a loop in ``tmp_path/name``."""
    store = store or MemoryCheckpoints()
    path = tmp_path / f"{name}.jsonl"
    metrics = loop.MetricsFiles([str(path)], per_step_rows)
    with preemption.StopOnSignal() if signals is None else signals as signals:
        final = loop.run(settings, step, fresh() if state is None else state, start, store, metrics, signals,
                         str(tmp_path), **kwargs)
    return final, store, path


def rows(path):
    return [json.loads(line) for line in open(path)]


def assert_same_bits(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_a_run_stopped_then_resumed_ends_as_an_uninterrupted_one(tmp_path, caplog):
    whole, saved, whole_metrics = run(tmp_path, "whole")
    assert sorted(saved.saved) == [3, 6, 7]

    with caplog.at_level(logging.WARNING):  # stop_at: a checkpoint, a warning, and the state of that step
        stopped, store, path = run(tmp_path, "stopped", loop.Settings(**{**vars(SETTINGS), "stop_at": 4}))
    assert "stopped at step 4 of 7 (train.stop_at=4); run again to resume" in caplog.text
    assert sorted(store.saved) == [3, 4] and int(stopped["count"]) == 4
    assert [r["step"] for r in rows(path)] == [1, 2, 3, 4]

    with caplog.at_level(logging.WARNING):  # resumed at stop_at (or past it): no step, the state as it was
        again, _, _ = run(tmp_path, "stopped", loop.Settings(**{**vars(SETTINGS), "stop_at": 4}),
                          state=store.saved[4], start=4, store=store)
    assert "at step 4 of 7 already, not before train.stop_at=4: no step taken" in caplog.text
    assert_same_bits(again, store.saved[4])
    assert [r["step"] for r in rows(path)] == [1, 2, 3, 4]

    resumed, _, path = run(tmp_path, "stopped", state=store.saved[4], start=4, store=store)
    assert_same_bits(resumed, whole)
    assert path.read_text() == whole_metrics.read_text()

    # a signal: the checkpoint of the step it came after, then TrainingStopped
    def signalled_after_5(state, i):
        if i == 4:
            signals.reason = "SIGTERM"
        return toy_step(state, i)

    signals, store = preemption.StopOnSignal(), MemoryCheckpoints()
    with pytest.raises(TrainingStopped, match="^stopped by SIGTERM after step 5 of 7, its checkpoint written in "):
        run(tmp_path, "signalled", step=signalled_after_5, store=store, signals=signals)
    assert sorted(store.saved) == [3, 5]
    # resumed from the older checkpoint (the newer one lost): the rows after it are written again
    resumed, _, path = run(tmp_path, "signalled", state=store.saved[3], start=3)
    assert_same_bits(resumed, whole)
    assert path.read_text() == whole_metrics.read_text()


def test_a_spent_time_budget_stops_with_a_checkpoint_and_resumes(tmp_path, caplog):
    def slow_step(state, i):
        time.sleep(0.02)
        return toy_step(state, i)

    settings = loop.Settings(steps=40, log_every=5, checkpoint_every=10, time_budget_s=0.1)
    with caplog.at_level(logging.WARNING):
        stopped, store, path = run(tmp_path, "budget", settings, step=slow_step)
    step = int(stopped["count"])
    assert 1 <= step < 40, step
    assert max(store.saved) == step
    assert f"stopped at step {step} of 40 (train.time_budget_s=0.1 spent)" in caplog.text
    assert [r["step"] for r in rows(path)] == list(range(1, step + 1))

    resumed, _, _ = run(tmp_path, "budget", loop.Settings(steps=40, log_every=5, checkpoint_every=10),
                        state=store.saved[step], start=step)
    whole, _, _ = run(tmp_path, "whole", loop.Settings(steps=40, log_every=5, checkpoint_every=10))
    assert_same_bits(resumed, whole)


def test_metrics_are_fetched_only_at_log_and_checkpoint_steps(tmp_path, monkeypatch):
    real, fetches = jax.device_get, []

    def counting(tree):
        fetches.append([step for step, _ in tree])
        return real(tree)

    monkeypatch.setattr(jax, "device_get", counting)
    settings = loop.Settings(steps=11, log_every=4, checkpoint_every=6)
    after = []
    run(tmp_path, "fetches", settings, store=MemoryCheckpoints(), after_step=lambda state, step: after.append(step))
    # the steps fetched together: every 4 steps, before the checkpoint of step 6, and at the end
    assert fetches == [[1, 2, 3, 4], [5, 6], [7, 8], [9, 10, 11]]
    assert after == list(range(1, 12))


def test_the_first_non_finite_step_stops_the_run_before_its_checkpoint_or_is_skipped(tmp_path, caplog):
    def nan_from_step_3(state, i):
        state, metrics = toy_step(state, i)
        return state, {**metrics, "finite": jnp.bool_(i < 2)}

    settings = loop.Settings(steps=5, log_every=1, checkpoint_every=2, non_finite="stop", lr=1e30)
    store = MemoryCheckpoints()
    with pytest.raises(TrainingDiverged) as diverged:
        run(tmp_path, "stop", settings, step=nan_from_step_3, store=store)
    assert str(diverged.value) == ("step 3: the loss or the gradients are not finite (config.train.lr=1e+30); stopped, "
                                   "last checkpoint: step 2. Lower the learning rate, or set "
                                   "config.train.non_finite=skip to skip such steps")
    assert sorted(store.saved) == [2]

    with caplog.at_level(logging.WARNING):
        final, _, _ = run(tmp_path, "skip", loop.Settings(**{**vars(settings), "non_finite": "skip"}),
                          step=nan_from_step_3)
    assert int(final["count"]) == 5
    assert "skipped 3 non-finite steps (first: step 3)" in caplog.text


def test_stacked_clips_get_a_metrics_file_each_and_the_log_line_their_losses(tmp_path, caplog):
    """Three entries on the clip axis, the last padding: two files; the log shows each clip's last loss and mean."""
    def stacked_step(state, i):
        loss = jnp.array([1.0, 2.0, 9.0]) * (i + 1)
        return state, {"loss": loss, "finite": jnp.ones(3, bool)}

    paths = [str(tmp_path / f"{clip}.jsonl") for clip in "ab"]
    metrics = loop.MetricsFiles(paths, per_step_rows, stacked=True)
    with caplog.at_level(logging.INFO), preemption.StopOnSignal() as signals:
        loop.run(loop.Settings(steps=4, log_every=2, checkpoint_every=10), stacked_step, fresh(), 0,
                 MemoryCheckpoints(), metrics, signals, str(tmp_path))
    assert [[r["loss"] for r in rows(path)] for path in paths] == [[1, 2, 3, 4], [2, 4, 6, 8]]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert lines[-1].startswith("step 4/4: loss 4 8 (mean 3.5 7 over 2 steps), ")
    assert lines[-1].endswith(" steps/s, ETA 0 s")


def scalars(metrics_path):
    """{(tag, step): [values]} as TensorBoard keeps the log's events: the files in the order of their
    names, a run's start (SessionLog.START at step s) dropping the earlier files' points from step s on."""
    from tensorboardX.proto.event_pb2 import Event, SessionLog

    shown = {}
    for name in sorted(glob.glob(f"{curves.events_dir(metrics_path)}/events.out.tfevents.*")):
        data = open(name, "rb").read()
        at = 0
        while at < len(data):  # TFRecord: length (u64), its crc (u32), the record, its crc (u32)
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4
            if event.session_log.status == SessionLog.START:
                shown = {key: values for key, values in shown.items() if key[1] < event.step}
            for value in event.summary.value:
                shown.setdefault((value.tag, event.step), []).append(value.simple_value)
    return shown


def test_tensorboard_keeps_one_point_a_step_across_resumes_and_the_end_draws_a_png(tmp_path):
    (tmp_path / "whole").mkdir(), (tmp_path / "resumed").mkdir()
    _, _, whole = run(tmp_path / "whole", "metrics")
    assert scalars(str(whole)) == {("loss", row["step"]): [pytest.approx(row["loss"])] for row in rows(whole)}
    assert open(curves.png_path(str(whole)), "rb").read(8) == b"\x89PNG\r\n\x1a\n"

    signals, store = preemption.StopOnSignal(), MemoryCheckpoints()

    def signalled_after_5(state, i):
        if i == 4:
            signals.reason = "SIGTERM"
        state, metrics = toy_step(state, i)
        return state, {**metrics, "loss": metrics["loss"] + 100.0}  # points the resume must replace

    with pytest.raises(TrainingStopped):  # steps 1-5 logged, checkpoints at 3 and 5
        run(tmp_path / "resumed", "metrics", step=signalled_after_5, store=store, signals=signals)
    assert not glob.glob(str(tmp_path / "resumed" / "*.png"))  # a signalled run leaves at once
    _, _, resumed = run(tmp_path / "resumed", "metrics", state=store.saved[3], start=3)  # steps 4 and 5 again
    shown = scalars(str(resumed))
    assert sorted(step for _, step in shown) == list(range(1, 8))
    assert all(len(values) == 1 for values in shown.values())  # no stale point left beside a new one
    assert [shown["loss", step][0] > 100 for step in range(1, 8)] == [True] * 3 + [False] * 4


def test_the_rate_leaves_out_the_first_step_where_it_compiles(tmp_path):
    """Each run's first step takes 0.5 s (a compile), the others none: the rates are the fast steps'."""
    def slow_first_call():
        calls = []

        def step(state, i):
            time.sleep(0.0 if calls else 0.5)
            calls.append(i)
            return toy_step(state, i)
        return step

    seen = []

    def rows_and_rate(fetched, seconds_per_step):
        seen.append(seconds_per_step)
        return per_step_rows(fetched, seconds_per_step)

    settings = loop.Settings(steps=8, log_every=4, checkpoint_every=5)
    metrics = loop.MetricsFiles([str(tmp_path / "m.jsonl")], rows_and_rate)
    with preemption.StopOnSignal() as signals:
        final = loop.run(settings, slow_first_call(), fresh(), 0, MemoryCheckpoints(), metrics, signals, str(tmp_path))
        loop.run(settings, slow_first_call(), final, 5, MemoryCheckpoints(), metrics, signals, str(tmp_path))
    assert len(seen) == 4 and max(seen) < 0.1, seen  # fetched after steps 4, 5 and 8, and after 8 from 5
