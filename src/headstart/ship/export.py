"""ONNX export of headstart models, checked against PyTorch on golden inputs.

The exported graph takes `images` float32[batch, 3, crop, crop] (normalized as the model's input transform says; the
batch axis is dynamic) and returns `features` (the backbone's output, which a head-only update is applied to) and
`logits/<task>` per task. A head-only graph takes `features` instead. Both are written as one self-contained file
(weights inside, no side file), with the model description (model.json) in the graph's metadata under `headstart`,
so that a lone `.onnx` file can still be decoded and evaluated.
"""

from __future__ import annotations

import copy
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from headstart.core.model import HeadstartModel
from headstart.errors import ExportError
from headstart.serve.bundle import DEFAULT_ATOL, METADATA_KEY, Wording, compare_outputs, first_line
from headstart.serve.runtime import FEATURES_NAME, INPUT_NAME, logits_name, ort_session

log = logging.getLogger(__name__)

# The description key, the default tolerance, how a failed comparison is worded and the comparison itself are
# serve's (a bundle's graph is compared with its golden outputs at load, without torch); export uses them too.
__all__ = ["DEFAULT_ATOL", "METADATA_KEY", "Wording", "check_parity", "compare_outputs", "export_head_onnx"]
__all__ += ["export_onnx", "first_line", "input_size", "read_metadata"]


class _ImageGraph(nn.Module):
    """images -> (features, logits of each task in flow order): the tuple the exporter needs."""

    def __init__(self, model: HeadstartModel) -> None:
        super().__init__()
        self.backbone = model.backbone
        self.head = model.head
        self.paths = model.flow.leaf_paths

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features = self.backbone(images)
        if features.dim() == 4:
            features = features.mean(dim=(2, 3))
        logits = self.head(features)
        return (features, *(logits[p] for p in self.paths))


class _HeadGraph(nn.Module):
    """features -> (logits of each task in flow order)."""

    def __init__(self, model: HeadstartModel) -> None:
        super().__init__()
        self.head = model.head
        self.paths = model.flow.leaf_paths

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits = self.head(features)
        return tuple(logits[p] for p in self.paths)


def input_size(model: HeadstartModel) -> int:
    """The square input side the model expects (its transform's crop)."""
    if model.input_transform is None:
        raise ExportError("the model records no input transform, so the input size of its export is unknown")
    return int(model.input_transform.crop)


def export_onnx(
    model: HeadstartModel,
    path: str | Path,
    metadata: dict[str, Any] | None = None,
    opset: int | None = None,
) -> Path:
    """Export the image model (backbone + head) to one self-contained ONNX file at `path` (written atomically)."""
    if model.backbone is None:
        raise ExportError(
            "this model is a head trained on DoF features (no backbone): export the image model "
            "(checkpoints/image_model.ckpt), or use export_head_onnx for a head-only update"
        )
    model = copy.deepcopy(model).cpu().eval()
    side = input_size(model)
    example = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(0))
    outputs = [FEATURES_NAME, *(logits_name(p) for p in model.flow.leaf_paths)]
    try:
        program = _export(_ImageGraph(model), example, INPUT_NAME, outputs, opset)
    except Exception as e:
        raise ExportError(
            f"backbone '{model.backbone.name}' cannot be exported to ONNX: {type(e).__name__}: "
            f"{first_line(e)}. Fix: choose a backbone that exports (resnet, efficientnet, mobilenet, convnext, "
            "efficientnet_lite0, small_cnn are tested), or turn export off with export.onnx=false."
        ) from e
    return _save(program, Path(path), metadata)


def export_head_onnx(
    model: HeadstartModel,
    path: str | Path,
    feature_dim: int,
    metadata: dict[str, Any] | None = None,
    opset: int | None = None,
) -> Path:
    """Export only the head (features -> logits) to one self-contained ONNX file: a head update of a few KB."""
    model = copy.deepcopy(model).cpu().eval()
    example = torch.randn(2, feature_dim, generator=torch.Generator().manual_seed(0))
    outputs = [logits_name(p) for p in model.flow.leaf_paths]
    try:
        program = _export(_HeadGraph(model), example, FEATURES_NAME, outputs, opset)
    except Exception as e:
        raise ExportError(f"the head cannot be exported to ONNX: {type(e).__name__}: {first_line(e)}") from e
    return _save(program, Path(path), metadata)


def read_metadata(path: str | Path) -> dict[str, Any] | None:
    """The model description stored in an exported file, or None when it has none (not a headstart export)."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise ExportError(f"{path} is not a readable ONNX file: {type(e).__name__}: {first_line(e)}") from e
    for prop in proto.metadata_props:
        if prop.key == METADATA_KEY:
            return json.loads(prop.value)
    return None


def check_parity(
    path: str | Path, model: HeadstartModel, images: torch.Tensor, atol: float = DEFAULT_ATOL
) -> dict[str, float]:
    """Run the ONNX file and the PyTorch model on `images`; return the largest |logit difference| per task.

    Raises ExportError when any logit differs by more than `atol` or any decision (what `TaskFlow.predict` decides,
    applicability included) differs.
    """
    model = model.eval()
    session = ort_session(path, threads=None)
    paths = model.flow.leaf_paths
    names = [logits_name(p) for p in paths]
    device = next(model.parameters()).device
    with torch.inference_mode():
        expected = {k: v.float().cpu() for k, v in model(images.to(device)).items()}
    got_arrays = session.run(names, {INPUT_NAME: images.detach().cpu().numpy().astype(np.float32)})
    got = dict(zip(paths, got_arrays, strict=True))
    return compare_outputs(expected, got, model.flow, atol, what=f"{Path(path).name} (ONNX Runtime)")


def _export(module: nn.Module, example: torch.Tensor, input_name: str, outputs: list[str], opset: int | None):
    batch = torch.export.Dim("batch", min=1, max=65536)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in ("torch.onnx", "onnx_ir", "onnxscript"):  # their INFO lines are pass-by-pass chatter
            logging.getLogger(name).setLevel(logging.WARNING)
        return torch.onnx.export(
            module,
            (example,),
            dynamo=True,
            external_data=False,
            input_names=[input_name],
            output_names=outputs,
            dynamic_shapes=({0: batch},),
            opset_version=opset,
            verbose=False,
        )


def _save(program: Any, path: Path, metadata: dict[str, Any] | None) -> Path:
    import onnx

    proto = program.model_proto
    if metadata is not None:
        del proto.metadata_props[:]
        proto.metadata_props.add(key=METADATA_KEY, value=json.dumps(metadata))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        onnx.save_model(proto, str(tmp), save_as_external_data=False)
        onnx.checker.check_model(str(tmp))
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
