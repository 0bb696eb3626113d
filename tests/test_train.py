"""End-to-end training as users run it: configs composed from conf/, train.py in a subprocess, real data."""

from __future__ import annotations

import importlib.util
import json
import shutil
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import ROOT, compose_train, make_image, make_tree, run_script, shared_data
from hydra import compose, initialize_config_dir
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from headstart.core.model import HeadstartModel
from headstart.data import BadImageWarning
from headstart.errors import ConfigError
from headstart.train.config import validate_train_config
from headstart.train.recipe import train

EXTRAS = ("mlflow", "wandb")  # conf/logger options whose package is an optional extra (pyproject.toml)
EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml"))


def _run_dirs(base: Path) -> list[Path]:
    return sorted(p.parent for p in base.glob("outputs/*/*/.hydra"))


def _scalars(logdir: Path, tag: str) -> list:
    events = []
    for f in sorted(logdir.glob("events.*")):
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0}).Reload()
        if tag in acc.Tags()["scalars"]:
            events += acc.Scalars(tag)
    return events


# --- composing ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_validates(experiment, tmp_path):
    cfg = compose_train([f"experiment={experiment}"], tmp_path)
    validate_train_config(cfg)
    assert cfg.name == experiment


@pytest.mark.parametrize(
    "group",
    [
        "data",
        "backbone",
        "optimizer",
        "scheduler",
        "trainer",
        "callbacks",
        "logger",
        "debug",
        "model",
        "notify",
    ],
)
def test_every_group_option_composes_and_validates(group, tmp_path):
    for option in _options(group):
        cfg = compose_train([f"{group}={option}"], tmp_path)
        if group == "logger" and option in EXTRAS and importlib.util.find_spec(option) is None:
            with pytest.raises(ConfigError, match=rf"pip install -e '\.\[{option}\]'"):
                validate_train_config(cfg)  # an optional extra that is not installed (tests/test_loggers.py)
        else:
            validate_train_config(cfg)


def test_no_arguments_is_the_digits_experiment(tmp_path):
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        plain, digits = compose("train"), compose("train", overrides=["experiment=digits"])
    assert plain == digits


@pytest.mark.parametrize(
    "override, key",
    [
        ("+backbone.nmae=resnet18", "backbone.nmae"),
        ("+optimizer.lrr=0.1", "optimizer.lrr"),
        ("+data.batchsize=8", "data.batchsize"),
        ("trainer.max_epochs=abc", "trainer.max_epochs"),
        ("backbone.freeze=maybe", "backbone.freeze"),
        ("data.batch_size=1.5", "data.batch_size"),
        ("+callbacks.model_checkpoint.monitr=x", "callbacks.model_checkpoint.monitr"),
    ],
)
def test_config_errors_name_the_key(override, key, tmp_path):
    cfg = compose_train([override], tmp_path)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_train_config(cfg)


# --- the main job: python train.py (digits) ----------------------------------------------------------------------


@pytest.mark.slow
def test_main_job_reaches_95_percent_test_accuracy(digits_run):
    metrics = json.loads((digits_run / "metrics.json").read_text())
    assert metrics["test/label/acc"] >= 0.95
    assert metrics["test/label/count"] == 179
    assert {"val/loss", "val/label/acc", "val/label/f1", "test/loss", "test/label/f1"} <= set(metrics)


@pytest.mark.slow
def test_run_directory_holds_config_checkpoints_and_tensorboard(digits_run):
    assert digits_run.parent.name == "digits"
    assert (digits_run / ".hydra" / "config.yaml").is_file()
    assert (digits_run / "checkpoints" / "best.ckpt").is_file()
    assert (digits_run / "checkpoints" / "last.ckpt").is_file()
    scalars, images = set(), set()
    for f in sorted((digits_run / "tensorboard").glob("events.*")):
        acc = EventAccumulator(str(f), size_guidance={"images": 0, "scalars": 0}).Reload()
        scalars |= set(acc.Tags()["scalars"])
        images |= set(acc.Tags()["images"])
    assert {"curves/loss/train", "curves/loss/val", "curves/label/acc/val", "lr/AdamW"} <= scalars
    assert {"metrics/label/f1/val", "summary/test/label/acc", "summary/val/loss"} <= scalars
    assert {"val/label/confusion", "val/label/predictions", "test/label/confusion"} <= images
    lr = _scalars(digits_run / "tensorboard", "lr/AdamW")
    assert lr[0].value > lr[-1].value  # the cosine schedule ran
    epoch_seconds = _scalars(digits_run / "tensorboard", "time/train_epoch_s")
    assert len(epoch_seconds) == 15 and all(0 < e.value < 60 for e in epoch_seconds)


@pytest.mark.slow
def test_checkpoint_loads_with_weights_only_and_predicts_the_same(digits_run):
    ckpt = torch.load(digits_run / "checkpoints" / "best.ckpt", weights_only=True)
    hp = ckpt["hyper_parameters"]
    assert hp["flow"]["tasks"]["label"]["classes"] == [str(i) for i in range(10)]
    model = HeadstartModel.from_checkpoint(digits_run / "checkpoints" / "best.ckpt").eval()
    x = torch.randn(4, 3, 32, 32)
    again = HeadstartModel.from_checkpoint(digits_run / "checkpoints" / "best.ckpt").eval()
    assert torch.equal(model(x)["label"], again(x)["label"])
    untrained = HeadstartModel(**{**hp, "backbone": {**hp["backbone"], "weights": None}}).eval()
    assert not torch.allclose(model(x)["label"], untrained(x)["label"])


@pytest.mark.slow
def test_a_trained_backbone_is_the_frozen_core_of_the_next_run(digits_run, tmp_path):
    best = digits_run / "checkpoints" / "best.ckpt"
    data_dir = digits_run.parents[2] / "data"
    cfg = compose_train(
        [
            f"backbone.weights={best}",
            "backbone.freeze=true",
            f"paths.data_dir={data_dir}",
            "trainer.max_epochs=1",
        ],
        tmp_path,
    )
    train(cfg)
    source = torch.load(best, weights_only=True)["state_dict"]
    result = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    body = [k for k in source if k.startswith("backbone.body.")]
    assert body and all(torch.equal(source[k], result[k]) for k in body)  # loaded, and frozen (BN stats too)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["test/label/acc"] >= 0.9  # a fresh head on trained features learns in one epoch


@pytest.mark.slow
def test_resume_latest_continues_the_newest_run(digits_run, tmp_path):
    # a copy of the main job's output root: the main job is shared, read only, by tests running in parallel
    shutil.copytree(digits_run.parents[2], tmp_path / "root")
    base = tmp_path / "root"
    digits_run = base / digits_run.relative_to(digits_run.parents[2])
    result = run_script(
        ["train.py", f"paths.root_dir={base}", "resume=latest", "trainer.max_epochs=16", "test=false"],
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from" in result.stdout + result.stderr
    new = [r for r in _run_dirs(base) if r != digits_run]
    assert len(new) == 1
    before = torch.load(digits_run / "checkpoints" / "last.ckpt", weights_only=True)
    after = torch.load(new[0] / "checkpoints" / "last.ckpt", weights_only=True)
    assert before["epoch"] == 14 and after["epoch"] == 15
    assert after["global_step"] == before["global_step"] * 16 // 15


def test_resume_latest_without_an_earlier_run_is_a_clear_error(tmp_path):
    cfg = compose_train(["resume=latest", f"paths.data_dir={tmp_path}/nodata"], tmp_path)
    with pytest.raises(ConfigError, match="no earlier run"):
        train(cfg)


# --- dog_cat on real photos with the pretrained backbone ----------------------------------------------------------


@pytest.mark.slow
def test_dog_cat_reaches_95_percent_with_frozen_pretrained_backbone(tmp_path):
    root = shared_data("dog_cat_small")
    cfg = compose_train(["experiment=dog_cat", f"data.root={root}", "trainer.max_epochs=3"], tmp_path)
    assert cfg.backbone.name == "efficientnet_lite0" and cfg.backbone.freeze
    train(cfg)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["test/label/acc"] >= 0.95, metrics
    assert metrics["test/label/count"] == 100


def test_missing_dog_cat_folder_explains_layout_and_pets_builder(tmp_path):
    result = run_script(["train.py", "experiment=dog_cat", f"paths.root_dir={tmp_path}"], cwd=ROOT)
    assert result.returncode == 2
    err = result.stderr
    assert "{train,val,test}" in err and "data.root=" in err and "python -m headstart.data.pets" in err
    assert "Traceback" not in err
    assert _run_dirs(tmp_path) == []


# --- sweeps ------------------------------------------------------------------------------------------------------


def test_two_job_multirun_writes_sweep_summary(tmp_path):
    data = tmp_path / "data"
    make_tree(data, {"train": {"a": 12, "b": 12}})
    result = run_script(
        [
            "train.py",
            "-m",
            "experiment=digits",
            "data=folder",
            f"data.root={data}",
            f"paths.root_dir={tmp_path}",
            "data.num_workers=0",
            "optimizer.lr=1e-3,1e-2",
            "trainer.max_epochs=1",
        ],
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = list((tmp_path / "multirun" / "digits").iterdir())
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    summary = pd.read_csv(sweep / "summary.csv")
    assert len(summary) == 2
    assert sorted(summary["optimizer.lr"]) == [0.001, 0.01]
    assert "data.root" not in summary  # the same in every job
    assert (summary["status"] == "ok").all()
    assert summary["val/loss"].is_monotonic_increasing  # best (lowest val/loss) first
    assert "| job |" in (sweep / "summary.md").read_text()


# --- bad data and bad configs ------------------------------------------------------------------------------------


def _tiny_folder(root: Path) -> Path:
    make_tree(root, {"train": {"a": 10, "b": 10}})
    bad = root / "train" / "a" / "broken.jpg"
    bad.write_bytes(b"this is not a jpeg")
    return bad


def test_corrupt_image_is_skipped_with_a_warning_naming_it(tmp_path):
    bad = _tiny_folder(tmp_path / "imgs")
    cfg = compose_train(["data=folder", f"data.root={tmp_path / 'imgs'}", "trainer.max_epochs=1"], tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(cfg)
    assert any(issubclass(w.category, BadImageWarning) and str(bad) in str(w.message) for w in caught)
    assert (tmp_path / "run" / "metrics.json").is_file()


def test_corrupt_image_with_on_bad_image_error_stops_cleanly(tmp_path):
    bad = _tiny_folder(tmp_path / "imgs")
    result = run_script(
        [
            "train.py",
            "data=folder",
            f"data.root={tmp_path / 'imgs'}",
            "data.on_bad_image=error",
            f"paths.root_dir={tmp_path}",
        ],
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert str(bad) in result.stderr and "Traceback" not in result.stderr
    assert _run_dirs(tmp_path) == []


def test_typo_on_the_command_line_stops_before_any_work(tmp_path):
    result = run_script(["train.py", "trainer.max_epoch=3", f"paths.root_dir={tmp_path}"], cwd=ROOT)
    assert result.returncode != 0
    assert "max_epoch" in result.stderr
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "data").exists()


def test_typo_in_a_config_file_stops_before_any_work(tmp_path):
    conf = tmp_path / "myconf" / "experiment"
    conf.mkdir(parents=True)
    (conf / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - digits\nname: mine\noptimizer:\n  lrr: 0.1\n"
    )
    result = run_script(
        [
            "train.py",
            "experiment=mine",
            f"hydra.searchpath=[file://{tmp_path / 'myconf'}]",
            f"paths.root_dir={tmp_path}",
        ],
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert "optimizer.lrr" in result.stderr and "did you mean 'lr'" in result.stderr
    assert _run_dirs(tmp_path) == [] and not (tmp_path / "data").exists()


# --- debug modes and other data ----------------------------------------------------------------------------------


def test_fast_dev_run_runs_one_batch_and_writes_only_its_metrics(tmp_path):
    make_tree(tmp_path / "imgs", {"train": {"a": 10, "b": 10}})
    cfg = compose_train(["debug=fast_dev_run", "data=folder", f"data.root={tmp_path / 'imgs'}"], tmp_path)
    assert cfg.trainer.fast_dev_run is True
    train(cfg)
    assert list((tmp_path / "run").rglob("*.ckpt")) == []
    assert not (tmp_path / "run" / "model.onnx").exists() and not (tmp_path / "run" / "tensorboard").exists()
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())  # what a sweep's summary reads
    assert metrics["test/label/count"] == 2 and "val/loss" in metrics  # the held-out images: 2 val, 2 test


def test_overfit_drives_the_loss_down(tmp_path):
    make_tree(tmp_path / "imgs", {"train": {"a": 16, "b": 16}})
    cfg = compose_train(
        [
            "debug=overfit",
            "data=folder",
            f"data.root={tmp_path / 'imgs'}",
            "trainer.max_epochs=40",
            "data.batch_size=8",
            "optimizer.lr=0.01",
        ],
        tmp_path,
    )
    train(cfg)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["epoch"] == 39
    losses = [e.value for e in _scalars(tmp_path / "run" / "tensorboard", "curves/loss/train")]
    assert len(losses) == 40
    assert losses[-1] < 0.25 * losses[0]


def test_csv_sample_table_trains(tmp_path):
    rows = ["path,label"]
    for i in range(24):
        make_image(tmp_path / "img" / f"{i}.png", seed=i)
        rows.append(f"img/{i}.png,{'odd' if i % 2 else 'even'}")
    (tmp_path / "samples.csv").write_text("\n".join(rows) + "\n")
    cfg = compose_train(
        ["data=csv", f"data.csv={tmp_path / 'samples.csv'}", "trainer.max_epochs=1"], tmp_path
    )
    train(cfg)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "best.ckpt", weights_only=True)
    assert ckpt["hyper_parameters"]["flow"]["tasks"]["label"]["classes"] == ["even", "odd"]


def test_class_weights_of_an_imbalanced_folder_reach_the_model(tmp_path):
    make_tree(tmp_path / "imgs", {"train": {"few": 6, "many": 24}})
    cfg = compose_train(
        ["data=folder", f"data.root={tmp_path / 'imgs'}", "data.balance=weights", "trainer.max_epochs=1"],
        tmp_path,
    )
    train(cfg)
    hp = torch.load(tmp_path / "run" / "checkpoints" / "best.ckpt", weights_only=True)["hyper_parameters"]
    few, many = hp["class_weights"]["label"]
    assert few > 2 * many


def test_a_bad_value_found_by_a_constructor_is_one_clear_message(tmp_path):
    # the data module rejects it inside Hydra's instantiate, which wraps the error in its own
    result = run_script(["train.py", "data.balance=oversample", f"paths.root_dir={tmp_path}"], cwd=ROOT)
    assert result.returncode == 2
    assert "headstart: error: data.balance must be one of" in result.stderr
    assert "Traceback" not in result.stderr and "Error in call to target" not in result.stderr
    assert _run_dirs(tmp_path) == []
