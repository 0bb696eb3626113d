"""Input transforms: the backbone's own preprocessing (resize, crop, normalize) plus configured augmentation."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import v2

from headstart.serve.transform import MAX_SIDE, InputTransform

__all__ = ["MAX_SIDE", "InputTransform", "denormalize", "eval_transform", "train_transform"]

# The description (sizes, mean, std, interpolation and their validation) is `headstart.serve.transform`'s; this module
# builds torchvision transforms from it.
_INTERPOLATIONS = {
    "nearest": v2.InterpolationMode.NEAREST,
    "bilinear": v2.InterpolationMode.BILINEAR,
    "bicubic": v2.InterpolationMode.BICUBIC,
}


def _geometry(t: InputTransform) -> list[v2.Transform]:
    """Resize and crop the PIL image (torchvision resizes a PIL image with PIL itself), then make it a tensor: the
    same pixels as `headstart.serve.transform.preprocess`, which serves bundles without torch."""
    return [
        v2.Resize(t.resize, interpolation=_INTERPOLATIONS[t.interpolation], antialias=True),
        v2.CenterCrop(t.crop),
        v2.ToImage(),
    ]


def _to_input(t: InputTransform) -> list[v2.Transform]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(t.mean), std=list(t.std))]


def eval_transform(t: InputTransform) -> v2.Compose:
    """PIL image (RGB) -> normalized float tensor [3, crop, crop]."""
    return v2.Compose(_geometry(t) + _to_input(t))


def train_transform(t: InputTransform, augment: Sequence[v2.Transform] = ()) -> v2.Compose:
    """The eval geometry, then the augmentation (on the uint8 crop), then dtype and normalization."""
    return v2.Compose(_geometry(t) + list(augment) + _to_input(t))


def denormalize(x: torch.Tensor, t: InputTransform) -> torch.Tensor:
    """Undo Normalize for display: float[..., 3, H, W] -> values in [0, 1]."""
    mean = torch.tensor(t.mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
    std = torch.tensor(t.std, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x * std + mean).clamp(0, 1)
