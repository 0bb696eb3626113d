"""The flow head: an optional MLP trunk shared by all tasks, then one linear layer per task."""

from __future__ import annotations

import torch
from torch import nn

from headstart.flow.flow import TaskFlow
from headstart.flow.tasks import module_key


class FlowHead(nn.Module):
    """features float[B, D] (or [B, C, h, w], pooled) -> {task path: logits} (float[B] or float[B, C])."""

    def __init__(
        self, in_features: int, flow: TaskFlow, hidden: list[int] | None = None, dropout: float = 0.0
    ):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden or []:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            width = h
        if not hidden and dropout > 0:
            layers.append(nn.Dropout(dropout))
        self.trunk = nn.Sequential(*layers)
        # ModuleDict keys cannot contain dots; task paths can.
        self.outputs = nn.ModuleDict(
            {module_key(p): nn.Linear(width, t.num_outputs) for p, t in flow.tasks.items()}
        )
        self.paths = flow.leaf_paths
        # Binary and regression kinds give float[B], not float[B, 1] (the targets' shape).
        self.scalar = {p for p, t in flow.tasks.items() if t.num_outputs == 1}

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        if features.dim() == 4:
            features = features.mean(dim=(2, 3))
        z = self.trunk(features)
        out = {p: self.outputs[module_key(p)](z) for p in self.paths}
        return {p: v.squeeze(-1) if p in self.scalar else v for p, v in out.items()}
