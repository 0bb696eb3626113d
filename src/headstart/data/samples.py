"""Sample tables: which image files exist, which split each belongs to, and its class.

A sample table is a DataFrame with one row per image: `path` (absolute str), `split` ("train"/"val"/"test") and
`label` (float class index into `classes`, NaN where the label is missing). The row number is the sample's identity:
batches carry it as `"index"`, so every prediction maps back to its file.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from headstart.errors import ConfigError, DataError

SPLITS: tuple[str, ...] = ("train", "val", "test")
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
)
_SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


@dataclass
class SampleTable:
    """One row per image: `frame` has columns path, split, label; `classes` names the label indices."""

    frame: pd.DataFrame
    classes: list[str]

    def __post_init__(self) -> None:
        missing = {"path", "split", "label"} - set(self.frame.columns)
        if missing:
            raise ValueError(f"sample table lacks columns {sorted(missing)}")
        self.classes = [str(c) for c in self.classes]

    def __len__(self) -> int:
        return len(self.frame)

    @property
    def paths(self) -> list[str]:
        return self.frame["path"].tolist()

    @property
    def labels(self) -> np.ndarray:
        """float64[N] class indices, NaN where missing."""
        return self.frame["label"].to_numpy(dtype=np.float64)

    def rows(self, split: str) -> np.ndarray:
        """Row indices (int64) of one split, in table order."""
        return np.flatnonzero(self.frame["split"].to_numpy() == split).astype(np.int64)

    def class_counts(self, split: str = "train") -> list[int]:
        """Labelled samples per class in `split` (missing labels are not counted)."""
        labels = self.labels[self.rows(split)]
        labels = labels[~np.isnan(labels)].astype(np.int64)
        return np.bincount(labels, minlength=len(self.classes)).tolist()

    def subset(self, keep: np.ndarray) -> SampleTable:
        """A new table with only the rows where `keep` (bool[N]) is true, renumbered from 0."""
        return SampleTable(
            self.frame[np.asarray(keep, dtype=bool)].reset_index(drop=True), list(self.classes)
        )


def layout_help(val_fraction: float = 0.1, test_fraction: float = 0.1) -> str:
    """The expected folder layout, in words, for error messages."""
    train = 1.0 - val_fraction - test_fraction
    if (val_fraction, test_fraction) == (0.1, 0.1):
        ratio = "8:1:1"
    else:
        ratio = f"{train:.0%} / {val_fraction:.0%} / {test_fraction:.0%}"
    return (
        "Expected layout: ROOT/{train,val,test}/<class>/*.jpg (any of jpg jpeg png bmp gif webp tif tiff). "
        f"A train/ folder alone is split {ratio} into train/val/test; class folders directly under ROOT "
        "(ROOT/<class>/*.jpg) are split the same way."
    )


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    if not (0.0 <= val_fraction < 1.0 and 0.0 <= test_fraction < 1.0 and val_fraction + test_fraction < 1.0):
        raise ConfigError(
            f"val_fraction={val_fraction} and test_fraction={test_fraction} must each be in [0, 1) and sum "
            "to less than 1; fix data.val_fraction / data.test_fraction."
        )


def stratified_split(
    labels: Sequence[float] | np.ndarray, val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0
) -> np.ndarray:
    """Assign "train"/"val"/"test" to each sample, per class, with a fixed seed.

    Deterministic for a given label sequence: the caller fixes the order (sort paths first). Each class (and the
    group of unlabelled samples, NaN) gives round(n * fraction) samples to val and to test, but always keeps at
    least one for train.
    """
    check_fractions(val_fraction, test_fraction)
    labels = np.asarray(labels, dtype=np.float64)
    out = np.full(len(labels), "train", dtype=object)
    rng = np.random.default_rng(seed)
    keys = np.where(np.isnan(labels), -1.0, labels)
    for key in np.unique(keys):  # sorted, so the rng is consumed in a fixed order
        members = np.flatnonzero(keys == key)
        n = len(members)
        n_val = int(np.floor(n * val_fraction + 0.5))
        n_test = int(np.floor(n * test_fraction + 0.5))
        while n_val + n_test >= n and n_val + n_test > 0:
            if n_val >= n_test:
                n_val -= 1
            else:
                n_test -= 1
        perm = members[rng.permutation(n)]
        out[perm[:n_val]] = "val"
        out[perm[n_val : n_val + n_test]] = "test"
    return out


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _images_under(folder: Path) -> list[Path]:
    """Image files anywhere below `folder`, skipping hidden files and folders, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            p = Path(dirpath) / name
            if _is_image(p):
                found.append(p)
    return sorted(found)


def _missing_root_error(root: Path, val_fraction: float, test_fraction: float, hint: str | None) -> DataError:
    msg = (
        f"Data folder not found: {root}\n{layout_help(val_fraction, test_fraction)}\n"
        "Put the images there, or point data.root=... at the folder that holds them."
    )
    if hint:
        msg += f"\n{hint}"
    return DataError(msg)


def folder_table(
    root: str | os.PathLike,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    hint: str | None = None,
) -> SampleTable:
    """Sample table of a folder of class folders.

    Layouts: `root/{train,val,test}/<class>/*.<ext>`; missing val/ or test/ folders are split off the train pool
    (stratified, `seed`), as fractions of that pool. `root/<class>/*.<ext>` (no split folders) is the pool itself.
    Classes are the sorted union of class folder names over all splits. `hint` is appended to the error raised
    when the root is missing (e.g. how to build the data set).
    """
    check_fractions(val_fraction, test_fraction)
    root = Path(root).expanduser().absolute()
    if not root.is_dir():
        raise _missing_root_error(root, val_fraction, test_fraction, hint)

    split_dirs = {s: root / s for s in SPLITS if (root / s).is_dir()}
    if split_dirs:
        groups = {
            s: {d.name: _images_under(d) for d in _class_dirs(folder)} for s, folder in split_dirs.items()
        }
    else:
        groups = {"train": {d.name: _images_under(d) for d in _class_dirs(root)}}
    classes = _check_classes(root, groups, bool(split_dirs))
    index = {c: i for i, c in enumerate(classes)}

    paths: list[str] = []
    splits: list[str] = []
    labels: list[float] = []
    for split in SPLITS:
        for cls, files in sorted(groups.get(split, {}).items()):
            paths += [str(p) for p in files]
            splits += [split] * len(files)
            labels += [float(index[cls])] * len(files)
    if not paths:
        msg = f"No images found under {root}.\n{layout_help(val_fraction, test_fraction)}"
        if hint:
            msg += f"\n{hint}"
        raise DataError(msg)

    frame = pd.DataFrame({"path": paths, "split": splits, "label": np.asarray(labels, dtype=np.float64)})
    frame = split_pool(frame, set(groups), val_fraction, test_fraction, seed)
    return SampleTable(frame, classes)


def _check_classes(root: Path, groups: dict[str, dict[str, list[Path]]], split_folders: bool) -> list[str]:
    """The sorted class names; DataError for a class folder without images anywhere (a class nothing can teach) or
    for a single class."""
    classes = sorted({c for by_class in groups.values() for c in by_class})
    empty = [c for c in classes if not any(by_class.get(c) for by_class in groups.values())]
    if empty and len(empty) < len(classes):  # all empty: "No images found" says it better
        folders = [
            str(root / split / c if split_folders else root / c)
            for split, by_class in groups.items()
            for c in empty
            if c in by_class
        ]
        raise DataError(
            f"class folder(s) without images under {root}: {', '.join(folders[:5])}"
            f"{' ...' if len(folders) > 5 else ''}. A class needs images to be learned: add images, or remove "
            "the empty folder(s)"
        )
    if len(classes) == 1 and not empty:
        raise DataError(
            f"found one class under {root}: '{classes[0]}'. A classifier needs at least two class folders "
            f"({layout_help()})"
        )
    return classes


def split_pool(
    frame: pd.DataFrame, present: set[str], val_fraction: float, test_fraction: float, seed: int
) -> pd.DataFrame:
    """Split val/test off the train rows for each split that is not already present."""
    v = 0.0 if "val" in present else val_fraction
    t = 0.0 if "test" in present else test_fraction
    if v == 0.0 and t == 0.0:
        return frame
    pool = np.flatnonzero(frame["split"].to_numpy() == "train")
    order = pool[np.argsort(frame["path"].to_numpy()[pool], kind="stable")]  # independent of listing order
    assigned = stratified_split(frame["label"].to_numpy()[order], v, t, seed)
    split = frame["split"].to_numpy(dtype=object).copy()
    split[order] = assigned
    return frame.assign(split=split)


def parse_splits(values: list[str], where: Callable[[int, str], str]) -> list[str]:
    """Split names from a CSV column (aliases like `valid` accepted); `where(i, value)` names a bad cell."""
    splits = []
    for i, value in enumerate(values):
        name = _SPLIT_ALIASES.get(str(value).strip().lower())
        if name is None:
            raise DataError(
                f"{where(i, value)} is not one of train/val/test. Fix the value, or drop data.split_column to split "
                "automatically."
            )
        splits.append(name)
    return splits


def csv_table(
    csv_path: str | os.PathLike,
    path_column: str = "path",
    label_column: str = "label",
    split_column: str | None = None,
    root: str | os.PathLike | None = None,
    classes: Sequence[str] | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    hint: str | None = None,
) -> SampleTable:
    """Sample table of a CSV file with a path column, a label column and optionally a split column.

    Relative paths are resolved against `root`, or the CSV's folder. Labels are read as strings; an empty label
    is missing (NaN). Classes are `classes` if given (a label outside it is an error), else the sorted unique
    labels. Without a split column, val/test are split off as in `folder_table`.
    """
    check_fractions(val_fraction, test_fraction)
    csv_path = Path(csv_path).expanduser().absolute()
    if not csv_path.is_file():
        msg = (
            f"CSV file not found: {csv_path}\nExpected a CSV with a '{path_column}' column (image paths, relative "
            f"to the CSV's folder or data.root) and a '{label_column}' column; point data.csv=... at it."
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
    wanted = [c for c in (path_column, label_column, split_column) if c is not None]
    missing = [c for c in wanted if c not in df.columns]
    if missing:
        raise DataError(
            f"CSV {csv_path} has no column(s) {missing}; its columns are {list(df.columns)}. "
            "Set data.path_column / data.label_column / data.split_column to the right names."
        )
    if len(df) == 0:
        raise DataError(f"CSV {csv_path} has no rows; add one row per image.")

    def line(i: int) -> str:
        return f"{csv_path}, line {i + 2}"  # +1 for the header, +1 for 1-based lines

    raw_labels = [s.strip() for s in df[label_column].tolist()]
    classes = sorted({s for s in raw_labels if s}) if classes is None else [str(c) for c in classes]
    index = {c: i for i, c in enumerate(classes)}
    labels = np.full(len(df), np.nan)
    for i, s in enumerate(raw_labels):
        if not s:
            continue
        if s not in index:
            raise DataError(
                f"{line(i)}: label {s!r} is not one of the classes {classes}. "
                "Fix the label, or add it to data.classes."
            )
        labels[i] = index[s]

    paths = []
    for p in df[path_column].tolist():
        p = Path(p.strip()).expanduser()
        paths.append(os.path.normpath(p if p.is_absolute() else base / p))
    absent = [(i, p) for i, p in enumerate(paths) if not os.path.isfile(p)]
    if absent:
        shown = "\n".join(f"  {line(i)}: {p}" for i, p in absent[:5])
        more = f"\n  ... and {len(absent) - 5} more" if len(absent) > 5 else ""
        raise DataError(
            f"{len(absent)} image file(s) referenced by {csv_path} do not exist:\n{shown}{more}\n"
            f"Relative paths are resolved against {base}; fix the paths or set data.root=... to their folder."
        )

    if split_column is not None:
        splits = parse_splits(df[split_column].tolist(), lambda i, value: f"{line(i)}: split {value!r}")
        frame = pd.DataFrame({"path": paths, "split": splits, "label": labels})
    else:
        frame = pd.DataFrame({"path": paths, "split": ["train"] * len(paths), "label": labels})
        frame = split_pool(frame, {"train"}, val_fraction, test_fraction, seed)
    return SampleTable(frame, list(classes))
