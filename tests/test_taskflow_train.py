"""TaskFlow models trained as users train them: the security experiment, a user's own flow and table, DoF."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import ROOT, compose_train, make_image, run_script
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from headstart import Predictor
from headstart.core.model import HeadstartModel
from headstart.errors import DivergedError
from headstart.evaluate.evaluation import run_split
from headstart.evaluate.loading import load_model, model_datamodule
from headstart.flow import decision_scores
from headstart.train.recipe import train
from headstart.train.thresholds import store_flow_in_checkpoint, tune_on_validation


@pytest.fixture(scope="module")
def security_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("security")
    train(compose_train(["experiment=security"], tmp))
    return tmp / "run"


@pytest.mark.slow
def test_security_flow_reaches_the_accuracy_bars(security_run):
    metrics = json.loads((security_run / "metrics.json").read_text())
    for task in ("camera_blocked", "door_open", "door_locked", "person_present", "person.shirt"):
        assert metrics[f"test/{task}/acc"] > 0.98, task
        assert metrics[f"test/{task}/count"] > 0
    assert metrics["test/person.face_colour/acc"] > 0.98
    assert metrics["test/person.face_x1/nmae"] < 0.05
    # tasks are scored only where they apply by ground truth
    assert (
        metrics["test/person.shirt/count"]
        < metrics["test/person_present/count"]
        < metrics["test/camera_blocked/count"]
    )
    assert "test/person_present/e2e_acc" in metrics


@pytest.mark.slow
def test_security_run_writes_task_tables_and_worst_examples(security_run):
    table = pd.read_csv(security_run / "test_metrics.csv")
    assert list(table["task"]) == [
        "camera_blocked",
        "door_open",
        "door_locked",
        "person_present",
        "person.face_x1",
        "person.shirt",
        "person.face_colour",
    ]
    assert "| person.shirt | multiclass |" in (security_run / "test_metrics.md").read_text()
    images = set()
    for f in (security_run / "tensorboard").glob("events.*"):
        images |= set(EventAccumulator(str(f), size_guidance={"images": 0}).Reload().Tags()["images"])
    assert {"test/person.shirt/worst", "test/door_open/worst"} <= images


@pytest.mark.slow
def test_security_checkpoint_carries_the_flow_and_its_thresholds(security_run, tmp_path):
    best = security_run / "checkpoints" / "best.ckpt"
    model = HeadstartModel.from_checkpoint(best).eval()
    assert model.flow.leaf_paths[-1] == "person.face_colour"
    x = torch.randn(6, 3, 32, 32)
    logits = model(x)
    # thresholds written into the checkpoint change the gates of a reloaded model
    copy = tmp_path / "best.ckpt"
    copy.write_bytes(best.read_bytes())
    spec = model.flow.to_spec()
    probs = torch.sigmoid(logits["camera_blocked"])
    flow = model.flow
    flow.load_state(
        {**flow.state(), "thresholds": {**flow.thresholds, "camera_blocked": float(probs.max()) + 1e-3}}
    )
    store_flow_in_checkpoint(copy, flow.to_spec())
    reloaded = HeadstartModel.from_checkpoint(copy).eval()
    after = reloaded.flow.predict(reloaded(x))["camera_blocked"]["value"]
    assert after.sum() == 0 and spec != reloaded.flow.to_spec()
    assert reloaded.flow.thresholds["camera_blocked"] == pytest.approx(float(probs.max()) + 1e-3)


@pytest.mark.slow
def test_security_thresholds_decide_validation_as_tuning_scored(security_run):
    loaded = load_model(security_run / "checkpoints" / "best.ckpt", runtime="pytorch")
    val = run_split(loaded, model_datamodule(None, loaded, "val"), "val")
    reported = json.loads((security_run / "metrics.json").read_text())
    masks = loaded.flow.masks(val.targets)
    for path, task in loaded.flow.tasks.items():
        if task.kind != "binary":
            continue
        scores = decision_scores(val.logits[path][masks[path]])
        positive = val.targets[path][masks[path]] > 0.5
        threshold = torch.tensor(loaded.flow.thresholds[path], dtype=torch.float32)
        assert not bool((scores == threshold).any()), path  # between two scores, never on one
        decided = scores > threshold
        tp, fp = int((decided & positive).sum()), int((decided & ~positive).sum())
        f1 = 2 * tp / max(2 * tp + fp + int((~decided & positive).sum()), 1)
        assert f1 == pytest.approx(_best_f1_of(scores, positive)), path  # the best any threshold reaches ...
        assert reported[f"val/{path}/f1"] == pytest.approx(f1), path  # ... and what validation reported


def _best_f1_of(scores: torch.Tensor, positive: torch.Tensor) -> float:
    best = 0.0
    for cut in [0.0, *scores.tolist()]:  # thresholds lie in [0, 1]
        decided = scores > cut
        tp, fp = int((decided & positive).sum()), int((decided & ~positive).sum())
        best = max(best, 2 * tp / max(2 * tp + fp + int((~decided & positive).sum()), 1))
    return best


def test_a_users_own_flow_and_table_train_with_the_security_experiment(tmp_path):
    conf = tmp_path / "myconf" / "flow"
    conf.mkdir(parents=True)
    (conf / "shapes.yaml").write_text(
        "tasks:\n  big: {kind: binary}\n  colour: {kind: multiclass, classes: [red, green], given: big}\n"
    )
    rows = ["file,big,colour"]
    for i in range(24):
        make_image(tmp_path / "img" / f"{i}.png", seed=i)
        big = i % 2
        rows.append(f"img/{i}.png,{big},{['red', 'green'][i % 3 % 2] if big else ''}")
    (tmp_path / "table.csv").write_text("\n".join(rows) + "\n")
    result = run_script(
        [
            "train.py",
            "--config-dir",  # Hydra's options go before the overrides
            str(tmp_path / "myconf"),
            "experiment=security",
            "flow=shapes",
            f"data.csv={tmp_path / 'table.csv'}",
            "data.path_column=file",
            "data.split_column=null",
            "data.num_workers=0",
            "trainer.max_epochs=1",
            f"paths.root_dir={tmp_path}",
        ],
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = (tmp_path / "outputs" / "security").iterdir()
    metrics = json.loads((run / "metrics.json").read_text())
    assert "test/colour/acc" in metrics and "test/big/f1" in metrics
    assert not (tmp_path / "data" / "security").exists()  # the user's table: nothing generated


def test_a_bad_label_stops_with_row_column_and_value(tmp_path):
    make_image(tmp_path / "img" / "0.png")
    header = "path,split,camera_blocked,door_open,door_locked,person_present,person.face_x1,person.shirt,person.face_colour"
    (tmp_path / "table.csv").write_text(f"{header}\nimg/0.png,train,maybe,,,,,,\n")
    result = run_script(
        [
            "train.py",
            "experiment=security",
            f"data.csv={tmp_path / 'table.csv'}",
            f"paths.root_dir={tmp_path}",
        ],
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert "camera_blocked" in result.stderr and "maybe" in result.stderr and "row" in result.stderr


def test_security_flow_trains_on_dof_features(tmp_path):
    cfg = compose_train(
        ["experiment=security", "features=true", "trainer.max_epochs=2", "extract.progress=false"], tmp_path
    )
    train(cfg)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["test/person.face_colour/count"] > 0 and "dof/benefit_ratio" in metrics
    full = HeadstartModel.from_checkpoint(tmp_path / "run" / "checkpoints" / "image_model.ckpt")
    assert (
        full.flow.leaf_paths
        == HeadstartModel.from_checkpoint(tmp_path / "run" / "checkpoints" / "best.ckpt").flow.leaf_paths
    )
    # The run ships the image model and the head alone; both answer every task the same, not-applicable included.
    run = tmp_path / "run"
    images = sorted((tmp_path / "data" / "security").rglob("*.png"))[:16]
    whole = Predictor.load(run / "bundle").predict(images)
    combined = Predictor.load(run / "head_update", base=run / "bundle").predict(images)
    assert [{t: p[t]["value"] for t in p} for p in combined] == [{t: p[t]["value"] for t in p} for p in whole]
    assert any(not p[t]["applicable"] for p in whole for t in p)
    assert Predictor.load(run / "bundle").explain(images[0]).startswith("camera_blocked: ")


def test_uncertainty_weighting_is_selected_from_config_and_learns_task_weights(tmp_path):
    rows = ["path,big,colour"]
    for i in range(24):
        make_image(tmp_path / "img" / f"{i}.png", seed=i)
        colour = ["red", "green"][i % 3 % 2] if i % 4 else ""  # every 4th colour unlabelled
        rows.append(f"img/{i}.png,{i % 2},{colour}")
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    flow = "{tasks: {big: {kind: binary}, colour: {kind: multiclass, classes: [red, green]}}}"
    cfg = compose_train(
        [
            "data=table",
            f"data.csv={tmp_path / 't.csv'}",
            f"+flow={flow}",
            "model.loss_weighting=uncertainty",
            "trainer.max_epochs=2",
            "data.batch_size=2",
            "data.val_fraction=0.25",
            "export.onnx=false",
        ],
        tmp_path,
    )
    train(cfg)
    checkpoints = tmp_path / "run" / "checkpoints"
    state = torch.load(checkpoints / "last.ckpt", weights_only=True)["state_dict"]
    log_vars = {k: v for k, v in state.items() if k.startswith("weighting.")}
    assert len(log_vars) == 2 and all(float(v) != 0.0 for v in log_vars.values())  # learned, from 0
    # val/loss (validated with the best checkpoint, in batches of 2) is the weighting of each task's loss over all
    # the validation rows where it applies: sum of exp(-s) * loss + s, however the rows were batched.
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    best = torch.load(checkpoints / "best.ckpt", weights_only=True)["state_dict"]
    s = {task: float(best[f"weighting.log_vars.{task}"]) for task in ("big", "colour")}
    expected = sum(math.exp(-s[t]) * metrics[f"val/{t}/loss"] + s[t] for t in s)
    assert metrics["val/loss"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.slow
def test_evaluate_a_flow_model_writes_the_task_table_and_a_confusion_matrix_per_classification_task(
    security_run, tmp_path
):
    from hydra import compose, initialize_config_dir

    from headstart.evaluate.evaluation import evaluate

    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose(
            "evaluate",
            [
                f"model={security_run}",
                f"paths.root_dir={tmp_path}",
                f"paths.output_dir={tmp_path}",
                "gradcam=2",
            ],
        )
    metrics = evaluate(cfg)
    training = json.loads((security_run / "metrics.json").read_text())
    assert metrics["test/person.face_colour/f1"] == pytest.approx(
        training["test/person.face_colour/f1"], abs=1e-4
    )
    pictures = sorted(p.stem for p in (tmp_path / "confusion").glob("*.png"))
    assert pictures == sorted(
        ["camera_blocked", "door_open", "door_locked", "person_present", "person.shirt"]
    )
    table = pd.read_csv(tmp_path / "test_metrics.csv")
    assert (
        table["task"].tolist()
        == HeadstartModel.from_checkpoint(security_run / "checkpoints" / "best.ckpt").flow.leaf_paths
    )
    assert len(list((tmp_path / "gradcam").glob("*.png"))) == 2
    # the captions name the task: "**camera_blocked: no, predicted yes**"
    report = (tmp_path / "report.md").read_text()
    assert len(re.findall(r"^\*\*camera_blocked: (no|yes), predicted (no|yes)\*\*", report, flags=re.M)) == 2
    for copy in (tmp_path / "wrong").rglob("*.png"):  # wrong/<task>/<true>__as__<predicted>/
        assert copy.parent.parent.name in table["task"].tolist() and "__as__" in copy.parent.name


def test_thresholds_are_not_tuned_on_nan_outputs():
    model = HeadstartModel(
        flow={"tasks": {"x": {"kind": "binary"}}},
        optimizer={"_target_": "torch.optim.AdamW", "_partial_": True},
        feature_dim=4,
    )
    with torch.no_grad():
        for p in model.head.parameters():
            p.fill_(float("nan"))  # a diverged model
    batch = {"inputs": torch.randn(3, 4), "targets": {"x": torch.tensor([0.0, 1.0, 1.0])}}
    with pytest.raises(
        DivergedError, match=r"cannot be tuned on validation data: task 'x': 3 of 3 scores are NaN"
    ):
        tune_on_validation(model, [batch])
    assert model.flow.thresholds == {"x": 0.5}
