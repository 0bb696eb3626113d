"""prune.py as users run it: a trained model pruned in steps, each fine-tuned, measured, exported and reloadable."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import ROOT, compose_train, make_tree, run_script
from hydra import compose, initialize_config_dir
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from headstart import Predictor
from headstart.core.model import HeadstartModel
from headstart.errors import ConfigError, DataError
from headstart.evaluate.evaluation import evaluate
from headstart.prune.recipe import prune, select_step
from headstart.ship.export import check_parity
from headstart.train.recipe import train

FAST_SPEED = ["speed.min_runs=3", "speed.min_seconds=0.05", "speed.throughput_batch=4"]


def compose_prune(overrides: list[str], out: Path):
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        return compose("prune", [f"paths.root_dir={out}", f"paths.output_dir={out}", *FAST_SPEED, *overrides])


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("to_prune")
    train(compose_train(["trainer.max_epochs=2"], tmp))
    return tmp / "run"


@pytest.fixture(scope="module")
def pruned(trained, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pruned")
    prune(compose_prune([f"model={trained}", "pruning.steps=2", "pruning.ratio=0.5"], out))
    return out


@pytest.mark.slow
def test_two_steps_write_the_table_plot_checkpoints_exports_and_bundle(pruned):
    table = pd.read_csv(pruned / "pruning.csv")
    assert table["step"].tolist() == [0, 1, 2]
    assert table["macs"].is_monotonic_decreasing and table["params"].is_monotonic_decreasing
    assert table["macs"].iloc[-1] < 0.6 * table["macs"].iloc[0]
    for column in (
        "pytorch_b1_ms",
        "onnx_b1_ms",
        "pytorch_b4_img_s",
        "onnx_b4_img_s",
        "val/label/acc",
        "threads",
    ):
        assert column in table and table[column].notna().all(), column
    for step in (0, 1, 2):
        assert (pruned / "steps" / f"step_{step}.ckpt").is_file() and (
            pruned / "steps" / f"step_{step}.onnx"
        ).is_file()
    assert "| step | params | macs |" in (pruned / "pruning.md").read_text()
    assert (pruned / "pruning.png").stat().st_size > 10_000
    selected = json.loads((pruned / "selected.json").read_text())
    assert selected["selected_step"] == select_step(table, "val/label/acc", "max", 0.02)
    assert table.loc[table["selected"], "step"].tolist() == [selected["selected_step"]]
    assert Predictor.load(pruned / "bundle").tasks == ["label"]
    (events,) = (pruned / "tensorboard").glob("events.*")
    scalars = EventAccumulator(str(events), size_guidance={"scalars": 0}).Reload()
    assert [e.step for e in scalars.Scalars("prune/macs")] == [0, 1, 2]


@pytest.mark.slow
def test_pruned_checkpoints_rebuild_from_plain_shapes_and_match_their_onnx(pruned, trained):
    original = HeadstartModel.from_checkpoint(trained / "checkpoints" / "best.ckpt")
    ckpt = torch.load(pruned / "steps" / "step_2.ckpt", weights_only=True)  # plain data only
    assert ckpt["hyper_parameters"]["structure"]["modules"]
    model = HeadstartModel.from_checkpoint(pruned / "steps" / "step_2.ckpt").eval()
    again = HeadstartModel.from_checkpoint(pruned / "steps" / "step_2.ckpt").eval()
    x = torch.randn(5, 3, 32, 32)
    assert torch.equal(model(x)["label"], again(x)["label"])
    assert max(check_parity(pruned / "steps" / "step_2.onnx", model, x).values()) <= 1e-4
    head = {k: v.shape for k, v in model.head.state_dict().items()}
    assert head == {k: v.shape for k, v in original.head.state_dict().items()}  # the head is never pruned
    assert sum(p.numel() for p in model.backbone.parameters()) < sum(
        p.numel() for p in original.backbone.parameters()
    )


@pytest.mark.slow
def test_evaluate_and_continue_training_a_pruned_model(pruned, tmp_path):
    metrics = evaluate(
        _compose_eval([f"model={pruned / 'steps' / 'step_2.ckpt'}", "gradcam=1"], tmp_path / "eval")
    )
    assert metrics["test/label/count"] == 179
    assert len(list((tmp_path / "eval" / "gradcam").glob("*.png"))) == 1
    cfg = compose_train(
        [f"ckpt_path={pruned / 'steps' / 'step_2.ckpt'}", "backbone.freeze=false", "trainer.max_epochs=2"],
        tmp_path,
    )
    train(cfg)
    resumed = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    stored = torch.load(pruned / "steps" / "step_2.ckpt", weights_only=True)
    assert resumed["hyper_parameters"]["structure"] == stored["hyper_parameters"]["structure"]
    assert (
        resumed["global_step"] == 2 * stored["global_step"] > 0
    )  # one more epoch after the step's fine-tuning


def _compose_eval(overrides: list[str], out: Path):
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        return compose("evaluate", [f"paths.root_dir={out}", f"paths.output_dir={out}", *overrides])


def test_selection_takes_the_smallest_step_within_the_allowed_drop():
    table = pd.DataFrame(
        {"step": [0, 1, 2, 3], "macs": [100, 80, 60, 40], "val/acc": [0.90, 0.91, 0.885, 0.80]}
    )
    assert select_step(table, "val/acc", "max", 0.02) == 2
    assert select_step(table, "val/acc", "max", 0.0) == 1
    table["val/loss"] = [0.30, 0.31, 0.40, 0.50]
    assert select_step(table, "val/loss", "min", 0.02) == 1


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("pruning.ratio=1.5", "pruning.ratio must be between 0 and 1"),
        ("pruning.ratio=0", "pruning.ratio must be between 0 and 1"),
        ("pruning.steps=0", "pruning.steps must be at least 1"),
        ("pruning.importance=mystery", "pruning.importance='mystery' is unknown"),
    ],
)
def test_bad_pruning_settings_stop_before_any_work(override, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        prune(compose_prune([f"model={tmp_path / 'nothing.ckpt'}", override], tmp_path))


def test_a_file_that_is_not_a_headstart_model_is_refused_and_nothing_is_written(tmp_path):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.ckpt")
    result = run_script(
        ["prune.py", f"model={tmp_path / 'other.ckpt'}", f"paths.root_dir={tmp_path}"], cwd=ROOT
    )
    assert result.returncode == 2
    assert "is not a headstart checkpoint" in result.stderr
    assert not list((tmp_path / "outputs").rglob("*.csv")) and not list(
        (tmp_path / "outputs").glob("prune/*")
    )


@pytest.mark.slow
def test_data_with_other_classes_is_refused(trained, tmp_path):
    make_tree(tmp_path / "imgs", {"train": {"cat": 2, "dog": 2}, "val": {"cat": 1, "dog": 1}})
    cfg = compose_prune(
        [f"model={trained}", "data=folder", f"data.root={tmp_path / 'imgs'}", "data.num_workers=0"],
        tmp_path / "o",
    )
    with pytest.raises(DataError, match="does not answer the model's task 'label'"):
        prune(cfg)
    assert not (tmp_path / "o" / "pruning.csv").exists()
