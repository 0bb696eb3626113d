"""Trials per minute of an Optuna search over head hyperparameters: on a DoF feature set against the same search on
raw images through the frozen backbone, measured side by side in one run (default: ../shared/data/dog_cat_small,
efficientnet_lite0).

    .venv/bin/python benchmarks/sweep.py [--root DIR] [--backbone efficientnet_lite0] [--epochs 2]
                                         [--dof-trials 8] [--image-trials 2]

Both searches are `train.py -m hparams_search=dog_cat_optuna` as a user runs it (Hydra's Optuna sweeper, the basic
launcher, the same search space and the same number of epochs per trial); the image search adds experiment=dog_cat.
The DoF set is extracted first (extract.py), so no trial pays for it. A trial's time runs from its job directory's
config (written when the job starts) to its metrics.json (written when it ends): fit, validation and test of the best
checkpoint, and for DoF the re-attach check on the backbone; trials per minute is 60 over the median trial time.
An image trial costs minutes on a 2-core CPU, hence the small defaults.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(args: list[str]) -> float:
    """Run an entry script in the repository root; return its wall time in seconds, or exit on failure."""
    t = time.perf_counter()
    result = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        sys.exit(f"{' '.join(args[:3])} ... failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - t


def trial_seconds(sweep_root: Path) -> list[float]:
    """Per job of the one sweep under `sweep_root`, in job order: metrics.json's mtime minus the job config's."""
    (sweep,) = [p for p in sweep_root.iterdir() if p.is_dir()]
    jobs = sorted((p for p in sweep.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    return [
        (job / "metrics.json").stat().st_mtime - (job / ".hydra" / "config.yaml").stat().st_mtime
        for job in jobs
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(ROOT.parent / "shared" / "data" / "dog_cat_small"))
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per trial, the same in both searches")
    parser.add_argument("--dof-trials", type=int, default=8)
    parser.add_argument("--image-trials", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2, help="data loader workers of the image search")
    args = parser.parse_args()
    if min(args.dof_trials, args.image_trials) < 1:
        parser.error("each search needs at least one trial")

    with tempfile.TemporaryDirectory() as tmp:
        common = [
            f"data.root={Path(args.root).resolve()}",
            f"backbone={args.backbone}",
            f"paths.root_dir={tmp}",
            "extract.progress=false",
            "++trainer.enable_progress_bar=false",
        ]
        extract_s = run(["extract.py", "experiment=dog_cat_dof", *common])
        search = [
            "train.py",
            "-m",
            "hparams_search=dog_cat_optuna",
            f"trainer.max_epochs={args.epochs}",
            *common,
        ]
        dof_wall = run([*search, f"hydra.sweeper.n_trials={args.dof_trials}"])
        dof = trial_seconds(Path(tmp) / "multirun" / "dog_cat_dof")
        image_wall = run(
            [
                *search,
                "experiment=dog_cat",
                f"data.num_workers={args.workers}",
                f"hydra.sweeper.n_trials={args.image_trials}",
            ]
        )
        images = trial_seconds(Path(tmp) / "multirun" / "dog_cat")

    dof_s, image_s = statistics.median(dof), statistics.median(images)
    print(
        f"data: {args.root}, backbone {args.backbone}, {args.epochs} epochs per trial, "
        f"{os.cpu_count()} CPUs, extraction (once, not counted) {extract_s:.1f} s"
    )
    print(
        f"DoF features : {60 / dof_s:8.2f} trials/min   (median {dof_s:6.2f} s/trial over {len(dof)} trials; "
        f"whole search {len(dof)} trials in {dof_wall:.0f} s)"
    )
    print(
        f"raw images   : {60 / image_s:8.2f} trials/min   (median {image_s:6.2f} s/trial over {len(images)} "
        f"trials; whole search {len(images)} trials in {image_wall:.0f} s)"
    )
    print(f"ratio        : {image_s / dof_s:8.1f}x more trials per minute on DoF features")


if __name__ == "__main__":
    main()
