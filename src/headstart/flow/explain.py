"""`TaskFlow.explain`: one sample's decisions as a text tree.

Each task that applies (by predictions) sits under the task its condition refers to (if it refers to several, the
one decided last), with its decoded value, probability and logit; tasks that do not apply are left out::

    camera_blocked: no (p=0.269, logit=-1.000)
      door_open: yes (p=0.731, logit=1.000)
        person_present: yes (p=0.881, logit=2.000)
          person.face_x1: 32.000 (p=0.500, logit=0.000)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from headstart.flow.flow import TaskFlow
    from headstart.flow.tasks import Task


def explain(flow: TaskFlow, logits: Mapping[str, torch.Tensor], i: int) -> str:
    row = {p: flow.tasks[p].flat(v.detach())[i : i + 1].float().cpu() for p, v in logits.items()}
    predicted = flow.predict(row)
    applicable = [p for p in flow.leaf_paths if bool(predicted[p]["applicable"][0])]
    return _indented(
        flow,
        applicable,
        lambda path: f"{path}: {_describe(flow.tasks[path], row[path][0], flow.thresholds.get(path))}",
    )


def tree(flow: TaskFlow) -> str:
    """The flow's questions as a text tree: each task under the task its condition refers to, with its kind, its
    classes or scale, and its condition::

        camera_blocked  binary
          door_open  binary  given ~camera_blocked
            door_locked  binary  given ~door_open
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

    return _indented(flow, flow.leaf_paths, line)


def _indented(flow: TaskFlow, paths: list[str], line: Callable[[str], str]) -> str:
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


def _describe(task: Task, logit: torch.Tensor, threshold: float | list[float] | None) -> str:
    value = task.decode(logit.unsqueeze(0), threshold)[0]
    probs = task.probabilities(logit.unsqueeze(0))
    if task.kind == "binary":
        return f"{'yes' if bool(value) else 'no'} (p={float(probs[0]):.3f}, logit={float(logit):.3f})"
    if task.kind == "multiclass":
        c = int(value)
        return f"{task.classes[c]} (p={float(probs[0, c]):.3f}, logit={float(logit[c]):.3f})"
    if task.kind == "multilabel":
        on = ", ".join(name for name, v in zip(task.classes, value.tolist(), strict=True) if v) or "-"
        p = ", ".join(f"{float(x):.3f}" for x in probs[0])
        lg = ", ".join(f"{float(x):.3f}" for x in logit)
        return f"{on} (p=[{p}], logit=[{lg}])"
    if task.kind == "bounded_regression":
        return f"{float(value):.3f} (p={float(probs[0]):.3f}, logit={float(logit):.3f})"
    return f"{float(value):.3f} (logit={float(logit):.3f})"
