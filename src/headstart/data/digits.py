"""Built-in data set: scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes, no download).

Written once as grayscale PNGs in the folder layout, so it goes through exactly the same code path as user data.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from headstart.data.building import MARKER, build_once
from headstart.data.images import FolderDataModule
from headstart.data.samples import SPLITS, SampleTable, stratified_split

DIGITS_SEED = 0


def _write_digits(folder: Path) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.clip(np.rint(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)  # 0..16 -> 0..255
    targets = digits.target.astype(np.int64)
    splits = stratified_split(targets.astype(np.float64), 0.1, 0.1, seed=DIGITS_SEED)
    for split in SPLITS:
        for d in range(10):
            (folder / split / str(d)).mkdir(parents=True, exist_ok=True)
    for i, (img, y, split) in enumerate(zip(images, targets, splits, strict=True)):
        Image.fromarray(img).save(folder / split / str(int(y)) / f"{i:04d}.png")
    (folder / MARKER).write_text(f"{len(images)} images\n")  # last: marks the set complete


def materialize_digits(root: str | os.PathLike) -> Path:
    """Write the digits as `root/{train,val,test}/{0..9}/NNNN.png` (80/10/10, stratified), once.

    Atomic: written into a temporary folder beside `root`, then renamed; the marker `root/.complete` is written
    last. Safe to call twice, also concurrently (the loser of the rename discards its copy).
    """
    return build_once(root, _write_digits, "digits data set")


class DigitsDataModule(FolderDataModule):
    """scikit-learn's 8x8 digits as a folder data set under `root` (materialized by `prepare_data`)."""

    def __init__(self, root: str = "data/digits", **common: Any) -> None:
        super().__init__(root, **common)

    def prepare_data(self) -> None:
        materialize_digits(self.root)

    def _build_table(self) -> SampleTable:
        materialize_digits(self.root)  # no-op when prepare_data ran; covers direct setup() calls
        return super()._build_table()
