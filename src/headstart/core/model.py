"""The LightningModule: an optional backbone plus a flow head. The same code trains on images and on features."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn

from headstart.core.attributes import PlainAttributes
from headstart.core.backbones import Backbone, build_backbone
from headstart.core.cpu_forward import inference_forward
from headstart.core.transforms import InputTransform
from headstart.errors import ConfigError
from headstart.flow import FlowHead, FlowMetrics, TaskFlow, UncertaintyWeighting
from headstart.flow.tasks import FlowSpecError

STAGES = ("train", "val", "test")
CONFIG_KEY = "headstart_config"


class HeadstartModel(PlainAttributes, L.LightningModule):
    """Backbone (optional) -> FlowHead -> {task: logits}.

    Every constructor argument is plain data (names, numbers, dicts), so checkpoints load with
    `torch.load(..., weights_only=True)` and the model is rebuilt from its hyperparameters.

    Args:
        flow: the flow spec, `{"tasks": {...}}`.
        backbone: `{"name", "weights", "freeze", "trainable_stages"}`, or None to train on features.
        head: `{"hidden": [..], "dropout": float}`.
        optimizer: the record of the optimizer (a config node, plain data). It is never built from here: the stage
            that trains hands the model what builds it, `use_optimizer(...)`.
        scheduler: the record of the LR scheduler, or None.
        feature_dim: input size of the head when there is no backbone.
        transform: the input transform (dict) when there is no backbone to take it from.
        class_weights: `{task: [w per class]}` for imbalanced data.
        label_smoothing: passed to cross-entropy.
        loss_weighting: "static" (the flow's task weights) or "uncertainty" (learned per-task weights).
        structure: the widths of a channel-pruned backbone (plain data from
            `headstart.prune.pruned_structure`), applied right after the backbone is built so that the pruned
            weights load; None for an unpruned backbone. The feature size (the head's input) is never pruned.
    """

    def __init__(
        self,
        flow: dict,
        optimizer: dict | None = None,
        backbone: dict | None = None,
        head: dict | None = None,
        scheduler: dict | None = None,
        feature_dim: int | None = None,
        transform: dict | None = None,
        class_weights: dict[str, list[float]] | None = None,
        label_smoothing: float = 0.0,
        loss_weighting: str = "static",
        structure: dict | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        try:
            self.flow = TaskFlow.from_spec(flow)
        except FlowSpecError as e:
            raise ConfigError(f"flow: {e}") from None
        self.backbone: Backbone | None = build_backbone(**backbone) if backbone else None
        if structure:
            if self.backbone is None:
                raise ConfigError("structure (a pruned backbone's widths) needs a backbone")
            from headstart.core.structure import apply_structure  # lazy: only pruned models need it

            apply_structure(self.backbone, structure)
        if self.backbone is not None:
            feature_dim = self.backbone.feature_dim
            self.input_transform: InputTransform | None = self.backbone.transform
        else:
            if feature_dim is None:
                raise ConfigError(
                    "a model without a backbone needs feature_dim (the size of the stored features)"
                )
            self.input_transform = InputTransform.from_dict(transform) if transform else None
        head = head or {}
        self.head = FlowHead(
            feature_dim, self.flow, hidden=list(head.get("hidden", [])), dropout=head.get("dropout", 0.0)
        )
        if loss_weighting not in ("static", "uncertainty"):
            raise ConfigError(f"loss_weighting must be 'static' or 'uncertainty', got {loss_weighting!r}")
        self.weighting = (
            UncertaintyWeighting(self.flow.leaf_paths) if loss_weighting == "uncertainty" else None
        )
        self.metrics = torch.nn.ModuleDict({f"{s}_metrics": FlowMetrics(self.flow) for s in STAGES})
        for path, w in (class_weights or {}).items():
            self.register_buffer(
                f"_class_weight_{path.replace('.', '__')}", torch.tensor(w, dtype=torch.float32)
            )
        # What the last epoch of each stage measured; callbacks read it (confusion matrices, reports).
        self.epoch_results: dict[str, dict[str, Any]] = {}
        # The run's resolved config (plain data), saved into checkpoints: evaluate.py defaults to its data.
        self.run_config: dict | None = None
        # What builds the optimizer and scheduler: given by whoever trains (use_optimizer), never read from a file.
        self.make_optimizer: Callable[..., torch.optim.Optimizer] | None = None
        self.make_scheduler: Callable[..., Any] | None = None
        # (epoch, global step, loss) of each training batch whose loss was NaN or inf (and so not stepped on).
        self.nonfinite_steps: list[tuple[int, int, float]] = []

    @classmethod
    def from_checkpoint(cls, path: str | Path, map_location: str | torch.device = "cpu") -> HeadstartModel:
        """Rebuild a model from a headstart checkpoint without unpickling code or fetching weights."""
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
        hparams = dict(ckpt["hyper_parameters"])
        if hparams.get("backbone"):
            hparams["backbone"] = {**hparams["backbone"], "weights": None}
        model = cls(**hparams)
        model.load_state_dict(ckpt["state_dict"])
        model.run_config = ckpt.get(CONFIG_KEY)
        return model

    def use_optimizer(
        self,
        make_optimizer: Callable[..., torch.optim.Optimizer],
        make_scheduler: Callable[..., Any] | None = None,
    ) -> None:
        """Train with `make_optimizer(params=...)` and, when given, `make_scheduler(optimizer=...)` (stepped each
        epoch): e.g. `functools.partial(torch.optim.AdamW, lr=1e-3)`, or what `hydra.utils.instantiate` builds from a
        `_partial_: true` node of the user's own config. A model never builds the optimizer its file records."""
        self.make_optimizer = make_optimizer
        self.make_scheduler = make_scheduler

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.run_config is not None:
            checkpoint[CONFIG_KEY] = self.run_config

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Thresholds tuned after training are written into the checkpoint's flow spec, not into the weights: a run
        # that evaluates or resumes from it (train.py ckpt_path=...) must decide with them.
        thresholds = ((checkpoint.get("hyper_parameters") or {}).get("flow") or {}).get("thresholds")
        if thresholds:
            self.flow.load_state({"thresholds": thresholds})
            self.hparams.flow = self.flow.to_spec()

    def _class_weights(self) -> dict[str, torch.Tensor]:
        return {
            p: getattr(self, f"_class_weight_{p.replace('.', '__')}")
            for p in (self.hparams.class_weights or {})
        }

    def features(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.backbone is None:
            return inputs
        if self.backbone.frozen:
            with torch.no_grad():
                return inference_forward(self.backbone, inputs)
        return inference_forward(self.backbone, inputs)  # in training steps (gradients on): one call

    def forward(self, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.head(self.features(inputs))

    def distill_features(self, teacher: nn.Module | None, weight: float = 1.0) -> None:
        """While training, add `weight` x the mean squared error between this model's features and `teacher(inputs)`
        to the loss (None: stop). Pruning uses it to keep a pruned backbone's features where the head expects them.
        The teacher is neither trained nor saved with this model."""
        if teacher is not None:
            teacher = teacher.eval().requires_grad_(False)
        # Set past nn.Module's registration, so the teacher stays out of state_dict, parameters() and checkpoints.
        self.__dict__["_teacher"] = None if teacher is None else (teacher, float(weight))

    def _step(self, batch: dict | None, stage: str) -> torch.Tensor | None:
        if batch is None:  # every image of the batch was unreadable (and skipped with a warning)
            return None
        features = self.features(batch["inputs"])
        teacher = self.__dict__.get("_teacher")
        distill = None
        if teacher is not None and stage == "train":
            net, weight = teacher
            with torch.no_grad():
                target = net.to(features.device)(batch["inputs"])
            distill = weight * nn.functional.mse_loss(features, target)
        return self.head_step(features, batch["targets"], stage, extra_loss=distill)

    def head_step(
        self,
        features: torch.Tensor,
        targets: dict[str, torch.Tensor],
        stage: str,
        extra_loss: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The head on a batch of features: its loss (plus `extra_loss`), and the batch counted in the stage's
        epoch metrics."""
        logits = self.head(features)
        total, per_task = self.flow.loss(
            logits,
            targets,
            self._class_weights(),
            label_smoothing=self.hparams.label_smoothing,
            weighting=self.weighting,
        )
        if extra_loss is not None:
            total = total + extra_loss
        # Epoch values come from FlowMetrics (one log call per epoch, not per step: Lightning's self.log costs
        # more than a small head's whole step); its epoch loss does not depend on the batching.
        self.metrics[f"{stage}_metrics"].update(
            logits,
            targets,
            per_task,
            class_weights=self._class_weights(),
            weighting=self.weighting,
            extra_loss=extra_loss,
        )
        return total

    def training_step(self, batch: dict | None, batch_idx: int) -> torch.Tensor | None:
        loss = self._step(batch, "train")
        if loss is None:
            return None
        if not bool(torch.isfinite(loss)):
            # No backward, no optimizer step: the weights stay finite. DivergenceGuard decides whether the run stops.
            self.nonfinite_steps.append((self.current_epoch, self.global_step, float(loss)))
            return None
        if batch_idx % self.trainer.log_every_n_steps == 0:
            self.log("train/loss_step", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=1)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, "test")

    def predict_step(self, batch: dict, batch_idx: int) -> dict[str, Any]:
        logits = self(batch["inputs"])
        return {"index": batch["index"], "logits": logits, "predictions": self.flow.predict(logits)}

    def _epoch_end(self, stage: str) -> None:
        metrics = self.metrics[f"{stage}_metrics"]
        values = metrics.compute()
        self.epoch_results[stage] = {
            "metrics": {k: float(v) for k, v in values.items()},
            "confusion": {p: metrics.confusion(p) for p in self.flow.leaf_paths},
        }
        # validate/test after fit: no stray curve point; no logger: nothing to send (Lightning warns otherwise)
        curves = self.trainer.state.fn == TrainerFn.FITTING and self.trainer.logger is not None
        for k, v in values.items():
            self.log(
                f"{stage}/{k}",
                v.float(),
                prog_bar=k in ("loss", "label/acc"),
                logger=curves and self.charted(k),
            )
        metrics.reset()

    def charted(self, name: str) -> bool:
        """Whether an epoch metric goes to the loggers: not the row counts (constants), not the end-to-end accuracy
        of a task without a condition (its accuracy again)."""
        path, _, metric = name.rpartition("/")
        if metric == "count":
            return False
        return metric != "e2e_acc" or self.flow.condition_text(path) is not None

    def _epoch_start(self, stage: str) -> None:
        # Each epoch counts only its own rows. ddp_spawn hands the model back and forth between processes, metric
        # states included: without this a stage would start from the sums of the previous spawn.
        self.metrics[f"{stage}_metrics"].reset()

    def on_train_epoch_start(self) -> None:
        self._epoch_start("train")

    def on_validation_epoch_start(self) -> None:
        self._epoch_start("val")

    def on_test_epoch_start(self) -> None:
        self._epoch_start("test")

    def on_train_epoch_end(self) -> None:
        self._epoch_end("train")

    def on_validation_epoch_end(self) -> None:
        self._epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._epoch_end("test")

    def configure_optimizers(self) -> Any:
        if self.make_optimizer is None:
            raise ConfigError(
                "no optimizer to train with: a model never builds the optimizer recorded in its hyperparameters (a "
                "checkpoint may name any code there); give it one first: model.use_optimizer(functools.partial("
                "torch.optim.AdamW, lr=1e-3))"
            )
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise ConfigError("nothing to train: the backbone is frozen and the head has no parameters")
        optimizer = self.make_optimizer(params=params)
        if self.make_scheduler is None:
            return optimizer
        scheduler = self.make_scheduler(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
