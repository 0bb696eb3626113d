"""The small_cnn family: headstart's own small CNN for tiny images (32x32), trained from scratch.

Three conv-BatchNorm-ReLU blocks (32, 64, 128 channels) with max pooling between them and global average pooling at
the end: 128 features, three stages. It has no pretrained weights; a weights file of the same architecture loads.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from headstart.core.backbones.registry import Cut, Family, group_stages, register_family
from headstart.core.transforms import InputTransform
from headstart.errors import WeightsError

__all__ = ["SMALL_CNN_TRANSFORM"]

NAME = "small_cnn"
SMALL_CNN_TRANSFORM = InputTransform(
    resize=32, crop=32, interpolation="bilinear", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)
)
_WIDTHS = (32, 64, 128)


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)
    )


def _cut(name: str, arch: str, pretrained: bool) -> Cut:
    if pretrained:
        raise WeightsError(
            "Backbone 'small_cnn' has no pretrained weights (it is trained from scratch). "
            "Fix: backbone.weights=none, or backbone.weights=/path/to/file.pth|.safetensors|.ckpt."
        )
    c1, c2, c3 = _WIDTHS
    body = nn.Sequential(
        OrderedDict(
            block1=_conv_block(3, c1),
            pool1=nn.MaxPool2d(2),
            block2=_conv_block(c1, c2),
            pool2=nn.MaxPool2d(2),
            block3=_conv_block(c2, c3),
            pool=nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten(1),
        )
    )
    return Cut(
        body=body,
        feature_dim=c3,
        transform=SMALL_CNN_TRANSFORM,
        stages=group_stages(body, [["block1"], ["block2"], ["block3"]]),
        head_prefixes=(),
    )


def _transform(name: str, arch: str) -> InputTransform:
    return SMALL_CNN_TRANSFORM


def _offline(name: str, arch: str) -> tuple[bool | None, str]:
    return None, "none: trained from scratch"


register_family(
    Family(
        kind=NAME,
        source="headstart",
        cut=_cut,
        transform=_transform,
        offline=_offline,
        names=(NAME,),
    )
)
