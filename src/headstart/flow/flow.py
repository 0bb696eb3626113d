"""TaskFlow: the tree of tasks, where each applies, the combined loss, predictions and thresholds."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from headstart.flow.tasks import NonFiniteError, Task, decision_scores
from headstart.serve import decode
from headstart.serve.flowspec import FlowSpec, Group, plain_threshold

__all__ = ["Group", "TaskFlow", "best_f1_threshold"]


class TaskFlow(FlowSpec):
    """A flow (its spec, conditions and thresholds: `headstart.serve.flowspec.FlowSpec`) with what training and
    evaluation do in torch: where each task applies, losses, predictions, threshold tuning.

    Plain classification is a flow with one multiclass task named `label`.
    """

    task_class = Task

    @classmethod
    def classification(cls, classes: list[str]) -> TaskFlow:
        return cls([Task.from_spec("label", {"kind": "multiclass", "classes": list(classes)})])

    def _truth(self, targets: Mapping[str, torch.Tensor]) -> tuple[dict, dict]:
        present = {p: t.present(targets[p]) for p, t in self.tasks.items()}
        value = {p: targets[p] > 0.5 for p, t in self.tasks.items() if t.kind == "binary"}
        return present, value

    def masks(self, targets: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{path: bool[N]}: where each task applies (is trained and scored), from ground truth."""
        if not self.conditional:
            return {p: t.present(targets[p]) for p, t in self.tasks.items()}
        present, value = self._truth(targets)
        holds = self.holds(present, value)
        return {p: present[p] & holds[p] for p in self.tasks}

    def condition_holds(self, targets: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{path: bool[N]}: where each task's condition (groups' included) holds by ground truth, label or not."""
        return self.holds(*self._truth(targets))

    def known_applicability(self, targets: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{path: bool[N]}: where ground truth settles whether a task applies.

        That is where every task its condition refers to is settled: its own applicability is known and, where it
        applies, its label is present. A task without a condition is settled everywhere.
        """
        present, value = self._truth(targets)
        holds = self.holds(present, value)
        known: dict[str, torch.Tensor] = {}
        for path in self.order:
            k = torch.ones_like(present[path])
            for dep in self.depends_on(path):
                k = k & known[dep] & (~holds[dep] | present[dep])
            known[path] = k
        return known

    def predicted_applicability(self, logits: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{path: bool[N]}: where each task applies by thresholded predictions."""
        present = {
            p: torch.ones(t.flat(logits[p]).shape[0], dtype=torch.bool, device=logits[p].device)
            for p, t in self.tasks.items()
        }
        value = {
            p: t.decode(logits[p], self.thresholds[p]) for p, t in self.tasks.items() if t.kind == "binary"
        }
        return self.holds(present, value)

    # ---- losses -------------------------------------------------------------------------------------------------

    def loss(
        self,
        logits: Mapping[str, torch.Tensor],
        targets: Mapping[str, torch.Tensor],
        class_weights: Mapping[str, torch.Tensor] | None = None,
        label_smoothing: float = 0.0,
        weighting: nn.Module | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The flow loss and each task's loss (mean over the rows where it applies; exactly 0 where none does).

        The flow loss is the weighted sum of task losses, or, with `weighting` (an `UncertaintyWeighting`),
        what that module makes of them and of which tasks apply in this batch.
        """
        masks = self.masks(targets)
        class_weights = class_weights or {}
        per_task = {
            path: task.loss(
                logits[path], targets[path], masks[path], class_weights.get(path), label_smoothing
            )
            for path, task in self.tasks.items()
        }
        if weighting is not None:
            applies = {p: bool(m.any()) for p, m in masks.items()}
            weights = {p: t.weight for p, t in self.tasks.items()}
            return weighting(per_task, applies, weights), per_task
        total: torch.Tensor | None = None
        for path, loss in per_task.items():
            weight = self.tasks[path].weight
            term = loss if weight == 1 else weight * loss
            total = term if total is None else total + term
        return total, per_task

    def per_sample_loss(
        self, logits: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        """float[N]: per sample, the (weighted) sum of the losses of the tasks that apply to it."""
        masks = self.masks(targets)
        total: torch.Tensor | None = None
        for p, task in self.tasks.items():
            loss = task.weight * task.per_sample_loss(logits[p], targets[p], masks[p])
            total = loss if total is None else total + loss
        return total

    # ---- prediction ---------------------------------------------------------------------------------------------

    def predict(self, logits: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        """{path: {"applicable": bool[N], "value": float tensor}}, conditions taken from thresholded predictions.

        Values use the targets' encoding (binary 0/1, multiclass the class index, multilabel 0/1 per class,
        regression kinds in target units) and are NaN where the task does not apply: such a task has no value.
        """
        applicable = self.predicted_applicability(logits)
        out = {}
        for path, task in self.tasks.items():
            value = task.decode(logits[path], self.thresholds.get(path)).float()
            rows = applicable[path].view(-1, *([1] * (value.dim() - 1)))
            out[path] = {
                "applicable": applicable[path],
                "value": torch.where(rows, value, torch.full_like(value, math.nan)),
            }
        return out

    def explain(self, logits: Mapping[str, torch.Tensor], i: int) -> str:
        """A text tree of sample i's decisions (`headstart.serve.decode.explain`, on these logits as numpy)."""
        return decode.explain(self, {p: v.detach().float().cpu().numpy() for p, v in logits.items()}, i)

    def tree(self) -> str:
        """The tasks as a text tree of who asks what given what (`headstart.serve.decode.tree`)."""
        return decode.tree(self)

    # ---- thresholds ---------------------------------------------------------------------------------------------

    def tune_thresholds(
        self, logits: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor]
    ) -> dict[str, float | list[float]]:
        """Tune binary and per-class multilabel thresholds for best F1 on the rows where each task applies (by
        ground truth); store and return them. A task (or class) with no such row keeps its threshold.

        Each threshold is tuned (`best_f1_threshold`) on exactly the float32 scores `Task.decode` compares, so the
        flow then decides every tuning row as tuning scored it. NaN logits on such rows raise NonFiniteError
        naming the task: no threshold is tuned on a diverged model's outputs.
        """
        masks = self.masks(targets)
        for path, task in self.tasks.items():
            if not task.has_threshold:
                continue
            scores = decision_scores(task.flat(logits[path]).detach()).cpu()
            target = targets[path].detach().float().cpu()
            mask = masks[path].cpu()
            if task.kind == "binary":
                if bool(mask.any()):
                    self.thresholds[path] = _tuned(path, scores[mask], target[mask] > 0.5)
                continue
            current = list(self.thresholds[path])
            for c, name in enumerate(task.classes):
                rows = mask & ~torch.isnan(target[:, c])
                if bool(rows.any()):
                    current[c] = _tuned(f"{path}[{name}]", scores[rows, c], target[rows, c] > 0.5)
            self.thresholds[path] = current
        return {p: plain_threshold(v) for p, v in self.thresholds.items()}


def best_f1_threshold(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """The threshold t whose decisions `scores > float32(t)` have the best F1 against `positive`.

    `scores` are the float32 probabilities the decision rule compares (`decision_scores`; other dtypes are rounded
    to float32 first). Every decision a threshold can make cuts the distinct sorted scores into a "no" part and a
    "yes" part; t is the midpoint of the best cut's interval: strictly between the two scores it separates (the
    lowest and highest intervals are bounded by 0 and 1), so that a score moved by rounding (another runtime,
    another device) stays on its side. Equal F1: the interval closest to 0.5, then the lower one. Where two scores
    are adjacent float32 values, nothing lies strictly between them: t is then the lower one (decided "no" by `>`).
    F1 counts as 1 where there is nothing to find and nothing is found, so scores of one class get a threshold
    that decides them all rightly. Returned as the shortest decimal that gives the same float32, so it travels as a
    plain float (JSON included) and decides exactly as tuning scored. A NaN score, or one outside [0, 1], raises
    NonFiniteError; no scores raise ValueError.
    """
    scores = scores.detach().float().cpu().flatten()
    positive = positive.detach().bool().cpu().flatten()
    if scores.numel() == 0:
        raise ValueError("best_f1_threshold needs at least one score")
    outside = int((~((scores >= 0) & (scores <= 1))).sum())
    if outside:
        raise NonFiniteError(
            f"{outside} of {scores.numel()} scores are NaN or not probabilities in [0, 1]: the model's outputs are "
            "not finite (a diverged training?), and no threshold can be tuned on them"
        )
    values, inverse = torch.unique(scores, sorted=True, return_inverse=True)
    k = values.numel()
    rows = torch.bincount(inverse, minlength=k).double()
    hits = torch.bincount(inverse[positive], minlength=k).double()
    # Cut j (0..k) decides "yes" for the distinct scores j..k-1; suffix sums count what it decides "yes".
    zero = torch.zeros(1, dtype=torch.float64)
    said_yes = torch.cat([rows.flip(0).cumsum(0).flip(0), zero])
    tp = torch.cat([hits.flip(0).cumsum(0).flip(0), zero])
    fp, fn = said_yes - tp, hits.sum() - tp
    denom = 2 * tp + fp + fn
    f1 = torch.where(denom > 0, 2 * tp / denom.clamp(min=1), torch.ones_like(denom))
    bounds = torch.cat([zero, values.double(), torch.ones(1, dtype=torch.float64)])
    low, high = bounds[:-1], bounds[1:]  # cut j: any t with low <= t < high (the last: t <= 1)
    feasible = torch.ones(k + 1, dtype=torch.bool)
    feasible[0] = bool(values[0] > 0)  # "yes" for every score needs t < the lowest, and t >= 0
    best = f1[feasible].max()
    distance = torch.clamp(torch.maximum(low - 0.5, 0.5 - high), min=0.0)
    distance = torch.where(feasible & (f1 == best), distance, torch.full_like(distance, math.inf))
    j = int(distance.argmin())  # the first of equal distances: the lower interval
    lo, hi = float(low[j]), float(high[j])
    t = np.float32((lo + hi) / 2)
    if j < k and not t < np.float32(hi):  # nothing strictly between two adjacent float32 scores
        t = np.float32(lo)
    return _shortest(t)


def _tuned(what: str, scores: torch.Tensor, positive: torch.Tensor) -> float:
    try:
        return best_f1_threshold(scores, positive)
    except NonFiniteError as e:
        raise NonFiniteError(f"task '{what}': {e}") from None


def _shortest(t: np.float32) -> float:
    """The shortest decimal that rounds to the float32 t (as a Python float, the same float32 again)."""
    short = float(np.format_float_positional(t, unique=True, trim="-"))
    return short if np.float32(short) == t else float(t)
