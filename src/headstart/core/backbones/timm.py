"""The timm family: any timm model as `timm:<name>` (or `timm:<name>.<pretrained tag>`), created with `num_classes=0`.

The features are timm's own pooled features; stages are timm's coarse parameter groups; the transform comes from
timm's resolved data config. The helpers that read those from a timm model are public: efficientnet_lite0 is a timm
model too.

(This module is `headstart.core.backbones.timm`; with absolute imports, `import timm` inside it is the timm package,
never this file.)
"""

from __future__ import annotations

import difflib
from pathlib import Path

import torch
from torch import nn

from headstart.core.backbones.registry import Cut, Family, group_stages, register_family
from headstart.core.backbones.weights import offline_message
from headstart.core.transforms import InputTransform
from headstart.errors import ConfigError, WeightsError

__all__ = ["TIMM_PREFIX", "model_feature_dim", "model_head_prefixes", "model_stages", "model_transform"]

TIMM_PREFIX = "timm:"


def model_transform(model: nn.Module) -> InputTransform:
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


def model_stages(model: nn.Module) -> list[list[str]]:
    """timm's coarse parameter groups (stem, stages..., head), in order; top-level modules if it has no matcher."""
    from timm.models import group_parameters

    try:
        matcher = model.group_matcher(coarse=True)
    except (AttributeError, NotImplementedError):
        return group_stages(model, [[n] for n, _ in model.named_children()])
    groups = group_parameters(model, matcher)
    return [list(groups[k]) for k in sorted(groups) if groups[k]]


def model_head_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Module names of the classifier that `num_classes=0` removed, from the model's pretrained config."""
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier")
    if classifier is None:
        return ()
    return (classifier,) if isinstance(classifier, str) else tuple(classifier)


def model_feature_dim(model: nn.Module) -> int:
    """Width of what `forward` returns with `num_classes=0`.

    That is `head_hidden_size` where timm has one: `num_features` counts the channels *before* the head, and models
    with a conv/MLP head after pooling (MobileNetV3: 576 -> 1024) return the wider vector.
    """
    return int(getattr(model, "head_hidden_size", None) or model.num_features)


def _resolve(name: str, arch: str) -> str:
    """`arch` if timm has it (and its pretrained tag, if one is given), else ConfigError with close names."""
    import timm
    from timm.models import split_model_name_tag

    base, tag = split_model_name_tag(arch)
    if arch and timm.is_model(base):
        if tag and arch not in timm.list_pretrained(arch):
            tags = ", ".join(TIMM_PREFIX + t for t in timm.list_pretrained(f"{base}.*")) or "none"
            raise ConfigError(
                f"timm has no pretrained tag {tag!r} for {base!r} in backbone {name!r}. Tags: {tags}."
            )
        return arch
    close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
    hint = f" Close timm names: {', '.join(TIMM_PREFIX + c for c in close)}." if close else ""
    raise ConfigError(f"Unknown timm model {arch!r} in backbone {name!r}.{hint} See timm.list_models().")


def _transform(name: str, arch: str) -> InputTransform:
    import timm

    with torch.device("meta"):  # parameters are never allocated
        model = timm.create_model(arch, pretrained=False, num_classes=0)
    return model_transform(model)


def _cut(name: str, arch: str, pretrained: bool) -> Cut:
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
            raise WeightsError(offline_message(name, e)) from e
    else:
        model = timm.create_model(arch, pretrained=False, num_classes=0)
    return Cut(
        body=model,
        feature_dim=model_feature_dim(model),
        transform=model_transform(model),
        stages=model_stages(model),
        head_prefixes=model_head_prefixes(model),
    )


def _offline(name: str, arch: str) -> tuple[bool | None, str]:
    """Where timm would get the weights from (a file, the Hugging Face cache, torch's hub cache) and whether they are
    there; nothing is fetched."""
    import timm

    cfg = timm.models.get_pretrained_cfg(arch)
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        return None, "timm has no pretrained weights for it"
    if cfg.file:
        return Path(cfg.file).is_file(), f"file: {cfg.file}"
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo = cfg.hf_hub_id.split("@")[0]
        for filename in ("open_clip_model.safetensors", "model.safetensors", "pytorch_model.bin"):
            found = try_to_load_from_cache(repo, filename)
            if isinstance(found, str):
                return True, f"cached: {found}"
        return False, f"download: huggingface.co/{repo}"
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(cfg.url).name
    if cached.is_file():
        return True, f"cached: {cached}"
    return False, f"download: {cfg.url}"


register_family(
    Family(
        kind="timm",
        source="timm",
        cut=_cut,
        transform=_transform,
        offline=_offline,
        prefix=TIMM_PREFIX,
        resolve_prefixed=_resolve,
        unknown_hint=f"Any timm model is reachable as '{TIMM_PREFIX}<name>' (e.g. {TIMM_PREFIX}convnext_atto).",
    )
)
