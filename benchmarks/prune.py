"""Default pruning of a pretrained EfficientNet-Lite0 fine-tuned on ../shared/data/dog_cat_small.

    .venv/bin/python benchmarks/prune.py [--steps 8] [--ratio 0.5] [--epochs 3] [--threads N] [prune.py overrides]

Trains the dog_cat experiment (frozen pretrained backbone, a few epochs), runs prune.py's recipe with its defaults,
then prints per step: test accuracy, MACs and ONNX Runtime batch-1 latency, with their ratios to the unpruned model.
Latencies are re-measured at the end in alternating rounds over all steps (one thread count, pinned), so that
machine noise hits every step alike. Target: at least 2x lower latency with test accuracy within 3 points.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir

from headstart.core.runners import as_torch
from headstart.evaluate.evaluation import run_split
from headstart.evaluate.loading import load_model, model_datamodule
from headstart.prune.recipe import prune
from headstart.serve.runtime import OnnxRunner, default_threads
from headstart.speed import time_calls
from headstart.train.recipe import train

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "dog_cat_small"


def compose_in(config: str, overrides: list[str]):
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        return compose(config, overrides=overrides)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--epochs", type=int, default=3, help="training epochs of the unpruned model")
    parser.add_argument("--finetune-epochs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "overrides", nargs="*", help="more prune.py overrides, e.g. pruning.residual_streams=true"
    )
    args = parser.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"{DATA} is absent (real data lives in ../shared/data)")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        common = [f"paths.root_dir={tmp}", "data.num_workers=2"]
        train(
            compose_in(
                "train",
                [
                    *common,
                    f"paths.output_dir={tmp / 'run'}",
                    "experiment=dog_cat",
                    f"data.root={DATA}",
                    f"trainer.max_epochs={args.epochs}",
                ],
            )
        )
        out = tmp / "prune"
        prune(
            compose_in(
                "prune",
                [
                    f"paths.root_dir={tmp}",
                    f"paths.output_dir={out}",
                    f"model={tmp / 'run'}",
                    f"pruning.steps={args.steps}",
                    f"pruning.ratio={args.ratio}",
                    f"pruning.finetune_epochs={args.finetune_epochs}",
                    f"speed.threads={args.threads}",
                    *args.overrides,
                ],
            )
        )
        table = json.loads((out / "selected.json").read_text())
        import pandas as pd

        steps = pd.read_csv(out / "pruning.csv")
        accuracy = {}
        for row in steps.itertuples():
            loaded = load_model(out / row.checkpoint, runtime="pytorch", threads=args.threads)
            datamodule = model_datamodule(None, loaded, split="test")
            loaded.runner = as_torch(OnnxRunner(out / row.onnx, loaded.flow.leaf_paths, args.threads))
            accuracy[row.step] = run_split(loaded, datamodule, "test").metrics["test/label/acc"]

        runners = {
            row.step: OnnxRunner(out / row.onnx, ["label"], args.threads) for row in steps.itertuples()
        }
        image = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
        times: dict[int, list[float]] = {s: [] for s in runners}
        for r in range(args.rounds):
            order = list(runners) if r % 2 == 0 else list(reversed(runners))
            for s in order:
                runners[s].run(image)
                times[s] += time_calls(runners[s].run, image, min_runs=10, min_seconds=0.3)
        latency = {s: statistics.median(t) * 1000 for s, t in times.items()}

    base_macs = int(steps.loc[steps.step == 0, "macs"].iloc[0])
    print(
        f"efficientnet_lite0 (pretrained) on {DATA.name}, {args.steps} steps to ratio {args.ratio}, "
        f"{args.finetune_epochs} fine-tuning epoch(s) per step, ONNX Runtime with {args.threads} threads"
        + (f", {' '.join(args.overrides)}" if args.overrides else "")
    )
    print(
        f"{'step':>4} {'test acc':>9} {'Δ acc':>7} {'MACs (M)':>9} {'MACs ratio':>10} {'b1 ms':>7} {'speed-up':>8}"
    )
    for row in steps.itertuples():
        s = row.step
        print(
            f"{s:>4} {accuracy[s]:>9.3f} {100 * (accuracy[s] - accuracy[0]):>+6.1f}p {row.macs / 1e6:>9.1f} "
            f"{base_macs / row.macs:>9.2f}x {latency[s]:>7.2f} {latency[0] / latency[s]:>7.2f}x"
            f"{'  <- selected (val within max_drop)' if s == table['selected_step'] else ''}"
        )
    # accuracies are float32: 0.97 - 0.94 > 0.03
    ok = [s for s in accuracy if accuracy[0] - accuracy[s] <= 0.03 + 1e-6]
    best = max(ok, key=lambda s: latency[0] / latency[s])
    print(
        f"fastest step within 3 points of the unpruned test accuracy: step {best}, "
        f"{latency[0] / latency[best]:.2f}x lower latency (target 2x)"
    )


if __name__ == "__main__":
    main()
