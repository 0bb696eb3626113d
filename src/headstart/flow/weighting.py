"""Adaptive loss weighting: homoscedastic uncertainty (Kendall, Gal and Cipolla, 2018)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from headstart.flow.tasks import module_key


class UncertaintyWeighting(nn.Module):
    """total = sum over tasks that apply in the batch of `exp(-s_t) * w_t * L_t + s_t`.

    `s_t` is a learnable log-variance per task (initially 0, so the start equals the static weighted sum) and `w_t`
    the task's static weight. A task that applies to no sample of a batch contributes no term, so its `s_t` is not
    in the graph: its gradient stays None and no optimizer (momentum included) moves it. Each task has its own
    Parameter for that reason: a shared tensor would get a zero gradient that Adam's momentum still acts on.
    """

    def __init__(self, paths: Iterable[str]) -> None:
        super().__init__()
        self.paths = list(paths)
        self.log_vars = nn.ParameterDict({module_key(p): nn.Parameter(torch.zeros(())) for p in self.paths})

    def log_var(self, path: str) -> nn.Parameter:
        return self.log_vars[module_key(path)]

    def forward(
        self,
        per_task: Mapping[str, torch.Tensor],
        applies: Mapping[str, bool],
        weights: Mapping[str, float] | None = None,
    ) -> torch.Tensor:
        weights = weights or {}
        total: torch.Tensor | None = None
        for path, loss in per_task.items():
            if not applies.get(path, False):
                continue
            s = self.log_var(path)
            term = torch.exp(-s) * weights.get(path, 1.0) * loss + s
            total = term if total is None else total + term
        if total is None:  # nothing applies: exactly 0, still in the graph of the task losses
            total = sum(loss * 0.0 for loss in per_task.values())
        return total

    def weights(self) -> dict[str, float]:
        """The current effective weights exp(-s_t), for logging."""
        return {p: float(torch.exp(-self.log_var(p).detach())) for p in self.paths}
