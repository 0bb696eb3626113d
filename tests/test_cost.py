"""The run cost report: parameters, MACs at the input size and batch-1 latency of the model a run ships."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import compose_train, make_tree
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from headstart.core.model import HeadstartModel
from headstart.errors import ConfigError
from headstart.train.config import validate_train_config
from headstart.train.cost import count_macs, count_params, describe_counts, shipped_model
from headstart.train.recipe import train

FLOW = {"tasks": {"label": {"kind": "multiclass", "classes": ["a", "b", "c"]}}}
ADAMW = {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-3}


def test_macs_match_a_hand_count_of_convolutions_and_matrix_products():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),  # 8 out channels x 10x10 positions x (3 in channels x 3x3 kernel)
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8),  # depthwise: 8 x 5x5 x (1 x 3x3)
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),  # 8 x 5
    ).eval()
    by_hand = 8 * 10 * 10 * 3 * 9 + 8 * 5 * 5 * 9 + 8 * 5
    assert count_macs(model, torch.zeros(1, 3, 10, 10)) == by_hand
    assert count_macs(model, torch.zeros(2, 3, 10, 10)) == 2 * by_hand  # per batch: the report uses batch 1


def test_a_features_head_is_costed_as_the_image_model_it_ships_as():
    head = HeadstartModel(flow=FLOW, optimizer=ADAMW, feature_dim=128, head={"hidden": [16]})
    rng = torch.get_rng_state()
    full = shipped_model(head, {"name": "small_cnn", "weights": None, "freeze": True, "trainable_stages": 0})
    assert torch.equal(torch.get_rng_state(), rng)  # costing does not change the run's random stream
    assert full.backbone is not None and not full.training
    for name, value in head.head.state_dict().items():  # the trained head, on a backbone
        assert torch.equal(full.head.state_dict()[name], value)
    backbone = sum(p.numel() for p in full.backbone.parameters())
    own = sum(p.numel() for p in head.head.parameters())
    trained = {n for n, p in head.named_parameters() if n.startswith("head.")}
    assert count_params(full) == (backbone + own, own)  # by requires_grad: its backbone is frozen
    assert count_params(full, trained) == (backbone + own, own)  # by name: what the run trained
    assert count_params(full, set()) == (backbone + own, 0)


def test_config_errors_name_the_cost_key(tmp_path):
    for override, message in [
        ("cost.runs=0", "cost.runs must be at least 1"),
        ("cost.threads=0", "cost.threads must be at least 1"),
        ("cost.device=gpu", "cost.device must be 'cpu' or 'run'"),
        ("cost.latency=sometimes", "cost.latency"),
    ]:
        with pytest.raises(ConfigError, match=message):
            validate_train_config(compose_train([override], tmp_path))


@pytest.mark.slow
def test_a_run_records_its_cost_in_metrics_json_cost_json_and_tensorboard(tmp_path, caplog):
    make_tree(tmp_path / "imgs", {"train": {"a": 8, "b": 8, "c": 8}, "val": {"a": 2, "b": 2, "c": 2}})
    cfg = compose_train(
        [
            "data=folder",
            f"data.root={tmp_path / 'imgs'}",
            "backbone=small_cnn",
            "backbone.freeze=true",
            "model.hidden=[16]",
            "trainer.max_epochs=1",
            "cost.runs=5",
        ],
        tmp_path,
    )
    with caplog.at_level("INFO", logger="headstart.train.cost"):
        train(cfg)
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    state = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)["state_dict"]
    shipped = {k: v for k, v in state.items() if k.startswith(("backbone.", "head.")) and "running_" not in k}
    shipped = {k: v for k, v in shipped.items() if not k.endswith("num_batches_tracked")}
    model = HeadstartModel.from_checkpoint(run / "checkpoints" / "best.ckpt")
    params = {n for n, _ in model.named_parameters()}
    assert metrics["cost/params"] == sum(v.numel() for k, v in shipped.items() if k in params)
    head = sum(v.numel() for k, v in shipped.items() if k.startswith("head.") and k in params)
    assert (
        metrics["cost/params_trainable"] == head < metrics["cost/params"]
    )  # the frozen backbone was not trained
    assert metrics["cost/macs"] == count_macs(model.eval(), torch.zeros(1, 3, 32, 32)) > 1e6
    assert 0 < metrics["cost/torch_ms"] < 1000 and 0 < metrics["cost/onnx_ms"] < 1000

    cost = json.loads((run / "cost.json").read_text())
    assert cost["input_shape"] == [1, 3, 32, 32] and cost["model"] == "backbone + head"
    latency = cost["latency"]
    assert latency["batch"] == 1 and latency["runs"] == 5
    assert latency["torch"]["device"] == "cpu" and latency["torch"]["threads"] == 1
    assert (
        latency["onnx"]["provider"] == "CPUExecutionProvider"
        and latency["onnx"]["p50_ms"] == metrics["cost/onnx_ms"]
    )
    assert cost["machine"]["cores"] >= 1

    logged = [r.getMessage() for r in caplog.records]
    fit_start = describe_counts(cost)
    assert fit_start in logged and "MACs at 3x32x32" in fit_start and "trainable" in fit_start

    scalars, texts = {}, []
    for f in (run / "tensorboard").glob("events.*"):
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0, "tensors": 0}).Reload()
        scalars.update(
            {t: acc.Scalars(t)[-1].value for t in acc.Tags()["scalars"] if t.startswith("summary/cost/")}
        )
        texts += [t for t in acc.Tags()["tensors"] if t.startswith("cost")]
    assert scalars["summary/cost/params"] == metrics["cost/params"]
    assert scalars["summary/cost/onnx_ms"] == pytest.approx(metrics["cost/onnx_ms"])
    assert texts
