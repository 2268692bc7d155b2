"""Preemption: SIGTERM and SIGINT stop `train` and world pretraining after the current step with a
complete checkpoint (exit code 3, one line naming the resume command), on every process of a job at
the same step; a second signal ends the process at once; the rerun ends bit-identical to a run
never stopped.

In-process runs get their signal at chosen moments (while the job starts, while a step computes,
while a checkpoint is written in the background) from a wrapper around the call of that moment,
and share one compiled train step, compiled normally (their numerics are compared bit for bit).
Command-line runs get theirs from the test, at moments it sees from outside: a logged step, and
the `<step>.orbax-checkpoint-tmp` folder of a checkpoint being written.
"""

import contextlib
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import types

import jax
import numpy as np
import pytest
from helpers import CLIP, FAST_COMPILE_ENV, REPO, free_port, tiny_config, uncached

from vmc_jax import files, training
from vmc_jax.errors import TrainingStopped
from vmc_jax.jobs import checkpoints, generate, preemption, tune, workdir, world_pretraining

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="POSIX signals, local multi-process jobs")
STEPS = 8
TIMEOUT = 600


@pytest.fixture
def one_compiled_step(monkeypatch):
    """make_train_step compiled once for all runs of a test (their configs are equal), each run calling
    it through ``shared.step``, which a test may wrap."""
    real, shared = training.make_train_step, types.SimpleNamespace(step=None)

    def make(*args, **kwargs):
        if shared.step is None:
            shared.step = real(*args, **kwargs)
        return lambda *step_args: shared.step(*step_args)

    monkeypatch.setattr(training, "make_train_step", make)
    return shared


@pytest.fixture
def python_sigint():
    """Python's own SIGINT handler for a test, as in a terminal: a test process that a non-interactive
    shell started in the background inherits SIGINT ignored, and StopOnSignal leaves ignored signals be."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def signal_after_call(owner, name: str, call: int, signum: int = signal.SIGTERM):
    """Makes ``owner.name`` send this process ``signum`` right after its ``call``-th call returns."""
    real, calls = getattr(owner, name), itertools.count(1)

    def wrapper(*args, **kwargs):
        result = real(*args, **kwargs)
        if next(calls) == call:
            os.kill(os.getpid(), signum)
        return result

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(owner, name, wrapper)
        yield


def metric_steps(path: str) -> list[int]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["step"] for line in f]


def assert_stopped_cleanly(job: str, step: int) -> None:
    """The checkpoint of ``step`` is the newest and restores, the metrics end there, the lock is gone."""
    assert checkpoints.TrainCheckpoints(workdir.checkpoints_dir(job)).restore_latest()[0] == step
    assert metric_steps(workdir.metrics_path(job)) == list(range(1, step + 1))
    assert not os.path.exists(os.path.join(job, workdir.LOCK_FILE))


def assert_same_bits(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_train_stops_at_each_moment_with_a_checkpoint_and_resumes_bit_identical(tiny_pipeline_flax, tmp_path,
                                                                                 one_compiled_step, python_sigint):
    config = tiny_config(tiny_pipeline_flax, steps=STEPS)
    config.train.checkpoint_every = 3
    whole = tune.train_and_evaluate(config, str(tmp_path / "whole"))
    job = str(tmp_path / "job")
    handlers = {signum: signal.getsignal(signum) for signum in preemption.SIGNALS}

    moments = [  # (where the signal comes from, the signal, the step the run stops after)
        ((generate, "load_keyframe_unet", 1), signal.SIGTERM, 1),  # while the job starts: after one step
        ((checkpoints.TrainCheckpoints, "save", 1), signal.SIGTERM, 4),  # while step 3's checkpoint is written
        ((one_compiled_step, "step", 1), signal.SIGINT, 5),  # while step 5 computes
    ]
    for (owner, name, call), signum, step in moments:
        with signal_after_call(owner, name, call, signum), pytest.raises(TrainingStopped) as stopped:
            tune.train_and_evaluate(config, job)
        assert str(stopped.value) == (f"stopped by {signal.Signals(signum).name} after step {step} of {STEPS}, "
                                      f"its checkpoint written in {job}")
        assert_stopped_cleanly(job, step)
        assert {signum: signal.getsignal(signum) for signum in preemption.SIGNALS} == handlers

    resumed = tune.train_and_evaluate(config, job)
    assert_same_bits(resumed, whole)
    with open(workdir.metrics_path(job)) as a, open(workdir.metrics_path(str(tmp_path / "whole"))) as b:
        assert a.read() == b.read()


def test_a_metrics_row_cut_short_by_a_kill_is_dropped_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": step, "loss": 0.5}) + "\n" for step in (1, 2, 3)) + '{"step": 4, "lo')
    files.drop_log_rows_after(str(path), 3)  # the resumed run's checkpoint: step 3
    assert metric_steps(str(path)) == [1, 2, 3]


# --- the command line: signals from outside, at moments seen from outside -----------------------------


def cli_env(devices: int) -> dict[str, str]:
    """This venv's commands first on PATH, ``devices`` CPU devices, XLA mostly unoptimised (behaviour only)."""
    return {**os.environ, **FAST_COMPILE_ENV, "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
            "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}


def train_command(pretrained: str, job: str) -> list[str]:
    return ["vmc-jax", "train", "--config", os.path.join(REPO, "configs", "vmc.py") + ":tiny", "--workdir", job,
            f"--config.pretrained={pretrained}", f"--config.video={CLIP}", "--config.data.num_frames=4",
            "--config.data.height=16", "--config.data.width=32", f"--config.train.steps={STEPS}",
            "--config.train.checkpoint_every=3", "--config.train.batch_size=4", "--config.validation.every=0"]


# Runs ``argv[1:]`` with SIGINT as a terminal's foreground job has it, whoever started the tests (a
# script's background jobs have it ignored, and a run keeps an ignored signal ignored).
DEFAULT_SIGINT = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                  "os.execvp(sys.argv[1], sys.argv[1:])")


class Run:
    """A command in the background, its stderr in ``log``."""

    def __init__(self, command: list[str], log: str, env: dict[str, str]):
        self.log = log
        with open(log, "w") as err:
            self.process = subprocess.Popen([sys.executable, "-c", DEFAULT_SIGINT, *command], env=env, cwd=REPO,
                                            stdout=subprocess.DEVNULL, stderr=err)

    def stderr(self) -> str:
        with open(self.log, encoding="utf-8") as f:
            return f.read()

    def wait_until(self, condition, what: str) -> None:
        deadline = time.monotonic() + TIMEOUT
        while not condition():
            assert self.process.poll() is None, f"exit {self.process.returncode} before {what}: {self.stderr()[-3000:]}"
            assert time.monotonic() < deadline, f"no {what} in {TIMEOUT} s"
            time.sleep(0.002)

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def finish(self) -> tuple[int, str]:
        """(exit code, the last line of stderr); no traceback on the way."""
        code = self.process.wait(timeout=TIMEOUT)
        err = self.stderr()
        assert "Traceback" not in err, err[-3000:]
        return code, (err.strip().splitlines() or [""])[-1]


def logged(path: str, rows: int):
    """Whether the metrics file ``path`` holds ``rows`` rows."""
    return lambda: os.path.isfile(path) and len(metric_steps(path)) >= rows


def writing_a_checkpoint(job: str):
    folder = workdir.checkpoints_dir(job)
    return lambda: os.path.isdir(folder) and any("orbax-checkpoint-tmp" in name for name in os.listdir(folder))


def stopped_line(program: str, job: str) -> re.Pattern:
    return re.compile(rf"{program}: stopped by (SIGTERM|SIGINT) after step (\d+) of {STEPS}, its checkpoint "
                      rf"written in {re.escape(job)}; resume with: (.+)")


def test_cli_sigterm_exits_3_naming_the_resume_command_and_a_second_sigint_ends_at_once(tiny_pipeline_flax, tmp_path):
    job, env = str(tmp_path / "job"), cli_env(1)
    command = train_command(tiny_pipeline_flax, job)

    run = Run(command, str(tmp_path / "1.log"), env)
    run.wait_until(logged(workdir.metrics_path(job), 1), "a logged step")
    run.signal(signal.SIGTERM)
    code, line = run.finish()
    assert code == preemption.EXIT_CODE, line
    match = stopped_line("vmc-jax", job).fullmatch(line)
    assert match and match[1] == "SIGTERM", line
    assert shlex.split(match[3]) == command  # the exact command resumes
    stopped_at = int(match[2])
    assert_stopped_cleanly(job, stopped_at)

    # The printed command; Ctrl-C once a further step is logged, again while the checkpoint is written.
    run = Run(shlex.split(match[3]), str(tmp_path / "2.log"), env)
    run.wait_until(logged(workdir.metrics_path(job), stopped_at + 1), "a logged step")
    run.signal(signal.SIGINT)
    run.wait_until(lambda: "SIGINT: stopping after step" in run.stderr(), "the stop")
    run.wait_until(writing_a_checkpoint(job), "a checkpoint write")
    run.signal(signal.SIGINT)
    code, _ = run.finish()
    assert code == -signal.SIGINT  # ended by the signal's own action: a shell reports 130
    assert writing_a_checkpoint(job)(), "the second signal came after the write"
    store = checkpoints.TrainCheckpoints(workdir.checkpoints_dir(job))
    assert store.restore_latest()[0] == max(store.manager.all_steps()) >= stopped_at  # the previous one is intact

    run = Run(command, str(tmp_path / "3.log"), env)
    code, line = run.finish()
    assert code == 0, line
    assert metric_steps(workdir.metrics_path(job)) == list(range(1, STEPS + 1))
    assert checkpoints.TrainCheckpoints(workdir.checkpoints_dir(job)).restore_latest()[0] == STEPS


def two_processes(pretrained: str, job: str, logs: str, env: dict[str, str]) -> list[Run]:
    """The tiny job as 2 processes x 2 CPU devices (jax.distributed on localhost), as a pod slice runs it."""
    port = free_port()
    return [Run([*train_command(pretrained, job), f"--coordinator=localhost:{port}", "--num_processes=2",
                 f"--process_id={i}"], f"{logs}_{i}.log", env) for i in range(2)]


def test_two_processes_stop_after_the_same_step_and_resume(tiny_pipeline_flax, tmp_path):
    """Behaviour only (a 1-process resume is compared bit for bit above, a 2-process one after a kill in
    end_to_end/test_multihost.py)."""
    env, job = uncached(cli_env(2)), str(tmp_path / "job")
    runs = two_processes(tiny_pipeline_flax, job, str(tmp_path / "stopped"), env)
    runs[0].wait_until(logged(workdir.metrics_path(job), 1), "a logged step")
    for run in runs:  # one SIGTERM to each process, as a preempted slice gets
        run.signal(signal.SIGTERM)
    ends = [run.finish() for run in runs]
    assert [code for code, _ in ends] == [preemption.EXIT_CODE] * 2, ends
    matches = [stopped_line("vmc-jax", job).fullmatch(line) for _, line in ends]
    assert all(matches) and matches[0][2] == matches[1][2], ends  # both after the same step
    assert_stopped_cleanly(job, int(matches[0][2]))

    assert [run.finish()[0] for run in two_processes(tiny_pipeline_flax, job, str(tmp_path / "resumed"), env)] == [0, 0]
    assert metric_steps(workdir.metrics_path(job)) == list(range(1, STEPS + 1))
    assert checkpoints.TrainCheckpoints(workdir.checkpoints_dir(job)).restore_latest()[0] == STEPS


def test_world_pretraining_stops_with_exit_3_and_its_checkpoint_and_resumes(tmp_path):
    """Behaviour (a resume of world pretraining is compared bit for bit in end_to_end/test_world_pretraining.py)."""
    folder = str(tmp_path / "world")
    command = ["vmc-jax", "world-pretrain", "--config", "configs/world.py:test", "--workdir", folder,
               f"--config.train.steps={STEPS}"]
    metrics = os.path.join(folder, world_pretraining.METRICS_FILE)
    run = Run(command, str(tmp_path / "stopped.log"), cli_env(1))
    run.wait_until(logged(metrics, 1), "a logged step")
    run.signal(signal.SIGTERM)
    code, line = run.finish()
    assert code == preemption.EXIT_CODE, line
    match = stopped_line("vmc-jax", folder).fullmatch(line)
    assert match and shlex.split(match[3]) == command, line
    step = int(match[2])
    assert checkpoints.TrainCheckpoints(os.path.join(folder, "checkpoints")).restore_latest()[0] == step
    assert metric_steps(metrics) == list(range(1, step + 1))

    code, line = Run(command, str(tmp_path / "resumed.log"), cli_env(1)).finish()
    assert code == 0, line
    assert metric_steps(metrics) == list(range(1, STEPS + 1))
