"""Measure a finished run's metrics again, the way train() measured its metrics.json, and say which ones moved."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from headstart.errors import ConfigError

STAGES = ("val", "test")


@dataclass(frozen=True)
class Moved:
    """A recorded metric that the re-measurement does not reproduce (`now` None: no longer measured)."""

    metric: str
    recorded: float | None
    now: float | None

    def __str__(self) -> str:
        now = "not measured" if self.now is None else f"{self.now:.6g}"
        recorded = "null" if self.recorded is None else f"{self.recorded:.6g}"
        return f"{self.metric} {recorded} -> {now}"


@contextlib.contextmanager
def _working_dir(path: Path | None) -> Iterator[None]:
    """Relative paths in a run's config (data, DoF sets) are relative to where the run started."""
    if path is None or not path.is_dir():
        yield
        return
    before = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def remeasure(
    checkpoint: Path,
    stages: tuple[str, ...] = STAGES,
    cwd: Path | None = None,
    accelerator: str = "cpu",
) -> dict[str, float]:
    """`<stage>/...` metrics of the model in `checkpoint` (a run's best.ckpt: on DoF runs the head) on the data of
    the run's recorded config (on DoF runs its stored features), through the same DataModule, model steps and
    Lightning validate/test loop as training. `cwd`: where the run started (its relative paths are from there)."""
    import lightning as L
    import torch

    from headstart.model import HeadstartModel
    from headstart.training import build_datamodule

    model = HeadstartModel.from_checkpoint(checkpoint)
    if not model.run_config:
        raise ConfigError(
            f"{checkpoint} does not record the config it was trained with, so its data cannot be found again; "
            "re-measure checkpoints written by train.py"
        )
    cfg = OmegaConf.create(model.run_config)
    out: dict[str, float] = {}
    with _working_dir(cwd):
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        datamodule = build_datamodule(cfg)
        trainer = L.Trainer(
            accelerator=accelerator,
            devices=1,
            precision=cfg.trainer.get("precision", "32-true"),
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        for stage in stages:
            loop = trainer.validate if stage == "val" else trainer.test
            for result in loop(model, datamodule=datamodule, verbose=False):
                out.update(
                    {k: float(v.item() if isinstance(v, torch.Tensor) else v) for k, v in result.items()}
                )
    return out


def metric_value(value: object) -> float | None:
    """A metric value as a float; None for null/NaN (metrics.json stores NaN as null)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        return None
    return float(value)


def moved_metrics(
    recorded: Mapping[str, object],
    now: Mapping[str, float],
    tolerance: float,
    stages: tuple[str, ...] = STAGES,
) -> list[Moved]:
    """Every recorded `<stage>/...` metric that moved by more than `tolerance` (absolute; relative to the value
    where it exceeds 1, as losses and regression errors may), or that the re-measurement no longer reports."""
    out = []
    for metric, value in sorted(recorded.items()):
        if metric.split("/", 1)[0] not in stages:
            continue
        before = metric_value(value)
        if metric not in now:
            out.append(Moved(metric, before, None))
            continue
        after = metric_value(now[metric])
        if before is None or after is None:
            if before is not after:
                out.append(Moved(metric, before, math.nan if after is None else after))
        elif abs(after - before) > tolerance * max(1.0, abs(before)):
            out.append(Moved(metric, before, after))
    return out
