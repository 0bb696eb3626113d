"""k-fold cross-validation: which samples of the train+val pool validate in fold i of k.

One assignment serves every data path (image folders, CSV tables, multi-task tables, stored DoF sets), so that a
head trained on features validates on exactly the images the image model of the same fold validates on. The test
split is never part of the pool: it stays the held-out split it is without folds.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from headstart.errors import ConfigError

POOL_SPLITS: tuple[str, ...] = ("train", "val")
_RUN_ALL = "run every fold with: python train.py -m data.fold={folds} data.folds={k}"


def _is_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def check_kfold(folds: int | None, fold: int | None) -> None:
    """A ConfigError naming the fix unless (folds, fold) is (None, None) or (k >= 2, 0..k-1)."""
    if folds is None and fold is None:
        return
    if folds is None:
        raise ConfigError(
            f"data.fold={fold} needs data.folds (the number of folds k): e.g. data.folds=5 data.fold={fold}, or "
            "drop data.fold to train without cross-validation."
        )
    if not _is_int(folds) or folds < 2:
        raise ConfigError(
            f"data.folds={folds!r}: cross-validation needs an integer number of folds of at least 2 (e.g. "
            "data.folds=5); set data.folds=null to train without cross-validation."
        )
    every = ",".join(str(i) for i in range(folds))
    if fold is None:
        raise ConfigError(
            f"data.folds={folds} needs data.fold, the fold that validates (0..{folds - 1}); "
            + _RUN_ALL.format(folds=every, k=folds)
        )
    if not _is_int(fold) or not 0 <= fold < folds:
        raise ConfigError(
            f"data.fold={fold!r} is out of range for data.folds={folds}: folds are numbered 0..{folds - 1}; "
            + _RUN_ALL.format(folds=every, k=folds)
        )


def kfold_assign(
    paths: Sequence[str] | np.ndarray, labels: Sequence[float] | np.ndarray, folds: int, seed: int = 0
) -> np.ndarray:
    """The fold (int64, 0..folds-1) of each sample, stratified by label; deterministic for `seed`.

    Samples are ordered by path first, so the result does not depend on listing order. Within each class (and the
    group of unlabelled samples, NaN) a seeded permutation is dealt round-robin, each class starting where the
    previous one stopped: per class, and in total, fold sizes differ by at most one.
    """
    if not _is_int(folds) or folds < 1:
        raise ValueError(f"folds must be a positive integer, got {folds!r}")
    paths = np.asarray(paths, dtype=str)
    labels = np.asarray(labels, dtype=np.float64)
    if len(paths) != len(labels):
        raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
    order = np.argsort(paths, kind="stable")
    keys = np.where(np.isnan(labels), -1.0, labels)[order]
    rng = np.random.default_rng(seed)
    out = np.empty(len(paths), dtype=np.int64)
    start = 0
    for key in np.unique(keys):  # sorted, so the rng is consumed in a fixed order
        members = order[keys == key]
        dealt = members[rng.permutation(len(members))]
        out[dealt] = (start + np.arange(len(members))) % folds
        start = (start + len(members)) % folds
    return out


def check_pool(labels: np.ndarray, folds: int, classes: Sequence[str] | None = None) -> None:
    """A ConfigError unless every class present in the pool has at least `folds` samples (one per fold)."""
    labels = np.asarray(labels, dtype=np.float64)
    if len(labels) < folds:
        raise ConfigError(
            f"data.folds={folds} needs at least {folds} samples in the train+val pool, which holds {len(labels)}; "
            "lower data.folds or add images."
        )
    known = labels[~np.isnan(labels)].astype(np.int64)
    counts = np.bincount(known, minlength=len(classes or []))
    short = [(c, int(n)) for c, n in enumerate(counts) if 0 < n < folds]
    if short:
        names = list(classes or [])
        shown = ", ".join(f"'{names[c] if c < len(names) else c}' has {n}" for c, n in short)
        fewest = min(n for _, n in short)
        more = "add images of the short class(es)"
        fix = f"lower data.folds to {fewest}, or {more}" if fewest >= 2 else more
        raise ConfigError(
            f"data.folds={folds} needs at least {folds} samples of every class in the train+val pool (each fold "
            f"validates on every class), but {shown}; {fix}."
        )


def kfold_splits(
    paths: Sequence[str] | np.ndarray,
    splits: Sequence[str] | np.ndarray,
    labels: Sequence[float] | np.ndarray,
    folds: int,
    fold: int,
    seed: int = 0,
    classes: Sequence[str] | None = None,
) -> np.ndarray:
    """The split column of fold `fold` of `folds`: the train+val pool's samples in that fold become "val", the
    rest of the pool "train"; every other row (test) keeps its split. ConfigError for bad settings or a pool
    that has fewer than `folds` samples of a class."""
    check_kfold(folds, fold)
    splits = np.asarray(splits, dtype=object)
    labels = np.asarray(labels, dtype=np.float64)
    pool = np.flatnonzero(np.isin(splits.astype(str), POOL_SPLITS))
    check_pool(labels[pool], folds, classes)
    assigned = kfold_assign(np.asarray(paths, dtype=str)[pool], labels[pool], folds, seed)
    out = splits.copy()
    out[pool] = np.where(assigned == fold, "val", "train")
    return out
