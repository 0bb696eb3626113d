"""Extraction: run a frozen backbone once over an image DataModule and store its outputs as a DoF set.

The set lands in `<dof dir>/<dataset>/<fingerprint>/`. The fingerprint hashes everything that determines the
features (backbone identity and weights hash, cut point, input transform, augmentation policy, number of views,
dtype, the list of input files), so a complete set with the same fingerprint is reused, and an interrupted one
resumes from its finished shards.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

import headstart
from headstart.backbones import Backbone, backbone_transform, build_backbone
from headstart.config import plain, validate_train_config
from headstart.data import ImageDataModule, collate_skip_none
from headstart.dof import DofError, DofWriter, fingerprint, open_dof
from headstart.errors import ConfigError, DataError
from headstart.transforms import eval_transform, train_transform

log = logging.getLogger(__name__)

CUT_POINT = "pre-logits: the input of the model's last linear classifier, globally pooled"


def files_sha256(datamodule: ImageDataModule) -> str:
    """sha256 of the sample table: each row's split, path, file size and label."""
    frame = datamodule.table.frame
    h = hashlib.sha256()
    for split, path, label in zip(frame["split"], frame["path"], frame["label"], strict=True):
        size = os.path.getsize(path) if os.path.exists(path) else -1
        h.update(f"{split}\t{path}\t{size}\t{label}\n".encode())
    for task, values in sorted(getattr(datamodule.table, "targets", {}).items()):  # multi-task tables
        h.update(task.encode())
        h.update(np.ascontiguousarray(values, dtype=np.float64).tobytes())
    return h.hexdigest()


def dof_spec(
    backbone: Backbone, datamodule: ImageDataModule, augment: Sequence[Any] | None, views: int, dtype: str
) -> dict[str, Any]:
    """What determines the features: the fingerprint is the hash of this."""
    return {
        "backbone": {"name": backbone.name, "weights_sha256": backbone.weights_sha256(), "cut": CUT_POINT},
        "transform": backbone.transform.to_dict(),
        "augment": list(augment or []) if views > 1 else [],
        "views": int(views),
        "dtype": str(dtype),
        "files_sha256": files_sha256(datamodule),
    }


class _SeededView(Dataset):
    """A view of an image dataset whose random augmentation is seeded per (view, sample): reproducible views."""

    def __init__(self, dataset: Dataset, view: int, seed: int) -> None:
        self.dataset, self.view, self.seed = dataset, view, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Any:
        torch.manual_seed(hash((self.seed, self.view, i)) & 0x7FFFFFFF)
        return self.dataset[i]


def extract_dof(
    datamodule: ImageDataModule,
    backbone: Backbone,
    root: str | Path,
    *,
    views: int = 1,
    dtype: str = "float16",
    batch_size: int = 64,
    shard_size: int = 4096,
    num_workers: int = 2,
    seed: int = 0,
    meta: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> Path:
    """Write a DoF set of `datamodule`'s splits through `backbone` into `root` (which names its fingerprint).

    Resumable: shards already finished under `root` are kept. Returns `root`; a complete set is left untouched.
    """
    root = Path(root)
    if (root / "manifest.json").is_file():
        return root
    if views < 1:
        raise ValueError("views must be >= 1")
    if dtype not in ("float16", "float32"):
        raise ValueError("dtype must be float16 or float32")
    datamodule.setup("fit")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    backbone = backbone.to(device).eval()
    writer = DofWriter(root, meta or {})
    done = writer.completed_shards()
    table = datamodule.table
    eval_tf = eval_transform(backbone.transform)
    train_tf = train_transform(backbone.transform, datamodule.augment)

    jobs = []  # (split, view, positions in the split's dataset, shard number)
    for split in ("train", "val", "test"):
        rows = table.rows(split)
        if len(rows) == 0:
            continue
        k = 0
        for view in range(views if split == "train" else 1):
            for start in range(0, len(rows), shard_size):
                jobs.append((split, view, np.arange(start, min(start + shard_size, len(rows))), k))
                k += 1
    todo = [j for j in jobs if (j[0], j[3]) not in done]
    total_images = sum(len(j[2]) for j in todo)
    log.info(
        "extracting %d images (%d shards, %d already done) into %s", total_images, len(todo), len(done), root
    )

    seconds, images = 0.0, 0
    bar = tqdm(total=total_images, unit="img", desc="extract", disable=not progress, dynamic_ncols=True)
    for split, view, positions, k in todo:
        base = datamodule.dataset(split)
        base.transform = eval_tf if view == 0 else train_tf
        dataset = Subset(_SeededView(base, view, seed) if view > 0 else base, positions.tolist())
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            num_workers=num_workers,
            collate_fn=collate_skip_none,
            pin_memory=device.type == "cuda",
        )
        start = time.perf_counter()
        features, targets, index = [], [], []
        with torch.inference_mode():
            for batch in loader:
                if batch is None:
                    continue
                out = backbone(batch["inputs"].to(device, non_blocking=True))
                features.append(out.to(getattr(torch, dtype)).cpu().numpy())
                targets.append({t: v.numpy() for t, v in batch["targets"].items()})
                index.append(batch["index"].numpy())
                bar.update(len(batch["index"]))
        seconds += time.perf_counter() - start
        n = sum(len(i) for i in index)
        images += n
        arrays = {
            "features": np.concatenate(features)
            if features
            else np.zeros((0, backbone.feature_dim), dtype=dtype),
            "index": np.concatenate(index) if index else np.zeros(0, dtype=np.int64),
            "view": np.full(n, view, dtype=np.int16),
        }
        for task in targets[0] if targets else ["label"]:
            arrays[f"target.{task}"] = (
                np.concatenate([t[task] for t in targets]) if targets else np.zeros(0, dtype=np.float32)
            )
        writer.write_shard(split, k, arrays)
    bar.close()

    image_bytes = [os.path.getsize(p) for p in table.frame["path"]]
    feature_bytes = backbone.feature_dim * np.dtype(dtype).itemsize
    stats = {
        "images_this_run": images,
        "seconds_this_run": round(seconds, 3),
        "images_per_second": round(images / seconds, 2) if seconds else None,
        "image_count": len(table.frame),
        "image_bytes_mean": float(np.mean(image_bytes)) if image_bytes else 0.0,
        "feature_bytes_per_sample": feature_bytes,
        "views": views,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "num_workers": num_workers,
        "machine": platform.machine(),
        "config": config,
    }
    # HNCT: the backbone's cost of one epoch over the images, decoding included (one view of every sample).
    if images and seconds:
        stats["hnct_seconds_per_epoch"] = round(seconds / images * len(table.frame), 4)
    writer.finalize(stats)
    return root


def manifest_meta(backbone: Backbone, datamodule: ImageDataModule, spec: dict) -> dict:
    """Everything the manifest says beyond the shards: provenance, transform, tasks, the sample table.

    Only what determines the set goes here (a resumed extraction must produce the same meta); the run's resolved
    config and timings go into the manifest's stats.
    """
    import timm
    import torchvision

    frame = datamodule.table.frame
    return {
        "tool": {"name": "headstart", "version": headstart.__version__},
        "fingerprint": fingerprint(spec),
        "fingerprint_spec": spec,
        "backbone": {
            **spec["backbone"],
            "libraries": {
                "torch": torch.__version__,
                "torchvision": torchvision.__version__,
                "timm": timm.__version__,
            },
        },
        "transform": spec["transform"],
        "augment": spec["augment"],
        "views": spec["views"],
        "flow": getattr(datamodule, "flow_spec", None)
        or {"tasks": {"label": {"kind": "multiclass", "classes": list(datamodule.classes)}}},
        "samples": {
            "path": [str(p) for p in frame["path"]],
            "split": [str(s) for s in frame["split"]],
            "label": [None if np.isnan(v) else float(v) for v in frame["label"]],
        },
    }


def find_or_extract(
    datamodule: ImageDataModule,
    backbone: Backbone,
    dof_dir: str | Path,
    dataset: str,
    *,
    views: int = 1,
    dtype: str = "float16",
    augment_policy: Sequence[Any] | None = None,
    config: dict | None = None,
    **kwargs: Any,
) -> tuple[Path, bool]:
    """The set for this data and backbone: reused when complete, else extracted (or resumed). -> (path, reused)."""
    datamodule.setup("fit")
    spec = dof_spec(backbone, datamodule, augment_policy, views, dtype)
    root = Path(dof_dir) / dataset / fingerprint(spec)
    if (root / "manifest.json").is_file():
        open_dof(root)  # sizes checked: a damaged set is an error, not a silent reuse
        log.info("reusing DoF set %s", root)
        return root, True
    meta = manifest_meta(backbone, datamodule, spec)
    extract_dof(datamodule, backbone, root, views=views, dtype=dtype, meta=meta, config=config, **kwargs)
    return root, False


# --- from a composed config (extract.py, and train.py with features=true) ---------------------------------------


def _image_datamodule(cfg: DictConfig) -> ImageDataModule:
    datamodule = instantiate(cfg.data, transform=backbone_transform(cfg.backbone.name))
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


def frozen_backbone(cfg: DictConfig) -> Backbone:
    """The configured backbone, frozen. Random weights (weights=null) are drawn from `seed`, so that the same config
    gives the same backbone, hence the same fingerprint, in every process."""
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        return build_backbone(**{**plain(cfg.backbone), "freeze": True, "trainable_stages": 0})


def dof_for_config(cfg: DictConfig) -> tuple[Path, bool]:
    """The DoF set for the configured data and backbone: (path, reused). Extracts (or resumes) when missing.

    With `extract.path` set, that set is used as given and must match the configured backbone and transform.
    """
    try:
        return _dof_for_config(cfg)
    except DofError as e:
        raise DataError(str(e)) from None


def _dof_for_config(cfg: DictConfig) -> tuple[Path, bool]:
    ex = cfg.extract
    if ex.path:
        path = Path(ex.path)
        check_set_matches(path, cfg)
        return path, True
    config = plain(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]))
    return find_or_extract(
        _image_datamodule(cfg),
        frozen_backbone(cfg),
        ex.dir,
        ex.dataset,
        views=ex.views,
        dtype=ex.dtype,
        augment_policy=plain(cfg.data.get("augment")),
        config=config,
        batch_size=ex.batch_size,
        shard_size=ex.shard_size,
        num_workers=ex.num_workers,
        seed=cfg.seed,
        progress=ex.progress,
    )


def check_set_matches(path: Path, cfg: DictConfig) -> None:
    """Stop with a message naming the difference when a set was not made with the configured backbone/transform."""
    try:
        meta = open_dof(path).meta
    except DofError as e:
        raise DataError(str(e)) from None
    made, wanted = meta["backbone"]["name"], cfg.backbone.name
    if made != wanted:
        raise ConfigError(
            f"DoF set {path} was extracted with backbone '{made}', but the config asks for '{wanted}'. "
            f"Use backbone={made}, or drop extract.path so the matching set is found (or extracted)."
        )
    transform = backbone_transform(wanted).to_dict()
    if meta["transform"] != transform:
        diff = {
            k: (meta["transform"].get(k), v) for k, v in transform.items() if meta["transform"].get(k) != v
        }
        raise ConfigError(
            f"DoF set {path} used another input transform than backbone '{wanted}': {diff} (set, config)"
        )
    sha = frozen_backbone(cfg).weights_sha256()
    if meta["backbone"]["weights_sha256"] != sha:
        raise ConfigError(
            f"DoF set {path} was extracted with other '{wanted}' weights (sha256 {meta['backbone']['weights_sha256'][:12]}, "
            f"configured {sha[:12]}): backbone.weights={cfg.backbone.weights} differs from the extraction's."
        )


def extract(cfg: DictConfig) -> Path:
    """extract.py: find, resume or write the DoF set of the configured data and backbone; verify it if asked."""
    validate_train_config(cfg)
    path, reused = dof_for_config(cfg)
    try:
        dof = open_dof(path, verify=bool(cfg.verify))
    except DofError as e:
        raise DataError(str(e)) from None
    what = "verified (sizes and sha256)" if cfg.verify else "complete"
    stats = dof.manifest.get("stats", {})
    log.info(
        "DoF set %s: %s, %s; splits %s; features %s %s; %s",
        path,
        "reused" if reused else "extracted",
        what,
        {s: len(dof.split(s)) for s in dof.splits},
        tuple(dof.feature_shape),
        dof.feature_dtype,
        f"{stats.get('images_per_second')} images/s" if not reused else "nothing recomputed",
    )
    print(path)
    return path
