"""Data: sample tables (folders, CSV), image DataModules, built-in data sets.

A batch is a dict: "inputs" float[B,3,H,W] (normalized), "targets" {"label": float[B]} (class index, NaN where
missing), "index" long[B] (the row in the sample table).
"""

from __future__ import annotations

from typing import Any

from headstart.data.digits import DigitsDataModule, materialize_digits
from headstart.data.images import (
    BadImageWarning,
    CsvDataModule,
    FolderDataModule,
    ImageDataModule,
    ImageDataset,
    ImbalanceWarning,
    collate_skip_none,
    data_flow,
    load_rgb,
)
from headstart.data.kfold import check_kfold, kfold_assign, kfold_splits
from headstart.data.samples import (
    IMAGE_EXTENSIONS,
    SPLITS,
    SampleTable,
    csv_table,
    folder_table,
    layout_help,
    stratified_split,
)
from headstart.data.security import SECURITY_FLOW, SecurityDataModule, make_security
from headstart.data.table import (
    MultiTaskTable,
    TableDataModule,
    TableDataset,
    leaf_specs,
    multitask_csv_table,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "SECURITY_FLOW",
    "SPLITS",
    "BadImageWarning",
    "CsvDataModule",
    "DigitsDataModule",
    "FolderDataModule",
    "ImageDataModule",
    "ImageDataset",
    "ImbalanceWarning",
    "MultiTaskTable",
    "SampleTable",
    "SecurityDataModule",
    "TableDataModule",
    "TableDataset",
    "build_dog_cat",
    "check_kfold",
    "collate_skip_none",
    "csv_table",
    "data_flow",
    "folder_table",
    "kfold_assign",
    "kfold_splits",
    "layout_help",
    "leaf_specs",
    "load_rgb",
    "make_security",
    "materialize_digits",
    "multitask_csv_table",
    "stratified_split",
]


def __getattr__(name: str) -> Any:
    # Imported lazily so that `python -m headstart.data.pets` does not find the module already imported.
    if name == "build_dog_cat":
        from headstart.data.pets import build_dog_cat

        return build_dog_cat
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
