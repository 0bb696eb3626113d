"""Bundles: self-contained directories a model ships in, verified file by file.

A full bundle holds `model.onnx` (images -> features and logits), `model.json` (what the model is: input transform,
tasks and classes, flow conditions, thresholds, the resolved config and its hash, metrics, library versions, backbone
hash), `golden.safetensors` (inputs and the PyTorch outputs on them) and `SHA256SUMS` (sha256sum format). A head update
holds `head.onnx` (features -> logits) instead, and applies only to a base bundle whose backbone hash it records.
Nothing in a bundle is code or pickle.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import platform
import re
import shutil
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata as importlib_metadata
from numbers import Real
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from headstart.core.model import HeadstartModel
from headstart.core.transforms import InputTransform
from headstart.errors import BundleError, ConfigError
from headstart.flow import FlowSpecError, TaskFlow
from headstart.serve.runtime import FEATURES_NAME, INPUT_NAME, HeadRunner, OnnxRunner, logits_name
from headstart.ship.export import (
    DEFAULT_ATOL,
    METADATA_KEY,
    Wording,
    check_parity,
    compare_outputs,
    export_head_onnx,
    export_onnx,
    first_line,
)

FORMAT = "headstart-bundle"
VERSION = "1.0"
DESCRIPTION = "model.json"
SUMS = "SHA256SUMS"
GOLDEN = "golden.safetensors"
FULL_GRAPH = "model.onnx"
HEAD_GRAPH = "head.onnx"
KINDS = ("full", "head_update")
RUNNING_FIELDS = ("kind", "input", "transform", "outputs", "flow", "tasks", "thresholds")
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


def describe_running(flow: TaskFlow, transform: dict | None, kind: str, feature_dim: int) -> dict[str, Any]:
    """The part of model.json that feeds, runs and decodes the graph (RUNNING_FIELDS): what must agree wherever a
    description of the same model is found (model.json, the graph's own metadata, the checkpoint it came from)."""
    full = kind == "full"
    return {
        "kind": kind,
        "input": {
            "name": INPUT_NAME if full else FEATURES_NAME,
            "shape": ["batch", 3, transform["crop"], transform["crop"]]
            if full
            else ["batch", int(feature_dim)],
            "dtype": "float32",
        },
        "transform": transform,
        "outputs": {
            **({"features": FEATURES_NAME} if full else {}),
            "logits": {p: logits_name(p) for p in flow.leaf_paths},
        },
        "flow": flow.to_spec(),
        "tasks": {
            p: {"kind": t.kind, "classes": list(t.classes), "condition": flow.condition_text(p)}
            for p, t in flow.tasks.items()
        },
        "thresholds": flow.state()["thresholds"],
    }


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


# ---- reading and verifying ------------------------------------------------------------------------------------------
#
# Every graph headstart runs passes verify_graph first: a bundle's (and a head update's base's) once its files match
# SHA256SUMS, with its golden outputs as the reference; a run's model.onnx (or a fresh export of a checkpoint) with
# that checkpoint's outputs as the reference; a lone .onnx file with no reference (docs/shipping.md says what that
# leaves unchecked).

BUNDLE_FIX = (
    "The bundle is damaged or was edited after export; refusing it. Re-export it from its run (train.py writes "
    "<run dir>/bundle) or download it again"
)
_MARKERS = (DESCRIPTION, SUMS, GOLDEN, HEAD_GRAPH)  # files only a bundle holds (a run directory holds none)
_MAX_FEATURES = 1 << 20


def is_bundle_folder(path: Path) -> bool:
    """A folder holding any file of a bundle's own (model.json, SHA256SUMS, golden outputs, a head graph) is opened,
    and verified, as a bundle, whatever else it holds."""
    return path.is_dir() and any((path / name).is_file() for name in _MARKERS)


def read_sums(folder: Path) -> dict[str, str]:
    """{file name: sha256} from SHA256SUMS. Names must be plain file names (nothing outside the folder)."""
    sums_file = folder / SUMS
    if not sums_file.is_file():
        raise BundleError(
            f"{folder} cannot be verified: it has no {SUMS}, so nothing says its files are the ones exported. "
            f"Refusing to run it. A bundle is the folder training writes to <run dir>/bundle (or head_update), "
            f"{SUMS} included: re-export it or download it again"
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
    """Check every file against SHA256SUMS and model.json's fields (check_description) and return model.json;
    BundleError naming the first problem. The graph itself is checked by verify_graph (see open_bundle)."""
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
    try:
        desc = json.loads((folder / DESCRIPTION).read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise BundleError(f"bundle {folder}: {DESCRIPTION} is not JSON ({e}). {BUNDLE_FIX}") from None
    check_description(desc, f"bundle {folder}: {DESCRIPTION}", BUNDLE_FIX)
    if desc["graph"] not in sums:
        raise BundleError(f"bundle {folder}: its graph {desc['graph']!r} is not listed in {SUMS}")
    return desc


def check_description(desc: Any, where: str, fix: str) -> TaskFlow:
    """The flow of a model description (model.json, or the one inside an exported graph), thresholds loaded;
    BundleError naming the first field, among those used to feed, run and decode the graph, that is missing, out of
    range or disagrees with the others. `where` starts the message, `fix` ends it."""

    def bad(problem: str) -> BundleError:
        return BundleError(f"{where}: {problem}. {fix}")

    if not isinstance(desc, dict) or desc.get("format") != FORMAT:
        raise bad(f"not a {FORMAT} description")
    if str(desc.get("version", "")).split(".")[0] != VERSION.split(".")[0]:
        raise BundleError(
            f"{where} has format version {desc.get('version')!r}; this headstart reads {VERSION}. "
            "Upgrade headstart or re-export the model"
        )
    kind = desc.get("kind")
    if kind not in KINDS:
        raise bad(f"field kind must be one of {', '.join(KINDS)}, got {_short(kind)}")
    graph = FULL_GRAPH if kind == "full" else HEAD_GRAPH
    if desc.get("graph") != graph:
        raise bad(f"field graph: a {kind} model's graph is {graph!r}, not {_short(desc.get('graph'))}")
    try:
        flow = TaskFlow.from_spec(desc.get("flow"))
    except FlowSpecError as e:
        raise bad(f"field flow: {e}") from None
    thresholds = desc.get("thresholds")
    want = [p for p, t in flow.tasks.items() if t.has_threshold]
    if not isinstance(thresholds, dict) or sorted(thresholds) != sorted(want):
        raise bad(
            f"field thresholds must give each binary and multilabel task ({', '.join(want) or 'none'}) its "
            f"threshold, got {_short(thresholds)}"
        )
    try:
        flow.load_state({"thresholds": thresholds})
    except FlowSpecError as e:
        raise bad(f"field {e}") from None
    backbone = desc.get("backbone")
    feature_dim = backbone.get("feature_dim") if isinstance(backbone, dict) else None
    if not _whole(feature_dim, 1, _MAX_FEATURES):
        raise bad(
            f"field backbone.feature_dim must be a whole number in [1, {_MAX_FEATURES}], got {_short(feature_dim)}"
        )
    digest = backbone.get("weights_sha256")
    if not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
        raise bad(f"field backbone.weights_sha256 must be a sha256 (64 hex digits), got {_short(digest)}")
    transform = desc.get("transform")
    if kind == "full" or transform is not None:
        try:
            InputTransform.from_dict(transform)
        except ConfigError as e:
            raise bad(f"field {e}") from None
    expected = describe_running(flow, transform, kind, feature_dim)
    for field in ("input", "outputs", "tasks"):
        if _plain(desc.get(field)) != _plain(expected[field]):
            raise bad(
                f"field {field} is {_short(desc.get(field))}, but the transform, backbone.feature_dim and flow "
                f"make it {_short(expected[field])}"
            )
    golden = desc.get("golden")
    if not isinstance(golden, dict) or golden.get("file") != GOLDEN:
        raise bad(f"field golden.file must be {GOLDEN!r}, got {_short(golden)}")
    if not _whole(golden.get("count"), 0, None):
        raise bad(f"field golden.count must be a whole number >= 0, got {_short(golden.get('count'))}")
    atol = golden.get("atol")
    if not (isinstance(atol, Real) and not isinstance(atol, bool) and math.isfinite(atol) and atol > 0):
        raise bad(f"field golden.atol must be a finite positive number, got {_short(atol)}")
    return flow


@dataclass(frozen=True)
class Reference:
    """What a graph must reproduce before it runs: inputs, the logits expected on them, how to word a failure."""

    inputs: np.ndarray
    logits: dict[str, torch.Tensor]
    words: Wording


def open_graph(
    path: Path, desc: dict[str, Any], threads: int | None, where: str, fix: str
) -> OnnxRunner | HeadRunner:
    """An ONNX Runtime runner for the graph `desc` describes (images -> logits, or features -> logits for a head);
    BundleError when ONNX Runtime cannot load the file."""
    tasks = list(desc["tasks"])
    try:
        return (
            OnnxRunner(path, tasks, threads) if desc["kind"] == "full" else HeadRunner(path, tasks, threads)
        )
    except Exception as e:  # onnxruntime raises its own exception types for a file it cannot load
        raise BundleError(f"{where}: ONNX Runtime cannot load {path.name}: {first_line(e)}. {fix}") from None


def verify_graph(
    runner: OnnxRunner | HeadRunner,
    desc: dict[str, Any],
    where: str,
    fix: str,
    reference: Callable[[], Reference] | None = None,
) -> None:
    """The one check a graph passes before headstart runs it: its description is sane (check_description), the
    graph's input and outputs are the ones described (names; the input's sizes agree with the transform; the logits
    per task), the description embedded in the graph (when there is one) agrees with `desc` on everything used to
    run it, and, given a `reference` (built only once all that passed), the graph reproduces it (within
    golden.atol, every decision the same)."""

    def bad(problem: str) -> BundleError:
        return BundleError(f"{where}: {problem}. {fix}")

    flow = check_description(desc, where, fix)
    session = runner.session
    declared = desc["input"]
    inputs = session.get_inputs()
    if [i.name for i in inputs] != [declared["name"]]:
        raise bad(
            f"the graph takes {[i.name for i in inputs]}, but its description says {declared['name']!r}"
        )
    shape, want = list(inputs[0].shape), declared["shape"]
    if len(shape) != len(want) or any(
        isinstance(g, int) and g != w for g, w in zip(shape[1:], want[1:], strict=True)
    ):
        raise bad(
            f"the graph's input {declared['name']!r} has shape {shape}, but its description says {want}"
        )
    outputs = {o.name: list(o.shape) for o in session.get_outputs()}
    if desc["kind"] == "full" and FEATURES_NAME not in outputs:
        raise bad(f"the graph has no output {FEATURES_NAME!r}")
    for path, task in flow.tasks.items():
        name = logits_name(path)
        if name not in outputs:
            raise bad(f"the graph has no output {name!r} for task '{path}'")
        dims = outputs[name][1:]
        n = task.num_outputs
        ok = (
            dims in ([], [1]) if n == 1 else len(dims) == 1 and (not isinstance(dims[0], int) or dims[0] == n)
        )
        if not ok:
            raise bad(
                f"the graph's output {name!r} has shape {outputs[name]}, but task '{path}' ({task.kind}"
                f"{' ' + str(list(task.classes)) if task.classes else ''}) needs {n} logit(s) per image"
            )
    embedded = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    if embedded is not None:
        try:
            inner = json.loads(embedded)
        except ValueError:
            raise bad("the description inside the graph is not JSON") from None
        if not isinstance(inner, dict):
            raise bad("the description inside the graph is not a mapping")
        differ = [f for f in RUNNING_FIELDS if _plain(inner.get(f)) != _plain(desc.get(f))]
        if differ:
            raise bad(f"the description inside the graph disagrees with this one on {', '.join(differ)}")
    if reference is None:
        return
    expected = reference()
    try:
        got = runner(expected.inputs)
    except Exception as e:  # onnxruntime's own error types: the graph cannot run on what it says it takes
        raise bad(f"the graph fails on the inputs it is checked with: {first_line(e)}") from None
    compare_outputs(expected.logits, got, flow, float(desc["golden"]["atol"]), expected.words)


def golden_reference(folder: Path, desc: dict[str, Any], source: str) -> Reference:
    """The golden inputs and outputs stored in a bundle, which its graph must reproduce on load."""
    where = f"bundle {source}: {GOLDEN}"
    try:
        golden = load_file(str(folder / GOLDEN))
    except Exception as e:  # safetensors' own error types on a malformed file
        raise BundleError(f"{where} is not readable: {first_line(e)}. {BUNDLE_FIX}") from None
    name = "input" if desc["kind"] == "full" else FEATURES_NAME
    needed = [name, *(logits_name(p) for p in desc["tasks"])]
    missing = [n for n in needed if n not in golden]
    if missing:
        raise BundleError(f"{where} lacks {', '.join(missing)}. {BUNDLE_FIX}")
    x, count = golden[name], desc["golden"]["count"]
    shape = (count, *desc["input"]["shape"][1:])
    if count < 1 or x.dtype != torch.float32 or tuple(x.shape) != shape:
        raise BundleError(
            f"{where}: {name!r} is {x.dtype} {tuple(x.shape)}, but model.json says {count} golden input(s) of shape "
            f"{shape[1:]} (float32). {BUNDLE_FIX}"
        )
    words = Wording(
        subject=f"bundle {source}: its graph {desc['graph']}",
        reference="its golden outputs",
        verdict="the bundle is damaged or was edited after export",
        fix="Refusing it. Re-export it from its run (train.py writes <run dir>/bundle) or download it again",
        error=BundleError,
    )
    return Reference(x.numpy(), {p: golden[logits_name(p)] for p in desc["tasks"]}, words)


@dataclass(frozen=True)
class OpenBundle:
    """A verified bundle: its folder (local, or the cached download), model.json, and its graph ready to run."""

    folder: Path
    description: dict[str, Any]
    runner: OnnxRunner | HeadRunner


def open_bundle(
    source: str | Path, threads: int | None = None, cache_dir: str | Path | None = None, golden: bool = True
) -> OpenBundle:
    """Open a bundle folder or URL for running: files against SHA256SUMS, model.json's fields, then verify_graph
    with (`golden`) the bundle's golden outputs as the reference. BundleError naming the first problem."""
    folder = fetch_bundle(str(source), cache_dir) if is_url(source) else Path(source).expanduser()
    desc = verify_bundle(folder)
    where = f"bundle {source}"
    runner = open_graph(folder / desc["graph"], desc, threads, where, BUNDLE_FIX)
    reference = functools.partial(golden_reference, folder, desc, str(source)) if golden else None
    verify_graph(runner, desc, where, BUNDLE_FIX, reference)
    return OpenBundle(folder, desc, runner)


def _whole(value: Any, low: int, high: int | None) -> bool:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
    return ok and (high is None or value <= high)


def _plain(value: Any) -> Any:
    """JSON's view of a value (tuples as lists, keys as strings), for comparing descriptions."""
    return json.loads(json.dumps(value, default=str))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 160 else text[:157] + "..."


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
