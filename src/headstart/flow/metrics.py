"""Per-task metrics and losses, computed on the rows where each task applies.

Steps only append detached predictions to a buffer; the stateful torchmetrics are updated once per epoch with the
masked rows, so a training step pays microseconds for its metrics, and empty batches do not drag averages down.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torchmetrics import MetricCollection, SumMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score

from headstart.flow.flow import TaskFlow
from headstart.flow.head import _key


class FlowMetrics(nn.Module):
    """`compute()` gives {"loss", "<path>/loss" (several tasks), "<path>/acc", "<path>/f1", "<path>/count"}."""

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
        self.loss_sums = nn.ModuleDict()
        self.rows = SumMetric()
        self._pending: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []
        self._loss_pending: dict[str, torch.Tensor] = {}
        self._rows_pending = 0

    def update(
        self,
        logits: Mapping[str, torch.Tensor],
        targets: Mapping[str, torch.Tensor],
        losses: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """Record a batch. `losses` ({name: batch mean}) are averaged over rows, weighted by batch size."""
        n = next(iter(targets.values())).shape[0]
        self._pending.append(
            (
                {p: logits[p].detach().argmax(-1) for p in self.flow.leaf_paths},
                {p: targets[p] for p in self.flow.leaf_paths},
            )
        )
        for name, value in (losses or {}).items():
            weighted = value.detach() * n
            self._loss_pending[name] = (
                self._loss_pending[name] + weighted if name in self._loss_pending else weighted
            )
        self._rows_pending += n

    def _flush(self) -> None:
        if self._pending:
            preds = {p: torch.cat([b[0][p] for b in self._pending]) for p in self.flow.leaf_paths}
            targets = {p: torch.cat([b[1][p] for b in self._pending]) for p in self.flow.leaf_paths}
            masks = self.flow.masks(targets)
            for path in self.flow.leaf_paths:
                mask, k = masks[path], _key(path)
                self.counts[k].update(mask.sum())
                if bool(mask.any()):
                    self.scores[k].update(preds[path][mask], targets[path][mask].long())
                    self.confusions[k].update(preds[path][mask], targets[path][mask].long())
        for name, value in self._loss_pending.items():
            key = _key(name.replace("/", "::"))
            if key not in self.loss_sums:
                self.loss_sums[key] = SumMetric().to(value.device)
            self.loss_sums[key].update(value)
        if self._rows_pending:
            self.rows.update(torch.tensor(float(self._rows_pending), device=self.rows.device))
        self._pending, self._loss_pending, self._rows_pending = [], {}, 0

    def compute(self) -> dict[str, torch.Tensor]:
        self._flush()
        out: dict[str, torch.Tensor] = {}
        rows = self.rows.compute() if self.rows.update_count else torch.tensor(0.0)
        for key, metric in self.loss_sums.items():
            if rows > 0:
                out[key.replace("::", "/").replace("__", ".")] = metric.compute() / rows
        for path in self.flow.leaf_paths:
            k = _key(path)
            count = self.counts[k].compute() if self.counts[k].update_count else torch.tensor(0.0)
            out[f"{path}/count"] = count
            if count > 0:
                out.update({f"{path}/{name}": v for name, v in self.scores[k].compute().items()})
        return out

    def confusion(self, path: str) -> torch.Tensor | None:
        """long[C, C] (rows: truth, columns: prediction), or None if the task saw no row."""
        self._flush()
        k = _key(path)
        if not self.counts[k].update_count or self.counts[k].compute() <= 0:
            return None
        return self.confusions[k].compute()

    def reset(self) -> None:
        self._pending, self._loss_pending, self._rows_pending = [], {}, 0
        for coll in (self.scores, self.confusions, self.counts, self.loss_sums):
            for m in coll.values():
                m.reset()
        self.rows.reset()
