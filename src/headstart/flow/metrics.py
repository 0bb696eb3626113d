"""Per-task metrics, updated only with the rows where each task applies."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torchmetrics import MetricCollection, SumMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score

from headstart.flow.flow import TaskFlow
from headstart.flow.head import _key


class FlowMetrics(nn.Module):
    """Stateful torchmetrics per task: `compute()` gives {"<path>/acc", "<path>/f1", "<path>/count"}."""

    def __init__(self, flow: TaskFlow) -> None:
        super().__init__()
        self.flow = flow
        self.scores = nn.ModuleDict()
        self.confusions = nn.ModuleDict()
        self.counts = nn.ModuleDict()
        for path, task in flow.tasks.items():
            n = task.num_outputs
            self.scores[_key(path)] = MetricCollection(
                {"acc": MulticlassAccuracy(n, average="micro"), "f1": MulticlassF1Score(n, average="macro")}
            )
            self.confusions[_key(path)] = MulticlassConfusionMatrix(n)
            self.counts[_key(path)] = SumMetric()

    def update(self, logits: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor]) -> None:
        masks = self.flow.masks(targets)
        for path in self.flow.leaf_paths:
            mask = masks[path]
            k = _key(path)
            self.counts[k].update(mask.sum())
            if bool(mask.any()):
                preds = logits[path][mask].detach()
                target = targets[path][mask].long()
                self.scores[k].update(preds, target)
                self.confusions[k].update(preds, target)

    def compute(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for path in self.flow.leaf_paths:
            k = _key(path)
            count = self.counts[k].compute()
            out[f"{path}/count"] = count
            if count > 0:
                out.update({f"{path}/{name}": v for name, v in self.scores[k].compute().items()})
        return out

    def confusion(self, path: str) -> torch.Tensor | None:
        """long[C, C] (rows: truth, columns: prediction), or None if the task saw no row."""
        k = _key(path)
        if self.counts[k].compute() <= 0:
            return None
        return self.confusions[k].compute()

    def reset(self) -> None:
        for coll in (self.scores, self.confusions, self.counts):
            for m in coll.values():
                m.reset()
