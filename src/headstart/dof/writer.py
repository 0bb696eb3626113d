"""DofWriter: shards written one at a time, resumable, the manifest written last.

Each ``write_shard`` saves the shard's arrays under temporary names, renames them into place, and then writes
``<split>-<k>.done.json`` with their sizes and sha256. A writer re-created on the same root after an
interruption sees the finished shards (``completed_shards``) and the caller writes only the rest.
``finalize`` checks that the shards of every split are numbered 0..K-1, writes ``manifest.json`` (atomically)
and then deletes the ``.done.json`` records: their content is in the manifest, and a complete set is exactly
``manifest.json`` plus the shard arrays it lists.

Each record carries the fingerprint of the writer's ``meta``; a writer whose ``meta`` differs refuses to resume,
so features of two different extractions (other backbone, other transform) are never mixed in one set. The
caller therefore keeps volatile values (timings, dates) out of ``meta`` and passes them as ``stats``.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from headstart.dof.files import atomic_save_npy, atomic_write_text
from headstart.dof.format import (
    DONE_SUFFIX,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    REQUIRED_ARRAYS,
    SHARDS_DIR,
    TARGET_PREFIX,
    TMP_SUFFIX,
    DofError,
    array_order,
    array_relpath,
    check_array_name,
    check_info,
    check_split_name,
    done_relpath,
    fingerprint,
    is_safe_relpath,
    nonfinite_rows,
    to_json,
)

ArraySpec = dict[str, dict[str, Any]]  # {name: {"dtype": str, "shape": [per-sample dims]}}


def _prepare(split: str, k: int, arrays: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Check and cast a shard's arrays to their on-disk dtypes; DofError names the array and the fix."""
    where = f"shard {split!r} k={k}"
    if not isinstance(arrays, Mapping):
        raise DofError(f"{where}: arrays must be a mapping of name -> array, got {type(arrays).__name__}")
    missing = [n for n in REQUIRED_ARRAYS if n not in arrays]
    if missing:
        raise DofError(
            f"{where}: missing required array(s) {missing}; a shard holds features, index and view"
        )
    out: dict[str, np.ndarray] = {}
    for name, value in arrays.items():
        check_array_name(name)
        a = np.asarray(value)
        if a.dtype.hasobject or a.dtype.kind not in "biuf":
            raise DofError(
                f"{where}: array {name!r} has dtype {a.dtype}; DoF sets hold numbers only (no pickled objects, "
                "no strings): convert it to a numeric array"
            )
        if a.ndim == 0:
            raise DofError(f"{where}: array {name!r} is a scalar; give one row per sample")
        if name == "features":
            if a.dtype.kind != "f" or a.dtype.itemsize not in (2, 4):
                raise DofError(
                    f"{where}: features have dtype {a.dtype}; store float16 or float32 "
                    "(e.g. features.astype(np.float16))"
                )
            if a.ndim not in (2, 4):
                raise DofError(
                    f"{where}: features have shape {a.shape}; expected [n, D] (pooled) or [n, C, h, w] (maps)"
                )
            a = a.astype(a.dtype.newbyteorder("="), copy=False)
        elif name in ("index", "view"):
            if a.dtype.kind not in "iu":
                raise DofError(f"{where}: {name!r} has dtype {a.dtype}; it must hold integers")
            if a.ndim != 1:
                raise DofError(f"{where}: {name!r} has shape {a.shape}; expected [n]")
            hi = np.iinfo(np.int64 if name == "index" else np.int16).max
            if a.size and (a.min() < 0 or a.max() > hi):
                raise DofError(f"{where}: {name!r} values must lie in 0..{hi}")
            a = a.astype(np.int64 if name == "index" else np.int16)
        else:
            if a.ndim not in (1, 2):
                raise DofError(f"{where}: target {name!r} has shape {a.shape}; expected [n] or [n, C]")
            a = a.astype(np.float32)
        out[name] = np.ascontiguousarray(a)
    sizes = {name: a.shape[0] for name, a in out.items()}
    if len(set(sizes.values())) != 1:
        raise DofError(f"{where}: arrays differ in their first dimension (rows): {sizes}")
    bad = nonfinite_rows(out["features"])
    if bad.size:
        raise DofError(
            f"{where}: the features of row(s) {bad[:10].tolist()} (sample index {out['index'][bad[:10]].tolist()}) "
            f"are not finite (NaN or inf{', ' + str(bad.size) + ' rows in all' if bad.size > 10 else ''}): DoF "
            "sets hold finite features only; fix what produced them (a float16 overflow needs float32 features)"
        )
    for name, a in out.items():
        if name.startswith(TARGET_PREFIX) and np.isinf(a).any():
            rows = np.flatnonzero(np.isinf(a.reshape(len(a), -1)).any(axis=1))
            raise DofError(
                f"{where}: target {name!r} is infinite in row(s) {rows[:10].tolist()}: a target holds finite "
                "values, or NaN where the label is missing"
            )
    return {name: out[name] for name in array_order(set(out))}


def _spec_of(arrays: Mapping[str, np.ndarray]) -> ArraySpec:
    return {name: {"dtype": a.dtype.name, "shape": list(a.shape[1:])} for name, a in arrays.items()}


def _spec_mismatch(spec: ArraySpec, ref: ArraySpec) -> str | None:
    """Why ``spec`` (a new shard) disagrees with ``ref`` (the shards so far), or None."""
    if set(spec) != set(ref):
        return f"it has arrays {sorted(spec)} but earlier shards have {sorted(ref)}"
    for name in array_order(set(spec)):
        if spec[name] != ref[name]:
            what = "feature" if name == "features" else f"array {name!r}"
            return (
                f"its {what} dtype/per-sample shape is {spec[name]['dtype']} {spec[name]['shape']} "
                f"but earlier shards have {ref[name]['dtype']} {ref[name]['shape']}"
            )
    return None


class DofWriter:
    """Write a DoF set at ``root``; see the module docstring for the protocol.

    ``meta`` is everything the manifest should say about the set (backbone identity, transform, config, tasks,
    sample table, ...). It must be plain JSON data and identical when an interrupted extraction resumes.
    """

    def __init__(self, root: str | Path, meta: Mapping) -> None:
        self.root = Path(root)
        if not isinstance(meta, Mapping):
            raise DofError(f"DoF meta must be a mapping, got {type(meta).__name__}")
        self._meta_json = to_json(dict(meta), "DoF meta")
        self.meta: dict[str, Any] = json.loads(self._meta_json)
        self.meta_fingerprint = fingerprint(self.meta)
        if (self.root / MANIFEST_NAME).exists():
            raise DofError(
                f"DoF set {self.root} is already complete ({self.root / MANIFEST_NAME} exists): reuse it, or "
                "delete the directory to extract again"
            )
        if self.root.exists() and not self.root.is_dir():
            raise DofError(f"DoF output {self.root} exists and is not a directory: choose another path")
        self.shards_dir = self.root / SHARDS_DIR
        self.shards_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            (self.root / (MANIFEST_NAME + TMP_SUFFIX)).unlink()
        for tmp in self.shards_dir.glob("*" + TMP_SUFFIX):
            tmp.unlink()
        self._finalized = False
        self._spec: ArraySpec | None = None
        for record in self._scan().values():
            self._adopt_spec(record["arrays"], record["split"], record["k"])

    # --- records of finished shards ---------------------------------------------------------------------------

    def _read_record(self, path: Path) -> dict[str, Any] | None:
        """A done.json record, or None when it is unreadable or not one of ours (then it is simply redone)."""
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            split, k = check_split_name(record["split"]), record["k"]
            ok = (
                record["format"] == FORMAT_NAME
                and isinstance(k, int)
                and path.name == Path(done_relpath(split, k)).name
                and isinstance(record["count"], int)
                and isinstance(record["arrays"], dict)
                and all(is_safe_relpath(rel) for rel in record["files"])
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if not ok:
            return None
        if record.get("version") != FORMAT_VERSION or record.get("meta_fingerprint") != self.meta_fingerprint:
            raise DofError(
                f"{self.root} holds an unfinished extraction made with different settings ({path} has "
                f"meta fingerprint {record.get('meta_fingerprint')}, format {record.get('version')}; this "
                f"extraction has {self.meta_fingerprint}, format {FORMAT_VERSION}): delete {self.root} or "
                "choose another output directory"
            )
        return record

    def _intact(self, record: Mapping[str, Any]) -> bool:
        """Every file of the record exists with its recorded size (cheap; sha256 is checked by the reader)."""
        for rel, info in record["files"].items():
            try:
                if (self.root / rel).stat().st_size != info["size"]:
                    return False
            except (OSError, KeyError, TypeError):
                return False
        return True

    def _scan(self) -> dict[tuple[str, int], dict[str, Any]]:
        """Records of the intact shards; leftovers of broken ones (done.json and their files) are deleted."""
        records: dict[tuple[str, int], dict[str, Any]] = {}
        for path in sorted(self.shards_dir.glob("*" + DONE_SUFFIX)):
            record = self._read_record(path)
            if record is not None and self._intact(record):
                records[(record["split"], record["k"])] = record
                continue
            path.unlink(missing_ok=True)
            for rel in (record or {}).get("files", {}):
                (self.root / rel).unlink(missing_ok=True)
        return records

    def _adopt_spec(self, spec: ArraySpec, split: str, k: int) -> None:
        if self._spec is None:
            self._spec = spec
            return
        why = _spec_mismatch(spec, self._spec)
        if why:
            raise DofError(
                f"DoF shard {split!r} k={k} in {self.root} does not match the other shards: {why}. Every shard "
                "of a set has the same arrays, dtypes and per-sample shapes"
            )

    def completed_shards(self) -> set[tuple[str, int]]:
        """``(split, k)`` of the shards already written completely (a shard with a missing or truncated file is
        not, and its leftovers are deleted)."""
        return set(self._scan())

    # --- writing ----------------------------------------------------------------------------------------------

    def write_shard(self, split: str, k: int, arrays: Mapping[str, np.ndarray]) -> None:
        """Write shard ``k`` of ``split`` (replacing it if it exists). Rows keep the order given."""
        if self._finalized:
            raise DofError(f"DoF set {self.root} is finalized: no more shards can be written")
        check_split_name(split)
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 0:
            raise DofError(f"DoF shard number must be an integer >= 0, got {k!r}")
        k = int(k)
        prepared = _prepare(split, k, arrays)
        spec = _spec_of(prepared)
        if self._spec is not None:
            why = _spec_mismatch(spec, self._spec)
            if why:
                raise DofError(
                    f"DoF shard {split!r} k={k} does not match the shards written before: {why}. Every shard "
                    "of a set has the same arrays, dtypes and per-sample shapes"
                )
        done = self.root / done_relpath(split, k)
        done.unlink(missing_ok=True)  # a rewritten shard is incomplete until its new record exists
        files = {}
        for name, a in prepared.items():
            rel = array_relpath(split, k, name)
            files[rel] = atomic_save_npy(self.root / rel, a)
        record = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "split": split,
            "k": k,
            "count": int(prepared["features"].shape[0]),
            "meta_fingerprint": self.meta_fingerprint,
            "arrays": spec,
            "files": files,
        }
        atomic_write_text(done, to_json(record, "DoF shard record"))
        if self._spec is None:
            self._spec = spec

    def finalize(self, stats: Mapping | None = None, info: Mapping | None = None) -> Path:
        """Write ``manifest.json`` (last, atomically) and delete the per-shard records; returns its path.

        ``info`` holds the set's descriptive strings (``INFO_FIELDS``), which stay editable afterwards.
        Refuses a split whose shards are not numbered 0..K-1 (a gap means an unfinished extraction). Stray files
        in ``shards/`` that no finished shard lists (leftovers of interrupted writes) are deleted first.
        """
        if self._finalized:
            raise DofError(f"DoF set {self.root} is already finalized")
        info = check_info(dict(info or {}))
        records = self._scan()
        if not records:
            raise DofError(f"DoF set {self.root} has no finished shard: write shards before finalize()")
        by_split: dict[str, list[dict[str, Any]]] = {}
        for (split, _), record in sorted(records.items()):
            by_split.setdefault(split, []).append(record)
        for split, recs in by_split.items():
            ks = [r["k"] for r in recs]
            missing = sorted(set(range(max(ks) + 1)) - set(ks))
            if missing:
                raise DofError(
                    f"DoF set {self.root}: split {split!r} lacks shard(s) {missing} (has {ks}); shards are "
                    "numbered 0..K-1: write the missing shards (the extraction resumes), then finalize"
                )
        for (split, k), record in records.items():
            self._adopt_spec(record["arrays"], split, k)
        spec = self._spec
        assert spec is not None
        stats_json = json.loads(to_json(dict(stats) if stats is not None else None, "DoF stats"))

        files: dict[str, dict[str, Any]] = {}
        for record in records.values():
            files.update(record["files"])
        keep = set(files) | {done_relpath(s, k) for s, k in records}
        for path in self.shards_dir.iterdir():
            rel = f"{SHARDS_DIR}/{path.name}"
            ours = path.name.endswith((".npy", TMP_SUFFIX, DONE_SUFFIX))
            if rel not in keep and ours and path.is_file():
                path.unlink()

        manifest = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "info": info,
            "meta": self.meta,
            "meta_fingerprint": self.meta_fingerprint,
            "feature": {"shape": spec["features"]["shape"], "dtype": spec["features"]["dtype"]},
            "arrays": {name: spec[name] for name in array_order(set(spec))},
            "splits": {
                split: {
                    "count": sum(r["count"] for r in recs),
                    "shards": [{"k": r["k"], "count": r["count"]} for r in recs],
                }
                for split, recs in by_split.items()
            },
            "files": dict(sorted(files.items())),
            "stats": stats_json,
        }
        path = self.root / MANIFEST_NAME
        atomic_write_text(path, to_json(manifest, "DoF manifest"))
        self._finalized = True
        for split, k in records:
            with contextlib.suppress(OSError):
                os.unlink(self.root / done_relpath(split, k))
        return path
