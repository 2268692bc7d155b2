"""A job's train checkpoints: orbax, written atomically, restored from the newest readable."""

from __future__ import annotations

import contextlib
import logging
import os
import re
from typing import Any, Callable, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp

from vmc_jax import files
from vmc_jax.errors import JobError


def brief(error: BaseException) -> str:
    """One short line for an orbax / TensorStore error, which appends pages of details to its first line."""
    text = str(error)
    os_error = re.search(r"os_error_code='(\d+)'", text)
    if os_error:  # TensorStore's storage errors end in the errno of the failed write or read
        return f"{os.strerror(int(os_error.group(1)))} (errno {os_error.group(1)})"
    lines = text.strip().splitlines()
    first = f"{type(error).__name__}: {lines[0].split(' See full TensorStore details')[0] if lines else ''}"
    return first if len(first) <= 200 else first[:197] + "..."


@contextlib.contextmanager
def _quiet_async_errors() -> Iterator[None]:
    """Silences asyncio's 'Task exception was never retrieved' reports of orbax's reader tasks."""
    logger = logging.getLogger("asyncio")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


class _CheckpointManager(ocp.CheckpointManager):
    """orbax's manager, which leaves JAX's preemption sync point to the training loop: the loop
    counts its own steps there (`vmc_jax.jobs.preemption`), and a query with another count would move it."""

    def reached_preemption(self, step: int) -> bool:
        return False


class TrainCheckpoints:
    """The train state every N steps in ``directory/<step>``, the newest few kept (orbax).

    A step that fails to restore is reported in one line and the next older one is tried
    (``strict`` refuses instead); a storage error while saving is reported once, as a JobError.
    """

    def __init__(self, directory: str, max_to_keep: int = 2, strict: bool = False, create: bool = True):
        """``create=False`` for readers (generate, export): a missing ``directory`` is not made, just empty."""
        self.directory = os.path.abspath(directory)
        self.strict = strict
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create)
        self.manager = _CheckpointManager(self.directory, options=options,
                                          item_handlers=ocp.StandardCheckpointHandler())
        self._writing: int | None = None  # the step being written in the background

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any) -> None:
        """Starts writing ``state`` as ``step`` in the background, after the previous write has finished."""
        self.wait()
        self._writing = step
        self._reporting_errors(lambda: self.manager.save(step, args=ocp.args.StandardSave(state)))

    def wait(self) -> None:
        """Waits for the background write; a failed one raises a JobError naming its step."""
        self._reporting_errors(self.manager.wait_until_finished)
        self._writing = None

    def _reporting_errors(self, action: Callable[[], Any]) -> None:
        try:
            action()
        except Exception as e:  # noqa: BLE001 - orbax raises what its storage layer raised
            raise JobError(f"cannot write checkpoint step {self._writing} to {self.directory}: {brief(e)}") from e

    def restore_latest(self, like: Any = None) -> tuple[int | None, Any]:
        """(step, state) of the newest step that restores, shaped like ``like`` (None: as stored); (None, None) if none.

        Steps that fail are named in a warning (or, when strict, raise a JobError); ``like=None``
        restores on the host, whatever devices or processes wrote the step.
        """
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                with _quiet_async_errors():
                    state = self.manager.restore(step, args=ocp.args.StandardRestore(
                        self._on_one_device(step) if like is None else like))
            except Exception as e:  # noqa: BLE001 - any failure to read a step means it is unusable
                problem = f"checkpoint step {step} in {self.directory} is unreadable ({brief(e)})"
                if self.strict:
                    raise JobError(f"{problem}; without --strict the newest intact step is used") from e
                logging.warning("%s; trying the previous step", problem)
                continue
            return step, state if like is not None else jax.tree.map(np.asarray, state)
        if self.manager.all_steps():
            raise JobError(f"no checkpoint in {self.directory} is readable")
        return None, None

    def _on_one_device(self, step: int) -> Any:
        """The stored tree's shapes and dtypes on one local device, whatever mesh wrote it."""
        local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return jax.tree.map(lambda meta: jax.ShapeDtypeStruct(meta.shape, meta.dtype, sharding=local),
                            self.manager.item_metadata(step))

    def set_aside(self, newer_than: int | None) -> None:
        """Moves steps after ``newer_than`` (unreadable) to ``<directory>.unreadable/``, so training rewrites them."""
        for step in self.manager.all_steps():
            if newer_than is None or step > newer_than:
                aside = os.path.join(self.directory + ".unreadable", str(step))
                os.makedirs(os.path.dirname(aside), exist_ok=True)
                os.replace(os.path.join(self.directory, str(step)), files.unused_path(aside))
                logging.warning("moved the unreadable checkpoint step %d to %s", step, os.path.dirname(aside))
        self.manager.reload()


