"""Per-task metrics and losses, computed on the rows where each task applies (by ground truth).

Steps only append detached logits and targets to a buffer; the stateful torchmetrics are updated with the masked
rows when the buffer is flushed (at `compute`, or every `flush_every` batches to bound memory), so a training step
pays microseconds for its metrics, and empty batches do not drag averages down.

Names (`compute()` keys), per task path, besides `<path>/count` (rows where it applies) and `<path>/loss`:
- binary: `acc`, `precision`, `recall`, `f1`, `auroc` (only when both classes occur), at the flow's threshold;
- multiclass: `acc` (top-1), `top{k}_acc` with k = min(3, C - 1) when C > 2, `f1` (macro); `confusion(path)`;
- multilabel: `f1_<class>` per class, `f1` (their mean), `acc` (per-element accuracy), at the flow's thresholds;
- bounded_regression and regression: `mae`, `rmse` in target units; bounded_regression also `nmae` = mae / scale.
- every task: `e2e_acc`, the end-to-end accuracy under predicted conditions, over the rows where ground truth
  settles whether the task applies (see `TaskFlow.known_applicability`; rows where it applies but its own label
  is missing are left out). A row is right when the predicted applicability equals the true one and, where the task
  applies, the decoded value is right (`Task.correct`: regression kinds within `tolerance` * scale for
  bounded_regression, `tolerance` * max(|target|, 1) for regression; multilabel every class right).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch
from torch import nn
from torchmetrics import MeanAbsoluteError, MeanSquaredError, MetricCollection, SumMetric
from torchmetrics.classification import (
    BinaryAccuracy,
    BinaryAUROC,
    BinaryF1Score,
    BinaryPrecision,
    BinaryRecall,
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MultilabelAccuracy,
    MultilabelF1Score,
)

from headstart.flow.flow import TaskFlow
from headstart.flow.head import _key
from headstart.flow.tasks import Task


def _scores(task: Task) -> MetricCollection:
    """The task's scores, each with its own state. torchmetrics' compute groups would share one state among metrics
    whose states happened to be equal after their first update (top-1 F1 and top-k accuracy can be), and then report
    the wrong value for the rest of training; across processes a rank may even share where another does not."""
    return MetricCollection(_score_metrics(task), compute_groups=False)


def _score_metrics(task: Task) -> dict:
    if task.kind == "binary":
        return {
            "acc": BinaryAccuracy(),
            "precision": BinaryPrecision(),
            "recall": BinaryRecall(),
            "f1": BinaryF1Score(),
        }
    if task.kind == "multiclass":
        c = len(task.classes)
        metrics = {"acc": MulticlassAccuracy(c, average="micro")}
        if c > 2:
            k = min(3, c - 1)
            metrics[f"top{k}_acc"] = MulticlassAccuracy(c, top_k=k, average="micro")
        metrics["f1"] = MulticlassF1Score(c, average="macro")
        return metrics
    if task.kind == "multilabel":
        c = len(task.classes)
        return {
            "f1": MultilabelF1Score(c, average=None, ignore_index=-1),
            "acc": MultilabelAccuracy(c, average="micro", ignore_index=-1),
        }
    return {"mae": MeanAbsoluteError(), "rmse": MeanSquaredError(squared=False)}


class FlowMetrics(nn.Module):
    """`compute()` gives {"loss", "<path>/loss" (when given), "<path>/count", "<path>/<metric>"}; see the module doc."""

    def __init__(self, flow: TaskFlow, tolerance: float = 0.05, flush_every: int = 256) -> None:
        super().__init__()
        self.flow = flow
        self.tolerance = tolerance
        self.flush_every = flush_every
        self.scores = nn.ModuleDict()
        self.aurocs = nn.ModuleDict()
        self.positives = nn.ModuleDict()
        self.confusions = nn.ModuleDict()
        self.counts = nn.ModuleDict()
        self.e2e_right = nn.ModuleDict()
        self.e2e_rows = nn.ModuleDict()
        for path, task in flow.tasks.items():
            k = _key(path)
            self.scores[k] = _scores(task)
            self.counts[k] = SumMetric()
            self.e2e_right[k] = SumMetric()
            self.e2e_rows[k] = SumMetric()
            if task.kind == "binary":
                self.aurocs[k] = BinaryAUROC()
                self.positives[k] = SumMetric()
            if task.kind == "multiclass":
                self.confusions[k] = MulticlassConfusionMatrix(len(task.classes))
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
        """Record a batch. `losses` ({name: batch mean}) are averaged over rows, weighted by batch size; a task's
        own loss (`<path>/loss`, the mean over the rows where the task applies) by the number of those rows, so that
        its epoch value does not depend on how the rows were batched (or shared between processes)."""
        n = next(iter(targets.values())).shape[0]
        self._pending.append(
            (
                {p: t.flat(logits[p].detach()) for p, t in self.flow.tasks.items()},
                {p: targets[p].detach() for p in self.flow.leaf_paths},
            )
        )
        masks = self.flow.masks(targets) if any(self._task_of(k) for k in losses or {}) else {}
        for name, value in (losses or {}).items():
            task = self._task_of(name)
            weighted = value.detach() * (masks[task].sum() if task else n)
            self._loss_pending[name] = (
                self._loss_pending[name] + weighted if name in self._loss_pending else weighted
            )
        self._rows_pending += n
        if len(self._pending) >= self.flush_every:
            self._flush_rows()

    def _task_of(self, loss_name: str) -> str | None:
        """The task path of a per-task loss name (`<path>/loss`), else None."""
        path = loss_name.removesuffix("/loss")
        return path if path != loss_name and path in self.flow.tasks else None

    def _flush_rows(self) -> None:
        if not self._pending:
            return
        logits = {p: torch.cat([b[0][p] for b in self._pending]) for p in self.flow.leaf_paths}
        targets = {p: torch.cat([b[1][p] for b in self._pending]) for p in self.flow.leaf_paths}
        self._pending = []
        masks = self.flow.masks(targets)
        holds = self.flow.condition_holds(targets)
        known = self.flow.known_applicability(targets)
        predicted = self.flow.predicted_applicability(logits)
        for path, task in self.flow.tasks.items():
            k, mask, target = _key(path), masks[path], targets[path]
            value = task.decode(logits[path], self.flow.thresholds.get(path))
            self.counts[k].update(mask.sum())
            if bool(mask.any()):
                self._update_scores(task, k, logits[path][mask], value[mask], target[mask])
            rows = known[path] & (~holds[path] | mask)
            right = (predicted[path] == holds[path]) & (
                ~holds[path] | task.correct(value, target, self.tolerance)
            )
            self.e2e_rows[k].update(rows.sum())
            self.e2e_right[k].update((right & rows).sum())

    def _update_scores(
        self, task: Task, k: str, logits: torch.Tensor, value: torch.Tensor, target: torch.Tensor
    ) -> None:
        if task.kind == "binary":
            truth = (target > 0.5).long()
            self.scores[k].update(value.long(), truth)
            self.aurocs[k].update(torch.sigmoid(logits.float()), truth)
            self.positives[k].update(truth.sum())
        elif task.kind == "multiclass":
            truth = target.long()
            self.scores[k].update(logits.float(), truth)
            self.confusions[k].update(value, truth)
        elif task.kind == "multilabel":
            truth = torch.where(torch.isnan(target), -1.0, target).long()
            self.scores[k].update(value.long(), truth)
        else:
            self.scores[k].update(value.float(), target.float())

    def _flush(self) -> None:
        self._flush_rows()
        for name, value in self._loss_pending.items():
            key = _key(name.replace("/", "::"))
            if key not in self.loss_sums:
                self.loss_sums[key] = SumMetric().to(value.device)
            self.loss_sums[key].update(value)
        if self._rows_pending:
            self.rows.update(torch.tensor(float(self._rows_pending), device=self.rows.device))
        self._loss_pending, self._rows_pending = {}, 0

    def compute(self) -> dict[str, torch.Tensor]:
        """The epoch's values; across processes (DDP) every metric is synchronized, so all ranks get the same."""
        self._flush()
        self._share_loss_names()
        out: dict[str, torch.Tensor] = {}
        rows = _total(self.rows)
        for key, metric in self.loss_sums.items():
            name = key.replace("::", "/").replace("__", ".")
            task = self._task_of(name)
            total = _total(self.counts[_key(task)]) if task else rows
            if total > 0:
                out[name] = _total(metric) / total
        for path, task in self.flow.tasks.items():
            k = _key(path)
            count = _total(self.counts[k])
            out[f"{path}/count"] = count
            if count > 0:
                out.update(self._task_scores(task, k, count))
            e2e_rows = _total(self.e2e_rows[k])
            if e2e_rows > 0:
                out[f"{path}/e2e_acc"] = _total(self.e2e_right[k]) / e2e_rows
        return {name: value.float() if value.dtype != torch.bool else value for name, value in out.items()}

    def _share_loss_names(self) -> None:
        """Across processes, give every rank the same loss sums (a rank may have seen no batch), so that all ranks
        synchronize the same metrics in the same order."""
        if not _distributed():
            return
        names: list[list[str]] = [[] for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather_object(names, sorted(self.loss_sums.keys()))
        for key in sorted(set().union(*names)):
            if key not in self.loss_sums:
                self.loss_sums[key] = SumMetric().to(self.rows.device)

    def _task_scores(self, task: Task, k: str, count: torch.Tensor) -> dict[str, torch.Tensor]:
        values = self.scores[k].compute()
        out = {
            f"{task.path}/{name}": v
            for name, v in values.items()
            if not (task.kind == "multilabel" and name == "f1")
        }
        if task.kind == "binary":
            positives = _total(self.positives[k])
            if 0 < positives < count:
                out[f"{task.path}/auroc"] = self.aurocs[k].compute()
        elif task.kind == "multilabel":
            per_class = values["f1"]
            out.update({f"{task.path}/f1_{c}": per_class[i] for i, c in enumerate(task.classes)})
            out[f"{task.path}/f1"] = per_class.mean()
        elif task.kind == "bounded_regression":
            out[f"{task.path}/nmae"] = values["mae"] / task.scale
        return out

    def confusion(self, path: str) -> torch.Tensor | None:
        """long[C, C] (rows: truth, columns: prediction) for a multiclass task that saw rows, else None."""
        self._flush()
        k = _key(path)
        if k not in self.confusions or _total(self.counts[k]) <= 0:
            return None
        return self.confusions[k].compute()

    def reset(self) -> None:
        self._pending, self._loss_pending, self._rows_pending = [], {}, 0
        for coll in (
            self.scores,
            self.aurocs,
            self.positives,
            self.confusions,
            self.counts,
            self.e2e_right,
            self.e2e_rows,
            self.loss_sums,
        ):
            for m in coll.values():
                m.reset()
        self.rows.reset()


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _total(metric: SumMetric) -> torch.Tensor:
    """The sum, 0 when nothing was added. Across processes every rank computes (and so synchronizes) it, also a rank
    that saw no rows."""
    if metric.update_count:
        return metric.compute()
    if _distributed():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "compute before update": expected on a rank without rows
            return metric.compute().float()
    return torch.tensor(0.0)
