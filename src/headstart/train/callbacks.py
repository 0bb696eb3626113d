"""Lightning callbacks: what people look at in TensorBoard (confusion matrices, prediction grids), the epoch cost
timer, frozen BatchNorm statistics, the guard that stops a diverging run, and the run's notification."""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig

from headstart.core.transforms import denormalize
from headstart.errors import ConfigError, DivergedError
from headstart.train.notify import ENV_VAR, in_sweep, literal_urls, notify_urls, run_message, send
from headstart.visuals import confusion_figure, prediction_grid

log = logging.getLogger(__name__)


def _tensorboards(trainer: L.Trainer) -> list:
    return [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]


class ConfusionMatrixLogger(L.Callback):
    """Logs a confusion-matrix image per classification task after each validation epoch and after testing."""

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.sanity_checking or trainer.fast_dev_run:
            return
        if stage == "val" and trainer.state.fn != TrainerFn.FITTING:
            return  # re-validating the best checkpoint: its matrix is an epoch already shown
        result = getattr(pl_module, "epoch_results", {}).get(stage)
        if not result:
            return
        for writer in _tensorboards(trainer):
            for path, matrix in result["confusion"].items():
                if matrix is None:
                    continue
                classes = pl_module.flow.tasks[path].classes
                fig = confusion_figure(matrix, classes, title=f"{stage}/{path}")
                writer.add_figure(f"{stage}/{path}/confusion", fig, global_step=trainer.global_step)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer, pl_module, "val")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer, pl_module, "test")


def describe_value(task, value: torch.Tensor) -> str:
    """A decoded task value (prediction or target) as a short label."""
    if value.dtype.is_floating_point and bool(torch.isnan(value).all()):
        return "?"
    if task.kind == "binary":
        return f"{task.path.rsplit('.', 1)[-1]}={'yes' if float(value) > 0.5 else 'no'}"
    if task.kind == "multiclass":
        return task.classes[int(value)]
    if task.kind == "multilabel":
        return ",".join(c for c, v in zip(task.classes, value.tolist(), strict=True) if v > 0.5) or "-"
    return f"{float(value):.3g}"


class PredictionGridLogger(L.Callback):
    """After each validation epoch, a grid of validation images with the predicted and true value of the first task.

    The images are drawn once, in the first validation epoch, and kept: a seeded sample spread across the task's
    true values (round robin over classes), so each epoch's grid shows the same images and every class appears.
    """

    def __init__(self, num_images: int = 16, seed: int = 0) -> None:
        self.num_images = num_images
        self.seed = seed
        self._chosen: list[int] | None = None  # dataset indices, in grid order
        self._pools: dict[
            str, list[tuple[int, torch.Tensor, torch.Tensor]]
        ] = {}  # drawing: class -> reservoir
        self._seen: dict[str, int] = {}
        self._kept: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._rng = random.Random(seed)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._kept = {}

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        if dataloader_idx != 0 or batch is None or batch["inputs"].dim() != 4:
            return
        path = pl_module.flow.leaf_paths[0]
        task = pl_module.flow.tasks[path]
        truth = batch["targets"][path]
        classes = len(task.classes) if task.kind == "multiclass" else 2 if task.kind == "binary" else 1
        keep = max(1, math.ceil(self.num_images / classes))  # per class: memory stays about num_images images
        for i, index in enumerate(batch["index"].tolist()):
            if self._chosen is None:
                key = describe_value(task, truth[i].cpu()) if classes > 1 else ""
                self._draw(key, keep, index, batch["inputs"][i], truth[i])
            elif index in self._chosen:
                self._kept[index] = (batch["inputs"][i].detach().cpu(), truth[i].detach().cpu())

    def _draw(self, key: str, keep: int, index: int, image: torch.Tensor, truth: torch.Tensor) -> None:
        """Reservoir sampling per true value: every image of a class equally likely, whatever the order."""
        pool = self._pools.setdefault(key, [])
        self._seen[key] = seen = self._seen.get(key, 0) + 1
        row = (index, image.detach().cpu(), truth.detach().cpu())
        if len(pool) < keep:
            pool.append(row)
        else:
            j = self._rng.randrange(seen)
            if j < keep:
                pool[j] = row

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        if self._chosen is None and self._pools:
            pools = [sorted(pool, key=lambda r: r[0]) for _, pool in sorted(self._pools.items())]
            rows = [pool[k] for k in range(self.num_images) for pool in pools if k < len(pool)]
            rows = rows[: self.num_images]
            self._chosen = [r[0] for r in rows]
            self._kept = {r[0]: (r[1], r[2]) for r in rows}
            self._pools, self._seen = {}, {}
        transform = getattr(pl_module, "input_transform", None)
        rows = [self._kept[i] for i in self._chosen or [] if i in self._kept]
        if not rows or transform is None or trainer.fast_dev_run:
            return
        path = pl_module.flow.leaf_paths[0]
        task = pl_module.flow.tasks[path]
        inputs = torch.stack([r[0] for r in rows])
        with torch.no_grad():
            predicted = pl_module.flow.predict(pl_module(inputs.to(pl_module.device)))[path]["value"].cpu()
        truths = [describe_value(task, r[1]) for r in rows]
        fig = prediction_grid(
            denormalize(inputs.float(), transform), truths, [describe_value(task, v) for v in predicted]
        )
        for writer in _tensorboards(trainer):
            writer.add_figure(f"val/{path}/predictions", fig, global_step=trainer.global_step)


class EpochCostTimer(L.Callback):
    """Per training epoch: the wall time without validation, and the part of it spent in the training steps.

    The rest of an epoch is loading batches and the loop around the steps. The wall time is logged as
    `time/train_epoch_s`, so runs on images and on DoF features can be compared epoch by epoch.
    """

    def __init__(self) -> None:
        self.epoch_seconds: list[float] = []
        self.step_seconds: list[float] = []
        self._validating = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_start = time.perf_counter()
        self._steps = 0.0
        self._validating = 0.0

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._val_start = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._validating += time.perf_counter() - self._val_start

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._steps += time.perf_counter() - self._step_start

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.epoch_seconds.append(time.perf_counter() - self._epoch_start - self._validating)
        self.step_seconds.append(self._steps)
        pl_module.log("time/train_epoch_s", self.epoch_seconds[-1], on_step=False, on_epoch=True)


class WorstExamplesLogger(L.Callback):
    """At test time, per task: the images with the highest loss among those where the task applies."""

    def __init__(self, num_images: int = 8) -> None:
        self.num_images = num_images
        self._worst: dict[str, list[tuple[float, torch.Tensor, str, str]]] = {}

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._worst = {}

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        transform = getattr(pl_module, "input_transform", None)
        if batch is None or transform is None or batch["inputs"].dim() != 4:
            return
        flow = pl_module.flow
        with torch.no_grad():
            logits = pl_module(batch["inputs"])
        masks = flow.masks(batch["targets"])
        predicted = flow.predict(logits)
        for path, task in flow.tasks.items():
            mask = masks[path]
            if not bool(mask.any()):
                continue
            losses = task.per_sample_loss(logits[path].float(), batch["targets"][path], mask).detach()
            kept = self._worst.setdefault(path, [])
            for i in torch.nonzero(mask).flatten().tolist():
                kept.append(
                    (
                        float(losses[i]),
                        denormalize(batch["inputs"][i].float(), transform).cpu(),
                        describe_value(task, batch["targets"][path][i].cpu()),
                        describe_value(task, predicted[path]["value"][i].cpu()),
                    )
                )
            kept.sort(key=lambda r: -r[0])
            del kept[self.num_images :]

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for path, rows in self._worst.items():
            images = torch.stack([r[1] for r in rows])
            fig = prediction_grid(images, [r[2] for r in rows], [r[3] for r in rows])
            for writer in _tensorboards(trainer):
                writer.add_figure(f"test/{path}/worst", fig, global_step=trainer.global_step)
        self._worst = {}


class FreezeBatchNormStats(L.Callback):
    """Keep every BatchNorm layer in eval mode while training: its affine parameters still learn, its running
    statistics do not move. Fine-tuning a pretrained backbone whose head was trained on its features, on a few
    hundred images, needs this: statistics re-estimated on the new data shift every feature and the head, trained on
    the old ones, falls to chance (EfficientNet-Lite0 on dog_cat_small: val acc 0.99 -> 0.50 from that alone)."""

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int
    ) -> None:
        for m in pl_module.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training:
                m.eval()


NONFINITE_ACTIONS = ("stop", "skip_batch")


class DivergenceGuard(L.Callback):
    """Stops a run whose loss, weights or validation metrics become NaN or inf, with one message that says where
    and what to try, before a checkpoint of it can be saved (Lightning runs checkpoint callbacks after this one).

    A training batch with a non-finite loss is never stepped on (the model skips it). `on_nonfinite_loss="stop"`
    (default) then stops the run; `"skip_batch"` goes on without that batch, and stops only after more than
    `max_skipped` such batches, or when a weight or validation metric is non-finite all the same.
    """

    def __init__(self, on_nonfinite_loss: str = "stop", max_skipped: int = 10) -> None:
        if on_nonfinite_loss not in NONFINITE_ACTIONS:
            raise ConfigError(
                f"callbacks.divergence.on_nonfinite_loss must be one of {', '.join(NONFINITE_ACTIONS)}, got "
                f"{on_nonfinite_loss!r}"
            )
        if int(max_skipped) < 0:
            raise ConfigError(f"callbacks.divergence.max_skipped must be 0 or more, got {max_skipped}")
        self.on_nonfinite_loss = on_nonfinite_loss
        self.max_skipped = int(max_skipped)
        self._seen = 0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._seen = len(getattr(pl_module, "nonfinite_steps", []))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        skipped = getattr(pl_module, "nonfinite_steps", [])
        if len(skipped) == self._seen:
            return
        self._seen = len(skipped)
        epoch, step, value = skipped[-1]
        where = f"at epoch {epoch}, step {step}: the training loss is {value}"
        if self.on_nonfinite_loss == "stop" or len(skipped) > self.max_skipped:
            many = f" ({len(skipped)} batches skipped so far)" if len(skipped) > 1 else ""
            raise DivergedError(self._message(trainer, where + many))
        log.warning("skipped a training batch %s (%d of at most %d)", where, len(skipped), self.max_skipped)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check_weights(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        self._check_weights(trainer, pl_module)
        metrics = (getattr(pl_module, "epoch_results", {}).get("val") or {}).get("metrics", {})
        bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
        if bad:
            name, value = next(iter(bad.items()))
            raise DivergedError(
                self._message(trainer, f"after epoch {trainer.current_epoch}: val/{name} is {value}")
            )

    def _check_weights(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for name, param in pl_module.named_parameters():
            if not bool(torch.isfinite(param).all()):
                raise DivergedError(
                    self._message(
                        trainer, f"after epoch {trainer.current_epoch}: weight {name} holds NaN or inf"
                    )
                )

    @staticmethod
    def _message(trainer: L.Trainer, where: str) -> str:
        lr = next((g.get("lr") for o in trainer.optimizers for g in o.param_groups), None)
        rate = f"optimizer.lr (now {lr:g})" if isinstance(lr, float) else "optimizer.lr"
        return (
            f"training diverged {where}. Nothing of this run is kept as a result. Try a lower {rate}, "
            "gradient clipping (trainer.gradient_clip_val=1.0), or look for NaN/inf in the data; to skip such "
            "batches instead of stopping: callbacks.divergence.on_nonfinite_loss=skip_batch"
        )


class RunNotifier(L.Callback):
    """One message per run: `finished()` when train() has written its final metrics.json (fit, test, export and
    cost all done: the metrics worth reading), or one failure message naming the error: from Lightning's
    `on_exception` when a fit, validate or test call fails (with the epoch and step it reached), or from
    `failed()` for what fails outside the trainer (data, export). Only the first message of a run is sent, and
    only by the first process of a distributed run.

    In a sweep (-m) a job's message follows `notify.jobs`: `failed` (default) sends only failures, `all` every
    job, `none` nothing (the sweep's message comes from `SweepNotifier`)."""

    def __init__(
        self,
        urls: Sequence[str],
        name: str,
        run_dir: Path,
        monitor: str,
        mode: str,
        jobs: str = "failed",
        in_sweep: bool = False,
    ) -> None:
        self.urls, self.name, self.run_dir = list(urls), name, Path(run_dir).absolute()
        self.monitor, self.mode = monitor, mode
        self.send_finished = not in_sweep or jobs == "all"
        self.send_failed = not in_sweep or jobs in ("failed", "all")
        self.sent = False

    @classmethod
    def from_config(cls, cfg: DictConfig) -> RunNotifier | None:
        """The run's notifier, or None when `notify` is off. Warns once when `notify.urls` holds a URL written
        out, which Hydra keeps in .hydra/ (headstart itself never records the notify section)."""
        section = cfg.get("notify")
        if section is None:
            return None
        if literal_urls(section):
            log.warning(
                "notify.urls holds a URL written out: Hydra saves it in the run's .hydra/ files. Keep tokens out of "
                "files: set %s instead, or write notify.urls='[${oc.env:YOUR_VAR}]'",
                ENV_VAR,
            )
        return cls(
            notify_urls(section),
            cfg.name,
            Path(cfg.paths.output_dir),
            cfg.monitor.metric,
            cfg.monitor.mode,
            jobs=section.get("jobs", "failed"),
            in_sweep=in_sweep(),
        )

    def finished(self, metrics: Mapping[str, Any] | None = None) -> None:
        """The run ended: send its metrics (default: the run's metrics.json)."""
        if self.sent or not self.send_finished or rank_zero_only.rank != 0:
            return
        if metrics is None:
            path = self.run_dir / "metrics.json"
            metrics = json.loads(path.read_text()) if path.is_file() else {}
        self.sent = True
        send(*run_message(self.name, self.run_dir, metrics, self.monitor, self.mode), self.urls)

    def failed(
        self, error: BaseException, metrics: Mapping[str, Any] | None = None, where: str | None = None
    ) -> None:
        """The run failed with `error`. Ctrl-C (KeyboardInterrupt, and the SystemExit Lightning turns it into)
        sends nothing: someone is there."""
        if self.sent or not self.send_failed or not isinstance(error, Exception) or rank_zero_only.rank != 0:
            return
        self.sent = True
        reason = str(error).strip().splitlines()[0][:500] if str(error).strip() else ""
        named = f"{type(error).__name__}: {reason}" if reason else type(error).__name__
        title, body = run_message(
            self.name, self.run_dir, metrics or {}, self.monitor, self.mode, named, where
        )
        send(title, body, self.urls, failure=True)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        metrics = {
            k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1
        }
        state = trainer.state.stage or trainer.state.fn
        stage = getattr(state, "value", state)
        self.failed(
            exception, metrics, where=f"{stage}, epoch {trainer.current_epoch}, step {trainer.global_step}"
        )
