"""What DoF feature sets buy, measured side by side in one run on real photos (default: ../shared/data/dog_cat_small).

    .venv/bin/python benchmarks/dof.py [--root DIR] [--backbone efficientnet_lite0] [--rounds 3] [--rows 50000]

(a) the backbone's pure forward images/s on preloaded tensors, as headstart runs it (on the CPU in chunks that the
    allocator keeps: headstart.core.cpu_forward) and as one call per batch;
(b) extraction images/s end to end (decode, transform, forward, write) and its ratio to (a);
(c) one head-training epoch on DoF features against one epoch of the same head on images through the frozen
    backbone, both through headstart's trainer, and their ratio;
(d) a DoF epoch through headstart against a bare PyTorch loop over the same in-memory tensors, on a synthetic set of
    --rows rows (per-epoch fixed costs would hide per-step overhead on a 200-image set), and their ratio; beside them
    the same head and optimizer in the smallest LightningModule (cross-entropy, no metrics, no callbacks, no logger)
    through a Lightning Trainer: the ceiling of any model trained one Lightning step per batch.

On a CUDA machine, benchmarks/gpu.sh measures (a), (b) and (d) on the GPU (fp32 and fp16/bf16 autocast) in its table.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from headstart.core.cpu_forward import inference_forward
from headstart.data.extraction import dof_spec, extract_dof, manifest_meta
from headstart.data.features import FeatureDataModule
from headstart.dof import DofWriter
from headstart.train.callbacks import EpochCostTimer
from headstart.train.extract import frozen_backbone
from headstart.train.recipe import build_datamodule, build_model

ROOT = Path(__file__).resolve().parents[1]


def compose_cfg(args: argparse.Namespace, tmp: str, *extra: str):
    overrides = [
        "experiment=dog_cat",
        f"data.root={args.root}",
        f"backbone={args.backbone}",
        f"paths.root_dir={tmp}",
        f"paths.output_dir={tmp}/run",
        f"data.num_workers={args.workers}",
        "extract.progress=false",
        "++trainer.limit_val_batches=0",
        "++trainer.enable_progress_bar=false",
        "++trainer.enable_model_summary=false",
        "logger={}",
        "callbacks={}",
        *extra,
    ]
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        return compose("train", overrides=overrides)


def forward_rate(backbone: torch.nn.Module, size: int, batch: int, n: int, one_call: bool = False) -> float:
    """Images/s of the backbone's forward on a preloaded batch: as headstart runs it (`inference_forward`: on the
    CPU in chunks), or with `one_call` as `backbone(batch)`."""
    x = torch.randn(batch, 3, size, size)
    forward = backbone if one_call else lambda images: inference_forward(backbone, images)
    with torch.inference_mode():
        forward(x)
        t = time.perf_counter()
        for _ in range(max(1, n // batch)):
            forward(x)
    return max(1, n // batch) * batch / (time.perf_counter() - t)


def headstart_epochs(cfg, datamodule, epochs: int) -> list[float]:
    timer = EpochCostTimer()
    model = build_model(cfg, datamodule)
    trainer = instantiate(cfg.trainer, callbacks=[timer], logger=False, max_epochs=epochs)
    trainer.fit(model, datamodule=datamodule)
    return timer.epoch_seconds[1:]  # the first is warm-up


def bare_epochs(
    features: torch.Tensor, labels: torch.Tensor, head: torch.nn.Module, batch: int, n: int
) -> list[float]:
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3)
    times = []
    for _ in range(n):
        t = time.perf_counter()
        order = torch.randperm(len(features))
        for start in range(0, len(features), batch):
            rows = order[start : start + batch]
            loss = torch.nn.functional.cross_entropy(head(features[rows])["label"], labels[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        times.append(time.perf_counter() - t)
    return times[1:]


class _Plain(L.LightningModule):
    """The least a LightningModule does: the head's cross-entropy, one optimizer step per batch."""

    def __init__(self, head: torch.nn.Module) -> None:
        super().__init__()
        self.head = head

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(self.head(batch[0])["label"], batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.head.parameters(), lr=1e-3)


class _Rows(torch.utils.data.Dataset):
    def __init__(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        self.features, self.labels = features, labels

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.features[rows], self.labels[rows]


def lightning_floor_epochs(
    features: torch.Tensor, labels: torch.Tensor, head: torch.nn.Module, batch: int, n: int
) -> list[float]:
    timer = EpochCostTimer()
    order = torch.utils.data.BatchSampler(torch.utils.data.RandomSampler(features), batch, drop_last=False)
    loader = torch.utils.data.DataLoader(_Rows(features, labels), sampler=order, batch_size=None)
    trainer = L.Trainer(
        max_epochs=n,
        accelerator="auto",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    trainer.fit(_Plain(head), loader)
    return timer.epoch_seconds[1:]


def synthetic_set(root: Path, rows: int, dim: int) -> Path:
    rng = np.random.default_rng(0)
    writer = DofWriter(
        root,
        {
            "flow": {"tasks": {"label": {"kind": "multiclass", "classes": ["a", "b"]}}},
            "transform": None,
            "samples": {},
        },
    )
    for split, n in (("train", rows), ("val", 256), ("test", 256)):
        labels = rng.integers(0, 2, n)
        features = (rng.standard_normal((n, dim)) + labels[:, None] * 0.5).astype(np.float16)
        writer.write_shard(
            split,
            0,
            {
                "features": features,
                "index": np.arange(n),
                "view": np.zeros(n, np.int16),
                "target.label": labels.astype(np.float32),
            },
        )
    writer.finalize({})
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(ROOT.parent / "shared" / "data" / "dog_cat_small"))
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rows", type=int, default=50000)
    args = parser.parse_args()
    L.seed_everything(0, verbose=False)

    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_cfg(args, tmp)
        backbone = frozen_backbone(cfg).eval()
        images_dm = build_datamodule(cfg)
        n_images = len(images_dm.table.frame)
        size = backbone.transform.crop

        # (a) and (b), alternating
        pure, one_call, extracted = [], [], []
        for r in range(args.rounds):
            pure.append(forward_rate(backbone, size, cfg.extract.batch_size, n_images))
            one_call.append(forward_rate(backbone, size, cfg.extract.batch_size, n_images, one_call=True))
            spec = dof_spec(backbone, images_dm, None, 1, "float16")
            root = Path(tmp) / f"set{r}"
            t = time.perf_counter()
            extract_dof(
                images_dm,
                backbone,
                root,
                batch_size=cfg.extract.batch_size,
                num_workers=args.workers,
                meta=manifest_meta(backbone, images_dm, spec),
                progress=False,
            )
            extracted.append(n_images / (time.perf_counter() - t))
        a, a1, b = statistics.median(pure), statistics.median(one_call), statistics.median(extracted)

        # (c) one head epoch on features vs on images through the frozen backbone (both through headstart)
        feature_cfg = compose_cfg(args, tmp, "features=true", f"extract.path={Path(tmp) / 'set0'}")
        feature_dm = build_datamodule(feature_cfg)
        on_features = statistics.median(headstart_epochs(feature_cfg, feature_dm, 1 + 5 * args.rounds))
        on_images = statistics.median(headstart_epochs(cfg, images_dm, 1 + args.rounds))

        # (d) headstart vs bare loop, on the same in-memory tensors of a larger synthetic set
        synth = synthetic_set(Path(tmp) / "synthetic", args.rows, backbone.feature_dim)
        d_rows = []
        for batch in sorted({256, cfg.extract.train_batch_size}):
            synth_cfg = compose_cfg(
                args,
                tmp,
                "features=true",
                f"extract.path={synth}",
                "backbone=small_cnn",
                f"extract.train_batch_size={batch}",
            )
            synth_dm = FeatureDataModule(synth, batch_size=batch)
            synth_dm.setup()
            arrays = synth_dm.dof.split("train").arrays()
            features = torch.from_numpy(arrays["features"]).float()
            labels = torch.from_numpy(arrays["target.label"]).long()
            hs, bare, floor = [], [], []
            for _ in range(args.rounds):
                hs += headstart_epochs(synth_cfg, synth_dm, 3)
                bare += bare_epochs(features, labels, build_model(synth_cfg, synth_dm), batch, 3)
                floor += lightning_floor_epochs(
                    features, labels, build_model(synth_cfg, synth_dm).head, batch, 3
                )
            d_rows.append((batch, statistics.median(bare), statistics.median(hs), statistics.median(floor)))

    print(
        f"data: {args.root} ({n_images} images), backbone {args.backbone}, {torch.get_num_threads()} threads, "
        f"{args.workers} loader workers"
    )
    print(f"(a) backbone forward on preloaded tensors : {a:9.1f} images/s")
    print(
        f"    the same, one call per batch of {cfg.extract.batch_size:<4} : {a1:9.1f} images/s   (a)/this "
        f"{a / a1:.2f} (headstart's CPU inference runs in chunks: core/cpu_forward.py)"
    )
    print(f"(b) extraction end to end                  : {b:9.1f} images/s   ratio to (a) {b / a:.2f}")
    print(f"(c) head epoch on images (frozen backbone) : {on_images:9.4f} s/epoch")
    print(
        f"    head epoch on DoF features             : {on_features:9.4f} s/epoch   "
        f"images/features {on_images / on_features:,.0f}x"
    )
    for batch, d_bare, d_hs, d_floor in d_rows:
        default = " (the default extract.train_batch_size)" if batch == cfg.extract.train_batch_size else ""
        print(f"(d) batch {batch}{default}, {args.rows} rows:")
        print(f"    DoF epoch, bare PyTorch loop           : {d_bare:9.4f} s/epoch")
        print(
            f"    DoF epoch, headstart                   : {d_hs:9.4f} s/epoch   headstart/bare throughput "
            f"{d_bare / d_hs:.2f}"
        )
        print(
            f"    DoF epoch, smallest LightningModule    : {d_floor:9.4f} s/epoch   its/bare throughput "
            f"{d_bare / d_floor:.2f} (Lightning's own per-step cost)"
        )


if __name__ == "__main__":
    main()
