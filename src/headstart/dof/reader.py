"""Reading a DoF set: ``open_dof`` checks the manifest and file sizes, ``DofSplit.take`` reads batches of rows.

A set whose shards fit in ``memory_budget`` bytes is loaded whole (each split on first use); a larger one is
memory-mapped and read row by row from the shards a batch touches. Memory maps are opened lazily and re-opened
in a new process (DataLoader workers fork), and a pickled split carries no open map, so a split can be handed to
worker processes either way.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from headstart.dof.format import (
    FORMAT_NAME,
    MANIFEST_NAME,
    REQUIRED_ARRAYS,
    SHARDS_DIR,
    SUPPORTED_MAJOR,
    TARGET_PREFIX,
    DofError,
    array_order,
    array_relpath,
    check_array_name,
    check_split_name,
    expected_dtype,
    fingerprint,
    first_multiclass,
    is_safe_relpath,
    nonfinite_rows,
    parse_version,
)

_REDO = "delete the set and extract again"
_EDITED_FIX = (
    "Delete the set and extract again, or change descriptive fields (name, description, license, source) only "
    "with `python -m headstart.dof describe PATH --name ... --description ... --license ... --source ...`"
)
_SPEC_COPIES = ("flow", "transform", "augment", "views")  # meta fields that repeat the fingerprint spec's
_FINGERPRINT_RE = re.compile(r"[0-9a-f]{16}")
_MISSING = "<missing>"


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
        if a.dtype != dtype or a.shape != (count, *shape):
            raise DofError(
                f"DoF file {path} holds {_dtype_text(a.dtype)} {list(a.shape)} but the manifest says "
                f"{dtype.name} {[count, *shape]}: it was altered: {_REDO}"
            )
        return a

    def start_of(self, k: int) -> int:
        """Position in the split of the first row of shard ``k`` (0 for an empty shard: it has no rows)."""
        for (shard, _), start in zip(self._shards, self._starts, strict=True):
            if shard == k:
                return int(start)
        return 0

    def _nonfinite(self, positions: np.ndarray) -> DofError:
        """The error for rows (positions in the split) whose features are not finite, naming the first one's file."""
        first = int(positions[0])
        i = int(np.searchsorted(self._starts, first, side="right")) - 1
        k = self._shards[i][0]
        path = self.root / array_relpath(self.name, k, "features")
        more = f" (and {len(positions) - 1} more row(s) of split {self.name!r})" if len(positions) > 1 else ""
        return DofError(
            f"DoF file {path} holds non-finite features (NaN or inf) in row {first - int(self._starts[i])}{more}: "
            f"DoF sets hold finite features only, so the file was altered or corrupted (training on it would give "
            f"NaN weights): delete the set {self.root} and extract again"
        )

    def _check_finite(self, features: np.ndarray, positions: np.ndarray) -> None:
        """``features[j]`` is the row at ``positions[j]`` of the split; DofError on the first non-finite one."""
        bad = nonfinite_rows(features)
        if bad.size:
            raise self._nonfinite(positions[bad])

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
                self._check_finite(data["features"][start : start + count], np.arange(start, start + count))
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
        self._check_finite(out["features"], r)
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
        self._check_finite(out["features"], np.arange(self.count))
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

    def check_headers(self) -> None:
        """Every shard array's ``.npy`` header (a few hundred bytes each) agrees with the manifest's dtype and shape.

        Catches a manifest whose dtypes were edited (float32 said where the shards hold float16, or the reverse) when
        the set is opened, not at the first read.
        """
        for split, entry in self.manifest["splits"].items():
            for shard in entry["shards"]:
                for name, (dtype, shape) in self._specs.items():
                    path = self.root / array_relpath(split, shard["k"], name)
                    found = _npy_header(path)
                    want = (np.dtype(dtype), (shard["count"], *shape))
                    if found != want:
                        raise DofError(
                            f"DoF file {path} holds {_dtype_text(found[0])} {list(found[1])} but manifest.json "
                            f"says {want[0].name} {list(want[1])}: the manifest or the file was edited: {_REDO}"
                        )

    def verify(self) -> None:
        """Read the whole set once: every file's sha256, every feature finite, every stored label the sample table's.

        The stored labels (``target.<first multiclass task>``) must equal ``meta.samples.label`` at their ``index``,
        so a manifest whose sample table or class list was rewritten together with its fingerprints is still caught.
        """
        self.check_sizes()
        self.check_headers()
        task = first_multiclass(self.meta.get("flow"))
        samples = self.meta.get("samples")
        target = f"{TARGET_PREFIX}{task[0]}" if task is not None else None
        labels = _sample_labels(samples) if target in self._specs else None
        where = {}
        for split, entry in self.manifest["splits"].items():
            for shard in entry["shards"]:
                for name in self._specs:
                    where[array_relpath(split, shard["k"], name)] = (split, shard["k"], name)
        pending: dict[tuple[str, int], dict[str, np.ndarray]] = {}
        for rel, info in self.manifest["files"].items():
            path = self.root / rel
            data = path.read_bytes()
            if hashlib.sha256(data).hexdigest() != info["sha256"]:
                raise DofError(
                    f"DoF file {path} does not match its sha256 in the manifest: it was altered or corrupted: "
                    f"{_REDO}"
                )
            split, k, name = where.get(rel, (None, None, None))
            if name == "features":
                bad = nonfinite_rows(_parse(path, data))
                if bad.size:
                    raise self.split(split)._nonfinite(bad + self.split(split).start_of(k))
            elif labels is not None and name in ("index", target):
                arrays = pending.setdefault((split, k), {})
                arrays[name] = _parse(path, data)
                if len(arrays) == 2:
                    rel_target = array_relpath(split, k, target)
                    _check_labels(self.root, rel_target, arrays["index"], arrays[target], labels, samples)
                    del pending[(split, k)]


def _parse(path: Path, data: bytes) -> np.ndarray:
    """The array in ``data``, the bytes of the ``.npy`` file ``path`` (never unpickled)."""
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise DofError(f"DoF file {path} cannot be read as a plain numeric .npy array ({e}): {_REDO}") from e


def _dtype_text(dtype: np.dtype) -> str:
    """``float16``, or ``>f2`` for a byte order other than this machine's (which the name does not show)."""
    return dtype.name if dtype.isnative or dtype.byteorder == "|" else dtype.str


def _npy_header(path: Path) -> tuple[np.dtype, tuple[int, ...]]:
    """(dtype, shape) from a ``.npy`` file's header, without reading its data."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
    except (OSError, ValueError, EOFError) as e:
        raise DofError(
            f"DoF file {path} cannot be read as a plain numeric .npy array ({e}); DoF sets never hold pickled "
            f"objects, so the file was altered or corrupted: {_REDO}"
        ) from e
    if dtype.hasobject:
        raise DofError(
            f"DoF file {path} holds Python objects (dtype {dtype}); DoF sets never hold pickled objects, so the "
            f"file was altered: {_REDO}"
        )
    return dtype, tuple(shape)


def _sample_labels(samples: object) -> np.ndarray | None:
    """``meta.samples.label`` as float64 (NaN where missing), or None when the meta has no sample table."""
    if not isinstance(samples, dict) or not isinstance(samples.get("label"), list):
        return None
    return np.array([np.nan if v is None else v for v in samples["label"]], dtype=np.float64)


def _check_labels(
    root: Path, rel: str, index: np.ndarray, stored: np.ndarray, labels: np.ndarray, samples: dict
) -> None:
    """Shard k's stored labels equal the sample table's labels of the samples it holds (verify)."""
    path = root / rel
    if index.size and (index.min() < 0 or index.max() >= len(labels)):
        raise DofError(
            f"DoF file {path} names samples outside the sample table of manifest.json ({len(labels)} rows): the "
            f"manifest or the file was edited: {_REDO}"
        )
    want = labels[index].astype(np.float32)
    differ = np.flatnonzero(~((stored == want) | (np.isnan(stored) & np.isnan(want))))
    if differ.size:
        row = int(differ[0])
        sample = int(index[row])
        raise DofError(
            f"manifest.json of DoF set {root} disagrees with its shards: sample {sample} "
            f"({samples['path'][sample]}) is stored with label {stored[row]:g} in {rel} row {row} but "
            f"meta.samples.label says {want[row]:g} "
            f"({differ.size} row(s) of this shard differ): the manifest's sample table was edited. {_EDITED_FIX}"
        )


def _malformed(path: Path, why: str) -> DofError:
    return DofError(f"DoF manifest {path} is malformed ({why}): the set is damaged: {_REDO}")


def _check_manifest(m: Any, path: Path) -> None:
    """Structure of a manifest whose format and version are already accepted; DofError on the first flaw."""
    if not isinstance(m.get("meta"), dict):
        raise _malformed(path, "'meta' is not an object")
    info = m.get("info", {})
    if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
        raise _malformed(path, "'info' must be an object of strings (name, description, license, source)")
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


def _edited(root: Path, why: str) -> DofError:
    return DofError(f"manifest.json of DoF set {root} was edited: {why}. {_EDITED_FIX}")


def _short(value: Any) -> str:
    text = _MISSING if value is _MISSING else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 120 else text[:117] + "..."


def _difference(ours: Any, spec: Any, where: str) -> str:
    """Where two JSON values first differ, in words: ``meta.flow.tasks.label.classes is [...], the spec has [...]``."""
    if isinstance(ours, dict) and isinstance(spec, dict):
        for key in [*spec, *(k for k in ours if k not in spec)]:
            a, b = ours.get(key, _MISSING), spec.get(key, _MISSING)
            if a != b:
                return _difference(a, b, f"{where}.{key}")
    return f"{where} is {_short(ours)}, the fingerprint spec has {_short(spec)}"


def _check_meta(m: dict[str, Any], root: Path) -> None:
    """The meta still matches the fingerprints it was written with, and its labels match its classes (cheap).

    A person who edits manifest.json (a class order swapped, a dtype changed) is told what no longer matches;
    the descriptive ``info`` and the ``stats`` are the parts outside every fingerprint.
    """
    meta = m["meta"]
    spec = meta.get("fingerprint_spec")
    if isinstance(spec, dict):
        for key in _SPEC_COPIES:
            if key in spec and meta.get(key, _MISSING) != spec[key]:
                diff = _difference(meta.get(key, _MISSING), spec[key], f"meta.{key}")
                raise _edited(
                    root,
                    f"its meta no longer matches its fingerprint (meta.{key} differs from the "
                    f"fingerprint spec: {diff})",
                )
        backbone = meta.get("backbone")
        if isinstance(spec.get("backbone"), dict):
            for key, value in spec["backbone"].items():
                found = backbone.get(key, _MISSING) if isinstance(backbone, dict) else _MISSING
                if found != value:
                    raise _edited(
                        root,
                        f"its meta no longer matches its fingerprint (meta.backbone.{key} is "
                        f"{_short(found)}, the fingerprint spec has {_short(value)})",
                    )
        if "dtype" in spec and m["feature"]["dtype"] != spec["dtype"]:
            raise _edited(
                root,
                f"its feature dtype is {m['feature']['dtype']} but the set was extracted as "
                f"{_short(spec['dtype'])} (meta.fingerprint_spec.dtype)",
            )
        if "fingerprint" in meta and meta["fingerprint"] != fingerprint(spec):
            raise _edited(
                root,
                f"its meta no longer matches its fingerprint (meta.fingerprint_spec hashes to "
                f"{fingerprint(spec)}, not to the recorded fingerprint {_short(meta['fingerprint'])})",
            )
    name = Path(os.path.abspath(root)).name
    if _FINGERPRINT_RE.fullmatch(name) and "fingerprint" in meta and meta["fingerprint"] != name:
        raise _edited(
            root,
            f"the set is filed under fingerprint {name} but its meta records fingerprint "
            f"{_short(meta['fingerprint'])}",
        )
    if m.get("meta_fingerprint") != fingerprint(meta):
        raise _edited(
            root,
            f"its meta no longer matches its fingerprint (meta hashes to {fingerprint(meta)}, "
            f"meta_fingerprint records {_short(m.get('meta_fingerprint', _MISSING))}: a field of "
            "meta was changed)",
        )
    _check_sample_labels(meta, root, parse_version(m["version"]))


def _check_sample_labels(meta: dict[str, Any], root: Path, version: tuple[int, int] | None) -> None:
    """Every label of the sample table names one of the classes, and, for a set made from class folders, the class
    folder its file lies in."""
    task = first_multiclass(meta.get("flow"))
    labels = _sample_labels(meta.get("samples"))
    if task is None or labels is None:
        return
    path, classes = task
    samples = meta["samples"]
    paths = samples.get("path")
    if not isinstance(paths, list) or len(paths) != len(labels):
        raise _edited(root, "meta.samples.path and meta.samples.label differ in length")
    known = np.flatnonzero(~np.isnan(labels))
    values = labels[known]
    wrong = np.flatnonzero((values != np.floor(values)) | (values < 0) | (values >= len(classes)))
    if wrong.size:
        i = int(known[wrong[0]])
        raise _edited(
            root,
            f"sample {i} ({paths[i]}) has label {labels[i]:g}, not a class index of "
            f"{path}'s {len(classes)} classes",
        )
    recorded = samples.get("class_folders")
    legacy = recorded is None and version is not None and version < (1, 1)
    if recorded is not True and not legacy:
        return
    folders = [os.path.basename(os.path.dirname(str(paths[i]))) for i in known]
    if (
        legacy
    ):  # 1.0 did not record the layout: a table whose every labelled file lies in a class's folder has it
        recorded = len(classes) > 1 and bool(folders) and set(folders) <= {str(c) for c in classes}
    if recorded is True:
        names = [str(classes[int(v)]) for v in values]
        off = [j for j, (folder, cls) in enumerate(zip(folders, names, strict=True)) if folder != cls]
        if off:
            i = int(known[off[0]])
            raise _edited(
                root,
                f"{len(off)} sample(s) are labelled with a class other than their class folder "
                f"(e.g. {paths[i]} is labelled {names[off[0]]!r}); the class list of {path} "
                f"({_short(classes)}) or the labels were changed",
            )


def open_dof(path: str | Path, verify: bool = False, memory_budget: int = 2 * 1024**3) -> DofSet:
    """Open a complete DoF set: check its manifest, that its meta still matches its fingerprints and its labels its
    classes, and that every file has its recorded size and the dtype and shape the manifest says (``.npy`` headers).

    ``verify=True`` also reads the whole set: every sha256, every feature finite, every stored label equal to the
    sample table's. The set is loaded into memory when its shards total at most ``memory_budget`` bytes,
    memory-mapped otherwise; features are checked finite as they are read either way.
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
    _check_meta(m, root)
    dof = DofSet(root, m, memory_budget)
    if verify:
        dof.verify()
    else:
        dof.check_sizes()
        dof.check_headers()
    return dof
