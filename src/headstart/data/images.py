"""Image datasets and LightningDataModules over sample tables.

Bad images are found once, in `setup`, in the main process: they are dropped with a warning (or reported as one
DataError), so a DataLoader worker never meets an unreadable file it did not expect. A file that passes the quick
scan but fails to decode later (e.g. a truncated JPEG, which `verify()` cannot see) is skipped by the dataset:
`__getitem__` returns None and `collate_skip_none` drops it.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler
from torch.utils.data._utils.collate import default_collate

from headstart.core.transforms import InputTransform, eval_transform, train_transform
from headstart.data.kfold import check_kfold, kfold_splits
from headstart.data.samples import SPLITS, SampleTable, csv_table, folder_table
from headstart.errors import ConfigError, DataError
from headstart.serve.transform import load_rgb

log = logging.getLogger(__name__)

ON_BAD_IMAGE = ("skip", "error")
BALANCE = ("none", "sampler", "weights")
PREDICT_SPLITS = (*SPLITS, "all")


class BadImageWarning(UserWarning):
    """An image file could not be read and was skipped."""


class ImbalanceWarning(UserWarning):
    """The training classes are imbalanced beyond `imbalance_ratio`."""


def _check_image(path: str, full: bool) -> str | None:
    """None if the file looks fine, else the reason. `full` decodes every pixel; otherwise only `verify()`."""
    try:
        with Image.open(path) as im:
            if full:
                im.load()
            else:
                im.verify()
    except Exception as e:  # PIL raises many types for corrupt files; any of them means "bad image"
        return f"{type(e).__name__}: {e}"
    return None


class ImageDataset(Dataset):
    """Rows of a sample table as batch-contract dicts: {"inputs", "targets": {"label"}, "index"}.

    Only plain arrays are kept (not the DataFrame), so workers pickle little and do not touch Python object
    refcounts on every access.
    """

    def __init__(
        self,
        table: SampleTable,
        rows: Sequence[int] | np.ndarray,
        transform: Any,
        on_bad_image: str = "skip",
    ) -> None:
        if on_bad_image not in ON_BAD_IMAGE:
            raise ConfigError(f"on_bad_image must be one of {list(ON_BAD_IMAGE)}, got {on_bad_image!r}")
        self.rows = np.asarray(rows, dtype=np.int64)
        self.paths = np.asarray(table.frame["path"].to_numpy()[self.rows], dtype=np.str_)
        self.labels = table.labels[self.rows].astype(np.float32)
        self.transform = transform
        self.on_bad_image = on_bad_image

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any] | None:
        path = str(self.paths[i])
        try:
            image = load_rgb(path)
        except Exception as e:
            if self.on_bad_image == "error":
                raise DataError(
                    f"Cannot read image {path} ({type(e).__name__}: {e}). Remove the file, or set "
                    "data.on_bad_image=skip."
                ) from e
            warnings.warn(
                f"skipping unreadable image {path} ({type(e).__name__}: {e})", BadImageWarning, stacklevel=2
            )
            return None
        return {
            "inputs": self.transform(image),
            "targets": {"label": torch.tensor(self.labels[i], dtype=torch.float32)},
            "index": torch.tensor(self.rows[i], dtype=torch.long),
        }


def data_flow(datamodule: Any) -> dict[str, Any]:
    """The flow spec of the tasks a DataModule answers: its own (a multi-task table, a DoF set), or one multiclass
    task `label` with the data's classes (a folder or a CSV of single labels)."""
    return getattr(datamodule, "flow_spec", None) or {
        "tasks": {"label": {"kind": "multiclass", "classes": list(datamodule.classes)}}
    }


def worker_context(num_workers: int) -> Any:
    """The multiprocessing context for DataLoader workers: None (torch's default) except inside a joblib worker
    (hydra/launcher=joblib), whose default start method 'loky' cannot start them; there the platform's standard
    method is used."""
    if num_workers > 0 and multiprocessing.get_start_method(allow_none=True) == "loky":
        return multiprocessing.get_context(multiprocessing.get_all_start_methods()[0])
    return None


def collate_skip_none(batch: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """`default_collate` without the samples that failed to load (None). A batch of only bad samples is None."""
    batch = [b for b in batch if b is not None]
    if not batch:
        return None
    return default_collate(batch)


class ImageDataModule(L.LightningDataModule):
    """Base DataModule over a `SampleTable` of image files; subclasses implement `_build_table`.

    `transform` is the backbone's input transform (an `InputTransform`, or its dict form); training code may
    also set `dm.transform` after construction, before `setup`. `augment` is a list of instantiated
    torchvision.transforms.v2 transforms applied to the uint8 crop of training images only.

    With balance="weights" nothing changes in the data: the model reads `class_weights()` for its loss.

    Cross-validation: with `folds` = k and `fold` = i, the train+val pool is dealt into k folds stratified by label
    (`headstart.data.kfold`, seeded by `split_seed`); fold i validates and the other folds train. The test split
    is untouched.
    """

    def __init__(
        self,
        *,
        transform: InputTransform | Mapping | None = None,
        augment: Sequence[Any] | None = None,
        batch_size: int = 32,
        num_workers: int = 2,
        pin_memory: bool = False,
        on_bad_image: str = "skip",
        balance: str = "none",
        imbalance_ratio: float = 1.5,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        split_seed: int = 0,
        folds: int | None = None,
        fold: int | None = None,
        missing_hint: str | None = None,
        predict_split: str = "test",
    ) -> None:
        super().__init__()
        for name, value, allowed in (
            ("on_bad_image", on_bad_image, ON_BAD_IMAGE),
            ("balance", balance, BALANCE),
            ("predict_split", predict_split, PREDICT_SPLITS),
        ):
            if value not in allowed:
                raise ConfigError(f"data.{name} must be one of {list(allowed)}, got {value!r}.")
        if int(batch_size) < 1:
            raise ConfigError(f"data.batch_size must be at least 1, got {batch_size}.")
        if int(num_workers) < 0:
            raise ConfigError(f"data.num_workers must be 0 or more, got {num_workers}.")
        if not float(imbalance_ratio) >= 1.0:
            raise ConfigError(f"data.imbalance_ratio must be at least 1, got {imbalance_ratio}.")
        self.transform = transform
        self.augment = list(augment) if augment is not None else []
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.on_bad_image = on_bad_image
        self.balance = balance
        self.imbalance_ratio = float(imbalance_ratio)
        self.val_fraction = float(val_fraction)
        self.test_fraction = float(test_fraction)
        self.split_seed = int(split_seed)
        self.folds = folds
        self.fold = fold
        self.missing_hint = missing_hint
        self.predict_split = predict_split
        self.bad_paths: list[str] = []
        self._table: SampleTable | None = None

    # --- to implement -------------------------------------------------------------------------------------

    def _build_table(self) -> SampleTable:
        raise NotImplementedError

    # --- setup --------------------------------------------------------------------------------------------

    @property
    def input_transform(self) -> InputTransform:
        t = self.transform
        if t is None:
            raise ConfigError(
                "The data module has no input transform: set data.transform (resize, crop, mean, std), or let "
                "the training code set it from the backbone before setup()."
            )
        if isinstance(t, InputTransform):
            return t
        if isinstance(t, Mapping):
            return InputTransform.from_dict(dict(t))
        raise ConfigError(f"data.transform must be an InputTransform or a dict, got {type(t).__name__}.")

    def setup(self, stage: str | None = None) -> None:
        """Build the sample table and drop unreadable images, once (later calls do nothing)."""
        _ = self.input_transform  # fail early on a missing transform
        if self._table is not None:
            return
        # checked here, not in __init__: there Hydra's instantiate would bury the message in its own error
        check_kfold(self.folds, self.fold)
        table = self._build_table()
        table = self._drop_bad_images(table)
        if len(table) == 0:
            raise DataError(
                "No readable images left after dropping the unreadable ones; check the data folder."
            )
        self._table = self._apply_fold(table)
        self._check_imbalance()

    def _apply_fold(self, table: SampleTable) -> SampleTable:
        """The table with this fold's train/val splits (after bad images are dropped: a DoF set stores the same
        rows, so its folds are these)."""
        if self.folds is None:
            return table
        frame = table.frame
        split = kfold_splits(
            frame["path"].to_numpy(),
            frame["split"].to_numpy(),
            table.labels,
            self.folds,
            self.fold,
            self.split_seed,
            table.classes,
        )
        return dataclasses.replace(table, frame=frame.assign(split=split))

    def _drop_bad_images(self, table: SampleTable) -> SampleTable:
        full = self.on_bad_image == "error"
        paths = table.paths
        workers = max(1, min(8, os.cpu_count() or 1))
        with ThreadPoolExecutor(max_workers=workers) as pool:  # PIL releases the GIL while reading/decoding
            reasons = list(pool.map(lambda p: _check_image(p, full), paths, chunksize=64))
        bad = [(p, r) for p, r in zip(paths, reasons, strict=True) if r is not None]
        if not bad:
            return table
        listing = "\n".join(f"  {p} ({r})" for p, r in bad[:20])
        more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
        if self.on_bad_image == "error":
            raise DataError(
                f"{len(bad)} unreadable image file(s):\n{listing}{more}\n"
                "Remove or replace the file(s), or set data.on_bad_image=skip to leave them out."
            )
        self.bad_paths = [p for p, _ in bad]
        msg = f"Skipping {len(bad)} unreadable image file(s) of {len(paths)}:\n{listing}{more}"
        warnings.warn(msg, BadImageWarning, stacklevel=3)
        log.warning(msg)
        return table.subset(np.array([r is None for r in reasons]))

    def _check_imbalance(self) -> None:
        counts = self.class_counts("train")
        if len(counts) < 2 or min(counts) == 0:  # a class without training images: training refuses it
            return
        ratio = max(counts) / min(counts)
        if ratio > self.imbalance_ratio and self.balance == "none":
            shown = ", ".join(f"{c}={n}" for c, n in zip(self.classes, counts, strict=True))
            msg = (
                f"Training classes are imbalanced (max/min = {ratio:.2f} > {self.imbalance_ratio:g}): {shown}. "
                "Consider data.balance=sampler (oversample rare classes) or data.balance=weights "
                "(weight the loss)."
            )
            warnings.warn(msg, ImbalanceWarning, stacklevel=3)
            log.warning(msg)

    # --- after setup --------------------------------------------------------------------------------------

    @property
    def table(self) -> SampleTable:
        """The sample table without unreadable images; batch "index" values are rows of it."""
        if self._table is None:
            raise RuntimeError("call setup() before using the data module's table")
        return self._table

    @property
    def classes(self) -> list[str]:
        return self.table.classes

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def class_counts(self, split: str = "train") -> list[int]:
        return self.table.class_counts(split)

    def class_weights(self) -> list[float]:
        """Inverse-frequency weight per class over the train split, scaled to mean 1 over classes present.

        A class without training samples gets weight 0 (it cannot contribute to the loss anyway).
        """
        counts = np.asarray(self.class_counts("train"), dtype=np.float64)
        inv = np.zeros_like(counts)
        present = counts > 0
        inv[present] = 1.0 / counts[present]
        if present.any():
            inv = inv / inv[present].mean()
        return inv.tolist()

    # --- loaders ------------------------------------------------------------------------------------------

    def dataset(self, split: str, *, train: bool = False) -> ImageDataset:
        """The dataset of one split ("all" for every row); `train` selects the augmenting transform."""
        rows = np.arange(len(self.table)) if split == "all" else self.table.rows(split)
        t = self.input_transform
        tf = train_transform(t, self.augment) if train else eval_transform(t)
        return ImageDataset(self.table, rows, tf, self.on_bad_image)

    def dataloader(self, split: str, *, train: bool = False) -> DataLoader:
        """A DataLoader over one split; `train` adds augmentation and shuffling (or the balancing sampler)."""
        ds = self.dataset(split, train=train)
        sampler = None
        if train and self.balance == "sampler" and len(ds) > 0:
            w = np.asarray(self.class_weights(), dtype=np.float64)
            labels = ds.labels
            known = ~np.isnan(labels)
            per_sample = np.ones(len(ds), dtype=np.float64)
            per_sample[known] = w[labels[known].astype(np.int64)]
            sampler = WeightedRandomSampler(
                torch.as_tensor(per_sample), num_samples=len(ds), replacement=True
            )
        return DataLoader(
            ds,
            batch_size=self.batch_size,
            shuffle=train and sampler is None,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate_skip_none,
            multiprocessing_context=worker_context(self.num_workers),
        )

    def train_dataloader(self) -> DataLoader:
        return self.dataloader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self.dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self.dataloader("test")

    def predict_dataloader(self) -> DataLoader:
        return self.dataloader(self.predict_split)


class FolderDataModule(ImageDataModule):
    """Images in class folders: `root/{train,val,test}/<class>/*` (or `root/train/<class>/*`, or `root/<class>/*`)."""

    def __init__(self, root: str, **common: Any) -> None:
        super().__init__(**common)
        self.root = str(root)

    def _build_table(self) -> SampleTable:
        return folder_table(
            self.root, self.val_fraction, self.test_fraction, self.split_seed, self.missing_hint
        )


class CsvDataModule(ImageDataModule):
    """Images listed in a CSV: a path column, a label column (empty = missing) and optionally a split column."""

    def __init__(
        self,
        csv: str,
        path_column: str = "path",
        label_column: str = "label",
        split_column: str | None = None,
        root: str | None = None,
        classes: Sequence[str] | None = None,
        **common: Any,
    ) -> None:
        super().__init__(**common)
        self.csv = str(csv)
        self.path_column = path_column
        self.label_column = label_column
        self.split_column = split_column
        self.root = None if root is None else str(root)
        self.classes_given = None if classes is None else [str(c) for c in classes]

    def _build_table(self) -> SampleTable:
        return csv_table(
            self.csv,
            path_column=self.path_column,
            label_column=self.label_column,
            split_column=self.split_column,
            root=self.root,
            classes=self.classes_given,
            val_fraction=self.val_fraction,
            test_fraction=self.test_fraction,
            seed=self.split_seed,
            hint=self.missing_hint,
        )
