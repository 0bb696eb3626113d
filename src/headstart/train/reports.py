"""Tables for people: per-task metrics as markdown and CSV."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from headstart.tables import markdown_table


def task_metrics_table(metrics: dict[str, float], stage: str, tasks: dict[str, str]) -> pd.DataFrame:
    """One row per task (`tasks`: {path: kind}, in flow order) from `<stage>/<path>/<metric>` values."""
    rows = []
    for path, kind in tasks.items():
        prefix = f"{stage}/{path}/"
        values = {k[len(prefix) :]: v for k, v in metrics.items() if k.startswith(prefix)}
        if values:
            rows.append({"task": path, "kind": kind, **values})
    frame = pd.DataFrame(rows)
    if "count" in frame:
        frame["count"] = frame["count"].astype("Int64")
        frame = frame[
            ["task", "kind", "count", *[c for c in frame.columns if c not in ("task", "kind", "count")]]
        ]
    return frame


def write_task_tables(
    metrics: dict[str, float], stage: str, tasks: dict[str, str], out_dir: Path
) -> Path | None:
    """`<stage>_metrics.md` and `.csv` in `out_dir`; returns the markdown path (None when there is nothing)."""
    frame = task_metrics_table(metrics, stage, tasks)
    if frame.empty:
        return None
    frame.to_csv(out_dir / f"{stage}_metrics.csv", index=False)
    md = out_dir / f"{stage}_metrics.md"
    md.write_text(
        f"# {stage} metrics per task\n\nOn the samples where each task applies by ground truth.\n\n"
        + markdown_table(frame.fillna(""))
    )
    return md


def final_metrics_table(
    metrics: dict[str, float], conditional: set[str] | frozenset[str] = frozenset()
) -> str:
    """The final metrics as one markdown table, rounded: a row per metric (the loss first), a column per split (val,
    test); without row counts, and without the end-to-end accuracy of tasks that have no condition (not in
    `conditional`: it is their accuracy again). What the console prints once at the end of a run and TensorBoard's
    `summary` text shows."""
    rows: dict[str, dict[str, float]] = {"loss": {}}
    for name, value in metrics.items():
        split, _, rest = name.partition("/")
        path, _, metric = rest.rpartition("/")
        if split not in ("val", "test") or not rest or metric == "count":
            continue
        if metric == "e2e_acc" and path not in conditional:
            continue
        rows.setdefault(rest, {})[split] = value
    rows = {name: v for name, v in rows.items() if v}
    frame = pd.DataFrame(
        [[name, v.get("val", math.nan), v.get("test", math.nan)] for name, v in rows.items()],
        columns=["metric", "val", "test"],
    )
    return markdown_table(frame)
