"""The sweep summary: after a multirun (a grid sweep or an Optuna search), one table of every job's overrides and
final metrics, best first, and the best job written out as a ready-to-run experiment file."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import pandas as pd
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from headstart.tables import markdown_table
from headstart.train.crossval import FOLD_KEY, write_fold_summary
from headstart.train.reproduce import experiment_text

log = logging.getLogger(__name__)

BEST_EXPERIMENT = "best_experiment.yaml"
FOLD_KEYS = (FOLD_KEY, "data.folds")


def _job_dirs(sweep_dir: Path) -> list[Path]:
    jobs = [p for p in sweep_dir.iterdir() if (p / ".hydra" / "overrides.yaml").is_file()]
    return sorted(jobs, key=lambda p: (0, int(p.name), "") if p.name.isdigit() else (1, 0, p.name))


def sweep_table(sweep_dir: Path) -> tuple[pd.DataFrame, str | None, str] | None:
    """Every job under `sweep_dir` as a row (its overrides that differ between jobs, `status` ok or failed, its
    final metrics), best first by the monitored metric; with that metric and its mode. None when there is no job."""
    rows = []
    monitor, mode = None, "min"
    for job in _job_dirs(sweep_dir):
        overrides = OmegaConf.load(job / ".hydra" / "overrides.yaml")
        config = OmegaConf.load(job / ".hydra" / "config.yaml")
        monitor, mode = config.monitor.metric, config.monitor.mode
        metrics_file = job / "metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        row: dict[str, Any] = {"job": job.name}
        row.update(dict(o.split("=", 1) for o in overrides if "=" in o))
        row["status"] = "ok" if metrics else "failed"
        row.update(
            {k: v for k, v in metrics.items() if isinstance(v, int | float) and not k.endswith("/count")}
        )
        rows.append(row)
    if not rows:
        return None
    table = pd.DataFrame(rows)
    override_keys = [c for c in table.columns[1:] if c != "status" and "/" not in c]
    constant = [k for k in override_keys if table[k].nunique(dropna=False) == 1]
    table = table.drop(columns=constant)  # the same in every job: not what the sweep compares
    if monitor in table:
        table = table.sort_values(monitor, ascending=(mode == "min"), na_position="last")
    return table, monitor, mode


def summarize_sweep(sweep_dir: Path) -> pd.DataFrame | None:
    """Read each job's overrides and metrics.json under `sweep_dir` (`sweep_table`); write summary.csv and
    summary.md there, and best_experiment.yaml for the best job that finished (see `write_best_experiment`)."""
    found = sweep_table(sweep_dir)
    if found is None:
        return None
    table, monitor, mode = found
    table.to_csv(sweep_dir / "summary.csv", index=False)
    (sweep_dir / "summary.md").write_text(
        f"# Sweep summary\n\nSorted by `{monitor}` ({mode}), best first.\n\n" + markdown_table(table)
    )
    folds = write_fold_summary(
        sweep_dir, table, monitor, mode
    )  # k-fold: mean ± std over data.fold (folds.csv)
    if folds is None:
        best = best_job(table, monitor)
        if best is not None:
            write_best_experiment(sweep_dir / best, sweep_dir / BEST_EXPERIMENT)
    else:
        best = best_fold_setting_job(table, folds)
        if best is not None:
            path = sweep_dir / BEST_EXPERIMENT
            path.write_text(best_experiment_text(sweep_dir / best, leave_out=FOLD_KEYS))
    return table


def best_job(table: pd.DataFrame, monitor: str | None) -> str | None:
    """The name of the first (best) job of a `sweep_table` that finished with a value of the monitored metric."""
    if monitor not in table:
        return None
    done = table[(table["status"] == "ok") & table[monitor].notna()]
    return None if done.empty else str(done.iloc[0]["job"])


def best_fold_setting_job(table: pd.DataFrame, folds: pd.DataFrame) -> str | None:
    """A finished job of the setting with the best mean over the folds (the fold summary's first row)."""
    keys = [c for c in folds.columns if c not in ("n", "folds") and not str(c).endswith((" mean", " std"))]
    for _, setting in folds.iterrows():
        jobs = table[table["status"] == "ok"]
        for key in keys:
            jobs = jobs[(jobs[key] == setting[key]) | (jobs[key].isna() & pd.isna(setting[key]))]
        if not jobs.empty:
            return str(jobs.iloc[0]["job"])
    return None


def best_experiment_text(job_dir: Path, leave_out: tuple[str, ...] = ()) -> str:
    """The best job as a ready experiment file (see `headstart.train.reproduce.experiment_text`), named `<name>_best`.
    `leave_out`: override keys not to reproduce (a k-fold sweep's data.fold/data.folds: the setting that was best
    on average over the folds, trained once with the usual validation split)."""
    config = OmegaConf.load(job_dir / ".hydra" / "config.yaml")
    metrics_file = job_dir / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    value = metrics.get(config.monitor.metric)
    score = f"{value:.6g}" if isinstance(value, int | float) and not math.isnan(value) else "n/a"
    if leave_out:
        header = [
            f"The best setting of the cross-validation sweep {job_dir.parent} by mean {config.monitor.metric} over "
            f"the folds (from job {job_dir.name}), without {', '.join(leave_out)}."
        ]
    else:
        header = [
            f"The best job of the sweep {job_dir.parent} (job {job_dir.name}, {config.monitor.metric} = {score})."
        ]
    return experiment_text(job_dir, header, name=f"{config.name}_best", leave_out=leave_out)


def write_best_experiment(job_dir: Path, path: Path) -> Path:
    path.write_text(best_experiment_text(job_dir))
    return path


class SweepSummary(Callback):
    """Hydra callback: writes the sweep summary and the best experiment when a multirun ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if sweep_dir.is_dir() and summarize_sweep(sweep_dir) is not None:
            log.info("sweep summary: %s", sweep_dir / "summary.md")
            if (sweep_dir / BEST_EXPERIMENT).is_file():
                log.info("best job as an experiment file: %s", sweep_dir / BEST_EXPERIMENT)
