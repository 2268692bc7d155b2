"""A run's metrics where people look at curves: TensorBoard event files beside each metrics log, written
as its rows are, and a PNG of the curves when the run ends.

The JSON-lines log stays the record (resumes drop and rewrite its later rows); the events purge a
resumed run's later steps the same way (TensorBoard's ``purge_step``).
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Mapping, Sequence

import numpy as np

from vmc_jax import files

EVENTS_DIR = "tensorboard"  # beside the metrics log
# Panels of the PNG, in this order, for the metrics a log has; a log-scale axis for each but "lr".
PLOTTED = ("loss", "grad_norm", "lr")


def events_dir(metrics_path: str) -> str:
    """The TensorBoard folder of the metrics log ``metrics_path``: ``W/metrics.jsonl`` ->
    ``W/tensorboard/metrics`` (``tensorboard --logdir W`` shows every log of a job)."""
    stem = os.path.splitext(os.path.basename(metrics_path))[0]
    return os.path.join(os.path.dirname(metrics_path), EVENTS_DIR, stem)


def png_path(metrics_path: str) -> str:
    """The PNG of the curves of the metrics log ``metrics_path``: ``metrics.jsonl`` -> ``metrics.png``."""
    return os.path.splitext(metrics_path)[0] + ".png"


class EventWriters:
    """A TensorBoard writer per metrics log. Earlier runs' steps after ``start`` (the checkpoint this run
    resumes from; 0 for a new run) are purged, as the log's rows are: TensorBoard reads the event files in
    the order of their names, which the nanosecond suffix keeps the order of the runs."""

    def __init__(self, metrics_paths: Sequence[str], start: int) -> None:
        from tensorboardX import SummaryWriter  # imported by the runs that write, not by every command

        self._writers = [SummaryWriter(events_dir(path), purge_step=start + 1, flush_secs=30,
                                       filename_suffix=f".{time.time_ns()}") for path in metrics_paths]

    def write(self, rows_per_log: Sequence[Sequence[Mapping[str, Any]]]) -> None:
        """Each row's numbers as scalars at its ``step``, in the writer of its log."""
        for writer, rows in zip(self._writers, rows_per_log):
            for row in rows:
                for key, value in row.items():
                    if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                        writer.add_scalar(key, value, row["step"])

    def close(self) -> None:
        for writer in self._writers:
            writer.close()


def plot_curves(metrics_path: str, window_steps: int) -> str | None:
    """Writes the PNG of the log's loss (each row, and its running mean over ``window_steps`` steps),
    gradient norm and learning rate, those it has; returns its path, or None for a log without rows."""
    rows = files.read_json_lines(metrics_path) if os.path.isfile(metrics_path) else []
    names = [name for name in PLOTTED if any(name in row for row in rows)]
    if not rows or not names:
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(len(names), 1, sharex=True, figsize=(7, 2.2 * len(names)), squeeze=False)
    for axis, name in zip(axes[:, 0], names):
        steps = np.array([row["step"] for row in rows if name in row])
        values = np.array([row[name] for row in rows if name in row], np.float64)
        window = max(1, round(window_steps / np.median(np.diff(steps)))) if len(steps) > 1 else 1  # in rows
        axis.plot(steps, values, lw=0.6, alpha=0.5 if name == "loss" and window > 1 else 1.0, label=name)
        if name == "loss" and window > 1 and len(values) >= window:
            mean = np.convolve(values, np.ones(window) / window, mode="valid")
            axis.plot(steps[window - 1:], mean, lw=1.6, label=f"mean over {window_steps} steps")
            axis.legend(loc="upper right", fontsize="small")
        if name != "lr" and np.all(values[np.isfinite(values)] > 0):
            axis.set_yscale("log")
        axis.set_ylabel(name)
        axis.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    figure.tight_layout()
    path = png_path(metrics_path)
    with files.atomic_path(path) as tmp:  # a reader never sees half a PNG
        figure.savefig(tmp, format="png", dpi=100)
    plt.close(figure)
    return path
