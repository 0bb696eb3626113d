"""Input transforms: the backbone's own preprocessing (resize, crop, normalize) plus configured augmentation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torchvision.transforms import v2

_INTERPOLATIONS = {
    "nearest": v2.InterpolationMode.NEAREST,
    "bilinear": v2.InterpolationMode.BILINEAR,
    "bicubic": v2.InterpolationMode.BICUBIC,
}


@dataclass(frozen=True)
class InputTransform:
    """What a backbone expects: resize the short side to `resize`, center-crop `crop`, normalize with mean/std."""

    resize: int
    crop: int
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def __post_init__(self) -> None:
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(
                f"interpolation must be one of {sorted(_INTERPOLATIONS)}, got {self.interpolation!r}"
            )
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))

    def to_dict(self) -> dict:
        """Plain dict (lists, not tuples) for checkpoints, manifests and JSON."""
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> InputTransform:
        return cls(
            resize=int(d["resize"]),
            crop=int(d["crop"]),
            interpolation=str(d.get("interpolation", "bilinear")),
            mean=tuple(d["mean"]),
            std=tuple(d["std"]),
        )


def _geometry(t: InputTransform) -> list[v2.Transform]:
    return [
        v2.ToImage(),
        v2.Resize(t.resize, interpolation=_INTERPOLATIONS[t.interpolation], antialias=True),
        v2.CenterCrop(t.crop),
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
