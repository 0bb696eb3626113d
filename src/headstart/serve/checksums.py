"""sha256 of files, and SHA256SUMS (sha256sum's format): the one home of file hashing for bundles and DoF sets."""

from __future__ import annotations

import hashlib
from pathlib import Path

SUMS = "SHA256SUMS"


def sha256_file(path: str | Path) -> str:
    """The sha256 of a file's bytes, as 64 lowercase hex digits (read in blocks: files may be large)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def sums_text(folder: Path) -> str:
    """SHA256SUMS for the files directly in `folder` (sorted by name; SHA256SUMS itself left out)."""
    lines = [
        f"{sha256_file(p)}  {p.name}" for p in sorted(folder.iterdir()) if p.is_file() and p.name != SUMS
    ]
    return "\n".join(lines) + "\n"
