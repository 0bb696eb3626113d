"""The DoF DataModule: batches of stored backbone features, read whole batches at a time (no per-sample collate).

A set from `headstart.dof` holds, per split, rows of features with their targets, sample index and view id. With K
views of each training sample, every epoch draws one view per sample.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

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


class FeatureBatches(Dataset):
    """`dataset[rows]` -> one batch in the data contract: {"inputs", "targets": {task: ...}, "index"}."""

    def __init__(self, split: DofSplit, tasks: list[str]) -> None:
        self.split = split
        self.tasks = tasks

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, rows: np.ndarray) -> dict[str, Any]:
        arrays = self.split.take(np.asarray(rows))
        return {
            "inputs": torch.from_numpy(np.ascontiguousarray(arrays["features"])).float(),
            "targets": {t: torch.from_numpy(np.ascontiguousarray(arrays[f"target.{t}"])) for t in self.tasks},
            "index": torch.from_numpy(np.ascontiguousarray(arrays["index"])),
        }


class FeatureDataModule(L.LightningDataModule):
    """Serves a DoF set written by extraction. `path` is the set's directory."""

    def __init__(
        self,
        path: str | Path,
        batch_size: int = 256,
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 0,
        verify: bool = False,
        memory_budget: int = 2 * 1024**3,
    ) -> None:
        super().__init__()
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
        except DofError as e:
            raise DataError(str(e)) from None
        self.flow_spec = self.dof.meta["flow"]
        self.tasks = TaskFlow.from_spec(self.flow_spec).leaf_paths

    @property
    def classes(self) -> list[str]:
        label = self.flow_spec["tasks"].get("label", {})
        return list(label.get("classes", []))

    @property
    def feature_dim(self) -> int:
        return int(self.dof.feature_shape[0])

    def class_counts(self, split: str = "train") -> list[int]:
        labels = self.dof.split(split).take(self._sampler(split, False)._first_rows)["target.label"]
        labels = labels[~np.isnan(labels)].astype(np.int64)
        return np.bincount(labels, minlength=len(self.classes)).tolist()

    def class_weights(self) -> list[float]:
        counts = np.asarray(self.class_counts("train"), dtype=np.float64)
        weights = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / len(counts), 0.0)
        return (weights / weights[counts > 0].mean()).tolist()

    def _sampler(self, split: str, shuffle: bool) -> RowBatchSampler:
        key = f"{split}:{shuffle}"
        if key not in self._samplers:
            index = self.dof.split(split).take(np.arange(len(self.dof.split(split))))["index"]
            self._samplers[key] = RowBatchSampler(index, self.batch_size, shuffle, self.seed)
        return self._samplers[key]

    def dataloader(self, split: str, shuffle: bool = False) -> DataLoader:
        return DataLoader(
            FeatureBatches(self.dof.split(split), self.tasks),
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
