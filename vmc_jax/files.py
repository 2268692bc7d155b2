"""Writing files safely: atomically (a reader sees the old or the new file, never a part), never over one
unasked, with the umask's permissions, and under a lock where concurrent runs update one file."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
from typing import Any, Iterator, Mapping, Sequence


_RANDOM_BYTES = 4


def _hidden_sibling(path: str, kind: str) -> str:
    """A fresh name beside ``path`` that no pattern of final names matches: ``.<name>.<kind><random>``."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.{kind}{secrets.token_hex(_RANDOM_BYTES)}")


def _remove_stale_folders(path: str) -> None:
    """Removes the temporary folders of ``path`` that a killed :func:`atomic_dir` left (a converted
    pipeline can take gigabytes, hidden)."""
    folder, name = os.path.split(os.path.abspath(path))
    stale = re.compile(re.escape(f".{name}.tmp") + f"[0-9a-f]{{{2 * _RANDOM_BYTES}}}")
    for entry in os.listdir(folder):
        if stale.fullmatch(entry) and os.path.isdir(os.path.join(folder, entry)):
            logging.warning("removing %s, left by an interrupted run", os.path.join(folder, entry))
            shutil.rmtree(os.path.join(folder, entry))


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yields a temporary path beside ``path`` to write; renames it to ``path`` on success.

    The temporary file is hidden and ends in ``.tmp<random>``, so a glob of final names
    (``*.safetensors``) never picks it up, even one left by a killed run; writers that choose a
    format by extension must be told it. It is created first, with the permissions the umask
    gives, and the final file keeps them (even when the writer replaced it by a file of its own).
    """
    tmp = _hidden_sibling(path, "tmp")
    try:
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    except OSError as e:
        raise OSError(e.errno, e.strerror, path) from e  # name the file asked for, not the temporary one
    mode = os.fstat(fd).st_mode & 0o777
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_dir(path: str, overwrite: bool = False) -> Iterator[str]:
    """Yields an empty hidden folder beside ``path`` to fill; on success it becomes ``path``.

    An existing ``path`` (a file, or a folder that is not empty) is refused before anything is
    written, unless ``overwrite``, which replaces it whole. On failure the temporary folder is
    removed, so ``path`` is as it was and no stray sibling is left (nor one of a killed run, next time).
    """
    refuse_existing(path, overwrite)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _remove_stale_folders(path)
    tmp = _hidden_sibling(path, "tmp")
    os.mkdir(tmp, 0o777)  # the umask applies
    try:
        yield tmp
        _move_into_place(tmp, path, overwrite)
    finally:
        _remove(tmp)


def _move_into_place(folder: str, path: str, overwrite: bool) -> None:
    """Renames ``folder`` to ``path``; an existing ``path`` is set aside first and removed after (``overwrite``)."""
    if not overwrite or not os.path.lexists(path):
        os.rename(folder, path)  # also replaces an empty folder; fails on anything that appeared meanwhile
        return
    old = _hidden_sibling(path, "old")
    os.rename(path, old)
    try:
        os.rename(folder, path)
    except OSError:
        os.rename(old, path)
        raise
    _remove(old)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def write_text_atomic(path: str, text: str) -> None:
    """Writes a text file atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def write_safetensors(path: str, tensors: Mapping[str, Any], metadata: dict[str, str] | None = None) -> str:
    """Writes numpy ``tensors`` as a safetensors file, atomically and with the umask's permissions
    (safetensors' ``save_file`` makes every file 0600); returns ``path``. The project's one writer of them."""
    from safetensors.numpy import save

    content = save(dict(tensors), metadata=metadata)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(content)
    return path


def append_json_lines(path: str, rows: Sequence[Mapping[str, Any]]) -> None:
    """Appends ``rows`` to the JSON-lines log ``path``, one line each."""
    with open(path, "a", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def read_json_lines(path: str) -> list[dict[str, Any]]:
    """The rows of the JSON-lines log ``path`` (a last line that a killed writer left unfinished skipped)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.endswith("\n") and line.strip()]


def drop_log_rows_after(path: str, step: int) -> None:
    """Keeps the rows of the JSON-lines log ``path`` up to ``step``, the checkpoint a run resumes from (it
    logs the later steps again), and drops a last line that a process killed while writing it left unfinished."""
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        rows = [line for line in f if line.endswith("\n") and line.strip() and json.loads(line)["step"] <= step]
    write_text_atomic(path, "".join(rows))


def refuse_existing(path: str, overwrite: bool) -> None:
    """Raises FileExistsError if ``path`` exists (a file, or a folder that is not empty) and ``overwrite`` is not set."""
    empty_folder = os.path.isdir(path) and not os.path.islink(path) and not os.listdir(path)
    if os.path.lexists(path) and not empty_folder and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite to replace it")


def unused_path(path: str, taken: set[str] | None = None) -> str:
    """``path``, or ``name-2.ext``, ``name-3.ext``... the first that neither exists nor is in ``taken``."""
    root, ext = os.path.splitext(path)
    candidate, n = path, 1
    while os.path.lexists(candidate) or candidate in (taken or ()):
        n += 1
        candidate = f"{root}-{n}{ext}"
    return candidate


def check_name_fits(folder: str, name: str) -> None:
    """Raises ValueError if the file system of ``folder`` (which need not exist yet) cannot hold a file
    ``name``, or the temporary name :func:`atomic_path` writes it under."""
    existing = os.path.abspath(folder)
    while not os.path.isdir(existing):
        existing = os.path.dirname(existing)
    limit = os.pathconf(existing, "PC_NAME_MAX")
    size = len(os.path.basename(_hidden_sibling(name, "tmp")).encode())
    if size > limit:
        raise ValueError(f"file name {name!r} would take {size} bytes with its temporary prefix and suffix; "
                         f"the file system of {existing} allows {limit}: shorten it")


@contextlib.contextmanager
def locked(path: str) -> Iterator[None]:
    """Holds an exclusive lock for ``path`` (``fcntl.flock`` on a hidden ``.<name>.lock`` beside it), so that
    concurrent runs (processes or threads) choose names in, or read-modify-write, ``path`` one at a time."""
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd = os.open(os.path.join(folder, f".{name}.lock"), os.O_CREAT | os.O_RDWR, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would let two runs lock two files)
