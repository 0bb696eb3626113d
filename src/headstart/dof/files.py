"""Atomic writes, hashing and locks: a file of a DoF set appears under its final name complete, or not at all."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

try:
    import fcntl
except ImportError:  # not on Windows: there, concurrent extractions of one set are not excluded
    fcntl = None  # type: ignore[assignment]

import numpy as np

from headstart.dof.format import TMP_SUFFIX
from headstart.serve.checksums import sha256_file  # the one home of file hashing (dof may import serve)


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


@contextlib.contextmanager
def exclusive_lock(path: Path, on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold an OS advisory lock (``flock``) on the file ``path`` for the duration of the ``with`` block.

    Another process asking for the same lock waits (``on_wait(holder)`` is called once before it blocks, with the
    holder's process id as far as known). The kernel releases the lock when its holder dies, so a killed process
    leaves no lock held; the file itself is deleted on release. Deleting a lock file that others wait on is safe
    here: a waiter that wakes up on a file no longer at ``path`` starts over on the current one.
    """
    if fcntl is None:
        yield
        return
    waited = False
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if on_wait is not None and not waited:
                    holder = ""
                    with contextlib.suppress(OSError):
                        holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
                    on_wait(f"process {holder}" if holder else "another process")
                waited = True
                fcntl.flock(fd, fcntl.LOCK_EX)
            mine = os.fstat(fd)
            try:
                current = os.stat(path)
            except FileNotFoundError:
                current = None
        except BaseException:
            os.close(fd)
            raise
        if current is not None and (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
            break
        os.close(fd)  # the previous holder deleted this file on release: lock the one now at `path`
    try:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)
