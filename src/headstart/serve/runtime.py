"""ONNX Runtime sessions and the runners that turn a float32 batch into {task: logits}, with numpy only.

The PyTorch runner (and the adapter that gives torch tensors to training and evaluation) is
`headstart.core.runners`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

INPUT_NAME = "images"
FEATURES_NAME = "features"
LOGITS_PREFIX = "logits/"


def logits_name(path: str) -> str:
    """The ONNX output name of a task's logits (task paths may contain dots; ONNX names allow them)."""
    return LOGITS_PREFIX + path


def default_threads() -> int:
    """Threads for inference when none are given: the cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def ort_session(path: str | Path, threads: int | None = None, device: str = "cpu"):
    """An onnxruntime.InferenceSession with all graph optimizations, `threads` intra-op threads and one inter-op
    thread (sequential execution: the graph is one chain, parallel execution only adds scheduling)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = int(threads or default_threads())
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(str(path), sess_options=options, providers=providers)


class OnnxRunner:
    """Runs an exported headstart model (outputs `features` and `logits/<task>`) with ONNX Runtime."""

    runtime = "onnxruntime"

    def __init__(
        self, path: str | Path, tasks: list[str], threads: int | None = None, device: str = "cpu"
    ) -> None:
        """`device` "cuda" runs on ONNX Runtime's CUDA provider where it is installed (onnxruntime-gpu), else on the
        CPU: `self.session.get_providers()[0]` says which."""
        self.path = Path(path)
        self.threads = int(threads or default_threads())
        self.session = ort_session(self.path, self.threads, device)
        self.tasks = list(tasks)
        self._outputs = [FEATURES_NAME, *(logits_name(t) for t in self.tasks)]

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """{output name: array} for a float32 batch."""
        values = self.session.run(self._outputs, {INPUT_NAME: np.ascontiguousarray(images, dtype=np.float32)})
        return dict(zip(self._outputs, values, strict=True))

    def __call__(self, images: Any) -> dict[str, np.ndarray]:
        """{task path: logits} for a float32 batch [B, 3, H, W] (a numpy array, or anything np.asarray takes)."""
        out = self.run(np.asarray(images))
        return {t: out[logits_name(t)] for t in self.tasks}


class HeadRunner:
    """Runs a head-only ONNX graph (input `features`, outputs `logits/<task>`) with ONNX Runtime."""

    runtime = "onnxruntime"

    def __init__(self, path: str | Path, tasks: list[str], threads: int | None = None) -> None:
        self.threads = int(threads or default_threads())
        self.session = ort_session(path, self.threads)
        self.tasks = list(tasks)

    def __call__(self, features: Any) -> dict[str, np.ndarray]:
        """{task path: logits} for float32 features [B, D]."""
        names = [logits_name(t) for t in self.tasks]
        values = self.session.run(names, {FEATURES_NAME: np.ascontiguousarray(features, dtype=np.float32)})
        return dict(zip(self.tasks, values, strict=True))
