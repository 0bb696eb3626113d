"""What the stacked launcher buys a sweep on DoF features, measured side by side in one run (default data:
../shared/data/dog_cat_small, efficientnet_lite0).

    .venv/bin/python benchmarks/sweep.py [--root DIR] [--trials 8] [--stacked-trials 32] [--rows 100000]
                                         [--skip-grid] [--skip-optuna] [--skip-synthetic]

(a) Grid: `train.py -m experiment=dog_cat_dof` over 4 learning rates through Hydra's basic launcher, and over the
    48 jobs of lr x dropout x weight decay through `hydra/launcher=stacked`, both as users run them (30 epochs,
    every default: the basic launcher exports every job, the stacked one its best). Seconds per job = the sweep's
    time (from multirun.yaml, written when the sweep starts, to the last metrics.json) over its jobs; process start
    and imports are not counted on either side. The ratio is basic over stacked.
(b) Optuna: `hparams_search=dog_cat_optuna` (TPE, 30 epochs a trial), trials per minute of the sweep's time: --trials
    through the basic launcher (one trial at a time), --stacked-trials through the stacked one with
    hydra.sweeper.n_jobs=16 (16 trials asked per batch, trained as one stack). Optuna writes no multirun.yaml: its
    sweep time starts at its first log line.
(c) Synthetic DoF sets of 10,000 and --rows rows x 1,280 fp16 features (in memory): StackedHeads with 1, 8 and 48
    linear heads, 2 epochs at batch 1024; jobs per minute and the process's peak memory (each in its own process).
The DoF set of (a) and (b) is extracted first (extract.py), so no job pays for it. Say how loaded the machine was.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GRID48 = [
    "optimizer.lr=3e-4,1e-3,3e-3,1e-2",
    "model.dropout=0.0,0.1,0.2,0.3",
    "optimizer.weight_decay=1e-4,1e-3,1e-2",
]


def run(args: list[str]) -> str:
    """Run an entry script in the repository root; its console output, or exit on failure."""
    result = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        sys.exit(f"{' '.join(args[:4])} ... failed:\n{result.stderr[-3000:]}")
    return result.stdout + result.stderr


def sweep_seconds(sweep_root: Path, output: str) -> tuple[float, int]:
    """The newest sweep under `sweep_root`: (seconds from its start to the last metrics.json, jobs with one). The
    start is multirun.yaml (a grid: written before Hydra composes the jobs), or else the sweep's first Hydra log
    line (Optuna writes no multirun.yaml; its first line names the study)."""
    sweep = max((p for p in sweep_root.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    done = [p.stat().st_mtime for p in sweep.glob("*/metrics.json")]
    if not done:
        sys.exit(f"{sweep}: no job finished")
    if (sweep / "multirun.yaml").is_file():
        start = (sweep / "multirun.yaml").stat().st_mtime
    else:
        first = re.search(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d+)\]\[HYDRA\]", output, re.MULTILINE)
        if first is None:
            sys.exit("no Hydra log line in the sweep's output")
        stamp = datetime.strptime(first.group(1), "%Y-%m-%d %H:%M:%S")
        start = stamp.timestamp() + int(first.group(2)) / 1000
    return max(done) - start, len(done)


def synthetic(rows: int, heads: int, epochs: int = 2, dim: int = 1280) -> dict[str, float]:
    """One stack of `heads` linear heads on a synthetic in-memory set (run in a child process: its peak memory)."""
    import lightning as L
    import numpy as np
    import torch

    from headstart.core.model import HeadstartModel
    from headstart.data.features import FeatureDataModule
    from headstart.dof import DofWriter
    from headstart.train.stacked import StackedHeads

    flow = {"tasks": {"label": {"kind": "multiclass", "classes": ["a", "b"]}}}
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        writer = DofWriter(Path(tmp) / "set", {"flow": flow, "transform": None, "samples": {}})
        for split, n in (("train", rows), ("val", 2048), ("test", 2048)):
            labels = rng.integers(0, 2, n)
            for start in range(0, n, 25000):  # shards: the writer keeps one in memory at a time
                part = labels[start : start + 25000]
                features = rng.standard_normal((len(part), dim), dtype=np.float32) + part[:, None] * 0.1
                writer.write_shard(
                    split,
                    start // 25000,
                    {
                        "features": features.astype(np.float16),
                        "index": np.arange(start, start + len(part)),
                        "view": np.zeros(len(part), np.int16),
                        "target.label": part.astype(np.float32),
                    },
                )
        writer.finalize({})
        datamodule = FeatureDataModule(Path(tmp) / "set", batch_size=1024)
        datamodule.setup()
        L.seed_everything(0, verbose=False)
        models = [
            HeadstartModel(flow=flow, feature_dim=dim, head={"hidden": [], "dropout": 0.1})
            for _ in range(heads)
        ]
        stack = StackedHeads(
            models,
            lrs=np.geomspace(1e-4, 1e-2, heads).tolist(),
            weight_decays=[1e-4] * heads,
            make_optimizer=lambda params: torch.optim.AdamW(params),
        )
        trainer = L.Trainer(
            max_epochs=epochs,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="auto",
            devices=1,
        )
        t = time.perf_counter()
        trainer.fit(stack, datamodule=datamodule)
        seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"seconds": seconds, "peak_mib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(ROOT.parent / "shared" / "data" / "dog_cat_small"))
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--trials", type=int, default=8, help="Optuna trials through the basic launcher")
    parser.add_argument(
        "--stacked-trials", type=int, default=32, help="Optuna trials through the stacked one"
    )
    parser.add_argument("--rows", type=int, default=100000, help="rows of the larger synthetic set")
    parser.add_argument("--skip-grid", action="store_true")
    parser.add_argument("--skip-optuna", action="store_true")
    parser.add_argument("--skip-synthetic", action="store_true")
    parser.add_argument(
        "--child", nargs=2, type=int, help=argparse.SUPPRESS
    )  # rows heads: one synthetic stack
    args = parser.parse_args()
    if args.child:
        print(json.dumps(synthetic(*args.child)))
        return

    load = os.getloadavg()[0]
    print(
        f"data: {args.root}, backbone {args.backbone}, {os.cpu_count()} CPUs, load average {load:.1f} at start"
    )
    with tempfile.TemporaryDirectory() as tmp:
        common = [
            f"data.root={Path(args.root).resolve()}",
            f"backbone={args.backbone}",
            f"paths.root_dir={tmp}",
            "extract.progress=false",
            "++trainer.enable_progress_bar=false",
        ]
        t = time.perf_counter()
        run(["extract.py", "experiment=dog_cat_dof", *common])
        extract_s = time.perf_counter() - t
        print(f"extraction (once, not counted): {extract_s:.1f} s")
        sweeps = Path(tmp) / "multirun" / "dog_cat_dof"
        if not args.skip_grid:
            out = run(["train.py", "-m", "experiment=dog_cat_dof", *common, GRID48[0]])
            basic_s, basic_n = sweep_seconds(sweeps, out)
            out = run(
                ["train.py", "-m", "experiment=dog_cat_dof", "hydra/launcher=stacked", *common, *GRID48]
            )
            stacked_s, stacked_n = sweep_seconds(sweeps, out)
            print(
                f"(a) grid, basic launcher   : {basic_s / basic_n:8.2f} s/job  ({basic_n} jobs in {basic_s:.0f} s)"
            )
            print(
                f"    grid, stacked launcher : {stacked_s / stacked_n:8.2f} s/job  ({stacked_n} jobs in "
                f"{stacked_s:.0f} s)"
            )
            print(
                f"    ratio                  : {basic_s / basic_n / (stacked_s / stacked_n):8.1f}x cheaper per job"
            )
        if not args.skip_optuna:
            search = ["train.py", "-m", "hparams_search=dog_cat_optuna", *common]
            out = run([*search, f"hydra.sweeper.n_trials={args.trials}"])
            basic_s, basic_n = sweep_seconds(sweeps, out)
            out = run(
                [
                    *search,
                    "hydra/launcher=stacked",
                    f"hydra.sweeper.n_trials={args.stacked_trials}",
                    "hydra.sweeper.n_jobs=16",
                ]
            )
            stacked_s, stacked_n = sweep_seconds(sweeps, out)
            basic_rate, stacked_rate = 60 * basic_n / basic_s, 60 * stacked_n / stacked_s
            print(
                f"(b) Optuna, basic launcher   : {basic_rate:8.1f} trials/min ({basic_n} trials in {basic_s:.0f} s)"
            )
            print(
                f"    Optuna, stacked launcher : {stacked_rate:8.1f} trials/min ({stacked_n} trials in "
                f"{stacked_s:.0f} s, 16 per batch)"
            )
            print(f"    ratio                    : {stacked_rate / basic_rate:8.1f}x more trials per minute")
    if not args.skip_synthetic:
        print("(c) synthetic DoF set x 1280 fp16, 2 epochs at batch 1024, linear heads (one process each):")
        for rows in (10000, args.rows):
            for heads in (1, 8, 48):
                out = subprocess.run(
                    [sys.executable, __file__, "--child", str(rows), str(heads)],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                got = json.loads(out.stdout.strip().splitlines()[-1])
                print(
                    f"    {rows:7d} rows, {heads:2d} heads: {60 * heads / got['seconds']:8.1f} jobs/min  "
                    f"({got['seconds']:6.1f} s)  peak memory {got['peak_mib']:7.0f} MiB"
                )
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
