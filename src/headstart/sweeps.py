"""The sweep summary: after a multirun, one table of every job's overrides and final metrics, best first."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from headstart.tables import markdown_table

log = logging.getLogger(__name__)


def summarize_sweep(sweep_dir: Path) -> pd.DataFrame | None:
    """Read each job's overrides and metrics.json under `sweep_dir`; write summary.csv and summary.md there."""
    rows = []
    monitor, mode = None, "min"
    for job in sorted(p for p in sweep_dir.iterdir() if (p / ".hydra" / "overrides.yaml").is_file()):
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
    table.to_csv(sweep_dir / "summary.csv", index=False)
    (sweep_dir / "summary.md").write_text(
        f"# Sweep summary\n\nSorted by `{monitor}` ({mode}), best first.\n\n" + markdown_table(table)
    )
    return table


class SweepSummary(Callback):
    """Hydra callback: writes the sweep summary when a multirun ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if sweep_dir.is_dir() and summarize_sweep(sweep_dir) is not None:
            log.info("sweep summary: %s", sweep_dir / "summary.md")
