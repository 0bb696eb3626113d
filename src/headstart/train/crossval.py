"""The cross-validation summary of a sweep: when its jobs differ in `data.fold`, each metric's mean ± std over the
folds, one row per setting of the other swept overrides (`-m data.fold=0,1,2 data.folds=3 model.dropout=0,0.2`
gives two rows, each over three folds)."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pandas as pd

from headstart.tables import markdown_table

log = logging.getLogger(__name__)

FOLD_KEY = "data.fold"
FOLDS_CSV = "folds.csv"
_DIGITS = 4


def _fold_column(table: pd.DataFrame) -> str | None:
    """The summary's column of `data.fold` (also when given as `+data.fold`), or None."""
    return next((c for c in table.columns if str(c).lstrip("+") == FOLD_KEY), None)


def _fold_number(value: object) -> float:
    try:
        return float(str(value))
    except ValueError:
        return math.inf


def fold_summary(table: pd.DataFrame, monitor: str | None = None, mode: str = "min") -> pd.DataFrame | None:
    """Mean and sample standard deviation (n - 1) of every metric over the folds, per setting of the other
    overrides; None unless `data.fold` varies across the jobs of `table` (a sweep summary: job, overrides,
    status, metrics). Columns: the other overrides, `n` (folds that finished), `folds` (which), then
    `<metric> mean` and `<metric> std`. Failed jobs count in no statistic; best `monitor` mean first."""
    fold = _fold_column(table)
    if fold is None or table[fold].nunique() < 2:
        return None
    metrics = [c for c in table.columns if "/" in str(c) and pd.api.types.is_numeric_dtype(table[c])]
    metrics.sort(key=lambda m: (m != monitor, not str(m).startswith("val/")))  # monitor, val, test (stable)
    keys = [c for c in table.columns if c not in ("job", "status", fold) and "/" not in str(c)]
    groups = table.groupby(keys, dropna=False, sort=False) if keys else [((), table)]
    rows = []
    for values, jobs in groups:
        values = values if isinstance(values, tuple) else (values,)
        done = jobs[jobs["status"] == "ok"]
        row: dict[str, object] = dict(zip(keys, values, strict=True))
        row["n"] = len(done)
        row["folds"] = ",".join(str(f) for f in sorted(done[fold], key=_fold_number))
        for m in metrics:
            row[f"{m} mean"] = done[m].mean()
            row[f"{m} std"] = done[m].std(ddof=1)
        rows.append(row)
    out = pd.DataFrame(rows)
    if monitor is not None and f"{monitor} mean" in out:
        out = out.sort_values(f"{monitor} mean", ascending=(mode == "min"), na_position="last")
    return out.reset_index(drop=True)


def _pm(mean: float, std: float) -> str:
    if math.isnan(mean):
        return ""
    return f"{mean:.{_DIGITS}f}" if math.isnan(std) else f"{mean:.{_DIGITS}f} ± {std:.{_DIGITS}f}"


def fold_markdown(summary: pd.DataFrame, monitor: str | None = None) -> str:
    """The fold summary as a markdown table with one `mean ± std` cell per quality metric: `monitor` and the val/
    and test/ metrics (cost and DoF timings, the same model measured again, stay in folds.csv)."""
    metrics = [c[: -len(" mean")] for c in summary.columns if str(c).endswith(" mean")]
    quality = [m for m in metrics if m == monitor or m.startswith(("val/", "test/"))]
    metrics = quality or metrics
    shown = summary[[c for c in summary.columns if not str(c).endswith((" mean", " std"))]].copy()
    for m in metrics:
        shown[m] = [_pm(a, b) for a, b in zip(summary[f"{m} mean"], summary[f"{m} std"], strict=True)]
    return markdown_table(shown, digits=_DIGITS)


def write_fold_summary(
    sweep_dir: Path, table: pd.DataFrame, monitor: str | None = None, mode: str = "min"
) -> pd.DataFrame | None:
    """For a k-fold sweep: write folds.csv, add a cross-validation section to summary.md and log the table.
    Nothing happens (None) when the jobs do not differ in data.fold."""
    summary = fold_summary(table, monitor, mode)
    if summary is None:
        return None
    summary.to_csv(sweep_dir / FOLDS_CSV, index=False)
    text = fold_markdown(summary, monitor)
    section = (
        "\n## Cross-validation\n\nEach metric's mean ± sample standard deviation over the folds (`n` finished, "
        f"`folds` which), one row per setting of the other swept overrides; every metric in {FOLDS_CSV}.\n\n"
        + text
    )
    with open(sweep_dir / "summary.md", "a") as f:
        f.write(section)
    log.info("cross-validation over %s (mean ± std):\n%s", FOLD_KEY, text)
    return summary
