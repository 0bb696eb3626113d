import pytest
import torch

from headstart.core.model import HeadstartModel
from headstart.errors import ConfigError

FLOW = {"tasks": {"label": {"kind": "multiclass", "classes": ["a", "b", "c"]}}}
ADAMW = {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 0.01}


def _adamw(params):
    return torch.optim.AdamW(params, lr=0.01)


def test_frozen_backbone_stays_in_eval_mode_and_only_the_head_trains():
    model = HeadstartModel(flow=FLOW, optimizer=ADAMW, backbone={"name": "small_cnn", "freeze": True})
    model.train()
    assert model.head.training and not model.backbone.body.training
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"head"}
    model.use_optimizer(_adamw)
    optimizer = model.configure_optimizers()
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == sum(
        p.numel() for p in model.head.parameters()
    )


def test_model_without_backbone_trains_on_features():
    model = HeadstartModel(flow=FLOW, optimizer=ADAMW, feature_dim=8, head={"hidden": [16], "dropout": 0.0})
    batch = {"inputs": torch.randn(6, 8), "targets": {"label": torch.tensor([0.0, 1, 2, 0, 1, float("nan")])}}
    model.use_optimizer(_adamw)
    optimizer = model.configure_optimizers()
    first = None
    for _ in range(30):
        loss, _ = model.flow.loss(model(batch["inputs"]), batch["targets"])
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5 * first


def test_model_needs_a_backbone_or_a_feature_size():
    with pytest.raises(ConfigError, match="feature_dim"):
        HeadstartModel(flow=FLOW, optimizer=ADAMW)


def test_bad_flow_is_a_config_error():
    with pytest.raises(ConfigError, match="flow: task 'label'"):
        HeadstartModel(flow={"tasks": {"label": {"kind": "multiclass"}}}, optimizer=ADAMW, feature_dim=4)


def test_plain_attributes_set_directly_and_modules_still_register_and_unregister():
    """PlainAttributes takes nn.Module's checks off plain values only: what Lightning sets around its hooks; modules,
    parameters and their removal (assigning None) still go through nn.Module."""
    model = HeadstartModel(flow=FLOW, feature_dim=8)
    model._current_fx_name = "training_step"
    assert model.__dict__["_current_fx_name"] == "training_step"
    model.automatic_optimization = False  # a property with a setter: still called
    assert model.automatic_optimization is False
    model.extra = torch.nn.Linear(2, 2)
    assert "extra" in model._modules and "extra" not in model.__dict__
    model.extra = None  # a registered submodule set to None stays a module slot, as nn.Module does it
    assert model._modules["extra"] is None
    before = sum(p.numel() for p in model.parameters())
    model.head = None
    assert sum(p.numel() for p in model.parameters()) < before and "head" not in model.__dict__
