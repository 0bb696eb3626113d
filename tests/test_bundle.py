"""Bundles: written, verified file by file, refused when tampered with, loaded from a folder or a URL, updated by a
head-only bundle; the Predictor's answers against the PyTorch model's."""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import http.server
import importlib.metadata
import itertools
import json
import math
import platform
import shutil
import socket
import struct
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import make_image
from PIL import Image
from safetensors.torch import load_file

import headstart.serve.bundle
from headstart.core.model import HeadstartModel
from headstart.core.transforms import eval_transform
from headstart.errors import BundleError, DataError
from headstart.serve.bundle import default_cache_dir, fetch_bundle, read_sums, verify_bundle
from headstart.serve.decode import decode
from headstart.serve.predictor import Predictor, to_pil
from headstart.ship.bundle import write_bundle, write_head_update
from headstart.ship.export import export_head_onnx, read_metadata

OPTIMIZER = {"_target_": "torch.optim.AdamW", "_partial_": True}
FLOW = {
    "tasks": {
        "door_open": {"kind": "binary"},
        "locked": {"kind": "binary", "given": "~door_open"},
        "label": {"kind": "multiclass", "classes": ["a", "b", "c"]},
    }
}
CONFIG = {"name": "doors", "trainer": {"max_epochs": 3}, "data": {"root": "/data/doors"}}
METRICS = {"val/label/acc": 0.75, "val/loss": 0.5, "val/label/count": 12.0}
FILES = ["SHA256SUMS", "golden.safetensors", "model.json", "model.onnx"]
UPDATE_FILES = ["SHA256SUMS", "golden.safetensors", "head.onnx", "model.json"]


# ---- models, images and bundles, built once ---------------------------------------------------------------------


def _model(seed: int) -> HeadstartModel:
    torch.manual_seed(seed)
    return HeadstartModel(
        flow=FLOW, optimizer=OPTIMIZER, backbone={"name": "small_cnn", "weights": None}
    ).eval()


def _pixels() -> list[np.ndarray]:
    """uint8 H x W x 3 images: noise of a few sizes, then an all-white and an all-black one."""
    rng = np.random.default_rng(0)
    noise = [
        rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(14, 20), (40, 40), (32, 48), (50, 30)]
    ]
    return [*noise, np.full((32, 32, 3), 255, np.uint8), np.zeros((32, 32, 3), np.uint8)]


WHITE, BLACK = 4, 5  # indices in _pixels()


def _inputs(model: HeadstartModel, pixels: list[np.ndarray]) -> torch.Tensor:
    """What the model is fed: each image through the model's own eval transform (independent of the Predictor)."""
    t = eval_transform(model.input_transform)
    return torch.stack([t(Image.fromarray(p)) for p in pixels])


def _torch_logits(model: HeadstartModel, x: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.inference_mode():
        return {k: v.float() for k, v in model(x).items()}


def _assert_clear_decisions(model: HeadstartModel, x: torch.Tensor) -> None:
    """No decision within 1e-3 of its threshold, so that ONNX and PyTorch rounding cannot flip one."""
    logits = _torch_logits(model, x)
    for path in ("door_open", "locked"):
        t = model.flow.thresholds[path]
        margin = (logits[path] - math.log(t / (1 - t))).abs().min()
        assert margin > 1e-3, (path, margin)
    top2 = logits["label"].topk(2, dim=-1).values
    assert (top2[:, 0] - top2[:, 1]).min() > 1e-3


def _set_door_open(model: HeadstartModel, x: torch.Tensor) -> None:
    """door_open: logit +3 on the white image, -3 on the black one (so `locked`, given ~door_open, does not apply to
    white and applies to black). The noise images fall where they fall."""
    with torch.no_grad():
        f = model.backbone(x)
        d = f[WHITE] - f[BLACK]
        w = d * math.sqrt(6.0) / d.norm()
        layer = model.head.outputs["door_open"]
        layer.weight.copy_(w[None])
        layer.bias.fill_(float(-(w * (f[WHITE] + f[BLACK]) / 2).sum()))


def _spread(model: HeadstartModel) -> None:
    """Scale the random `locked` and `label` layers up: logits of a few units, like a trained head's, not ~0."""
    with torch.no_grad():
        for name in ("locked", "label"):
            model.head.outputs[name].weight.mul_(20.0)


def _locked_threshold(model: HeadstartModel, x: torch.Tensor) -> float:
    """A `locked` threshold halfway across the widest gap between its probabilities on one side of 0.5, so it
    decides some image differently from the default 0.5 (and no image sits close to it)."""
    probs = torch.sigmoid(_torch_logits(model, x)["locked"]).sort().values.tolist()
    pairs = [(a, b) for a, b in itertools.pairwise(probs) if (a - 0.5) * (b - 0.5) > 0]
    a, b = max(pairs, key=lambda ab: ab[1] - ab[0])
    return round((a + b) / 2, 6)


def _write_sums(folder: Path) -> None:
    """SHA256SUMS regenerated the way sha256sum would: consistent with whatever the folder now holds."""
    lines = [
        f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}"
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != "SHA256SUMS"
    ]
    (folder / "SHA256SUMS").write_text("\n".join(lines) + "\n")


def _flip_byte(path: Path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    i = int(len(data) * at)
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def _same_predictions(got: list[dict], expected: list[dict], score_tol: float = 1e-5) -> None:
    """Decisions (applicability, value) identical; probabilities within score_tol."""
    assert len(got) == len(expected)
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert g.keys() == e.keys(), i
        for task in e:
            assert g[task]["applicable"] == e[task]["applicable"], (i, task)
            assert g[task]["value"] == e[task]["value"], (i, task, g[task], e[task])
            if e[task]["score"] is None:
                assert g[task]["score"] is None, (i, task)
            else:
                assert g[task]["score"] == pytest.approx(e[task]["score"], abs=score_tol), (i, task)


@pytest.fixture(scope="module")
def pixels() -> list[np.ndarray]:
    return _pixels()


@pytest.fixture(scope="module")
def model(pixels) -> HeadstartModel:
    m = _model(0)
    x = _inputs(m, pixels)
    _set_door_open(m, x)
    _spread(m)
    m.flow.load_state({"thresholds": {"locked": _locked_threshold(m, x)}})
    _assert_clear_decisions(m, x)
    return m


@pytest.fixture(scope="module")
def x(model, pixels) -> torch.Tensor:
    return _inputs(model, pixels)


@pytest.fixture(scope="module")
def image_files(tmp_path_factory, pixels) -> list[Path]:
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for i, p in enumerate(pixels):
        paths.append(folder / f"img_{i}.png")
        Image.fromarray(p).save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bundles")


@pytest.fixture(scope="module")
def full(model, x, bundles) -> Path:
    return write_bundle(model, bundles / "full", x, config=CONFIG, metrics=METRICS)


@pytest.fixture(scope="module")
def other(bundles, x) -> tuple[HeadstartModel, Path]:
    """Another model of the same flow and architecture whose backbone has other weights (another seed)."""
    m = _model(1)
    return m, write_bundle(m, bundles / "other", x)


@pytest.fixture(scope="module")
def updated(model, x) -> HeadstartModel:
    """The model with new head weights and the very same backbone: what retraining only the head gives."""
    m2 = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in m2.head.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    _assert_clear_decisions(m2, x)
    return m2


@pytest.fixture(scope="module")
def head_update(model, updated, x, bundles) -> Path:
    with torch.inference_mode():
        features = model.backbone(x)
    return write_head_update(
        updated, bundles / "update", backbone_sha256=model.backbone.weights_sha256(), golden_features=features
    )


@pytest.fixture(scope="module")
def full2(updated, x, bundles) -> Path:
    return write_bundle(updated, bundles / "full2", x)


@pytest.fixture(scope="module")
def predictor(full) -> Predictor:
    return Predictor.load(full, threads=1)


# ---- 1. round trip ------------------------------------------------------------------------------------------------


def test_bundle_holds_exactly_its_four_data_files_and_no_pickle_or_code(full):
    assert sorted(p.name for p in full.iterdir()) == FILES
    assert not (full.parent / "full.tmp").exists(), "the temporary folder must be gone"
    for path in full.iterdir():
        data = path.read_bytes()
        assert path.suffix not in (".py", ".pyc", ".pkl", ".pickle", ".pt", ".pth", ".ckpt", ".bin"), path
        assert not data.startswith(b"PK\x03\x04"), f"{path.name} is a zip (torch.save format)"
        if path.name == "golden.safetensors":
            # safetensors: a little-endian u64 header length, then a JSON header (its first byte may be anything)
            (n,) = struct.unpack("<Q", data[:8])
            header = json.loads(data[8 : 8 + n])
            ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
            assert 8 + n + max(ends) == len(data), "every byte is a tensor the header describes"
            assert {"input", "features", "logits/door_open", "logits/locked", "logits/label"} <= set(header)
        else:
            assert data[:1] != b"\x80", f"{path.name} starts like a pickle"
    onnx.checker.check_model(str(full / "model.onnx"))
    json.loads((full / "model.json").read_text())


def test_sha256sums_lists_every_file_with_its_hash(full):
    expected = {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in full.iterdir() if p.name != "SHA256SUMS"
    }
    lines = (full / "SHA256SUMS").read_text().splitlines()
    assert lines == [f"{expected[name]}  {name}" for name in sorted(expected)]  # sha256sum -c reads it
    assert read_sums(full) == expected


def test_model_json_says_what_the_model_is_and_where_it_came_from(full, model):
    desc = json.loads((full / "model.json").read_text())
    assert desc == verify_bundle(full)
    assert desc["kind"] == "full" and desc["graph"] == "model.onnx"
    assert read_metadata(full / "model.onnx") == desc  # a lone model.onnx still says what it is
    # the flow's declaration order, not alphabetical: columns, reports and explain() follow it
    assert list(desc["tasks"]) == list(desc["flow"]["tasks"]) == ["door_open", "locked", "label"]
    assert desc["transform"] == {
        "resize": 32,
        "crop": 32,
        "interpolation": "bilinear",
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
    }
    assert desc["tasks"] == {
        "door_open": {"kind": "binary", "classes": [], "condition": None},
        "locked": {"kind": "binary", "classes": [], "condition": "~door_open"},
        "label": {"kind": "multiclass", "classes": ["a", "b", "c"], "condition": None},
    }
    locked = model.flow.thresholds["locked"]
    assert locked != 0.5
    assert desc["thresholds"] == {"door_open": 0.5, "locked": locked}
    assert desc["config"] == CONFIG
    canonical = json.dumps(CONFIG, sort_keys=True).encode()
    assert desc["config_sha256"] == hashlib.sha256(canonical).hexdigest()
    assert desc["name"] == "doors"
    assert desc["metrics"] == {"val/label/acc": 0.75, "val/loss": 0.5}  # counts are not metrics
    for package in ("torch", "onnx", "onnxruntime", "numpy"):
        assert desc["versions"][package] == importlib.metadata.version(package)
    assert desc["versions"]["python"] == platform.python_version()
    assert desc["backbone"] == {
        "name": "small_cnn",
        "weights": None,
        "weights_sha256": model.backbone.weights_sha256(),
        "feature_dim": 128,
    }
    assert desc["golden"] == {"file": "golden.safetensors", "count": 6, "atol": 1e-4}


def test_golden_file_holds_the_inputs_and_the_pytorch_outputs(full, model, x):
    golden = load_file(str(full / "golden.safetensors"))
    assert torch.equal(golden["input"], x)
    expected = _torch_logits(model, x)
    for task, logits in expected.items():
        torch.testing.assert_close(golden[f"logits/{task}"], logits, rtol=0, atol=1e-6)
    with torch.inference_mode():
        torch.testing.assert_close(golden["features"], model.backbone(x), rtol=0, atol=1e-6)


def test_loaded_bundle_predicts_like_pytorch_on_every_kind_of_image(predictor, model, x, pixels, image_files):
    expected = decode(model.flow, _torch_logits(model, x))
    as_pil = []
    for path in image_files:
        with Image.open(path) as im:
            as_pil.append(im.copy())
    for i in range(len(pixels)):
        for image in (image_files[i], str(image_files[i]), as_pil[i], pixels[i]):
            got = predictor.predict(image)
            assert isinstance(got, dict)
            _same_predictions([got], [expected[i]])
    mixed = [image_files[0], as_pil[1], pixels[2], str(image_files[3]), pixels[WHITE], as_pil[BLACK]]
    got = predictor.predict(mixed)
    assert isinstance(got, list) and len(got) == len(mixed)
    _same_predictions(got, expected)
    _same_predictions(predictor.predict(tuple(pixels), batch_size=4), expected)  # batches of 4 and 2


def test_loaded_bundle_logits_match_pytorch(predictor, model, x, pixels):
    expected = _torch_logits(model, x)
    got = predictor.logits(pixels)
    assert list(got) == ["door_open", "locked", "label"]
    for task in expected:
        assert got[task].shape == expected[task].shape
        assert float(np.abs(got[task] - expected[task].numpy()).max()) <= 1e-4, task
    assert float(np.abs(predictor.logits(x.numpy())["label"] - expected["label"].numpy()).max()) <= 1e-4


def test_a_task_whose_condition_is_false_comes_back_not_applicable(predictor, model, x, pixels):
    white, black = predictor.predict([pixels[WHITE], pixels[BLACK]])
    assert white["door_open"]["applicable"] is True and white["door_open"]["value"] is True
    assert white["locked"] == {"applicable": False, "value": None, "score": None}
    assert black["door_open"]["value"] is False
    assert black["locked"]["applicable"] is True and isinstance(black["locked"]["value"], bool)
    assert 0.0 <= black["locked"]["score"] <= 1.0
    assert white["label"]["value"] in ("a", "b", "c")


def test_bundle_thresholds_are_the_ones_used(predictor, model, x, pixels):
    locked = model.flow.thresholds["locked"]
    assert predictor.flow.thresholds == {"door_open": 0.5, "locked": locked}
    default = copy.deepcopy(model.flow)
    default.load_state({"thresholds": {"locked": 0.5}})
    at_default = decode(default, _torch_logits(model, x))
    got = predictor.predict(pixels)
    assert list(got[0]) == ["door_open", "locked", "label"]
    assert [r["locked"]["value"] for r in got] != [r["locked"]["value"] for r in at_default]


def test_explain_gives_the_decision_tree(predictor, pixels):
    white, black = predictor.explain([pixels[WHITE], pixels[BLACK]])
    assert white.splitlines()[0].startswith("door_open: yes (p=")
    assert "locked" not in white  # it does not apply, so it is left out
    assert "label: " in white
    lines = black.splitlines()
    assert lines[0].startswith("door_open: no (p=")
    assert lines[1].startswith("  locked: ")  # under the task its condition refers to
    assert any(line.startswith("label: ") for line in lines)
    assert predictor.explain(pixels[BLACK]) == black


# ---- 2. tampering -------------------------------------------------------------------------------------------------


def test_a_changed_byte_in_the_graph_is_refused(full, tmp_path):
    b = _copy(full, tmp_path / "b")
    _flip_byte(b / "model.onnx")
    with pytest.raises(BundleError, match=r"model\.onnx") as e:
        Predictor.load(b)
    assert "SHA256SUMS" in str(e.value) and "changed or corrupted" in str(e.value)


def test_an_edited_model_json_is_refused(full, tmp_path):
    b = _copy(full, tmp_path / "b")
    desc = json.loads((b / "model.json").read_text())
    desc["tasks"]["label"]["classes"] = ["a", "b", "z"]
    (b / "model.json").write_text(json.dumps(desc, indent=2, sort_keys=True) + "\n")
    with pytest.raises(BundleError, match=r"model\.json does not match its sha256 in SHA256SUMS"):
        Predictor.load(b)


def test_a_missing_file_is_refused(full, tmp_path):
    b = _copy(full, tmp_path / "b")
    (b / "golden.safetensors").unlink()
    with pytest.raises(BundleError, match=r"golden\.safetensors is listed in SHA256SUMS but missing"):
        Predictor.load(b)


def test_a_file_left_out_of_sha256sums_is_refused(full, tmp_path):
    b = _copy(full, tmp_path / "b")
    sums = (b / "SHA256SUMS").read_text().splitlines()
    (b / "SHA256SUMS").write_text("\n".join(s for s in sums if not s.endswith("model.onnx")) + "\n")
    with pytest.raises(BundleError, match=r"model\.onnx"):
        Predictor.load(b)


def test_a_folder_without_sha256sums_cannot_be_verified_and_is_refused(full, tmp_path):
    b = _copy(full, tmp_path / "b")
    (b / "SHA256SUMS").unlink()
    with pytest.raises(BundleError, match="cannot be verified: it has no SHA256SUMS"):
        Predictor.load(b)
    with pytest.raises(BundleError, match="does not exist"):
        Predictor.load(tmp_path / "nothing_here")


@pytest.mark.parametrize("name", ["../x", "/tmp/x", "sub/x"])
def test_a_sha256sums_entry_outside_the_folder_is_refused(full, tmp_path, name):
    b = _copy(full, tmp_path / "b")
    target = tmp_path / "x"  # exists and matches: only the name is wrong
    target.write_bytes(b"hello")
    digest = hashlib.sha256(b"hello").hexdigest()
    with open(b / "SHA256SUMS", "a") as f:
        f.write(f"{digest}  {name}\n")
    with pytest.raises(BundleError, match="not '<sha256>  <file name>'") as e:
        Predictor.load(b)
    assert name in str(e.value)


# ---- 3. golden outputs --------------------------------------------------------------------------------------------


def _embed_description(graph: Path, description: Path, dest: Path) -> None:
    """`graph` saved to `dest` with `description` (a model.json) as its embedded headstart description."""
    proto = onnx.load(str(graph))
    del proto.metadata_props[:]
    proto.metadata_props.add(key="headstart", value=description.read_text())
    onnx.save(proto, str(dest))


def test_another_models_graph_is_refused_by_the_description_inside_it(full, other, tmp_path):
    b = _copy(full, tmp_path / "b")
    (b / "model.onnx").write_bytes((other[1] / "model.onnx").read_bytes())  # its own thresholds inside
    _write_sums(b)
    verify_bundle(b)
    with pytest.raises(
        BundleError, match="the description inside the graph disagrees with this one on flow, thresholds"
    ):
        Predictor.load(b)


def test_another_models_graph_with_consistent_sums_fails_the_golden_check(full, other, tmp_path, x):
    other_model, other_dir = other
    b = _copy(full, tmp_path / "b")
    _embed_description(other_dir / "model.onnx", full / "model.json", b / "model.onnx")
    _write_sums(b)
    verify_bundle(b)  # every file matches SHA256SUMS and the graph describes itself as model.json does
    with pytest.raises(BundleError) as e:
        Predictor.load(b)
    message = str(e.value)
    assert message.startswith(
        f"bundle {b}: its graph model.onnx does not reproduce its golden outputs: task '"
    )
    worst = float(message.split("differ by up to ")[1].split(" ")[0])
    assert worst > 1e-4 and "(allowed 0.0001)" in message
    assert "damaged or was edited after export" in message and "Re-export it from its run" in message
    assert "export.onnx=false" not in message and "PyTorch" not in message  # it is a load, not an export
    p = Predictor.load(b, verify=False)
    expected = _torch_logits(other_model, x)
    got = p.logits(x.numpy())
    for task in expected:
        assert float(np.abs(got[task] - expected[task].numpy()).max()) <= 1e-4, task


# ---- 4. loading from a URL ----------------------------------------------------------------------------------------


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


@contextlib.contextmanager
def _serve(root: Path):
    """An HTTP server on 127.0.0.1 (a free port) serving `root`, in a daemon thread; shut down on exit."""
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=root)
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _no_network(*args, **kwargs):
    raise AssertionError(f"network access: {args}")


def test_a_bundle_loads_from_a_url_into_the_cache_and_then_offline(
    full, tmp_path, predictor, pixels, monkeypatch
):
    root = tmp_path / "site"
    _copy(full, root / "bundle")
    cache = tmp_path / "cache"
    with _serve(root) as url:
        p = Predictor.load(f"{url}/bundle", cache_dir=cache, threads=1)
        assert p.predict(pixels) == predictor.predict(pixels)
    (folder,) = cache.iterdir()  # one folder, no partial download beside it
    assert sorted(f.name for f in folder.iterdir()) == FILES
    for f in folder.iterdir():
        assert f.read_bytes() == (full / f.name).read_bytes()
    monkeypatch.setattr(headstart.serve.bundle.urllib.request, "urlopen", _no_network)
    again = Predictor.load(f"{url}/bundle", cache_dir=cache, threads=1)  # the server is gone
    assert again.predict(pixels) == predictor.predict(pixels)


def test_a_cached_copy_that_no_longer_verifies_is_downloaded_again(full, tmp_path):
    root = tmp_path / "site"
    _copy(full, root / "bundle")
    cache = tmp_path / "cache"
    with _serve(root) as url:
        folder = fetch_bundle(f"{url}/bundle", cache_dir=cache)
        _flip_byte(folder / "model.onnx")
        assert (
            fetch_bundle(f"{url}/bundle/", cache_dir=cache) == folder
        )  # a trailing slash is the same bundle
    assert (folder / "model.onnx").read_bytes() == (full / "model.onnx").read_bytes()


def test_a_tampered_download_is_refused_and_leaves_nothing_in_the_cache(full, tmp_path):
    root = tmp_path / "site"
    _flip_byte(_copy(full, root / "bundle") / "model.onnx")
    cache = tmp_path / "cache"
    with _serve(root) as url, pytest.raises(BundleError, match=r"model\.onnx does not match") as e:
        Predictor.load(f"{url}/bundle", cache_dir=cache)
    assert f"{url}/bundle" in str(e.value), "the message names what was downloaded"
    assert ".part" not in str(e.value)
    assert list(cache.iterdir()) == []


def test_a_missing_remote_bundle_is_refused(tmp_path):
    (tmp_path / "site").mkdir()
    cache = tmp_path / "cache"
    with _serve(tmp_path / "site") as url, pytest.raises(BundleError, match="could not download") as e:
        Predictor.load(f"{url}/nothing", cache_dir=cache)
    assert "nothing/SHA256SUMS" in str(e.value) and "not found" in str(e.value).lower()
    assert list(cache.iterdir()) == []


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_url_is_refused_quickly_with_a_network_hint(tmp_path):
    cache = tmp_path / "cache"
    start = time.perf_counter()
    with pytest.raises(BundleError, match="could not download") as e:
        Predictor.load(f"http://127.0.0.1:{_closed_port()}/bundle", cache_dir=cache)
    assert time.perf_counter() - start < 5
    assert "network" in str(e.value)
    assert list(cache.iterdir()) == []


def test_a_server_that_never_answers_times_out(tmp_path):
    with socket.socket() as s:  # listens (so connecting works) but never accepts nor answers
        s.bind(("127.0.0.1", 0))
        s.listen()
        start = time.perf_counter()
        with pytest.raises(BundleError, match="could not download"):
            fetch_bundle(f"http://127.0.0.1:{s.getsockname()[1]}/bundle", cache_dir=tmp_path, timeout=0.5)
        assert time.perf_counter() - start < 5


def test_the_default_cache_is_headstart_cache(full, tmp_path, monkeypatch):
    monkeypatch.setenv("HEADSTART_CACHE", str(tmp_path / "hc"))
    assert default_cache_dir() == tmp_path / "hc" / "bundles"
    root = tmp_path / "site"
    _copy(full, root / "bundle")
    with _serve(root) as url:
        Predictor.load(f"{url}/bundle", threads=1)
    (folder,) = (tmp_path / "hc" / "bundles").iterdir()
    assert sorted(f.name for f in folder.iterdir()) == FILES
    monkeypatch.delenv("HEADSTART_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "headstart" / "bundles"


# ---- 5. head updates ----------------------------------------------------------------------------------------------


def test_a_head_update_is_small_and_records_its_backbone(head_update, model, updated):
    assert sorted(p.name for p in head_update.iterdir()) == UPDATE_FILES
    size = sum(p.stat().st_size for p in head_update.iterdir())
    assert size < 64 * 1024, size
    desc = verify_bundle(head_update)
    assert desc["kind"] == "head_update" and desc["graph"] == "head.onnx"
    assert desc["backbone"]["weights_sha256"] == model.backbone.weights_sha256()
    assert desc["backbone"]["feature_dim"] == 128
    assert updated.backbone.weights_sha256() == model.backbone.weights_sha256()


def test_a_head_update_on_its_base_predicts_like_the_full_bundle_of_the_updated_model(
    head_update, full, full2, updated, model, x, pixels
):
    with_update = Predictor.load(head_update, base=full, threads=1)
    whole = Predictor.load(full2, threads=1)
    got, expected = with_update.predict(pixels), whole.predict(pixels)
    _same_predictions(got, expected)
    assert got != Predictor.load(full, threads=1).predict(pixels), "the update must change some prediction"
    a, b = with_update.logits(pixels), whole.logits(pixels)
    reference = _torch_logits(updated, x)
    for task in reference:
        np.testing.assert_allclose(a[task], b[task], rtol=0, atol=1e-5)
        np.testing.assert_allclose(a[task], reference[task].numpy(), rtol=0, atol=1e-4)
    _same_predictions(got, decode(updated.flow, reference))


def test_a_head_update_on_a_base_with_another_backbone_is_refused(head_update, other, model):
    other_model, other_dir = other
    with pytest.raises(BundleError, match="weights sha256") as e:
        Predictor.load(head_update, base=other_dir)
    assert model.backbone.weights_sha256()[:12] in str(e.value)
    assert other_model.backbone.weights_sha256()[:12] in str(e.value)


def test_a_head_update_needs_a_full_bundle_as_base(head_update, full):
    with pytest.raises(BundleError, match=r"base="):
        Predictor.load(head_update)
    with pytest.raises(BundleError, match="base= is only for head updates"):
        Predictor.load(full, base=full)
    with pytest.raises(BundleError, match="itself a head update"):
        Predictor.load(head_update, base=head_update)


def test_a_head_update_with_another_head_graph_fails_its_golden_check(head_update, full, model, tmp_path):
    u = _copy(head_update, tmp_path / "u")
    export_head_onnx(model, u / "head.onnx", 128)  # the base's head, not the update's
    _write_sums(u)
    with pytest.raises(BundleError, match="golden outputs"):
        Predictor.load(u, base=full)
    Predictor.load(u, base=full, verify=False)


def test_a_head_update_from_features_that_require_grad(model, updated, x, full, tmp_path):
    backbone = copy.deepcopy(model.backbone).requires_grad_(True)  # e.g. a backbone fine-tuned in part
    features = backbone(x)
    assert features.requires_grad
    u = write_head_update(updated, tmp_path / "u", model.backbone.weights_sha256(), features)
    Predictor.load(u, base=full)


# ---- 6. to_pil ----------------------------------------------------------------------------------------------------


def _rgb(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image)


def test_to_pil_takes_hwc_chw_gray_float_and_rgba_arrays():
    rng = np.random.default_rng(1)
    hwc = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    assert np.array_equal(_rgb(to_pil(hwc)), hwc)
    assert np.array_equal(_rgb(to_pil(np.moveaxis(hwc, -1, 0))), hwc)  # C x H x W
    assert np.array_equal(_rgb(to_pil(hwc / 255.0)), hwc)  # floats in [0, 1]
    assert np.array_equal(_rgb(to_pil((hwc / 255.0).astype(np.float32))), hwc)
    assert np.array_equal(_rgb(to_pil(np.moveaxis(hwc, -1, 0) / 255.0)), hwc)
    gray = rng.integers(0, 256, (5, 7), dtype=np.uint8)
    for g in (gray, gray[None], gray[..., None]):  # H x W, 1 x H x W, H x W x 1
        assert np.array_equal(_rgb(to_pil(g)), np.stack([gray] * 3, axis=-1))
    rgba = np.concatenate([hwc, np.full((5, 7, 1), 7, np.uint8)], axis=-1)
    assert np.array_equal(_rgb(to_pil(rgba)), hwc)
    assert np.array_equal(_rgb(to_pil(Image.fromarray(gray))), np.stack([gray] * 3, axis=-1))


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros(12, np.uint8),
        np.zeros((2, 4, 4, 3), np.uint8),
        np.zeros((5, 7, 2), np.uint8),
        42,
        {"image": "x.png"},
        torch.zeros(3, 8, 8),
    ],
    ids=["1d", "4d", "two-channels", "int", "dict", "tensor"],
)
def test_to_pil_refuses_what_is_not_an_image(bad):
    with pytest.raises(DataError, match=r"image array must be|cannot predict on a"):
        to_pil(bad)


def test_to_pil_refuses_an_unreadable_file(tmp_path, predictor):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image at all")
    for path in (bad, str(bad), tmp_path / "missing.png"):
        with pytest.raises(DataError, match="cannot read image") as e:
            to_pil(path)
        assert str(path) in str(e.value)
    with pytest.raises(DataError, match=r"broken\.png"):
        predictor.predict([make_image(tmp_path / "ok.png"), bad])


# ---- 7. every path that runs a graph verifies it ------------------------------------------------------------------


def _edited(full: Path, dest: Path, edit) -> Path:
    """A copy of `full` whose model.json went through `edit` (a function changing the dict in place), SHA256SUMS
    recomputed: only the checks of model.json's fields (and the graph) can tell."""
    b = _copy(full, dest)
    desc = json.loads((b / "model.json").read_text())
    edit(desc)
    (b / "model.json").write_text(json.dumps(desc, indent=2) + "\n")
    _write_sums(b)
    return b


def _set(*keys_and_value):
    *keys, value = keys_and_value

    def edit(desc: dict) -> None:
        node = desc
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value

    return edit


def _crop(side: int):
    def edit(desc: dict) -> None:
        desc["transform"].update(resize=side, crop=side)
        desc["input"]["shape"] = ["batch", 3, side, side]

    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            _set("transform", "resize", 1_000_000),
            r"field transform\.resize must be a whole number of pixels in \[1, ",
        ),
        (_set("transform", "resize", 32.5), r"field transform\.resize must be a whole number"),
        (_set("transform", "crop", 0), r"field transform\.crop must be a whole number"),
        (_set("transform", "resize", 16), r"transform\.crop \(32\) must not exceed transform\.resize \(16\)"),
        (_set("transform", "mean", [0.5, 0.5]), r"field transform\.mean must be three finite numbers"),
        (_set("transform", "std", [0.5, 0.0, 0.5]), r"field transform\.std must be three finite positive"),
        (
            _set("transform", "std", [0.5, float("nan"), 0.5]),
            r"field transform\.std must be three finite positive",
        ),
        (_set("transform", "interpolation", "lanczos"), r"field transform\.interpolation must be one of"),
        (_set("input", "shape", ["batch", 3, 64, 64]), r"field input is .*but the transform.* make it"),
        (_crop(16), r"the graph's input 'images' has shape \['batch', 3, 32, 32\], but its description says"),
        (
            _set("thresholds", "locked", 1.5),
            r"field thresholds: 'locked' needs a number in \[0, 1\], got 1\.5",
        ),
        (
            _set("thresholds", "locked", float("nan")),
            r"field thresholds: 'locked' needs a number in \[0, 1\]",
        ),
        (_set("thresholds", {}), r"field thresholds must give each binary and multilabel task"),
        (_set("flow", "tasks", "label", "kind", "ranking"), r"field flow: task 'label': kind 'ranking'"),
        (_set("tasks", "label", "classes", ["a", "b", "z"]), r"field tasks is .*but the .*flow make it"),
        (_set("golden", "atol", 0), r"field golden\.atol must be a finite positive number, got 0"),
        (
            _set("golden", "atol", float("inf")),
            r"field golden\.atol must be a finite positive number, got inf",
        ),
        (_set("golden", "atol", "0.0001"), r"field golden\.atol must be a finite positive number"),
        (
            _set("golden", "count", 5),
            r"golden\.safetensors: 'input' is .*but model\.json says 5 golden input",
        ),
    ],
    ids=[
        "huge-resize",
        "fractional-resize",
        "zero-crop",
        "crop-over-resize",
        "two-means",
        "zero-std",
        "nan-std",
        "unknown-interpolation",
        "input-shape",
        "crop-not-the-graphs",
        "threshold-above-1",
        "nan-threshold",
        "thresholds-missing",
        "unknown-kind",
        "tasks-not-the-flows",
        "zero-atol",
        "infinite-atol",
        "string-atol",
        "golden-count",
    ],
)
def test_an_edited_model_json_with_recomputed_sums_is_refused_naming_the_field(full, tmp_path, edit, message):
    b = _edited(full, tmp_path / "b", edit)
    with pytest.raises(BundleError, match=message) as e:
        Predictor.load(b)
    assert str(e.value).startswith(f"bundle {b}")
    assert "Re-export it from its run" in str(e.value)


@pytest.mark.slow
def test_a_bundle_without_sha256sums_is_refused_by_predict_py_and_every_loader(
    full, other, tmp_path, image_files
):
    from conftest import ROOT, run_script

    from headstart.evaluate.loading import load_model

    b = _copy(full, tmp_path / "b")
    (b / "model.onnx").write_bytes((other[1] / "model.onnx").read_bytes())  # another model's graph
    (b / "SHA256SUMS").unlink()
    for load in (Predictor.load, load_model):  # load_model: what evaluate.py and predict.py open models with
        with pytest.raises(BundleError, match="cannot be verified: it has no SHA256SUMS"):
            load(b)
    result = run_script(
        [
            "predict.py",
            f"model={b}",
            f"inputs={image_files[0]}",
            f"paths.root_dir={tmp_path}",
            "num_workers=0",
        ],
        cwd=ROOT,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"headstart: error: {b} cannot be verified: it has no SHA256SUMS" in result.stderr
    assert "Traceback" not in result.stderr
    assert not list((tmp_path / "outputs").rglob("predictions.*"))


def test_predict_py_runs_a_head_update_on_its_base(head_update, full, image_files):
    from headstart.evaluate.loading import load_model

    loaded = load_model(head_update, base=full, threads=1)
    expected = Predictor.load(head_update, base=full, threads=1)
    x = expected.preprocess(image_files)
    for task, logits in expected(x).items():
        torch.testing.assert_close(
            loaded.runner(torch.from_numpy(x))[task], torch.from_numpy(logits), rtol=0, atol=0
        )
    assert loaded.kind == "bundle" and loaded.flow.thresholds == expected.flow.thresholds
    with pytest.raises(BundleError, match="load it on top of its base bundle"):
        load_model(head_update)


def _run_dir(model: HeadstartModel, graph: Path, dest: Path) -> Path:
    """A run directory as training leaves it: checkpoints/best.ckpt (weights_only) and model.onnx beside it."""
    (dest / "checkpoints").mkdir(parents=True)
    hparams = {**dict(model.hparams), "flow": model.flow.to_spec()}
    torch.save(
        {"hyper_parameters": hparams, "state_dict": model.state_dict()}, dest / "checkpoints" / "best.ckpt"
    )
    shutil.copyfile(graph, dest / "model.onnx")
    return dest


def test_a_run_directorys_model_onnx_must_reproduce_its_checkpoint(model, full, other, tmp_path, x):
    from headstart.errors import ExportError
    from headstart.evaluate.loading import load_model

    good = load_model(_run_dir(model, full / "model.onnx", tmp_path / "good"), threads=1)
    assert good.kind == "onnx" and good.source == str(tmp_path / "good" / "model.onnx")
    expected = _torch_logits(model, x)
    for task, logits in good.runner(x).items():
        torch.testing.assert_close(logits, expected[task], rtol=0, atol=1e-4)

    # another model's weights inside, with this model's description: only running it against the checkpoint tells
    swapped = tmp_path / "swapped"
    _run_dir(model, full / "model.onnx", swapped)
    _embed_description(other[1] / "model.onnx", full / "model.json", swapped / "model.onnx")
    with pytest.raises(ExportError) as e:
        load_model(swapped, threads=1)
    message = str(e.value)
    assert message.startswith(
        f"{swapped / 'model.onnx'} does not reproduce {swapped / 'checkpoints' / 'best.ckpt'}"
    )
    assert "on 4 fixed inputs" in message and "delete it" in message and "runtime=pytorch" in message
    assert load_model(swapped, runtime="pytorch").kind == "checkpoint"  # the way out works

    # this model's weights, with the classes renamed in its description
    renamed = tmp_path / "renamed"
    _run_dir(model, full / "model.onnx", renamed)
    desc = json.loads((full / "model.json").read_text())
    desc["flow"]["tasks"]["label"]["classes"] = desc["tasks"]["label"]["classes"] = ["c", "b", "a"]
    (tmp_path / "renamed.json").write_text(json.dumps(desc))
    _embed_description(full / "model.onnx", tmp_path / "renamed.json", renamed / "model.onnx")
    with pytest.raises(
        ExportError, match=r"describes another model than .*best\.ckpt: they differ in flow, tasks"
    ):
        load_model(renamed, threads=1)


def test_a_run_directory_without_checkpoints_runs_its_verified_bundle(full, other, tmp_path, pixels):
    from headstart.evaluate.loading import load_model

    run = tmp_path / "run"
    _copy(full, run / "bundle")
    shutil.copyfile(other[1] / "model.onnx", run / "model.onnx")  # nothing to check this one against
    loaded = load_model(run, threads=1)
    assert loaded.kind == "bundle"
    x = Predictor.load(full, threads=1).preprocess(pixels)
    for task, logits in Predictor.load(full, threads=1)(x).items():
        torch.testing.assert_close(loaded.runner(x)[task], torch.from_numpy(logits), rtol=0, atol=0)
    _flip_byte(run / "bundle" / "model.onnx")
    with pytest.raises(BundleError, match=r"model\.onnx does not match its sha256"):
        load_model(run)


def test_a_lone_onnx_file_is_checked_against_its_own_description(full, head_update, tmp_path):
    from headstart.errors import ConfigError
    from headstart.evaluate.loading import load_model

    desc = json.loads((full / "model.json").read_text())
    desc["transform"]["resize"] = 1_000_000
    (tmp_path / "huge.json").write_text(json.dumps(desc))
    _embed_description(full / "model.onnx", tmp_path / "huge.json", tmp_path / "huge.onnx")
    with pytest.raises(
        BundleError, match=r"huge\.onnx: field transform\.resize must be a whole number of pixels"
    ):
        load_model(tmp_path / "huge.onnx")
    desc = json.loads((full / "model.json").read_text())
    desc["tasks"]["label"]["classes"] = desc["flow"]["tasks"]["label"]["classes"] = ["a", "b", "c", "d"]
    (tmp_path / "four.json").write_text(json.dumps(desc))
    _embed_description(full / "model.onnx", tmp_path / "four.json", tmp_path / "four.onnx")
    with pytest.raises(
        BundleError, match=r"output 'logits/label' has shape \['batch', 3\], but task 'label'"
    ):
        load_model(tmp_path / "four.onnx")
    with pytest.raises(ConfigError, match="graph of a head update"):
        load_model(head_update / "head.onnx")
    assert load_model(full / "model.onnx", threads=1).kind == "onnx"  # the untouched file loads


# ---- 8. no images ---------------------------------------------------------------------------------------------------


def test_no_images_give_empty_results(predictor, x):
    assert predictor.predict([]) == [] and predictor.predict(()) == []
    assert predictor.explain([]) == []
    for logits in (predictor.logits([]), predictor.logits(x.numpy()[:0])):
        assert {t: tuple(v.shape) for t, v in logits.items()} == {
            "door_open": (0,),
            "locked": (0,),
            "label": (0, 3),
        }
        assert all(v.dtype == np.float32 for v in logits.values())
    assert decode(predictor.flow, predictor.logits([])) == []
