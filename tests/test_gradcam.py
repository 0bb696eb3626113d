"""Grad-CAM: heat maps of the original image's size in [0, 1] that follow the evidence, and leave the model as found."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from headstart.core.model import HeadstartModel
from headstart.core.transforms import InputTransform, eval_transform
from headstart.errors import ConfigError
from headstart.evaluate.gradcam import grad_cam, overlay, readable_size, side_by_side, target_layer
from tests.conftest import shared_data

OPTIMIZER = {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-3}
THREE = {"tasks": {"label": {"kind": "multiclass", "classes": ["a", "b", "c"]}}}
# A bright square off the center of a dark, non-square (50 wide x 37 high) image.
SQUARE = (slice(8, 20), slice(30, 42))  # rows, columns


def make_model(
    backbone: str = "small_cnn", flow: dict = THREE, seed: int = 0, **backbone_args: object
) -> HeadstartModel:
    torch.manual_seed(seed)
    return HeadstartModel(
        flow=flow,
        optimizer=OPTIMIZER,
        backbone={"name": backbone, "weights": None, "freeze": True, **backbone_args},
        head={"hidden": [], "dropout": 0.0},
    )


def square_image(mode: str = "RGB") -> Image.Image:
    a = np.full((37, 50, 3), 20, dtype=np.uint8)
    a[SQUARE] = 235
    return Image.fromarray(a).convert(mode)


def brightness_model() -> HeadstartModel:
    """small_cnn whose features measure local brightness: positive, equal conv weights; BatchNorm at its initial
    running statistics (about the identity in eval mode); class 0 scores brightness, class 1 its negation."""
    model = make_model()
    with torch.no_grad():
        for m in model.backbone.body.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.fill_(1.0 / m.weight[0].numel())
        out = model.head.outputs["label"]
        out.weight.zero_()
        out.weight[0] = 1.0
        out.weight[1] = -1.0
        out.bias.zero_()
    return model


def snapshot(model: HeadstartModel) -> dict:
    return {
        "training": {n: m.training for n, m in model.named_modules()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "state": {k: v.clone() for k, v in model.state_dict().items()},
    }


def assert_untouched(model: HeadstartModel, before: dict) -> None:
    for name, m in model.named_modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, f"forward hook left on {name!r}"
        assert not m._backward_hooks and not m._backward_pre_hooks, f"backward hook left on {name!r}"
    assert all(p.grad is None for p in model.parameters()), ".grad was written"
    after = snapshot(model)
    assert after["training"] == before["training"]
    assert after["requires_grad"] == before["requires_grad"]
    assert before["state"].keys() == after["state"].keys()
    for k, v in before["state"].items():  # parameters and BatchNorm running statistics
        assert torch.equal(v, after["state"][k]), k


def assert_heat_map(cam: np.ndarray, image: Image.Image) -> None:
    assert cam.shape == (image.height, image.width)
    assert cam.dtype == np.float32
    assert np.isfinite(cam).all()
    assert cam.min() >= 0.0 and cam.max() <= 1.0
    assert cam.max() == pytest.approx(1.0)
    assert cam.std() > 0


def test_target_layer_small_cnn_and_no_hooks_left() -> None:
    model = make_model()
    before = snapshot(model)
    assert target_layer(model.backbone) is model.backbone.body.block3  # the last map before global pooling
    assert_untouched(model, before)


def test_frozen_small_cnn_in_eval_mode() -> None:
    model = make_model().eval()
    assert model.backbone.frozen
    image = square_image()
    before = snapshot(model)
    cam = grad_cam(model, image)
    assert_heat_map(cam, image)
    assert_untouched(model, before)
    # Deterministic: the same map again.
    np.testing.assert_array_equal(cam, grad_cam(model, image))


def test_partly_trainable_backbone_in_train_mode_is_left_as_found() -> None:
    # One trainable stage: its parameters require grad, the frozen BatchNorms stay in eval mode under train().
    model = make_model(trainable_stages=1).train()
    assert not model.backbone.frozen
    modes = {m.training for m in model.backbone.body.modules()}
    assert modes == {True, False}  # a mix that a plain model.train(mode) afterwards would not restore
    image = square_image()
    before = snapshot(model)
    assert_heat_map(grad_cam(model, image), image)
    assert_untouched(model, before)


def test_state_restored_after_an_error() -> None:
    model = make_model().train()
    before = snapshot(model)
    with pytest.raises(ConfigError, match="not a class index"):
        grad_cam(model, square_image(), target=3)  # raised after the forward pass, inside the hooks
    assert_untouched(model, before)


def test_heat_map_follows_the_evidence_in_original_coordinates() -> None:
    model = brightness_model()
    image = square_image()
    cam = grad_cam(model, image, target=0)
    assert_heat_map(cam, image)
    peak = np.unravel_index(np.argmax(cam), cam.shape)
    assert SQUARE[0].start <= peak[0] < SQUARE[0].stop and SQUARE[1].start <= peak[1] < SQUARE[1].stop
    assert cam[SQUARE].mean() > 4 * cam[:, :20].mean()  # the dark left side is cold
    # resize = crop = 32: the crop is the centered 37 x 37 box; the 6 columns cut off on either side are 0.
    assert (cam[:, :6] == 0).all() and (cam[:, -6:] == 0).all()
    # Predicted class by default (class 0 scores brightness here).
    np.testing.assert_array_equal(grad_cam(model, image), cam)
    # Class 1 is the negation: no location has positive evidence for it, so its map is all zeros.
    assert (grad_cam(model, image, target=1) == 0).all()


def test_crop_smaller_than_the_resized_image() -> None:
    # resize 40, crop 32 on a 50 x 37 image: the crop is a centered square of side 32 * 37 / 40 = 29.6 pixels,
    # rows [3.7, 33.3) and columns [10.2, 39.8); the square (rows 8-19, columns 30-41) is partly inside.
    model = brightness_model()
    model.backbone.transform = InputTransform(resize=40, crop=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    image = square_image()
    cam = grad_cam(model, image)
    assert_heat_map(cam, image)
    assert (cam[:3] == 0).all() and (cam[34:] == 0).all()
    assert (cam[:, :10] == 0).all() and (cam[:, 40:] == 0).all()
    assert cam[4:33, 11:39].min() >= 0 and cam[8:20, 30:39].mean() > 4 * cam[4:33, 11:25].mean()


def test_target_changes_the_map() -> None:
    model = make_model(seed=1)
    with torch.no_grad():  # class 1 scores exactly the opposite of class 0
        out = model.head.outputs["label"]
        out.weight[1] = -out.weight[0]
        out.bias[1] = -out.bias[0]
    image = square_image()
    cam0 = grad_cam(model, image, target=0)
    cam1 = grad_cam(model, image, target=1)
    assert_heat_map(cam0, image)
    assert_heat_map(cam1, image)
    assert np.abs(cam0 - cam1).max() > 0.5
    # Opposite scores light up complementary places.
    assert np.corrcoef(cam0.ravel(), cam1.ravel())[0, 1] < 0


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v3_small"])
def test_torchvision_backbone(backbone: str) -> None:
    # Random weights: on some seeds no location has positive evidence for the predicted class (an all-zero map,
    # which Grad-CAM allows); seed 1 gives a map on both.
    model = make_model(backbone, seed=1).eval()
    layer = target_layer(model.backbone)
    expected = model.backbone.body.layer4 if backbone == "resnet18" else model.backbone.body.features
    assert layer is expected
    image = square_image()
    before = snapshot(model)
    cam = grad_cam(model, image)
    assert_heat_map(cam, image)
    assert_untouched(model, before)
    # resize 256, crop 224 (both): the crop covers 37 * 224 / 256 = 32.4 rows of 37; the rest is 0.
    assert (cam[:2] == 0).all() and (cam[-2:] == 0).all()
    np.testing.assert_array_equal(grad_cam(model, image, layer=layer), cam)


def test_other_task_kinds_and_grayscale_input() -> None:
    flow = {
        "tasks": {
            "size": {"kind": "regression"},
            "fill": {"kind": "bounded_regression", "scale": 10.0},
            "tags": {"kind": "multilabel", "classes": ["x", "y"]},
            "bright": {"kind": "binary"},
        }
    }
    model = make_model(flow=flow, seed=3)
    image = square_image("L")
    default = grad_cam(model, image)  # the first binary or multiclass task: "bright"
    positive = grad_cam(model, image, task="bright", target=1)
    negative = grad_cam(model, image, task="bright", target=0)
    with torch.no_grad():
        logit = float(
            model.eval()(eval_transform(model.backbone.transform)(image.convert("RGB"))[None])["bright"]
        )
    np.testing.assert_array_equal(default, positive if logit >= 0 else negative)  # explains the prediction
    assert not np.array_equal(positive, negative)
    for task, target in [("size", None), ("fill", None), ("tags", 1), ("tags", None)]:
        cam = grad_cam(model, image, task=task, target=target)
        assert cam.shape == (37, 50) and cam.min() >= 0 and cam.max() <= 1
    with pytest.raises(ConfigError, match="takes no target"):
        grad_cam(model, image, task="size", target=0)
    with pytest.raises(ConfigError, match="must be 0 or 1"):
        grad_cam(model, image, task="bright", target=2)
    with pytest.raises(ConfigError, match="unknown task 'nope'"):
        grad_cam(model, image, task="nope")


def test_inside_no_grad_and_inference_mode() -> None:
    model = make_model().eval()
    image = square_image()
    expected = grad_cam(model, image)
    with torch.no_grad():
        np.testing.assert_array_equal(grad_cam(model, image), expected)
    with torch.inference_mode():
        np.testing.assert_array_equal(grad_cam(model, image), expected)


def test_model_without_backbone_raises() -> None:
    model = HeadstartModel(flow=THREE, optimizer=OPTIMIZER, backbone=None, feature_dim=16)
    with pytest.raises(ConfigError, match=r"needs an image model.*image_model\.ckpt"):
        grad_cam(model, square_image())


def test_backbone_without_spatial_map_raises() -> None:
    model = make_model()
    # Pool first: the only 4-D output is 1 x 1.
    pooled = [torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(1), torch.nn.Linear(3, 128)]
    model.backbone.body = torch.nn.Sequential(*pooled)
    with pytest.raises(ConfigError, match="no module whose output is a spatial feature map"):
        target_layer(model.backbone)


def test_overlay() -> None:
    image = square_image()
    cam = grad_cam(brightness_model(), image)
    out = overlay(image, cam)
    assert isinstance(out, Image.Image) and out.mode == "RGB" and out.size == image.size
    a, o = np.asarray(image, dtype=float), np.asarray(out, dtype=float)
    hot, cold = np.unravel_index(np.argmax(cam), cam.shape), (0, 0)
    assert o[hot][0] > o[hot][2]  # jet: hot is red,
    assert o[cold][2] > o[cold][0]  # cold is blue
    np.testing.assert_array_equal(np.asarray(overlay(image, cam, alpha=0.0)), a.astype(np.uint8))
    assert overlay(image.convert("L"), cam, cmap="inferno").mode == "RGB"
    with pytest.raises(ValueError, match="shape"):
        overlay(image, cam.T)


def test_side_by_side_shows_image_and_overlay_at_a_readable_size() -> None:
    image = square_image()  # 50 x 37: tiny, so whole pixels (x7), not a blur
    cam = grad_cam(brightness_model(), image)
    picture = side_by_side(image, cam, "b, predicted a")
    assert picture.mode == "RGB" and picture.width >= 2 * 350 and picture.height >= 259
    band = picture.height - 259  # the caption is written above the two panels
    assert band > 10 and np.asarray(picture)[:band].min() < 100  # some dark text on white
    left = np.asarray(picture)[band:, :350]
    np.testing.assert_array_equal(left, np.asarray(image.resize((350, 259), Image.Resampling.NEAREST)))
    right = np.asarray(picture)[band:, -350:].astype(float)
    assert right[14 * 7, 36 * 7][0] > right[14 * 7, 36 * 7][2]  # red over the square
    assert readable_size(8, 8) == (224, 224, Image.Resampling.NEAREST)
    width, height, resample = readable_size(1024, 768)  # a photo: smoothly to a short side of 224
    assert (width, height) == (299, 224) and resample != Image.Resampling.NEAREST
    assert readable_size(150, 200)[:2] == (224, 299)
    with pytest.raises(ValueError, match="shape"):
        side_by_side(image, cam.T)


def test_real_photo() -> None:
    root = shared_data("dog_cat_small")
    path = next(iter(sorted((root / "test" / "cat").glob("*.jpg"))), None)
    if path is None:
        pytest.skip(f"no test photo under {root}")
    with Image.open(path) as im:
        image = im.convert("RGB")
    model = make_model("resnet18").eval()
    cam = grad_cam(model, image)
    assert_heat_map(cam, image)
    assert overlay(image, cam).size == image.size
