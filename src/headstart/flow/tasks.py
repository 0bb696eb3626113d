"""Task kinds: what a task predicts, how many logits it needs, its loss and how its logits are decoded.

Shapes (N samples): binary, bounded_regression and regression logits `float[N]` (a trailing dimension of 1 is
accepted), multiclass and multilabel `float[N, C]`. Targets: NaN = missing; multiclass holds the class index as a
float; multilabel `float[N, C]`, a missing row all NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from headstart.serve.flowspec import (  # noqa: F401 (names of the flow)
    REGRESSION_LOSSES,
    SCALAR_KINDS,
    SUPPORTED_KINDS,
    TASK_KEYS,
    FlowSpecError,
    TaskSpec,
)

_SCALAR_KINDS = SCALAR_KINDS
_IGNORED = -100.0  # the class index cross-entropy ignores


class NonFiniteError(ValueError):
    """Scores are NaN (or not probabilities) where a decision is to be tuned on them: the model's outputs are not
    finite."""


@dataclass(frozen=True)
class Task(TaskSpec):
    """One leaf of a flow (its spec: `headstart.serve.flowspec.TaskSpec`) with its torch loss and decoding."""

    def flat(self, logits: torch.Tensor) -> torch.Tensor:
        """Scalar kinds: `[N, 1]` logits as `[N]`."""
        if self.kind in _SCALAR_KINDS and logits.dim() == 2 and logits.shape[-1] == 1:
            return logits.squeeze(-1)
        return logits

    def present(self, target: torch.Tensor) -> torch.Tensor:
        """bool[N]: where this task's label is known (not NaN; multilabel: not an all-NaN row)."""
        if self.kind == "multilabel":
            return ~torch.isnan(target).all(dim=-1)
        return ~torch.isnan(target)

    def _elementwise(
        self,
        logits: torch.Tensor,
        target: torch.Tensor,
        mask: torch.Tensor,
        class_weight: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss per row or per row and class, the bool mask of entries that count). Not for multiclass."""
        logits = self.flat(logits)
        valid = mask.unsqueeze(-1) & ~torch.isnan(target) if self.kind == "multilabel" else mask
        safe = torch.where(valid, target, torch.zeros_like(target)).to(logits.dtype)
        if self.kind in ("binary", "multilabel"):
            loss = F.binary_cross_entropy_with_logits(logits, safe, reduction="none", pos_weight=class_weight)
        elif self.kind == "bounded_regression":
            loss = (torch.sigmoid(logits) - safe / self.scale) ** 2
        elif self.regression_loss == "l1":
            loss = (logits - safe).abs()
        elif self.regression_loss == "smooth_l1":
            loss = F.smooth_l1_loss(logits, safe, reduction="none")
        else:
            loss = (logits - safe) ** 2
        return torch.where(valid, loss, torch.zeros_like(loss)), valid

    def loss(
        self,
        logits: torch.Tensor,
        target: torch.Tensor,
        mask: torch.Tensor,
        class_weight: torch.Tensor | None = None,
        label_smoothing: float = 0.0,
    ) -> torch.Tensor:
        """Mean loss over the rows in `mask` (multilabel: over rows and classes); exactly 0 (in the graph) if none.

        `class_weight`: multiclass per-class weights; binary and multilabel positive-class weights (`pos_weight`).
        `label_smoothing` applies to multiclass cross-entropy only.
        """
        if self.kind == "multiclass":
            # Rows outside the mask are ignored by index, not selected (no host sync); their logits are zeroed
            # first, so that not even a NaN there reaches the loss or its gradient. The mean divides by what
            # cross-entropy's own mean would.
            safe = torch.where(mask, target, _IGNORED).long()
            total = F.cross_entropy(
                torch.where(mask.unsqueeze(-1), logits, 0.0),
                safe,
                weight=class_weight,
                ignore_index=int(_IGNORED),
                reduction="sum",
                label_smoothing=label_smoothing,
            )
            denominator = self.loss_denominator(target, mask, class_weight)
            return total / (denominator + (denominator == 0))
        loss, valid = self._elementwise(logits, target, mask, class_weight)
        return loss.sum() / valid.sum().clamp(min=1)

    def loss_amounts(
        self, target: torch.Tensor, mask: torch.Tensor, class_weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Per row, what it adds to `loss_denominator`: the mask (bool), multilabel the row's labelled entries,
        multiclass with class weights the row's class weight (0 outside the mask)."""
        if self.kind == "multilabel":
            return (mask.unsqueeze(-1) & ~torch.isnan(target)).sum(-1)
        if self.kind == "multiclass" and class_weight is not None:
            safe = torch.where(mask, target, torch.zeros_like(target)).long()
            return torch.where(mask, class_weight.to(target.device)[safe], torch.zeros_like(target))
        return mask

    def loss_denominator(
        self, target: torch.Tensor, mask: torch.Tensor, class_weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        """What `loss` is a mean over: the rows in `mask`, multilabel the labelled (row, class) entries among them,
        multiclass with class weights the sum of those rows' class weights. Batch losses weighted by it average to
        the loss over all the rows at once, however they were batched."""
        return self.loss_amounts(target, mask, class_weight).sum()

    def per_sample_loss(self, logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """float[N]: each row's loss (multilabel: mean over its classes), 0 where the task does not apply."""
        if self.kind == "multiclass":
            safe = torch.where(mask, target, torch.zeros_like(target)).long()
            loss = F.cross_entropy(logits, safe, reduction="none")
            return torch.where(mask, loss, torch.zeros_like(loss))
        loss, valid = self._elementwise(logits, target, mask, None)
        if self.kind == "multilabel":
            return loss.sum(-1) / valid.sum(-1).clamp(min=1)
        return loss

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor | None:
        """Sigmoid (binary, multilabel, bounded_regression) or softmax (multiclass); None for regression.

        Binary and multilabel: `decision_scores`, the float32 probabilities their thresholds are compared with."""
        logits = self.flat(logits)
        if self.kind in ("binary", "multilabel"):
            return decision_scores(logits)
        if self.kind == "multiclass":
            return logits.softmax(-1)
        if self.kind == "regression":
            return None
        return torch.sigmoid(logits)

    def decode(self, logits: torch.Tensor, threshold: float | list[float] | None = None) -> torch.Tensor:
        """The predicted value: binary bool[N], multiclass class index long[N], multilabel bool[N, C] (per-class
        thresholds), bounded_regression sigmoid * scale, regression the logit.

        Binary and multilabel decide with one rule wherever a model runs (training metrics, evaluation, ONNX
        bundles, Predictor): `decision_scores(logits) > float32(threshold)`. A NaN logit decides "no"."""
        logits = self.flat(logits)
        if self.kind == "multiclass":
            return logits.argmax(dim=-1)
        if self.kind in ("binary", "multilabel"):
            if threshold is None:
                threshold = self.default_threshold()
            th = torch.as_tensor(threshold, dtype=torch.float32, device=logits.device)
            return decision_scores(logits) > th
        if self.kind == "bounded_regression":
            return torch.sigmoid(logits) * self.scale
        return logits

    def correct(self, value: torch.Tensor, target: torch.Tensor, tolerance: float = 0.05) -> torch.Tensor:
        """bool[N]: is a decoded value right? Regression kinds: within `tolerance` * scale (bounded) or
        `tolerance` * max(|target|, 1) (regression). Multilabel: every labelled class right."""
        if self.kind == "binary":
            return value.bool() == (target > 0.5)
        if self.kind == "multiclass":
            return value == torch.nan_to_num(target, nan=-1.0).long()
        if self.kind == "multilabel":
            return ((value.bool() == (target > 0.5)) | torch.isnan(target)).all(dim=-1)
        err = (value.float() - target.float()).abs()
        if self.kind == "bounded_regression":
            return err <= tolerance * self.scale
        return err <= tolerance * target.float().abs().clamp(min=1.0)


def decision_scores(logits: torch.Tensor) -> torch.Tensor:
    """float32 probabilities of binary and multilabel logits: the sigmoid of the logit taken as float32, rounded
    once to float32.

    It is evaluated in float64 and rounded: torch's float32 sigmoid differs by an ulp between its vectorized and
    scalar paths, so the same logit could get another probability in another batch, at another position in it, or
    on another device, and a threshold tuned between two close scores could then decide differently than tuning
    scored. (MPS has no float64: computed on the CPU there.)
    """
    z = logits.float()
    if z.device.type == "mps":
        return torch.sigmoid(z.cpu().double()).float().to(z.device)
    return torch.sigmoid(z.double()).float()


def module_key(path: str) -> str:
    """A task path as a module name (module names may not hold dots): `person.shirt` -> `person__shirt`."""
    return path.replace(".", "__")
