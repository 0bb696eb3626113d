import math

import pytest
import torch

from headstart.flow import FlowHead, FlowMetrics, TaskFlow
from headstart.flow.tasks import FlowSpecError


def _flow() -> TaskFlow:
    return TaskFlow.from_spec({"tasks": {"label": {"kind": "multiclass", "classes": ["a", "b", "c"]}}})


def test_classification_flow_is_one_multiclass_task():
    flow = TaskFlow.classification(["cat", "dog"])
    assert flow.leaf_paths == ["label"]
    assert flow.tasks["label"].classes == ("cat", "dog")
    assert TaskFlow.from_spec(flow.to_spec()).to_spec() == flow.to_spec()


def test_loss_is_mean_over_labelled_rows_only():
    flow = _flow()
    logits = {"label": torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [5.0, 0.0, 0.0]])}
    targets = {"label": torch.tensor([0.0, float("nan"), 2.0])}
    total, per_task = flow.loss(logits, targets)
    expected = torch.nn.functional.cross_entropy(logits["label"][[0, 2]], torch.tensor([0, 2]))
    assert torch.allclose(total, expected)
    assert torch.allclose(per_task["label"], expected)
    per_sample = flow.per_sample_loss(logits, targets)
    assert per_sample[1] == 0
    assert torch.allclose(per_sample[[0, 2]].mean(), expected)


def test_loss_is_exactly_zero_and_differentiable_when_no_label_present():
    flow = _flow()
    logits = {"label": torch.randn(4, 3, requires_grad=True)}
    total, _ = flow.loss(logits, {"label": torch.full((4,), float("nan"))})
    assert total.item() == 0.0 and not math.isnan(total.item())
    total.backward()
    assert torch.equal(logits["label"].grad, torch.zeros(4, 3))


def test_metrics_ignore_missing_labels_and_count_rows():
    flow = _flow()
    metrics = FlowMetrics(flow)
    # batch 1: two right, one missing; batch 2: nothing labelled (must not drag the average down)
    metrics.update(
        {"label": torch.tensor([[9.0, 0, 0], [0, 9.0, 0], [0, 0, 9.0]])},
        {"label": torch.tensor([0.0, 1.0, float("nan")])},
    )
    metrics.update({"label": torch.randn(2, 3)}, {"label": torch.tensor([float("nan"), float("nan")])})
    metrics.update({"label": torch.tensor([[9.0, 0, 0]])}, {"label": torch.tensor([2.0])})
    out = metrics.compute()
    assert out["label/count"] == 3
    assert out["label/acc"] == pytest.approx(2 / 3)
    confusion = metrics.confusion("label")
    assert confusion.tolist() == [[1, 0, 0], [0, 1, 0], [1, 0, 0]]


def test_head_outputs_one_logit_tensor_per_task_and_pools_maps():
    flow = _flow()
    head = FlowHead(8, flow, hidden=[16], dropout=0.1)
    assert head(torch.randn(5, 8))["label"].shape == (5, 3)
    assert head(torch.randn(5, 8, 3, 3))["label"].shape == (5, 3)


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"tasks": {"x": {"kind": "regressionn"}}}, "kind 'regressionn' is not supported"),
        ({"tasks": {"x": {"kind": "multiclass"}}}, "needs 'classes'"),
        ({"tasks": {"x": {"kind": "multiclass", "classes": 3, "colour": 1}}}, "unknown keys"),
        ({"nottasks": {}}, "'tasks' key"),
    ],
)
def test_bad_specs_name_the_problem(spec, message):
    with pytest.raises(FlowSpecError, match=message):
        TaskFlow.from_spec(spec)


def test_epoch_loss_is_the_row_weighted_mean_of_batch_losses():
    flow = _flow()
    metrics = FlowMetrics(flow)
    metrics.update({"label": torch.randn(4, 3)}, {"label": torch.zeros(4)}, {"loss": torch.tensor(1.0)})
    metrics.update({"label": torch.randn(1, 3)}, {"label": torch.zeros(1)}, {"loss": torch.tensor(6.0)})
    assert metrics.compute()["loss"].item() == pytest.approx((4 * 1.0 + 1 * 6.0) / 5)
    metrics.reset()
    metrics.update({"label": torch.randn(2, 3)}, {"label": torch.zeros(2)}, {"loss": torch.tensor(3.0)})
    assert metrics.compute()["loss"].item() == pytest.approx(3.0)
