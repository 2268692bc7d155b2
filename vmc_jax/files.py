"""Writing files safely: atomically (a reader sees the old or the new file, never a part), never over one unasked."""

from __future__ import annotations

import contextlib
import json
import os
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yields a temporary path beside ``path`` (same extension) to write; renames it to ``path`` on success."""
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp{os.getpid()}{ext}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text_atomic(path: str, text: str) -> None:
    """Writes a text file atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def drop_log_rows_after(path: str, step: int) -> None:
    """Keeps the rows of the JSON-lines log ``path`` up to ``step``, the checkpoint a run resumes from (it
    logs the later steps again), and drops a last line that a process killed while writing it left unfinished."""
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        rows = [line for line in f if line.endswith("\n") and line.strip() and json.loads(line)["step"] <= step]
    write_text_atomic(path, "".join(rows))


def refuse_existing(path: str, overwrite: bool) -> None:
    """Raises FileExistsError if ``path`` exists and ``overwrite`` is not set."""
    if os.path.lexists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite to replace it")


def unused_path(path: str, taken: set[str] | None = None) -> str:
    """``path``, or ``name-2.ext``, ``name-3.ext``... the first that neither exists nor is in ``taken``."""
    root, ext = os.path.splitext(path)
    candidate, n = path, 1
    while os.path.lexists(candidate) or candidate in (taken or ()):
        n += 1
        candidate = f"{root}-{n}{ext}"
    return candidate
