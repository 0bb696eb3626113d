"""The DoF set format: name and version, file naming, array rules, the error type and the spec fingerprint.

A DoF set is a directory::

    ROOT/manifest.json                          written last, atomically; its presence means the set is complete
    ROOT/shards/<split>-<k:05d>.<array>.npy     one file per array of shard k of a split
    ROOT/shards/<split>-<k:05d>.done.json       per-shard record (sizes, sha256), only while extraction runs

Arrays of a shard share their first dimension n: ``features`` (float16 or float32, ``[n, D]`` or
``[n, C, h, w]``, finite values only), ``index`` (int64, the row in the sample table), ``view`` (int16,
0 = eval transform) and ``target.<task path>`` (float32, NaN where the label is missing, ``[n]`` or ``[n, C]``).
No file of a set is ever pickled: every ``.npy`` is written and read with ``allow_pickle=False``.

The manifest (version 1.1) holds ``format``, ``version``, ``created``, ``info`` (descriptive strings: name,
description, license, source; the only part meant to be edited, with ``headstart.dof.info.describe``), ``meta``
(what the writer was given) with its ``meta_fingerprint``, ``feature``, ``arrays``, ``splits``, ``files`` (size and
sha256 of every shard file) and ``stats``. Version 1.0 is the same without ``info``.

Conventions of ``meta`` that the reader checks when they are present (extraction writes them all):
``fingerprint_spec`` (what determines the set) and ``fingerprint`` (its fingerprint, the set's directory name);
copies of spec fields (``flow``, ``transform``, ``augment``, ``views``, ``backbone``); ``flow`` (the tasks and
classes); ``samples`` (``path``, ``split``, ``label``: the sample table, ``label`` indexing the first multiclass
task's classes; ``class_folders``: true when every labelled sample lies in a folder named after its class).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any

import numpy as np

FORMAT_NAME = "headstart-dof"
FORMAT_VERSION = "1.1"  # major.minor: a reader accepts any minor version of its major version
SUPPORTED_MAJOR = 1

MANIFEST_NAME = "manifest.json"
SHARDS_DIR = "shards"
DONE_SUFFIX = ".done.json"
TMP_SUFFIX = ".tmp"
INFO_FIELDS = ("name", "description", "license", "source")  # descriptive, outside every fingerprint

REQUIRED_ARRAYS = ("features", "index", "view")
TARGET_PREFIX = "target."
FEATURE_DTYPES = ("float16", "float32")
FIXED_DTYPES = {"index": "int64", "view": "int16"}
TARGET_DTYPE = "float32"

_SPLIT_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]*$")
_TASK_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


class DofError(ValueError):
    """A DoF set cannot be written or read. The message names the problem, the file and the fix."""


# --- naming ---------------------------------------------------------------------------------------------------


def check_split_name(split: object) -> str:
    """Split names become file name prefixes, so they are restricted to letters, digits, ``_`` and ``-``."""
    if not isinstance(split, str) or not _SPLIT_RE.match(split):
        raise DofError(
            f"invalid DoF split name {split!r}: use letters, digits, '_' and '-' only (e.g. 'train', 'val')"
        )
    return split


def check_array_name(name: object) -> str:
    """``features``, ``index``, ``view`` or ``target.<task path>``; anything else is a typo, not a new array."""
    if isinstance(name, str):
        if name in REQUIRED_ARRAYS:
            return name
        if name.startswith(TARGET_PREFIX):
            task = name[len(TARGET_PREFIX) :]
            if _TASK_RE.match(task) and ".." not in task:
                return name
    raise DofError(
        f"invalid DoF array name {name!r}: a shard holds 'features', 'index', 'view' and "
        "'target.<task path>' arrays (task paths use letters, digits, '_', '-' and '.')"
    )


def shard_stem(split: str, k: int) -> str:
    return f"{split}-{k:05d}"


def array_relpath(split: str, k: int, name: str) -> str:
    """Path of a shard's array relative to the set root, with '/' separators (as stored in the manifest)."""
    return f"{SHARDS_DIR}/{shard_stem(split, k)}.{name}.npy"


def done_relpath(split: str, k: int) -> str:
    return f"{SHARDS_DIR}/{shard_stem(split, k)}{DONE_SUFFIX}"


def is_safe_relpath(rel: object) -> bool:
    """A manifest may only name files inside its own set (no absolute paths, no '..')."""
    if not isinstance(rel, str) or not rel or "\\" in rel:
        return False
    parts = PurePath(rel).parts
    return not rel.startswith("/") and all(p not in ("", ".", "..") for p in parts) and ":" not in parts[0]


def array_order(names: list[str] | tuple[str, ...] | set[str]) -> list[str]:
    """Canonical order of array names: features, index, view, then targets sorted."""
    return [n for n in REQUIRED_ARRAYS if n in names] + sorted(n for n in names if n not in REQUIRED_ARRAYS)


def expected_dtype(name: str) -> tuple[str, ...]:
    """The dtype names allowed on disk for an array."""
    if name == "features":
        return FEATURE_DTYPES
    return (FIXED_DTYPES.get(name, TARGET_DTYPE),)


def parse_version(version: object) -> tuple[int, int] | None:
    """``"1.0"`` -> ``(1, 0)``; anything that is not ``"<int>.<int>"`` -> None."""
    if not isinstance(version, str):
        return None
    m = re.fullmatch(r"(\d+)\.(\d+)", version)
    return (int(m.group(1)), int(m.group(2))) if m else None


def check_info(info: object) -> dict[str, str]:
    """The descriptive fields of a set: a mapping of ``INFO_FIELDS`` names to strings (DofError otherwise)."""
    if not isinstance(info, Mapping):
        raise DofError(
            f"DoF info must be a mapping of {list(INFO_FIELDS)} to strings, got {type(info).__name__}"
        )
    for key, value in info.items():
        if key not in INFO_FIELDS:
            raise DofError(f"DoF info has no field {key!r}: the descriptive fields are {list(INFO_FIELDS)}")
        if not isinstance(value, str):
            raise DofError(
                f"DoF info field {key!r} must be a string, got {type(value).__name__} {value!r}: descriptive "
                "fields hold text only"
            )
    return {key: info[key] for key in INFO_FIELDS if key in info}


_FINITE_BLOCK = 1 << 18  # elements per block of the finiteness test: its temporaries stay in the CPU cache


def nonfinite_rows(features: np.ndarray) -> np.ndarray:
    """Positions of the rows of ``features`` (first axis) holding a NaN or an infinity; empty when all are finite.

    float16 and float32 are tested on their exponent bits (all ones: inf or NaN) in cache-sized blocks, about ten
    times faster than ``np.isfinite`` on float16; the rows are located only when something is found.
    """
    a = np.asarray(features)
    if a.dtype.kind != "f" or not a.size:
        return np.zeros(0, dtype=np.int64)
    bits = {2: (np.uint16, 0x7C00), 4: (np.uint32, 0x7F800000)}.get(a.dtype.itemsize)
    if bits is not None and a.dtype.isnative and a.flags.c_contiguous:
        flat, mask = a.reshape(-1).view(bits[0]), bits[0](bits[1])
        block = min(_FINITE_BLOCK, flat.size)
        masked, hit = np.empty(block, dtype=bits[0]), np.empty(block, dtype=bool)
        for start in range(0, flat.size, block):
            part = flat[start : start + block]
            n = len(part)
            np.bitwise_and(part, mask, out=masked[:n])
            if np.equal(masked[:n], mask, out=hit[:n]).any():
                break
        else:
            return np.zeros(0, dtype=np.int64)
    finite = np.isfinite(a.reshape(len(a), -1)).all(axis=1)
    return np.flatnonzero(~finite)


def first_multiclass(flow: object) -> tuple[str, list] | None:
    """``(task path, classes)`` of the first multiclass leaf of a flow spec in declaration order, or None.

    The sample table's ``label`` column indexes these classes (a folder data set has one such task, ``label``).
    """
    if not isinstance(flow, Mapping):
        return None

    def walk(tasks: object, prefix: str) -> tuple[str, list] | None:
        if not isinstance(tasks, Mapping):
            return None
        for name, spec in tasks.items():
            if not isinstance(spec, Mapping):
                continue
            if "tasks" in spec:
                found = walk(spec["tasks"], f"{prefix}{name}.")
                if found is not None:
                    return found
            elif spec.get("kind") == "multiclass" and isinstance(spec.get("classes"), list):
                return f"{prefix}{name}", list(spec["classes"])
        return None

    return walk(flow.get("tasks"), "")


# --- canonical JSON and the fingerprint -----------------------------------------------------------------------


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, PurePath):
        return str(obj)
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serializable")


def canonical_json(obj: Any) -> str:
    """Sorted keys, no whitespace, floats as ``repr`` (the json module's own float format), ASCII only.

    numpy scalars and arrays become numbers and lists, paths become strings; anything else raises TypeError.
    """
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=_json_default)


def to_json(obj: Any, what: str) -> str:
    """Indented JSON for files a person may read; DofError when ``obj`` is not plain data."""
    try:
        return json.dumps(obj, indent=1, ensure_ascii=False, default=_json_default) + "\n"
    except (TypeError, ValueError) as e:
        raise DofError(
            f"{what} is not JSON-serializable ({e}): pass plain names, numbers, lists and dicts"
        ) from e


def fingerprint(spec: Mapping) -> str:
    """First 16 hex characters of the sha256 of ``canonical_json(spec)``.

    Deterministic across processes and Python versions (no ``hash()``), independent of key order, and
    sensitive to every value (``1`` and ``1.0`` differ, as do ``True`` and ``1``).
    """
    try:
        text = canonical_json(spec)
    except (TypeError, ValueError) as e:
        raise DofError(
            f"cannot fingerprint {type(spec).__name__}: it is not JSON-serializable ({e}); "
            "pass plain names, numbers, lists and dicts with string keys"
        ) from e
    return hashlib.sha256(text.encode("ascii")).hexdigest()[:16]
