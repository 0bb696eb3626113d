"""The learning-rate finder (tune.lr_find=true) as users run it: configs composed from conf/, train() on tiny data."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_train, make_tree
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from headstart.core.model import HeadstartModel
from headstart.errors import ConfigError
from headstart.train.config import validate_train_config
from headstart.train.lr_finder import steepest_descent_lr
from headstart.train.recipe import train

# digits on the small CNN, four batches of 16 an epoch, not augmented; no test split, nothing exported.
DIGITS = [
    "backbone=small_cnn",
    "data.batch_size=16",
    "data.augment=[]",
    "trainer.max_epochs=1",
    "+trainer.limit_train_batches=4",
    "+trainer.limit_val_batches=1",
    "test=false",
    "export.onnx=false",
    "cost.latency=false",
    "tune.lr_find=true",
]


def _events(logdir: Path) -> tuple[dict[str, list], list[str]]:
    scalars: dict[str, list] = {}
    images: list[str] = []
    for f in sorted(logdir.glob("events.*")):
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0, "images": 0}).Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend(e.value for e in acc.Scalars(tag))
        images += acc.Tags()["images"]
    return scalars, images


def _run(overrides: list[str], tmp_path: Path, digits_root: Path) -> tuple[dict, dict, Path]:
    cfg = compose_train([*DIGITS, f"paths.data_dir={digits_root}", *overrides], tmp_path)
    train(cfg)
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    ckpt = torch.load(run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    return metrics, ckpt, run


@pytest.mark.slow
def test_lr_find_applies_the_suggestion_and_the_checkpoint_records_it(tmp_path, digits_root):
    metrics, ckpt, run = _run(["tune.num_training=16", "optimizer.lr=0.003"], tmp_path, digits_root)
    suggested = metrics["tune/lr_suggested"]
    assert 1e-6 <= suggested <= 1.0 and suggested != 0.003
    assert metrics["tune/lr"] == suggested
    assert ckpt["hyper_parameters"]["optimizer"]["lr"] == pytest.approx(suggested)
    assert ckpt["headstart_config"]["optimizer"]["lr"] == pytest.approx(suggested)
    assert (run / "lr_find.png").stat().st_size > 1000
    scalars, images = _events(run / "tensorboard")
    assert "tune/lr_find" in images
    assert scalars["tune/lr_suggested"] == [pytest.approx(suggested)]
    # the optimizer trained with it: Lightning's LearningRateMonitor saw the suggestion, not the configured rate
    assert scalars["lr/AdamW"][0] == pytest.approx(suggested)
    # the range test's own steps are not training: the run trained its four batches from the initial weights
    assert ckpt["global_step"] == 4


@pytest.mark.slow
def test_report_only_keeps_the_configured_lr_and_trains_as_without_the_finder(tmp_path, digits_root):
    metrics, ckpt, run = _run(
        ["tune.num_training=16", "tune.apply=false", "optimizer.lr=0.003"], tmp_path / "a", digits_root
    )
    assert "tune/lr_suggested" in metrics and metrics["tune/lr"] == 0.003
    assert ckpt["hyper_parameters"]["optimizer"]["lr"] == 0.003
    assert (run / "lr_find.png").is_file()
    # the finder restored weights, optimizer, loops and random state: training is the same as a run without it
    _, plain_ckpt, _ = _run(["tune.lr_find=false", "optimizer.lr=0.003"], tmp_path / "b", digits_root)
    for name, value in plain_ckpt["state_dict"].items():
        torch.testing.assert_close(ckpt["state_dict"][name], value, msg=name)


@pytest.mark.slow
def test_too_few_steps_give_no_suggestion_and_keep_the_lr(tmp_path, digits_root, caplog):
    with caplog.at_level(logging.WARNING, logger="headstart.train.lr_finder"):
        metrics, ckpt, run = _run(["tune.num_training=8", "optimizer.lr=0.003"], tmp_path, digits_root)
    assert "tune/lr_suggested" not in metrics and metrics["tune/lr"] == 0.003
    assert ckpt["hyper_parameters"]["optimizer"]["lr"] == 0.003
    (message,) = [r.getMessage() for r in caplog.records if "no suggestion" in r.getMessage()]
    assert (
        "only 8 loss values" in message and "tune.num_training" in message and "optimizer.lr=0.003" in message
    )
    assert (run / "lr_find.png").is_file()


@pytest.mark.slow
def test_a_finetune_schedule_still_gives_the_backbone_its_own_group_after_the_finder(tmp_path, digits_root):
    overrides = [
        "tune.num_training=16",
        "finetune=frozen_stages",
        "finetune.stages=1",
        "finetune.backbone_lr_ratio=0.1",
    ]
    metrics, _, run = _run(overrides, tmp_path, digits_root)
    scalars, _ = _events(run / "tensorboard")
    lr = metrics["tune/lr_suggested"]
    assert scalars["lr/AdamW/head"][0] == pytest.approx(lr)
    assert scalars["lr/AdamW/backbone_stages2-3"][0] == pytest.approx(0.1 * lr)


@pytest.mark.slow
def test_a_dof_run_tunes_the_head_and_costs_the_image_model(tmp_path):
    make_tree(tmp_path / "imgs", {"train": {"a": 8, "b": 8}, "val": {"a": 2, "b": 2}})
    cfg = compose_train(
        [
            "data=folder",
            f"data.root={tmp_path / 'imgs'}",
            "backbone=small_cnn",
            "extract.progress=false",
            "features=true",
            "trainer.max_epochs=2",
            "tune.lr_find=true",
            "tune.num_training=16",
            "export.onnx=false",
            "cost.runs=3",
        ],
        tmp_path,
    )
    train(cfg)
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    suggested = metrics["tune/lr_suggested"]
    for name in ("best.ckpt", "image_model.ckpt"):
        hparams = torch.load(run / "checkpoints" / name, weights_only=True)["hyper_parameters"]
        assert hparams["optimizer"]["lr"] == pytest.approx(suggested), name
    assert (run / "lr_find.png").is_file()
    # the cost is the image model's (backbone + head), of which this run trained the head
    full = HeadstartModel.from_checkpoint(run / "checkpoints" / "image_model.ckpt")
    assert metrics["cost/params"] == sum(
        p.numel() for p in [*full.backbone.parameters(), *full.head.parameters()]
    )
    assert metrics["cost/params_trainable"] == sum(p.numel() for p in full.head.parameters())
    assert metrics["cost/macs"] > 1e6 and metrics["cost/torch_ms"] > 0
    assert "cost/onnx_ms" not in metrics  # export.onnx=false: nothing to time
    assert json.loads((run / "cost.json").read_text())["model"] == "DoF head re-attached to its backbone"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["trainer=ddp"], "not under trainer=ddp"),
        (["resume=latest"], "drop ckpt_path/resume or tune.lr_find"),
        (["tune.min_lr=0.1", "tune.max_lr=0.01"], "0 < min_lr < max_lr"),
        (["tune.num_training=0"], "tune.num_training must be at least 1"),
    ],
)
def test_impossible_finder_settings_stop_before_any_work(overrides, message, tmp_path):
    cfg = compose_train(["tune.lr_find=true", *overrides], tmp_path)
    with pytest.raises(ConfigError, match=message):
        validate_train_config(cfg)


def test_finder_settings_are_checked_by_type(tmp_path):
    with pytest.raises(ConfigError, match=r"tune\.num_training"):
        validate_train_config(compose_train(["tune.num_training=many"], tmp_path))
    with pytest.raises(ConfigError, match=r"tune\.lr_fnd"):
        validate_train_config(compose_train(["+tune.lr_fnd=true"], tmp_path))


def test_fast_dev_run_skips_the_finder_and_the_cost_report(tmp_path, caplog):
    make_tree(tmp_path / "imgs", {"train": {"a": 6, "b": 6}})
    cfg = compose_train(
        ["debug=fast_dev_run", "data=folder", f"data.root={tmp_path / 'imgs'}", "tune.lr_find=true"], tmp_path
    )
    with caplog.at_level(logging.INFO, logger="headstart"):
        train(cfg)
    assert any("tune.lr_find skipped: fast_dev_run" in r.getMessage() for r in caplog.records)
    assert not (tmp_path / "run" / "lr_find.png").exists() and not (tmp_path / "run" / "cost.json").exists()


def test_suggestion_is_the_steepest_fall_per_decade():
    lrs = np.logspace(-6, 0, 100).tolist()
    # the loss falls fastest (per decade) at lr = 1e-2, then blows up past 1e-1
    losses = [2.0 - 1.5 / (1 + np.exp(-3 * (np.log10(lr) + 2))) + (5 * lr if lr > 0.1 else 0) for lr in lrs]
    suggested = steepest_descent_lr(lrs, losses)
    assert 10**-2.1 < suggested < 10**-1.9
    losses[50] = float("nan")  # a non-finite point is ignored
    assert 10**-2.1 < steepest_descent_lr(lrs, losses) < 10**-1.9
    assert steepest_descent_lr(lrs[:12], losses[:12]) is None  # fewer than two points after the skipped ones
