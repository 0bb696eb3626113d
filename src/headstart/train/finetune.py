"""Fine-tuning schedules (`finetune=`): which backbone stages train from which epoch, and at which learning rate.

Each schedule is a Lightning callback built on `BaseFinetuning`, which calls `freeze_before_training` in `setup` and
`finetune_function` at every train epoch start, and stores the optimizer's parameter groups by parameter name in the
checkpoint so that a resumed run gets back the groups added while training. Stages are `Backbone.stages`, counted from
the input side; "the last m stages" are the output side.

How the optimizer looks:

- the first parameter group ("head") holds what `configure_optimizers` got: the head (and learned loss weights),
  at the configured learning rate and under the configured scheduler;
- backbone parameters train in their own group(s) ("backbone", or "backbone_stages<a>-<b>" when a schedule adds
  stages in steps), whose learning rate is the head's x `backbone_lr_ratio` at every epoch, whatever the scheduler.
  Torch's schedulers, given a group added after they were built, either scale it from its current value
  (StepLR, MultiStepLR, CosineAnnealingLR's usual step), which keeps the ratio only when the schedule is a pure factor
  (not with a cosine `eta_min`), or zip their per-group `base_lrs` strictly against the groups and raise ValueError
  (LambdaLR at once; CosineAnnealingLR one step past `T_max`). So each added group's base learning rate is appended
  to the scheduler's `base_lrs`, and the ratio is set again at each epoch start.

Frozen parameters keep `requires_grad=False` and frozen BatchNorm layers stay in eval mode (`Backbone.freeze` and
`Backbone.train`), so frozen statistics never drift. Stages that are trainable from the first epoch are made trainable
in `setup`, before DDP wraps the model (DDP only synchronizes parameters that require grad when it wraps); schedules
that unfreeze later refuse to run on several processes instead of silently training different weights on each.

Lightning's own `BackboneFinetuning` does not fit these schedules, so only its base class is used: it raises the
backbone learning rate every epoch (`lambda_func`, x2 by default) instead of keeping a ratio; its frozen backbone keeps
BatchNorm affine parameters trainable (`train_bn=True`) or, with `train_bn=False`, sets `track_running_stats=False`,
so that BatchNorm in train mode normalizes with batch statistics instead of being in eval mode; it unfreezes only at
exactly `epoch == unfreeze_backbone_at_epoch`, so a run resumed after that epoch gets its parameter groups back but
its backbone stays frozen; and `BaseFinetuning.unfreeze_and_add_param_group` finds parameters already in the optimizer
by value (`torch.equal`), so it silently skips a parameter equal to one already there, such as a freshly initialized
BatchNorm weight of the same width. Here parameters are matched by identity and every epoch applies the schedule's
state for that epoch.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import BaseFinetuning
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from omegaconf import DictConfig, ListConfig
from torch import nn
from torch.optim import Optimizer

from headstart.core.backbones import build_backbone
from headstart.errors import ConfigError

__all__ = [
    "FinetuneSchedule",
    "FreezeUnfreeze",
    "FrozenStages",
    "Full",
    "LinearProbe",
    "Milestones",
    "build_schedule",
]

log = logging.getLogger(__name__)

HEAD_GROUP = "head"
BACKBONE_GROUP = "backbone"


class FinetuneSchedule(BaseFinetuning):
    """Base of the schedules: `trainable_stages(epoch, n)` says how many of the last of `n` stages train at `epoch`.

    Schedules only ever add trainable stages (never freeze again), so the parameter groups only grow: what
    `BaseFinetuning` stores for resuming.
    """

    option: ClassVar[str] = ""  # the finetune=<option> that selects it, for messages
    trains_backbone: ClassVar[bool] = True
    counts_stages: ClassVar[bool] = False  # has a stage count to check against the backbone (check_stages)

    def __init__(self, backbone_lr_ratio: float = 1.0) -> None:
        super().__init__()
        if isinstance(backbone_lr_ratio, bool) or not isinstance(backbone_lr_ratio, int | float):
            raise ConfigError(f"finetune.backbone_lr_ratio must be a number, got {backbone_lr_ratio!r}")
        if not backbone_lr_ratio > 0:
            raise ConfigError(
                f"finetune.backbone_lr_ratio must be above 0 (the backbone's learning rate is the head's x the "
                f"ratio), got {backbone_lr_ratio}; to keep the backbone frozen use finetune=linear_probe"
            )
        self.backbone_lr_ratio = float(backbone_lr_ratio)

    # --- the plan ---------------------------------------------------------------------------------------------------

    def trainable_stages(self, epoch: int, n: int) -> int:
        """How many of the last of `n` backbone stages train at `epoch`."""
        raise NotImplementedError

    def change_epochs(self) -> list[int]:
        """The epochs after the first at which more stages start to train."""
        return []

    def check_stages(self, n: int) -> None:
        """Raise ConfigError if the schedule's stage counts do not fit a backbone of `n` stages."""

    # --- Lightning hooks --------------------------------------------------------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":  # validate/test/predict after fitting: nothing trains
            return
        backbone = _backbone(pl_module)
        if backbone is not None:
            n = len(backbone.stages)
            self.check_stages(n)
            later = [e for e in self.change_epochs() if e > 0]
            if later and trainer.world_size > 1:
                raise ConfigError(
                    f"finetune={self.option} makes backbone stages trainable at epoch {min(later)}, but with "
                    f"{trainer.world_size} processes DDP only synchronizes the parameters trainable when training "
                    "starts: the processes would train different weights. Fix: run it on one device, or use "
                    "finetune=frozen_stages or finetune=full (trainable from the first epoch)."
                )
            if later and max(later) >= (trainer.max_epochs or 0) > 0:
                log.warning(
                    "finetune=%s: trainer.max_epochs=%d ends training before epoch %d, where the schedule makes "
                    "more backbone stages trainable",
                    self.option,
                    trainer.max_epochs,
                    max(later),
                )
        super().setup(trainer, pl_module, stage)

    def freeze_before_training(self, pl_module: L.LightningModule) -> None:
        """Before `configure_optimizers`: only the stages trainable at the first epoch require grad."""
        backbone = _backbone(pl_module)
        if backbone is None:
            if self.trains_backbone:
                raise ConfigError(
                    f"finetune={self.option} trains the backbone, but this model has none (it trains on stored "
                    "features). Fix: finetune=linear_probe or finetune=null, or features=false."
                )
            return
        backbone.freeze(self.trainable_stages(0, len(backbone.stages)))

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        restarting = self._restarting
        super().on_fit_start(trainer, pl_module)  # a resumed run: the stored parameter groups come back
        if restarting or _backbone(pl_module) is None:
            return
        for optimizer in trainer.optimizers:
            _split_backbone_group(optimizer, pl_module, self, trainer)

    def finetune_function(self, pl_module: L.LightningModule, epoch: int, optimizer: Optimizer) -> None:
        """At each epoch start: this epoch's trainable stages, their parameter group, the learning rate ratio."""
        backbone = _backbone(pl_module)
        if backbone is None:
            return
        n = len(backbone.stages)
        m = self.trainable_stages(epoch, n)
        # Every epoch, not only when the plan changes: a resumed run starts from freeze_before_training's state.
        # Also re-applies eval mode to frozen BatchNorm layers and train mode to the others.
        backbone.freeze(m)
        added = _add_backbone_group(optimizer, pl_module, self, pl_module.trainer)
        if added:
            rank_zero_info(
                f"finetune={self.option}: epoch {epoch}: parameter group {added!r} trains, learning rate "
                f"{optimizer.param_groups[-1]['lr']:.3g} (head x {self.backbone_lr_ratio:g})"
            )
        _tie_backbone_lr(optimizer, self.backbone_lr_ratio)


class LinearProbe(FinetuneSchedule):
    """The backbone is frozen and its BatchNorm layers in eval mode: only the head trains. Its features are a fixed
    function of the image, so the head trains the same on stored (DoF) features."""

    option = "linear_probe"
    trains_backbone = False

    def __init__(self) -> None:
        super().__init__(backbone_lr_ratio=1.0)

    def trainable_stages(self, epoch: int, n: int) -> int:
        return 0


class FrozenStages(FinetuneSchedule):
    """The first `stages` stages (input side) are frozen, their BatchNorm in eval mode; the rest trains from the first
    epoch at the head's learning rate x `backbone_lr_ratio`."""

    option = "frozen_stages"
    counts_stages = True

    def __init__(self, stages: int = 2, backbone_lr_ratio: float = 1.0) -> None:
        super().__init__(backbone_lr_ratio)
        self.stages = _count("finetune.stages", stages)

    def check_stages(self, n: int) -> None:
        if self.stages > n:
            raise ConfigError(
                f"finetune.stages={self.stages} is out of range: the backbone has {n} stages. Fix: a number from 0 "
                f"(nothing frozen) to {n} (everything frozen)."
            )

    def trainable_stages(self, epoch: int, n: int) -> int:
        return n - self.stages


class FreezeUnfreeze(FinetuneSchedule):
    """The backbone is frozen (a linear probe) until `epoch`; from then on all of it trains, in its own parameter group
    at the head's learning rate x `backbone_lr_ratio`."""

    option = "freeze_unfreeze"

    def __init__(self, epoch: int = 2, backbone_lr_ratio: float = 0.1) -> None:
        super().__init__(backbone_lr_ratio)
        self.epoch = _count("finetune.epoch", epoch)

    def change_epochs(self) -> list[int]:
        return [self.epoch]

    def trainable_stages(self, epoch: int, n: int) -> int:
        return n if epoch >= self.epoch else 0


class Milestones(FinetuneSchedule):
    """Frozen until `epochs[0]`; then the last `stages` stages train; from `epochs[1]` the whole backbone. Each step
    adds its stages as a parameter group at the head's learning rate x `backbone_lr_ratio`."""

    option = "milestones"
    counts_stages = True

    def __init__(self, epochs: Any = (2, 4), stages: int = 1, backbone_lr_ratio: float = 0.1) -> None:
        super().__init__(backbone_lr_ratio)
        epochs = list(epochs) if isinstance(epochs, list | tuple | ListConfig) else epochs
        if not isinstance(epochs, list) or len(epochs) != 2:
            raise ConfigError(
                f"finetune.epochs must be two epochs [E1, E2] (the last stages train from E1, all from E2), "
                f"got {epochs!r}"
            )
        first, second = (_count("finetune.epochs", e) for e in epochs)
        if not first < second:
            raise ConfigError(
                f"finetune.epochs={[first, second]}: the second epoch (all stages train) must come after the first "
                "(the last stages train). Fix: e.g. finetune.epochs=[2,4], or finetune=freeze_unfreeze to unfreeze "
                "everything at once."
            )
        self.epochs = (first, second)
        self.stages = _count("finetune.stages", stages)

    def check_stages(self, n: int) -> None:
        if not 1 <= self.stages < n:
            raise ConfigError(
                f"finetune.stages={self.stages} is out of range: the backbone has {n} stages, and milestones makes "
                f"the last finetune.stages of them trainable first, all later. Fix: a number from 1 to {n - 1}, or "
                "finetune=freeze_unfreeze to unfreeze everything at once."
            )

    def change_epochs(self) -> list[int]:
        return list(self.epochs)

    def trainable_stages(self, epoch: int, n: int) -> int:
        if epoch >= self.epochs[1]:
            return n
        return self.stages if epoch >= self.epochs[0] else 0


class Full(FinetuneSchedule):
    """Everything trains from the first epoch; the backbone in its own parameter group at the head's learning rate x
    `backbone_lr_ratio` (1: the same learning rate)."""

    option = "full"

    def __init__(self, backbone_lr_ratio: float = 1.0) -> None:
        super().__init__(backbone_lr_ratio)

    def trainable_stages(self, epoch: int, n: int) -> int:
        return n


# --- building from the config ----------------------------------------------------------------------------------------


def build_schedule(cfg: DictConfig) -> FinetuneSchedule | None:
    """The `finetune=` schedule of a train config (None: `backbone.freeze`/`trainable_stages` decide), checked
    against the rest of the config. Raises ConfigError naming the problem and the fix."""
    node = cfg.get("finetune")
    if node is None:
        return None
    try:
        schedule = instantiate(node)
    except InstantiationException as e:
        if isinstance(e.__cause__, ConfigError):
            raise e.__cause__ from None
        raise ConfigError(f"finetune: {e}") from None
    if not isinstance(schedule, FinetuneSchedule):
        raise ConfigError(
            f"finetune._target_ must be a headstart.train.finetune schedule, got {type(schedule).__name__}. Fix: "
            "finetune=linear_probe|frozen_stages|freeze_unfreeze|milestones|full, or finetune=null."
        )
    if cfg.get("features") and schedule.trains_backbone:
        raise ConfigError(
            f"finetune={schedule.option} trains the backbone, but features=true trains the head on stored features "
            "(the model has no backbone). Fix: finetune=linear_probe (or null) on features, or features=false to "
            f"train on images with finetune={schedule.option}."
        )
    backbone = cfg.get("backbone") or {}
    if backbone.get("trainable_stages", 0):
        raise ConfigError(
            f"backbone.trainable_stages={backbone.trainable_stages} and finetune={schedule.option} both say which "
            "backbone stages train. Fix: backbone.trainable_stages=0 and the schedule's own keys (finetune.stages, "
            "...), or finetune=null."
        )
    if schedule.counts_stages and not cfg.get("features") and backbone.get("name"):
        schedule.check_stages(_stage_count(backbone.name))  # before any work; setup() checks the model again
    return schedule


# --- helpers -----------------------------------------------------------------------------------------------------------


def _count(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{key} must be a whole number from 0, got {value!r}")
    return value


def _stage_count(name: str) -> int:
    """How many stages backbone `name` has, from a shapes-only build (no weights are allocated or fetched)."""
    with torch.device("meta"):
        return len(build_backbone(name, weights=None).stages)


def _backbone(pl_module: L.LightningModule) -> Any:
    return getattr(pl_module, "backbone", None)


def _group_name(backbone: Any, params: list[nn.Parameter]) -> str:
    """A group's name: "backbone" for all stages, else its stages (1-based, input side first): "backbone_stage5",
    "backbone_stages1-4"."""
    ids = {id(p) for p in params}
    named = dict(backbone.body.named_parameters())
    held = [i for i, stage in enumerate(backbone.stages, 1) if any(id(named[n]) in ids for n in stage)]
    if len(held) == len(backbone.stages):
        return BACKBONE_GROUP
    if len(held) == 1:
        return f"{BACKBONE_GROUP}_stage{held[0]}"
    return f"{BACKBONE_GROUP}_stages{held[0]}-{held[-1]}"


def _is_backbone_group(group: dict) -> bool:
    return str(group.get("name", "")).startswith(BACKBONE_GROUP)


def _split_backbone_group(
    optimizer: Optimizer, pl_module: L.LightningModule, schedule: FinetuneSchedule, trainer: L.Trainer
) -> None:
    """At fit start: name the first group "head" and move backbone parameters that `configure_optimizers` put in it
    (the stages trainable from the first epoch) into their own group."""
    optimizer.param_groups[0].setdefault("name", HEAD_GROUP)
    backbone_ids = {id(p) for p in _backbone(pl_module).parameters()}
    for group in optimizer.param_groups:
        if not _is_backbone_group(group):
            group["params"] = [p for p in group["params"] if id(p) not in backbone_ids]
    _add_backbone_group(optimizer, pl_module, schedule, trainer)


def _add_backbone_group(
    optimizer: Optimizer, pl_module: L.LightningModule, schedule: FinetuneSchedule, trainer: L.Trainer
) -> str | None:
    """Add the trainable backbone parameters not yet in `optimizer` as one group; return its name (None: none)."""
    backbone = _backbone(pl_module)
    present = {id(p) for group in optimizer.param_groups for p in group["params"]}
    params = [p for p in backbone.parameters() if p.requires_grad and id(p) not in present]
    if not params:
        return None
    head = optimizer.param_groups[0]
    ratio = schedule.backbone_lr_ratio
    initial = head.get("initial_lr", head["lr"]) * ratio
    name = _group_name(backbone, params)
    optimizer.add_param_group(
        {"params": params, "lr": head["lr"] * ratio, "initial_lr": initial, "name": name}
    )
    for config in trainer.lr_scheduler_configs:
        scheduler = config.scheduler
        if getattr(scheduler, "optimizer", None) is optimizer and isinstance(
            getattr(scheduler, "base_lrs", None), list
        ):
            scheduler.base_lrs.append(initial)
    return name


def _tie_backbone_lr(optimizer: Optimizer, ratio: float) -> None:
    head_lr = optimizer.param_groups[0]["lr"]
    for group in optimizer.param_groups[1:]:
        if _is_backbone_group(group):
            group["lr"] = head_lr * ratio
