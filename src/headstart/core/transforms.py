"""Input transforms: the backbone's own preprocessing (resize, crop, normalize) plus configured augmentation."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from numbers import Integral, Real

import torch
from torchvision.transforms import v2

from headstart.errors import ConfigError

_INTERPOLATIONS = {
    "nearest": v2.InterpolationMode.NEAREST,
    "bilinear": v2.InterpolationMode.BILINEAR,
    "bicubic": v2.InterpolationMode.BICUBIC,
}


# Sides a transform may ask for: past this a resize allocates gigabytes per image (a damaged or edited file, not a
# backbone: the largest ones read a few hundred pixels).
MAX_SIDE = 4096


@dataclass(frozen=True)
class InputTransform:
    """What a backbone expects: resize the short side to `resize`, center-crop `crop`, normalize with mean/std.

    Every value is checked on construction (ConfigError naming the field): the values also come from files (a
    checkpoint, a bundle, a DoF manifest), where an absurd side would otherwise become a huge allocation.
    """

    resize: int
    crop: int
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def __post_init__(self) -> None:
        for name in ("resize", "crop"):
            value = getattr(self, name)
            if not (isinstance(value, Integral) and not isinstance(value, bool) and 1 <= value <= MAX_SIDE):
                raise ConfigError(
                    f"transform.{name} must be a whole number of pixels in [1, {MAX_SIDE}], got {value!r}"
                )
            object.__setattr__(self, name, int(value))
        if self.crop > self.resize:
            raise ConfigError(
                f"transform.crop ({self.crop}) must not exceed transform.resize ({self.resize}): the center crop is "
                "taken from the resized image"
            )
        if self.interpolation not in _INTERPOLATIONS:
            raise ConfigError(
                f"transform.interpolation must be one of {sorted(_INTERPOLATIONS)}, got {self.interpolation!r}"
            )
        object.__setattr__(self, "mean", _three("mean", self.mean, positive=False))
        object.__setattr__(self, "std", _three("std", self.std, positive=True))

    def to_dict(self) -> dict:
        """Plain dict (lists, not tuples) for checkpoints, manifests and JSON."""
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> InputTransform:
        """From plain data (a config, a checkpoint, a bundle's model.json); ConfigError naming a missing or bad
        field."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"transform must be a mapping of resize, crop, mean and std, got {d!r}"[:300])
        missing = [k for k in ("resize", "crop", "mean", "std") if k not in d]
        if missing:
            raise ConfigError(f"transform lacks {', '.join(missing)}")
        return cls(
            resize=d["resize"],
            crop=d["crop"],
            interpolation=d.get("interpolation", "bilinear"),
            mean=d["mean"],
            std=d["std"],
        )


def _three(name: str, values: object, positive: bool) -> tuple[float, float, float]:
    """Three finite numbers (one per RGB channel), positive ones for `positive`."""
    ok = isinstance(values, Sequence) and not isinstance(values, str) and len(values) == 3
    ok = ok and all(isinstance(v, Real) and not isinstance(v, bool) for v in values)
    numbers = tuple(float(v) for v in values) if ok else ()
    if not ok or not all(math.isfinite(v) and (v > 0 or not positive) for v in numbers):
        need = "finite positive numbers" if positive else "finite numbers"
        raise ConfigError(
            f"transform.{name} must be three {need} (one per RGB channel), got {values!r}"[:300]
        )
    return numbers  # type: ignore[return-value]


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
