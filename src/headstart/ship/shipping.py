"""What a training run ships: `model.onnx` (checked against PyTorch), `bundle/` and, for DoF runs, `head_update/`."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig

from headstart.core.model import HeadstartModel
from headstart.core.transforms import InputTransform, eval_transform
from headstart.data import load_rgb
from headstart.data.features import FeatureDataModule
from headstart.dof import DofSet
from headstart.runs import recorded_config
from headstart.ship.bundle import describe_image_model, write_bundle, write_head_update
from headstart.ship.export import check_parity, export_onnx

log = logging.getLogger(__name__)

_SPLIT_PREFERENCE = ("val", "test", "train")


def golden_images(paths: list[str], transform: InputTransform) -> torch.Tensor:
    """float[N, 3, crop, crop]: the images at `paths` as the model sees them."""
    t = eval_transform(transform)
    return torch.stack([t(load_rgb(p)) for p in paths])


def table_paths(frame, count: int) -> list[str]:
    """The first `count` image paths of a sample table, validation images first."""
    out: list[str] = []
    for split in _SPLIT_PREFERENCE:
        out += frame.loc[frame["split"] == split, "path"].astype(str).tolist()[: count - len(out)]
        if len(out) >= count:
            break
    return out


def dof_golden(dof: DofSet, count: int) -> tuple[list[str], torch.Tensor]:
    """Image paths and their stored features (view 0) from a DoF set, validation rows first."""
    splits = [s for s in _SPLIT_PREFERENCE if s in dof.splits] or list(dof.splits)
    split = dof.split(splits[0])
    rows = np.flatnonzero(split.take(np.arange(len(split)))["view"] == 0)[:count]
    stored = split.take(rows)
    paths = [dof.meta["samples"]["path"][i] for i in stored["index"]]
    return paths, torch.from_numpy(np.asarray(stored["features"], dtype=np.float32))


def ship_run(
    cfg: DictConfig, datamodule: L.LightningDataModule, best: str, run_dir: Path, metrics: dict[str, float]
) -> dict[str, Path]:
    """Export the run's best model as configured by `cfg.export`; returns what was written.

    A parity failure raises ExportError after removing the file that failed (the run's checkpoints stay)."""
    opts = cfg.export
    if not opts.onnx:
        return {}
    config = recorded_config(cfg)
    on_features = isinstance(datamodule, FeatureDataModule)
    image_ckpt = run_dir / "checkpoints" / "image_model.ckpt" if on_features else Path(best)
    model = HeadstartModel.from_checkpoint(image_ckpt).eval()
    if on_features:
        paths, features = dof_golden(datamodule.dof, opts.golden)
    else:
        paths, features = table_paths(datamodule.table.frame, opts.golden), None
    images = golden_images(paths, model.input_transform)

    written: dict[str, Path] = {}
    onnx_path = run_dir / "model.onnx"
    description = describe_image_model(model, config, metrics, golden_count=len(images), atol=opts.atol)
    export_onnx(model, onnx_path, metadata=description)
    try:
        worst = check_parity(onnx_path, model, images, atol=opts.atol)
    except Exception:
        onnx_path.unlink(missing_ok=True)
        raise
    log.info(
        "exported %s; ONNX Runtime matches PyTorch on %d golden images (max |logit diff| %.2e)",
        onnx_path,
        len(images),
        max(worst.values()),
    )
    written["onnx"] = onnx_path
    if opts.bundle:
        written["bundle"] = write_bundle(
            model, run_dir / "bundle", images, config, metrics, onnx_path=onnx_path, atol=opts.atol
        )
        log.info("bundle: %s", written["bundle"])
    want_update = on_features if str(opts.head_update) == "auto" else bool(opts.head_update)
    if want_update:
        if features is None:
            with torch.inference_mode():
                features = model.backbone(images).float()
        written["head_update"] = write_head_update(
            model,
            run_dir / "head_update",
            model.backbone.weights_sha256(),
            features,
            config,
            metrics,
            opts.atol,
        )
        log.info("head update (for bundles with the same backbone): %s", written["head_update"])
    return written
