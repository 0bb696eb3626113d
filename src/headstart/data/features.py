"""The DoF DataModule: batches of stored backbone features, read whole batches at a time (no per-sample collate).

A set from `headstart.dof` holds, per split, rows of features with their targets, sample index and view id. With K
views of each training sample, every epoch draws one view per sample.

Cross-validation (`folds`, `fold`) re-deals the stored train and val rows into folds with the assignment the image
DataModules use (`headstart.data.kfold`, over the set's sample table), so one stored set serves every fold.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from headstart.data.kfold import POOL_SPLITS, check_kfold, kfold_splits
from headstart.data.table import leaf_specs
from headstart.dof import DofError, DofSplit, open_dof
from headstart.errors import DataError
from headstart.flow import TaskFlow


class RowBatchSampler(Sampler[np.ndarray]):
    """Yields arrays of row positions, one array per batch.

    Rows are grouped by sample (`index`); each pass draws one row (view) per sample, shuffled when `shuffle` is true.
    The pass counter advances with every iteration, so each epoch sees new views and a new order, reproducibly.
    """

    def __init__(self, sample_index: np.ndarray, batch_size: int, shuffle: bool, seed: int = 0) -> None:
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        order = np.argsort(sample_index, kind="stable")
        samples, starts = np.unique(sample_index[order], return_index=True)
        self._rows_by_sample = np.split(order, starts[1:])
        self._single_view = all(len(r) == 1 for r in self._rows_by_sample)
        self._first_rows = np.array([r[0] for r in self._rows_by_sample], dtype=np.int64)
        self.num_samples = len(samples)

    def __len__(self) -> int:
        return (self.num_samples + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[np.ndarray]:
        rng = np.random.default_rng((self.seed, self.epoch))
        self.epoch += 1
        if self._single_view or not self.shuffle:
            rows = self._first_rows  # without shuffling (evaluation), always view 0 of each sample
        else:
            rows = np.array([r[rng.integers(len(r))] for r in self._rows_by_sample], dtype=np.int64)
        if self.shuffle:
            rows = rows[rng.permutation(len(rows))]
        for start in range(0, len(rows), self.batch_size):
            yield rows[start : start + self.batch_size]


class RowSelection:
    """Chosen rows of several stored splits, read as one split (`len`, `take`): a fold's train or val rows."""

    def __init__(self, parts: list[tuple[DofSplit, np.ndarray]]) -> None:
        self.parts = [(split, np.asarray(rows, dtype=np.int64)) for split, rows in parts]
        sizes = np.array([len(rows) for _, rows in self.parts], dtype=np.int64)
        self._starts = np.cumsum(sizes) - sizes
        self.count = int(sizes.sum())

    def __len__(self) -> int:
        return self.count

    def take(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Rows at positions `rows` of the selection (any order), as `DofSplit.take` returns them."""
        rows = np.asarray(rows, dtype=np.int64)
        part = np.searchsorted(self._starts, rows, side="right") - 1
        out: dict[str, np.ndarray] = {}
        for i, (split, chosen) in enumerate(self.parts):
            mine = np.flatnonzero(part == i)
            arrays = split.take(chosen[rows[mine] - self._starts[i]])
            for name, a in arrays.items():
                if name not in out:
                    out[name] = np.empty((len(rows), *a.shape[1:]), dtype=a.dtype)
                out[name][mine] = a
        return out


def read_rows(split: DofSplit | RowSelection, rows: np.ndarray) -> dict[str, np.ndarray]:
    """`split.take(rows)`, with a damaged set (non-finite features, an altered file) as a DataError: the reader checks
    what it serves, and the run stops with its message."""
    try:
        return split.take(rows)
    except DofError as e:
        raise DataError(str(e)) from None


class FeatureBatches(Dataset):
    """`dataset[rows]` -> one batch in the data contract: {"inputs", "targets": {task: ...}, "index"}."""

    def __init__(self, split: DofSplit | RowSelection, tasks: list[str]) -> None:
        self.split = split
        self.tasks = tasks

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, rows: np.ndarray) -> dict[str, Any]:
        arrays = read_rows(self.split, np.asarray(rows))
        return {
            "inputs": torch.from_numpy(np.ascontiguousarray(arrays["features"])).float(),
            "targets": {t: torch.from_numpy(np.ascontiguousarray(arrays[f"target.{t}"])) for t in self.tasks},
            "index": torch.from_numpy(np.ascontiguousarray(arrays["index"])),
        }


class FeatureDataModule(L.LightningDataModule):
    """Serves a DoF set written by extraction. `path` is the set's directory.

    With `folds` = k and `fold` = i the stored train and val rows are re-dealt: the samples of fold i (of the
    image data's assignment, seeded by `split_seed`) validate, the others train; test is served as stored. A sample
    that moves from train to val is validated on its plain view (view 0); one that moves from val to train has only
    that view, even when the set holds several views of its training samples.
    """

    def __init__(
        self,
        path: str | Path,
        batch_size: int = 256,
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 0,
        verify: bool = False,
        memory_budget: int = 2 * 1024**3,
        folds: int | None = None,
        fold: int | None = None,
        split_seed: int = 0,
    ) -> None:
        super().__init__()
        check_kfold(folds, fold)
        self.folds = folds
        self.fold = fold
        self.split_seed = int(split_seed)
        self._folded: dict[str, RowSelection] = {}
        self.path = Path(path)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.seed = seed
        self.verify = verify
        self.memory_budget = memory_budget
        self.dof = None
        self._samplers: dict[str, RowBatchSampler] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.dof is not None:
            return
        try:
            self.dof = open_dof(self.path, verify=self.verify, memory_budget=self.memory_budget)
            if (
                self.dof.in_memory
            ):  # loaded (and checked finite) now, so a damaged split stops the run before training
                for name in self.dof.splits:
                    self.dof.split(name).arrays()
        except DofError as e:
            raise DataError(str(e)) from None
        self.flow_spec = self.dof.meta["flow"]
        self.tasks = TaskFlow.from_spec(self.flow_spec).leaf_paths
        if self.folds is not None:
            self._folded = self._fold_splits()

    def _fold_splits(self) -> dict[str, RowSelection]:
        """This fold's train and val: the stored train+val rows, re-dealt by their sample's fold."""
        samples = self.dof.meta["samples"]
        labels = np.array([np.nan if v is None else v for v in samples["label"]], dtype=np.float64)
        paths, splits, classes = samples["path"], samples["split"], self._label_classes()
        wanted = kfold_splits(paths, splits, labels, self.folds, self.fold, self.split_seed, classes)
        parts: dict[str, list[tuple[DofSplit, np.ndarray]]] = {"train": [], "val": []}
        for name in POOL_SPLITS:
            if name not in self.dof.splits:
                continue
            stored = self.dof.split(name)
            arrays = read_rows(stored, np.arange(len(stored)))
            goes = wanted[arrays["index"]]
            for target in parts:
                keep = goes == target
                if target == "val":
                    keep &= arrays["view"] == 0
                parts[target].append((stored, np.flatnonzero(keep)))
        return {name: RowSelection(p) for name, p in parts.items()}

    def split(self, name: str) -> DofSplit | RowSelection:
        """The rows served as split `name`: this fold's rows for train and val under cross-validation."""
        return self._folded[name] if name in self._folded else self.dof.split(name)

    def _label_classes(self) -> list[str]:
        """Names of the sample table's `label` values: the first multiclass task's classes (as the table has)."""
        first = next((leaf for leaf in leaf_specs(self.flow_spec) if leaf.kind == "multiclass"), None)
        return list(first.classes) if first is not None else []

    @property
    def classes(self) -> list[str]:
        label = self.flow_spec["tasks"].get("label", {})
        return list(label.get("classes", []))

    @property
    def feature_dim(self) -> int:
        return int(self.dof.feature_shape[0])

    def class_counts(self, split: str = "train") -> list[int]:
        labels = read_rows(self.split(split), self._sampler(split, False)._first_rows)["target.label"]
        labels = labels[~np.isnan(labels)].astype(np.int64)
        return np.bincount(labels, minlength=len(self.classes)).tolist()

    def class_weights(self) -> list[float]:
        counts = np.asarray(self.class_counts("train"), dtype=np.float64)
        weights = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / len(counts), 0.0)
        return (weights / weights[counts > 0].mean()).tolist()

    def restart(self, seed: int) -> None:
        """Serve batches from the start again, in the order of `seed` (as a new DataModule over the opened set)."""
        self.seed = seed
        self._samplers = {}

    def _sampler(self, split: str, shuffle: bool) -> RowBatchSampler:
        key = f"{split}:{shuffle}"
        if key not in self._samplers:
            index = read_rows(self.split(split), np.arange(len(self.split(split))))["index"]
            self._samplers[key] = RowBatchSampler(index, self.batch_size, shuffle, self.seed)
        return self._samplers[key]

    def dataloader(self, split: str, shuffle: bool = False) -> DataLoader:
        return DataLoader(
            FeatureBatches(self.split(split), self.tasks),
            sampler=self._sampler(split, shuffle),
            batch_size=None,  # the sampler yields whole batches
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self.dataloader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self.dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self.dataloader("test")
