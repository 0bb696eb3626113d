"""Runners that give torch tensors: PyTorch eager mode, and any numpy runner (ONNX Runtime, Predictor) adapted.

Training, evaluation, pruning and speed measurements work on torch tensors; `headstart.serve.runtime` runs ONNX
Runtime on numpy only (serving has no torch). `as_torch` bridges the two.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np
import torch


class Runner(Protocol):
    """Anything that maps a float batch [B, 3, H, W] to {task path: logits} (torch tensors on the CPU)."""

    runtime: str
    threads: int

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]: ...


class TorchRunner:
    """Runs a HeadstartModel in PyTorch eager mode, in eval mode and without gradients."""

    runtime = "pytorch"

    def __init__(self, model: torch.nn.Module, threads: int | None = None, device: str = "cpu") -> None:
        self.model = model.eval().to(device)
        self.device = torch.device(device)
        self.threads = int(threads or torch.get_num_threads())

    def __call__(self, images: torch.Tensor | np.ndarray) -> dict[str, torch.Tensor]:
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(images)
        with torch.inference_mode():
            out: Mapping[str, torch.Tensor] = self.model(images.to(self.device, torch.float32))
        return {k: v.float().cpu() for k, v in out.items()}


class TorchOutputs:
    """A numpy runner (`OnnxRunner`, `HeadRunner`, `Predictor`) seen as a `Runner`: torch in, torch out. Other
    attributes (session, path, tasks, run, ...) are the wrapped runner's."""

    def __init__(self, runner: Callable[[np.ndarray], Mapping[str, np.ndarray]]) -> None:
        self.inner = runner

    def __call__(self, images: torch.Tensor | np.ndarray) -> dict[str, torch.Tensor]:
        if isinstance(images, torch.Tensor):
            images = images.detach().cpu().numpy()
        return {k: torch.from_numpy(np.asarray(v)) for k, v in self.inner(images).items()}

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)


def as_torch(runner: Any) -> Any:
    """`runner` itself when it already gives torch tensors (runtime "pytorch"), else wrapped in TorchOutputs."""
    return (
        runner
        if getattr(runner, "runtime", None) == "pytorch" or isinstance(runner, TorchOutputs)
        else TorchOutputs(runner)
    )
