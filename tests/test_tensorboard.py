"""What users look at after `python train.py`: TensorBoard's layout (read with TensorBoard's own event reader) and
the console. The end-to-end checks share the session's main job (conftest.main_job)."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import compose_train
from lightning.pytorch.trainer.states import TrainerFn
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from headstart.flow import TaskFlow
from headstart.train.callbacks import PredictionGridLogger
from headstart.train.reports import final_metrics_table
from headstart.train.tensorboard import MAX_HPARAMS, tensorboard_tag, tuned_hyperparameters


def _events(logdir: Path) -> tuple[dict[str, list], dict[str, list[int]], dict]:
    """(scalars {tag: [events]}, images {tag: [steps]}, hparams plugin data {tag: HParamsPluginData})."""
    scalars: dict[str, list] = {}
    images: dict[str, list[int]] = {}
    hparams: dict = {}
    for f in sorted(logdir.glob("events.*")):
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0, "images": 0, "tensors": 0}).Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend(acc.Scalars(tag))
        for tag in acc.Tags()["images"]:
            images.setdefault(tag, []).extend(e.step for e in acc.Images(tag))
        try:
            content = acc.PluginTagToContent("hparams")
        except KeyError:  # a file without HParams data
            content = {}
        for tag, data in content.items():
            hparams[tag] = plugin_data_pb2.HParamsPluginData.FromString(data)
    return scalars, images, hparams


@pytest.mark.parametrize(
    "name, tag",
    [
        ("train/loss", "curves/loss/train"),
        ("val/loss", "curves/loss/val"),
        ("val/label/acc", "curves/label/acc/val"),
        ("val/door/closed/mae", "curves/door/closed/mae/val"),
        ("val/label/f1", "metrics/label/f1/val"),
        ("train/loss_step", "steps/loss/train"),
        ("lr-AdamW/head", "lr/AdamW/head"),
        ("final/test/label/acc", "summary/test/label/acc"),
        ("cost/macs", "summary/cost/macs"),
        ("dof/benefit_ratio", "summary/dof/benefit_ratio"),
        ("summary/val/loss", "summary/val/loss"),
        ("time/train_epoch_s", "time/train_epoch_s"),
    ],
)
def test_tags_put_the_curves_first_and_one_off_numbers_last(name, tag):
    assert tensorboard_tag(name) == tag
    groups = sorted({"curves", "lr", "metrics", "steps", "summary", "time", "tune"})
    assert groups[:2] == ["curves", "lr"]


def test_the_monitored_metric_is_drawn_with_the_curves():
    assert tensorboard_tag("val/label/f1", headline="val/label/f1") == "curves/label/f1/val"
    assert tensorboard_tag("train/label/f1", headline="val/label/f1") == "curves/label/f1/train"


def test_hparams_are_the_tuned_few_with_what_a_sweep_set(tmp_path):
    overrides = [
        "optimizer.lr=0.01",
        "model.hidden=[64]",
        "data.split_seed=3",
        "paths.root_dir=/x",
        "cost.latency=false",
        "+trainer.limit_train_batches=3",
        "+trainer.gradient_clip_val=1.0",
    ]
    cfg = compose_train(
        [*overrides[:3], *overrides[4:], "finetune=freeze_unfreeze", "backbone.freeze=true"], tmp_path
    )
    params = tuned_hyperparameters(cfg, overrides)
    assert len(params) <= MAX_HPARAMS
    assert list(params)[:3] == ["base_lr", "weight_decay", "batch_size"]
    assert params["base_lr"] == 0.01 and params["hidden"] == "[64]" and params["freeze"] == "true"
    assert params["finetune"] == "FreezeUnfreeze" and params["optimizer"] == "AdamW"
    assert params["data.split_seed"] == 3  # swept keys beyond the usual ones get a column too
    assert params["trainer.gradient_clip_val"] == 1.0
    assert not any(
        k.startswith(("paths", "callbacks", "logger", "hydra", "cost", "trainer.limit")) for k in params
    )
    assert all(isinstance(v, int | float | str) and not isinstance(v, bool) for v in params.values())


def test_final_metrics_table_is_one_rounded_table_without_counts():
    metrics = {
        "val/loss": 0.123456,
        "val/label/acc": 0.97206,
        "val/label/count": 179.0,
        "val/label/e2e_acc": 0.97206,
        "test/loss": 0.2,
        "test/label/acc": 0.98,
        "cost/params": 5.0,
    }
    table = final_metrics_table(metrics)
    lines = table.strip().splitlines()
    assert lines[0] == "| metric | val | test |"
    assert lines[2] == "| loss | 0.1235 | 0.2000 |" and lines[3] == "| label/acc | 0.9721 | 0.9800 |"
    assert len(lines) == 4  # no count, no e2e_acc of a task without a condition, no cost
    assert "label/e2e_acc" in final_metrics_table(metrics, conditional={"label"})


def test_prediction_grid_is_a_fixed_seeded_sample_across_classes():
    flow = TaskFlow.classification([str(c) for c in range(4)])
    trainer = SimpleNamespace(
        sanity_checking=False, state=SimpleNamespace(fn=TrainerFn.FITTING), fast_dev_run=False, loggers=[]
    )
    module = SimpleNamespace(flow=flow, input_transform=None)
    labels = torch.tensor(
        [0.0] * 40 + [1.0] * 40 + [2.0] * 40 + [3.0] * 40
    )  # sorted by class, as folders are

    def epoch(grid: PredictionGridLogger) -> list[int]:
        grid.on_validation_epoch_start(trainer, module)
        for start in range(0, len(labels), 32):
            rows = torch.arange(start, min(start + 32, len(labels)))
            batch = {
                "inputs": torch.zeros(len(rows), 3, 4, 4),
                "targets": {"label": labels[rows]},
                "index": rows,
            }
            grid.on_validation_batch_end(trainer, module, None, batch, start // 32)
        grid.on_validation_epoch_end(trainer, module)
        return list(grid._chosen)

    grid = PredictionGridLogger(num_images=8, seed=0)
    first = epoch(grid)
    assert len(first) == 8
    assert sorted(int(labels[i]) for i in first) == [
        0,
        0,
        1,
        1,
        2,
        2,
        3,
        3,
    ]  # every class, not the first batch
    assert epoch(grid) == first  # the same images every epoch
    assert epoch(PredictionGridLogger(num_images=8, seed=0)) == first  # the same for the same seed
    assert epoch(PredictionGridLogger(num_images=8, seed=1)) != first


# --- the main job, as users see it ------------------------------------------------------------------------------


@pytest.mark.slow
def test_tensorboard_opens_on_the_curves_with_a_short_hparams_table(main_job):
    scalars, images, hparams = _events(main_job.run / "tensorboard")
    epochs = 15
    groups = sorted({tag.split("/")[0] for tag in scalars})
    assert groups[:2] == ["curves", "lr"], groups
    assert {"curves/loss/train", "curves/loss/val", "curves/label/acc/train", "curves/label/acc/val"} == {
        t for t in scalars if t.startswith("curves/")
    }
    assert "epoch" not in scalars
    assert not [
        t for t in scalars if t.endswith(("/count", "e2e_acc"))
    ]  # constants; acc again without conditions
    # every chart outside summary/ is a curve: one point per epoch, no stray point from re-validating the best
    for tag, events in scalars.items():
        if tag.startswith("summary/"):
            assert len({e.step for e in events}) == 1, tag
        elif tag.startswith("curves/") or tag.startswith("metrics/"):
            assert len(events) == epochs, (tag, len(events))
    assert len(scalars["time/train_epoch_s"]) == epochs
    # images: one grid and one confusion matrix per epoch, none from re-validating
    assert len(images["val/label/predictions"]) == epochs == len(set(images["val/label/confusion"]))
    # HParams: the few tuned hyperparameters, the final metrics and the cost as metric columns
    experiment = hparams["_hparams_/experiment"].experiment
    names = [h.name for h in experiment.hparam_infos]
    assert len(names) <= MAX_HPARAMS and names[:3] == ["base_lr", "weight_decay", "batch_size"]
    assert {"backbone", "dropout", "epochs", "seed", "augment"} <= set(names)
    ticked = ["augment", "backbone", "base_lr", "batch_size", "dropout"]  # TensorBoard's first five by name
    assert sorted(names)[:5] == ticked
    values = hparams["_hparams_/session_start_info"].session_start_info.hparams
    assert values["base_lr"].number_value == pytest.approx(0.003) and values["freeze"].string_value == "false"
    metric_tags = {m.name.tag for m in experiment.metric_infos}
    assert {"summary/test/label/acc", "summary/val/loss", "summary/cost/macs"} <= metric_tags
    assert metric_tags <= set(scalars)  # each column has its value


@pytest.mark.slow
def test_the_main_job_console_is_quiet_and_prints_the_metrics_once(main_job):
    out = main_job.output
    for noise in ("Warning", "warn(", "LeafSpec", "litlogger", "Tip:", "Total FLOPs", "Validate metric"):
        assert noise not in out, noise
    assert not re.search(r"^INFO: ", out, flags=re.MULTILINE)  # Lightning's own handler: every line twice
    assert out.count("Restoring states from the checkpoint") == 2  # validate and test, once each
    assert out.count("final metrics (metrics.json)") == 1
    table = out.split("final metrics (metrics.json):", 1)[1]
    assert re.search(r"\| label/acc \| 0\.\d{4} \| 0\.\d{4} \|", table)
    assert "0.97206705" not in out and not re.search(r"\d\.\d{8}", table.split("\n\n")[0])
