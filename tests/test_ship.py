"""Shipping as users run it: training exports a checked ONNX file and a bundle; evaluate.py and predict.py on them."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
import torch
from conftest import ROOT, compose_train, make_tree, run_script
from hydra import compose, initialize_config_dir
from onnx import numpy_helper
from PIL import Image

import headstart.ship.shipping
from headstart import Predictor
from headstart.core.model import HeadstartModel
from headstart.core.transforms import eval_transform
from headstart.errors import ConfigError, DataError, ExportError
from headstart.evaluate.evaluation import evaluate
from headstart.serve.decode import decode
from headstart.ship.export import check_parity, export_onnx, read_metadata
from headstart.train.recipe import train

OPTIMIZER = {"_target_": "torch.optim.AdamW", "_partial_": True}


def compose_eval(overrides: list[str], out: Path, config: str = "evaluate"):
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        return compose(config, overrides=[f"paths.root_dir={out}", f"paths.output_dir={out}", *overrides])


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """Digits trained for 2 epochs: good enough to be mostly right, weak enough to have wrong predictions."""
    tmp = tmp_path_factory.mktemp("ship")
    cfg = compose_train(["trainer.max_epochs=2"], tmp)
    train(cfg)
    return tmp / "run"


def _test_images(run: Path, n: int) -> list[Path]:
    config = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)["headstart_config"]
    return sorted(Path(config["data"]["root"], "test").rglob("*.png"))[:n]


def _corrupt_last_gemm(src: Path, dest: Path) -> None:
    model = onnx.load(str(src))
    gemm_weights = [n.input[1] for n in model.graph.node if n.op_type in ("Gemm", "MatMul")]
    init = next(i for i in model.graph.initializer if i.name == gemm_weights[-1])
    array = numpy_helper.to_array(init).copy()
    array[0] += 0.5
    init.CopyFrom(numpy_helper.from_array(array, init.name))
    onnx.save(model, str(dest))


# ---- what training ships --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_training_ships_a_checked_onnx_file_and_a_bundle(run):
    assert (run / "model.onnx").is_file()
    assert not list(run.glob("*.data")), "the ONNX weights must be inside the file, not beside it"
    meta = read_metadata(run / "model.onnx")
    assert meta["tasks"]["label"]["classes"] == [str(i) for i in range(10)]
    assert meta["config"]["trainer"]["max_epochs"] == 2
    bundle = run / "bundle"
    assert sorted(p.name for p in bundle.iterdir()) == [
        "SHA256SUMS",
        "golden.safetensors",
        "model.json",
        "model.onnx",
    ]
    desc = json.loads((bundle / "model.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    assert desc["metrics"]["test/label/acc"] == pytest.approx(metrics["test/label/acc"])
    assert len(desc["config_sha256"]) == 64 and desc["backbone"]["name"] == "small_cnn"
    assert not (run / "head_update").exists()  # auto: only runs on DoF features write one

    model = HeadstartModel.from_checkpoint(run / "checkpoints" / "best.ckpt").eval()
    images = _test_images(run, 6)
    predictor = Predictor.load(bundle)
    t = eval_transform(model.input_transform)
    with torch.no_grad():
        expected = decode(model.flow, model(torch.stack([t(Image.open(p).convert("RGB")) for p in images])))
    got = predictor.predict(images)
    assert [g["label"]["value"] for g in got] == [e["label"]["value"] for e in expected]
    assert [g["label"]["score"] for g in got] == pytest.approx(
        [e["label"]["score"] for e in expected], abs=1e-5
    )


@pytest.mark.slow
def test_export_off_writes_no_onnx_and_no_bundle(tmp_path):
    train(
        compose_train(
            ["trainer.max_epochs=1", "+trainer.limit_train_batches=4", "export.onnx=false"], tmp_path
        )
    )
    assert (tmp_path / "run" / "checkpoints" / "best.ckpt").is_file()
    assert not (tmp_path / "run" / "model.onnx").exists()
    assert not (tmp_path / "run" / "bundle").exists()


@pytest.mark.slow
def test_parity_check_catches_a_broken_export(run, tmp_path):
    model = HeadstartModel.from_checkpoint(run / "checkpoints" / "best.ckpt").eval()
    images = torch.randn(4, 3, 32, 32)
    assert max(check_parity(run / "model.onnx", model, images).values()) <= 1e-4
    _corrupt_last_gemm(run / "model.onnx", tmp_path / "broken.onnx")
    with pytest.raises(ExportError, match="disagrees with PyTorch: task 'label' logits differ"):
        check_parity(tmp_path / "broken.onnx", model, images)


@pytest.mark.slow
def test_a_broken_export_fails_the_training_run_loudly(tmp_path, monkeypatch):
    real = headstart.ship.shipping.export_onnx

    def broken_export(model, path, metadata=None):
        real(model, path, metadata=metadata)
        _corrupt_last_gemm(path, path)
        return path

    monkeypatch.setattr(headstart.ship.shipping, "export_onnx", broken_export)
    with pytest.raises(ExportError, match="disagrees with PyTorch"):
        train(compose_train(["trainer.max_epochs=1", "+trainer.limit_train_batches=4"], tmp_path))
    assert not (tmp_path / "run" / "model.onnx").exists()  # the broken file was not kept
    assert not (tmp_path / "run" / "bundle").exists()
    assert (tmp_path / "run" / "metrics.json").is_file()  # what training measured is kept


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    [
        "resnet18",
        "mobilenet_v3_small",
        "efficientnet_b0",
        "convnext_tiny",
        "efficientnet_lite0",
        "timm:resnet10t",
    ],
)
def test_registry_backbones_export_with_parity(name, tmp_path):
    torch.manual_seed(0)
    flow = {
        "tasks": {"label": {"kind": "multiclass", "classes": ["a", "b", "c"]}, "flag": {"kind": "binary"}}
    }
    model = HeadstartModel(flow=flow, optimizer=OPTIMIZER, backbone={"name": name, "weights": None}).eval()
    path = export_onnx(model, tmp_path / "m.onnx", metadata={"name": name})
    side = model.input_transform.crop
    worst = check_parity(path, model, torch.randn(3, 3, side, side))  # batch 3: the batch axis is dynamic
    assert max(worst.values()) <= 1e-4
    assert read_metadata(path) == {"name": name}
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_an_exporter_failure_names_the_backbone_and_the_way_out(tmp_path, monkeypatch):
    model = HeadstartModel(
        flow={"tasks": {"label": {"kind": "multiclass", "classes": ["a", "b"]}}},
        optimizer=OPTIMIZER,
        backbone={"name": "small_cnn", "weights": None},
    )

    def unsupported(*args, **kwargs):
        raise RuntimeError("aten::weird_op is not supported")

    monkeypatch.setattr(torch.onnx, "export", unsupported)
    with pytest.raises(
        ExportError, match=r"backbone 'small_cnn' cannot be exported.*weird_op.*export\.onnx=false"
    ):
        export_onnx(model, tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())


def test_a_head_on_features_is_not_exported_as_an_image_model(tmp_path):
    head = HeadstartModel(
        flow={"tasks": {"label": {"kind": "multiclass", "classes": ["a", "b"]}}},
        optimizer=OPTIMIZER,
        feature_dim=8,
    )
    with pytest.raises(ExportError, match=r"image_model\.ckpt"):
        export_onnx(head, tmp_path / "m.onnx")


# ---- evaluate.py ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_evaluate_on_the_checkpoint_and_on_its_onnx_export_agree(run, tmp_path):
    on_ckpt = evaluate(
        compose_eval(
            [f"model={run / 'checkpoints' / 'best.ckpt'}", "runtime=pytorch", "gradcam=0"], tmp_path / "a"
        )
    )
    on_onnx = evaluate(compose_eval([f"model={run / 'model.onnx'}", "gradcam=0"], tmp_path / "b"))
    training = json.loads((run / "metrics.json").read_text())
    assert set(on_ckpt) == set(on_onnx)
    for key, value in on_ckpt.items():
        assert on_onnx[key] == pytest.approx(value, abs=1e-4), key
        assert training[key] == pytest.approx(value, abs=1e-4), key  # the same test split, the same numbers
    assert json.loads((tmp_path / "a" / "speed.json").read_text())["machine"]["runtime"] == "pytorch"
    assert json.loads((tmp_path / "b" / "speed.json").read_text())["machine"]["runtime"] == "onnxruntime"


@pytest.mark.slow
def test_evaluation_folder_has_tables_pictures_speed_wrong_images_and_gradcam(run, tmp_path):
    metrics = evaluate(compose_eval([f"model={run}", "gradcam=4"], tmp_path))
    for name in ("metrics.json", "test_metrics.md", "test_metrics.csv", "speed.json", "report.md"):
        assert (tmp_path / name).is_file(), name
    assert Image.open(tmp_path / "confusion" / "label.png").size[0] > 100

    wrong = pd.read_csv(tmp_path / "wrong.csv", dtype=str)
    count = int(metrics["test/label/count"])
    assert len(wrong) == round((1 - metrics["test/label/acc"]) * count) > 0
    copies = sorted((tmp_path / "wrong").glob("*__as__*/*.png"))
    assert len(copies) == len(wrong)
    for row in wrong.itertuples():
        assert row.true != row.predicted
        copy = tmp_path / row.copy
        assert copy.parent.name == f"{row.true}__as__{row.predicted}"
        assert copy.read_bytes() == Path(row.path).read_bytes()

    speed = json.loads((tmp_path / "speed.json").read_text())
    assert speed["latency_p90_ms"] >= speed["latency_p50_ms"] > 0
    assert speed["throughput_images_per_s"] > 0 and speed["throughput_batch"] == 32
    assert speed["machine"]["threads"] >= 1 and speed["machine"]["cpu"]

    cams = sorted((tmp_path / "gradcam").glob("*.png"))
    assert len(cams) == 4 and cams[0].name.startswith("00_wrong_")
    for cam in cams:  # an 8x8 digit and its overlay side by side, each enlarged to 224x224, a caption above
        width, height = Image.open(cam).size
        assert width > 2 * 224 and height > 224
    report = (tmp_path / "report.md").read_text()
    assert "![label](confusion/label.png)" in report and "gradcam/00_wrong_" in report
    assert "__as__" not in report and "not_applicable" not in report
    shown = re.findall(r"^\*\*(\d), predicted (\d)\*\*", report, flags=re.M)  # "**3, predicted 9**"
    assert len(shown) == 4 and [t != p for t, p in shown] == [True, True, False, False]
    assert (
        len({t for t, _ in shown[2:]}) == 2
    )  # the right ones come from different classes, not the first files
    assert "onnxruntime" in report and "| label | multiclass |" in report


@pytest.mark.slow
def test_evaluate_py_on_a_run_directory(run, tmp_path):
    result = run_script(["evaluate.py", f"model={run}", f"paths.root_dir={tmp_path}", "gradcam=1"], cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    (report,) = (tmp_path / "outputs" / "evaluate").glob("*/report.md")
    assert "runtime **onnxruntime**" in report.read_text()


@pytest.mark.slow
def test_evaluate_refuses_data_with_other_classes(run, tmp_path):
    make_tree(tmp_path / "imgs", {"test": {"cat": 2, "dog": 2}})
    cfg = compose_eval(
        [f"model={run}", "data=folder", f"data.root={tmp_path / 'imgs'}", "data.num_workers=0"],
        tmp_path / "o",
    )
    with pytest.raises(DataError, match=r"does not answer the model's task 'label'.*'cat', 'dog'"):
        evaluate(cfg)


def test_evaluate_names_what_it_cannot_open(tmp_path):
    with pytest.raises(ConfigError, match="no such file or folder"):
        evaluate(compose_eval([f"model={tmp_path / 'nope.ckpt'}"], tmp_path / "o"))
    head = HeadstartModel(
        flow={"tasks": {"label": {"kind": "multiclass", "classes": ["a", "b"]}}},
        optimizer=OPTIMIZER,
        feature_dim=8,
    )
    torch.save(
        {"hyper_parameters": dict(head.hparams), "state_dict": head.state_dict()}, tmp_path / "head.ckpt"
    )
    with pytest.raises(ConfigError, match=r"head trained on DoF features.*image_model\.ckpt"):
        evaluate(compose_eval([f"model={tmp_path / 'head.ckpt'}"], tmp_path / "o"))
    torch.onnx.export(torch.nn.Linear(3, 2), (torch.randn(1, 3),), str(tmp_path / "plain.onnx"), dynamo=False)
    with pytest.raises(ConfigError, match="no headstart description"):
        evaluate(compose_eval([f"model={tmp_path / 'plain.onnx'}"], tmp_path / "o"))


# ---- predict.py -----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_predict_py_on_a_folder_with_one_corrupt_image(run, tmp_path):
    folder = tmp_path / "in"
    sub = folder / "more"
    sub.mkdir(parents=True)
    images = _test_images(run, 5)
    for k, p in enumerate(images):
        shutil.copy(p, (folder if k < 3 else sub) / f"{k}_{p.name}")
    (folder / "broken.png").write_bytes(b"not an image at all")
    result = run_script(
        [
            "predict.py",
            f"model={run / 'bundle'}",
            f"inputs={folder}",
            f"paths.root_dir={tmp_path}",
            "num_workers=0",
        ],
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (out,) = (tmp_path / "outputs" / "predict").glob("*/")
    table = pd.read_csv(out / "predictions.csv", dtype={"label": str})
    assert list(table.columns) == ["path", "label", "label/score"]
    assert len(table) == 5 and not table["path"].str.contains("broken").any()
    data = json.loads((out / "predictions.json").read_text())
    assert [Path(u["path"]).name for u in data["unreadable"]] == ["broken.png"]
    expected = Predictor.load(run / "bundle").predict([Path(p) for p in table["path"]])
    assert table["label"].tolist() == [e["label"]["value"] for e in expected]
    assert np.allclose(table["label/score"], [e["label"]["score"] for e in expected], atol=1e-5)


def test_predict_without_images_says_what_it_looked_for(tmp_path):
    from headstart.evaluate.prediction import find_images

    (tmp_path / "notes.txt").write_text("x")
    make_tree(tmp_path / "imgs", {"": {"a": 2}}, ext=".jpg")
    with pytest.raises(DataError, match=r"no images found.*glob"):
        find_images(str(tmp_path / "nothing_here"))
    assert len(find_images(str(tmp_path))) == 2  # recursive, images only
    assert len(find_images(str(tmp_path / "imgs" / "**" / "*.jpg"))) == 2


def test_parity_allows_regression_values_within_tolerance_but_no_flipped_decision():
    from headstart.flow import TaskFlow
    from headstart.ship.export import compare_outputs

    flow = TaskFlow.from_spec(
        {
            "tasks": {
                "open": {"kind": "binary"},
                "x": {"kind": "bounded_regression", "scale": 64, "given": "open"},
            }
        }
    )
    expected = {"open": torch.tensor([2.0, 1e-6]), "x": torch.tensor([0.3, 0.1])}
    nudged = {"open": torch.tensor([2.0, 1e-6]), "x": torch.tensor([0.30003, 0.1])}
    assert compare_outputs(expected, nudged, flow, 1e-4, "test")["x"] == pytest.approx(3e-5, rel=0.1)
    flipped = {"open": torch.tensor([2.0, -1e-6]), "x": torch.tensor([0.3, 0.1])}  # within 1e-4, but "no" now
    with pytest.raises(ExportError, match="decides differently from PyTorch for task 'open'"):
        compare_outputs(expected, flipped, flow, 1e-4, "test")
