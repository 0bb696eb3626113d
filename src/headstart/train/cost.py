"""The run cost report: what the model a run ships costs to store and to run.

Every training run records, for the model as shipped (backbone + head on images, whether it was trained on images or
on DoF features):

- parameters: all of them, and those this run trained (the head alone on DoF features or a frozen backbone);
- MACs: multiply-accumulates of one image at the backbone's input size (batch 1), counted by torch's FLOP counter
  over convolutions and matrix products (its FLOPs / 2); normalization, activations, pooling and bias additions are
  not counted;
- latency: batch-1 p50 in PyTorch (on the CPU or the run's device) and in ONNX Runtime on the exported model.onnx,
  with the thread count pinned.

`CostReport` logs the counts at fit start, next to Lightning's model summary; `CostReport.report` measures the
latency after export, writes `cost.json` and returns the `cost/*` values for metrics.json.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from omegaconf import DictConfig
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from headstart.core.model import HeadstartModel
from headstart.core.runners import TorchRunner
from headstart.errors import ConfigError
from headstart.runs import write_json
from headstart.serve.runtime import OnnxRunner, default_threads
from headstart.speed import machine_info, percentile, time_calls, torch_threads

log = logging.getLogger(__name__)

MACS_COUNTED = "convolutions and matrix products (torch.utils.flop_counter FLOPs / 2), batch 1"
WARMUP = 3
_SHIPPED = ("backbone.", "head.")  # what model.onnx holds; loss weighting and metrics stay behind


def check_cost_config(cfg: DictConfig) -> None:
    """Raise ConfigError for a `cost` section that cannot work; called before any work is done."""
    cost = cfg.get("cost")
    if cost is None:  # extract.py's config has no cost section
        return
    if cost.runs < 1:
        raise ConfigError(f"cost.runs must be at least 1 (timed calls per runtime), got {cost.runs}")
    if cost.threads is not None and cost.threads < 1:
        raise ConfigError(f"cost.threads must be at least 1, or null for all cores, got {cost.threads}")
    if cost.device not in ("cpu", "run"):
        raise ConfigError(f"cost.device must be 'cpu' or 'run' (the run's device), got {cost.device!r}")


def count_params(module: nn.Module, trained: set[str] | None = None) -> tuple[int, int]:
    """(all parameters, trainable ones) of `module`. Trainable: those named in `trained` when given, else those
    with requires_grad."""
    total = trainable = 0
    for name, p in module.named_parameters():
        total += p.numel()
        if (name in trained) if trained is not None else p.requires_grad:
            trainable += p.numel()
    return total, trainable


def count_macs(module: nn.Module, inputs: torch.Tensor) -> int:
    """Multiply-accumulates of `module(inputs)` in convolutions and matrix products: torch's FLOP counter counts two
    FLOPs per multiply-accumulate of those operations and nothing else."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(inputs)
    return int(counter.get_total_flops()) // 2


def shipped_model(model: HeadstartModel, backbone: dict | None = None) -> HeadstartModel:
    """The image model a run ships, built on the CPU in eval mode with `model`'s weights: `model` itself rebuilt on
    images; on DoF features (no backbone) its head on a `backbone` (the run's backbone config) with random weights,
    which cost the same as the real ones. Draws nothing from torch's random generator."""
    hparams = dict(model.hparams)
    if hparams.get("backbone"):
        hparams["backbone"] = {**hparams["backbone"], "weights": None}
    elif backbone:
        config = {**backbone, "weights": None, "freeze": True, "trainable_stages": 0}
        hparams.update(backbone=config, feature_dim=None, transform=None)
    else:
        raise ConfigError("the cost of a head trained on features needs the run's backbone config")
    with torch.random.fork_rng(devices=[]):
        full = HeadstartModel(**hparams)
    own = {k: v for k, v in model.state_dict().items() if k.startswith(_SHIPPED)}
    full.load_state_dict(own, strict=False)
    return full.eval()


def input_shape(model: HeadstartModel) -> tuple[int, int, int, int]:
    """(1, 3, crop, crop): one image as the model sees it."""
    crop = int(model.input_transform.crop)
    return (1, 3, crop, crop)


def image_module(model: HeadstartModel) -> nn.Module:
    """backbone + head: what model.onnx holds (the LightningModule also holds metrics and loss weighting)."""
    return nn.ModuleDict({"backbone": model.backbone, "head": model.head})


def latency_ms(run: Any, inputs: Any, runs: int, sync: Any = None) -> dict[str, float]:
    """p50 and p90 milliseconds of `runs` calls of `run(inputs)`, after WARMUP untimed calls."""
    for _ in range(WARMUP):
        run(inputs)
    times = time_calls(run, inputs, min_runs=runs, min_seconds=0.0, max_runs=runs, sync=sync)
    return {"p50_ms": 1000.0 * percentile(times, 50), "p90_ms": 1000.0 * percentile(times, 90)}


def describe_counts(counts: dict[str, Any]) -> str:
    """One line for the log: params, trainable, MACs at CxHxW."""
    _, c, h, w = counts["input_shape"]
    return (
        f"cost of the model as shipped ({counts['model']}): {_si(counts['params'])} params "
        f"({_si(counts['params_trainable'])} trainable), {_si(counts['macs'])} MACs at {c}x{h}x{w} (batch 1)"
    )


def describe_cost(cost: dict[str, Any]) -> str:
    """A small markdown table of cost.json (the log and TensorBoard's TEXT tab)."""
    _, c, h, w = cost["input_shape"]
    rows = [
        ("parameters", f"{cost['params']:,}"),
        ("trainable (this run)", f"{cost['params_trainable']:,}"),
        (f"MACs at {c}x{h}x{w}", f"{cost['macs']:,} ({_si(cost['macs'])})"),
    ]
    for key, name in (("torch", "PyTorch"), ("onnx", "ONNX Runtime")):
        timing = cost.get("latency", {}).get(key)
        if timing:
            rows.append(
                (
                    f"{name} latency, batch 1, p50",
                    f"{timing['p50_ms']:.3f} ms ({timing['device']}, {_threads(timing['threads'])})",
                )
            )
    return "\n".join(["| cost | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])


def _threads(n: int) -> str:
    return f"{n} thread" + ("" if n == 1 else "s")


def _si(n: float) -> str:
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:g}"


class CostReport(L.Callback):
    """Counts the shipped model's parameters and MACs at fit start (logged next to Lightning's model summary),
    remembers which parameters training touched, and after export measures latency and writes the report
    (`report`).

    Args:
        latency: time batch-1 inference in PyTorch and, when model.onnx exists, in ONNX Runtime.
        runs: timed calls per runtime (after WARMUP untimed ones).
        threads: intra-op threads of both runtimes; None: the cores this process may use.
        device: "cpu", or "run" for the PyTorch timing on the device the run trained on.
        backbone: the run's backbone config (plain), to rebuild the image model of a run on DoF features.
    """

    def __init__(
        self,
        latency: bool = True,
        runs: int = 20,
        threads: int | None = 1,
        device: str = "cpu",
        backbone: dict | None = None,
    ) -> None:
        self.latency, self.runs, self.device = bool(latency), int(runs), device
        self.threads = int(threads or default_threads())
        self.backbone = backbone
        self.trained: set[str] | None = None  # names of shipped parameters that required grad in some epoch
        self._counts: dict[str, Any] | None = None
        self._run_device = "cpu"

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._run_device = str(pl_module.device)
        self._track(pl_module)
        if trainer.is_global_zero:
            log.info("%s", describe_counts(self.counts(pl_module)))

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._track(pl_module)  # a fine-tuning schedule may make more trainable as training goes

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._track(pl_module)

    def _track(self, pl_module: L.LightningModule) -> None:
        names = {n for n, p in pl_module.named_parameters() if p.requires_grad and n.startswith(_SHIPPED)}
        self.trained = names | (self.trained or set())

    def counts(self, model: HeadstartModel, shipped: HeadstartModel | None = None) -> dict[str, Any]:
        """params, params_trainable, macs, input_shape and what was counted; computed once."""
        if self._counts is None:
            shipped = shipped or shipped_model(model, self.backbone)
            shape = input_shape(shipped)
            if self.trained is None:
                self._track(model)
            total, _ = count_params(image_module(shipped))
            _, trainable = count_params(model, self.trained)
            what = "backbone + head" if model.backbone is not None else "DoF head re-attached to its backbone"
            self._counts = {
                "params": total,
                "params_trainable": trainable,
                "macs": count_macs(shipped, torch.zeros(shape)),
                "macs_counted": MACS_COUNTED,
                "input_shape": list(shape),
                "model": what,
            }
        elif self.trained is not None:  # more may have been trained since fit start
            self._counts["params_trainable"] = count_params(model, self.trained)[1]
        return self._counts

    def report(
        self, model: HeadstartModel, run_dir: Path, best: str | None, loggers: list[Logger]
    ) -> dict[str, float]:
        """Measure latency, write `run_dir/cost.json`, log the table (and to TensorBoard); return the metrics.json
        keys: cost/params, cost/params_trainable, cost/macs, and cost/torch_ms, cost/onnx_ms when measured."""
        # Counted once per report object: the stacked launcher shares one among jobs of the same architecture.
        needed = self._counts is None or self.latency
        shipped = self._shipped(model, run_dir, best) if needed else None
        cost = dict(self.counts(model, shipped))
        values: dict[str, float] = {f"cost/{k}": cost[k] for k in ("params", "params_trainable", "macs")}
        if shipped is not None and self.latency:
            cost["latency"] = self._latency(shipped, run_dir / "model.onnx")
            for key, timing in cost["latency"].items():
                if isinstance(timing, dict):
                    values[f"cost/{key}_ms"] = timing["p50_ms"]
            cost["machine"] = machine_info(
                self.threads, "pytorch, onnxruntime", cost["latency"]["torch"]["device"]
            )
        write_json(run_dir / "cost.json", cost)
        table = describe_cost(cost)
        log.info("run cost (%s):\n%s", run_dir / "cost.json", table)
        for logger in loggers:
            logger.log_metrics(values, step=0)
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text("cost", table, global_step=0)
                logger.experiment.flush()
        return values

    def _shipped(self, model: HeadstartModel, run_dir: Path, best: str | None) -> HeadstartModel:
        """The shipped checkpoint when there is one (the re-attached image model on DoF features), else the
        trained model rebuilt as an image model."""
        path = run_dir / "checkpoints" / "image_model.ckpt" if model.backbone is None else best
        if path and Path(path).is_file():
            return HeadstartModel.from_checkpoint(path).eval()
        return shipped_model(model, self.backbone)

    def _latency(self, shipped: HeadstartModel, onnx_path: Path) -> dict[str, Any]:
        device = self._run_device if self.device == "run" else "cpu"
        sync = torch.cuda.synchronize if device.startswith("cuda") else None
        image = torch.randn(input_shape(shipped), generator=torch.Generator().manual_seed(0))
        out: dict[str, Any] = {"batch": 1, "runs": self.runs, "warmup": WARMUP, "statistic": "p50"}
        with torch_threads(self.threads):
            runner = TorchRunner(shipped, self.threads, device=device)
            out["torch"] = {
                **latency_ms(runner, image, self.runs, sync),
                "device": device,
                "threads": self.threads,
            }
            if onnx_path.is_file():
                onnx = OnnxRunner(onnx_path, shipped.flow.leaf_paths, self.threads)
                timing = latency_ms(onnx, image.numpy(), self.runs)
                provider = onnx.session.get_providers()[0]
                out["onnx"] = {**timing, "device": "cpu", "provider": provider, "threads": self.threads}
        return out
