"""Reading a DoF set: ``open_dof`` checks the manifest and file sizes, ``DofSplit.take`` reads batches of rows.

A set whose shards fit in ``memory_budget`` bytes is loaded whole (each split on first use); a larger one is
memory-mapped and read row by row from the shards a batch touches. Memory maps are opened lazily and re-opened
in a new process (DataLoader workers fork), and a pickled split carries no open map, so a split can be handed to
worker processes either way.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from headstart.dof.files import sha256_file
from headstart.dof.format import (
    FORMAT_NAME,
    MANIFEST_NAME,
    REQUIRED_ARRAYS,
    SHARDS_DIR,
    SUPPORTED_MAJOR,
    DofError,
    array_order,
    array_relpath,
    check_array_name,
    check_split_name,
    expected_dtype,
    is_safe_relpath,
    parse_version,
)

_REDO = "delete the set and extract again"


def _max_open_shards(n_arrays: int) -> int:
    """How many shards a split keeps memory-mapped at once.

    Each ``np.memmap`` holds a file descriptor, so the cache is bounded by a quarter of the process's limit.
    """
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft == resource.RLIM_INFINITY:
            soft = 4096
    except (ImportError, OSError, ValueError):
        soft = 512
    return max(2, min(1024, soft // 4 // max(1, n_arrays)))


class DofSplit:
    """The rows of one split, in shard order. ``take`` reads a batch; ``arrays`` reads everything."""

    def __init__(
        self,
        root: Path,
        name: str,
        shards: list[tuple[int, int]],
        specs: Mapping[str, tuple[str, tuple[int, ...]]],
        in_memory: bool,
    ) -> None:
        self.root = root
        self.name = name
        self.array_names: list[str] = array_order(set(specs))
        self._specs = {n: (np.dtype(d), tuple(s)) for n, (d, s) in specs.items()}
        self._shards = [(k, c) for k, c in shards if c > 0]  # empty shards hold nothing to read
        counts = np.array([c for _, c in self._shards], dtype=np.int64)
        self._starts = np.cumsum(counts) - counts
        self.count = int(counts.sum())
        self.in_memory = in_memory
        self._max_open = _max_open_shards(len(self.array_names))
        self._reset()

    def _reset(self) -> None:
        self._pid: int | None = None
        self._lock = threading.Lock()
        self._handles: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        self._data: dict[str, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.count

    def __repr__(self) -> str:
        mode = "in memory" if self.in_memory else "memory-mapped"
        return f"DofSplit({self.name!r}, count={self.count}, arrays={self.array_names}, {mode})"

    def __getstate__(self) -> dict[str, Any]:
        """Pickle the description only: no memory map, no loaded array, no lock (each process opens its own)."""
        state = self.__dict__.copy()
        for key in ("_pid", "_lock", "_handles", "_data"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    # --- files ------------------------------------------------------------------------------------------------

    def _load(self, k: int, count: int, name: str, mmap: bool) -> np.ndarray:
        """One shard array, checked against the manifest; never unpickles (allow_pickle=False)."""
        path = self.root / array_relpath(self.name, k, name)
        try:
            a = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise DofError(
                f"DoF file {path} cannot be read as a plain numeric .npy array ({e}); DoF sets never hold "
                f"pickled objects, so the file was altered or corrupted: {_REDO}"
            ) from e
        dtype, shape = self._specs[name]
        if not isinstance(a, np.ndarray):  # an .npz archive in place of an .npy
            if hasattr(a, "close"):
                a.close()
            raise DofError(f"DoF file {path} is not a .npy array: it was altered: {_REDO}")
        if a.dtype.name != dtype.name or a.shape != (count, *shape):
            raise DofError(
                f"DoF file {path} holds {a.dtype.name} {list(a.shape)} but the manifest says "
                f"{dtype.name} {[count, *shape]}: it was altered: {_REDO}"
            )
        return a

    def _shard(self, i: int) -> dict[str, np.ndarray]:
        """Memory maps of the i-th non-empty shard, opened in this process (LRU-bounded)."""
        pid = os.getpid()
        if pid != self._pid:  # first use, or a forked worker: the parent's maps are not ours to share
            self._reset()
            self._pid = pid
        with self._lock:
            handles = self._handles.get(i)
            if handles is None:
                k, count = self._shards[i]
                handles = {name: self._load(k, count, name, mmap=True) for name in self.array_names}
                self._handles[i] = handles
                while len(self._handles) > self._max_open:
                    self._handles.popitem(last=False)
            else:
                self._handles.move_to_end(i)
            return handles

    def _empty(self, n: int) -> dict[str, np.ndarray]:
        return {name: np.empty((n, *self._specs[name][1]), self._specs[name][0]) for name in self.array_names}

    def _loaded(self) -> dict[str, np.ndarray]:
        """The whole split in memory (loaded once per process, read-only so callers cannot corrupt it)."""
        if self._data is None:
            data = self._empty(self.count)
            for (k, count), start in zip(self._shards, self._starts, strict=True):
                for name in self.array_names:
                    data[name][start : start + count] = self._load(k, count, name, mmap=False)
            for a in data.values():
                a.flags.writeable = False
            self._data = data
        return self._data

    # --- reading ----------------------------------------------------------------------------------------------

    def _rows(self, rows: Any) -> np.ndarray:
        r = np.asarray(rows)
        if r.ndim != 1 or (r.size and r.dtype.kind not in "iu"):
            raise TypeError(f"rows must be a 1-D array of integer positions, got {r.dtype} {r.shape}")
        r = r.astype(np.int64, copy=False)
        if r.size and (r.min() < 0 or r.max() >= self.count):
            raise IndexError(
                f"rows out of range for DoF split {self.name!r} with {self.count} rows: "
                f"min {r.min()}, max {r.max()}"
            )
        return r

    def take(self, rows: Any) -> dict[str, np.ndarray]:
        """Rows at positions ``rows`` (0..count-1, any order, repeats allowed): ``{name: array[len(rows), ...]}``.

        Memory-mapped: rows are grouped by shard, each touched shard is read through its memory map, and the
        results are put back in the requested order. The returned arrays are fresh copies.
        """
        r = self._rows(rows)
        if self.in_memory:
            data = self._loaded()
            return {name: data[name][r] for name in self.array_names}
        out = self._empty(len(r))
        if not r.size:
            return out
        shard_of = np.searchsorted(self._starts, r, side="right") - 1
        order = np.argsort(shard_of, kind="stable")
        bounds = np.flatnonzero(np.diff(shard_of[order])) + 1
        for group in np.split(order, bounds):
            i = int(shard_of[group[0]])
            local = r[group] - self._starts[i]
            handles = self._shard(i)
            for name in self.array_names:
                out[name][group] = handles[name][local]
        return out

    def arrays(self) -> dict[str, np.ndarray]:
        """The whole split, concatenated in shard order (in memory: the cached read-only arrays)."""
        if self.in_memory:
            return dict(self._loaded())
        out = self._empty(self.count)
        for i, start in enumerate(self._starts):
            handles = self._shard(i)
            for name in self.array_names:
                out[name][start : start + self._shards[i][1]] = handles[name]
        return out


class DofSet:
    """A complete DoF set, as described by its manifest. Use ``open_dof`` to get one."""

    def __init__(self, root: Path, manifest: dict[str, Any], memory_budget: int) -> None:
        self.root = root
        self.manifest = manifest
        self.meta: dict[str, Any] = manifest["meta"]
        self.splits: list[str] = list(manifest["splits"])
        self.feature_shape: tuple[int, ...] = tuple(manifest["feature"]["shape"])
        self.feature_dtype: np.dtype = np.dtype(manifest["feature"]["dtype"])
        self.nbytes: int = sum(info["size"] for info in manifest["files"].values())
        self.in_memory: bool = self.nbytes <= memory_budget
        self._specs = {
            name: (spec["dtype"], tuple(spec["shape"])) for name, spec in manifest["arrays"].items()
        }
        self._cache: dict[str, DofSplit] = {}

    def __repr__(self) -> str:
        counts = {s: self.manifest["splits"][s]["count"] for s in self.splits}
        return f"DofSet({str(self.root)!r}, splits={counts}, feature={self.feature_dtype.name}{list(self.feature_shape)})"

    def split(self, name: str) -> DofSplit:
        if name not in self.manifest["splits"]:
            raise DofError(
                f"DoF set {self.root} has no split {name!r}; available: {self.splits}. Choose one of them, "
                "or extract the missing split"
            )
        if name not in self._cache:
            shards = [(s["k"], s["count"]) for s in self.manifest["splits"][name]["shards"]]
            self._cache[name] = DofSplit(self.root, name, shards, self._specs, self.in_memory)
        return self._cache[name]

    def check_sizes(self) -> None:
        """Every listed file exists with its recorded size (one ``os.stat`` each)."""
        for rel, info in self.manifest["files"].items():
            path = self.root / rel
            try:
                size = path.stat().st_size
            except OSError as e:
                raise DofError(
                    f"DoF file {path} is missing ({e.strerror}): the set is damaged: {_REDO}"
                ) from e
            if size != info["size"]:
                raise DofError(
                    f"DoF file {path} is {size} bytes but the manifest records {info['size']}: it was "
                    f"truncated or altered: {_REDO}"
                )

    def verify(self) -> None:
        """Recompute the sha256 of every file (reads the whole set)."""
        self.check_sizes()
        for rel, info in self.manifest["files"].items():
            path = self.root / rel
            if sha256_file(path) != info["sha256"]:
                raise DofError(
                    f"DoF file {path} does not match its sha256 in the manifest: it was altered or corrupted: "
                    f"{_REDO}"
                )


def _malformed(path: Path, why: str) -> DofError:
    return DofError(f"DoF manifest {path} is malformed ({why}): the set is damaged: {_REDO}")


def _check_manifest(m: Any, path: Path) -> None:
    """Structure of a manifest whose format and version are already accepted; DofError on the first flaw."""
    if not isinstance(m.get("meta"), dict):
        raise _malformed(path, "'meta' is not an object")
    arrays, feature, splits, files = m.get("arrays"), m.get("feature"), m.get("splits"), m.get("files")
    if not isinstance(arrays, dict) or any(n not in arrays for n in REQUIRED_ARRAYS):
        raise _malformed(path, f"'arrays' must name {list(REQUIRED_ARRAYS)} and the targets")
    for name, spec in arrays.items():
        try:
            check_array_name(name)
        except DofError as e:
            raise _malformed(path, str(e)) from None
        ok = (
            isinstance(spec, dict)
            and spec.get("dtype") in expected_dtype(name)
            and isinstance(spec.get("shape"), list)
            and all(isinstance(d, int) and d >= 0 for d in spec["shape"])
        )
        if not ok:
            raise _malformed(path, f"array {name!r} has spec {spec!r}")
    if feature != {"shape": arrays["features"]["shape"], "dtype": arrays["features"]["dtype"]}:
        raise _malformed(path, "'feature' disagrees with arrays['features']")
    if not isinstance(files, dict):
        raise _malformed(path, "'files' is not an object")
    for rel, info in files.items():
        ok = (
            is_safe_relpath(rel)
            and isinstance(info, dict)
            and isinstance(info.get("size"), int)
            and isinstance(info.get("sha256"), str)
        )
        if not ok:
            raise _malformed(path, f"file entry {rel!r}")
    if not isinstance(splits, dict) or not splits:
        raise _malformed(path, "'splits' is empty")
    for split, entry in splits.items():
        try:
            check_split_name(split)
            shards = entry["shards"]
            ks = [s["k"] for s in shards]
            counts = [s["count"] for s in shards]
            ok = ks == list(range(len(ks))) and all(isinstance(c, int) and c >= 0 for c in counts)
            ok = ok and entry["count"] == sum(counts)
        except (DofError, KeyError, TypeError) as e:
            raise _malformed(path, f"split {split!r}: {e}") from None
        if not ok:
            raise _malformed(path, f"split {split!r}: shards must be numbered 0..K-1 and counts must add up")
        for k in ks:
            for name in arrays:
                if array_relpath(split, k, name) not in files:
                    raise _malformed(path, f"{array_relpath(split, k, name)} is not listed in 'files'")


def open_dof(path: str | Path, verify: bool = False, memory_budget: int = 2 * 1024**3) -> DofSet:
    """Open a complete DoF set: check its manifest and that every file has its recorded size.

    ``verify=True`` also recomputes every sha256 (reads the whole set). The set is loaded into memory when its
    shards total at most ``memory_budget`` bytes, memory-mapped otherwise.
    """
    root = Path(path)
    if not root.exists():
        raise DofError(f"DoF set {root} does not exist: check the path, or run the extraction to create it")
    if not root.is_dir():
        raise DofError(f"DoF set {root} is not a directory: point to the directory holding manifest.json")
    mpath = root / MANIFEST_NAME
    if not mpath.is_file():
        hint = "" if (root / SHARDS_DIR).is_dir() else " (or not a DoF set at all)"
        raise DofError(
            f"DoF set {root} is incomplete (extraction did not finish){hint}: {mpath} is missing. Rerun the "
            "extraction with the same settings, it resumes from the finished shards"
        )
    try:
        m = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DofError(
            f"DoF manifest {mpath} cannot be read as JSON ({e}): the set is damaged: {_REDO}"
        ) from e
    if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
        found = m.get("format") if isinstance(m, dict) else type(m).__name__
        raise DofError(
            f"{mpath} is not a DoF manifest (format {found!r}, expected {FORMAT_NAME!r}): point to a "
            "directory written by headstart's extraction"
        )
    version = parse_version(m.get("version"))
    if version is None:
        raise _malformed(mpath, f"version {m.get('version')!r} is not 'major.minor'")
    if version[0] != SUPPORTED_MAJOR:
        raise DofError(
            f"DoF set {root} has format version {m['version']}; this headstart reads version "
            f"{SUPPORTED_MAJOR}.x only: extract the set again with this headstart, or use a headstart that "
            f"reads version {version[0]}.x"
        )
    _check_manifest(m, mpath)
    dof = DofSet(root, m, memory_budget)
    if verify:
        dof.verify()
    else:
        dof.check_sizes()
    return dof
