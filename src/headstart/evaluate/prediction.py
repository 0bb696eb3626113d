"""predict(): run a model over a folder or glob of images and write one row per image, one column per task."""

from __future__ import annotations

import glob
import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from omegaconf import DictConfig
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch.utils.data import DataLoader, Dataset

from headstart.core.transforms import InputTransform, eval_transform
from headstart.data import load_rgb
from headstart.errors import DataError
from headstart.evaluate.loading import load_model
from headstart.serve.decode import decode

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def find_images(inputs: str) -> list[Path]:
    """Image files in a folder (recursively) or matching a glob (`**` allowed), sorted."""
    path = Path(inputs).expanduser()
    if path.is_dir():
        found = [p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    elif path.is_file():
        found = [path]
    else:
        found = [Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file()]
    if not found:
        raise DataError(
            f"inputs={inputs}: no images found (looked for {', '.join(IMAGE_SUFFIXES)} files). Pass a folder, a "
            "file or a quoted glob such as inputs='photos/**/*.jpg'"
        )
    return sorted(found)


class _Files(Dataset):
    """Preprocessed images; an unreadable file gives its error message instead of a tensor."""

    def __init__(self, paths: list[Path], transform: InputTransform) -> None:
        self.paths = paths
        self.transform = eval_transform(transform)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            return i, self.transform(load_rgb(self.paths[i])), None
        except Exception as e:  # any decoder error: the file is listed as unreadable, the run goes on
            return i, None, f"{type(e).__name__}: {e}"


def _collate(items: list) -> list:
    return items


def predict(cfg: DictConfig) -> dict[str, Any]:
    """Predict every image of `cfg.inputs`; write predictions.csv and predictions.json to the run directory."""
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = find_images(str(cfg.inputs))
    loaded = load_model(cfg.model, cfg.runtime, cfg.threads, work_dir=out, base=cfg.get("base"))
    loader = DataLoader(
        _Files(paths, loaded.transform),
        batch_size=int(cfg.batch_size),
        num_workers=int(cfg.num_workers),
        collate_fn=_collate,
    )
    rows: list[dict[str, Any]] = []
    unreadable: list[dict[str, str]] = []
    columns = [TextColumn("predict"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    with Progress(*columns, disable=not cfg.progress) as bar:
        job = bar.add_task("predict", total=len(paths))
        for items in loader:
            good = [(i, x) for i, x, err in items if x is not None]
            unreadable += [{"path": str(paths[i]), "error": err} for i, x, err in items if x is None]
            if good:
                logits = loaded.runner(torch.stack([x for _, x in good]))
                for (i, _), decoded in zip(
                    good, decode(loaded.flow, {p: v.numpy() for p, v in logits.items()}), strict=True
                ):
                    rows.append({"path": str(paths[i]), "predictions": decoded})
            bar.advance(job, len(items))
    write_predictions(rows, unreadable, loaded.flow.leaf_paths, out)
    for u in unreadable:
        log.warning("unreadable image %s (%s)", u["path"], u["error"])
    log.info(
        "predicted %d images (%d unreadable) with %s: %s",
        len(rows),
        len(unreadable),
        loaded.runner.runtime,
        out / "predictions.csv",
    )
    return {"predicted": len(rows), "unreadable": len(unreadable), "dir": str(out)}


def write_predictions(rows: list[dict], unreadable: list[dict], tasks: list[str], out: Path) -> None:
    """predictions.csv (task columns hold the decided value, empty where the task does not apply; `<task>/score`
    its probability) and predictions.json (the same plus the unreadable files)."""
    records = []
    for row in rows:
        record: dict[str, Any] = {"path": row["path"]}
        for task in tasks:
            p = row["predictions"][task]
            value = p["value"]
            record[task] = ";".join(value) if isinstance(value, list) else value
            score = p["score"]
            record[f"{task}/score"] = json.dumps(score) if isinstance(score, list) else score
        records.append(record)
    pd.DataFrame(records, columns=["path", *[c for t in tasks for c in (t, f"{t}/score")]]).to_csv(
        out / "predictions.csv", index=False
    )
    (out / "predictions.json").write_text(
        json.dumps({"predictions": rows, "unreadable": unreadable}, indent=1) + "\n"
    )
