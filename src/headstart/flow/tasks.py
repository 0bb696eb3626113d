"""Task kinds: what a task predicts, how many logits it needs, its loss and how its logits are decoded.

Shapes (N samples): binary, bounded_regression and regression logits `float[N]` (a trailing dimension of 1 is
accepted), multiclass and multilabel `float[N, C]`. Targets: NaN = missing; multiclass holds the class index as a
float; multilabel `float[N, C]`, a missing row all NaN.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

SUPPORTED_KINDS = ("binary", "multiclass", "multilabel", "bounded_regression", "regression")
REGRESSION_LOSSES = ("mse", "l1", "smooth_l1")
TASK_KEYS = ("kind", "classes", "scale", "loss", "weight", "given")
_SCALAR_KINDS = ("binary", "bounded_regression", "regression")


class FlowSpecError(ValueError):
    """A flow specification is malformed (unknown kind, missing classes, bad weight, bad condition)."""


class NonFiniteError(ValueError):
    """Scores are NaN (or not probabilities) where a decision is to be tuned on them: the model's outputs are not
    finite."""


@dataclass(frozen=True)
class Task:
    """One leaf of a flow.

    `path` is dotted (`person.shirt`); `classes` names the outputs of multiclass and multilabel tasks; `given` is the
    task's own condition text (enclosing groups' conditions live in the flow); `groups` are the paths of the
    enclosing groups, outermost first.
    """

    path: str
    kind: str
    classes: tuple[str, ...] = field(default_factory=tuple)
    weight: float = 1.0
    scale: float | None = None
    regression_loss: str | None = None
    given: str | None = None
    groups: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def from_spec(cls, path: str, spec: dict, groups: tuple[str, ...] = ()) -> Task:
        kind = spec.get("kind")
        if kind not in SUPPORTED_KINDS:
            raise FlowSpecError(
                f"task '{path}': kind {kind!r} is not supported; supported kinds: {', '.join(SUPPORTED_KINDS)}"
            )
        unknown = set(spec) - set(TASK_KEYS)
        if unknown:
            raise FlowSpecError(
                f"task '{path}': unknown keys {sorted(unknown)}; allowed: {', '.join(TASK_KEYS)}"
            )
        classes: tuple[str, ...] = ()
        if kind in ("multiclass", "multilabel"):
            raw = spec.get("classes")
            if isinstance(raw, int) and not isinstance(raw, bool):
                raw = [str(i) for i in range(raw)]
            minimum = 2 if kind == "multiclass" else 1
            if not isinstance(raw, Sequence) or isinstance(raw, str) or len(raw) < minimum:
                raise FlowSpecError(
                    f"task '{path}': a {kind} task needs 'classes' (a list of names or a count >= {minimum})"
                )
            classes = tuple(str(c) for c in raw)
            if len(set(classes)) != len(classes):
                raise FlowSpecError(f"task '{path}': class names repeat in {list(classes)}")
        elif "classes" in spec:
            raise FlowSpecError(f"task '{path}': 'classes' is only for multiclass and multilabel tasks")
        scale = None
        if kind == "bounded_regression":
            try:
                scale = float(spec["scale"])
            except (KeyError, TypeError, ValueError):
                raise FlowSpecError(
                    f"task '{path}': a bounded_regression task needs a positive number 'scale' "
                    f"(targets lie in [0, scale]), got {spec.get('scale')!r}"
                ) from None
            if not scale > 0:
                raise FlowSpecError(f"task '{path}': 'scale' must be > 0, got {scale}")
        elif "scale" in spec:
            raise FlowSpecError(f"task '{path}': 'scale' is only for bounded_regression tasks")
        regression_loss = None
        if kind == "regression":
            regression_loss = spec.get("loss", "mse")
            if regression_loss not in REGRESSION_LOSSES:
                raise FlowSpecError(
                    f"task '{path}': loss {regression_loss!r} is not one of {', '.join(REGRESSION_LOSSES)}"
                )
        elif "loss" in spec:
            raise FlowSpecError(f"task '{path}': 'loss' is only for regression tasks")
        try:
            weight = float(spec.get("weight", 1.0))
        except (TypeError, ValueError):
            raise FlowSpecError(
                f"task '{path}': weight must be a number, got {spec.get('weight')!r}"
            ) from None
        if not weight >= 0:
            raise FlowSpecError(f"task '{path}': weight must be >= 0, got {weight}")
        given = spec.get("given")
        if given is not None and not isinstance(given, str):
            raise FlowSpecError(f"task '{path}': 'given' must be an expression string, got {given!r}")
        return cls(
            path=path,
            kind=kind,
            classes=classes,
            weight=weight,
            scale=scale,
            regression_loss=regression_loss,
            given=given,
            groups=tuple(groups),
        )

    def to_spec(self) -> dict:
        spec: dict = {"kind": self.kind}
        if self.classes:
            spec["classes"] = list(self.classes)
        if self.scale is not None:
            spec["scale"] = self.scale
        if self.regression_loss is not None:
            spec["loss"] = self.regression_loss
        spec["weight"] = self.weight
        if self.given is not None:
            spec["given"] = self.given
        return spec

    @property
    def name(self) -> str:
        return self.path.rsplit(".", 1)[-1]

    @property
    def num_outputs(self) -> int:
        return len(self.classes) if self.kind in ("multiclass", "multilabel") else 1

    @property
    def has_threshold(self) -> bool:
        return self.kind in ("binary", "multilabel")

    def default_threshold(self) -> float | list[float] | None:
        if self.kind == "binary":
            return 0.5
        if self.kind == "multilabel":
            return [0.5] * len(self.classes)
        return None

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
            if not bool(mask.any()):
                return torch.where(mask.unsqueeze(-1), logits, torch.zeros_like(logits)).sum() * 0.0
            return F.cross_entropy(
                logits[mask], target[mask].long(), weight=class_weight, label_smoothing=label_smoothing
            )
        loss, valid = self._elementwise(logits, target, mask, class_weight)
        return loss.sum() / valid.sum().clamp(min=1)

    def loss_denominator(
        self, target: torch.Tensor, mask: torch.Tensor, class_weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        """What `loss` is a mean over: the rows in `mask`, multilabel the labelled (row, class) entries among them,
        multiclass with class weights the sum of those rows' class weights. Batch losses weighted by it average to
        the loss over all the rows at once, however they were batched."""
        if self.kind == "multilabel":
            return (mask.unsqueeze(-1) & ~torch.isnan(target)).sum()
        if self.kind == "multiclass" and class_weight is not None:
            safe = torch.where(mask, target, torch.zeros_like(target)).long()
            return torch.where(mask, class_weight.to(target.device)[safe], torch.zeros_like(target)).sum()
        return mask.sum()

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
