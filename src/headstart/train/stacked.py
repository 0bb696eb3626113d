"""StackedHeads: many heads trained side by side on one stream of DoF feature batches.

Each head is a whole `HeadstartModel` (no backbone) with its own parameters, dropout, label smoothing, metrics and
seeded initialization; the optimizer holds one parameter group per head (its own learning rate and weight decay, its
own state), so a head learns exactly as it would alone on the same batches. A step reads the batch once and sums the
heads' losses: the heads share no parameter, so each gets the gradient of its own loss.

Per head, after every validation epoch: its history (one row of train/val metrics per epoch), its best weights by the
monitored metric, early stopping, and its failure (a non-finite loss or monitored value): a stopped or failed head
gets no gradient, so the optimizer leaves it as it was (weight decay included). The run stops when every head has.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from torch import nn

from headstart.core.attributes import PlainAttributes
from headstart.core.model import HeadstartModel


@dataclass
class Stopping:
    """When a head stops: `patience` validation epochs without an improvement of `monitor` by more than
    `min_delta` (None: never early)."""

    monitor: str
    mode: str = "min"
    patience: int | None = None
    min_delta: float = 0.0


@dataclass
class HeadState:
    """What the stack knows of one head while it trains."""

    lr: float
    weight_decay: float
    history: dict[int, dict[str, float]] = field(default_factory=dict)
    steps: dict[int, float] = field(default_factory=dict)  # the training loss every log_every_n_steps steps
    best_value: float | None = None
    best_epoch: int | None = None
    best_step: int = 0
    best_weights: dict[str, torch.Tensor] | None = None
    wait: int = 0
    stop_best: float | None = None  # early stopping's own best (its monitor may differ)
    stopped_epoch: int | None = None  # early stopping
    failure: str | None = None  # a non-finite loss or monitored value: the job fails with this message

    @property
    def active(self) -> bool:
        return self.stopped_epoch is None and self.failure is None


def _improves(value: float, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


class StackedHeads(PlainAttributes, L.LightningModule):
    """Train `heads` (feature-only HeadstartModels) on the same batches, each with its own learning rate and weight
    decay (`lrs`, `weight_decays`); `make_optimizer(params=[groups])` and `make_scheduler(optimizer=...)` build the
    one optimizer (a parameter group per head) and its per-epoch scheduler. `monitor`: what "best" means per head
    (`mode` min or max); `stopping`: early stopping per head, or None."""

    def __init__(
        self,
        heads: list[HeadstartModel],
        lrs: list[float],
        weight_decays: list[float],
        make_optimizer: Any,
        make_scheduler: Any = None,
        monitor: str = "val/loss",
        mode: str = "min",
        stopping: Stopping | None = None,
    ) -> None:
        super().__init__()
        if any(h.backbone is not None for h in heads):
            raise ValueError("StackedHeads trains heads on features: no head may have a backbone")
        self.heads = nn.ModuleList(heads)
        self.states = [HeadState(float(lr), float(wd)) for lr, wd in zip(lrs, weight_decays, strict=True)]
        self.make_optimizer, self.make_scheduler = make_optimizer, make_scheduler
        self.monitor, self.mode, self.stopping = monitor, mode, stopping

    def _active(self) -> list[int]:
        return [j for j, s in enumerate(self.states) if s.active]

    def _losses(self, batch: dict, stage: str, heads: list[int]) -> list[torch.Tensor]:
        return [self.heads[j].head_step(batch["inputs"], batch["targets"], stage) for j in heads]

    def training_step(self, batch: dict | None, batch_idx: int) -> torch.Tensor | None:
        heads = self._active()
        if batch is None or not heads:
            return None
        losses = self._losses(batch, "train", heads)
        values = torch.stack([loss.detach().float() for loss in losses]).tolist()  # one sync per step
        # as a job alone charts train/loss_step: its model logs it at these batches, Lightning writes it at these steps
        every = self.trainer.log_every_n_steps
        charted = batch_idx % every == 0 and (self.global_step + 1) % every == 0
        total = None
        for j, loss, value in zip(heads, losses, values, strict=True):
            if charted:
                self.states[j].steps[self.global_step] = value
            if not math.isfinite(value):  # this head stops here, its weights as they were before the step
                self.states[j].failure = (
                    f"the training loss became {float(loss.detach())} at epoch {self.current_epoch} (step "
                    f"{self.global_step}): training diverged. Try a lower optimizer.lr"
                )
                continue
            total = loss if total is None else total + loss
        return total

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if batch is not None:
            with torch.no_grad():
                self._losses(batch, "val", self._active())

    # Each stage's metrics are reset right after they are computed (`_record`), so the epochs start from empty
    # metrics without a second pass over every head's.
    def on_train_epoch_start(self) -> None:
        optimizer = self.optimizers(use_pl_optimizer=False)
        name = f"lr-{type(optimizer).__name__}"  # what LearningRateMonitor names it for a job alone
        for j in self._active():
            row = self.states[j].history.setdefault(self.current_epoch, {})
            row[name] = float(optimizer.param_groups[j]["lr"])
            row["lr_step"] = self.global_step  # where LearningRateMonitor charts it for a job alone

    def _record(self, stage: str) -> None:
        # the heads that trained this epoch (one that stopped at its validation still has the epoch's train rows)
        heads = [j for j, s in enumerate(self.states) if s.active or s.stopped_epoch == self.current_epoch]
        for j in heads:
            metrics = self.heads[j].metrics[f"{stage}_metrics"]
            values = {f"{stage}/{k}": float(v) for k, v in metrics.compute().items()}
            metrics.reset()
            row = self.states[j].history.setdefault(self.current_epoch, {})
            row.update(values)
            row["step"] = max(self.global_step - 1, 0)  # where Lightning charts a job alone's epoch metrics

    def on_train_epoch_end(self) -> None:
        self._record("train")
        if not self._active():
            self.trainer.should_stop = True

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            for model in self.heads:
                model.metrics["val_metrics"].reset()
            return
        self._record("val")
        for j in self._active():
            self._judge(j)

    def _judge(self, j: int) -> None:
        """After head j's validation epoch: its best weights, early stopping, a non-finite monitored value."""
        state = self.states[j]
        row = state.history[self.current_epoch]
        value = row.get(self.monitor)
        if value is None:
            raise KeyError(f"monitor.metric {self.monitor!r} is not among the metrics: {sorted(row)}")
        if not math.isfinite(value):
            state.failure = (
                f"{self.monitor} became {value} at epoch {self.current_epoch}: training diverged. Try a lower "
                "optimizer.lr"
            )
            return
        if _improves(value, state.best_value, self.mode):
            state.best_value, state.best_epoch, state.best_step = value, self.current_epoch, self.global_step
            state.best_weights = {k: v.detach().clone() for k, v in self.heads[j].state_dict().items()}
        stopping = self.stopping
        if stopping is None or stopping.patience is None:
            return
        stop_value = row.get(stopping.monitor, value)
        if _improves(stop_value, state.stop_best, stopping.mode, stopping.min_delta):
            state.stop_best, state.wait = stop_value, 0
        else:
            state.wait += 1
            if state.wait >= stopping.patience:
                state.stopped_epoch = self.current_epoch

    def configure_optimizers(self) -> Any:
        groups = [
            {
                "params": [p for p in model.parameters() if p.requires_grad],
                "lr": state.lr,
                "weight_decay": state.weight_decay,
            }
            for model, state in zip(self.heads, self.states, strict=True)
        ]
        optimizer = self.make_optimizer(params=groups)
        if self.make_scheduler is None:
            return optimizer
        scheduler = self.make_scheduler(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """trainer.gradient_clip_val clips each head's gradient on its own, as it would be clipped alone."""
        if not gradient_clip_val:
            return
        for group in optimizer.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if gradient_clip_algorithm == "value":
                torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)

    def use_best(self) -> None:
        """Every head back to its best weights (heads that never had a best keep their last)."""
        for model, state in zip(self.heads, self.states, strict=True):
            if state.best_weights is not None:
                model.load_state_dict(state.best_weights)

    @torch.no_grad()
    def evaluate(self, loader: Any, stage: str) -> list[dict[str, float]]:
        """Every head's `<stage>/...` metrics over `loader` (one pass of the data for all heads)."""
        self.eval()
        heads = list(range(len(self.heads)))
        for model in self.heads:
            model.metrics[f"{stage}_metrics"].reset()
        for batch in loader:
            if batch is None:
                continue
            batch = {
                "inputs": batch["inputs"].to(self.device),
                "targets": {k: v.to(self.device) for k, v in batch["targets"].items()},
            }
            self._losses(batch, stage, heads)
        out = []
        for model in self.heads:
            metrics = model.metrics[f"{stage}_metrics"]
            out.append({f"{stage}/{k}": float(v) for k, v in metrics.compute().items()})
            metrics.reset()
        return out
