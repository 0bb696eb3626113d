"""Writing bundles: a full bundle of an image model, or a head update, from a trained HeadstartModel.

The format (model.json, SHA256SUMS, golden.safetensors, the graph) and everything that reads and verifies it is
`headstart.serve.bundle`'s, which runs without torch; writing needs the model, torch and the ONNX exporter, so it
lives here.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
from datetime import UTC, datetime
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from headstart.core.model import HeadstartModel
from headstart.errors import BundleError
from headstart.serve.bundle import (
    DEFAULT_ATOL,
    DESCRIPTION,
    FORMAT,
    FULL_GRAPH,
    GOLDEN,
    HEAD_GRAPH,
    RUNNING_FIELDS,
    VERSION,
    compare_outputs,
    describe_running,
)
from headstart.serve.checksums import SUMS, sums_text
from headstart.serve.runtime import FEATURES_NAME, HeadRunner, logits_name
from headstart.ship.export import check_parity, export_head_onnx, export_onnx

_PACKAGES = ("headstart", "torch", "torchvision", "timm", "lightning", "onnx", "onnxruntime", "numpy")


def config_hash(config: dict | None) -> str | None:
    """sha256 of the resolved config as canonical JSON: two runs with the same hash ran the same config."""
    if config is None:
        return None
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            continue
    return versions


def describe_model(
    model: HeadstartModel,
    kind: str,
    backbone_sha256: str,
    feature_dim: int,
    config: dict | None = None,
    metrics: dict[str, float] | None = None,
    golden_count: int = 0,
    atol: float = DEFAULT_ATOL,
) -> dict[str, Any]:
    """model.json: everything needed to feed, run and decode the graph, and to trace it back to its run."""
    transform = model.input_transform.to_dict() if model.input_transform is not None else None
    backbone = dict(model.hparams.backbone or {})
    running = describe_running(model.flow, transform, kind, feature_dim)
    return {
        "format": FORMAT,
        "version": VERSION,
        "kind": kind,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "name": (config or {}).get("name"),
        "graph": FULL_GRAPH if kind == "full" else HEAD_GRAPH,
        **{k: running[k] for k in RUNNING_FIELDS if k != "kind"},
        "backbone": {
            "name": backbone.get("name"),
            "weights": backbone.get("weights"),
            "weights_sha256": backbone_sha256,
            "feature_dim": int(feature_dim),
        },
        "head": dict(model.hparams.head or {}),
        "config": config,
        "config_sha256": config_hash(config),
        "metrics": {k: v for k, v in (metrics or {}).items() if not k.endswith("/count")},
        "versions": library_versions(),
        "golden": {"file": GOLDEN, "count": int(golden_count), "atol": float(atol)},
    }


def describe_image_model(
    model: HeadstartModel,
    config: dict | None = None,
    metrics: dict[str, float] | None = None,
    golden_count: int = 0,
    atol: float = DEFAULT_ATOL,
) -> dict[str, Any]:
    """model.json of a full (backbone + head) model."""
    if model.backbone is None:
        raise BundleError(
            "a full bundle needs an image model (backbone + head); this one is a head trained on DoF features. "
            "Write a head update with write_head_update, or bundle checkpoints/image_model.ckpt"
        )
    return describe_model(
        model,
        "full",
        model.backbone.weights_sha256(),
        model.backbone.feature_dim,
        config,
        metrics,
        golden_count=golden_count,
        atol=atol,
    )


# ---- writing --------------------------------------------------------------------------------------------------------


def write_bundle(
    model: HeadstartModel,
    out: str | Path,
    golden: torch.Tensor,
    config: dict | None = None,
    metrics: dict[str, float] | None = None,
    onnx_path: str | Path | None = None,
    atol: float = DEFAULT_ATOL,
) -> Path:
    """Write a full bundle of the image `model` to directory `out` (replaced whole, or not at all).

    `golden` are input images (float[N, 3, crop, crop]) whose PyTorch outputs are stored beside them; the graph must
    reproduce them within `atol` (ExportError otherwise). `onnx_path`: an export of this model to reuse.
    """
    out = Path(out)
    desc = describe_image_model(model.eval(), config, metrics, golden_count=len(golden), atol=atol)
    tmp = _fresh_tmp(out)
    try:
        graph = tmp / FULL_GRAPH
        if onnx_path is not None:
            shutil.copyfile(onnx_path, graph)
        else:
            export_onnx(model, graph, metadata=desc)
        check_parity(graph, model, golden, atol=atol)
        device = next(model.parameters()).device
        with torch.inference_mode():
            features = model.backbone(golden.to(device)).float().cpu()
            logits = model(golden.to(device))
        tensors = {"input": golden.float().cpu().contiguous(), FEATURES_NAME: features.contiguous()}
        tensors.update({logits_name(p): v.float().cpu().contiguous() for p, v in logits.items()})
        save_file(tensors, str(tmp / GOLDEN))
        _finish(tmp, out, desc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def write_head_update(
    model: HeadstartModel,
    out: str | Path,
    backbone_sha256: str,
    golden_features: torch.Tensor,
    config: dict | None = None,
    metrics: dict[str, float] | None = None,
    atol: float = DEFAULT_ATOL,
) -> Path:
    """Write a head-only update (a few KB) for base bundles whose backbone has weights hash `backbone_sha256`.

    `golden_features` are backbone outputs (float[N, D]), e.g. rows of the DoF set the head was trained on.
    """
    out = Path(out)
    model = model.eval()
    golden_features = golden_features.detach().float().cpu()
    feature_dim = int(golden_features.shape[1])
    desc = describe_model(
        model, "head_update", backbone_sha256, feature_dim, config, metrics, len(golden_features), atol
    )
    tmp = _fresh_tmp(out)
    try:
        graph = export_head_onnx(model, tmp / HEAD_GRAPH, feature_dim, metadata=desc)
        device = next(model.head.parameters()).device
        with torch.inference_mode():
            logits = model.head(golden_features.float().to(device))
        got = HeadRunner(graph, model.flow.leaf_paths, threads=1)(golden_features.float().numpy())
        expected = {p: v.float().cpu() for p, v in logits.items()}
        compare_outputs(expected, got, model.flow, atol, what=HEAD_GRAPH)
        tensors = {FEATURES_NAME: golden_features.float().cpu().contiguous()}
        tensors.update({logits_name(p): v.contiguous() for p, v in expected.items()})
        save_file(tensors, str(tmp / GOLDEN))
        _finish(tmp, out, desc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _fresh_tmp(out: Path) -> Path:
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _finish(tmp: Path, out: Path, desc: dict) -> None:
    # Not sort_keys: the order of the flow's tasks is its declaration order (columns, reports, explain follow it).
    (tmp / DESCRIPTION).write_text(json.dumps(desc, indent=2, default=str) + "\n")
    (tmp / SUMS).write_text(sums_text(tmp))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
