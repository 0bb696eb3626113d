"""Compare runs: `python -m headstart.tools.compare RUN_OR_DIR [...]` reads the validation curves of several runs from their
TensorBoard event files and draws them together (one panel per metric, one line per run) as a PNG, with the same
points as a CSV.

A run is a directory whose `tensorboard/` folder (or itself) holds event files; a folder given on the command line
that is not a run is searched for runs (a sweep, `outputs/<name>/`). Runs are labelled by their path and by the
overrides that differ between them (from `.hydra/overrides.yaml`), so a sweep's curves say which job is which.
"""

from __future__ import annotations

import argparse
import fnmatch
import logging
import os
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from headstart.train.tensorboard import metric_name

log = logging.getLogger(__name__)

__all__ = ["find_curve_runs", "main", "plot_curves", "read_curves", "run_labels"]

_TB_DIR = "tensorboard"
_COLUMNS = ["run", "label", "metric", "epoch", "step", "value"]


def _has_events(folder: Path) -> bool:
    return any(folder.glob("events.out.tfevents.*"))


def find_curve_runs(paths: list[Path]) -> list[Path]:
    """Run directories at or below `paths`, in the order given (each folder's runs sorted)."""
    runs: list[Path] = []
    for path in paths:
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no such folder; give run folders or folders that hold runs")
        if (path / _TB_DIR).is_dir() or _has_events(path):
            found = [path]
        else:
            events = sorted({p.parent for p in path.rglob("events.out.tfevents.*")})
            found = [e.parent if e.name == _TB_DIR else e for e in events]
        runs += [r for r in found if r not in runs]
    return runs


def _events_dir(run: Path) -> Path:
    return run / _TB_DIR if (run / _TB_DIR).is_dir() else run


def read_curves(run: Path, patterns: list[str]) -> pd.DataFrame:
    """Scalars of `run` whose metric name (`val/loss`, `val/label/acc`: see `metric_name`) matches one of `patterns`
    (fnmatch), with the epoch of each point.

    A point's epoch is its training epoch: the rank of its step among the steps of the per-epoch training metrics
    (validation runs at the end of each training epoch, at the same step). Runs logged before the curves-first
    layout carry Lightning's `epoch` scalar instead, and the `validate` and `test` of the best checkpoint after
    training logged there once more, one epoch past the last: those points are left out, the curve is what training
    saw."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(_events_dir(run)), size_guidance={"scalars": 0})
    events.Reload()
    tags = {metric_name(t): t for t in events.Tags().get("scalars", [])}
    epochs: dict[int, float] = {}
    if "epoch" in tags:
        for e in events.Scalars("epoch"):
            epochs.setdefault(e.step, e.value)
    else:
        train_steps = {
            e.step
            for name, tag in tags.items()
            if name.startswith("train/") and not name.endswith("_step")
            for e in events.Scalars(tag)
        }
        epochs = {step: float(k) for k, step in enumerate(sorted(train_steps))}
    trained = [
        epochs.get(e.step) for name, t in tags.items() if name.startswith("train/") for e in events.Scalars(t)
    ]
    last_epoch = max((int(e) for e in trained if e is not None), default=None)
    rows = []
    for name, tag in tags.items():
        if name == "epoch" or not any(fnmatch.fnmatchcase(name, p) for p in patterns):
            continue
        seen: set[int] = set()
        for e in events.Scalars(tag):
            epoch = epochs.get(e.step)
            after_training = last_epoch is not None and epoch is not None and epoch > last_epoch
            if e.step in seen or after_training:
                continue
            seen.add(e.step)
            rows.append(
                {
                    "metric": name,
                    "epoch": None if epoch is None else int(epoch),
                    "step": e.step,
                    "value": e.value,
                }
            )
    return pd.DataFrame(rows, columns=["metric", "epoch", "step", "value"])


def run_labels(runs: list[Path]) -> list[str]:
    """Each run's path below the runs' common folder, plus the command-line overrides that differ between runs."""
    overrides: list[dict[str, str]] = []
    for run in runs:
        file = run / ".hydra" / "overrides.yaml"
        items = [str(o) for o in OmegaConf.load(file)] if file.is_file() else []
        overrides.append(dict(o.split("=", 1) for o in items if "=" in o))
    keys = sorted({k for o in overrides for k in o})
    differing = [k for k in keys if len({o.get(k) for o in overrides}) > 1]
    resolved = [r.resolve() for r in runs]
    common = Path(os.path.commonpath(resolved)) if len(runs) > 1 else resolved[0].parent
    labels = []
    for run, o in zip(resolved, overrides, strict=True):
        name = str(run.relative_to(common)) if run != common else run.name
        extra = " ".join(f"{k}={o[k]}" for k in differing if k in o)
        labels.append(f"{name} {extra}".strip())
    return labels


def plot_curves(data: pd.DataFrame, path: Path) -> Path:
    """One panel per metric, one line per run label, against the epoch (the step where no epoch is known)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    metrics = list(dict.fromkeys(data["metric"]))
    cols = min(len(metrics), 3)
    rows = -(-len(metrics) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows), squeeze=False)
    for ax, metric in zip(axes.flat, metrics, strict=False):
        part = data[data["metric"] == metric]
        by_epoch = part["epoch"].notna().all()
        for label, curve in part.groupby("label", sort=False):
            x = curve["epoch"] if by_epoch else curve["step"]
            ax.plot(x, curve["value"], marker="o", markersize=3, label=label)
        ax.set_title(metric)
        ax.set_xlabel("epoch" if by_epoch else "step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 2), fontsize="small", frameon=False)
    fig.tight_layout(rect=(0, 0.06 + 0.025 * ((len(labels) + 1) // 2), 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def compare_runs(runs: list[Path], patterns: list[str], out: Path) -> pd.DataFrame:
    """Read the curves of `runs` and write `<out>.csv` and `<out>.png`; returns the table."""
    labels = run_labels(runs)
    frames = []
    for run, label in zip(runs, labels, strict=True):
        curves = read_curves(run, patterns)
        if curves.empty:
            log.warning("%s: no scalar matches %s", run, " ".join(patterns))
            continue
        frames.append(curves.assign(run=str(run), label=label))
    if not frames:
        raise ValueError(
            f"no run has a scalar matching {' '.join(patterns)}; list a run's tags with "
            "`tensorboard --inspect --logdir RUN/tensorboard` and pass them with --metrics"
        )
    data = pd.concat(frames, ignore_index=True)[_COLUMNS]
    data = data[~data["metric"].str.endswith("/count")]
    out.parent.mkdir(parents=True, exist_ok=True)
    data.to_csv(out.with_suffix(".csv"), index=False)
    plot_curves(data, out.with_suffix(".png"))
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m headstart.tools.compare",
        description="Plot the validation curves of several runs together (from their TensorBoard events) and write "
        "the same points as CSV.",
    )
    parser.add_argument("runs", nargs="+", type=Path, help="run folders, or folders that hold runs (a sweep)")
    parser.add_argument(
        "--metrics",
        nargs="+",
        default=["val/*"],
        metavar="TAG",
        help="scalar tags or patterns (default: val/*; e.g. val/loss 'val/*acc' train/loss)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("compare"), help="writes OUT.png and OUT.csv (default: ./compare)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("tensorboard").setLevel(logging.WARNING)  # it reports every event file it moves to
    try:
        runs = find_curve_runs(args.runs)
    except FileNotFoundError as e:
        parser.error(str(e))
    if not runs:
        parser.error(f"no TensorBoard event files under {' '.join(map(str, args.runs))}")
    try:
        data = compare_runs(runs, args.metrics, args.out)
    except ValueError as e:
        parser.error(str(e))
    print(f"{len(runs)} runs, metrics: {', '.join(dict.fromkeys(data['metric']))}")
    print(f"wrote {args.out.with_suffix('.png')} and {args.out.with_suffix('.csv')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
