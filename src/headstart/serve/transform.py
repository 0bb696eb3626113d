"""The input transform of a model (resize, center crop, normalize) as plain data, and preprocessing with PIL and
numpy.

`InputTransform` is the one description of a model's input: training and evaluation build their torchvision
transform from it (`headstart.core.transforms.eval_transform`), bundles record it in model.json, and `preprocess`
here applies it without torch. Both resize the short side with PIL, center-crop and normalize, so they give the same
pixels; the normalized values agree to float32 rounding (tests/test_serve.py checks it on real photos).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from numbers import Integral, Real

import numpy as np
from PIL import Image

from headstart.errors import ConfigError

INTERPOLATIONS = ("nearest", "bilinear", "bicubic")

# Sides a transform may ask for: past this a resize allocates gigabytes per image (a damaged or edited file, not a
# backbone: the largest ones read a few hundred pixels).
MAX_SIDE = 4096

_PIL_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}


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
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(
                f"transform.interpolation must be one of {sorted(INTERPOLATIONS)}, got {self.interpolation!r}"
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


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode an image file fully into an RGB PIL image (grayscale, palette and RGBA are converted)."""
    with Image.open(path) as im:
        return im.convert("RGB")


def resized_size(width: int, height: int, short: int) -> tuple[int, int]:
    """(width, height) with the short side `short` and the long side scaled and truncated (torchvision's rule)."""
    if width <= height:
        return short, int(short * height / width)
    return int(short * width / height), short


def preprocess(image: Image.Image, t: InputTransform) -> np.ndarray:
    """An RGB PIL image -> normalized float32[3, crop, crop]: the eval transform of training, without torch."""
    image = image.convert("RGB")
    size = resized_size(image.width, image.height, t.resize)
    if size != image.size:
        image = image.resize(size, _PIL_FILTERS[t.interpolation])
    pixels = np.asarray(image, dtype=np.uint8)
    h, w = pixels.shape[:2]
    top, left = round((h - t.crop) / 2.0), round((w - t.crop) / 2.0)  # torchvision rounds so too
    pixels = pixels[top : top + t.crop, left : left + t.crop]
    x = pixels.astype(np.float32) * np.float32(1.0 / 255.0)  # torchvision's ToDtype(scale=True) multiplies so
    x = (x - np.asarray(t.mean, dtype=np.float32)) / np.asarray(t.std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))
