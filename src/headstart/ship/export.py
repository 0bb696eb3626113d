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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from headstart.core.model import HeadstartModel
from headstart.errors import ExportError, HeadstartError
from headstart.serve.runtime import FEATURES_NAME, INPUT_NAME, logits_name, ort_session

log = logging.getLogger(__name__)

METADATA_KEY = "headstart"
DEFAULT_ATOL = 1e-4
DISCRETE_KINDS = ("binary", "multiclass", "multilabel")


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
    got = {p: torch.from_numpy(a) for p, a in zip(paths, got_arrays, strict=True)}
    return compare_outputs(expected, got, model.flow, atol, what=f"{Path(path).name} (ONNX Runtime)")


@dataclass(frozen=True)
class Wording:
    """How `compare_outputs` words a failure: what ran, what it had to reproduce, what the failure means, the fix.

    The default is export's: a fresh ONNX file against the PyTorch model it came from. At load, a bundle's graph is
    compared with the golden outputs stored beside it, and a run's model.onnx with the run's checkpoint."""

    subject: str  # "model.onnx (ONNX Runtime)", "bundle b: its graph model.onnx"
    reference: str = "PyTorch"  # "PyTorch", "its golden outputs", "checkpoints/best.ckpt"
    verdict: str = "the file was not kept"  # what happened to the file / what the failure means
    fix: str | None = None  # None: export's advice
    error: type[HeadstartError] = ExportError


def compare_outputs(
    expected: dict[str, torch.Tensor],
    got: dict[str, torch.Tensor],
    flow,
    atol: float,
    what: str | Wording,
) -> dict[str, float]:
    """Largest |difference| per task between two sets of logits; an error beyond `atol` or on any changed decision
    (a class, a thresholded yes/no, whether a task applies). `what`: the export's subject, or the full Wording."""
    words = what if isinstance(what, Wording) else Wording(subject=what)
    worst: dict[str, float] = {}
    for p, e in expected.items():
        g = got[p]
        if tuple(g.shape) != tuple(e.shape):
            raise words.error(
                f"{words.subject} does not reproduce {words.reference}: task '{p}' gives logits of shape "
                f"{tuple(g.shape)} instead of {tuple(e.shape)}; {words.verdict}. {words.fix or ''}".rstrip()
            )
        worst[p] = float((g - e).abs().max()) if e.numel() else 0.0
    bad = {p: d for p, d in worst.items() if not d <= atol}
    if bad:
        p, d = max(bad.items(), key=lambda kv: kv[1])
        scale = float(expected[p].abs().max())
        rounding = d <= 1e-5 * scale  # NaN anywhere is not rounding
        if rounding:
            hint = (
                f"The logits are of magnitude {scale:.3g}, so this is float32 rounding ({d / scale:.1e} relative), "
                "not a broken graph: such logits come from random or diverging weights. "
            )
            hint += words.fix or "Train the model, or allow it with export.atol=..."
        else:
            hint = (
                words.fix
                or "The export is wrong. Report it with the backbone name, or set export.onnx=false."
            )
        verb = "disagrees with" if words.reference == "PyTorch" else "does not reproduce"
        raise words.error(
            f"{words.subject} {verb} {words.reference}: task '{p}' logits differ by up to {d:.3g} (allowed "
            f"{atol:g}); {words.verdict}. {hint}"
        )
    a, b = flow.predict(expected), flow.predict(got)
    for p in expected:
        same_applicable = torch.equal(a[p]["applicable"], b[p]["applicable"])
        va, vb = a[p]["value"], b[p]["value"]
        same_value = torch.equal(torch.isnan(va), torch.isnan(vb))
        if flow.tasks[p].kind in DISCRETE_KINDS:  # regression values are compared through their logits above
            same_value = same_value and torch.equal(torch.nan_to_num(va), torch.nan_to_num(vb))
        if not (same_applicable and same_value):
            raise words.error(
                f"{words.subject} decides differently from {words.reference} for task '{p}' although the logits "
                f"are within {atol:g}: a decision flips at its threshold; {words.verdict}. {words.fix or ''}".rstrip()
            )
    return worst


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


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (libraries' messages run on for pages), or its type's name."""
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__
