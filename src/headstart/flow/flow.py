"""TaskFlow: the set of tasks, their masks and the combined loss."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from headstart.flow.tasks import FlowSpecError, Task


class TaskFlow:
    """Tasks declared as nested `tasks:` mappings; leaves in declaration order.

    Plain classification is a flow with one multiclass task named `label`.
    """

    def __init__(self, tasks: list[Task]) -> None:
        if not tasks:
            raise FlowSpecError("a flow needs at least one task")
        self.tasks: dict[str, Task] = {t.path: t for t in tasks}

    @classmethod
    def from_spec(cls, spec: Mapping) -> TaskFlow:
        if not isinstance(spec, Mapping) or "tasks" not in spec:
            raise FlowSpecError("a flow spec is a mapping with a 'tasks' key")
        return cls(list(_leaves(spec["tasks"], prefix="")))

    @classmethod
    def classification(cls, classes: list[str]) -> TaskFlow:
        return cls([Task.from_spec("label", {"kind": "multiclass", "classes": list(classes)})])

    def to_spec(self) -> dict:
        return {"tasks": {path: task.to_spec() for path, task in self.tasks.items()}}

    @property
    def leaf_paths(self) -> list[str]:
        return list(self.tasks)

    def masks(self, targets: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{path: bool[N]}: where each task is trained and scored, from ground truth."""
        return {path: task.present(targets[path]) for path, task in self.tasks.items()}

    def loss(
        self,
        logits: Mapping[str, torch.Tensor],
        targets: Mapping[str, torch.Tensor],
        class_weights: Mapping[str, torch.Tensor] | None = None,
        label_smoothing: float = 0.0,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted sum of task losses and each task's loss (mean over the rows where it applies)."""
        masks = self.masks(targets)
        class_weights = class_weights or {}
        per_task = {
            path: task.loss(
                logits[path], targets[path], masks[path], class_weights.get(path), label_smoothing
            )
            for path, task in self.tasks.items()
        }
        total = sum(self.tasks[p].weight * loss for p, loss in per_task.items())
        return total, per_task

    def per_sample_loss(
        self, logits: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        masks = self.masks(targets)
        return sum(
            task.weight * task.per_sample_loss(logits[p], targets[p], masks[p])
            for p, task in self.tasks.items()
        )

    def predict(self, logits: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        """{path: {"applicable": bool[N], "value": tensor[N]}}."""
        out = {}
        for path, task in self.tasks.items():
            value = task.decode(logits[path])
            out[path] = {
                "applicable": torch.ones(value.shape[0], dtype=torch.bool, device=value.device),
                "value": value,
            }
        return out


def _leaves(tasks: Mapping, prefix: str):
    if not isinstance(tasks, Mapping) or not tasks:
        raise FlowSpecError(f"'{prefix or 'tasks'}': expected a non-empty mapping of tasks")
    for name, spec in tasks.items():
        path = f"{prefix}{name}"
        if not isinstance(spec, Mapping):
            raise FlowSpecError(f"task '{path}': expected a mapping with 'kind', got {spec!r}")
        if "tasks" in spec:
            raise FlowSpecError(
                f"'{path}': task groups arrive with conditional flows; declare flat tasks for now"
            )
        yield Task.from_spec(path, dict(spec))
