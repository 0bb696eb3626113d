"""The model zoo: every train.py run under some folders as one row of `zoo.md` and `zoo.csv`, with the config that
reproduces it, its checkpoint, bundle and ONNX file, its cost and headline metrics and its TensorBoard logs;
`--verify` measures every row's metrics again and flags those that moved.

    python -m headstart.tools.zoo outputs multirun [--out DIR] [--verify] [--tolerance 1e-4] [--accelerator cpu]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import re
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from headstart.errors import ConfigError, HeadstartError
from headstart.tables import markdown_table
from headstart.tools.remeasure import STAGES, metric_value, moved_metrics, remeasure
from headstart.train.reproduce import experiment_file, experiment_text

ZOO_MD, ZOO_CSV, CONFIGS = "zoo.md", "zoo.csv", "zoo_configs"
WRITTEN_BY = (
    "Written by python -m headstart.tools.zoo"  # marks the config files the zoo owns (and may replace)
)
# Measured: re-evaluating an untouched run on CPU reproduces metrics.json exactly (0 difference, 1 or 2 threads);
# fp32 reductions in another order move a loss by ~1e-7. 1e-4 stays far above that and below one changed decision
# in 10,000 test samples.
DEFAULT_TOLERANCE = 1e-4
COST = ("params", "params_trainable", "macs", "torch_ms", "onnx_ms")  # metrics.json keys cost/<name>
STAMP = re.compile(r"^\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}(_\d+)?$")  # _2, _3: runs started in the same second
HEADLINE = re.compile(r"^test/(?P<task>.+)/(?P<metric>acc|f1)$")

log = logging.getLogger(__name__)


@dataclass
class Run:
    """A finished train.py run directory, as read from disk."""

    path: Path
    config: DictConfig  # .hydra/config.yaml, unresolved
    metrics: dict[str, Any]
    cwd: Path | None  # where it was started (relative paths in its config are from there)

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def on_features(self) -> bool:
        return bool(self.config.get("features"))

    @property
    def monitor(self) -> str:
        return str(OmegaConf.select(self.config, "monitor.metric", default="val/loss"))

    @property
    def mode(self) -> str:
        return str(OmegaConf.select(self.config, "monitor.mode", default="min"))


# ---- finding runs ---------------------------------------------------------------------------------------------------


def _candidates(top: Path) -> Iterator[Path]:
    """Folders under `top` (itself included) holding `.hydra/`; neither their insides nor hidden folders are searched."""
    for folder, subfolders, _ in os.walk(top):
        if ".hydra" in subfolders:
            subfolders.clear()
            yield Path(folder)
        else:
            subfolders[:] = sorted(s for s in subfolders if not s.startswith("."))


def read_run(path: Path) -> Run | str:
    """The run in `path`, or why it is not a zoo entry (another script's run, unfinished, no checkpoint)."""
    hydra_dir = path / ".hydra"
    if not (hydra_dir / "hydra.yaml").is_file() or not (hydra_dir / "config.yaml").is_file():
        return "no .hydra/hydra.yaml or config.yaml"
    hydra = OmegaConf.load(hydra_dir / "hydra.yaml").hydra
    job = OmegaConf.select(hydra, "job.name", default=None)
    if job != "train":
        return f"{job}.py run, not train.py"
    metrics_file = path / "metrics.json"
    if not metrics_file.is_file():
        return "no metrics.json (failed, still running, or test=false)"
    try:
        metrics = json.loads(metrics_file.read_text())
    except ValueError:
        return "metrics.json is not valid JSON"
    if not isinstance(metrics, dict):
        return "metrics.json is not valid JSON"
    if not (path / "checkpoints" / "best.ckpt").is_file():
        return "no checkpoints/best.ckpt"
    cwd = OmegaConf.select(hydra, "runtime.cwd", default=None)
    return Run(path, OmegaConf.load(hydra_dir / "config.yaml"), metrics, Path(cwd) if cwd else None)


def find_runs(dirs: Sequence[Path]) -> tuple[list[Run], Counter[str]]:
    """Every finished train.py run under `dirs` (each once), and how many folders were skipped for which reason."""
    runs: dict[Path, Run] = {}
    skipped: Counter[str] = Counter()
    for top in dirs:
        if not top.is_dir():
            raise ConfigError(
                f"{top}: no such folder; pass the folders that hold runs, e.g. outputs multirun"
            )
        for folder in _candidates(top):
            key = folder.resolve()
            if key in runs:
                continue
            run = read_run(folder)
            if isinstance(run, str):
                skipped[run] += 1
            else:
                runs[key] = run
    return list(runs.values()), skipped


# ---- rows -----------------------------------------------------------------------------------------------------------


def _stamp(run: Path) -> tuple[str, str]:
    """(id part, date) from Hydra's `<date>_<time>` run folder or `<date>_<time>/<job>` sweep folder; otherwise the
    folder's name and the time its config was written."""
    if STAMP.match(run.name):
        stamp = run.name
    elif STAMP.match(run.parent.name):
        stamp = f"{run.parent.name}_{run.name}"
    else:
        written = dt.datetime.fromtimestamp((run / ".hydra" / "config.yaml").stat().st_mtime)
        return run.name, written.strftime("%Y-%m-%d %H:%M:%S")
    day, time = stamp[:10], stamp[11:19].replace("-", ":")
    return stamp, f"{day} {time}"


def _rel(path: Path | None, out: Path) -> str:
    """`path` relative to the zoo's folder (so that zoo.md's links work); empty when there is nothing there."""
    if path is None or not path.exists():
        return ""
    return os.path.relpath(path.resolve(), out.resolve())


def headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """Test loss, accuracy and F1. Accuracy and F1 are the task's own, or for a multi-task flow their mean over the
    tasks that have them (binary, multiclass, multilabel; `headline_tasks` says how many); every task's own values
    are in the run's test_metrics.md."""
    found: dict[str, dict[str, float]] = {"acc": {}, "f1": {}}
    for key, value in metrics.items():
        match = HEADLINE.match(key)
        if match and (number := metric_value(value)) is not None:
            found[match["metric"]][match["task"]] = number
    acc, f1 = found["acc"], found["f1"]
    return {
        "test_loss": metric_value(metrics.get("test/loss")),
        "test_acc": sum(acc.values()) / len(acc) if acc else None,
        "test_f1": sum(f1.values()) / len(f1) if f1 else None,
        "headline_tasks": len(acc.keys() | f1.keys()) or None,
    }


def _unique(name: str, taken: set[str]) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "run"
    candidate, n = name, 2
    while candidate in taken:
        candidate, n = f"{name}_{n}", n + 1
    taken.add(candidate)
    return candidate


def zoo_row(run: Run, row_id: str, date: str, out: Path) -> dict[str, Any]:
    """One zoo row; writes the run's ready experiment file under `out/zoo_configs/` unless an experiment file alone
    reproduces it."""
    config = experiment_file(run.path)
    if config is None:
        monitored = metric_value(run.metrics.get(run.monitor))
        score = "n/a" if monitored is None else f"{monitored:.6g}"
        config = out / CONFIGS / f"{row_id}.yaml"
        config.parent.mkdir(parents=True, exist_ok=True)
        header = [f"{WRITTEN_BY}: reproduces the run {run.path.resolve()} ({run.monitor} = {score})."]
        config.write_text(experiment_text(run.path, header))
    image_model = run.checkpoints / "image_model.ckpt"
    best = run.checkpoints / "best.ckpt"
    cost = {name: metric_value(run.metrics.get(f"cost/{name}")) for name in COST}
    return {
        "id": row_id,
        "experiment": str(run.config.get("name", "")),
        "date": date,
        "trained_on": "features" if run.on_features else "images",
        "config": _rel(config, out),
        "checkpoint": _rel(image_model if image_model.is_file() else best, out),
        "head_checkpoint": _rel(best, out) if run.on_features else "",
        "bundle": _rel(run.path / "bundle", out),
        "onnx": _rel(run.path / "model.onnx", out),
        "tensorboard": _rel(run.path / "tensorboard", out),
        "run": _rel(run.path, out),
        **cost,
        "monitor": run.monitor,
        "monitor_mode": run.mode,
        "monitor_value": metric_value(run.metrics.get(run.monitor)),
        **headline(run.metrics),
    }


def zoo_rows(runs: Sequence[Run], out: Path) -> list[tuple[Run, dict[str, Any]]]:
    """Rows sorted by experiment, newest first within one, each with its run."""
    dated = sorted(((run, *_stamp(run.path)) for run in runs), key=lambda r: r[2], reverse=True)
    dated.sort(key=lambda r: str(r[0].config.get("name", "")))
    taken: set[str] = set()
    return [
        (run, zoo_row(run, _unique(f"{run.config.get('name', 'run')}_{stamp}", taken), date, out))
        for run, stamp, date in dated
    ]


def _remove_stale_configs(out: Path, keep: set[str]) -> None:
    folder = out / CONFIGS
    for file in folder.glob("*.yaml") if folder.is_dir() else []:
        if file.name not in keep and WRITTEN_BY in file.read_text():
            file.unlink()


# ---- verification ---------------------------------------------------------------------------------------------------


def verify_run(run: Run, tolerance: float, accelerator: str) -> tuple[str, bool]:
    """(the row's verify cell, whether it passed): the run's val/test metrics measured again against metrics.json."""
    stages = tuple(s for s in STAGES if any(k.startswith(f"{s}/") for k in run.metrics))
    if not stages:
        return "not verified: metrics.json has no val/ or test/ metrics", False
    try:
        now = remeasure(run.checkpoints / "best.ckpt", stages, cwd=run.cwd, accelerator=accelerator)
    except (HeadstartError, OSError) as e:
        return "not verified: " + " ".join(str(e).split()), False  # one line: it is a table cell
    moved = moved_metrics(run.metrics, now, tolerance, stages)
    if moved:
        return "MOVED: " + "; ".join(str(m) for m in moved), False
    checked = sum(1 for k in run.metrics if k.split("/", 1)[0] in stages)
    return f"ok ({checked} metrics)", True


# ---- writing --------------------------------------------------------------------------------------------------------


def _link(text: str, target: str) -> str:
    if not target:
        return ""
    return f"[{text}](<{target}>)" if " " in target else f"[{text}]({target})"


def _fmt(value: Any, digits: int = 4) -> str:
    number = metric_value(value)
    return "" if number is None else f"{number:.{digits}g}"


def _count(value: Any) -> str:
    number = metric_value(value)
    if number is None:
        return ""
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(number) >= div:
            return f"{number / div:.3g}{unit}"
    return f"{number:.0f}"


def _markdown_row(row: dict[str, Any]) -> dict[str, str]:
    many = (row["headline_tasks"] or 1) > 1
    mean = f" (mean of {row['headline_tasks']} tasks)" if many else ""
    checkpoint = _link(Path(row["checkpoint"]).name, row["checkpoint"])
    if row["head_checkpoint"]:
        checkpoint += f" (head: {_link('best.ckpt', row['head_checkpoint'])})"
    out = {
        "experiment": row["experiment"],
        "model": _link(row["id"], row["run"]),
        "date": row["date"],
        "trained on": row["trained_on"],
        "config": _link(Path(row["config"]).name, row["config"]),
        "checkpoint": checkpoint,
        "bundle": _link("bundle", row["bundle"]),
        "onnx": _link("model.onnx", row["onnx"]),
        "TensorBoard": _link("tensorboard", row["tensorboard"]),
        "params": _count(row["params"]),
        "trainable": _count(row["params_trainable"]),
        "MACs": _count(row["macs"]),
        "torch ms": _fmt(row["torch_ms"], 3),
        "onnx ms": _fmt(row["onnx_ms"], 3),
        "monitor": f"{row['monitor']} {_fmt(row['monitor_value'])}",
        "test loss": _fmt(row["test_loss"]),
        "test acc": _fmt(row["test_acc"]) + (mean if row["test_acc"] is not None else ""),
        "test F1": _fmt(row["test_f1"]) + (mean if row["test_f1"] is not None else ""),
    }
    if "verify" in row:
        out["verify"] = row["verify"]
    return out


def write_zoo(
    rows: Sequence[dict[str, Any]], out: Path, command: str, skipped: Counter[str]
) -> tuple[Path, Path]:
    """zoo.csv (every column, paths relative to `out`) and zoo.md (a linked table) in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out / ZOO_CSV, out / ZOO_MD
    frame = pd.DataFrame(list(rows))
    for column in ("params", "params_trainable", "macs", "headline_tasks"):  # counts: 94762, not 94762.0
        frame[column] = frame[column].astype("Int64")
    frame.to_csv(csv_path, index=False)
    table = pd.DataFrame([_markdown_row(r) for r in rows])
    lines = [
        "# Model zoo",
        "",
        f"{len(rows)} {'model' if len(rows) == 1 else 'models'}, written by `{command}` on {dt.datetime.now():%Y-%m-%d %H:%M}. "
        f"Every column, with plain numbers, is in [{ZOO_CSV}]({ZOO_CSV}).",
    ]
    if skipped:
        lines.append(f"Skipped folders: {_skipped_text(skipped)}.")
    lines += [
        "",
        "- **config**: the experiment file that reproduces the model (`conf/experiment/<name>.yaml` when the run "
        f"was only `experiment=<name>`; otherwise a ready experiment file in `{CONFIGS}/`: copy it to "
        "`conf/experiment/` and run `python train.py experiment=<its name>`).",
        "- **checkpoint**: the result model (best epoch by the monitored metric); for runs on DoF features the "
        "shippable image model (`image_model.ckpt`, head on its backbone) and the head that was trained (`best.ckpt`).",
        "- **params, MACs, torch/onnx ms**: the run's cost report (empty for runs without one).",
        "- **test acc / F1**: the task's own value, or the mean over the tasks of a multi-task flow (per task: the "
        "run's `test_metrics.md`).",
    ]
    if rows and "verify" in rows[0]:
        lines.append(
            "- **verify**: the run's val and test metrics measured again from its checkpoint and data; `MOVED` lists "
            "every metric that differs from metrics.json by more than the tolerance."
        )
    lines += ["", markdown_table(table)]
    md_path.write_text("\n".join(lines))
    return md_path, csv_path


def _skipped_text(skipped: Counter[str]) -> str:
    return "; ".join(f"{reason} ({n})" for reason, n in skipped.most_common())


# ---- command line ---------------------------------------------------------------------------------------------------


def build_zoo(
    dirs: Sequence[Path],
    out: Path,
    verify: bool = False,
    tolerance: float = DEFAULT_TOLERANCE,
    accelerator: str = "cpu",
    command: str = "python -m headstart.tools.zoo",
) -> tuple[list[dict[str, Any]], bool]:
    """Scan `dirs`, write the zoo into `out`; return its rows and whether every verified row passed."""
    runs, skipped = find_runs(dirs)
    if skipped:
        count = sum(skipped.values())
        print(f"zoo: skipped {count} {'folder' if count == 1 else 'folders'}: {_skipped_text(skipped)}")
    if not runs:
        raise ConfigError(
            f"no finished train.py runs under {', '.join(str(d) for d in dirs)} (a run is a folder with "
            ".hydra/, metrics.json and checkpoints/best.ckpt); pass the folders train.py writes to: outputs multirun"
        )
    pairs = zoo_rows(runs, out)
    _remove_stale_configs(out, {Path(row["config"]).name for _, row in pairs})
    passed = True
    if verify:
        _quiet_lightning()
        for run, row in pairs:
            row["verify"], ok = verify_run(run, tolerance, accelerator)
            passed &= ok
            print(f"verify {row['id']}: {row['verify']}")
    rows = [row for _, row in pairs]
    md_path, csv_path = write_zoo(rows, out, command, skipped)
    print(f"zoo: {len(rows)} {'model' if len(rows) == 1 else 'models'} -> {md_path}, {csv_path}")
    return rows, passed


def _quiet_lightning() -> None:
    """Keep --verify's output to its own lines: no device banner per re-measured model."""
    import lightning.pytorch  # noqa: F401  (sets its logger's level when first imported)

    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m headstart.tools.zoo",
        description="List every finished train.py run under DIRs as a model zoo: zoo.md and zoo.csv.",
    )
    p.add_argument(
        "dirs", nargs="+", type=Path, metavar="DIR", help="folders holding runs (outputs, multirun)"
    )
    p.add_argument(
        "--out", type=Path, default=Path("."), help="folder for zoo.md, zoo.csv, zoo_configs/ (default: .)"
    )
    p.add_argument(
        "--verify", action="store_true", help="measure every model's metrics again; exit 1 if any moved"
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=DEFAULT_TOLERANCE,
        help=f"how far a metric may move in --verify: absolute, relative above 1 (default {DEFAULT_TOLERANCE:g})",
    )
    p.add_argument("--accelerator", default="cpu", help="Lightning accelerator for --verify (default: cpu)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status: 0 done (and every model verified), 1 a metric moved or a model could not be verified, 2 an
    error in what was asked (a missing folder, no runs)."""
    args = _parser().parse_args(argv)
    problem = None
    if args.tolerance < 0:
        problem = f"--tolerance {args.tolerance:g}: it must be 0 or more"
    elif args.out.suffix in (".md", ".csv") or args.out.is_file():
        problem = (
            f"--out {args.out}: name a folder; the zoo writes {ZOO_MD}, {ZOO_CSV} and {CONFIGS}/ into it"
        )
    if problem:
        print(f"headstart: error: {problem}", file=sys.stderr)
        return 2
    command = "python -m headstart.tools.zoo " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        _, passed = build_zoo(args.dirs, args.out, args.verify, args.tolerance, args.accelerator, command)
    except HeadstartError as e:
        print(f"headstart: error: {e}", file=sys.stderr)
        return 2
    if not passed:
        print("zoo: verification failed: see the lines above and the verify column", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
