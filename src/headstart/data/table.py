"""Multi-task CSV sample tables: one row per image, a path column and one label column per leaf task of a flow.

The flow spec (`{"tasks": {...}}`, see DESIGN.md, TaskFlow) says which columns to read and how to parse them:

- binary: 0/1, true/false, yes/no (any case);
- multiclass: a class name or a class index;
- multilabel: class names or indices separated by `,` `;` or `|` (e.g. `"0,2"`, `"red,blue"`) → multi-hot
  float[C]; `-` or `none` means present with no class; an empty cell is a missing row (all NaN);
- bounded_regression: a number in [0, scale]; regression: any finite number.

An empty cell is a missing label (NaN). Batches follow the data contract: `"targets"` is `{leaf path: float[B]}`
(float[B, C] for multilabel).

This module only walks the spec to find leaves, kinds, classes and scales; conditions (`given`) are the flow's
business and are not interpreted here, so the data layer does not depend on `headstart.flow`.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from headstart.core.transforms import eval_transform, train_transform
from headstart.data.images import ImageDataModule, ImageDataset
from headstart.data.samples import SampleTable, check_fractions, parse_splits, split_pool
from headstart.errors import ConfigError, DataError
from headstart.serve.plain import plain

KINDS: tuple[str, ...] = ("binary", "multiclass", "multilabel", "bounded_regression", "regression")
_TRUE = frozenset({"1", "true", "yes", "y", "t"})
_FALSE = frozenset({"0", "false", "no", "n", "f"})
_NO_CLASS = frozenset({"-", "none"})
_LABEL_SEPARATORS = re.compile(r"[,;|]")
_MAX_SHOWN = 5


@dataclass(frozen=True)
class LeafSpec:
    """What the table reader needs to know about one leaf task: its path, kind, class names and scale."""

    path: str
    kind: str
    classes: tuple[str, ...] = ()
    scale: float | None = None

    @property
    def width(self) -> int:
        """Columns of this task's target: C for multilabel, else 1 (a scalar per sample)."""
        return len(self.classes) if self.kind == "multilabel" else 1


def _leaf(path: str, spec: Mapping) -> LeafSpec:
    kind = spec.get("kind")
    if kind not in KINDS:
        raise ConfigError(
            f"flow task '{path}': kind {kind!r} is not one of {list(KINDS)}; fix the flow config."
        )
    classes: tuple[str, ...] = ()
    scale = None
    if kind in ("multiclass", "multilabel"):
        raw = spec.get("classes")
        if isinstance(raw, bool) or raw is None:
            raw = None
        elif isinstance(raw, int):
            raw = [str(i) for i in range(raw)]
        if not raw or (kind == "multiclass" and len(raw) < 2):
            raise ConfigError(
                f"flow task '{path}': a {kind} task needs 'classes' (a list of names or a count"
                f"{' >= 2' if kind == 'multiclass' else ''}); fix the flow config."
            )
        classes = tuple(str(c) for c in raw)
        if len(set(classes)) != len(classes):
            raise ConfigError(
                f"flow task '{path}': classes {list(classes)} repeat a name; fix the flow config."
            )
    if kind == "bounded_regression":
        try:
            scale = float(spec.get("scale"))  # type: ignore[arg-type]
        except (TypeError, ValueError):
            scale = float("nan")
        if not (math.isfinite(scale) and scale > 0):
            raise ConfigError(
                f"flow task '{path}': bounded_regression needs a positive 'scale' (targets lie in [0, scale]), "
                f"got {spec.get('scale')!r}; fix the flow config."
            )
    return LeafSpec(path=path, kind=str(kind), classes=classes, scale=scale)


def leaf_specs(flow: Mapping) -> list[LeafSpec]:
    """The leaf tasks of a flow spec in declaration order, with dotted paths (`person.shirt`).

    A mapping with a `tasks:` key is a group; any other mapping is a task. Raises ConfigError on a malformed spec.
    """
    if not isinstance(flow, Mapping) or not isinstance(flow.get("tasks"), Mapping) or not flow["tasks"]:
        raise ConfigError(
            "The flow spec must be a mapping with a non-empty 'tasks:' mapping, e.g. "
            "{tasks: {label: {kind: multiclass, classes: [a, b]}}}; fix the flow config."
        )
    out: list[LeafSpec] = []

    def walk(tasks: Mapping, prefix: str) -> None:
        for name, spec in tasks.items():
            path = f"{prefix}{name}"
            if not isinstance(spec, Mapping):
                raise ConfigError(f"flow task '{path}' must be a mapping (kind: ...), got {spec!r}.")
            if "tasks" in spec:
                if not isinstance(spec["tasks"], Mapping) or not spec["tasks"]:
                    raise ConfigError(f"flow group '{path}' needs a non-empty 'tasks:' mapping.")
                walk(spec["tasks"], f"{path}.")
            else:
                out.append(_leaf(path, spec))

    walk(flow["tasks"], "")
    return out


# --- parsing cells ----------------------------------------------------------------------------------------------


class _BadCell(ValueError):
    """A cell that cannot be a label of its task; the message says why and how to fix it."""


def _class_index(s: str, leaf: LeafSpec) -> int:
    if s in leaf.classes:
        return leaf.classes.index(s)
    lowered = [c.lower() for c in leaf.classes]
    if lowered.count(s.lower()) == 1:
        return lowered.index(s.lower())
    try:
        x = float(s)
    except ValueError:
        x = float("nan")
    if x.is_integer() and 0 <= x < len(leaf.classes):
        return int(x)
    raise _BadCell(
        f"is not one of the classes {list(leaf.classes)} (a class name or an index 0..{len(leaf.classes) - 1}); "
        "fix the cell, or add the class to the flow's classes"
    )


def _number(s: str) -> float:
    try:
        x = float(s)
    except ValueError:
        raise _BadCell(
            "is not a number; write a plain number like 12.5, or leave the cell empty if unknown"
        ) from None
    if not math.isfinite(x):
        raise _BadCell("is not a finite number; write a plain number, or leave the cell empty if unknown")
    return x


def parse_cell(s: str, leaf: LeafSpec) -> float | np.ndarray:
    """One CSV cell as a target of `leaf`: a float (NaN = missing) or, for multilabel, float32[C]."""
    s = s.strip()
    if leaf.kind == "multilabel":
        out = np.full(len(leaf.classes), np.nan, dtype=np.float32)
        if not s:
            return out
        out[:] = 0.0
        if s.lower() in _NO_CLASS:
            return out
        tokens = [t.strip() for t in _LABEL_SEPARATORS.split(s)]
        if not all(tokens):
            raise _BadCell("has an empty class between separators; write e.g. '0,2' or 'red,blue' or '-'")
        for t in tokens:
            out[_class_index(t, leaf)] = 1.0
        return out
    if not s:
        return float("nan")
    if leaf.kind == "multiclass":
        return float(_class_index(s, leaf))
    if s.lower() == "nan":  # what some tools write for a missing number
        return float("nan")
    if leaf.kind == "binary":
        if s.lower() in _TRUE:
            return 1.0
        if s.lower() in _FALSE:
            return 0.0
        try:
            x = float(s)
        except ValueError:
            x = float("nan")
        if x in (0.0, 1.0):
            return x
        raise _BadCell("is not a binary label; write 0/1, true/false or yes/no, or leave the cell empty")
    x = _number(s)
    if leaf.kind == "bounded_regression" and not 0.0 <= x <= float(leaf.scale or 0.0):
        raise _BadCell(
            f"is outside the range [0, {leaf.scale:g}] of this task; fix the value or the task's scale"
        )
    return x


# --- the table --------------------------------------------------------------------------------------------------


@dataclass
class MultiTaskTable(SampleTable):
    """A sample table whose targets are one array per leaf path: float64[N] or float32[N, C] for multilabel.

    `frame` still has the base columns (path, split, label); `label` is the first multiclass task's index (NaN
    when there is none), so code that only knows single-label tables keeps working.
    """

    targets: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        for path, arr in self.targets.items():
            if len(arr) != len(self.frame):
                raise ValueError(f"target {path!r} has {len(arr)} rows, the table {len(self.frame)}")

    def subset(self, keep: np.ndarray) -> MultiTaskTable:
        keep = np.asarray(keep, dtype=bool)
        return MultiTaskTable(
            self.frame[keep].reset_index(drop=True),
            list(self.classes),
            {p: a[keep] for p, a in self.targets.items()},
        )

    def label_counts(self, split: str = "train") -> dict[str, int]:
        """Samples with a (present) label per leaf path in `split`; a multilabel row counts when not all NaN."""
        rows = self.rows(split)
        out = {}
        for path, arr in self.targets.items():
            a = arr[rows]
            present = ~np.isnan(a) if a.ndim == 1 else ~np.isnan(a).all(axis=1)
            out[path] = int(present.sum())
        return out


def multitask_csv_table(
    csv_path: str | os.PathLike,
    flow: Mapping,
    path_column: str = "path",
    split_column: str | None = None,
    root: str | os.PathLike | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    hint: str | None = None,
) -> MultiTaskTable:
    """Read a CSV sample table for `flow`: a path column, one label column per leaf path, optionally a split column.

    Relative paths are resolved against `root`, or the CSV's folder. Without a split column, val/test are split off
    by a seeded permutation (of the paths sorted, so the split does not depend on row order). Every bad cell, missing
    column or missing file is a DataError naming row, column and value.
    """
    check_fractions(val_fraction, test_fraction)
    leaves = leaf_specs(flow)
    csv_path = Path(csv_path).expanduser().absolute()
    if not csv_path.is_file():
        msg = (
            f"CSV file not found: {csv_path}\nExpected a CSV with a '{path_column}' column (image paths, relative "
            f"to the CSV's folder or data.root) and one label column per task ({', '.join(x.path for x in leaves)}); "
            "point data.csv=... at it."
        )
        if hint:
            msg += f"\n{hint}"
        raise DataError(msg)
    base = Path(root).expanduser().absolute() if root is not None else csv_path.parent
    try:
        df = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise DataError(
            f"Cannot read CSV {csv_path}: {e}. Fix the file (comma-separated, header row)."
        ) from e
    df.columns = [str(c).strip() for c in df.columns]
    label_columns = [x.path for x in leaves]
    missing = [
        c for c in (path_column, split_column, *label_columns) if c is not None and c not in df.columns
    ]
    if missing:
        raise DataError(
            f"CSV {csv_path} has no column(s) {missing}; its columns are {list(df.columns)}. Label columns are "
            f"named by the flow's leaf paths ({', '.join(label_columns)}); add the column(s), fix the flow, or set "
            "data.path_column / data.split_column to the right names."
        )
    if len(df) == 0:
        raise DataError(f"CSV {csv_path} has no rows; add one row per image.")

    def where(i: int, column: str, value: str) -> str:
        # row: 1-based data row; line: the line in the file (+1 header, +1 one-based)
        return f"row {i + 1} (line {i + 2}), column '{column}', value {value!r}"

    problems: list[str] = []
    targets: dict[str, np.ndarray] = {}
    for leaf in leaves:
        cells = df[leaf.path].tolist()
        if leaf.kind == "multilabel":
            arr: np.ndarray = np.full((len(df), leaf.width), np.nan, dtype=np.float32)
        else:
            arr = np.full(len(df), np.nan, dtype=np.float64)
        for i, s in enumerate(cells):
            try:
                arr[i] = parse_cell(s, leaf)
            except _BadCell as e:
                problems.append(f"{where(i, leaf.path, s)} {e}")
        targets[leaf.path] = arr
    if problems:
        shown = "\n".join(f"  {p}" for p in problems[:_MAX_SHOWN])
        more = f"\n  ... and {len(problems) - _MAX_SHOWN} more" if len(problems) > _MAX_SHOWN else ""
        raise DataError(f"{len(problems)} bad label(s) in {csv_path}:\n{shown}{more}")

    paths = []
    for p in df[path_column].tolist():
        q = Path(p.strip()).expanduser()
        paths.append(os.path.normpath(q if q.is_absolute() else base / q))
    absent = [i for i, p in enumerate(paths) if not os.path.isfile(p)]
    if absent:
        shown = "\n".join(
            f"  {where(i, path_column, df[path_column].iloc[i])}: {paths[i]} does not exist"
            for i in absent[:_MAX_SHOWN]
        )
        more = f"\n  ... and {len(absent) - _MAX_SHOWN} more" if len(absent) > _MAX_SHOWN else ""
        raise DataError(
            f"{len(absent)} image file(s) referenced by {csv_path} do not exist:\n{shown}{more}\n"
            f"Relative paths are resolved against {base}; fix the paths or set data.root=... to their folder."
        )

    first_mc = next((x for x in leaves if x.kind == "multiclass"), None)
    label = targets[first_mc.path] if first_mc is not None else np.full(len(df), np.nan)
    classes = list(first_mc.classes) if first_mc is not None else []
    if split_column is not None:
        splits = parse_splits(
            df[split_column].tolist(), lambda i, value: f"{csv_path}: {where(i, split_column, value)}"
        )
        frame = pd.DataFrame({"path": paths, "split": splits, "label": label})
    else:
        frame = pd.DataFrame(
            {"path": paths, "split": ["train"] * len(paths), "label": np.full(len(paths), np.nan)}
        )
        frame = split_pool(
            frame, {"train"}, val_fraction, test_fraction, seed
        )  # constant label: a permutation
        frame["label"] = label
    return MultiTaskTable(frame, classes, targets)


# --- dataset and DataModule -------------------------------------------------------------------------------------


class TableDataset(ImageDataset):
    """Rows of a MultiTaskTable as batch-contract dicts: {"inputs", "targets": {leaf path: tensor}, "index"}."""

    def __init__(
        self,
        table: MultiTaskTable,
        rows: Sequence[int] | np.ndarray,
        transform: Any,
        on_bad_image: str = "skip",
    ) -> None:
        super().__init__(table, rows, transform, on_bad_image)
        self.targets = {
            p: np.ascontiguousarray(a[self.rows], dtype=np.float32) for p, a in table.targets.items()
        }

    def __getitem__(self, i: int) -> dict[str, Any] | None:
        item = super().__getitem__(i)
        if item is None:
            return None
        item["targets"] = {p: torch.tensor(a[i], dtype=torch.float32) for p, a in self.targets.items()}
        return item


class TableDataModule(ImageDataModule):
    """Images listed in a CSV with one label column per leaf task of `flow` (data=table).

    `flow` is the flow spec (`{"tasks": {...}}`); `split_column` names a train/val/test column, else val/test are
    split off by `val_fraction` / `test_fraction` with `split_seed`. Other keyword arguments are ImageDataModule's.
    """

    def __init__(
        self,
        csv: str,
        flow: Mapping,
        path_column: str = "path",
        split_column: str | None = None,
        root: str | None = None,
        **common: Any,
    ) -> None:
        super().__init__(**common)
        if self.balance != "none":
            raise ConfigError(
                f"data.balance={self.balance}: balance=sampler/weights supports single-label tasks only; set "
                "data.balance=none for a multi-task table (or use per-task loss weights in the flow)."
            )
        self.csv = str(csv)
        self.flow_spec: dict = plain(flow)
        self.leaves = leaf_specs(self.flow_spec)  # a malformed flow fails at construction, not at setup
        self.path_column = path_column
        self.split_column = split_column
        self.root = None if root is None else str(root)

    def _build_table(self) -> MultiTaskTable:
        return multitask_csv_table(
            self.csv,
            self.flow_spec,
            path_column=self.path_column,
            split_column=self.split_column,
            root=self.root,
            val_fraction=self.val_fraction,
            test_fraction=self.test_fraction,
            seed=self.split_seed,
            hint=self.missing_hint,
        )

    @property
    def table(self) -> MultiTaskTable:
        table = super().table
        assert isinstance(table, MultiTaskTable)
        return table

    @property
    def leaf_paths(self) -> list[str]:
        return [x.path for x in self.leaves]

    @property
    def classes(self) -> list[str] | None:  # type: ignore[override]
        """For single-label callers: the first multiclass task's classes, or None when the flow has none."""
        first = next((x for x in self.leaves if x.kind == "multiclass"), None)
        return list(first.classes) if first is not None else None

    @property
    def num_classes(self) -> int:
        return len(self.classes or [])

    def _check_imbalance(self) -> None:
        """No warning: its advice (data.balance=sampler/weights) does not apply to multi-task tables."""

    def class_weights(self) -> list[float]:
        raise ConfigError(
            "balance=weights supports single-label tasks only; set data.balance=none for a multi-task table "
            "(or use per-task loss weights in the flow)."
        )

    def dataset(self, split: str, *, train: bool = False) -> TableDataset:
        rows = np.arange(len(self.table)) if split == "all" else self.table.rows(split)
        t = self.input_transform
        tf = train_transform(t, self.augment) if train else eval_transform(t)
        return TableDataset(self.table, rows, tf, self.on_bad_image)
