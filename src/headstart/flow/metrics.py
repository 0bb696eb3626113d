"""Per-task metrics and losses, computed on the rows where each task applies (by ground truth).

Steps only append detached logits, targets and losses to a buffer; the masked rows are counted when it is flushed
(at `compute`, or every `flush_every` batches to bound memory), so a training step pays microseconds for its metrics,
and empty batches do not drag averages down.

Every score but AUROC is a ratio of counts (binary: true/false positives/negatives; multiclass: the confusion matrix
and the top-k hits; multilabel: those four per class) or of sums (regression errors), kept in plain tensors and
summed across processes at `compute`. torchmetrics' formulas and conventions are kept (a 0/0 score is 0; macro F1
averages the classes that occur in the targets or the predictions) and tests compare the two on random data; its
stateful Metric objects are not used for them: a stack of 48 heads holds 144 FlowMetrics, and updating and resetting
a Metric module costs more than a small head's step. AUROC needs every score and stays torchmetrics' BinaryAUROC.

The epoch loss (`loss`) does not depend on how the rows were batched or shared between processes: each task's loss
is its mean over all the epoch's rows where it applies (every batch mean weighted by what it was a mean over), and
the flow loss combines those the way a step combines a batch's (the tasks' weights, or the uncertainty weighting with
its current parameters); a task that applies nowhere adds nothing, and where no task applies there is no loss.

Nothing non-finite turns into a number: a NaN loss makes the epoch loss NaN, and a task whose logits were NaN on any
row reports NaN for its scores (an accuracy of NaN-decided rows would look like a real one). A task that applied to
no row reports only its `count` (0): no loss, no score, no `e2e_acc`; absent, not perfect.

Names (`compute()` keys), per task path, besides `<path>/count` (rows where it applies) and `<path>/loss` (flows of
more than one task):
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

import math
from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import nn
from torchmetrics.classification import BinaryAUROC

from headstart.flow.flow import TaskFlow
from headstart.flow.tasks import Task, module_key


def _count_shape(task: Task) -> tuple[tuple[int, ...], torch.dtype]:
    """The shape and dtype of a task's counts, as `FlowMetrics._update_scores` adds to them:
    binary [tp, fp, fn, tn]; multiclass rows 0..C-1 the confusion matrix (truth, prediction) and row C [top-k hits];
    multilabel [tp, fp, fn, tn] per class over its labelled entries; regression kinds [sum |error|, sum error^2]."""
    c = len(task.classes) if task.classes else 0
    if task.kind == "binary":
        return (4,), torch.long
    if task.kind == "multiclass":
        return (c + 1, c), torch.long
    if task.kind == "multilabel":
        return (c, 4), torch.long
    return (2,), torch.float32


class FlowMetrics(nn.Module):
    """`compute()` gives {"loss", "<path>/loss", "<path>/count", "<path>/<metric>"}; see the module doc."""

    def __init__(self, flow: TaskFlow, tolerance: float = 0.05, flush_every: int = 256) -> None:
        super().__init__()
        self.flow = flow
        self.tolerance = tolerance
        self.flush_every = flush_every
        self.aurocs = nn.ModuleDict()
        for path, task in flow.tasks.items():
            if task.kind == "binary":
                self.aurocs[module_key(path)] = BinaryAUROC()
            shape, dtype = _count_shape(task)
            self.register_buffer(
                f"counts__{module_key(path)}", torch.zeros(shape, dtype=dtype), persistent=False
            )
        self._row_of = {path: i for i, path in enumerate(flow.tasks)}
        # The epoch's sums, one row per task (columns: _SUMS) and one for the flow, and each task's counts above:
        # plain tensors added to in place, summed across processes at compute. Not in state_dict: a checkpoint holds
        # no epoch in progress.
        self.register_buffer("sums", torch.zeros(len(flow.tasks), len(_SUMS)), persistent=False)
        self.register_buffer("flow_sums", torch.zeros(len(_FLOW_SUMS)), persistent=False)
        # The loss weighting a step used (an UncertaintyWeighting), kept out of this module's children: its
        # parameters belong to the model, not to the metrics' state.
        self.__dict__["_weighting"] = None
        self._pending: list[_Batch] = []

    def update(
        self,
        logits: Mapping[str, torch.Tensor],
        targets: Mapping[str, torch.Tensor],
        task_losses: Mapping[str, torch.Tensor] | None = None,
        *,
        class_weights: Mapping[str, torch.Tensor] | None = None,
        weighting: nn.Module | None = None,
        extra_loss: torch.Tensor | None = None,
    ) -> None:
        """Record a batch.

        `task_losses`: {task path: its loss on this batch}, as `TaskFlow.loss` returns them, computed with
        `class_weights` (the same ones, so that each batch mean is weighted by what it was a mean over) and combined
        in the step by `weighting` (None: the tasks' static weights). `extra_loss`: a batch mean over rows that the
        step added to the flow loss (e.g. feature distillation); averaged over rows, it adds to the epoch loss.
        """
        unknown = [path for path in task_losses or {} if path not in self.flow.tasks]
        if unknown:
            raise ValueError(
                f"task_losses maps task paths to their losses; {unknown[0]!r} is no task of this flow"
            )
        if task_losses:
            self.__dict__["_weighting"] = weighting
            self.__dict__["_class_weights"] = dict(class_weights or {})
        self._pending.append(
            _Batch(
                {p: t.flat(logits[p].detach()) for p, t in self.flow.tasks.items()},
                {p: targets[p].detach() for p in self.flow.leaf_paths},
                {p: v.detach() for p, v in task_losses.items()} if task_losses else {},
                None if extra_loss is None else extra_loss.detach(),
            )
        )
        if len(self._pending) >= self.flush_every:
            self._flush()

    def _flush(self) -> None:
        """Count the pending batches into the sums: their rows' scores, and their losses, each batch mean weighted
        by what it was a mean over (one pass over all the pending rows, not one per batch)."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        logits = {p: torch.cat([b.logits[p] for b in pending]) for p in self.flow.leaf_paths}
        targets = {p: torch.cat([b.targets[p] for b in pending]) for p in self.flow.leaf_paths}
        sizes = [len(next(iter(b.targets.values()))) for b in pending]
        masks = self.flow.masks(targets)
        self._count_rows(logits, targets, masks)
        device = self.sums.device
        batch_of = torch.repeat_interleave(
            torch.arange(len(pending), device=device), torch.tensor(sizes, device=device)
        )
        class_weights = self.__dict__.get("_class_weights") or {}
        for path, task in self.flow.tasks.items():
            chosen = [i for i, b in enumerate(pending) if path in b.losses]
            if not chosen:
                continue
            rows = task.loss_amounts(targets[path], masks[path], class_weights.get(path))
            per_batch = torch.zeros(len(pending), device=device).index_add_(
                0, batch_of, rows.to(device).float()
            )
            amounts = per_batch[chosen]
            losses = torch.stack([pending[i].losses[path].float() for i in chosen]).to(device)
            self.sums[self._row_of[path], _LOSS_SUM] += (losses * amounts).sum()
            self.sums[self._row_of[path], _LOSS_AMOUNT] += amounts.sum()
        extras = [(b.extra.float() * n) for b, n in zip(pending, sizes, strict=True) if b.extra is not None]
        if extras:
            self.flow_sums[_EXTRA] += torch.stack(extras).sum().to(self.flow_sums.dtype)
        self.flow_sums[_ROWS] += float(sum(sizes))

    def _count_rows(
        self,
        logits: dict[str, torch.Tensor],
        targets: dict[str, torch.Tensor],
        masks: dict[str, torch.Tensor],
    ) -> None:
        holds = self.flow.condition_holds(targets)
        known = self.flow.known_applicability(targets)
        predicted = self.flow.predicted_applicability(logits)
        for path, task in self.flow.tasks.items():
            k, mask, target = module_key(path), masks[path], targets[path]
            value = task.decode(logits[path], self.flow.thresholds.get(path))
            nan = torch.isnan(logits[path])
            if bool(mask.any()):
                self._update_scores(task, k, logits[path][mask], value[mask], target[mask])
            rows = known[path] & (~holds[path] | mask)
            right = (predicted[path] == holds[path]) & (
                ~holds[path] | task.correct(value, target, self.tolerance)
            )
            counted = torch.stack(
                [
                    mask.sum(),
                    (nan.flatten(1).any(1) if nan.dim() > 1 else nan).sum(),
                    (right & rows).sum(),
                    rows.sum(),
                    (target > 0.5).logical_and(mask).sum()
                    if task.kind == "binary"
                    else mask.new_zeros(()).long(),
                ]
            )
            self.sums[self._row_of[path], : len(counted)] += counted.to(self.sums.dtype)

    def _update_scores(
        self, task: Task, k: str, logits: torch.Tensor, value: torch.Tensor, target: torch.Tensor
    ) -> None:
        counts = self._buffers[f"counts__{k}"]
        if task.kind == "binary":
            truth = target > 0.5
            self.aurocs[k].update(task.probabilities(logits), truth.long())
            counts += _four(value.bool(), truth).sum(0)
        elif task.kind == "multiclass":
            c, truth = len(task.classes), target.long()
            if bool((truth < 0).any() | (truth >= c).any()):
                raise ValueError(f"task {task.path!r}: a class index outside 0..{c - 1} in the targets")
            counts[:c] += torch.bincount(truth * c + value, minlength=c * c).view(c, c)
            if c > 2:
                top = logits.topk(min(3, c - 1), dim=-1).indices
                counts[c, 0] += (top == truth.unsqueeze(-1)).any(-1).sum()
        elif task.kind == "multilabel":
            labelled = ~torch.isnan(target)
            counts += (_four(value.bool(), target > 0.5) & labelled.unsqueeze(-1)).sum(0)
        else:
            error = value.float() - target.float()
            counts += torch.stack([error.abs().sum(), (error * error).sum()])

    def compute(self) -> dict[str, torch.Tensor]:
        """The epoch's values; across processes (DDP) every metric is synchronized, so all ranks get the same."""
        self._flush()
        out: dict[str, torch.Tensor] = {}
        task_losses: dict[str, torch.Tensor] = {}
        sums, flow_sums = _totals(self.sums), _totals(self.flow_sums)
        for path, task in self.flow.tasks.items():
            k = module_key(path)
            count, nan_rows, e2e_right, e2e_rows, positives, loss_sum, amount = sums[self._row_of[path]]
            out[f"{path}/count"] = count
            if not count > 0:
                continue
            if amount > 0:
                task_losses[path] = loss_sum / amount
            scores = self._task_scores(task, k, count, positives)
            if e2e_rows > 0:
                scores[f"{path}/e2e_acc"] = e2e_right / e2e_rows
            if nan_rows > 0:
                scores = {name: torch.full_like(v.float(), math.nan) for name, v in scores.items()}
            out.update(scores)
        if len(self.flow.tasks) > 1:
            out.update({f"{path}/loss": loss for path, loss in task_losses.items()})
        extra, rows = flow_sums
        if task_losses:
            out["loss"] = self._flow_loss(task_losses) + (extra / rows if rows > 0 else 0.0)
        return {name: value.float() if value.dtype != torch.bool else value for name, value in out.items()}

    def _flow_loss(self, task_losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """The tasks' epoch losses combined as a step combines its batch's (`TaskFlow.loss`); only tasks that
        applied somewhere are given."""
        weights = {p: t.weight for p, t in self.flow.tasks.items()}
        weighting = self.__dict__["_weighting"]
        if weighting is None:
            return sum(weights[p] * loss for p, loss in task_losses.items())
        with torch.no_grad():
            return weighting(task_losses, dict.fromkeys(task_losses, True), weights).detach()

    def _task_scores(
        self, task: Task, k: str, count: torch.Tensor, positives: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        counts = _totals(self._buffers[f"counts__{k}"]).float()
        p = task.path
        if task.kind == "binary":
            tp, fp, fn, tn = counts
            out = {
                f"{p}/acc": (tp + tn) / counts.sum(),
                f"{p}/precision": _ratio(tp, tp + fp),
                f"{p}/recall": _ratio(tp, tp + fn),
                f"{p}/f1": _ratio(2 * tp, 2 * tp + fp + fn),
            }
            if 0 < positives < count:
                out[f"{p}/auroc"] = self.aurocs[k].compute()
            return out
        if task.kind == "multiclass":
            c = len(task.classes)
            confusion, rows = counts[:c], counts[:c].sum()
            tp = confusion.diagonal()
            out = {f"{p}/acc": tp.sum() / rows}
            if c > 2:
                out[f"{p}/top{min(3, c - 1)}_acc"] = counts[c, 0] / rows
            missed, wrongly = confusion.sum(1) - tp, confusion.sum(0) - tp
            occurs = (tp + missed + wrongly) > 0
            out[f"{p}/f1"] = _ratio(2 * tp, 2 * tp + missed + wrongly)[occurs].mean()
            return out
        if task.kind == "multilabel":
            tp, fp, fn, tn = counts.unbind(-1)
            per_class = _ratio(2 * tp, 2 * tp + fp + fn)
            out = {f"{p}/acc": (tp + tn).sum() / counts.sum()}
            out.update({f"{p}/f1_{c}": per_class[i] for i, c in enumerate(task.classes)})
            out[f"{p}/f1"] = per_class.mean()
            return out
        abs_sum, sq_sum = counts
        out = {f"{p}/mae": abs_sum / count, f"{p}/rmse": (sq_sum / count).sqrt()}
        if task.kind == "bounded_regression":
            out[f"{p}/nmae"] = out[f"{p}/mae"] / task.scale
        return out

    def confusion(self, path: str) -> torch.Tensor | None:
        """long[C, C] (rows: truth, columns: prediction) for a multiclass task that saw rows, else None."""
        self._flush()
        task = self.flow.tasks[path]
        if task.kind != "multiclass" or not _totals(self.sums)[self._row_of[path], _COUNT] > 0:
            return None
        return _totals(self._buffers[f"counts__{module_key(path)}"])[: len(task.classes)]

    def reset(self) -> None:
        self._pending = []
        for auroc in self.aurocs.values():
            auroc.reset()
        for buffer in self.buffers(recurse=False):
            buffer.zero_()


# The columns of FlowMetrics.sums (per task) and flow_sums. NaN stays NaN in a sum: a diverged epoch is not 0.
_SUMS = ("count", "nan_rows", "e2e_right", "e2e_rows", "positives", "loss_sum", "loss_amount")
_COUNT, _LOSS_SUM, _LOSS_AMOUNT = _SUMS.index("count"), _SUMS.index("loss_sum"), _SUMS.index("loss_amount")
_FLOW_SUMS = ("extra", "rows")
_EXTRA, _ROWS = _FLOW_SUMS.index("extra"), _FLOW_SUMS.index("rows")


class _Batch(NamedTuple):
    """A batch recorded by `FlowMetrics.update`, counted at the next flush."""

    logits: dict[str, torch.Tensor]
    targets: dict[str, torch.Tensor]
    losses: dict[str, torch.Tensor]
    extra: torch.Tensor | None


def _four(predicted: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """bool[..., 4]: each entry as a true positive, false positive, false negative, true negative."""
    return torch.stack(
        [predicted & truth, predicted & ~truth, ~predicted & truth, ~predicted & ~truth], dim=-1
    )


def _ratio(part: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """part / whole, 0 where whole is 0 (torchmetrics' zero_division=0)."""
    return torch.where(whole > 0, part / whole.clamp(min=1), torch.zeros_like(part))


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _totals(sums: torch.Tensor) -> torch.Tensor:
    """`sums` over all processes (a collective under DDP: every rank calls it, in the same order), as a copy."""
    total = sums.clone()
    if _distributed():
        torch.distributed.all_reduce(total)
    return total
