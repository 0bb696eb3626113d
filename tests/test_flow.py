import json
import math
import warnings

import pytest
import torch

from headstart.flow import (
    FlowHead,
    FlowMetrics,
    NonFiniteError,
    TaskFlow,
    UncertaintyWeighting,
    decision_scores,
)
from headstart.flow.flow import best_f1_threshold
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


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_multiclass_loss_equals_cross_entropy_on_the_applicable_rows_and_ignores_nan_elsewhere(smoothing):
    flow = _flow()
    logits = torch.randn(6, 3)
    logits[[1, 4]] = float("nan")  # rows without a label: neither the loss nor the gradient may see them
    logits.requires_grad_(True)
    targets = torch.tensor([0.0, float("nan"), 2.0, 1.0, float("nan"), 2.0])
    weight = torch.tensor([1.0, 3.0, 0.5])
    total, _ = flow.loss({"label": logits}, {"label": targets}, {"label": weight}, label_smoothing=smoothing)
    rows = torch.tensor([0, 2, 3, 5])
    expected = torch.nn.functional.cross_entropy(
        logits[rows], targets[rows].long(), weight=weight, label_smoothing=smoothing
    )
    assert torch.allclose(total, expected)
    total.backward()
    assert torch.isfinite(logits.grad).all() and torch.equal(logits.grad[[1, 4]], torch.zeros(2, 3))


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


def test_epoch_loss_is_the_loss_over_all_labelled_rows_however_they_were_batched():
    flow = _flow()
    logits = {"label": torch.randn(5, 3)}
    targets = {"label": torch.tensor([0.0, 2.0, float("nan"), float("nan"), 1.0])}
    whole, _ = flow.loss(logits, targets)
    metrics = FlowMetrics(flow)
    for rows in ([0, 2, 3], [1, 4]):  # 1 and 2 labelled rows: a mean by batch size would weigh them 3 : 2
        part = {"label": logits["label"][rows]}, {"label": targets["label"][rows]}
        metrics.update(*part, flow.loss(*part)[1])
    assert metrics.compute()["loss"].item() == pytest.approx(whole.item(), rel=1e-6)


# ---- conditional flows -------------------------------------------------------------------------------------------

NAN = float("nan")
LN2, LN3 = math.log(2), math.log(3)


def _worked() -> TaskFlow:
    return TaskFlow.from_spec(
        {
            "tasks": {
                "x": {"kind": "binary"},
                "y": {"kind": "binary", "given": "x"},
                "g": {"given": "~y", "tasks": {"z": {"kind": "multiclass", "classes": 3}}},
            }
        }
    )


def _security() -> TaskFlow:
    return TaskFlow.from_spec(
        {
            "tasks": {
                "camera_blocked": {"kind": "binary"},
                "door_open": {"kind": "binary", "given": "~camera_blocked"},
                "door_locked": {"kind": "binary", "given": "~door_open"},
                "person_present": {"kind": "binary", "given": "door_open"},
                "person": {
                    "given": "person_present",
                    "tasks": {
                        "face_x1": {"kind": "bounded_regression", "scale": 64},
                        "shirt": {"kind": "multiclass", "classes": ["blue", "red", "yellow"]},
                        "colour": {"kind": "multilabel", "classes": ["red", "green"]},
                    },
                },
            }
        }
    )


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def test_worked_example_from_the_issue():
    flow = _worked()
    assert flow.leaf_paths == ["x", "y", "g.z"]
    logits = {"x": torch.zeros(3), "y": torch.zeros(3), "g.z": torch.zeros(3, 3)}
    targets = {"x": _t(1, 0, 1), "y": _t(0, 1, NAN), "g.z": _t(2, 1, 0)}
    masks = flow.masks(targets)
    assert masks["x"].tolist() == [True, True, True]
    assert masks["y"].tolist() == [True, False, False]
    assert masks["g.z"].tolist() == [True, False, False]
    total, per_task = flow.loss(logits, targets)
    assert per_task["x"].item() == pytest.approx(LN2)
    assert per_task["y"].item() == pytest.approx(LN2)
    assert per_task["g.z"].item() == pytest.approx(LN3)
    assert total.item() == pytest.approx(2.484907, abs=1e-6)
    per_sample = flow.per_sample_loss(logits, targets)
    assert per_sample.tolist() == pytest.approx([2.484907, 0.693147, 0.693147], abs=1e-6)


def test_task_that_applies_nowhere_adds_exactly_zero_with_zero_gradient():
    flow = _worked()
    logits = {
        "x": torch.zeros(2, requires_grad=True),
        "y": torch.full((2,), 3.0, requires_grad=True),
        "g.z": torch.randn(2, 3, requires_grad=True),
    }
    # x is false everywhere, so y never applies; y is never known, so g.z never applies
    targets = {"x": _t(0, 0), "y": _t(1, 0), "g.z": _t(0, 1)}
    total, per_task = flow.loss(logits, targets)
    assert per_task["y"].item() == 0.0 and per_task["g.z"].item() == 0.0
    assert total.item() == pytest.approx(LN2)
    total.backward()
    assert torch.equal(logits["y"].grad, torch.zeros(2))
    assert torch.equal(logits["g.z"].grad, torch.zeros(2, 3))
    assert not torch.isnan(logits["x"].grad).any()


@pytest.mark.parametrize("kind", ["binary", "multilabel", "bounded_regression", "regression"])
def test_every_kind_gives_zero_not_nan_without_labels(kind):
    spec = {"kind": kind} | ({"classes": ["a", "b"]} if kind == "multilabel" else {})
    spec |= {"scale": 10} if kind == "bounded_regression" else {}
    flow = TaskFlow.from_spec({"tasks": {"t": spec}})
    shape = (4, 2) if kind == "multilabel" else (4,)
    logits = {"t": torch.randn(shape, requires_grad=True)}
    total, _ = flow.loss(logits, {"t": torch.full(shape, NAN)})
    assert total.item() == 0.0
    total.backward()
    assert torch.equal(logits["t"].grad, torch.zeros(shape))


def test_negation_of_a_missing_label_is_false_and_so_is_its_reference():
    flow = TaskFlow.from_spec(
        {
            "tasks": {
                "a": {"kind": "binary"},
                "b": {"kind": "binary", "given": "~a"},
                "c": {"kind": "binary", "given": "a"},
            }
        }
    )
    masks = flow.masks({"a": _t(NAN, 0, 1), "b": _t(1, 1, 1), "c": _t(1, 1, 1)})
    assert masks["b"].tolist() == [False, True, False]
    assert masks["c"].tolist() == [False, False, True]


def test_reference_to_a_task_that_does_not_apply_is_neither_true_nor_false():
    flow = _security()
    n = 2
    targets = {p: torch.full((n,), NAN) for p in flow.leaf_paths}
    targets["person.colour"] = torch.full((n, 2), NAN)
    targets["camera_blocked"] = _t(1, 0)
    targets["door_open"] = _t(0, 0)  # labelled, but it only applies where the camera is not blocked
    targets["door_locked"] = _t(1, 1)
    masks = flow.masks(targets)
    assert masks["door_open"].tolist() == [False, True]
    assert masks["door_locked"].tolist() == [False, True]


def test_nested_groups_and_their_conditions():
    flow = TaskFlow.from_spec(
        {
            "tasks": {
                "a": {"kind": "binary"},
                "b": {"kind": "binary"},
                "c": {"kind": "binary"},
                "outer": {
                    "given": "a",
                    "tasks": {"inner": {"given": "~b", "tasks": {"t": {"kind": "regression", "given": "c"}}}},
                },
            }
        }
    )
    assert flow.leaf_paths == ["a", "b", "c", "outer.inner.t"]
    targets = {
        "a": _t(1, 1, 1, 0, 1),
        "b": _t(0, 1, 0, 0, NAN),
        "c": _t(1, 1, 0, 1, 1),
        "outer.inner.t": _t(1, 1, 1, 1, 1),
    }
    assert flow.masks(targets)["outer.inner.t"].tolist() == [True, False, False, False, False]
    assert flow.condition_text("outer.inner.t") == "(a) & (~b) & (c)"
    assert TaskFlow.from_spec(flow.to_spec()).to_spec() == flow.to_spec()


def test_and_not_and_parentheses_follow_three_valued_logic():
    flow = TaskFlow.from_spec(
        {
            "tasks": {
                "a": {"kind": "binary"},
                "b": {"kind": "binary"},
                "both": {"kind": "binary", "given": "a & ~b"},
                "not_both": {"kind": "binary", "given": "~(a & b)"},
            }
        }
    )
    ones = _t(1, 1, 1, 1)
    masks = flow.masks({"a": _t(1, 1, 0, NAN), "b": _t(0, 1, NAN, 0), "both": ones, "not_both": ones})
    assert masks["both"].tolist() == [True, False, False, False]
    # ~(a & b) is true where either is known false, even if the other is unknown
    assert masks["not_both"].tolist() == [True, False, True, True]


def test_multilabel_loss_is_mean_over_applicable_rows_and_classes():
    flow = TaskFlow.from_spec({"tasks": {"m": {"kind": "multilabel", "classes": ["a", "b"]}}})
    logits = {"m": torch.tensor([[0.0, 0.0], [9.0, 9.0], [2.0, -2.0]])}
    targets = {"m": torch.tensor([[1.0, 0.0], [NAN, NAN], [1.0, 1.0]])}
    sp = lambda v: math.log1p(math.exp(v))  # noqa: E731  softplus: BCE of a positive label at logit -v
    total, _ = flow.loss(logits, targets)
    assert total.item() == pytest.approx((LN2 + LN2 + sp(-2) + sp(2)) / 4)
    assert flow.per_sample_loss(logits, targets).tolist() == pytest.approx([LN2, 0.0, (sp(-2) + sp(2)) / 2])


def test_bounded_regression_loss_and_decode():
    flow = TaskFlow.from_spec({"tasks": {"b": {"kind": "bounded_regression", "scale": 64}}})
    total, _ = flow.loss({"b": torch.zeros(3)}, {"b": _t(16, 48, NAN)})
    assert total.item() == pytest.approx(0.0625)  # (0.5 - 0.25)^2 and (0.5 - 0.75)^2
    value = flow.predict({"b": torch.tensor([0.0, math.log(3)])})["b"]["value"]
    assert value.tolist() == pytest.approx([32.0, 48.0])


@pytest.mark.parametrize("loss, expected", [("mse", 2.125), ("l1", 1.25), ("smooth_l1", 0.8125)])
def test_regression_losses(loss, expected):
    flow = TaskFlow.from_spec({"tasks": {"r": {"kind": "regression", "loss": loss}}})
    total, _ = flow.loss({"r": _t(0, 3, 7)}, {"r": _t(0.5, 1, NAN)})
    assert total.item() == pytest.approx(expected)


def test_predictions_under_a_false_predicted_condition_are_not_applicable():
    flow = _worked()
    logits = {"x": _t(2, -2, 2), "y": _t(3, 3, -3), "g.z": torch.tensor([[0.0, 5.0, 0.0]] * 3)}
    out = flow.predict(logits)
    assert out["x"]["applicable"].tolist() == [True, True, True]
    assert out["x"]["value"].tolist() == [1.0, 0.0, 1.0]
    assert out["y"]["applicable"].tolist() == [True, False, True]
    assert out["g.z"]["applicable"].tolist() == [False, False, True]
    value = out["g.z"]["value"]
    assert math.isnan(value[0]) and math.isnan(value[1]) and value[2].item() == 1.0


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_tuned_thresholds_survive_save_and_load_and_change_the_gates():
    flow = TaskFlow.from_spec(
        {
            "tasks": {
                "x": {"kind": "binary"},
                "y": {"kind": "binary", "given": "x"},
                "never": {"kind": "binary"},
                "m": {"kind": "multilabel", "classes": ["a", "b"]},
            }
        }
    )
    logits = {
        "x": torch.tensor([_logit(p) for p in (0.6, 0.345, 0.2, 0.1)]),
        "y": torch.zeros(4),
        "never": torch.zeros(4),
        "m": torch.tensor([[_logit(0.9), 0.0], [_logit(0.705), 0.0], [_logit(0.3), 0.0], [_logit(0.1), 0.0]]),
    }
    targets = {
        "x": _t(1, 1, 0, 0),
        "y": _t(1, 1, NAN, NAN),
        "never": torch.full((4,), NAN),
        "m": torch.tensor([[1.0, NAN], [0.0, NAN], [0.0, NAN], [0.0, NAN]]),
    }
    assert flow.predict(logits)["y"]["applicable"].tolist() == [True, False, False, False]
    tuned = flow.tune_thresholds(logits, targets)
    # x: any t in [0.2, 0.345) separates perfectly: its midpoint. m.a: [0.705, 0.9) -> its midpoint. y: both
    # applicable rows are positive at p = 0.5, so the midpoint of [0, 0.5); "never" and m.b have no applicable
    # label and keep their default.
    assert tuned == {"x": 0.2725, "y": 0.25, "never": 0.5, "m": [0.8025, 0.5]}
    assert flow.thresholds == tuned
    assert flow.predict(logits)["y"]["applicable"].tolist() == [True, True, False, False]

    spec = flow.to_spec()
    assert spec["thresholds"] == {"x": 0.2725, "y": 0.25, "m": [0.8025, 0.5]}
    loaded = TaskFlow.from_spec(spec)
    assert loaded.thresholds == tuned
    assert loaded.predict(logits)["y"]["applicable"].tolist() == [True, True, False, False]
    fresh = TaskFlow.from_spec({"tasks": spec["tasks"]})
    fresh.load_state(flow.state())
    assert fresh.thresholds == tuned


def test_bad_thresholds_in_a_spec_are_config_errors():
    spec = {"tasks": {"x": {"kind": "binary"}}, "thresholds": {"x": 1.5}}
    with pytest.raises(FlowSpecError, match="'x' needs a number in"):
        TaskFlow.from_spec(spec)
    with pytest.raises(FlowSpecError, match="'y' is not a binary or multilabel task"):
        TaskFlow.from_spec({"tasks": {"x": {"kind": "binary"}}, "thresholds": {"y": 0.5}})


@pytest.mark.parametrize(
    "tasks, message",
    [
        (
            {"a": {"kind": "binary", "given": "nope"}},
            r"task 'a': condition given: 'nope' refers to unknown task 'nope'",
        ),
        (
            {"a": {"kind": "binary", "given": "b"}, "b": {"kind": "binary", "given": "a"}},
            r"task 'a': condition given: 'b' makes a cycle: a -> b -> a",
        ),
        (
            {"m": {"kind": "multiclass", "classes": 3}, "a": {"kind": "binary", "given": "~m"}},
            r"task 'a': condition given: '~m' refers to 'm', a multiclass task",
        ),
        (
            {"b": {"kind": "binary"}, "a": {"kind": "binary", "given": "b &"}},
            r"task 'a': bad condition given: 'b &'",
        ),
        (
            {"b": {"kind": "binary"}, "a": {"kind": "binary", "given": "(b"}},
            r"task 'a': bad condition given: '\(b'",
        ),
        (
            {"b": {"kind": "binary"}, "a": {"kind": "binary", "given": "b | b"}},
            r"task 'a': bad condition given: 'b \| b'",
        ),
        (
            {"b": {"kind": "binary"}, "a": {"kind": "binary", "given": "b b"}},
            r"task 'a': bad condition given: 'b b'",
        ),
        (
            {"g": {"given": "ghost", "tasks": {"t": {"kind": "binary"}}}},
            r"task 'g.t' \(in group 'g'\): condition given: 'ghost' refers to unknown task 'ghost'",
        ),
        (
            {"g": {"given": "g.t", "tasks": {"t": {"kind": "binary"}}}},
            r"task 'g.t'.*makes a cycle: g.t -> g.t",
        ),
        (
            {"b": {"kind": "bounded_regression"}},
            r"task 'b': a bounded_regression task needs a positive number 'scale'",
        ),
        ({"r": {"kind": "regression", "loss": "huber"}}, r"task 'r': loss 'huber' is not one of"),
        ({"a.b": {"kind": "binary"}}, r"task 'a.b': a task or group name"),
        ({"g": {"given": "a", "colour": 1, "tasks": {"t": {"kind": "binary"}}}}, r"group 'g': unknown keys"),
    ],
)
def test_condition_and_spec_errors_name_the_task(tasks, message):
    with pytest.raises(FlowSpecError, match=message):
        TaskFlow.from_spec({"tasks": tasks})


def test_explain_prints_the_applicable_decisions_as_a_tree():
    flow = _security()
    logits = {
        "camera_blocked": _t(-1, 3),
        "door_open": _t(1, 1),
        "door_locked": _t(0, 0),
        "person_present": _t(2, 2),
        "person.face_x1": _t(0, 0),
        "person.shirt": torch.tensor([[0.0, 1.0, 0.0]] * 2),
        "person.colour": torch.tensor([[2.0, -2.0]] * 2),
    }
    p_red = math.e / (math.e + 2)
    assert flow.explain(logits, 0) == "\n".join(
        [
            "camera_blocked: no (p=0.269, logit=-1.000)",
            "  door_open: yes (p=0.731, logit=1.000)",
            "    person_present: yes (p=0.881, logit=2.000)",
            "      person.face_x1: 32.000 (p=0.500, logit=0.000)",
            f"      person.shirt: red (p={p_red:.3f}, logit=1.000)",
            "      person.colour: red (p=[0.881, 0.119], logit=[2.000, -2.000])",
        ]
    )
    assert flow.explain(logits, 1) == "camera_blocked: yes (p=0.953, logit=3.000)"


def test_head_gives_targets_shapes_per_kind():
    flow = _security()
    head = FlowHead(8, flow, hidden=[4])
    assert isinstance(head, FlowHead)
    out = head(torch.randn(5, 8))
    assert out["camera_blocked"].shape == (5,)
    assert out["person.face_x1"].shape == (5,)
    assert out["person.shirt"].shape == (5, 3)
    assert out["person.colour"].shape == (5, 2)


def test_uncertainty_weighting_leaves_absent_tasks_alone():
    flow = _worked()
    weighting = UncertaintyWeighting(flow.leaf_paths)
    logits = {"x": torch.zeros(2, requires_grad=True), "y": torch.zeros(2), "g.z": torch.zeros(2, 3)}
    targets = {"x": _t(0, 0), "y": _t(1, 0), "g.z": _t(0, 1)}  # only x applies
    total, _ = flow.loss(logits, targets, weighting=weighting)
    assert total.item() == pytest.approx(LN2)  # exp(-0) * ln2 + 0
    opt = torch.optim.Adam(weighting.parameters(), lr=0.1)
    total.backward()
    assert weighting.log_var("x").grad.item() == pytest.approx(1 - LN2)  # d/ds (exp(-s) L + s) at s = 0
    for path in ("y", "g.z"):
        grad = weighting.log_var(path).grad
        assert grad is None or torch.equal(grad, torch.zeros(()))
    opt.step()
    assert weighting.log_var("x").item() != 0.0
    assert weighting.log_var("y").item() == 0.0 and weighting.log_var("g.z").item() == 0.0


def test_binary_metrics_and_end_to_end_accuracy():
    flow = TaskFlow.from_spec({"tasks": {"x": {"kind": "binary"}, "y": {"kind": "binary", "given": "x"}}})
    metrics = FlowMetrics(flow)
    logits = {"x": _t(5, 5, -5, -5), "y": _t(-5, -5, 5, 0)}
    targets = {"x": _t(1, 0, NAN, 0), "y": _t(1, NAN, 1, NAN)}
    metrics.update({k: v[:2] for k, v in logits.items()}, {k: v[:2] for k, v in targets.items()})
    metrics.update({k: v[2:] for k, v in logits.items()}, {k: v[2:] for k, v in targets.items()})
    out = {k: v.item() for k, v in metrics.compute().items()}
    assert out["x/count"] == 3
    assert out["x/acc"] == pytest.approx(2 / 3)
    assert out["x/precision"] == pytest.approx(1 / 2)
    assert out["x/recall"] == pytest.approx(1.0)
    assert out["x/f1"] == pytest.approx(2 / 3)
    assert out["x/auroc"] == pytest.approx(0.75)  # the positive ties one negative and beats the other
    assert out["y/count"] == 1 and out["y/acc"] == 0.0
    assert "y/auroc" not in out  # one class only
    # x: rows 0, 1, 3 (row 2 unlabelled); right on 0 and 3.
    assert out["x/e2e_acc"] == pytest.approx(2 / 3)
    # y: row 0 applies and is predicted to, but wrong; row 1 wrongly predicted to apply; row 2 unknown (x
    # missing); row 3 correctly predicted not to apply.
    assert out["y/e2e_acc"] == pytest.approx(1 / 3)
    assert metrics.confusion("x") is None


def test_multiclass_metrics_top_k_and_macro_f1():
    flow = TaskFlow.from_spec({"tasks": {"c": {"kind": "multiclass", "classes": 4}}})
    metrics = FlowMetrics(flow)
    metrics.update({"c": torch.tensor([[3.0, 2.0, 1.0, 0.0]] * 5)}, {"c": _t(0, 1, 2, 3, NAN)})
    out = {k: v.item() for k, v in metrics.compute().items()}
    assert out["c/count"] == 4
    assert out["c/acc"] == pytest.approx(1 / 4)
    assert out["c/top3_acc"] == pytest.approx(3 / 4)
    assert out["c/f1"] == pytest.approx(0.1)  # class 0: 2 * 1 / (2 + 3); the rest 0
    assert out["c/e2e_acc"] == pytest.approx(1 / 4)
    assert metrics.confusion("c").tolist() == [[1, 0, 0, 0]] * 4


def test_multilabel_metrics_per_class_f1():
    flow = TaskFlow.from_spec({"tasks": {"m": {"kind": "multilabel", "classes": ["a", "b"]}}})
    metrics = FlowMetrics(flow)
    logits = torch.tensor([[5.0, -5.0], [5.0, 5.0], [-5.0, 5.0], [-5.0, -5.0]])
    targets = torch.tensor([[1.0, 0.0], [1.0, 0.0], [NAN, NAN], [0.0, 1.0]])
    metrics.update({"m": logits}, {"m": targets})
    out = {k: v.item() for k, v in metrics.compute().items()}
    assert out["m/count"] == 3
    assert out["m/f1_a"] == pytest.approx(1.0)
    assert out["m/f1_b"] == pytest.approx(0.0)
    assert out["m/f1"] == pytest.approx(0.5)
    assert out["m/acc"] == pytest.approx(4 / 6)
    assert out["m/e2e_acc"] == pytest.approx(1 / 3)


def test_regression_metrics_in_target_units():
    flow = TaskFlow.from_spec(
        {"tasks": {"b": {"kind": "bounded_regression", "scale": 10}, "r": {"kind": "regression"}}}
    )
    metrics = FlowMetrics(flow)
    metrics.update(
        {"b": torch.zeros(4), "r": _t(10, 0, 1, 0)},
        {"b": _t(4, 8, 5.2, NAN), "r": _t(10.4, 0.04, 2, NAN)},
    )
    out = {k: v.item() for k, v in metrics.compute().items()}
    assert out["b/count"] == 3
    assert out["b/mae"] == pytest.approx(1.4, abs=1e-5)  # decoded 5 vs 4, 8, 5.2
    assert out["b/rmse"] == pytest.approx(math.sqrt((1 + 9 + 0.04) / 3), abs=1e-5)
    assert out["b/nmae"] == pytest.approx(0.14, abs=1e-6)
    assert out["b/e2e_acc"] == pytest.approx(1 / 3)  # within 0.05 * scale = 0.5: only 5.2
    assert out["r/mae"] == pytest.approx((0.4 + 0.04 + 1) / 3, abs=1e-5)
    assert out["r/e2e_acc"] == pytest.approx(2 / 3)  # within 0.05 * max(|target|, 1)


def test_specs_from_hydra_configs_round_trip_with_thresholds():
    from omegaconf import OmegaConf

    flow = TaskFlow.from_spec(
        OmegaConf.create({"tasks": {"m": {"kind": "multilabel", "classes": ["a", "b"]}}})
    )
    flow.thresholds["m"] = [0.25, 0.5]
    loaded = TaskFlow.from_spec(OmegaConf.create(flow.to_spec()))
    assert loaded.thresholds == {"m": [0.25, 0.5]}
    assert loaded.predict({"m": torch.tensor([[_logit(0.3), _logit(0.3)]])})["m"]["value"].tolist() == [
        [1.0, 0.0]
    ]


def test_tree_puts_each_task_under_the_one_its_condition_asks_last():
    flow = TaskFlow.from_spec(
        {
            "tasks": {
                "blocked": {"kind": "binary"},
                "open": {"kind": "binary", "given": "~blocked"},
                "locked": {"kind": "binary", "given": "~open"},
                "person": {"kind": "binary", "given": "open"},
                "who": {
                    "given": "person",
                    "tasks": {
                        "x": {"kind": "bounded_regression", "scale": 64},
                        "shirt": {"kind": "multiclass", "classes": ["red", "blue"]},
                    },
                },
                "both": {"kind": "multilabel", "classes": ["a", "b"], "given": "open & ~blocked"},
            }
        }
    )
    assert flow.tree().splitlines() == [
        "blocked  binary",
        "  open  binary  given ~blocked",
        "    locked  binary  given ~open",
        "    person  binary  given open",
        "      who.x  bounded_regression (0..64)  given person",
        "      who.shirt  multiclass [red, blue]  given person",
        "    both  multilabel [a, b]  given open & ~blocked",
    ]


# ---- epoch losses, absent and non-finite metrics -------------------------------------------------------------------


def _weighted_security() -> TaskFlow:
    return TaskFlow.from_spec(
        {
            "tasks": {
                "camera_blocked": {"kind": "binary", "weight": 2.0},
                "door_open": {"kind": "binary", "given": "~camera_blocked"},
                "door_locked": {"kind": "binary", "given": "~door_open"},
                "person_present": {"kind": "binary", "given": "door_open", "weight": 0.5},
                "person": {
                    "given": "person_present",
                    "tasks": {
                        "face_x1": {"kind": "bounded_regression", "scale": 64},
                        "shirt": {"kind": "multiclass", "classes": ["blue", "red", "yellow"], "weight": 3.0},
                        "colour": {"kind": "multilabel", "classes": ["red", "green"]},
                    },
                },
            }
        }
    )


def _security_rows(flow: TaskFlow, n: int, seed: int = 0) -> tuple[dict, dict]:
    """Random logits and partial labels; door_locked is never labelled, so it applies nowhere."""
    g = torch.Generator().manual_seed(seed)

    def some(values: torch.Tensor, missing: float = 0.2) -> torch.Tensor:
        gone = torch.rand(values.shape, generator=g) < missing
        return torch.where(gone, torch.full_like(values, NAN), values)

    binary = lambda: some(torch.randint(0, 2, (n,), generator=g).float())  # noqa: E731
    targets = {
        "camera_blocked": binary(),
        "door_open": binary(),
        "door_locked": torch.full((n,), NAN),
        "person_present": binary(),
        "person.face_x1": some(torch.rand(n, generator=g) * 64),
        "person.shirt": some(torch.randint(0, 3, (n,), generator=g).float()),
        "person.colour": some(torch.randint(0, 2, (n, 2), generator=g).float(), 0.3),
    }
    logits = {
        p: torch.randn((n, t.num_outputs) if t.num_outputs > 1 else (n,), generator=g) * 2
        for p, t in flow.tasks.items()
    }
    return logits, targets


def _epoch_values(flow, logits, targets, order, batch_size, class_weights=None, weighting=None) -> dict:
    metrics = FlowMetrics(flow)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        part = {p: v[rows] for p, v in logits.items()}, {p: v[rows] for p, v in targets.items()}
        _, per_task = flow.loss(*part, class_weights, weighting=weighting)
        metrics.update(*part, per_task, class_weights=class_weights, weighting=weighting)
    return {k: v.item() for k, v in metrics.compute().items()}


@pytest.mark.parametrize("weighted", ["static", "uncertainty"])
def test_epoch_loss_does_not_depend_on_the_batch_size(weighted):
    flow = _weighted_security()
    logits, targets = _security_rows(flow, 150)
    class_weights = {"person.shirt": torch.tensor([1.0, 3.0, 0.5]), "camera_blocked": torch.tensor(2.0)}
    weighting = None
    if weighted == "uncertainty":
        weighting = UncertaintyWeighting(flow.leaf_paths)
        with torch.no_grad():
            for i, path in enumerate(flow.leaf_paths):
                weighting.log_var(path).fill_(0.3 * i - 1.0)
    # The flow loss over all rows at once: each task's loss over the rows where it applies, combined.
    whole, per_task = flow.loss(logits, targets, class_weights, weighting=weighting)
    order = torch.randperm(150, generator=torch.Generator().manual_seed(1))
    for batch_size in (7, 64, 150):
        values = _epoch_values(flow, logits, targets, order, batch_size, class_weights, weighting)
        assert values["loss"] == pytest.approx(whole.item(), rel=1e-5), batch_size
        for path in flow.leaf_paths:
            if path == "door_locked":  # applies nowhere: no loss of its own, nothing added
                assert values["door_locked/count"] == 0 and "door_locked/loss" not in values
            else:
                assert values[f"{path}/loss"] == pytest.approx(per_task[path].item(), rel=1e-5), (
                    batch_size,
                    path,
                )


def test_a_task_that_applies_to_no_row_reports_its_count_and_nothing_else():
    flow = TaskFlow.from_spec({"tasks": {"x": {"kind": "binary"}, "y": {"kind": "binary", "given": "x"}}})
    metrics = FlowMetrics(flow)
    logits = {"x": _t(-5, -5, -5), "y": _t(5, 5, 5)}
    targets = {"x": _t(0, 0, 0), "y": _t(NAN, NAN, NAN)}  # x false everywhere: y applies nowhere
    metrics.update(logits, targets, flow.loss(logits, targets)[1])
    out = {k: v.item() for k, v in metrics.compute().items()}
    assert out["y/count"] == 0
    assert sorted(k for k in out if k.startswith("y/")) == ["y/count"]  # no e2e_acc of 1.0, no loss, no score
    assert out["x/e2e_acc"] == 1.0 and out["x/acc"] == 1.0
    assert out["loss"] == pytest.approx(flow.loss(logits, targets)[0].item())


def test_nothing_applies_anywhere_gives_no_loss():
    flow = _flow()
    metrics = FlowMetrics(flow)
    logits, targets = {"label": torch.randn(3, 3)}, {"label": torch.full((3,), NAN)}
    metrics.update(logits, targets, flow.loss(logits, targets)[1])
    assert metrics.compute() == {"label/count": 0}


def test_a_nan_loss_or_nan_logits_are_reported_as_nan_never_as_zero():
    flow = TaskFlow.from_spec({"tasks": {"x": {"kind": "binary"}, "m": {"kind": "multiclass", "classes": 3}}})
    metrics = FlowMetrics(flow)
    good = {"x": _t(3, -3), "m": torch.tensor([[3.0, 0, 0], [0, 3.0, 0]])}
    targets = {"x": _t(1, 0), "m": _t(0, 1)}
    metrics.update(good, targets, flow.loss(good, targets)[1])
    bad = {"x": _t(NAN, 3), "m": torch.tensor([[3.0, 0, 0], [0, 3.0, 0]])}  # one diverged logit of x
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "nan dropped" warning either: nothing is dropped
        metrics.update(bad, targets, flow.loss(bad, targets)[1])
        out = {k: v.item() for k, v in metrics.compute().items()}
    assert math.isnan(out["loss"]) and math.isnan(out["x/loss"])
    for name in ("acc", "precision", "recall", "f1", "e2e_acc"):
        assert math.isnan(out[f"x/{name}"]), name
    assert out["x/count"] == 4  # counts stay counts
    assert out["m/acc"] == 1.0 and out["m/loss"] == pytest.approx(flow.loss(good, targets)[1]["m"].item())


# ---- thresholds ----------------------------------------------------------------------------------------------------


def _binary() -> TaskFlow:
    return TaskFlow.from_spec({"tasks": {"x": {"kind": "binary"}}})


def _best_f1(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """The best F1 any threshold in [0, 1] can reach under `scores > t` (brute force over the scores)."""
    return max(_f1(scores > c, positive) for c in [0.0, *scores.tolist()])


def _f1(decided: torch.Tensor, positive: torch.Tensor) -> float:
    tp, fp, fn = (
        int((decided & positive).sum()),
        int((decided & ~positive).sum()),
        int((~decided & positive).sum()),
    )
    return 1.0 if 2 * tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)


def test_a_tuned_threshold_lies_between_two_scores_and_decides_as_tuning_scored():
    flow = _binary()
    logits, targets = {"x": torch.tensor([_logit(p) for p in (0.1, 0.3, 0.7)])}, {"x": _t(0, 1, 1)}
    flow.tune_thresholds(logits, targets)
    t = flow.thresholds["x"]
    scores = decision_scores(logits["x"])
    assert float(scores[0]) < t < float(scores[1])
    assert flow.predict(logits)["x"]["value"].tolist() == [0.0, 1.0, 1.0]  # F1 1, as tuning scored it


@pytest.mark.parametrize("seed", range(4))
def test_tuned_thresholds_reach_the_best_f1_and_sit_on_no_score(seed):
    g = torch.Generator().manual_seed(seed)
    n = 60
    scores = (torch.rand(n, generator=g) * 20).round() / 20  # many ties
    positive = torch.rand(n, generator=g) < scores  # mostly, not always, separable
    t = best_f1_threshold(scores, positive)
    decided = scores > torch.tensor(t, dtype=torch.float32)
    assert _f1(decided, positive) == _best_f1(scores, positive)
    assert not bool((scores == torch.tensor(t, dtype=torch.float32)).any())
    # The same decisions from the flow's own rule, on logits giving those scores.
    flow = _binary()
    flow.thresholds["x"] = t
    logits = torch.logit(scores.double().clamp(1e-6, 1 - 1e-6)).float()
    assert torch.equal(flow.tasks["x"].decode(logits, t), decision_scores(logits) > torch.tensor(t))


def _f32(x: float) -> float:
    return float(torch.tensor(x, dtype=torch.float32))


@pytest.mark.parametrize(
    "scores, positive, decided",
    [
        ([0.6, 0.7, 0.9], [1, 1, 1], [1, 1, 1]),  # one class: all found
        ([0.1, 0.2, 0.95], [0, 0, 0], [0, 0, 0]),  # no positives: nothing found
        ([0.4, 0.4, 0.4], [1, 0, 1], [1, 1, 1]),  # one distinct score
        ([0.0, 0.5], [1, 1], [0, 1]),  # a score of exactly 0 is never above a threshold
        ([1.0, 1.0], [0, 0], [0, 0]),  # nor is one of exactly 1
        (
            [0.1, 0.3, 0.7, 0.9],
            [1, 0, 0, 1],
            [0, 0, 0, 1],
        ),  # equal F1 below and above: the interval nearer 0.5
    ],
)
def test_threshold_edge_cases(scores, positive, decided):
    scores_t = torch.tensor(scores)
    t = best_f1_threshold(scores_t, torch.tensor(positive).bool())
    assert (scores_t > torch.tensor(t, dtype=torch.float32)).long().tolist() == decided
    assert 0.0 <= t <= 1.0 and t not in {_f32(s) for s in scores if 0 < s < 1}


def test_adjacent_float32_scores_are_still_separated():
    low = torch.tensor(0.123456, dtype=torch.float32)
    high = torch.nextafter(low, torch.tensor(1.0))  # nothing lies strictly between them
    t = best_f1_threshold(torch.stack([low, high]), torch.tensor([False, True]))
    assert torch.tensor(t, dtype=torch.float32) == low  # the lower one: "no" under >
    assert (torch.stack([low, high]) > torch.tensor(t, dtype=torch.float32)).tolist() == [False, True]


def test_nan_scores_refuse_to_tune_and_name_the_task():
    flow = TaskFlow.from_spec({"tasks": {"m": {"kind": "multilabel", "classes": ["a", "b"]}}})
    logits = {"m": torch.tensor([[1.0, NAN], [-1.0, 2.0]])}
    with pytest.raises(NonFiniteError, match=r"task 'm\[b\]': 1 of 2 scores are NaN"):
        flow.tune_thresholds(logits, {"m": torch.tensor([[1.0, 0.0], [0.0, 1.0]])})


def test_tuned_thresholds_round_trip_through_json_exactly():
    flow = TaskFlow.from_spec(
        {"tasks": {"x": {"kind": "binary"}, "m": {"kind": "multilabel", "classes": ["a", "b", "c"]}}}
    )
    g = torch.Generator().manual_seed(0)
    logits = {"x": torch.randn(200, generator=g) * 3, "m": torch.randn(200, 3, generator=g) * 3}
    targets = {
        "x": (torch.rand(200, generator=g) > 0.5).float(),
        "m": (torch.rand(200, 3, generator=g) > 0.4).float(),
    }
    flow.tune_thresholds(logits, targets)
    loaded = TaskFlow.from_spec(json.loads(json.dumps(flow.to_spec())))
    assert loaded.thresholds == flow.thresholds
    for path in ("x", "m"):
        assert torch.equal(loaded.predict(logits)[path]["value"], flow.predict(logits)[path]["value"])


def test_one_decision_rule_whatever_the_batch_position_or_logit_dtype():
    task = _binary().tasks["x"]
    z = torch.randn(4099, generator=torch.Generator().manual_seed(0)) * 5
    whole = decision_scores(z)
    one_by_one = torch.cat([decision_scores(z[i : i + 1].clone()) for i in range(len(z))])
    assert torch.equal(whole, one_by_one)  # torch's float32 sigmoid differs by an ulp between these
    # float64 (and half-precision) logits decide as the same logits taken as float32, at a float32 threshold
    near = torch.logit(torch.tensor(0.3, dtype=torch.float64)) + torch.linspace(
        -1e-6, 1e-6, 2001, dtype=torch.float64
    )
    assert torch.equal(task.decode(near, 0.3), task.decode(near.float(), 0.3))
    assert torch.equal(task.decode(z.bfloat16(), 0.3), task.decode(z.bfloat16().float(), 0.3))


@pytest.mark.parametrize("seed", [0, 1])
def test_scores_from_counts_equal_torchmetrics_on_the_same_rows(seed):
    """FlowMetrics counts instead of keeping torchmetrics objects; its scores must be torchmetrics' on the rows where
    each task applies, batched any way (a class that never occurs, NaN labels and 0/0 cases included)."""
    import torchmetrics.functional.classification as C
    from torchmetrics.functional import mean_absolute_error, mean_squared_error

    g = torch.Generator().manual_seed(seed)
    flow = TaskFlow.from_spec(
        {
            "tasks": {
                "b": {"kind": "binary"},
                "m": {"kind": "multiclass", "classes": 6},
                "l": {"kind": "multilabel", "classes": ["x", "y", "z"]},
                "r": {"kind": "regression"},
                "s": {"kind": "bounded_regression", "scale": 4},
            }
        }
    )
    n = 97
    logits = {
        "b": torch.randn(n, generator=g),
        "m": torch.randn(n, 6, generator=g) - torch.tensor([0, 0, 0, 0, 0, 9.0]),  # class 5: never predicted
        "l": torch.randn(n, 3, generator=g) + torch.tensor([0, 0, -9.0]),  # z: never predicted
        "r": torch.randn(n, generator=g),
        "s": torch.randn(n, generator=g),
    }
    nan = lambda shape: torch.rand(shape, generator=g) < 0.2  # noqa: E731
    targets = {
        "b": torch.where(nan(n), torch.nan, torch.randint(0, 2, (n,), generator=g).float()),
        "m": torch.where(
            nan(n), torch.nan, torch.randint(0, 5, (n,), generator=g).float()
        ),  # class 5: never true
        "l": torch.where(nan((n, 3)), torch.nan, torch.randint(0, 2, (n, 3), generator=g).float()),
        "r": torch.where(nan(n), torch.nan, torch.randn(n, generator=g) * 3),
        "s": torch.where(nan(n), torch.nan, torch.rand(n, generator=g) * 4),
    }
    targets["l"][:, 2] = torch.where(torch.isnan(targets["l"][:, 2]), torch.nan, 0.0)  # z: never true
    metrics = FlowMetrics(flow, flush_every=3)
    for rows in torch.arange(n).split(13):
        metrics.update({k: v[rows] for k, v in logits.items()}, {k: v[rows] for k, v in targets.items()})
    got = {k: v.item() for k, v in metrics.compute().items()}

    masks = flow.masks(targets)
    b = masks["b"]
    pb, tb = decision_scores(logits["b"][b]), targets["b"][b].long()
    th = flow.thresholds.get("b", 0.5)
    want = {
        "b/acc": C.binary_accuracy(pb, tb, threshold=th),
        "b/precision": C.binary_precision(pb, tb, threshold=th),
        "b/recall": C.binary_recall(pb, tb, threshold=th),
        "b/f1": C.binary_f1_score(pb, tb, threshold=th),
        "b/auroc": C.binary_auroc(pb, tb),
    }
    m = masks["m"]
    lm, tm = logits["m"][m], targets["m"][m].long()
    want["m/acc"] = C.multiclass_accuracy(lm, tm, 6, average="micro")
    want["m/top3_acc"] = C.multiclass_accuracy(lm, tm, 6, average="micro", top_k=3)
    want["m/f1"] = C.multiclass_f1_score(lm, tm, 6, average="macro")
    ll = logits["l"][masks["l"]]
    tl = torch.nan_to_num(targets["l"][masks["l"]], nan=-1.0).long()
    per_class = C.multilabel_f1_score(decision_scores(ll), tl, 3, average=None, ignore_index=-1)
    want["l/acc"] = C.multilabel_accuracy(decision_scores(ll), tl, 3, average="micro", ignore_index=-1)
    want.update({f"l/f1_{c}": per_class[i] for i, c in enumerate("xyz")})
    want["l/f1"] = per_class.mean()
    r = masks["r"]
    want["r/mae"] = mean_absolute_error(logits["r"][r], targets["r"][r])
    want["r/rmse"] = mean_squared_error(logits["r"][r], targets["r"][r], squared=False)
    s = masks["s"]
    decoded = torch.sigmoid(logits["s"][s]) * 4
    want["s/mae"] = mean_absolute_error(decoded, targets["s"][s])
    want["s/rmse"] = mean_squared_error(decoded, targets["s"][s], squared=False)
    want["s/nmae"] = want["s/mae"] / 4
    assert want["l/f1_z"] == 0  # a 0/0 class is among the checks
    for name, value in want.items():
        assert got[name] == pytest.approx(float(value), abs=1e-6), name
    assert metrics.confusion("m").tolist() == C.multiclass_confusion_matrix(lm, tm, 6).tolist()
