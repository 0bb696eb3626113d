"""Bundles: self-contained directories a model ships in, verified file by file.

A full bundle holds `model.onnx` (images -> features and logits), `model.json` (what the model is: input transform,
tasks and classes, flow conditions, thresholds, the resolved config and its hash, metrics, library versions, backbone
hash), `golden.safetensors` (inputs and the PyTorch outputs on them) and `SHA256SUMS` (sha256sum format). A head update
holds `head.onnx` (features -> logits) instead, and applies only to a base bundle whose backbone hash it records.
Nothing in a bundle is code or pickle.

This module reads, fetches and verifies bundles with numpy, onnxruntime and safetensors only; writing them needs the
model and torch (`headstart.ship.bundle`). Checking a run's model.onnx against its checkpoint is
`headstart.evaluate.loading`'s, through the same `verify_graph`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
import shutil
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from numbers import Real
from pathlib import Path
from typing import Any

import numpy as np

from headstart.errors import BundleError, ConfigError, ExportError, HeadstartError
from headstart.serve.checksums import SUMS, sha256_file
from headstart.serve.decode import predictions
from headstart.serve.flowspec import DISCRETE_KINDS, FlowSpec, FlowSpecError
from headstart.serve.runtime import FEATURES_NAME, INPUT_NAME, HeadRunner, OnnxRunner, logits_name
from headstart.serve.transform import InputTransform

FORMAT = "headstart-bundle"
VERSION = "1.0"
DESCRIPTION = "model.json"
GOLDEN = "golden.safetensors"
FULL_GRAPH = "model.onnx"
HEAD_GRAPH = "head.onnx"
KINDS = ("full", "head_update")
RUNNING_FIELDS = ("kind", "input", "transform", "outputs", "flow", "tasks", "thresholds")
METADATA_KEY = "headstart"  # the key of the description inside an exported graph's metadata
DEFAULT_ATOL = 1e-4

__all__ = ["OpenBundle", "open_bundle", "sha256_file", "verify_bundle", "verify_graph"]


# ---- describing what runs ------------------------------------------------------------------------------------------


def describe_running(flow: FlowSpec, transform: dict | None, kind: str, feature_dim: int) -> dict[str, Any]:
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


def check_description(desc: Any, where: str, fix: str) -> FlowSpec:
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
        flow = FlowSpec.from_spec(desc.get("flow"))
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
    expected: Mapping[str, Any],
    got: Mapping[str, Any],
    flow: FlowSpec,
    atol: float,
    what: str | Wording,
) -> dict[str, float]:
    """Largest |difference| per task between two sets of logits (numpy arrays, or CPU tensors: anything np.asarray
    takes); an error beyond `atol` or on any changed decision (a class, a thresholded yes/no, whether a task applies).
    `what`: the export's subject, or the full Wording."""
    words = what if isinstance(what, Wording) else Wording(subject=what)
    expected = {p: np.asarray(v, dtype=np.float32) for p, v in expected.items()}
    got = {p: np.asarray(got[p], dtype=np.float32) for p in expected}
    worst: dict[str, float] = {}
    for p, e in expected.items():
        g = got[p]
        if g.shape != e.shape:
            raise words.error(
                f"{words.subject} does not reproduce {words.reference}: task '{p}' gives logits of shape "
                f"{tuple(g.shape)} instead of {tuple(e.shape)}; {words.verdict}. {words.fix or ''}".rstrip()
            )
        worst[p] = float(np.abs(g - e).max()) if e.size else 0.0
    bad = {p: d for p, d in worst.items() if not d <= atol}
    if bad:
        p, d = max(bad.items(), key=lambda kv: kv[1])
        scale = float(np.abs(expected[p]).max())
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
    a, b = predictions(flow, expected), predictions(flow, got)
    for p in expected:
        same_applicable = np.array_equal(a[p]["applicable"], b[p]["applicable"])
        va, vb = a[p]["value"], b[p]["value"]
        same_value = np.array_equal(np.isnan(va), np.isnan(vb))
        if flow.tasks[p].kind in DISCRETE_KINDS:  # regression values are compared through their logits above
            same_value = same_value and np.array_equal(np.nan_to_num(va), np.nan_to_num(vb))
        if not (same_applicable and same_value):
            raise words.error(
                f"{words.subject} decides differently from {words.reference} for task '{p}' although the logits "
                f"are within {atol:g}: a decision flips at its threshold; {words.verdict}. {words.fix or ''}".rstrip()
            )
    return worst


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (libraries' messages run on for pages), or its type's name."""
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


@dataclass(frozen=True)
class Reference:
    """What a graph must reproduce before it runs: inputs, the logits expected on them, how to word a failure."""

    inputs: np.ndarray
    logits: dict[str, np.ndarray]
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
    from safetensors.numpy import load_file

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
    if count < 1 or x.dtype != np.float32 or tuple(x.shape) != shape:
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
    return Reference(x, {p: golden[logits_name(p)] for p in desc["tasks"]}, words)


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
