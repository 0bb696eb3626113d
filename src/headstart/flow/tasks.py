"""Task kinds: what a task predicts, how many logits it needs and how its loss is computed."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

SUPPORTED_KINDS = ("multiclass",)


class FlowSpecError(ValueError):
    """A flow specification is malformed (unknown kind, missing classes, bad weight)."""


@dataclass(frozen=True)
class Task:
    """One leaf of a flow. `path` is dotted (`person.shirt`); `classes` names the outputs of classification kinds."""

    path: str
    kind: str
    classes: tuple[str, ...] = field(default_factory=tuple)
    weight: float = 1.0

    @classmethod
    def from_spec(cls, path: str, spec: dict) -> Task:
        kind = spec.get("kind")
        if kind not in SUPPORTED_KINDS:
            raise FlowSpecError(
                f"task '{path}': kind {kind!r} is not supported; supported kinds: {', '.join(SUPPORTED_KINDS)}"
            )
        unknown = set(spec) - {"kind", "classes", "weight"}
        if unknown:
            raise FlowSpecError(
                f"task '{path}': unknown keys {sorted(unknown)}; allowed: kind, classes, weight"
            )
        classes = spec.get("classes")
        if isinstance(classes, int):
            classes = [str(i) for i in range(classes)]
        if not classes or len(classes) < 2:
            raise FlowSpecError(
                f"task '{path}': a multiclass task needs 'classes' (a list of names or a count >= 2)"
            )
        weight = float(spec.get("weight", 1.0))
        if weight < 0:
            raise FlowSpecError(f"task '{path}': weight must be >= 0, got {weight}")
        return cls(path=path, kind=kind, classes=tuple(str(c) for c in classes), weight=weight)

    def to_spec(self) -> dict:
        return {"kind": self.kind, "classes": list(self.classes), "weight": self.weight}

    @property
    def num_outputs(self) -> int:
        return len(self.classes)

    def present(self, target: torch.Tensor) -> torch.Tensor:
        """bool[N]: where this task's label is known (not NaN)."""
        return ~torch.isnan(target)

    def loss(
        self,
        logits: torch.Tensor,
        target: torch.Tensor,
        mask: torch.Tensor,
        class_weight: torch.Tensor | None = None,
        label_smoothing: float = 0.0,
    ) -> torch.Tensor:
        """Mean loss over the rows in `mask`; exactly 0 (still in the graph) when no row applies."""
        if not bool(mask.any()):
            return logits.sum() * 0.0
        return F.cross_entropy(
            logits[mask], target[mask].long(), weight=class_weight, label_smoothing=label_smoothing
        )

    def per_sample_loss(self, logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """float[N]: each row's loss, 0 where the task does not apply."""
        safe = torch.where(mask, target, torch.zeros_like(target)).long()
        return F.cross_entropy(logits, safe, reduction="none") * mask

    def decode(self, logits: torch.Tensor) -> torch.Tensor:
        """The predicted value: class index (long[N])."""
        return logits.argmax(dim=-1)
