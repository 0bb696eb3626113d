"""Structured channel pruning: the pruner, its steps, the protected head, pruned checkpoints and their export."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

from headstart.core.model import HeadstartModel
from headstart.errors import ConfigError
from headstart.prune import (
    IMPORTANCES,
    PruningError,
    apply_structure,
    count_macs_params,
    make_importance,
    make_pruner,
    needs_gradients,
    protected_layers,
    prune_step,
    pruned_structure,
)
from headstart.ship.export import check_parity, export_onnx

FLOW = {"tasks": {"spam": {"kind": "binary"}, "label": {"kind": "multiclass", "classes": ["a", "b", "c"]}}}
ADAMW = {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 0.01}


def tiny_model(
    hidden: list[int] | None = None, backbone: str = "small_cnn", **backbone_args
) -> HeadstartModel:
    torch.manual_seed(0)
    head = {"hidden": [16] if hidden is None else hidden}
    return HeadstartModel(
        flow=FLOW, optimizer=ADAMW, backbone={"name": backbone, "weights": None, **backbone_args}, head=head
    )


def images(n: int = 4, side: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(seed))


def batch(n: int = 4, side: int = 32) -> dict:
    return {
        "inputs": images(n, side),
        "targets": {"spam": torch.tensor([0.0, 1, 0, 1])[:n], "label": torch.tensor([0.0, 1, 2, 0])[:n]},
    }


def head_state(model: HeadstartModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.head.state_dict().items()}


def assert_same_head(model: HeadstartModel, before: dict[str, torch.Tensor]) -> None:
    after = model.head.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert after[key].shape == value.shape, key
        assert torch.equal(after[key], value), key


def reload(model: HeadstartModel, tmp_path) -> HeadstartModel:
    """Save as a checkpoint with the pruned structure in its hyperparameters; rebuild with weights_only=True."""
    model.hparams["structure"] = pruned_structure(model)
    path = tmp_path / "pruned.ckpt"
    torch.save({"hyper_parameters": dict(model.hparams), "state_dict": model.state_dict()}, path)
    return HeadstartModel.from_checkpoint(path).eval()


def assert_same_logits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# --------------------------------------------------------------------------------------------------------------------
# The tiny model, end to end
# --------------------------------------------------------------------------------------------------------------------


def test_two_steps_shrink_the_backbone_keep_the_head_and_reload_from_hyperparameters(tmp_path):
    model = tiny_model()
    model.train()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    head = head_state(model)
    macs, params = count_macs_params(model)

    pruner = make_pruner(model, "magnitude", ratio=0.5, steps=2)
    for _ in range(2):
        prune_step(pruner, model)
        new_macs, new_params = count_macs_params(model)
        assert new_macs < macs and new_params < params
        macs, params = new_macs, new_params
        assert_same_head(model, head)
        assert model.backbone.feature_dim == 128 and model.head.trunk[0].in_features == 128
        # frozen stays frozen (torch-pruning makes new parameters, which would require grad), modes unchanged
        assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
        assert {n: m.training for n, m in model.named_modules()} == modes
        assert all(p.grad is None for p in model.parameters())
    body = model.backbone.body
    assert (body.block1[0].out_channels, body.block2[0].out_channels, body.block3[0].out_channels) == (
        16,
        32,
        128,
    )
    with pytest.raises(PruningError, match="all 2 pruning steps"):
        prune_step(pruner, model)

    structure = pruned_structure(model)
    assert structure["backbone"] == "small_cnn"
    assert structure["modules"]["block1.0"] == {"in_channels": 3, "out_channels": 16, "groups": 1}
    assert structure["modules"]["block2.1"] == {"num_features": 32}
    assert structure["tensors"]["block2.0.weight"] == [32, 16, 3, 3]
    # the feature producer loses input channels only: the feature size is kept
    assert structure["modules"]["block3.0"] == {"in_channels": 32, "out_channels": 128, "groups": 1}
    assert "block3.1" not in structure["modules"]
    model.eval()
    x = images()
    with torch.no_grad():
        expected = model(x)
        loaded = reload(model, tmp_path)
        assert_same_logits(expected, loaded(x))
    assert loaded.hparams.structure == structure
    assert not any(p.requires_grad for p in loaded.backbone.parameters())  # rebuilt frozen, like the original


def test_lightning_checkpoints_of_a_pruned_model_load_with_weights_only(tmp_path):
    import lightning as L

    model = tiny_model()
    prune_step(make_pruner(model, "lamp", ratio=0.5, steps=1), model)
    model.hparams["structure"] = pruned_structure(model)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(tmp_path / "pruned.ckpt", weights_only=True)
    loaded = HeadstartModel.load_from_checkpoint(tmp_path / "pruned.ckpt", weights_only=True).eval()
    x = images()
    with torch.no_grad():
        assert_same_logits(model.eval()(x), loaded(x))


def test_protected_layers_are_the_head_and_the_feature_producers():
    model = tiny_model()
    protected = protected_layers(model)
    head = [model.head.trunk[0], *model.head.outputs.values()]
    producers = [model.backbone.body.block3[0], model.backbone.body.block3[1]]
    assert all(any(m is p for p in protected) for m in head + producers)
    assert not any(m is model.backbone.body.block2[0] for m in protected)


def test_without_a_hidden_layer_the_task_outputs_read_the_features_and_stay_intact():
    model = tiny_model(hidden=[])
    head = head_state(model)
    pruner = make_pruner(model, "magnitude", ratio=0.5, steps=1, global_pruning=True)
    prune_step(pruner, model)
    assert_same_head(model, head)
    assert model.backbone.body.block1[0].out_channels < 32


@pytest.mark.parametrize("importance", IMPORTANCES)
def test_each_importance_prunes_a_frozen_backbone(importance):
    model = tiny_model()
    assert model.backbone.frozen
    head = head_state(model)
    macs, _ = count_macs_params(model)
    pruner = make_pruner(model, importance, ratio=0.5, steps=1, round_to=None)
    gradient_batches = [
        batch(),
        (images(2), {"spam": torch.tensor([1.0, 0]), "label": torch.tensor([2.0, 1])}),
    ]
    prune_step(pruner, model, gradient_batches if needs_gradients(importance) else None)
    assert count_macs_params(model)[0] < macs
    assert_same_head(model, head)
    assert model.backbone.frozen and all(p.grad is None for p in model.parameters())


def test_taylor_needs_gradient_batches():
    model = tiny_model()
    pruner = make_pruner(model, "taylor", ratio=0.5, steps=1)
    with pytest.raises(ConfigError, match="needs gradient batches"):
        prune_step(pruner, model)


def test_pruned_model_exports_to_onnx_with_parity(tmp_path):
    model = tiny_model()
    pruner = make_pruner(model, "magnitude", ratio=0.5, steps=1)
    prune_step(pruner, model)
    path = export_onnx(model.eval(), tmp_path / "pruned.onnx")
    diffs = check_parity(path, model, images(3))
    assert set(diffs) == {"spam", "label"}


# --------------------------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0, 0.0, 1, 1.0, 1.5, -0.2])
def test_ratio_outside_zero_one_is_a_config_error(ratio):
    with pytest.raises(ConfigError, match="strictly between 0 and 1"):
        make_pruner(tiny_model(), "magnitude", ratio=ratio, steps=1)


@pytest.mark.parametrize("steps", [0, -1, 1.5])
def test_steps_below_one_is_a_config_error(steps):
    with pytest.raises(ConfigError, match="steps must be an integer >= 1"):
        make_pruner(tiny_model(), "magnitude", ratio=0.5, steps=steps)


def test_unknown_importance_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="magnitude, taylor, lamp, bn_scale, random"):
        make_importance("l1")
    with pytest.raises(ConfigError, match="Unknown pruning importance 'l1'"):
        make_pruner(tiny_model(), "l1", ratio=0.5, steps=1)


def test_a_model_without_backbone_cannot_be_pruned():
    model = HeadstartModel(flow=FLOW, optimizer=ADAMW, feature_dim=8)
    with pytest.raises(ConfigError, match="needs an image model with a backbone"):
        make_pruner(model, "magnitude", ratio=0.5, steps=1)


def test_a_layer_that_breaks_after_pruning_is_named_in_one_clear_error():
    model = tiny_model()
    conv = model.backbone.body.block2[0]
    forward = conv.forward

    def fixed_width_forward(x):  # like a layer with a hard-coded channel count
        if x.shape[1] != 32:
            raise RuntimeError(f"expected 32 input channels, got {x.shape[1]}")
        return forward(x)

    conv.forward = fixed_width_forward
    pruner = make_pruner(model, "magnitude", ratio=0.5, steps=1)
    with pytest.raises(PruningError) as info:
        prune_step(pruner, model)
    message = str(info.value)
    assert "backbone 'small_cnn'" in message and "layer 'block2.0'" in message
    assert "expected 32 input channels" in message


def test_structure_must_fit_the_backbone():
    model = tiny_model()
    pruner = make_pruner(model, "magnitude", ratio=0.5, steps=1)
    prune_step(pruner, model)
    structure = pruned_structure(model)
    assert pruned_structure(tiny_model()) == {"backbone": "small_cnn", "modules": {}, "tensors": {}}
    with pytest.raises(ConfigError, match="recorded on backbone 'small_cnn', not 'resnet18'"):
        HeadstartModel(flow=FLOW, optimizer=ADAMW, backbone={"name": "resnet18"}, structure=structure)
    bad = copy.deepcopy(structure)
    bad["modules"]["block9.0"] = {"out_channels": 8}
    with pytest.raises(ConfigError, match=r"no module 'block9\.0'"):
        apply_structure(tiny_model(), bad)
    with pytest.raises(ConfigError, match="needs a backbone"):
        HeadstartModel(flow=FLOW, optimizer=ADAMW, feature_dim=8, structure=structure)
    # a bare body works too: the structure alone makes the state dict fit
    body = tiny_model().backbone.body
    apply_structure(body, structure)
    body.load_state_dict(model.backbone.body.state_dict())
    assert isinstance(body.block1[0], nn.Conv2d) and body.block1[0].out_channels == 16


# --------------------------------------------------------------------------------------------------------------------
# Real architectures (random weights, small inputs)
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "convnext_tiny", "efficientnet_lite0", "vgg11"],
)
def test_real_backbones_prune_one_step_and_reload(name, tmp_path):
    torch.set_num_threads(min(2, torch.get_num_threads()))
    side = 64
    model = tiny_model(backbone=name)
    head = head_state(model)
    macs, params = count_macs_params(model, input_size=side)
    # residual streams too: the hardest couplings of each architecture
    pruner = make_pruner(model, "magnitude", ratio=0.3, steps=1, input_size=side, residual_streams=True)
    prune_step(pruner, model)
    new_macs, new_params = count_macs_params(model, input_size=side)
    assert new_macs < 0.8 * macs and new_params < params
    assert_same_head(model, head)
    x = images(2, side)
    model.eval()
    with torch.no_grad():
        expected = model(x)
        assert_same_logits(expected, reload(model, tmp_path)(x))


@pytest.mark.slow
def test_attention_backbones_fail_with_one_clear_error():
    """torch-pruning needs per-model attention settings (num_heads) that headstart does not give it: a ViT's
    pruned forward fails, and says so in one message."""
    model = tiny_model(backbone="timm:vit_tiny_patch16_224")
    pruner = make_pruner(model, "magnitude", ratio=0.3, steps=1)
    with pytest.raises(
        PruningError, match=r"cannot prune backbone 'timm:vit_tiny_patch16_224' at layer 'blocks\."
    ):
        prune_step(pruner, model)


def test_bn_scale_on_a_backbone_without_batchnorm_is_a_config_error():
    model = tiny_model(backbone="timm:convnext_atto")
    with pytest.raises(ConfigError, match="has no BatchNorm layer"):
        make_pruner(model, "bn_scale", ratio=0.5, steps=1)


def test_rounding_keeps_the_nearest_multiple_so_small_layers_are_not_halved():
    from headstart.prune.engine import round_kept_to_nearest

    assert round_kept_to_nearest(None, 1, 16, 8) == 0  # keep 15 of 16 -> keep 16, not 8
    assert round_kept_to_nearest(None, 5, 16, 8) == 8  # keep 11 -> keep 8
    assert round_kept_to_nearest(None, 6, 96, 8) == 8  # keep 90 -> keep 88
    assert round_kept_to_nearest(None, 15, 16, 8) == 8  # never below one multiple


@pytest.mark.parametrize("residual_streams", [False, True])
def test_residual_streams_are_kept_unless_asked_for(residual_streams):
    model = tiny_model(backbone="resnet18")
    prune_step(
        make_pruner(model, "magnitude", ratio=0.5, steps=1, input_size=64, residual_streams=residual_streams),
        model,
    )
    body = model.backbone.body
    inner = [body.layer1[0].conv1, body.layer2[1].conv1, body.layer4[0].conv1]
    stream = [body.conv1, body.layer1[0].conv2, body.layer2[0].downsample[0], body.layer3[1].conv2]
    assert [c.out_channels for c in inner] == [32, 64, 256]  # inside blocks: always halved
    expected = [32, 32, 64, 128] if residual_streams else [64, 64, 128, 256]
    assert [c.out_channels for c in stream] == expected
    assert body.layer4[1].conv2.out_channels == 512  # the feature producers never change


def test_feature_distillation_adds_the_feature_error_and_is_never_saved():
    model = tiny_model()
    model.backbone.freeze(len(model.backbone.stages))
    model.eval()  # fixed BatchNorm statistics, as in the teacher
    keys = set(model.state_dict())
    b = batch()
    plain = model._step(b, "train").item()
    teacher = copy.deepcopy(model.backbone).eval()
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.1)
        gap = nn.functional.mse_loss(model.backbone(b["inputs"]), teacher(b["inputs"])).item()
    assert gap > 1e-4
    model.distill_features(teacher, weight=2.0)
    assert set(model.state_dict()) == keys
    assert model._step(b, "train").item() == pytest.approx(plain + 2.0 * gap, rel=1e-5)
    assert model._step(b, "val").item() == pytest.approx(plain, rel=1e-6)  # validation measures the task only
    model.distill_features(None)
    assert model._step(b, "train").item() == pytest.approx(plain, rel=1e-6)


@pytest.mark.parametrize("freeze", [True, False])
def test_batchnorm_statistics_stay_put_when_frozen_during_fine_tuning(freeze):
    import lightning as L

    from headstart.train.callbacks import FreezeBatchNormStats

    model = tiny_model()
    model.use_optimizer(functools.partial(torch.optim.AdamW, lr=0.01))
    model.backbone.freeze(len(model.backbone.stages))
    norms = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    before = [m.running_mean.clone() for m in norms]
    weights = [m.weight.detach().clone() for m in norms]
    trainer = L.Trainer(
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        callbacks=[FreezeBatchNormStats()] if freeze else [],
    )
    trainer.fit(model, train_dataloaders=torch.utils.data.DataLoader([batch()] * 2, batch_size=None))
    moved = [not torch.equal(m.running_mean, b) for m, b in zip(norms, before, strict=True)]
    assert not any(moved) if freeze else all(moved)
    # the scales still learn
    assert all(not torch.equal(m.weight, w) for m, w in zip(norms, weights, strict=True))
