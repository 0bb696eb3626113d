"""Sweeps at the speed of DoF: the jobs of a sweep that differ only in head and optimizer hyperparameters, trained as
one stack of heads over one stream of feature batches (`StackedHeads`), then written out job by job.

The launcher (`hydra/launcher=stacked`, in hydra_plugins) groups the jobs (`group_key`), asks `why_not_stacked` of
each group, trains a stackable group with `train_group` and hands every job's run directory to `write_job`. What
every group needs once (the opened DoF set, the frozen backbone, the re-attach check) is kept in a `StackCache` for
the whole sweep, so an Optuna search that asks for trials batch by batch pays for it once.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig

from headstart.core.backbones import Backbone
from headstart.data.features import FeatureDataModule
from headstart.errors import DivergedError
from headstart.runs import fail_run_dir, recorded_config, write_json
from headstart.serve.plain import plain
from headstart.ship.shipping import ship_run
from headstart.train.callbacks import EpochCostTimer
from headstart.train.config import validate_train_config
from headstart.train.cost import CostReport
from headstart.train.extract import dof_for_config, frozen_backbone
from headstart.train.loggers import build_loggers
from headstart.train.reattach import attach_backbone, check_reattached, save_model
from headstart.train.recipe import (
    build_model,
    check_finite_checkpoint,
    check_trainable,
    conditional_tasks,
    log_dof_benefit,
    log_final_hparams,
)
from headstart.train.reports import final_metrics_table, write_task_tables
from headstart.train.stacked import StackedHeads, Stopping
from headstart.train.thresholds import tune_on_validation

log = logging.getLogger(__name__)

# The override keys a stack may differ in: each head takes its own value.
STACKABLE = (
    "optimizer.lr",
    "optimizer.weight_decay",
    "model.dropout",
    "model.hidden",
    "model.label_smoothing",
    "seed",
)


def override_key(override: str) -> str:
    """`optimizer.lr` of `optimizer.lr=0.1`, `+x=1`, `++x=1` or `~x`."""
    return override.split("=", 1)[0].lstrip("+~")


def group_key(overrides: list[str]) -> tuple[str, ...]:
    """What a job shares with the jobs it can stack with: its overrides, less those of STACKABLE keys."""
    return tuple(sorted(o for o in overrides if override_key(o) not in STACKABLE))


def why_not_stacked(cfg: DictConfig) -> str | None:
    """Why the job of `cfg` trains alone (a reason, for the log), or None when it can join a stack."""
    trainer = cfg.trainer
    if not cfg.features:
        return "they train on images (features=false): each epoch runs the backbone"
    if not cfg.train:
        return "they do not train (train=false)"
    if cfg.ckpt_path or cfg.resume:
        return "they continue a checkpoint (ckpt_path, resume)"
    if cfg.tune.lr_find:
        return "tune.lr_find picks each job's learning rate with a run of its own"
    if cfg.data.get("balance", "none") not in ("none", "weights"):
        return f"data.balance={cfg.data.balance} samples the batches per job"
    if str(trainer.get("devices", 1)) not in ("1", "auto") or int(trainer.get("num_nodes", 1)) != 1:
        return "they train on several devices (trainer.devices, num_nodes)"
    if trainer.get("fast_dev_run"):
        return "trainer.fast_dev_run is set"
    if int(trainer.get("accumulate_grad_batches", 1)) != 1:
        return "trainer.accumulate_grad_batches is set"
    return None


@dataclass
class StackCache:
    """What a sweep's groups share: DoF DataModules by set and batching, frozen backbones by name, and the sets whose
    re-attach check has passed (path, backbone weights hash)."""

    datamodules: dict[tuple, FeatureDataModule] = field(default_factory=dict)
    backbones: dict[str, Backbone] = field(default_factory=dict)
    reattached: set[tuple[str, str]] = field(default_factory=set)
    costs: dict[str, CostReport] = field(default_factory=dict)

    def datamodule(self, cfg: DictConfig) -> FeatureDataModule:
        path, _ = dof_for_config(cfg)
        key = (
            str(path),
            cfg.extract.train_batch_size,
            cfg.extract.memory_budget,
            cfg.data.get("folds"),
            cfg.data.get("fold"),
            cfg.data.get("split_seed", 0),
        )
        if key not in self.datamodules:
            datamodule = FeatureDataModule(
                path,
                batch_size=cfg.extract.train_batch_size,
                seed=cfg.seed,
                memory_budget=cfg.extract.memory_budget,
                folds=cfg.data.get("folds"),
                fold=cfg.data.get("fold"),
                split_seed=cfg.data.get("split_seed", 0),
            )
            datamodule.setup("fit")
            self.datamodules[key] = datamodule
        datamodule = self.datamodules[key]
        datamodule.restart(cfg.seed)
        return datamodule

    def backbone(self, cfg: DictConfig) -> Backbone:
        name = str(cfg.backbone.name)
        if name not in self.backbones:
            self.backbones[name] = frozen_backbone(cfg)
        return self.backbones[name]

    def cost(self, cfg: DictConfig) -> CostReport:
        """The cost report (params, MACs; no latency) shared by the jobs whose image models are built alike: the
        same backbone and head, whatever their dropout or label smoothing."""
        model = {k: v for k, v in plain(cfg.model).items() if k not in ("dropout", "label_smoothing")}
        key = json.dumps([plain(cfg.backbone), model], sort_keys=True, default=str)
        if key not in self.costs:
            self.costs[key] = CostReport(
                **{**plain(cfg.cost), "latency": False}, backbone=plain(cfg.backbone)
            )
        return self.costs[key]


@dataclass
class TrainedGroup:
    """A trained stack: the jobs' configs, the heads (at their best weights), each job's final metrics, and which
    job is shipped (the best by the monitored metric)."""

    cfgs: list[DictConfig]
    jobs: list[str]  # the jobs' names in the sweep (their run directories' names)
    cache: StackCache
    stack: StackedHeads
    datamodule: FeatureDataModule
    metrics: list[dict[str, float]]
    shipped: int | None
    epochs: int
    train_seconds: float
    timer: EpochCostTimer  # the stack's epochs: each job's DoF figures take its share


def stopping(cfg: DictConfig) -> Stopping | None:
    """Early stopping per head, from the configured EarlyStopping callback (callbacks=early_stopping)."""
    node = (cfg.get("callbacks") or {}).get("early_stopping")
    if not node:
        return None
    return Stopping(
        monitor=str(node.get("monitor", cfg.monitor.metric)),
        mode=str(node.get("mode", cfg.monitor.mode)),
        patience=int(node.get("patience", 3)),
        min_delta=float(node.get("min_delta", 0.0)),
    )


def train_group(cfgs: list[DictConfig], jobs: list[str], cache: StackCache) -> TrainedGroup:
    """Train the jobs of `cfgs` (resolved job configs of one group, named `jobs`) as one stack, then measure each
    head at its best weights on val and test, one pass of each split for all heads."""
    first = cfgs[0]
    for cfg in cfgs:
        validate_train_config(cfg)
    L.seed_everything(first.seed, workers=True, verbose=False)
    datamodule = cache.datamodule(first)
    heads = []
    for cfg in cfgs:
        L.seed_everything(cfg.seed, workers=True, verbose=False)  # each head's initialization, as alone
        heads.append(build_model(cfg, datamodule))
    check_trainable(heads[0].flow, datamodule)
    stack = StackedHeads(
        heads,
        lrs=[cfg.optimizer.lr for cfg in cfgs],
        weight_decays=[cfg.optimizer.get("weight_decay", 0.0) for cfg in cfgs],
        make_optimizer=instantiate(first.optimizer),
        make_scheduler=instantiate(first.scheduler) if first.get("scheduler") else None,
        monitor=first.monitor.metric,
        mode=first.monitor.mode,
        stopping=stopping(first),
    )
    timer = EpochCostTimer()
    trainer: L.Trainer = instantiate(
        first.trainer,
        default_root_dir=str(Path(first.paths.output_dir).parent),
        callbacks=[timer],
        logger=False,
        enable_checkpointing=False,
    )
    started = time.perf_counter()
    trainer.fit(stack, datamodule=datamodule)
    seconds = time.perf_counter() - started
    stack.use_best()
    for state, model in zip(stack.states, stack.heads, strict=True):
        if state.best_weights is not None and any(
            t.kind in ("binary", "multilabel") for t in model.flow.tasks.values()
        ):
            tune_on_validation(model, datamodule.val_dataloader())
    metrics = [dict(m) for m in stack.evaluate(datamodule.val_dataloader(), "val")]
    if first.test:
        for mine, test in zip(metrics, stack.evaluate(datamodule.test_dataloader(), "test"), strict=True):
            mine.update(test)
    done = [j for j, s in enumerate(stack.states) if s.failure is None and s.best_value is not None]
    sign = 1.0 if first.monitor.mode == "min" else -1.0
    shipped = min(done, key=lambda j: sign * stack.states[j].best_value) if done else None
    return TrainedGroup(
        cfgs, jobs, cache, stack, datamodule, metrics, shipped, trainer.current_epoch, seconds, timer
    )


def write_job(cfg: DictConfig, group: TrainedGroup, j: int) -> float | None:
    """Job j's run directory, as the job alone would leave it: its best checkpoint (loads alone, weights_only),
    metrics.json and tables, its logger's events (the curves of every epoch, HParams), and for the group's best job
    the image model, export and bundle. Returns the monitored metric (for the sweeper)."""
    run_dir = Path(cfg.paths.output_dir)
    stack, state, model = group.stack, group.stack.states[j], group.stack.heads[j]
    model.run_config = recorded_config(cfg)
    others = len(group.cfgs) - 1
    log.info(
        "stacked: trained side by side with %d other job%s of this sweep over one stream of batches (%d epochs, "
        "%.1f s for all)",
        others,
        "" if others == 1 else "s",
        group.epochs,
        group.train_seconds,
    )
    best = None
    if state.best_weights is not None:
        best = str(save_model(model, run_dir / "checkpoints" / "best.ckpt"))
        check_finite_checkpoint(best)
    loggers = build_loggers(cfg)
    heads = len(group.cfgs)  # each job's share of the stack's epoch costs is 1 / heads
    epoch_seconds = [s / heads for s in group.timer.epoch_seconds]
    for epoch in sorted(state.history):
        row = dict(state.history[epoch])
        step, lr_step = int(row.pop("step", 0)), int(row.pop("lr_step", 0))
        rates = {k: v for k, v in row.items() if k.startswith("lr-")}
        for logger in loggers:
            logger.log_metrics(rates, step=lr_step)
        values = {
            k: v for k, v in row.items() if not k.startswith("lr-") and model.charted(k.split("/", 1)[1])
        }
        if epoch < len(epoch_seconds):
            values["time/train_epoch_s"] = epoch_seconds[epoch]
        for logger in loggers:
            logger.log_metrics(values, step=step)
    for step, loss in sorted(state.steps.items()):
        for logger in loggers:
            logger.log_metrics({"train/loss_step": loss}, step=step)
    if state.failure is not None:
        for logger in loggers:
            logger.finalize("failed")
        log.error("%s", state.failure)
        fail_run_dir(run_dir, state.failure, keep_record=True)
        raise DivergedError(state.failure)
    if state.stopped_epoch is not None:
        log.info(
            "early stopping: no improvement for %s epochs, stopped after epoch %d",
            stack.stopping.patience,
            state.stopped_epoch,
        )
    metrics = group.metrics[j]
    log.info("stacked: the DoF figures below take this job's share (1/%d) of the stack's epoch costs", heads)
    step_seconds = [s / heads for s in group.timer.step_seconds]
    metrics.update(log_dof_benefit(group.datamodule, epoch_seconds, step_seconds, loggers))
    write_json(run_dir / "metrics.json", metrics)
    kinds = {path: task.kind for path, task in model.flow.tasks.items()}
    for stage in ("val", "test"):
        write_task_tables(metrics, stage, kinds, run_dir)
    log.info("best checkpoint: %s (epoch %s)", best, state.best_epoch)
    log.info("final metrics (metrics.json):\n%s", final_metrics_table(metrics, conditional_tasks(model.flow)))
    if j == group.shipped and best:
        _ship(cfg, group, model, best, run_dir, metrics)
        cost = CostReport(**plain(cfg.cost), backbone=plain(cfg.backbone))  # latency of the export too
    else:
        if best:
            log.info(
                "not shipped: the stacked launcher ships the best job of each stack (job %s); to ship this one, "
                "train it alone (its overrides in .hydra/overrides.yaml); its cost.json has params and MACs, "
                "latency is measured on the shipped job",
                group.jobs[group.shipped] if group.shipped is not None else "none",
            )
        cost = group.cache.cost(cfg)
    metrics.update(cost.report(model, run_dir, best, loggers))
    write_json(run_dir / "metrics.json", metrics)
    log_final_hparams(loggers, cfg, metrics, model.flow)
    for logger in loggers:
        logger.finalize("success")
    return metrics.get(cfg.monitor.metric)


def _ship(
    cfg: DictConfig, group: TrainedGroup, head: Any, best: str, run_dir: Path, metrics: dict[str, float]
) -> None:
    """The stack's best job as the job alone ships it: the image model (head on its backbone, checked on images
    once per set and backbone), then the export and bundle as configured."""
    dof = group.datamodule.dof
    sha = dof.meta["backbone"]["weights_sha256"]
    full = attach_backbone(head, group.cache.backbone(cfg), plain(cfg.backbone), sha)
    key = (str(group.datamodule.path), sha)
    if key not in group.cache.reattached:
        worst = check_reattached(full, head, dof)
        group.cache.reattached.add(key)
        log.info("image model (backbone + head) checked on stored samples (max |logit diff| %.2e)", worst)
    path = save_model(full, run_dir / "checkpoints" / "image_model.ckpt")
    log.info("image model: %s", path)
    ship_run(cfg, group.datamodule, best, run_dir, metrics)
