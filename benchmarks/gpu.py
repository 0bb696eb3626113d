"""headstart on a GPU: one markdown table of figures, each against its reference, measured side by side in one run
(default data: ../shared/data/dog_cat_small). benchmarks/gpu.sh runs it on a CUDA machine under an overall timeout.

    .venv/bin/python benchmarks/gpu.py [--device cuda] [--root DIR] [--workers N] [--budget 440]
    .venv/bin/python benchmarks/gpu.py --device cpu --quick      # every row on the CPU at tiny sizes: a smoke check

Rows (what | headstart | reference | ratio | notes):
1. extraction images/s end to end (extract_dof as benchmarks/dof.py runs it: decode, transform, forward, write)
   against the backbone's pure forward on preloaded device tensors at the same batch size; efficientnet_lite0
   (pretrained) and resnet50 (pretrained when torchvision's weights are cached, else random: speed does not depend
   on them), fp32 and fp16/bf16 autocast. extract_dof has no precision setting: the autocast rows wrap the whole
   call in torch.autocast (what such a setting would do).
2. a head epoch on DoF features through headstart's trainer against a bare PyTorch loop over the same tensors
   held on the device (a synthetic set of --rows rows, as benchmarks/dof.py (d)).
3. image training images/s on the images through the frozen Lite0 with trainer.precision=16-mixed / bf16-mixed
   against 32-true (as benchmarks/train_images.py, one fit each).
4. ONNX Runtime's CUDA provider against PyTorch on CUDA on the exported Lite0 model (as benchmarks/runtime.py):
   batch-1 latency and batch-32 throughput, host arrays in and out on both sides.
5. stacked sweep jobs/min: `train.py -m experiment=dog_cat_dof hydra/launcher=stacked` over a 48-job grid of head
   hyperparameters, against the basic launcher on 4 of those jobs, each a subprocess after one extract.py; wall
   time per sweep, Python start-up included on both sides. "n/a" when conf/hydra/launcher/stacked.yaml is absent.

Rows are printed as they finish (a run cut short by a timeout keeps the rows it has); a failing row prints
"error: ..." and the run goes on. The whole run keeps within --budget seconds: a row started after it is skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import lightning as L
import numpy as np
import torch
from hydra import compose, initialize_config_dir

from headstart.core.model import HeadstartModel
from headstart.data.extraction import dof_spec, extract_dof, manifest_meta
from headstart.data.features import FeatureDataModule
from headstart.serve.runtime import OnnxRunner
from headstart.ship.export import export_onnx, input_size
from headstart.train.extract import frozen_backbone
from headstart.train.recipe import build_datamodule, build_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from dof import headstart_epochs, synthetic_set  # noqa: E402
from runtime import FLOW, OPTIMIZER, measure  # noqa: E402

SWEEP_GRID = {  # the 48 jobs of the stacked sweep; the basic launcher runs the first column of lr values
    "optimizer.lr": ["3e-4", "1e-3", "3e-3", "1e-2"],
    "model.dropout": ["0.0", "0.1", "0.2", "0.3"],
    "optimizer.weight_decay": ["1e-4", "1e-3", "1e-2"],
}
QUICK_GRID = {"optimizer.lr": ["1e-3"], "model.dropout": ["0.0", "0.1"], "optimizer.weight_decay": ["1e-4"]}


class Table:
    """A markdown table printed row by row, so that whatever finished is on screen when a run is cut short."""

    def __init__(self) -> None:
        print("| what | headstart | reference | ratio | notes |")
        print("|---|---|---|---|---|", flush=True)

    def row(self, what: str, mine: str, ref: str = "", ratio: str = "", notes: str = "") -> None:
        cells = [c.replace("|", "/").replace("\n", " ") for c in (what, mine, ref, ratio, notes)]
        print("| " + " | ".join(cells) + " |", flush=True)


def one_line(e: BaseException) -> str:
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    text = f"{type(e).__name__}: {lines[0] if lines else ''}"
    return text[:200]


def rate(n: float, unit: str) -> str:
    return f"{n:,.0f} {unit}" if n >= 100 else f"{n:.3g} {unit}"


class Bench:
    def __init__(self, args: argparse.Namespace, tmp: str) -> None:
        self.args, self.tmp = args, tmp
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.accelerator = "gpu" if self.cuda else "cpu"
        self.deadline = time.perf_counter() + args.budget
        self.table = Table()
        self.root = (
            tiny_tree(Path(args.root), Path(tmp) / "tiny") if args.quick else Path(args.root).resolve()
        )
        self.rounds = 1 if args.quick else args.rounds
        # autocast dtypes: CPU autocast runs bfloat16 (float16 on CPU is slow and not what anyone deploys)
        self.autocasts = [("fp32", None), ("bf16 autocast", torch.bfloat16)]
        if self.cuda:
            self.autocasts.insert(1, ("fp16 autocast", torch.float16))
        self.sync: Callable[[], None] = torch.cuda.synchronize if self.cuda else (lambda: None)

    # --- helpers ---------------------------------------------------------------------------------------------------
    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def guarded(self, what: str, fn: Callable[[], None]) -> None:
        """Run one section of rows; a failure becomes one error row, a spent budget one skipped row."""
        if self.left() <= 0:
            self.table.row(what, "skipped: time budget spent", notes=f"--budget {self.args.budget:.0f} s")
            return
        try:
            fn()
        except Exception as e:  # one row's failure must not end the table
            traceback.print_exc(file=sys.stderr)
            self.table.row(what, f"error: {one_line(e)}")
        finally:
            if self.cuda:
                torch.cuda.empty_cache()

    def cfg(self, *extra: str):
        overrides = [
            "experiment=dog_cat",
            f"data.root={self.root}",
            f"paths.root_dir={self.tmp}",
            f"paths.output_dir={self.tmp}/run",
            f"data.num_workers={self.args.workers}",
            f"trainer.accelerator={self.accelerator}",
            "extract.progress=false",
            "++trainer.limit_val_batches=0",
            "++trainer.enable_progress_bar=false",
            "++trainer.enable_model_summary=false",
            "logger={}",
            "callbacks={}",
            *(["extract.batch_size=4", "data.batch_size=4"] if self.args.quick else []),
            *extra,
        ]
        with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
            return compose("train", overrides=overrides)

    def autocast(self, dtype: torch.dtype | None):
        return torch.autocast(self.device.type, dtype=dtype) if dtype else contextlib.nullcontext()

    # --- 1. extraction against the pure forward --------------------------------------------------------------------
    def forward_rate(
        self, backbone: torch.nn.Module, size: int, batch: int, dtype: torch.dtype | None
    ) -> float:
        """Images/s of the backbone alone on one preloaded batch on the device (at least --seconds of calls)."""
        x = torch.randn(batch, 3, size, size, device=self.device)
        seconds = 0.2 if self.args.quick else self.args.seconds
        with torch.inference_mode(), self.autocast(dtype):
            for _ in range(1 if self.args.quick else 3):  # warm-up: kernels chosen, memory allocated
                backbone(x)
            self.sync()
            calls, t = 0, time.perf_counter()
            while calls < 2 or time.perf_counter() - t < seconds:
                backbone(x)
                calls += 1
            self.sync()
        return calls * batch / (time.perf_counter() - t)

    def extraction(self, name: str) -> None:
        extra, weights = [f"backbone={name}"], "pretrained"
        if name == "resnet50" and not torchvision_cached("resnet50"):
            extra.append("backbone.weights=null")
            weights = "random weights (pretrained not cached offline; speed does not depend on them)"
        cfg = self.cfg(*extra)
        backbone = frozen_backbone(cfg).eval().to(self.device)
        images = build_datamodule(cfg)
        n = len(images.table.frame)
        size, batch = backbone.transform.crop, cfg.extract.batch_size
        meta = manifest_meta(backbone, images, dof_spec(backbone, images, None, 1, "float16"))
        # --quick: resnet50 in fp32 only (the autocast path is Lite0's; bf16 resnet50 takes minutes on a small CPU)
        autocasts = self.autocasts[:1] if self.args.quick and name == "resnet50" else self.autocasts
        for label, dtype in autocasts:
            pure, extracted = [], []
            for r in range(self.rounds):  # alternating, so machine noise hits both
                pure.append(self.forward_rate(backbone, size, batch, dtype))
                t = time.perf_counter()
                with self.autocast(dtype):
                    extract_dof(
                        images,
                        backbone,
                        Path(self.tmp) / "sets" / f"{name}-{label.split()[0]}-{r}",
                        batch_size=batch,
                        num_workers=self.args.workers,
                        meta=meta,
                        device=self.device,
                        progress=False,
                    )
                extracted.append(n / (time.perf_counter() - t))
            a, b = statistics.median(extracted), statistics.median(pure)
            how = (
                "extract_dof in torch.autocast (extraction has no precision setting)"
                if dtype
                else "extract_dof"
            )
            self.table.row(
                f"{name} extraction vs pure forward, {label}",
                rate(a, "img/s"),
                rate(b, "img/s"),
                f"{a / b:.2f}",
                f"{how}; {n} images, batch {batch}, {self.args.workers} workers, {weights}; median of {self.rounds}",
            )

    # --- 2. head epoch on DoF features against a bare loop ---------------------------------------------------------
    def bare_epochs(
        self, features: torch.Tensor, labels: torch.Tensor, head: torch.nn.Module, batch: int, epochs: int
    ) -> list[float]:
        """The hand-written loop over tensors already on the device; the first epoch is warm-up."""
        optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3)
        head.train()
        times = []
        for _ in range(epochs):
            self.sync()
            t = time.perf_counter()
            order = torch.randperm(len(features), device=self.device)
            for start in range(0, len(features), batch):
                rows = order[start : start + batch]
                loss = torch.nn.functional.cross_entropy(head(features[rows])["label"], labels[rows])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            self.sync()
            times.append(time.perf_counter() - t)
        return times[1:]

    def head_epoch(self) -> None:
        rows, dim = (2000 if self.args.quick else self.args.rows), 1280
        synth = synthetic_set(Path(self.tmp) / "synthetic", rows, dim)
        epochs = 2 if self.args.quick else 3
        for batch in (256, 1024):
            cfg = self.cfg("features=true", f"extract.path={synth}", "backbone=small_cnn")
            datamodule = FeatureDataModule(synth, batch_size=batch)
            datamodule.setup()
            arrays = datamodule.dof.split("train").arrays()
            features = torch.from_numpy(arrays["features"]).float().to(self.device)
            labels = torch.from_numpy(arrays["target.label"]).long().to(self.device)
            hs, bare = [], []
            for _ in range(self.rounds):
                hs += headstart_epochs(cfg, datamodule, epochs)
                bare += self.bare_epochs(
                    features, labels, build_model(cfg, datamodule).to(self.device), batch, epochs
                )
            h, b = rows / statistics.median(hs), rows / statistics.median(bare)
            self.table.row(
                f"head epoch on DoF features, batch {batch}",
                rate(h, "rows/s"),
                rate(b, "rows/s"),
                f"{h / b:.2f}",
                f"headstart trainer (features from host memory, copied per step) vs bare loop on {self.device.type} "
                f"tensors; {rows} rows x {dim}; median of {len(hs)} epochs",
            )

    # --- 3. image training with mixed precision --------------------------------------------------------------------
    def image_training(self) -> None:
        mixed = ["16-mixed", "bf16-mixed"] if self.cuda else ["bf16-mixed"]
        epochs = 2 if self.args.quick else 1 + self.args.rounds
        results = {}
        for precision in ["32-true", *mixed]:
            cfg = self.cfg(f"trainer.precision={precision}")
            L.seed_everything(0, verbose=False)
            datamodule = build_datamodule(cfg)
            n = len(datamodule.train_dataloader().dataset)
            results[precision] = n / statistics.median(headstart_epochs(cfg, datamodule, epochs))
        for precision in mixed:
            self.table.row(
                f"image training, {precision} vs 32-true",
                rate(results[precision], "img/s"),
                rate(results["32-true"], "img/s"),
                f"{results[precision] / results['32-true']:.2f}",
                f"headstart trainer, frozen efficientnet_lite0, {n} train images/epoch, batch "
                f"{cfg.data.batch_size}, {self.args.workers} workers; median of {epochs - 1} epochs",
            )

    # --- 4. ONNX Runtime against PyTorch ---------------------------------------------------------------------------
    def onnx(self) -> None:
        import onnxruntime as ort

        what = f"ONNX Runtime vs PyTorch on {self.device.type}, efficientnet_lite0"
        if self.cuda and "CUDAExecutionProvider" not in ort.get_available_providers():
            self.table.row(what, "n/a: onnxruntime has no CUDA provider (pip install onnxruntime-gpu)")
            return
        model = HeadstartModel(
            flow=FLOW, optimizer=OPTIMIZER, backbone={"name": "efficientnet_lite0", "weights": "pretrained"}
        ).eval()
        path = export_onnx(model, Path(self.tmp) / "lite0.onnx")
        runner = OnnxRunner(path, model.flow.leaf_paths, device=self.device.type)
        provider = runner.session.get_providers()[0]
        if self.cuda and provider != "CUDAExecutionProvider":
            self.table.row(
                what, f"n/a: ONNX Runtime's CUDA provider did not load (the session runs {provider})"
            )
            return
        model = model.to(self.device)

        def eager(images: np.ndarray) -> dict[str, torch.Tensor]:
            with torch.inference_mode():
                out = model(torch.from_numpy(images).to(self.device))
                return {k: v.cpu() for k, v in out.items()}  # host arrays out, as ONNX Runtime gives them

        calls = (1, 2, 1) if self.args.quick else (4, 40, 10)
        res = measure({"torch": eager, "onnxruntime": runner}, input_size(model), *calls, pause=0.05)
        t, o = res["torch"], res["onnxruntime"]
        notes = f"{provider}, fp32, host arrays in and out; {calls[0]} alternating rounds"
        self.table.row(
            f"{what}, batch-1 latency p50",
            f"{o['latency_p50_ms']:.2f} ms",
            f"{t['latency_p50_ms']:.2f} ms",
            f"{t['latency_p50_ms'] / o['latency_p50_ms']:.2f} (speed-up)",
            notes,
        )
        self.table.row(
            f"{what}, batch-32 throughput",
            rate(o["throughput_images_per_s"], "img/s"),
            rate(t["throughput_images_per_s"], "img/s"),
            f"{o['throughput_images_per_s'] / t['throughput_images_per_s']:.2f}",
            notes,
        )

    # --- 5. stacked sweep jobs per minute --------------------------------------------------------------------------
    def run_entry(self, args: list[str], budget: float) -> float:
        """Wall seconds of an entry script run in the repository root; RuntimeError with its last error line."""
        t = time.perf_counter()
        try:
            result = subprocess.run(
                [sys.executable, *args],
                cwd=ROOT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0"},
                capture_output=True,
                text=True,
                timeout=max(1.0, budget),
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{' '.join(args[:3])} ... timed out after {budget:.0f} s") from None
        if result.returncode != 0:
            lines = [x for x in (result.stderr or result.stdout).splitlines() if x.strip()]
            sys.stderr.write(result.stderr[-3000:])
            raise RuntimeError(
                f"{' '.join(args[:3])} ... failed: {lines[-1] if lines else result.returncode}"
            )
        return time.perf_counter() - t

    def sweep(self) -> None:
        what = "stacked sweep jobs/min (hydra/launcher=stacked)"
        common = [
            "experiment=dog_cat_dof",
            f"data.root={self.root}",
            f"paths.root_dir={self.tmp}/sweep",
            f"data.num_workers={self.args.workers}",
            f"trainer.accelerator={self.accelerator}",
            "extract.progress=false",
            "++trainer.enable_progress_bar=false",
            *(["trainer.max_epochs=1"] if self.args.quick else []),
        ]
        grid = QUICK_GRID if self.args.quick else SWEEP_GRID
        self.run_entry(["extract.py", *common], self.left())
        basic_grid = {k: v if k == "optimizer.lr" else v[:1] for k, v in grid.items()}
        basic_jobs = len(list(itertools.product(*basic_grid.values())))
        basic_s = self.run_entry(["train.py", "-m", *common, *overrides(basic_grid)], self.left())
        basic = basic_jobs / (basic_s / 60)
        epochs = "1 epoch" if self.args.quick else "the experiment's epochs"
        ref_note = f"basic launcher: {basic_jobs} jobs in {basic_s:.0f} s ({basic_s / basic_jobs:.1f} s/job)"
        if not (ROOT / "conf" / "hydra" / "launcher" / "stacked.yaml").is_file():
            self.table.row(
                what, "n/a (no stacked launcher)", f"{basic:.1f} jobs/min", "", f"{ref_note}; {epochs}"
            )
            return
        jobs = len(list(itertools.product(*grid.values())))
        stacked_s = self.run_entry(
            ["train.py", "-m", *common, "hydra/launcher=stacked", *overrides(grid)], self.left()
        )
        stacked = jobs / (stacked_s / 60)
        self.table.row(
            what,
            f"{stacked:.1f} jobs/min",
            f"{basic:.1f} jobs/min",
            f"{stacked / basic:.1f}",
            f"stacked: {jobs} jobs in {stacked_s:.0f} s; {ref_note}; {epochs}; wall time with Python start-up",
        )


def overrides(grid: dict[str, list[str]]) -> list[str]:
    return [f"{k}={','.join(v)}" for k, v in grid.items()]


def torchvision_cached(arch: str) -> bool:
    """Whether torchvision's pretrained weights of `arch` are in torch's hub cache (nothing is downloaded)."""
    from torchvision.models import get_model_weights

    url = get_model_weights(arch).DEFAULT.url
    return (Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)).is_file()


def tiny_tree(root: Path, out: Path, per_class: dict[str, int] | None = None) -> Path:
    """A few images of each split and class of a class-folder tree, as symbolic links under `out` (--quick)."""
    per_class = per_class or {"train": 3, "val": 1, "test": 1}
    for split, k in per_class.items():
        for folder in sorted(p for p in (root / split).iterdir() if p.is_dir()):
            (out / split / folder.name).mkdir(parents=True, exist_ok=True)
            for image in sorted(folder.iterdir())[:k]:
                (out / split / folder.name / image.name).symlink_to(image.resolve())
    return out


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Keep Lightning's per-trainer banners and library warnings out of the table."""
    for name in ("lightning.pytorch", "lightning.fabric", "headstart"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def header(args: argparse.Namespace) -> None:
    import onnxruntime as ort

    if args.device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(args.device))
        gpu = f"{props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}"
    else:
        gpu = "none (CPU run)"
    print(
        f"device: {args.device} ({gpu}); torch {torch.__version__}, onnxruntime {ort.__version__} "
        f"({', '.join(ort.get_available_providers())}); {os.cpu_count()} CPUs, {torch.get_num_threads()} threads, "
        f"{args.workers} loader workers; data {args.root}{' (a few images of it: --quick)' if args.quick else ''}"
    )
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a few images, 1-2 epochs, 1 round")
    parser.add_argument("--root", default=str(ROOT.parent / "shared" / "data" / "dog_cat_small"))
    parser.add_argument(
        "--workers", type=int, default=min(8, os.cpu_count() or 1), help="data loader workers"
    )
    parser.add_argument("--rounds", type=int, default=2, help="rounds (or timed epochs) per measurement")
    parser.add_argument(
        "--seconds", type=float, default=1.0, help="timed seconds per pure-forward measurement"
    )
    parser.add_argument("--rows", type=int, default=50000, help="rows of the synthetic DoF set (row 2)")
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds; rows not started by then are skipped (default 440, with --quick 1200)",
    )
    parser.add_argument(
        "--only", default="", help="comma-separated sections: extraction,head,images,onnx,sweep"
    )
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(
            "--device cuda, but torch sees no CUDA device (for a CPU smoke run: --device cpu --quick)"
        )
    if args.budget is None:
        args.budget = 1200.0 if args.quick else 440.0
    if args.quick:  # a smoke check, often on a busy machine: one thread each (OpenMP threads collapse there)
        args.workers = min(args.workers, 2)
        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = "1"  # train.py and extract.py subprocesses

    header(args)
    L.seed_everything(0, verbose=False)
    with quiet(), tempfile.TemporaryDirectory() as tmp:
        bench = Bench(args, tmp)
        sections = {
            "extraction": [
                ("efficientnet_lite0 extraction", lambda: bench.extraction("efficientnet_lite0")),
                ("resnet50 extraction", lambda: bench.extraction("resnet50")),
            ],
            "head": [("head epoch on DoF features", bench.head_epoch)],
            "images": [("image training, mixed precision", bench.image_training)],
            "onnx": [("ONNX Runtime vs PyTorch", bench.onnx)],
            "sweep": [("stacked sweep jobs/min", bench.sweep)],
        }
        only = {s.strip() for s in args.only.split(",") if s.strip()}
        start = time.perf_counter()
        for key, parts in sections.items():
            if only and key not in only:
                continue
            for what, fn in parts:
                bench.guarded(what, fn)
    print(f"\n{time.perf_counter() - start:.0f} s in all (budget {args.budget:.0f} s)")


if __name__ == "__main__":
    main()
