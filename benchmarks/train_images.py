"""Framework overhead: training images/s through headstart (Lightning trainer, metrics, logging, callbacks)
against a bare PyTorch loop over the same model and the same DataLoader, measured side by side in one run.

    .venv/bin/python benchmarks/train_images.py [--experiment digits] [--epochs 3] [--rounds 3] [--workers 2]

Epochs alternate between the two (A B A B ...) so machine noise hits both; the first epoch of each fit is warm-up
and not counted. Prints the median images/s of each and the overhead ratio.

On a CUDA machine, benchmarks/gpu.sh measures image training with mixed precision against 32-true.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from headstart.train.recipe import build_callbacks, build_datamodule, build_loggers, build_model

ROOT = Path(__file__).resolve().parents[1]


class EpochTimer(L.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._t = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.times.append(time.perf_counter() - self._t)


def bare_epochs(model: torch.nn.Module, loader, epochs: int) -> list[float]:
    """The loop everyone writes by hand: forward, cross-entropy, backward, step."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    model.train()
    times = []
    for _ in range(epochs):
        t = time.perf_counter()
        for batch in loader:
            logits = model(batch["inputs"])["label"]
            loss = torch.nn.functional.cross_entropy(logits, batch["targets"]["label"].long())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        times.append(time.perf_counter() - t)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="digits")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per fit, the first is warm-up")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. data.root=...")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        overrides = [
            f"experiment={args.experiment}",
            f"paths.output_dir={tmp}",
            f"data.num_workers={args.workers}",
            f"trainer.max_epochs={args.epochs}",
            "++trainer.limit_val_batches=0",
            "++trainer.enable_progress_bar=false",
            "++trainer.enable_model_summary=false",
            *args.overrides,
        ]
        with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
            cfg = compose("train", overrides=overrides)
        L.seed_everything(0)
        datamodule = build_datamodule(cfg)
        n = len(datamodule.train_dataloader().dataset)
        headstart_rates, bare_rates = [], []
        for _ in range(args.rounds):
            timer = EpochTimer()
            model = build_model(cfg, datamodule)
            trainer = instantiate(
                cfg.trainer, callbacks=[*build_callbacks(cfg), timer], logger=build_loggers(cfg)
            )
            trainer.fit(model, datamodule=datamodule)
            headstart_rates += [n / t for t in timer.times[1:]]

            model = build_model(cfg, datamodule)
            bare_rates += [n / t for t in bare_epochs(model, datamodule.train_dataloader(), args.epochs)[1:]]

    h, b = statistics.median(headstart_rates), statistics.median(bare_rates)
    print(
        f"experiment={args.experiment} images/epoch={n} workers={args.workers} threads={torch.get_num_threads()}"
    )
    print(f"bare PyTorch loop : {b:8.1f} images/s (median of {len(bare_rates)} epochs)")
    print(f"headstart         : {h:8.1f} images/s (median of {len(headstart_rates)} epochs)")
    print(
        f"overhead          : {100 * (b / h - 1):+.1f}% time per image (headstart/bare throughput = {h / b:.3f})"
    )


if __name__ == "__main__":
    main()
