"""Building a built-in data set folder once, atomically: write beside it, rename into place, marker last."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from headstart.errors import DataError

MARKER = ".complete"


def build_once(root: str | os.PathLike, write: Callable[[Path], None], what: str) -> Path:
    """Run `write(tmp)` into a temporary folder beside `root` and rename it to `root`; returns the absolute root.

    `write` must create `tmp/.complete` last. A complete `root` is left alone; an empty one is replaced; anything
    else there is an error. Safe to call concurrently: the loser of the rename discards its copy.
    """
    root = Path(root).expanduser().absolute()
    if (root / MARKER).is_file():
        return root
    if root.exists():
        if root.is_dir() and not any(root.iterdir()):
            root.rmdir()
        else:
            raise DataError(
                f"{root} exists but is not a complete {what} (no {MARKER} marker). Delete it, or set "
                "data.root=... to another folder."
            )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        write(tmp)
        try:
            os.rename(tmp, root)
        except OSError:
            if not (root / MARKER).is_file():  # not another process that finished first
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root
