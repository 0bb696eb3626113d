"""Optional builder: the Oxford-IIIT Pet data set as a cat-vs-dog folder data set.

    python -m headstart.data.pets OUT [--download-root DIR] [--no-download]

Downloads (only when asked) through torchvision's `OxfordIIITPet` into `download_root/oxford-iiit-pet/`
(images/*.jpg, annotations/{trainval,test}.txt), then copies the images into `OUT/{train,val,test}/{cat,dog}/`:
trainval gives train and a stratified val, test gives test.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from headstart.data.samples import SPLITS, stratified_split
from headstart.errors import DataError

MARKER = ".complete"
BINARY_CLASSES = ("cat", "dog")  # OxfordIIITPet binary-category: 0 = Cat, 1 = Dog


def manual_layout_help(out: Path, download_root: Path) -> str:
    return (
        "To build the folder by hand instead, put cat and dog photos into\n"
        f"  {out}/train/cat/*.jpg  {out}/train/dog/*.jpg\n"
        f"and optionally {out}/val/... and {out}/test/... the same way (a train/ folder alone is split 8:1:1);\n"
        "or download images.tar.gz and annotations.tar.gz from https://www.robots.ox.ac.uk/~vgg/data/pets/, "
        f"extract both into {download_root / 'oxford-iiit-pet'}/ and rerun with --no-download."
    )


def _load_split(download_root: Path, split: str, download: bool, out: Path) -> tuple[list[Path], list[int]]:
    from torchvision.datasets import OxfordIIITPet

    try:
        ds = OxfordIIITPet(
            root=str(download_root), split=split, target_types="binary-category", download=download
        )
    except Exception as e:
        if download:
            raise DataError(
                f"Downloading Oxford-IIIT Pet into {download_root} failed ({type(e).__name__}: {e}). "
                "The download needs network access (about 800 MB from www.robots.ox.ac.uk).\n"
                + manual_layout_help(out, download_root)
            ) from e
        raise DataError(
            f"Oxford-IIIT Pet not found in {download_root / 'oxford-iiit-pet'} (expected images/ and annotations/ "
            f"there) and downloading is off ({type(e).__name__}: {e}). Run without --no-download "
            "(download=True) to download it.\n" + manual_layout_help(out, download_root)
        ) from e
    # torchvision keeps the parsed annotation file in these attributes (stable since torchvision 0.12).
    images = [Path(p) for p in ds._images]
    labels = [int(b) for b in ds._bin_labels]
    missing = [p for p in images if not p.is_file()]
    if missing:
        raise DataError(
            f"{len(missing)} image(s) listed in annotations/{split}.txt are missing, e.g. {missing[0]}. "
            "Re-extract images.tar.gz, or delete the oxford-iiit-pet folder and download again."
        )
    return images, labels


def build_dog_cat(
    out: str | os.PathLike,
    download_root: str | os.PathLike,
    download: bool = True,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> Path:
    """Build `out/{train,val,test}/{cat,dog}/` from Oxford-IIIT Pet; returns `out`.

    Atomic: written into a temporary folder beside `out` and renamed into place; nothing is left behind on
    failure. If `out` is already complete (has the marker), nothing is done.
    """
    out = Path(out).expanduser().absolute()
    download_root = Path(download_root).expanduser().absolute()
    if (out / MARKER).is_file():
        return out
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise DataError(f"{out} already exists and is not a finished build; delete it or choose another OUT.")

    fresh_root = not download_root.exists()
    try:
        trainval = _load_split(download_root, "trainval", download, out)
        test = _load_split(download_root, "test", False, out)  # the first call downloaded everything
    except DataError:
        if fresh_root:  # a failed download leaves torchvision's empty folders behind
            shutil.rmtree(download_root, ignore_errors=True)
        raise
    tv_split = stratified_split(np.asarray(trainval[1], dtype=np.float64), val_fraction, 0.0, seed)
    plan = list(zip(trainval[0], trainval[1], tv_split, strict=True))
    plan += [(p, y, "test") for p, y in zip(*test, strict=True)]

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for split in SPLITS:
            for c in BINARY_CLASSES:
                (tmp / split / c).mkdir(parents=True)
        for src, y, split in plan:
            shutil.copyfile(src, tmp / split / BINARY_CLASSES[y] / src.name)
        (tmp / MARKER).write_text(f"{len(plan)} images from Oxford-IIIT Pet\n")
        if out.exists():
            out.rmdir()  # empty, checked above
        os.rename(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def count_images(out: Path) -> dict[str, dict[str, int]]:
    """{split: {class: number of files}} of a built folder."""
    counts: dict[str, dict[str, int]] = {}
    for split in SPLITS:
        counts[split] = {
            cls: sum(1 for f in (out / split / cls).iterdir() if f.is_file()) for cls in BINARY_CLASSES
        }
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m headstart.data.pets",
        description="Build a cat-vs-dog folder data set OUT/{train,val,test}/{cat,dog}/ from Oxford-IIIT Pet.",
    )
    parser.add_argument("out", help="output folder")
    parser.add_argument(
        "--download-root", default=None, help="where the raw data set is (or is downloaded); default: OUT.raw"
    )
    parser.add_argument("--no-download", action="store_true", help="use an existing download only")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = Path(args.out)
    download_root = Path(args.download_root) if args.download_root else out.with_name(out.name + ".raw")
    try:
        out = build_dog_cat(out, download_root, not args.no_download, args.val_fraction, args.seed)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    counts = count_images(out)
    print(f"wrote {out}")
    for split, by_class in counts.items():
        print(
            f"  {split:5s} "
            + "  ".join(f"{c}={n}" for c, n in by_class.items())
            + f"  total={sum(by_class.values())}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
