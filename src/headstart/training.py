"""train(): the recipe. Seed, data, model, callbacks, loggers, trainer, fit, test, record."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from headstart.backbones import backbone_transform
from headstart.config import validate_train_config
from headstart.model import HeadstartModel
from headstart.runs import resolve_resume, write_json

log = logging.getLogger(__name__)


def plain(node: Any) -> Any:
    """A resolved config node as plain Python containers (what checkpoints may hold)."""
    return OmegaConf.to_container(node, resolve=True) if node is not None else None


def build_datamodule(cfg: DictConfig) -> L.LightningDataModule:
    """The configured DataModule, with the backbone's input transform, prepared and set up."""
    datamodule = instantiate(cfg.data, transform=backbone_transform(cfg.backbone.name))
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


def build_model(cfg: DictConfig, datamodule: L.LightningDataModule) -> HeadstartModel:
    """The LightningModule for the data's tasks; every argument plain data."""
    flow = {"tasks": {"label": {"kind": "multiclass", "classes": list(datamodule.classes)}}}
    class_weights = None
    if getattr(datamodule, "balance", "none") == "weights":
        class_weights = {"label": datamodule.class_weights()}
    return HeadstartModel(
        flow=flow,
        backbone=plain(cfg.backbone),
        head={"hidden": list(cfg.model.hidden), "dropout": cfg.model.dropout},
        optimizer=plain(cfg.optimizer),
        scheduler=plain(cfg.get("scheduler")),
        class_weights=class_weights,
        label_smoothing=cfg.model.label_smoothing,
    )


def build_callbacks(cfg: DictConfig) -> list[L.Callback]:
    return [
        instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None and "_target_" in c
    ]


def build_loggers(cfg: DictConfig) -> list[Logger]:
    return [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None and "_target_" in c]


def train(cfg: DictConfig) -> float | None:
    """Train, validate and test one model as configured; return the monitored metric (for sweepers)."""
    validate_train_config(cfg)
    run_dir = Path(cfg.paths.output_dir)
    ckpt_path = resolve_resume(cfg.ckpt_path, cfg.resume, Path(cfg.paths.log_dir) / cfg.name, run_dir)
    L.seed_everything(cfg.seed, workers=True)

    datamodule = build_datamodule(cfg)
    model = build_model(cfg, datamodule)
    callbacks = build_callbacks(cfg)
    loggers = build_loggers(cfg)
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)

    if cfg.train:
        if ckpt_path:
            log.info("resuming from %s", ckpt_path)
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)

    best = _best_checkpoint(trainer)
    metrics: dict[str, float] = {}
    if cfg.test:
        if cfg.train or ckpt_path:
            metrics.update(
                _scalars(trainer.validate(model, datamodule=datamodule, ckpt_path=best or ckpt_path))
            )
        metrics.update(_scalars(trainer.test(model, datamodule=datamodule, ckpt_path=best or ckpt_path)))
    if trainer.is_global_zero and not trainer.fast_dev_run:
        write_json(run_dir / "metrics.json", metrics)
        _log_final_hparams(loggers, cfg, metrics)
        log.info("best checkpoint: %s", best)
        log.info("metrics: %s", {k: round(v, 4) for k, v in metrics.items() if not k.endswith("/count")})
    return metrics.get(cfg.monitor.metric)


def _best_checkpoint(trainer: L.Trainer) -> str | None:
    cb = trainer.checkpoint_callback
    path = getattr(cb, "best_model_path", "") if cb is not None else ""
    return path or None


def _scalars(results: list[dict[str, Any]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for r in results:
        out.update({k: float(v.item() if isinstance(v, torch.Tensor) else v) for k, v in r.items()})
    return out


def _log_final_hparams(loggers: list[Logger], cfg: DictConfig, metrics: dict[str, float]) -> None:
    """TensorBoard's HPARAMS tab: the flattened config with the final metrics."""
    resolved = plain(cfg)
    flat = _flatten({k: v for k, v in resolved.items() if k not in ("hydra", "paths")})
    final = {f"final/{k}": v for k, v in metrics.items() if not k.endswith("/count")}
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.log_hyperparams(flat, metrics=final)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
    elif isinstance(d, list):
        out[prefix[:-1]] = str(d)
    else:
        out[prefix[:-1]] = d
    return out
