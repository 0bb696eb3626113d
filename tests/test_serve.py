"""Serving without torch: preprocessing, decoding and a whole bundle, checked against the PyTorch path.

- `headstart.serve.transform.preprocess` (PIL + numpy) against the torch eval transform, on real photos of many sizes;
- `headstart.serve.decode` (numpy) against the torch TaskFlow, for every task kind, on random logits;
- a subprocess where torch, Lightning, Hydra, ... cannot be imported loads a real bundle and predicts on real photos
  what the PyTorch model decides on them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, shared_data
from PIL import Image

from headstart.core.model import HeadstartModel
from headstart.core.transforms import InputTransform, eval_transform
from headstart.flow import TaskFlow
from headstart.serve import decode as serve_decode
from headstart.serve.transform import preprocess
from headstart.ship.bundle import write_bundle

# Every kind, thresholds that are not the defaults, and conditions with ~, & and parentheses.
FLOW = {
    "tasks": {
        "door": {"kind": "binary"},
        "locked": {"kind": "binary", "given": "~door"},
        "label": {"kind": "multiclass", "classes": ["a", "b", "c"]},
        "tags": {"kind": "multilabel", "classes": ["x", "y", "z", "w"], "given": "door"},
        "inside": {
            "given": "~(door & locked)",
            "tasks": {
                "size": {"kind": "bounded_regression", "scale": 10.0},
                "angle": {"kind": "regression", "given": "~locked"},
            },
        },
    },
    "thresholds": {"door": 0.45, "locked": 0.6, "tags": [0.3, 0.5, 0.7, 0.9]},
}
BLOCKED = ("torch", "lightning", "hydra", "omegaconf", "torchvision", "timm", "torchmetrics", "pandas")
# Serve's preprocessing gives the same pixels as the eval transform (both resize with PIL); the normalized floats may
# differ only by float32 rounding.
PREPROCESS_ATOL = 1e-6


def _photos(count_per_folder: int) -> list[Path]:
    """Real JPEGs of many sizes (59x80 to 1023x768) and aspect ratios, portrait and landscape."""
    out: list[Path] = []
    for name in ("dog_cat_small", "hymenoptera", "imagenet_samples"):
        files = sorted(
            p for p in shared_data(name).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")
        )
        out += files[:: max(1, len(files) // count_per_folder)][:count_per_folder]
    return out


# ---- preprocessing ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "t",
    [
        InputTransform(256, 224),
        InputTransform(256, 224, "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        InputTransform(72, 64),
        InputTransform(40, 32, "nearest"),
        InputTransform(300, 300),  # upsampling the small photos
    ],
    ids=lambda t: f"{t.resize}-{t.crop}-{t.interpolation}",
)
def test_serve_preprocessing_gives_the_eval_transform_input_on_real_photos(t):
    torch_transform = eval_transform(t)
    sizes = set()
    for path in _photos(12):
        with Image.open(path) as im:
            rgb = im.convert("RGB")
        sizes.add(rgb.size)
        expected = torch_transform(rgb).numpy()
        got = preprocess(rgb, t)
        assert got.dtype == np.float32 and got.shape == expected.shape == (3, t.crop, t.crop), path
        assert float(np.abs(got - expected).max()) <= PREPROCESS_ATOL, path
    assert len(sizes) >= 10, sizes  # many sizes, not one


# ---- decoding ---------------------------------------------------------------------------------------------------


def _random_logits(flow: TaskFlow, n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for path, task in flow.tasks.items():
        shape = (n,) if task.num_outputs == 1 else (n, task.num_outputs)
        out[path] = torch.randn(shape, generator=g) * 3
    out["door"][:3] = torch.tensor([float("nan"), 100.0, -100.0])  # NaN decides "no"; saturated sigmoids
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_serve_decoding_matches_the_flow_for_every_task_kind(seed):
    flow = TaskFlow.from_spec(FLOW)
    logits = _random_logits(flow, 64, seed)
    arrays = {p: v.numpy() for p, v in logits.items()}
    expected = flow.predict(logits)
    got = serve_decode.predictions(flow, arrays)
    assert {t.kind for t in flow.tasks.values()} == {
        "binary",
        "multiclass",
        "multilabel",
        "bounded_regression",
        "regression",
    }
    for path, task in flow.tasks.items():
        assert np.array_equal(got[path]["applicable"], expected[path]["applicable"].numpy()), path
        e, g = expected[path]["value"].numpy(), got[path]["value"]
        assert np.array_equal(np.isnan(g), np.isnan(e)), path
        if task.kind in ("binary", "multiclass", "multilabel"):
            assert np.array_equal(np.nan_to_num(g), np.nan_to_num(e)), path
        else:
            np.testing.assert_allclose(g, e, rtol=1e-6, atol=1e-5, equal_nan=True, err_msg=path)
        p_torch = task.probabilities(logits[path])
        p_serve = serve_decode.probabilities(task, arrays[path])
        if p_torch is None:
            assert p_serve is None
        else:
            np.testing.assert_allclose(p_serve, p_torch.numpy(), rtol=0, atol=1e-6, err_msg=path)
    # both flows (serve's plain spec and the torch TaskFlow) decode to the same rows and explain alike
    plain = serve_decode.decode(serve_decode.FlowSpec.from_spec(flow.to_spec()), arrays)
    assert json.dumps(plain) == json.dumps(serve_decode.decode(flow, logits))  # NaN scores included
    assert any(not r["locked"]["applicable"] for r in plain) and any(r["locked"]["applicable"] for r in plain)
    angle = [r["inside.angle"]["applicable"] for r in plain]
    assert any(angle) and not all(angle)
    assert flow.explain(logits, 5) == serve_decode.explain(flow, arrays, 5)


# ---- a real bundle, without torch ---------------------------------------------------------------------------------

_CHILD = """
import json, sys
for name in {blocked!r}:
    sys.modules[name] = None  # importing it now raises ImportError
from headstart import Predictor
import headstart.serve
assert headstart.serve.Predictor is Predictor
p = Predictor.load(sys.argv[1], threads=1)
rows = p.predict(sys.argv[2:])
logits = {{k: v.tolist() for k, v in p.logits(sys.argv[2:]).items()}}
loaded = sorted(m for m in sys.modules if sys.modules[m] is not None and m.split(".")[0] in {blocked!r})
print(json.dumps({{"rows": rows, "logits": logits, "explain": p.explain(sys.argv[2]), "loaded": loaded}}))
"""


def test_a_bundle_predicts_on_real_photos_without_torch_as_the_pytorch_model_does(tmp_path):
    photos = _photos(4)
    torch.manual_seed(0)
    model = HeadstartModel(
        flow=FLOW,
        optimizer={"_target_": "torch.optim.AdamW", "_partial_": True},
        backbone={"name": "small_cnn", "weights": None},
    ).eval()
    with torch.no_grad():
        for layer in model.head.outputs.values():
            layer.weight.mul_(20.0)  # logits of a few units, like a trained head's
    t = eval_transform(model.input_transform)
    x = torch.stack([t(Image.open(p).convert("RGB")) for p in photos])
    with torch.inference_mode():
        door = sorted(torch.sigmoid(model(x)["door"].double()).tolist())
    mid = (
        len(door) // 2
    )  # a door threshold between two photos' scores, so both branches of the flow are taken
    model.flow.load_state({"thresholds": {"door": (door[mid - 1] + door[mid]) / 2}})
    bundle = write_bundle(model, tmp_path / "bundle", x[:4])
    with torch.inference_mode():
        expected_logits = {k: v.float() for k, v in model(x).items()}
    expected = serve_decode.decode(model.flow, expected_logits)  # what predict.py runtime=pytorch writes

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.run(
        [sys.executable, "-c", _CHILD.format(blocked=BLOCKED), str(bundle), *map(str, photos)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert child.returncode == 0, child.stderr[-3000:]
    out = json.loads(child.stdout)
    assert out["loaded"] == []
    for path, want in expected_logits.items():
        np.testing.assert_allclose(
            np.asarray(out["logits"][path]), want.numpy(), rtol=0, atol=1e-4, err_msg=path
        )
    assert len(out["rows"]) == len(photos)
    for got, want in zip(out["rows"], expected, strict=True):
        assert got.keys() == want.keys()
        for task in want:
            assert got[task]["applicable"] == want[task]["applicable"], task
            if isinstance(want[task]["value"], float):
                assert got[task]["value"] == pytest.approx(want[task]["value"], abs=1e-4), task
            else:
                assert got[task]["value"] == want[task]["value"], task
    assert {r["door"]["value"] for r in expected} == {True, False}, "the photos should exercise both branches"
    first = model.flow.explain(expected_logits, 0).splitlines()
    assert [line.split(" (")[0] for line in out["explain"].splitlines()] == [
        line.split(" (")[0] for line in first
    ]
