"""Atomic writes and hashing: a file of a DoF set appears under its final name complete, or not at all."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np

from headstart.dof.format import TMP_SUFFIX


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _fsync_dir(path: Path) -> None:
    """Make a rename durable; not possible (nor needed) on every platform."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write to ``<name>.tmp``, fsync, then ``os.replace`` onto ``path``; the temp file never outlives a failure."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_save_npy(path: Path, array: np.ndarray) -> dict[str, int | str]:
    """Save ``array`` without pickle, atomically; returns the file's ``{"size", "sha256"}``."""
    atomic_write(path, lambda f: np.save(f, array, allow_pickle=False))
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}
