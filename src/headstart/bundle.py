"""Bundles: self-contained directories a model ships in, verified file by file.

A full bundle holds `model.onnx` (images -> features and logits), `model.json` (what the model is: input transform,
tasks and classes, flow conditions, thresholds, the resolved config and its hash, metrics, library versions, backbone
hash), `golden.safetensors` (inputs and the PyTorch outputs on them) and `SHA256SUMS` (sha256sum format). A head update
holds `head.onnx` (features -> logits) instead, and applies only to a base bundle whose backbone hash it records.
Nothing in a bundle is code or pickle.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import urllib.error
import urllib.parse
import urllib.request
from datetime import UTC, datetime
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from headstart.errors import BundleError
from headstart.export import DEFAULT_ATOL, check_parity, compare_outputs, export_head_onnx, export_onnx
from headstart.model import HeadstartModel
from headstart.runtime import FEATURES_NAME, HeadRunner, logits_name

FORMAT = "headstart-bundle"
VERSION = "1.0"
DESCRIPTION = "model.json"
SUMS = "SHA256SUMS"
GOLDEN = "golden.safetensors"
FULL_GRAPH = "model.onnx"
HEAD_GRAPH = "head.onnx"
_PACKAGES = ("headstart", "torch", "torchvision", "timm", "lightning", "onnx", "onnxruntime", "numpy")


# ---- describing a model ---------------------------------------------------------------------------------------------


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
    flow = model.flow
    transform = model.input_transform.to_dict() if model.input_transform is not None else None
    backbone = dict(model.hparams.backbone or {})
    graph = FULL_GRAPH if kind == "full" else HEAD_GRAPH
    return {
        "format": FORMAT,
        "version": VERSION,
        "kind": kind,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "name": (config or {}).get("name"),
        "graph": graph,
        "input": {
            "name": "images" if kind == "full" else FEATURES_NAME,
            "shape": ["batch", 3, transform["crop"], transform["crop"]]
            if kind == "full"
            else ["batch", feature_dim],
            "dtype": "float32",
        },
        "transform": transform,
        "outputs": {
            **({"features": FEATURES_NAME} if kind == "full" else {}),
            "logits": {p: logits_name(p) for p in flow.leaf_paths},
        },
        "flow": flow.to_spec(),
        "tasks": {
            p: {"kind": t.kind, "classes": list(t.classes), "condition": flow.condition_text(p)}
            for p, t in flow.tasks.items()
        },
        "thresholds": flow.state()["thresholds"],
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
    lines = [f"{sha256_file(p)}  {p.name}" for p in sorted(tmp.iterdir()) if p.is_file()]
    (tmp / SUMS).write_text("\n".join(lines) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---- reading --------------------------------------------------------------------------------------------------------


def read_sums(folder: Path) -> dict[str, str]:
    """{file name: sha256} from SHA256SUMS. Names must be plain file names (nothing outside the folder)."""
    sums_file = folder / SUMS
    if not sums_file.is_file():
        raise BundleError(
            f"{folder} is not a bundle: it has no {SUMS}. A bundle is the folder training writes to "
            "<run dir>/bundle (or head_update); pass that folder"
        )
    sums: dict[str, str] = {}
    for n, line in enumerate(sums_file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        digest, _, name = line.partition("  ")
        name = name.strip().lstrip("*")
        if len(digest) != 64 or not name or name != Path(name).name or name in (".", ".."):
            raise BundleError(f"{sums_file}, line {n}: not '<sha256>  <file name>': {line[:80]!r}")
        sums[name] = digest.lower()
    return sums


def verify_bundle(folder: str | Path) -> dict[str, Any]:
    """Check every file against SHA256SUMS and return model.json; BundleError naming the first problem."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BundleError(f"bundle {folder} does not exist (or is not a folder)")
    sums = read_sums(folder)
    for name in (DESCRIPTION, GOLDEN):
        if name not in sums:
            raise BundleError(f"bundle {folder}: {SUMS} does not list {name}; the bundle is incomplete")
    for name, digest in sums.items():
        path = folder / name
        if not path.is_file():
            raise BundleError(
                f"bundle {folder}: {name} is listed in {SUMS} but missing; the bundle is incomplete"
            )
        if sha256_file(path) != digest:
            raise BundleError(
                f"bundle {folder}: {name} does not match its sha256 in {SUMS}: the file was changed or corrupted "
                "after export. Refusing it; re-download or re-export the bundle"
            )
    desc = json.loads((folder / DESCRIPTION).read_text())
    if desc.get("format") != FORMAT or desc.get("kind") not in ("full", "head_update"):
        raise BundleError(f"bundle {folder}: model.json is not a {FORMAT} description")
    if str(desc.get("version", "")).split(".")[0] != VERSION.split(".")[0]:
        raise BundleError(
            f"bundle {folder} has format version {desc.get('version')}; this headstart reads {VERSION}. "
            "Upgrade headstart or re-export the bundle"
        )
    graph = desc.get("graph")
    if graph != (FULL_GRAPH if desc["kind"] == "full" else HEAD_GRAPH):
        raise BundleError(
            f"bundle {folder}: a {desc['kind']} bundle's graph must be named as such, not {graph!r}"
        )
    if graph not in sums:
        raise BundleError(f"bundle {folder}: its graph {graph!r} is not listed in {SUMS}")
    return desc


def read_golden(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / GOLDEN))


def is_url(source: str | Path) -> bool:
    return isinstance(source, str) and urllib.parse.urlparse(source).scheme in ("http", "https")


def default_cache_dir() -> Path:
    import os

    base = os.environ.get("HEADSTART_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "headstart"
    )
    return Path(base) / "bundles"


def fetch_bundle(url: str, cache_dir: str | Path | None = None, timeout: float = 60.0) -> Path:
    """Download the bundle folder at `url` (its SHA256SUMS, then each listed file) into the cache and verify it.

    A cached copy that still verifies is used without any network access.
    """
    base = url if url.endswith("/") else url + "/"
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = cache / hashlib.sha256(base.encode()).hexdigest()[:24]
    if folder.is_dir():
        try:
            verify_bundle(folder)
            return folder
        except BundleError:
            shutil.rmtree(folder, ignore_errors=True)
    tmp = folder.with_name(folder.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _download(base + SUMS, tmp / SUMS, timeout)
        try:
            for name in read_sums(tmp):
                _download(base + urllib.parse.quote(name), tmp / name, timeout)
            verify_bundle(tmp)
        except BundleError as e:  # name the URL, not the temporary download folder
            raise BundleError(str(e).replace(str(tmp), url)) from None
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _download(url: str, path: Path, timeout: float) -> None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(path, "wb") as f:
            shutil.copyfileobj(response, f)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        reason = getattr(e, "reason", None) or e
        raise BundleError(
            f"could not download {url}: {reason}. Check the URL and the network (offline?), or download the "
            "bundle folder yourself and pass its local path"
        ) from None
