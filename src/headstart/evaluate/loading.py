"""Open any model a user points at: a run directory, a `.ckpt`, a `.onnx` file or a bundle folder (or URL)."""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate

from headstart.core.model import HeadstartModel
from headstart.core.runners import Runner, TorchRunner, as_torch
from headstart.core.transforms import InputTransform
from headstart.data import data_flow
from headstart.data.recorded import datamodule_from_record
from headstart.errors import ConfigError, DataError, ExportError, HeadstartError
from headstart.flow import TaskFlow
from headstart.serve.bundle import (
    FULL_GRAPH,
    RUNNING_FIELDS,
    Reference,
    Wording,
    check_description,
    describe_running,
    is_bundle_folder,
    is_url,
    open_graph,
    verify_graph,
)
from headstart.ship.bundle import describe_image_model
from headstart.ship.export import export_onnx, read_metadata

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "onnx", "pytorch")


@dataclass
class LoadedModel:
    """A model ready to run on image batches, with what is needed to feed it and to decode and trace it."""

    source: str
    kind: str  # "checkpoint", "onnx", "bundle"
    runner: Runner
    flow: TaskFlow
    transform: InputTransform
    config: dict | None  # the resolved training config, when recorded
    torch_model: HeadstartModel | None  # for what needs gradients (Grad-CAM); None for ONNX-only sources


def load_model(
    source: str | Path,
    runtime: str = "auto",
    threads: int | None = None,
    work_dir: Path | None = None,
    base: str | Path | None = None,
) -> LoadedModel:
    """Open `source`. runtime: "auto" (ONNX Runtime, the faster one on CPU, exporting a checkpoint to
    `work_dir/model.onnx` first when it has no export), "onnx", or "pytorch" (checkpoints only). `base`: the base
    bundle of a head update.

    Every graph is verified before it runs (bundle.verify_graph): a bundle (any folder holding a bundle's files) as
    Predictor.load does it; a run's model.onnx, or a fresh export of a checkpoint, against that checkpoint; a lone
    .onnx file against its own description."""
    if runtime not in RUNTIMES:
        raise ConfigError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    path = Path(source).expanduser()
    if is_url(source) or is_bundle_folder(path):
        return _bundle(source, runtime, threads, base)
    if base is not None:
        raise ConfigError(
            f"base={base} is the base bundle of a head update, but model={source} is not a head update (a bundle "
            "folder); drop base="
        )
    if not path.exists():
        raise ConfigError(
            f"model={source}: no such file or folder. Pass a run directory, a .ckpt, a .onnx file or a bundle folder"
        )
    if path.is_dir():
        return _run_dir(path, runtime, threads, work_dir)
    if path.suffix == ".onnx":
        if runtime == "pytorch":
            raise ConfigError(
                f"model={source} is an ONNX file: it runs with runtime=onnx (or auto), not pytorch"
            )
        return _onnx(path, threads, torch_model=None)
    if path.suffix == ".ckpt":
        return _checkpoint(path, runtime, threads, work_dir, onnx=None)
    raise ConfigError(f"model={source}: expected a run directory, a .ckpt, a .onnx file or a bundle folder")


def _bundle(source: str | Path, runtime: str, threads: int | None, base: str | Path | None) -> LoadedModel:
    from headstart.serve.predictor import Predictor

    if runtime == "pytorch":
        raise ConfigError(
            f"model={source} is a bundle (ONNX): it runs with runtime=onnx (or auto), not pytorch"
        )
    p = Predictor.load(source, base=base, threads=threads)
    flow = _task_flow(p.description)
    return LoadedModel(
        str(source), "bundle", as_torch(p), flow, p.transform, p.description.get("config"), None
    )


def _task_flow(desc: dict[str, Any]) -> TaskFlow:
    """The torch TaskFlow (losses, metrics) of a description that check_description has passed."""
    flow = TaskFlow.from_spec(desc["flow"])
    flow.load_state({"thresholds": desc.get("thresholds") or {}})
    return flow


# A lone .onnx file has no SHA256SUMS and no golden outputs: only its embedded description and the graph's shape can
# be checked. Next to its checkpoint, it must also reproduce that checkpoint on these many fixed inputs.
_LONE_FIX = (
    "The file is damaged or was edited after export (a lone .onnx file has no SHA256SUMS to tell which); re-export "
    "it, or use the run's bundle"
)
_RUN_FIX = (
    "It was changed after export or comes from another model: delete it (it is then exported afresh from the "
    "checkpoint), or use runtime=pytorch"
)
_FRESH_FIX = "The export is wrong: report it with the backbone name, and use runtime=pytorch meanwhile"
_PROBES = 4


def _onnx(
    path: Path,
    threads: int | None,
    torch_model: HeadstartModel | None,
    checkpoint: Path | None = None,
    fix: str = _LONE_FIX,
) -> LoadedModel:
    """A headstart ONNX file, verified (bundle.verify_graph) against its embedded description and, when it was
    exported from `checkpoint` (`torch_model`), against that checkpoint's description and outputs."""
    desc = read_metadata(path)
    if desc is None:
        raise ConfigError(
            f"{path} has no headstart description in its metadata, so its inputs and outputs cannot be decoded; "
            "evaluate ONNX files exported by headstart (model.onnx of a run, or a bundle)"
        )
    if isinstance(desc, dict) and desc.get("kind") == "head_update":
        raise ConfigError(
            f"{path} is the graph of a head update (features in, not images): pass its folder with its base "
            "bundle, model=HEAD_UPDATE_FOLDER base=BASE_BUNDLE"
        )
    where = str(path)
    check_description(desc, where, fix)
    flow = _task_flow(desc)
    reference = None
    if torch_model is not None and checkpoint is not None:
        reference = functools.partial(_checkpoint_reference, torch_model, checkpoint, desc, where, fix)
    runner = open_graph(path, desc, threads, where, fix)
    verify_graph(runner, desc, where, fix, reference)
    transform = InputTransform.from_dict(desc["transform"])
    return LoadedModel(str(path), "onnx", as_torch(runner), flow, transform, desc.get("config"), torch_model)


def _checkpoint_reference(
    model: HeadstartModel, checkpoint: Path, desc: dict[str, Any], where: str, fix: str
) -> Reference:
    """What an export of `checkpoint` must reproduce: the checkpoint's description of what it runs, and its logits on
    a few fixed inputs (normalized images are roughly standard normal, so are these)."""
    ours = describe_running(model.flow, model.input_transform.to_dict(), "full", model.backbone.feature_dim)
    differ = [f for f in RUNNING_FIELDS if _canonical(ours[f]) != _canonical(desc.get(f))]
    if differ:
        raise ExportError(
            f"{where} describes another model than {checkpoint}: they differ in {', '.join(differ)}. {fix}"
        )
    side = model.input_transform.crop
    images = torch.randn(_PROBES, 3, side, side, generator=torch.Generator().manual_seed(0))
    device = next(model.parameters()).device
    with torch.inference_mode():
        expected = {k: v.float().cpu() for k, v in model(images.to(device)).items()}
    words = Wording(
        subject=where,
        reference=str(checkpoint),
        verdict=f"checked on {_PROBES} fixed inputs",
        fix=fix,
    )
    return Reference(images.numpy(), {k: v.numpy() for k, v in expected.items()}, words)


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def open_image_checkpoint(path: Path) -> HeadstartModel:
    """A headstart image model (backbone + head) from a .ckpt; ConfigError for any other file or a DoF head."""
    try:
        model = HeadstartModel.from_checkpoint(path)
    except HeadstartError:
        raise
    except Exception as e:
        raise ConfigError(
            f"{path} is not a headstart checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            "use a model trained with train.py"
        ) from None
    if model.backbone is None:
        raise ConfigError(
            f"{path} is a head trained on DoF features (no backbone), so it cannot read images. Use the "
            "image model of that run: checkpoints/image_model.ckpt (or its model.onnx or bundle/)"
        )
    return model


def run_checkpoint(run_dir: Path) -> Path | None:
    """The image model checkpoint of a run directory: image_model.ckpt (DoF runs), else best.ckpt."""
    checkpoints = run_dir / "checkpoints"
    return next(
        (c for c in (checkpoints / "image_model.ckpt", checkpoints / "best.ckpt") if c.is_file()), None
    )


def _checkpoint(
    path: Path, runtime: str, threads: int | None, work_dir: Path | None, onnx: Path | None
) -> LoadedModel:
    model = open_image_checkpoint(path)
    model.eval()
    if runtime == "pytorch":
        return LoadedModel(
            str(path),
            "checkpoint",
            TorchRunner(model, threads),
            model.flow,
            model.input_transform,
            model.run_config,
            model,
        )
    if onnx is None:
        if work_dir is None:
            raise ExportError("runtime=onnx on a checkpoint needs a folder to export to")
        onnx = work_dir / FULL_GRAPH
        export_onnx(model, onnx, metadata=describe_image_model(model, model.run_config))
        log.info("exported %s to %s for ONNX Runtime", path, onnx)
        loaded = _onnx(onnx, threads, torch_model=model, checkpoint=path, fix=_FRESH_FIX)
    else:
        loaded = _onnx(onnx, threads, torch_model=model, checkpoint=path, fix=_RUN_FIX)
    loaded.source, loaded.kind = str(path), "checkpoint"
    return loaded


def _run_dir(path: Path, runtime: str, threads: int | None, work_dir: Path | None) -> LoadedModel:
    checkpoints = path / "checkpoints"
    ckpt = next(
        (c for c in (checkpoints / "image_model.ckpt", checkpoints / "best.ckpt") if c.is_file()), None
    )
    onnx = path / FULL_GRAPH
    if ckpt is None and is_bundle_folder(path / "bundle"):  # nothing to check model.onnx against
        return _bundle(path / "bundle", runtime, threads, None)
    if ckpt is None and not onnx.is_file():
        raise ConfigError(
            f"model={path}: a folder must be a run directory (with checkpoints/best.ckpt, bundle/ or model.onnx) or "
            "a bundle (with model.json and SHA256SUMS); this one is neither"
        )
    if ckpt is None:
        return _onnx(onnx, threads, torch_model=None)
    loaded = _checkpoint(ckpt, runtime, threads, work_dir, onnx=onnx if onnx.is_file() else None)
    if loaded.kind == "checkpoint" and onnx.is_file() and loaded.runner.runtime == "onnxruntime":
        loaded.kind = "onnx"
        loaded.source = str(onnx)
    return loaded


def model_datamodule(data_cfg: Any, loaded: LoadedModel, split: str) -> L.LightningDataModule:
    """The data to run a model on: `data_cfg` (from the command line), else the data the model was trained on, read
    with the model's own input transform. It must have `split`, and its tasks must be the model's."""
    if data_cfg is None:
        recorded = (loaded.config or {}).get("data") if isinstance(loaded.config, dict) else None
        if not recorded:
            raise ConfigError(
                f"{loaded.source} does not record the data it was trained on; name the data: "
                "data=folder data.root=/path/to/images (or another data config)"
            )
        datamodule = datamodule_from_record(recorded, loaded.transform, loaded.source)  # never instantiated
    else:
        datamodule = instantiate(data_cfg, transform=loaded.transform)  # the user's own composed config
        datamodule.prepare_data()
    datamodule.setup("fit")
    splits = sorted(set(datamodule.table.frame["split"].astype(str)))
    if split not in splits:
        raise DataError(
            f"the data has no split {split!r}; its splits are {', '.join(splits)}. Use split=<one>"
        )
    check_tasks(loaded.flow, datamodule)
    return datamodule


def check_tasks(flow: TaskFlow, datamodule: L.LightningDataModule) -> None:
    """DataError unless the data answers every task of `flow` with the same kind and classes."""
    data = TaskFlow.from_spec(data_flow(datamodule))
    for path, task in flow.tasks.items():
        other = data.tasks.get(path)
        if other is None or other.kind != task.kind or list(other.classes) != list(task.classes):
            theirs = f"{other.kind} {list(other.classes)}" if other else "absent"
            raise DataError(
                f"the data does not answer the model's task '{path}' ({task.kind} {list(task.classes)}); in the "
                f"data it is {theirs}. Use data with the same tasks and classes (data=..., data.root=...)"
            )
