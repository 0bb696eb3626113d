"""A DoF set written in parts by several independent processes (ranks), then merged into one set.

Each rank writes its own shards with an ordinary ``DofWriter`` into a private staging directory, so ranks never
touch each other's files (no shared temporary names, no shared cleanup)::

    ROOT/parts/rank-<r>-of-<n>/plan.json            what the rank was asked to do (written when it starts)
    ROOT/parts/rank-<r>-of-<n>/shards/...           its shards and their ``.done.json`` records
    ROOT/parts/rank-<r>-of-<n>/part.json            written last: the rank finished (shards, stats)

``merge_parts`` checks that every rank of ``0..n-1`` finished with the same meta and plan and that the parts hold
exactly the expected shards, each once, before it changes anything; then it moves (renames) every shard file and
record into ``ROOT/shards`` (bytes unchanged), finalizes the set with a ``DofWriter`` (manifest last) and deletes
``ROOT/parts``. A merge that is interrupted can be run again: shards already moved are found in ``ROOT/shards``.
The records carry the meta fingerprint of the final set, so the merged set is exactly the set one process writes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from headstart.dof.files import atomic_write_text
from headstart.dof.format import (
    DONE_SUFFIX,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    SHARDS_DIR,
    DofError,
    done_relpath,
    fingerprint,
    is_safe_relpath,
    to_json,
)
from headstart.dof.writer import DofWriter

PARTS_DIR = "parts"
PLAN_NAME = "plan.json"
PART_NAME = "part.json"
LOCK_NAME = "merge.lock"


def meta_fingerprint(meta: Mapping) -> str:
    """The fingerprint a ``DofWriter`` gives ``meta`` (computed the same way, on its JSON round trip)."""
    return fingerprint(json.loads(to_json(dict(meta), "DoF meta")))


def part_dir(root: str | Path, rank: int, world_size: int) -> Path:
    return Path(root) / PARTS_DIR / f"rank-{rank}-of-{world_size}"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == FORMAT_NAME else None


def _plan_diff(a: Mapping, b: Mapping) -> dict[str, tuple[Any, Any]]:
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


class DofPartWriter(DofWriter):
    """The writer of one rank's part. ``plan`` is plain data every rank and the merge must agree on (world size,
    shard size, ...); a staging directory left by a rank with another plan is refused, not mixed in."""

    def __init__(self, root: str | Path, meta: Mapping, rank: int, world_size: int, plan: Mapping) -> None:
        if not (
            isinstance(world_size, int)
            and world_size >= 1
            and isinstance(rank, int)
            and 0 <= rank < world_size
        ):
            raise DofError(
                f"rank {rank!r} is out of range for world size {world_size!r}: ranks are 0..world_size-1"
            )
        self.set_root = Path(root)
        self.rank, self.world_size = rank, world_size
        self.plan = json.loads(to_json({**plan, "world_size": world_size}, "DoF part plan"))
        stage = part_dir(root, rank, world_size)
        fp = meta_fingerprint(meta)
        old = _read_json(stage / PLAN_NAME)
        if old is not None and (old.get("plan") != self.plan or old.get("meta_fingerprint") != fp):
            diff = _plan_diff(old.get("plan") or {}, self.plan)
            what = (
                f"other settings {diff} (before, now)"
                if diff
                else "other meta (backbone, libraries, samples)"
            )
            raise DofError(
                f"{stage} holds a part of rank {rank} made with {what}: run every rank with the "
                f"same settings, or delete {stage} to start this rank again"
            )
        super().__init__(stage, meta)
        if old is None:
            record = {
                "format": FORMAT_NAME,
                "version": FORMAT_VERSION,
                "meta_fingerprint": fp,
                "plan": self.plan,
            }
            atomic_write_text(stage / PLAN_NAME, to_json(record, "DoF part plan"))

    def finalize(self, stats: Mapping | None = None) -> Path:  # type: ignore[override]
        raise DofError(
            "a part of a distributed DoF set is not finalized on its own: use finish_part() and merge"
        )

    def finish_part(self, shards: Iterable[tuple[str, int]], stats: Mapping | None = None) -> Path:
        """Record that this rank wrote ``shards`` (all of them must be complete); returns ``part.json``."""
        shards = sorted((str(s), int(k)) for s, k in shards)
        done = self.completed_shards()
        missing = [sk for sk in shards if sk not in done]
        if missing:
            raise DofError(f"rank {self.rank} cannot finish: shard(s) {missing} are not written")
        record = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "rank": self.rank,
            "world_size": self.world_size,
            "meta_fingerprint": self.meta_fingerprint,
            "plan": self.plan,
            "shards": [list(sk) for sk in shards],
            "stats": json.loads(to_json(dict(stats) if stats is not None else None, "DoF stats")),
        }
        path = self.root / PART_NAME
        atomic_write_text(path, to_json(record, "DoF part record"))
        return path


def finished_parts(root: str | Path, world_size: int) -> dict[int, dict[str, Any]]:
    """``{rank: part record}`` of the ranks of a ``world_size``-rank extraction that finished under ``root``."""
    parts = {}
    for rank in range(world_size):
        record = _read_json(part_dir(root, rank, world_size) / PART_NAME)
        if record is not None:
            parts[rank] = record
    return parts


def try_lock_merge(root: str | Path) -> bool:
    """Take the merge lock of ``root`` (True), or see that another process holds it (False)."""
    lock = Path(root) / PARTS_DIR / LOCK_NAME
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(f"{os.getpid()}\n")
    return True


def merge_parts(
    root: str | Path,
    meta: Mapping,
    world_size: int,
    plan: Mapping,
    expected: Iterable[tuple[str, int]],
    stats: Callable[[dict[int, dict[str, Any]]], Mapping] | None = None,
    rerun_hint: Callable[[list[int]], str] | None = None,
) -> Path:
    """Merge the finished parts of ``world_size`` ranks into the set at ``root``; returns the manifest's path.

    Everything is checked before anything moves: a missing rank, a part of other meta or plan, a shard missing,
    written twice or truncated ends with a ``DofError`` that names it and the fix, and ``root`` stays as it was.
    ``stats(parts)`` gives the merged set's stats from the parts' records.
    """
    root = Path(root)
    if (root / MANIFEST_NAME).is_file():
        return root / MANIFEST_NAME
    fp = meta_fingerprint(meta)
    plan = json.loads(to_json({**plan, "world_size": world_size}, "DoF part plan"))
    parts = finished_parts(root, world_size)
    missing = [r for r in range(world_size) if r not in parts]
    if missing:
        hint = rerun_hint(missing) if rerun_hint else f"run rank(s) {missing} with the same settings"
        raise DofError(
            f"cannot merge the DoF set {root}: rank(s) {missing} of {world_size} have not finished "
            f"(no {PART_NAME} in {root / PARTS_DIR}/rank-<r>-of-{world_size}): {hint}, then merge again"
        )
    owner: dict[tuple[str, int], int] = {}
    for rank, record in sorted(parts.items()):
        stage = part_dir(root, rank, world_size)
        if record.get("meta_fingerprint") != fp or record.get("version") != FORMAT_VERSION:
            raise DofError(
                f"cannot merge the DoF set {root}: rank {rank}'s part ({stage}) was made with other settings "
                f"(meta fingerprint {record.get('meta_fingerprint')}, this merge {fp}: another backbone, weights, "
                f"library version or sample table): delete {stage} and run rank {rank} again with the same "
                "config as the other ranks"
            )
        if record.get("plan") != plan:
            raise DofError(
                f"cannot merge the DoF set {root}: rank {rank} ran with other settings than this merge "
                f"{_plan_diff(record.get('plan') or {}, plan)} (rank, merge): merge with the same overrides the "
                f"ranks used, or delete {stage} and run rank {rank} again"
            )
        for split, k in record.get("shards", []):
            if (split, k) in owner:
                raise DofError(
                    f"cannot merge the DoF set {root}: shard {split!r} k={k} was written by ranks "
                    f"{owner[(split, k)]} and {rank}: delete {root / PARTS_DIR} and extract again"
                )
            owner[(split, k)] = rank
    expected = set(expected)
    if set(owner) != expected:
        lacking, extra = sorted(expected - set(owner)), sorted(set(owner) - expected)
        raise DofError(
            f"cannot merge the DoF set {root}: the parts do not hold the expected shards (missing {lacking}, "
            f"unexpected {extra}): merge with the same overrides the ranks used, or delete {root / PARTS_DIR} "
            "and extract again"
        )

    allowed = {Path(done_relpath(s, k)).name for s, k in expected}
    strays = sorted(p.name for p in (root / SHARDS_DIR).glob("*" + DONE_SUFFIX) if p.name not in allowed)
    if strays:
        raise DofError(
            f"cannot merge the DoF set {root}: {root / SHARDS_DIR} holds shards of another extraction ({strays[:3]}, "
            f"e.g. an interrupted single-process run with another shard size): delete {root / SHARDS_DIR} and merge "
            "again"
        )
    moves: list[tuple[Path, Path]] = []  # (staged, final) per file; records after their arrays
    for (split, k), rank in sorted(owner.items()):
        stage = part_dir(root, rank, world_size)
        staged_record = stage / done_relpath(split, k)
        final_record = root / done_relpath(split, k)
        source = staged_record if staged_record.is_file() else final_record
        try:
            files = json.loads(source.read_text(encoding="utf-8"))["files"]
        except (OSError, ValueError, KeyError, TypeError):
            raise DofError(
                f"cannot merge the DoF set {root}: the record of shard {split!r} k={k} of rank {rank} is missing "
                f"or unreadable ({staged_record}): run rank {rank} again (it redoes missing shards), then merge"
            ) from None
        for rel, info in files.items():
            if not is_safe_relpath(rel):
                raise DofError(
                    f"cannot merge the DoF set {root}: {source} names a file outside the set ({rel!r})"
                )
            staged, final = stage / rel, root / rel
            here = staged if staged.is_file() else final
            try:
                ok = here.stat().st_size == info["size"]
            except OSError:
                ok = False
            if not ok:
                raise DofError(
                    f"cannot merge the DoF set {root}: file {staged} of rank {rank} is missing or truncated: run "
                    f"rank {rank} again (it redoes damaged shards), then merge again"
                )
            if here == staged:
                moves.append((staged, final))
        if source == staged_record:
            moves.append((staged_record, final_record))

    writer = DofWriter(root, meta)
    for staged, final in moves:
        os.replace(staged, final)
    merged_stats = stats(parts) if stats else None
    manifest = writer.finalize(merged_stats)
    shutil.rmtree(root / PARTS_DIR, ignore_errors=True)
    with contextlib.suppress(OSError):
        (root / PARTS_DIR).rmdir()
    return manifest
