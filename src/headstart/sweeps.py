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

log = logging.getLogger(__name__)

BEST_EXPERIMENT = "best_experiment.yaml"
# Overrides that say where and how a job ran, not what model it trains: left out of the best experiment.
_RUN_ONLY_PREFIXES = ("hydra.", "hydra/", "paths.")
_RUN_ONLY_GROUPS = ("hparams_search", "experiment")


def _job_dirs(sweep_dir: Path) -> list[Path]:
    jobs = [p for p in sweep_dir.iterdir() if (p / ".hydra" / "overrides.yaml").is_file()]
    return sorted(jobs, key=lambda p: (0, int(p.name), "") if p.name.isdigit() else (1, 0, p.name))


def summarize_sweep(sweep_dir: Path) -> pd.DataFrame | None:
    """Read each job's overrides and metrics.json under `sweep_dir`; write summary.csv and summary.md there, and
    best_experiment.yaml for the best job that finished (see `write_best_experiment`)."""
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
    table.to_csv(sweep_dir / "summary.csv", index=False)
    (sweep_dir / "summary.md").write_text(
        f"# Sweep summary\n\nSorted by `{monitor}` ({mode}), best first.\n\n" + markdown_table(table)
    )
    best = _best_job(table, monitor)
    if best is not None:
        write_best_experiment(sweep_dir / best, sweep_dir / BEST_EXPERIMENT)
    return table


def _best_job(table: pd.DataFrame, monitor: str | None) -> str | None:
    """The name of the first (best) job that finished with a value of the monitored metric."""
    if monitor not in table:
        return None
    done = table[(table["status"] == "ok") & table[monitor].notna()]
    return None if done.empty else str(done.iloc[0]["job"])


def _raw(config: DictConfig, key: str) -> Any:
    """The value at dotted `key` as the job's config.yaml stores it (interpolations left as written)."""
    node: Any = OmegaConf.to_container(config, resolve=False)
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def best_experiment_text(job_dir: Path) -> str:
    """A `# @package _global_` experiment file that reproduces the job in `job_dir`: its experiment as the base,
    the config groups it chose on the command line as `override /group: option`, and every value it set
    (swept or given) as it was in the job's config. Where and how the job ran (paths.*, hydra.*, hparams_search)
    is left out, and so are the search's own settings: the file trains the same model outside the search."""
    hydra_dir = job_dir / ".hydra"
    overrides = [str(o) for o in OmegaConf.load(hydra_dir / "overrides.yaml")]
    config = OmegaConf.load(hydra_dir / "config.yaml")
    choices = OmegaConf.load(hydra_dir / "hydra.yaml").hydra.runtime.choices
    base = choices.get("experiment")

    added: list[str] = []
    overridden: list[str] = []
    values = OmegaConf.create({})
    skipped: list[str] = []
    for override in overrides:
        key = override.split("=", 1)[0]
        if override.startswith("~") or "=" not in override or "@" in key:
            skipped.append(override)  # deletions and package overrides have no plain YAML form here
            continue
        plain_key = key.lstrip("+")
        if plain_key.startswith(_RUN_ONLY_PREFIXES) or plain_key in _RUN_ONLY_GROUPS:
            continue
        if plain_key in choices:  # a config group
            option = choices[plain_key]
            if key.startswith("+"):
                added.append(f"/{plain_key}: {option}")
            else:
                overridden.append(f"override /{plain_key}: {option}")
            continue
        OmegaConf.update(values, plain_key, _raw(config, plain_key), force_add=True)
    OmegaConf.update(values, "name", f"{config.name}_best", force_add=True)

    defaults = ([base] if base else []) + added + overridden
    metrics_file = job_dir / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    value = metrics.get(config.monitor.metric)
    score = f"{value:.6g}" if isinstance(value, int | float) and not math.isnan(value) else "n/a"
    lines = [
        "# @package _global_",
        f"# The best job of the sweep {job_dir.parent} (job {job_dir.name}, {config.monitor.metric} = {score}).",
        "# Copy it to conf/experiment/<name>.yaml and train it with: python train.py experiment=<name>",
    ]
    if skipped:
        lines.append(f"# Not reproduced (deletions, package overrides): {' '.join(skipped)}")
    if defaults:
        lines += ["defaults:", *(f"  - {d}" for d in defaults), ""]
    lines.append(OmegaConf.to_yaml(values).rstrip())
    return "\n".join(lines) + "\n"


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
