"""Measure a finished run's metrics again, the way train() measured its metrics.json, and say which ones moved."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

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
    Lightning validate/test loop as training. `cwd`: where the run started (its relative paths are from there).

    The recorded config is read as data (see `headstart.data.recorded`): nothing it names is built or run."""
    import lightning as L

    from headstart.core.model import HeadstartModel
    from headstart.train.recipe import stage_metrics

    model = HeadstartModel.from_checkpoint(checkpoint)
    record = model.run_config
    if not isinstance(record, dict) or not isinstance(record.get("data"), dict):
        raise ConfigError(
            f"{checkpoint} does not record the config it was trained with, so its data cannot be found again; "
            "re-measure checkpoints written by train.py"
        )
    out: dict[str, float] = {}
    with _working_dir(cwd):
        L.seed_everything(_recorded(record, "seed", int, 0, checkpoint), workers=True, verbose=False)
        datamodule = recorded_datamodule(record, model, str(checkpoint))
        datamodule.setup("fit")
        trainer = L.Trainer(
            accelerator=accelerator,
            devices=1,
            precision=_recorded(record.get("trainer") or {}, "precision", str, "32-true", checkpoint),
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        for stage in stages:
            loop = trainer.validate if stage == "val" else trainer.test
            loop(model, datamodule=datamodule, verbose=False)
            out.update(stage_metrics(trainer, stage))
    return out


def recorded_datamodule(record: Mapping, model, source: str):
    """The DataModule a run trained on, from its recorded config: its images, or on DoF runs its feature set (found
    by fingerprint as training found it; never extracted here)."""
    from headstart.core.backbones import backbone_transform, build_backbone
    from headstart.data.extraction import dof_spec
    from headstart.data.features import FeatureDataModule
    from headstart.data.recorded import datamodule_from_record
    from headstart.dof import fingerprint

    data = record["data"]
    if not record.get("features"):
        return datamodule_from_record(data, model.input_transform, source)
    backbone_record = record.get("backbone") or {}
    extract = record.get("extract") or {}
    name = _recorded(backbone_record, "name", str, None, source)
    weights = backbone_record.get("weights")
    if weights is not None and not isinstance(weights, str):
        raise ConfigError(
            f"{source} records backbone.weights as {type(weights).__name__}, not a name or path"
        )
    unfolded = {**data, "folds": None, "fold": None} if "folds" in data else data
    images = datamodule_from_record(unfolded, backbone_transform(name), source)
    images.setup("fit")
    with torch_random_fork(_recorded(record, "seed", int, 0, source)):
        backbone = build_backbone(name, weights, freeze=True, trainable_stages=0)
    augment = data.get("augment")
    spec = dof_spec(
        backbone,
        images,
        augment if isinstance(augment, list) else None,
        _recorded(extract, "views", int, 1, source),
        _recorded(extract, "dtype", str, "float16", source),
    )
    path = extract.get("path") or Path(_recorded(extract, "dir", str, "dof", source)) / _recorded(
        extract, "dataset", str, "default", source
    ) / fingerprint(spec)
    if not (Path(path) / "manifest.json").is_file():
        raise ConfigError(
            f"{source} was trained on the DoF set {path}, which is not there any more; extract it again with "
            "extract.py and the run's config, then re-measure"
        )
    return FeatureDataModule(
        path,
        batch_size=_recorded(extract, "train_batch_size", int, 1024, source),
        seed=_recorded(record, "seed", int, 0, source),
        memory_budget=_recorded(extract, "memory_budget", int, 2 * 1024**3, source),
        folds=data.get("folds"),
        fold=data.get("fold"),
        split_seed=data.get("split_seed", 0),
    )


@contextlib.contextmanager
def torch_random_fork(seed: int) -> Iterator[None]:
    """Random weights (weights=null) drawn from `seed`, as extraction draws them, without moving the global RNG."""
    import torch

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        yield


def _recorded(section: Mapping, key: str, kind: type, default: object, source: object):
    """A plain value of a recorded config section, of type `kind` (or the default when absent)."""
    value = section.get(key, default) if isinstance(section, Mapping) else default
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ConfigError(
            f"{source} records {key} as {value!r}, not a {kind.__name__}; re-measure checkpoints written by "
            "train.py"
        )
    return value


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
