"""The torchvision family: `resnet18`, `efficientnet_b0`, `convnext_tiny`, ... cut before their last `nn.Linear`.

The last linear layer is replaced by `nn.Identity`, so the features are what that classifier saw. The transform
comes from the default weights' own transforms. Pretrained weights are torchvision's ImageNet weights, read from
torch's hub cache or downloaded there once.

(This module is `headstart.core.backbones.torchvision`; with absolute imports, `import torchvision` inside it is the
torchvision package, never this file.)
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from headstart.core.backbones.registry import Cut, Family, group_stages, register_family
from headstart.core.backbones.weights import offline_message
from headstart.core.transforms import InputTransform
from headstart.errors import WeightsError

__all__ = ["TORCHVISION_MODELS"]

TORCHVISION_MODELS: tuple[str, ...] = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnext50_32x4d",
    "wide_resnet50_2",
    "vgg11",
    "vgg16",
    "efficientnet_b0",
    "efficientnet_b1",
    "efficientnet_b2",
    "efficientnet_b3",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "convnext_tiny",
    "convnext_small",
)


def _transform(name: str, arch: str) -> InputTransform:
    from torchvision.models import get_model_weights

    t = get_model_weights(arch).DEFAULT.transforms()
    return InputTransform(
        resize=int(t.resize_size[0]),
        crop=int(t.crop_size[0]),
        interpolation=t.interpolation.value,
        mean=tuple(t.mean),
        std=tuple(t.std),
    )


def _cache_path(url: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name


def _state(name: str) -> dict[str, Tensor]:
    """The ImageNet state_dict from torch's hub cache, downloading it only when it is not cached there."""
    from torchvision.models import get_model_weights

    w = get_model_weights(name).DEFAULT
    cache = _cache_path(w.url)
    try:
        return w.get_state_dict(progress=True, check_hash=True)
    except Exception as e:  # URLError, OSError, hash mismatch, a truncated file: all end the same way
        raise WeightsError(offline_message(name, e, f" (from {w.url}; it would be cached as {cache})")) from e


def _cut(name: str, arch: str, pretrained: bool) -> Cut:
    from torchvision.models import get_model

    model = get_model(arch, weights=None)
    if pretrained:
        model.load_state_dict(_state(name))
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    head_name, head = linears[-1]
    model.set_submodule(head_name, nn.Identity())

    if arch.startswith(("resnet", "resnext", "wide_resnet")):
        groups: list[list[str]] = [["conv1", "bn1"], ["layer1"], ["layer2"], ["layer3"], ["layer4"]]
    elif hasattr(model, "features"):
        children = list(model.features.named_children())
        if arch.startswith("vgg"):  # one stage per resolution: the convolutions up to and including a MaxPool
            groups, current = [], []
            for n, m in children:
                current.append(f"features.{n}")
                if isinstance(m, nn.MaxPool2d):
                    groups.append(current)
                    current = []
            if current:
                groups.append(current)
        else:
            groups = [[f"features.{n}"] for n, _ in children]
    else:  # not reached by the registered names; every parameter in one stage
        groups = []
    return Cut(
        body=model,
        feature_dim=head.in_features,
        transform=_transform(name, arch),
        # what no group takes (e.g. classifier layers before the removed head) becomes the last stage
        stages=group_stages(model, groups),
        head_prefixes=(head_name,),
    )


def _offline(name: str, arch: str) -> tuple[bool | None, str]:
    from torchvision.models import get_model_weights

    w = get_model_weights(arch).DEFAULT
    cached = _cache_path(w.url)
    if cached.is_file():
        return True, f"cached: {cached}"
    size = w.meta.get("_file_size")
    return False, f"download{f' ({size:.0f} MB)' if size else ''}: {w.url}"


register_family(
    Family(
        kind="torchvision",
        source="torchvision",
        cut=_cut,
        transform=_transform,
        offline=_offline,
        names=TORCHVISION_MODELS,
    )
)
