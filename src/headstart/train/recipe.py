"""train(): the recipe. Seed, data, model, callbacks, loggers, trainer, fit, test, record."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import DeviceStatsMonitor, LearningRateMonitor
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from omegaconf import DictConfig
from torch.utils.data import DataLoader, DistributedSampler

from headstart.core.backbones import backbone_transform
from headstart.core.model import HeadstartModel
from headstart.data import data_flow
from headstart.data.features import FeatureDataModule
from headstart.errors import ConfigError, DataError, DivergedError
from headstart.flow import TaskFlow
from headstart.runs import recorded_config, resolve_resume, write_json
from headstart.serve.plain import plain
from headstart.ship.shipping import ship_run
from headstart.train.benefit import describe_benefit, dof_benefit
from headstart.train.callbacks import EpochCostTimer, RunNotifier
from headstart.train.config import validate_train_config
from headstart.train.cost import CostReport
from headstart.train.extract import dof_for_config, frozen_backbone
from headstart.train.finetune import build_schedule
from headstart.train.loggers import build_loggers, has_logger
from headstart.train.lr_finder import find_lr
from headstart.train.reattach import attach_backbone, check_reattached, save_model
from headstart.train.reports import final_metrics_table, write_task_tables
from headstart.train.tensorboard import tuned_hyperparameters
from headstart.train.thresholds import store_flow_in_checkpoint, tune_on_validation

log = logging.getLogger(__name__)


def build_datamodule(cfg: DictConfig) -> L.LightningDataModule:
    """The configured DataModule, prepared and set up: images with the backbone's input transform, or (with
    `features=true`) the DoF set of those images, found by fingerprint and extracted when missing."""
    if cfg.features:
        path, _ = dof_for_config(cfg)
        datamodule = FeatureDataModule(
            path,
            batch_size=cfg.extract.train_batch_size,
            pin_memory=bool(cfg.data.get("pin_memory", False)),  # page-locked batches: faster copies to a GPU
            seed=cfg.seed,
            memory_budget=cfg.extract.memory_budget,
            folds=cfg.data.get(
                "folds"
            ),  # cross-validation folds of the stored train+val rows (one set, every fold)
            fold=cfg.data.get("fold"),
            split_seed=cfg.data.get("split_seed", 0),
        )
    else:
        datamodule = instantiate(cfg.data, transform=backbone_transform(cfg.backbone.name))
        datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


def build_model(
    cfg: DictConfig, datamodule: L.LightningDataModule, structure: dict | None = None
) -> HeadstartModel:
    """The LightningModule for the data's tasks; every argument plain data. On features it has no backbone.
    `structure`: the pruned shapes of the backbone (from a prune.py checkpoint being continued)."""
    flow = data_flow(datamodule)
    class_weights = None
    if cfg.data.get("balance", "none") == "weights":
        class_weights = {"label": datamodule.class_weights()}
    on_features = isinstance(datamodule, FeatureDataModule)
    model = HeadstartModel(
        flow=flow,
        backbone=None if on_features else plain(cfg.backbone),
        feature_dim=datamodule.feature_dim if on_features else None,
        transform=datamodule.dof.meta["transform"] if on_features else None,
        head={"hidden": list(cfg.model.hidden), "dropout": cfg.model.dropout},
        optimizer=plain(cfg.optimizer),
        scheduler=plain(cfg.get("scheduler")),
        class_weights=class_weights,
        label_smoothing=cfg.model.label_smoothing,
        loss_weighting=cfg.model.loss_weighting,
        structure=structure,
    )
    model.use_optimizer(
        instantiate(cfg.optimizer), instantiate(cfg.scheduler) if cfg.get("scheduler") else None
    )
    return model


# Callbacks that only write to a logger, and fail without one: they step aside when the run has no logger.
NEEDS_LOGGER = (LearningRateMonitor, DeviceStatsMonitor)


def build_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """The configured callbacks; a `finetune=` schedule first, so that the others (the LR monitor) see each epoch's
    parameter groups. Without a logger (logger=null) the callbacks that only write to one are left out."""
    callbacks = [
        instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None and "_target_" in c
    ]
    if not has_logger(cfg):
        unused = [type(c).__name__ for c in callbacks if isinstance(c, NEEDS_LOGGER)]
        if unused:
            log.info("no logger: leaving out %s (it only writes to a logger)", ", ".join(unused))
        callbacks = [c for c in callbacks if not isinstance(c, NEEDS_LOGGER)]
    schedule = build_schedule(cfg)
    return [schedule, *callbacks] if schedule else callbacks


def train(cfg: DictConfig) -> float | None:
    """Train, validate and test one model as configured, then export it (ONNX, bundle); return the monitored metric
    (for sweepers).

    With `notify=apprise` one message tells how the run ended: sent here, once metrics.json holds the final metrics
    (Lightning's on_train_end comes before test, export and cost), or naming the error when the run fails (from the
    trainer's on_exception hook, or from here for a failure outside the trainer)."""
    validate_train_config(cfg)
    notifier = RunNotifier.from_config(cfg)
    if notifier is None:
        return _train(cfg, [])
    try:
        value = _train(cfg, [notifier])
    except Exception as e:
        notifier.failed(e)  # nothing when on_exception already sent it
        raise
    notifier.finished()
    return value


def _train(cfg: DictConfig, extra_callbacks: list[L.Callback]) -> float | None:
    run_dir = Path(cfg.paths.output_dir)
    ckpt_path = resolve_resume(cfg.ckpt_path, cfg.resume, Path(cfg.paths.log_dir) / cfg.name, run_dir)
    L.seed_everything(cfg.seed, workers=True)

    datamodule = build_datamodule(cfg)
    model = build_model(cfg, datamodule, structure=checkpoint_structure(ckpt_path))
    check_trainable(model.flow, datamodule)
    model.run_config = recorded_config(cfg)
    callbacks = build_callbacks(cfg)
    cost = CostReport(**plain(cfg.cost), backbone=plain(cfg.backbone))  # params and MACs, logged at fit start
    callbacks.append(cost)
    on_features = isinstance(datamodule, FeatureDataModule)
    timer = EpochCostTimer()  # time/train_epoch_s; on features also the DoF benefit
    callbacks.append(timer)
    callbacks += extra_callbacks
    loggers = build_loggers(cfg)
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    if _world_size(trainer) > 1:
        _prepare_distributed(trainer, datamodule)

    tuned = find_lr(cfg, trainer, model, datamodule) if cfg.train else {}  # tune.lr_find: the starting lr
    if cfg.train:
        if ckpt_path:
            log.info("resuming from %s", ckpt_path)
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)

    best = _best_checkpoint(trainer)
    if best:
        check_finite_checkpoint(best)
    if cfg.train and best:
        if trainer.is_global_zero:
            _tune_thresholds(model, datamodule, best)
        if _world_size(trainer) > 1:  # every rank evaluates with rank 0's thresholds
            model.flow.load_state(trainer.strategy.broadcast(model.flow.state()))
            model.hparams.flow = model.flow.to_spec()
    metrics: dict[str, float] = dict(tuned)
    if cfg.test:
        if cfg.train or ckpt_path:
            trainer.validate(
                model, datamodule=datamodule, ckpt_path=best or ckpt_path, weights_only=True, verbose=False
            )
            metrics.update(stage_metrics(trainer, "val"))
        trainer.test(
            model, datamodule=datamodule, ckpt_path=best or ckpt_path, weights_only=True, verbose=False
        )
        metrics.update(stage_metrics(trainer, "test"))
    if on_features and trainer.is_global_zero and not trainer.fast_dev_run:
        metrics.update(log_dof_benefit(datamodule, timer.epoch_seconds, timer.step_seconds, loggers))
        _reattach(cfg, datamodule, best, run_dir)
    if trainer.is_global_zero:
        write_json(run_dir / "metrics.json", metrics)  # fast_dev_run too: what the sweep summary reads
        kinds = {path: task.kind for path, task in model.flow.tasks.items()}
        for stage in ("val", "test"):
            write_task_tables(metrics, stage, kinds, run_dir)
    if trainer.is_global_zero and not trainer.fast_dev_run:
        log.info("best checkpoint: %s", best)
        log.info(
            "final metrics (metrics.json):\n%s", final_metrics_table(metrics, conditional_tasks(model.flow))
        )
        if best:
            ship_run(cfg, datamodule, best, run_dir, metrics)
        metrics.update(cost.report(model, run_dir, best, loggers))  # latency of the export; cost.json
        write_json(run_dir / "metrics.json", metrics)
        log_final_hparams(loggers, cfg, metrics, model.flow)
        for logger in loggers:  # what was logged after testing (cost/*, dof/*) reaches csv/metrics.csv too
            logger.finalize("success")
    return metrics.get(cfg.monitor.metric)


def _world_size(trainer: L.Trainer) -> int:
    return trainer.num_devices * trainer.num_nodes


def _prepare_distributed(trainer: L.Trainer, datamodule: L.LightningDataModule) -> None:
    """Several processes (trainer=ddp): check the launch can work, and make `trainer.validate` and `trainer.test`
    see every sample exactly once across the ranks (Lightning's default DistributedSampler pads the last ranks with
    repeated samples, which would bias metrics.json).

    Training and the validation inside `fit` keep Lightning's padded sampler: there every rank must run the same
    number of steps (gradient all-reduce)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        launcher = type(getattr(trainer.strategy, "launcher", None)).__name__
        if launcher == "_SubprocessScriptLauncher":
            raise ConfigError(
                "trainer=ddp starts its processes by re-running the command line, which in a -m sweep would start "
                "the sweep again in every process; run the sweep's jobs one by one, without -m"
            )
    for stage in ("val", "test"):
        name = f"{stage}_dataloader"
        if getattr(type(datamodule), name, None) is not None:
            setattr(datamodule, name, EvaluatedOnce(datamodule, name))
    # FlowMetrics sum their counts across processes at compute(); the values they log are already
    # the same on every rank, so Lightning's advice to log them with sync_dist=True (another reduction) is moot.
    warnings.filterwarnings("ignore", message=r".*when logging on epoch level in distributed setting.*")


class EvaluatedOnce:
    """A DataModule's val/test dataloader hook that, in `trainer.validate`/`trainer.test`, shares the samples out
    over the ranks each exactly once.

    An object rather than a closure, because ddp_spawn pickles the DataModule into its processes; it names the
    class's own hook (`__wrapped__`, which Lightning follows to see that the hook is defined) instead of holding
    a bound method, which would unpickle as this object again."""

    def __init__(self, datamodule: L.LightningDataModule, name: str) -> None:
        self.datamodule, self.name = datamodule, name
        self.__wrapped__ = getattr(type(datamodule), name)

    def __call__(self) -> Any:
        original, trainer = self.__wrapped__(self.datamodule), self.datamodule.trainer
        if trainer.state.fn not in (TrainerFn.VALIDATING, TrainerFn.TESTING):
            return original
        if not isinstance(original, DataLoader) or isinstance(original.sampler, DistributedSampler):
            return original
        kwargs = trainer.distributed_sampler_kwargs or {}
        sampler = EachOnce(original.sampler, kwargs.get("num_replicas", 1), kwargs.get("rank", 0))
        return DataLoader(
            original.dataset,
            batch_size=original.batch_size,
            sampler=sampler,
            drop_last=original.drop_last,
            collate_fn=original.collate_fn,
            num_workers=original.num_workers,
            pin_memory=original.pin_memory,
            persistent_workers=original.persistent_workers,
            worker_init_fn=original.worker_init_fn,
            prefetch_factor=original.prefetch_factor,
            timeout=original.timeout,
            multiprocessing_context=original.multiprocessing_context,
        )


class EachOnce(DistributedSampler):
    """Rank r of n takes items r, r + n, r + 2n, ... of an evaluation sampler: every sample once, none repeated.

    A sampler that yields whole batches (arrays of rows, as on DoF features) is shared row by row and re-batched
    at its batch size, so that every rank gets rows even when there are fewer batches than ranks. A DistributedSampler
    (subclass) so that Lightning keeps it instead of putting its own in."""

    def __init__(self, sampler: Any, num_replicas: int, rank: int) -> None:  # no super(): no dataset to shard
        self.sampler, self.num_replicas, self.rank, self.epoch = sampler, num_replicas, rank, 0

    def _items(self) -> list:
        items = list(self.sampler)
        if items and isinstance(items[0], np.ndarray | torch.Tensor | list):
            size = len(items[0])
            rows = np.concatenate([np.asarray(b) for b in items])[self.rank :: self.num_replicas]
            return [rows[i : i + size] for i in range(0, len(rows), size)]
        return items[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator:
        return iter(self._items())

    def __len__(self) -> int:
        return len(self._items())


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint's contents (tensors and plain data only: weights_only); ConfigError naming the file when it is
    truncated, damaged or not a checkpoint."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (
        Exception
    ) as e:  # a truncated zip, not a torch file, objects weights_only refuses: all "not usable"
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"{path} cannot be read as a checkpoint ({type(e).__name__}: {reason}): it is truncated, damaged or not "
            "a checkpoint. Pass a .ckpt written by train.py (checkpoints/last.ckpt to continue a run)"
        ) from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise ConfigError(
            f"{path} is not a headstart checkpoint (no state_dict); pass a .ckpt written by train.py"
        )
    return ckpt


def checkpoint_structure(ckpt_path: str | None) -> dict | None:
    """The pruned backbone shapes a checkpoint records (prune.py's steps), so that training can continue from it.
    Reading it first also checks that the checkpoint is whole before any work starts."""
    if not ckpt_path:
        return None
    hparams = read_checkpoint(ckpt_path).get("hyper_parameters") or {}
    return hparams.get("structure")


def check_finite_checkpoint(path: str) -> None:
    """DivergedError when a checkpoint holds a NaN or inf weight: such a model is never the run's best."""
    for name, tensor in read_checkpoint(path)["state_dict"].items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise DivergedError(
                f"the best checkpoint {path} holds NaN or inf in {name}: training diverged. Try a lower "
                "optimizer.lr or gradient clipping (trainer.gradient_clip_val=1.0)"
            )


def split_targets(datamodule: L.LightningDataModule, split: str) -> dict[str, torch.Tensor]:
    """{task: targets} of every row of `split`, in the data contract's encoding (NaN = missing)."""
    if isinstance(datamodule, FeatureDataModule):
        rows = datamodule.split(split)
        arrays = rows.take(np.arange(len(rows)))
        return {t: torch.from_numpy(arrays[f"target.{t}"]) for t in datamodule.tasks}
    table = datamodule.table
    index = table.rows(split)
    targets = getattr(table, "targets", None) or {"label": table.labels}
    return {t: torch.as_tensor(np.asarray(a)[index], dtype=torch.float32) for t, a in targets.items()}


def check_trainable(flow: TaskFlow, datamodule: L.LightningDataModule) -> None:
    """DataError naming the task (or class) that has no training sample to learn from: a task that applies to no
    training row, or a class of a multiclass task that no training row has."""
    targets = split_targets(datamodule, "train")
    masks = flow.masks(targets)
    for path, task in flow.tasks.items():
        count = int(masks[path].sum())
        if count == 0:
            raise DataError(
                f"task '{path}' has no training sample: no row of the train split has its label (or its condition "
                "holds where it has one). Fill in its labels, or remove the task from the flow"
            )
        if task.kind == "multiclass":
            present = torch.bincount(targets[path][masks[path]].long(), minlength=len(task.classes))
            empty = [c for c, n in zip(task.classes, present.tolist(), strict=True) if n == 0]
            if empty:
                what = f"class '{empty[0]}'" if len(empty) == 1 else f"classes {empty}"
                where = f" of task '{path}'" if path != "label" else ""
                raise DataError(
                    f"{what}{where} has no training sample (train split): a model cannot learn it. Add its images "
                    "to the train split, or remove the class (its folder, or its rows)"
                )


def _tune_thresholds(model: HeadstartModel, datamodule: L.LightningDataModule, best: str) -> None:
    """Binary and multilabel thresholds from the best checkpoint's validation outputs, saved into that checkpoint."""
    if not any(t.kind in ("binary", "multilabel") for t in model.flow.tasks.values()):
        return
    model.load_state_dict(torch.load(best, map_location=model.device, weights_only=True)["state_dict"])
    tuned = tune_on_validation(model, datamodule.val_dataloader())
    if tuned:
        store_flow_in_checkpoint(best, model.hparams.flow)
        log.info("thresholds tuned on validation: %s", tuned)


def log_dof_benefit(
    datamodule: FeatureDataModule,
    epoch_seconds: list[float],
    step_seconds: list[float],
    loggers: list[Logger],
) -> dict[str, float]:
    """The DoF formulas with this run's measured epoch costs (EpochCostTimer's: each training epoch's wall time and
    the part spent in its steps) and the extraction's, printed and logged."""
    if not epoch_seconds:
        return {}
    stats = datamodule.dof.manifest.get("stats", {})
    epoch = float(np.median(epoch_seconds))
    steps = float(np.median(step_seconds))
    values = dof_benefit(
        hnct=float(stats.get("hnct_seconds_per_epoch") or float("nan")),
        holt=max(epoch - steps, 0.0),
        tnct=steps,
        epochs=len(epoch_seconds),
        image_bytes=float(stats.get("image_bytes_mean", 0.0)),
        image_count=int(stats.get("image_count", 0)),
        feature_bytes=float(stats.get("feature_bytes_per_sample", 0.0)),
        manifest_bytes=(datamodule.path / "manifest.json").stat().st_size,
        views=int(stats.get("views", 1)),
    )
    text = describe_benefit(values)
    log.info("%s", text)
    for logger in loggers:
        logger.log_metrics(values, step=0)
    return values


def _reattach(cfg: DictConfig, datamodule: FeatureDataModule, best: str | None, run_dir: Path) -> None:
    """Put the head back on its backbone as `checkpoints/image_model.ckpt`, after checking it answers the same."""
    head = HeadstartModel.from_checkpoint(best) if best else None
    if head is None:
        return
    meta = datamodule.dof.meta
    full = attach_backbone(
        head, frozen_backbone(cfg), plain(cfg.backbone), meta["backbone"]["weights_sha256"]
    )
    worst = check_reattached(full, head, datamodule.dof)
    path = save_model(full, run_dir / "checkpoints" / "image_model.ckpt")
    log.info(
        "image model (backbone + head) checked on stored samples (max |logit diff| %.2e): %s", worst, path
    )


def _best_checkpoint(trainer: L.Trainer) -> str | None:
    cb = trainer.checkpoint_callback
    path = getattr(cb, "best_model_path", "") if cb is not None else ""
    return path or None


def conditional_tasks(flow: TaskFlow) -> set[str]:
    """The tasks that apply only under a condition (their own `given`, or a group's)."""
    return {path for path in flow.tasks if flow.condition_text(path) is not None}


def stage_metrics(trainer: L.Trainer, stage: str) -> dict[str, float]:
    """What a HeadstartModel logged in the `trainer.validate` or `trainer.test` just run: every `<stage>/...` value.
    Outside `fit` the model keeps its values off the loggers (no stray point after the curves), so the call's own
    return value does not hold them; `trainer.callback_metrics` does."""
    return {
        k: float(v.item() if isinstance(v, torch.Tensor) else v)
        for k, v in trainer.callback_metrics.items()
        if k.startswith(f"{stage}/")
    }


# The final metrics that become HParams' metric columns (besides the cost): the loss and each task's headline.
HPARAMS_METRICS = ("loss", "acc", "f1", "mae", "e2e_acc")
HPARAMS_COST = ("cost/params", "cost/macs", "cost/torch_ms", "cost/onnx_ms")


def log_final_hparams(
    loggers: list[Logger], cfg: DictConfig, metrics: dict[str, float], flow: TaskFlow
) -> None:
    """The run's hyperparameters (those a person tunes, see `tuned_hyperparameters`) with its final metrics and cost:
    TensorBoard's HParams table and `summary` text; the hyperparameters and final metrics of any other logger."""
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    params = tuned_hyperparameters(cfg, overrides)
    if "tune/lr" in metrics:  # tune.lr_find: the learning rate it trained with
        params["base_lr"] = metrics["tune/lr"]
    final = {}
    for name, value in metrics.items():
        split, _, rest = name.partition("/")
        path, _, metric = rest.rpartition("/")
        if split in ("val", "test") and metric in HPARAMS_METRICS:
            if metric == "e2e_acc" and path not in conditional_tasks(flow):
                continue  # a task without a condition: its accuracy again
            final[f"final/{name}"] = value
    final.update({k: metrics[k] for k in HPARAMS_COST if k in metrics})
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.log_hyperparams(params, metrics=final)
            table = final_metrics_table(metrics, conditional_tasks(flow))
            logger.experiment.add_text("summary", table, global_step=0)
            logger.experiment.flush()
            log.info(
                "TensorBoard: tensorboard --logdir %s --samples_per_plugin images=1000 (every epoch's images)",
                Path(cfg.paths.output_dir).parent,  # this experiment's runs (a sweep's jobs)
            )
        else:
            logger.log_hyperparams(params)
            logger.log_metrics(final, step=0)  # written when the loggers are finalized, at the end of train()
