"""A job's folder: its saved config, metrics, checkpoints, samples, and the lock one training run holds."""

from __future__ import annotations

import json
import logging
import os
import socket

import ml_collections

from vmc_jax import files
from vmc_jax.errors import JobError

CONFIG_FILE = "config.json"
LOCK_FILE = "train.lock"


def config_path(workdir: str) -> str:
    return os.path.join(workdir, CONFIG_FILE)


def metrics_path(workdir: str) -> str:
    return os.path.join(workdir, "metrics.jsonl")


def checkpoints_dir(workdir: str) -> str:
    return os.path.join(workdir, "checkpoints")


def samples_dir(workdir: str, name: str) -> str:
    return os.path.join(workdir, "samples", name)


def save_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    files.write_text_atomic(config_path(workdir), config.to_json(indent=2))


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The config the workdir's training run saved."""
    path = config_path(workdir)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config given and no {path} (run `vmc-jax train` first)")
    with open(path, encoding="utf-8") as f:
        try:
            return ml_collections.ConfigDict(json.load(f))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


class TrainLock:
    """``workdir/train.lock`` (pid and host of the training run) while a run is in progress.

    A second training run on the workdir is refused; a lock left by a dead process on this host
    (kill -9) is taken over. Readers (generate, export) do not take it.
    """

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, LOCK_FILE)
        self.owner = {"pid": os.getpid(), "host": socket.gethostname()}

    def __enter__(self) -> "TrainLock":
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        while not self._create():
            holder = self._holder()
            if holder is None:
                continue  # released meanwhile
            same_host = holder.get("host") == self.owner["host"]
            if same_host and isinstance(holder.get("pid"), int) and not _pid_alive(holder["pid"]):
                logging.warning("taking over the stale lock %s of process %d, which no longer runs",
                                self.path, holder["pid"])
                os.remove(self.path)
                continue
            raise JobError(f"{os.path.dirname(self.path)} is in use by a training run (pid {holder.get('pid')} on "
                           f"{holder.get('host')}); wait for it, or delete {self.path} if that run is gone")
        return self

    def __exit__(self, *exc) -> None:
        if self._holder() == self.owner:
            os.remove(self.path)

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(self.owner, f)
        return True

    def _holder(self) -> dict | None:
        try:
            with open(self.path, encoding="utf-8") as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, OSError):  # written halfway by a process killed at that instant
            return {"pid": None, "host": "unknown (unreadable lock)"}
