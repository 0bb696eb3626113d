"""prune(): iterative structured channel pruning with fine-tuning, measured step by step.

Each step removes channels from the backbone (never the head), fine-tunes on images with a fresh optimizer, then
records the validation metrics, parameters, MACs, PyTorch and ONNX Runtime latency, an ONNX export (parity-checked)
and a checkpoint that loads with `weights_only=True`. The result is the smallest step whose main metric stays within
`pruning.max_drop` of the unpruned model, shipped as a bundle.
"""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path
from typing import Any

import lightning as L
import pandas as pd
import torch
from hydra.utils import instantiate
from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib.figure import Figure
from omegaconf import DictConfig

from headstart.core.model import HeadstartModel
from headstart.core.runners import TorchRunner
from headstart.core.structure import pruned_structure
from headstart.errors import ConfigError, DivergedError
from headstart.evaluate.loading import LoadedModel, model_datamodule, open_image_checkpoint, run_checkpoint
from headstart.prune.engine import count_macs_params, make_pruner, prune_step
from headstart.prune.importance import IMPORTANCES, needs_gradients
from headstart.runs import write_json
from headstart.serve.plain import plain
from headstart.serve.runtime import OnnxRunner, default_threads
from headstart.ship.bundle import describe_image_model, write_bundle
from headstart.ship.export import check_parity, export_onnx
from headstart.ship.shipping import golden_images, table_paths
from headstart.speed import measure_speed, torch_threads
from headstart.tables import markdown_table
from headstart.train.callbacks import FreezeBatchNormStats
from headstart.train.reattach import save_model
from headstart.train.recipe import stage_metrics

log = logging.getLogger(__name__)


def quiet_lightning() -> None:
    """One Trainer per step: keep Lightning's per-trainer banners (accelerator, tips) out of the log."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda"):
        logging.getLogger(name).setLevel(logging.WARNING)


def check_pruning_config(cfg: DictConfig) -> None:
    """ConfigError naming the first bad pruning setting, before any work."""
    p = cfg.pruning
    if not 0 < float(p.ratio) < 1:
        raise ConfigError(f"pruning.ratio must be between 0 and 1 (exclusive), got {p.ratio}")
    if int(p.steps) < 1:
        raise ConfigError(f"pruning.steps must be at least 1, got {p.steps}")
    if p.importance not in IMPORTANCES:
        raise ConfigError(
            f"pruning.importance={p.importance!r} is unknown; choose one of {', '.join(IMPORTANCES)}"
        )
    if p.mode not in ("min", "max"):
        raise ConfigError(f"pruning.mode must be 'min' or 'max', got {p.mode!r}")
    if float(p.max_drop) < 0 or int(p.finetune_epochs) < 0 or float(p.distill) < 0:
        raise ConfigError(
            "pruning.max_drop, pruning.finetune_epochs and pruning.distill must not be negative"
        )


def load_prunable(source: str) -> HeadstartModel:
    """The image model of a run directory (image_model.ckpt, else best.ckpt) or of a .ckpt file."""
    path = Path(source).expanduser()
    if path.is_dir():
        path = run_checkpoint(path) or path / "checkpoints" / "best.ckpt"
    if not path.is_file() or path.suffix != ".ckpt":
        raise ConfigError(
            f"model={source}: expected a run directory or a headstart .ckpt (ONNX files and bundles cannot be "
            "fine-tuned, so they cannot be pruned)"
        )
    return open_image_checkpoint(path)


def prune(cfg: DictConfig) -> dict[str, Any]:
    check_pruning_config(cfg)
    out = Path(cfg.paths.output_dir)
    model = load_prunable(cfg.model)
    loaded = LoadedModel(
        str(cfg.model),
        "checkpoint",
        TorchRunner(model),
        model.flow,
        model.input_transform,
        model.run_config,
        model,
    )
    datamodule = model_datamodule(cfg.get("data"), loaded, split="val")
    metric = cfg.pruning.metric
    L.seed_everything(cfg.seed, workers=True)

    model.hparams.optimizer, model.hparams.scheduler = plain(cfg.optimizer), plain(cfg.get("scheduler"))
    model.use_optimizer(
        instantiate(cfg.optimizer), instantiate(cfg.scheduler) if cfg.get("scheduler") else None
    )
    model.backbone.freeze(len(model.backbone.stages))  # fine-tuning a pruned backbone: every stage trains
    if float(cfg.pruning.distill) > 0:
        model.distill_features(copy.deepcopy(model.backbone), float(cfg.pruning.distill))
    images = golden_images(table_paths(datamodule.table.frame, 4), model.input_transform)
    threads = int(cfg.speed.threads or default_threads())
    logger = TensorBoardLogger(save_dir=str(out), name="tensorboard", version="", default_hp_metric=False)

    quiet_lightning()
    rows = [measure_step(0, model, datamodule, cfg, out, images, threads)]
    if metric not in rows[0]:
        raise ConfigError(
            f"pruning.metric={metric!r} is not measured; choose one of "
            f"{', '.join(k for k in rows[0] if k.startswith('val/'))}"
        )
    log_step(logger, rows[0])
    pruner = make_pruner(
        model,
        cfg.pruning.importance,
        float(cfg.pruning.ratio),
        int(cfg.pruning.steps),
        round_to=cfg.pruning.round_to,
        global_pruning=bool(cfg.pruning.global_pruning),
        residual_streams=bool(cfg.pruning.residual_streams),
    )
    for step in range(1, int(cfg.pruning.steps) + 1):
        batches = None
        if needs_gradients(cfg.pruning.importance):
            batches = _gradient_batches(datamodule, int(cfg.pruning.gradient_batches))
        prune_step(pruner, model, gradient_batches=batches)
        model.hparams.structure = pruned_structure(model)
        trainer = finetune(model, datamodule, cfg, out) if int(cfg.pruning.finetune_epochs) > 0 else None
        rows.append(measure_step(step, model, datamodule, cfg, out, images, threads, trainer))
        log_step(logger, rows[-1])
        log.info("step %d: %s", step, _brief(rows[-1], metric))
    logger.finalize("success")
    model.distill_features(None)

    table = pd.DataFrame(rows)
    chosen = select_step(table, metric, cfg.pruning.mode, float(cfg.pruning.max_drop))
    table["selected"] = table["step"] == chosen
    write_tables(table, out)
    plot(table, metric, out / "pruning.png")
    final = HeadstartModel.from_checkpoint(out / "steps" / f"step_{chosen}.ckpt").eval()
    write_bundle(
        final, out / "bundle", images, final.run_config, _metrics(table, chosen), atol=cfg.export_atol
    )
    summary = {"selected_step": int(chosen), **{k: _plain(v) for k, v in table.iloc[chosen].items()}}
    write_json(out / "selected.json", summary)
    log.info(
        "selected step %d (%s within %s of the unpruned model): bundle %s",
        chosen,
        metric,
        cfg.pruning.max_drop,
        out / "bundle",
    )
    return summary


def finetune(
    model: HeadstartModel, datamodule: L.LightningDataModule, cfg: DictConfig, out: Path
) -> L.Trainer:
    """Fine-tune on images with a fresh optimizer (Lightning's own loop; the model's configure_optimizers)."""
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        max_epochs=int(cfg.pruning.finetune_epochs),
        min_epochs=None,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=str(out),
        callbacks=[FreezeBatchNormStats()] if cfg.pruning.freeze_bn_stats else [],
    )
    model.train()  # measuring left it in eval mode; Lightning keeps the mode it finds
    trainer.fit(model, datamodule=datamodule)
    return trainer


def measure_step(
    step: int,
    model: HeadstartModel,
    datamodule: L.LightningDataModule,
    cfg: DictConfig,
    out: Path,
    images: torch.Tensor,
    threads: int,
    trainer: L.Trainer | None = None,
) -> dict[str, Any]:
    """Validation metrics, size, speed in both runtimes; the step's checkpoint and parity-checked ONNX export.

    After fine-tuning the checkpoint is the fine-tuning trainer's own (optimizer state included: `train.py
    ckpt_path=...` continues from it); it loads with `weights_only=True` and rebuilds the pruned shapes from its
    hyperparameters."""
    model.hparams.structure = pruned_structure(model)
    steps = out / "steps"
    ckpt = steps / f"step_{step}.ckpt"
    if trainer is not None:
        steps.mkdir(parents=True, exist_ok=True)
        # the full state (optimizer included): train.py ckpt_path=... resumes from it
        trainer.save_checkpoint(ckpt, weights_only=False)
    else:
        save_model(model, ckpt)
    model.eval()
    trainer = L.Trainer(
        accelerator=cfg.trainer.accelerator,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.validate(model, datamodule=datamodule, verbose=False)
    metrics = stage_metrics(trainer, "val")
    model.cpu().eval()
    macs, params = count_macs_params(model)
    onnx = export_onnx(
        model, steps / f"step_{step}.onnx", metadata=describe_image_model(model, model.run_config)
    )
    check_parity(onnx, model, images, atol=cfg.export_atol)

    side = model.input_transform.crop

    def make_batch(n: int) -> torch.Tensor:
        return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(0))

    opts = dict(
        throughput_batch=int(cfg.speed.throughput_batch),
        min_runs=int(cfg.speed.min_runs),
        min_seconds=float(cfg.speed.min_seconds),
    )
    with torch_threads(threads):
        eager = measure_speed(TorchRunner(model, threads), make_batch, **opts)
        ort = measure_speed(OnnxRunner(onnx, model.flow.leaf_paths, threads), make_batch, **opts)
    return {
        "step": step,
        "params": int(params),
        "macs": int(macs),
        "pytorch_b1_ms": eager["latency_p50_ms"],
        "onnx_b1_ms": ort["latency_p50_ms"],
        "onnx_b1_p90_ms": ort["latency_p90_ms"],
        f"pytorch_b{opts['throughput_batch']}_img_s": eager["throughput_images_per_s"],
        f"onnx_b{opts['throughput_batch']}_img_s": ort["throughput_images_per_s"],
        **metrics,
        "checkpoint": str(ckpt.relative_to(out)),
        "onnx": str(onnx.relative_to(out)),
        "threads": threads,
    }


def select_step(table: pd.DataFrame, metric: str, mode: str, max_drop: float) -> int:
    """The step with the fewest MACs whose metric is within `max_drop` of step 0 (the unpruned model)."""
    base = float(table.loc[table["step"] == 0, metric].iloc[0])
    if not math.isfinite(base):
        raise DivergedError(
            f"the unpruned model's {metric} is {base}: there is no accuracy to keep. Prune a model whose "
            "evaluation is finite (train it again if it diverged)"
        )
    values = table[metric].astype(float)  # a NaN step fails both comparisons: never selected
    ok = values >= base - max_drop if mode == "max" else values <= base + max_drop
    return int(table[ok].sort_values(["macs", "step"]).iloc[0]["step"])


def log_step(logger: TensorBoardLogger, row: dict[str, Any]) -> None:
    logger.log_metrics(
        {f"prune/{k}": float(v) for k, v in row.items() if isinstance(v, int | float) and k != "step"},
        step=int(row["step"]),
    )


def write_tables(table: pd.DataFrame, out: Path) -> None:
    table.to_csv(out / "pruning.csv", index=False)
    shown = [
        c for c in table.columns if c not in ("checkpoint", "onnx", "threads") and not c.endswith("/count")
    ]
    (out / "pruning.md").write_text(
        "# Pruning steps\n\nStep 0 is the unpruned model; latencies at batch 1 (p50, ms), throughput in images/s, "
        f"{int(table['threads'].iloc[0])} threads.\n\n" + markdown_table(table[shown]) + "\n"
    )


def plot(table: pd.DataFrame, metric: str, path: Path) -> None:
    """The main metric against MACs and against ONNX Runtime batch-1 latency, one point per step."""
    fig = Figure(figsize=(10, 4))
    for ax, x, label in zip(
        fig.subplots(1, 2),
        ("macs", "onnx_b1_ms"),
        ("MACs (millions)", "ONNX Runtime batch-1 latency (ms)"),
        strict=True,
    ):
        xs = table[x] / 1e6 if x == "macs" else table[x]
        ax.plot(xs, table[metric], marker="o")
        for s, xv, yv, sel in zip(table["step"], xs, table[metric], table["selected"], strict=True):
            ax.annotate(f"{s}{' *' if sel else ''}", (xv, yv), textcoords="offset points", xytext=(4, 4))
        ax.set_xlabel(label)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    fig.suptitle("pruning steps (* selected)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _gradient_batches(datamodule: L.LightningDataModule, count: int) -> list[dict]:
    batches = []
    for batch in datamodule.train_dataloader():
        if batch is not None:
            batches.append(batch)
        if len(batches) >= count:
            break
    return batches


def _metrics(table: pd.DataFrame, step: int) -> dict[str, float]:
    row = table.loc[table["step"] == step].iloc[0]
    return {k: float(v) for k, v in row.items() if isinstance(k, str) and k.startswith("val/")}


def _brief(row: dict[str, Any], metric: str) -> str:
    return (
        f"{metric} {row[metric]:.4f}, params {row['params']:,}, MACs {row['macs']:,}, "
        f"ONNX Runtime batch-1 {row['onnx_b1_ms']:.2f} ms, PyTorch batch-1 {row['pytorch_b1_ms']:.2f} ms"
    )


def _plain(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v
