"""Atomic file writes (a crash or Ctrl-C mid-write leaves the previous file, never half a new one), the small JSON
records runs and caches keep, and folders that a failed command leaves as it found them."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO


def atomic_write(path: str | os.PathLike, write: Callable[[IO], None], mode: str = "wb", durable: bool = True) -> Path:
    """Call `write(file)` on a temporary file beside `path`, then rename it over `path`.

    The temporary file is in the same directory, so the rename is atomic; it is created with
    os.open (not mkstemp) so that the umask, not 0600, decides its permissions. `durable` also
    flushes the file and the rename to the disk, so that a power cut cannot undo them.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path


def missing_folders(path: Path) -> list[Path]:
    """path and those of its parents that do not exist yet, deepest first."""
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def remove_if_empty(folders: list[Path]) -> None:
    """Remove those of `folders` (deepest first, as missing_folders gives them) that are empty."""
    for folder in folders:  # deepest first, so a parent is empty once its child is gone
        try:
            folder.rmdir()
        except OSError:  # not empty, or never made
            pass


def read_json(path: Path) -> dict | None:
    """A JSON object a run wrote, or None when it is missing or unreadable (it is only ever a cache or a record)."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def write_json(path: Path, value: dict) -> None:
    atomic_write(path, lambda f: json.dump(value, f), mode="w", durable=False)
