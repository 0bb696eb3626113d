"""The extract stage: `extract(cfg)` behind extract.py, and the DoF set of a composed config (train.py with
features=true). The engine itself is `headstart.data.extraction`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from headstart.core.backbones import Backbone, backbone_transform, build_backbone
from headstart.data import ImageDataModule
from headstart.data.extraction import check_rank, find_or_extract
from headstart.data.kfold import kfold_splits
from headstart.dof import DofError, open_dof
from headstart.errors import ConfigError, DataError
from headstart.runs import write_json
from headstart.serve.plain import plain
from headstart.train.config import validate_train_config

log = logging.getLogger(__name__)
# What Ctrl-C during extract.py ends with: finished shards are files of their own, so nothing is lost.
INTERRUPTED = (
    "extraction interrupted: the shards finished so far are kept in the DoF set's folder; run the same command "
    "again to resume from them"
)


def _image_datamodule(cfg: DictConfig) -> ImageDataModule:
    """The configured images without cross-validation folds: a fold changes which stored rows train and which
    validate, not the features, so every fold of a k-fold sweep finds (or extracts) the same set. The folds are
    checked here all the same, so that a bad data.folds stops the run before a long extraction."""
    unfolded = {k: None for k in ("folds", "fold") if k in cfg.data}
    datamodule = instantiate(cfg.data, transform=backbone_transform(cfg.backbone.name), **unfolded)
    datamodule.prepare_data()
    datamodule.setup("fit")
    if cfg.data.get("folds") is not None or cfg.data.get("fold") is not None:
        frame = datamodule.table.frame
        kfold_splits(
            frame["path"].to_numpy(),
            frame["split"].to_numpy(),
            datamodule.table.labels,
            cfg.data.get("folds"),
            cfg.data.get("fold"),
            cfg.data.get("split_seed", 0),
            datamodule.table.classes,
        )
    return datamodule


def frozen_backbone(cfg: DictConfig) -> Backbone:
    """The configured backbone, frozen. Random weights (weights=null) are drawn from `seed`, so that the same config
    gives the same backbone, hence the same fingerprint, in every process."""
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        return build_backbone(**{**plain(cfg.backbone), "freeze": True, "trainable_stages": 0})


def dof_for_config(cfg: DictConfig, distributed: bool = False) -> tuple[Path, bool]:
    """The DoF set for the configured data and backbone: (path, reused). Extracts (or resumes) when missing.

    With `extract.path` set, that set is used as given and must match the configured backbone and transform.
    With `distributed`, `extract.rank`/`extract.world_size`/`extract.merge` apply (extract.py): then the path may
    name a set that is not complete yet (this rank's part is written, other ranks are still running).
    """
    try:
        return _dof_for_config(cfg, distributed)
    except DofError as e:
        raise DataError(str(e)) from None


def _int(value: Any) -> Any:
    """'3' (from ${oc.env:SLURM_ARRAY_TASK_ID} or ${oc.env:RANK}) -> 3; anything else as given."""
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return value


def _distributed_args(cfg: DictConfig) -> dict[str, Any]:
    ex = cfg.extract
    rank, world_size, merge = _int(ex.get("rank", 0)), _int(ex.get("world_size", 1)), ex.get("merge", False)
    check_rank(0 if merge else rank, world_size)
    if not isinstance(merge, bool):
        raise ConfigError(f"extract.merge={merge!r} is invalid: use true (merge the ranks' parts) or false")
    if ex.path and (world_size > 1 or merge):
        raise ConfigError(
            "extract.path names a finished set, so there is nothing to extract in parts: drop extract.path, or "
            "drop extract.rank/extract.world_size/extract.merge"
        )
    return {"rank": rank, "world_size": world_size, "merge": merge}


def extraction_device(cfg: DictConfig) -> str | None:
    """The device the backbone extracts on: the CPU when the trainer is told to use it (trainer.accelerator=cpu),
    else None: a GPU where CUDA is available (per rank on a multi-GPU node), else the CPU."""
    accelerator = str(cfg.get("trainer", {}).get("accelerator", "auto")).lower()
    return "cpu" if accelerator == "cpu" else None


def _dof_for_config(cfg: DictConfig, distributed: bool = False) -> tuple[Path, bool]:
    ex = cfg.extract
    parts = _distributed_args(cfg) if distributed else {}
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
        device=extraction_device(cfg),
        **parts,
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
    path, reused = dof_for_config(cfg, distributed=True)
    if not (path / "manifest.json").is_file():  # a rank's part is done; the set is not merged yet
        return path
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
    record = {
        "path": str(Path(path).resolve()),
        "reused": reused,
        "splits": {s: len(dof.split(s)) for s in dof.splits},
    }
    out = Path(cfg.paths.output_dir)  # Hydra makes it for extract.py; a caller of extract() may not have
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "dof_set.json", record)  # which set this run produced or found
    print(path)
    return path
