"""Decoding with numpy: logits -> per-task answers with TaskFlow semantics, and the text trees of a flow.

Decisions follow the same rules as the torch flow (`headstart.flow`): binary and multilabel decide
`decision_scores(logit) > float32(threshold)`; multiclass takes the argmax; bounded_regression is sigmoid * scale,
regression the logit; conditions are taken from thresholded predictions, and a task whose condition is false is not
applicable (its value NaN, or None in the decoded rows).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from headstart.serve.flowspec import SCALAR_KINDS, FlowSpec, TaskSpec

# {task path: float[N] or float[N, C]}: numpy arrays, or anything np.asarray takes
Logits = Mapping[str, Any]


def flat(task: TaskSpec, logits: Any) -> np.ndarray:
    """float32 logits; scalar kinds' `[N, 1]` as `[N]`."""
    z = np.asarray(logits, dtype=np.float32)
    if task.kind in SCALAR_KINDS and z.ndim == 2 and z.shape[-1] == 1:
        return z[:, 0]
    return z


def decision_scores(logits: np.ndarray) -> np.ndarray:
    """float32 probabilities of binary and multilabel logits: the sigmoid of the float32 logit evaluated in float64
    and rounded once to float32, as `headstart.flow.decision_scores` (so a threshold decides alike everywhere)."""
    z = np.asarray(logits, dtype=np.float32).astype(np.float64)
    with np.errstate(over="ignore"):
        return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)


def _sigmoid32(z: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return (1.0 / (1.0 + np.exp(-z.astype(np.float32)))).astype(np.float32)


def probabilities(task: TaskSpec, logits: Any) -> np.ndarray | None:
    """Sigmoid (binary, multilabel, bounded_regression) or softmax (multiclass); None for regression."""
    z = flat(task, logits)
    if task.kind in ("binary", "multilabel"):
        return decision_scores(z)
    if task.kind == "multiclass":
        e = np.exp(z - z.max(axis=-1, keepdims=True))
        return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)
    if task.kind == "regression":
        return None
    return _sigmoid32(z)


def decide(task: TaskSpec, logits: Any, threshold: float | list[float] | None = None) -> np.ndarray:
    """The predicted value: binary bool[N], multiclass class index int[N], multilabel bool[N, C], bounded_regression
    sigmoid * scale, regression the logit. A NaN logit decides "no"."""
    z = flat(task, logits)
    if task.kind == "multiclass":
        return z.argmax(axis=-1)
    if task.kind in ("binary", "multilabel"):
        if threshold is None:
            threshold = task.default_threshold()
        return decision_scores(z) > np.asarray(threshold, dtype=np.float32)
    if task.kind == "bounded_regression":
        return _sigmoid32(z) * np.float32(task.scale)
    return z


def predictions(flow: FlowSpec, logits: Logits) -> dict[str, dict[str, np.ndarray]]:
    """{path: {"applicable": bool[N], "value": float32}}, conditions taken from thresholded predictions: the numpy
    twin of `TaskFlow.predict` (values in the targets' encoding, NaN where the task does not apply)."""
    decided = {p: decide(t, logits[p], flow.thresholds.get(p)) for p, t in flow.tasks.items()}
    present = {p: np.ones(len(v), dtype=bool) for p, v in decided.items()}
    value = {p: decided[p] for p, t in flow.tasks.items() if t.kind == "binary"}
    applicable = flow.holds(present, value)
    out = {}
    for path, v in decided.items():
        v = v.astype(np.float32)
        rows = applicable[path].reshape(-1, *([1] * (v.ndim - 1)))
        out[path] = {"applicable": applicable[path], "value": np.where(rows, v, np.float32(np.nan))}
    return out


def decode(flow: FlowSpec, logits: Logits) -> list[dict[str, dict[str, Any]]]:
    """One dict per sample: {task: {"applicable": bool, "value": decoded or None, "score": probability or None}}.

    value: binary True/False, multiclass the class name, multilabel the list of class names that are on, regression
    kinds a float. score: the probability of the decided class (binary: of "yes"), per class for multilabel, the
    sigmoid for bounded_regression, None for regression."""
    if not logits:
        return []
    n = len(next(iter(logits.values())))
    if n == 0:
        return []
    predicted = predictions(flow, logits)
    rows: list[dict[str, dict[str, Any]]] = [{} for _ in range(n)]
    for path, task in flow.tasks.items():
        probs = probabilities(task, logits[path])
        applicable = predicted[path]["applicable"].tolist()
        values = predicted[path]["value"]
        for i in range(n):
            if not applicable[i]:
                rows[i][path] = {"applicable": False, "value": None, "score": None}
                continue
            v = values[i]
            if task.kind == "binary":
                value: Any = bool(v)
                score: Any = float(probs[i])
            elif task.kind == "multiclass":
                value = task.classes[int(v)]
                score = float(probs[i, int(v)])
            elif task.kind == "multilabel":
                value = [c for c, on in zip(task.classes, v.tolist(), strict=True) if on]
                score = [float(p) for p in probs[i]]
            else:
                value = float(v)
                score = None if probs is None or np.isnan(value) else float(probs[i])
            rows[i][path] = {"applicable": True, "value": value, "score": score}
    return rows


# ---- text trees -------------------------------------------------------------------------------------------------------


def explain(flow: FlowSpec, logits: Logits, i: int) -> str:
    """Sample i's decisions as a text tree: each task that applies (by predictions) under the task its condition
    refers to (if several, the one decided last), with its decoded value, probability and logit::

        camera_blocked: no (p=0.269, logit=-1.000)
          door_open: yes (p=0.731, logit=1.000)
    """
    row = {p: flat(flow.tasks[p], v)[i : i + 1] for p, v in logits.items()}
    predicted = predictions(flow, row)
    applicable = [p for p in flow.leaf_paths if bool(predicted[p]["applicable"][0])]
    return indented(
        flow,
        applicable,
        lambda path: f"{path}: {_describe(flow.tasks[path], row[path], flow.thresholds.get(path))}",
    )


def tree(flow: FlowSpec) -> str:
    """The flow's questions as a text tree: each task under the task its condition refers to, with its kind, its
    classes or scale, and its condition::

        camera_blocked  binary
          door_open  binary  given ~camera_blocked
    """

    def line(path: str) -> str:
        task = flow.tasks[path]
        what = task.kind
        if task.classes:
            what += f" [{', '.join(task.classes)}]"
        elif task.scale is not None:
            what += f" (0..{task.scale:g})"
        given = flow.condition_text(path)
        return f"{path}  {what}" + (f"  given {given}" if given else "")

    return indented(flow, flow.leaf_paths, line)


def indented(flow: FlowSpec, paths: list[str], line: Callable[[str], str]) -> str:
    """`paths` as an indented tree: each under the task (among `paths`) its condition refers to; if it refers to
    several, the one decided last."""
    rank = {p: k for k, p in enumerate(flow.order)}
    children: dict[str | None, list[str]] = {}
    for path in paths:
        parents = [d for d in flow.depends_on(path) if d in paths]
        parent = max(parents, key=rank.__getitem__) if parents else None
        children.setdefault(parent, []).append(path)
    lines: list[str] = []

    def emit(parent: str | None, depth: int) -> None:
        for path in children.get(parent, []):
            lines.append("  " * depth + line(path))
            emit(path, depth + 1)

    emit(None, 0)
    return "\n".join(lines)


def _describe(task: TaskSpec, logit: np.ndarray, threshold: float | list[float] | None) -> str:
    """One decision as text; `logit` is one row (float[1] or float[1, C])."""
    value = decide(task, logit, threshold)[0]
    probs = probabilities(task, logit)
    z = logit[0]
    if task.kind == "binary":
        return f"{'yes' if bool(value) else 'no'} (p={float(probs[0]):.3f}, logit={float(z):.3f})"
    if task.kind == "multiclass":
        c = int(value)
        return f"{task.classes[c]} (p={float(probs[0, c]):.3f}, logit={float(z[c]):.3f})"
    if task.kind == "multilabel":
        on = ", ".join(name for name, v in zip(task.classes, value.tolist(), strict=True) if v) or "-"
        p = ", ".join(f"{float(x):.3f}" for x in probs[0])
        lg = ", ".join(f"{float(x):.3f}" for x in z)
        return f"{on} (p=[{p}], logit=[{lg}])"
    if task.kind == "bounded_regression":
        return f"{float(value):.3f} (p={float(probs[0]):.3f}, logit={float(z):.3f})"
    return f"{float(value):.3f} (logit={float(z):.3f})"
