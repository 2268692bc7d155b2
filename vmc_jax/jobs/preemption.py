"""Stopping a training loop after a step, with its checkpoint, on SIGTERM or SIGINT.

Spot / preemptible TPU VMs and cluster schedulers send SIGTERM shortly before they take the
machine; Ctrl-C sends SIGINT. The loop asks :meth:`StopOnSignal.should_stop` once after every
step, writes a checkpoint when it says so and raises :class:`TrainingStopped`; the command then
prints where it stopped and how to resume, and exits with :data:`EXIT_CODE`.

- One process: this module's handler notes the signal.
- A multi-process job (``jax.distributed``): JAX's preemption notifier has taken SIGTERM, and
  every process stops after the same step, the one JAX's preemption sync point agrees on, so
  that together they write a complete checkpoint. SIGINT is passed on to it as a SIGTERM.

A second signal ends the process at once (the signal's own action: a shell reports 130 for
SIGINT, 143 for SIGTERM). A checkpoint cut short is never taken for one (orbax renames it into
place only when complete, so a rerun resumes from the previous one), and a metrics row cut short
is dropped when the run resumes (`files.drop_log_rows_after`).
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import sys
import threading
from typing import NoReturn, Sequence

import jax
from jax.experimental import multihost_utils

from vmc_jax.errors import TrainingStopped

# A run stopped on a signal after writing its checkpoint: the same command resumes it. Not 143
# (128 + SIGTERM), which a shell reports for a process that SIGTERM killed before it could save.
EXIT_CODE = 3
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopOnSignal:
    """While entered, SIGTERM and SIGINT ask the training loop to stop after its current step.

    The previous handlers are restored on exit. Signals that were ignored (``nohup``, the
    background jobs of a script) stay ignored; outside the main thread nothing is installed.
    """

    def __init__(self) -> None:
        self.reason: str | None = None  # the signal that asked this process to stop
        self._previous: dict[int, signal.Handlers | None] = {}
        self._steps = 0  # steps asked about since entering: the step id of JAX's sync protocol
        self._jax_notifier = False  # whether JAX's preemption notifier takes SIGTERM

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is not threading.main_thread():
            logging.warning("training outside the main thread: SIGTERM and SIGINT keep their own actions")
            return self
        if jax.distributed.is_initialized():
            try:
                multihost_utils.reached_preemption_sync_point(0)
            except RuntimeError:  # the service is off (jax_enable_preemption_service): no way to agree on a step
                logging.warning("JAX's preemption service is off: SIGTERM and SIGINT end this multi-process job "
                                "at once")
                return self
            self._jax_notifier = True
        for signum in SIGNALS:
            if signum == signal.SIGTERM and self._jax_notifier:
                continue
            if signal.getsignal(signum) != signal.SIG_IGN:
                self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, signal.SIG_DFL if previous is None else previous)

    def _on_signal(self, signum: int, frame) -> None:
        self.reason = signal.Signals(signum).name
        for other in self._previous:
            signal.signal(other, signal.SIG_DFL)  # a second signal ends the process
        if self._jax_notifier:
            os.kill(os.getpid(), signal.SIGTERM)  # to JAX's notifier, which tells the other processes

    def should_stop(self, step: int) -> bool:
        """Whether to stop after ``step``, the step just taken: asked once per step, by every process of a job."""
        self._steps += 1
        if not self._jax_notifier:
            stop = self.reason is not None
        # Counted from this run's first step, so that a notice that came while the job was starting
        # (every process's count still 0) stops it after one step, whatever step it resumed from.
        elif multihost_utils.reached_preemption_sync_point(self._steps):
            self.reason = self.reason or "SIGTERM"
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # JAX's notifier has done its part; a second one ends us
            stop = True
        else:
            stop = False
        if stop:
            logging.warning("%s: stopping after step %d, with a checkpoint; a second signal ends the process at once",
                            self.reason, step)
        return stop

    def stopped(self, step: int, steps: int, where: str) -> TrainingStopped:
        """The error that ends the run after ``step`` of ``steps``, its checkpoint written in ``where``."""
        return TrainingStopped(f"stopped by {self.reason} after step {step} of {steps}, "
                               f"its checkpoint written in {where}")


def exit_stopped(error: TrainingStopped, program: str, command: Sequence[str], at_once: bool = False) -> NoReturn:
    """Prints one line, where the run stopped and the command that resumes it (``command`` and this
    process's arguments), and exits with :data:`EXIT_CODE`.

    ``at_once``: for a process of a multi-process job, whose checkpoint is complete: it leaves without
    JAX's shutdown, which aborts a process whose coordinator has left first (exit -6, not 3).
    """
    print(f"{program}: {error}; resume with: {shlex.join([*command, *sys.argv[1:]])}", file=sys.stderr)
    if at_once:
        sys.stderr.flush()
        os._exit(EXIT_CODE)
    sys.exit(EXIT_CODE)
