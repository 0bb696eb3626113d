"""The backbone registry: the `Backbone` module, the families that register themselves, and name resolution.

A family (torchvision, timm, efficientnet_lite0, small_cnn, ...) is one module of this package that calls
`register_family` once at import time. It brings the names it answers to (exact names, or every name behind a prefix
such as `timm:`), a builder that returns the model cut to a feature extractor (`Cut`), the input transform from
metadata alone, and a probe saying whether its pretrained weights are on this machine. `build_backbone` does what is
the same for every family: parse the weights argument, read and load a weights file, wrap the cut in a `Backbone`
and freeze it.

This module imports no family: the package's `__init__` imports them, so every registry function sees all of them.
"""

from __future__ import annotations

import difflib
import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from headstart.core.backbones.weights import load_into_body, read_weights_file, weights_source
from headstart.core.transforms import InputTransform
from headstart.errors import ConfigError

__all__ = [
    "Backbone",
    "Cut",
    "Family",
    "available_backbones",
    "backbone_transform",
    "build_backbone",
    "families",
    "group_stages",
    "register_family",
    "resolve",
]


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
# What a family registers
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class Cut:
    """A model cut before its classifier, as a family's builder returns it."""

    body: nn.Module
    feature_dim: int
    transform: InputTransform
    stages: list[list[str]]
    # module names of the removed classifier: their keys in weight files are ignored
    head_prefixes: tuple[str, ...]


@dataclass(frozen=True)
class Family:
    """One family of backbones and what the registry needs from it.

    The callables take `(name, arch)`: the name as the user wrote it (for messages) and the architecture it resolves
    to (the name itself for exact names; what follows the prefix, checked by `resolve_prefixed`, otherwise).
    """

    kind: str  # the family's id: "torchvision", "timm", "efficientnet_lite0", "small_cnn"
    source: str  # where its models come from, for the catalog: torchvision, timm, package, headstart
    cut: Callable[[str, str, bool], Cut]  # (name, arch, pretrained) -> the cut model
    transform: Callable[[str, str], InputTransform]  # from metadata only: no weights built or downloaded
    offline: Callable[
        [str, str], tuple[bool | None, str]
    ]  # (pretrained works offline, where the weights are)
    names: tuple[str, ...] = ()  # exact names, listed by available_backbones()
    prefix: str = ""  # or every name starting with it (e.g. "timm:")
    resolve_prefixed: Callable[[str, str], str] | None = (
        None  # (name, rest after prefix) -> arch, or ConfigError
    )
    unknown_hint: str = ""  # said when a name is unknown (how to reach the family's prefixed names)
    # A weights file in a foreign layout (e.g. a package's own parameter names) -> the body's names; called on every
    # file the user passes, returns the state unchanged when it does not recognize it.
    adapt_state: Callable[[dict[str, Tensor], Cut, str], dict[str, Tensor]] | None = None


_FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Add `family` to the registry (once per kind; registering a kind again replaces it, as a module reload does).

    A name or prefix that another family already answers to is refused: a name must reach exactly one family.
    """
    if bool(family.prefix) != (family.resolve_prefixed is not None):
        raise ValueError(
            f"backbone family {family.kind!r}: a prefix needs resolve_prefixed, and only a prefix does"
        )
    for other in _FAMILIES.values():
        if other.kind == family.kind:
            continue
        taken = set(other.names) & set(family.names)
        if taken:
            raise ValueError(
                f"backbone family {family.kind!r}: {sorted(taken)} already registered by {other.kind!r}"
            )
        if (
            family.prefix
            and other.prefix
            and (family.prefix.startswith(other.prefix) or other.prefix.startswith(family.prefix))
        ):
            raise ValueError(
                f"backbone family {family.kind!r}: prefix {family.prefix!r} overlaps {other.prefix!r} of {other.kind!r}"
            )
    _FAMILIES[family.kind] = family
    return family


def families() -> list[Family]:
    """The registered families, in registration order."""
    return list(_FAMILIES.values())


def group_stages(body: nn.Module, groups: Iterable[Iterable[str]]) -> list[list[str]]:
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


# --------------------------------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------------------------------


def available_backbones() -> list[str]:
    """Registered backbone names. Any timm model is also reachable as `timm:<name>`."""
    return sorted(n for f in _FAMILIES.values() for n in f.names)


def resolve(name: str) -> tuple[Family, str]:
    """(family, architecture) for a backbone name, or ConfigError with close names."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"backbone.name must be a non-empty string, got {name!r}")
    for family in _FAMILIES.values():
        if family.prefix and name.startswith(family.prefix):
            assert family.resolve_prefixed is not None  # register_family checks it
            return family, family.resolve_prefixed(name, name[len(family.prefix) :])
    for family in _FAMILIES.values():
        if name in family.names:
            return family, name
    registered = available_backbones()
    close = difflib.get_close_matches(name, registered, n=5, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    hints = "".join(f" {f.unknown_hint}" for f in _FAMILIES.values() if f.unknown_hint)
    raise ConfigError(
        f"Unknown backbone {name!r}.{hint} Registered backbones: {', '.join(registered)}.{hints}"
    )


def build_backbone(
    name: str,
    weights: str | Path | None = None,
    freeze: bool = True,
    trainable_stages: int = 0,
) -> Backbone:
    """Build backbone `name` with `weights` (None/"none", "pretrained" or a local file path).

    `freeze=True` freezes all parameters except those of the last `trainable_stages` stages; `freeze=False` makes
    every parameter trainable (`trainable_stages` is then only validated).
    """
    family, arch = resolve(name)
    source = weights_source(weights)
    cut = family.cut(name, arch, source == "pretrained")
    if isinstance(source, Path):
        state = read_weights_file(source, name)
        if family.adapt_state is not None:
            state = family.adapt_state(state, cut, str(source))
        load_into_body(cut.body, state, name=name, source=str(source), head_prefixes=cut.head_prefixes)

    backbone = Backbone(name, cut.body, cut.feature_dim, cut.transform, cut.stages)
    backbone.freeze(trainable_stages)  # validates the range even when freeze=False
    if not freeze:
        backbone.freeze(len(backbone.stages))  # stages partition the parameters: all trainable
    return backbone


def backbone_transform(name: str) -> InputTransform:
    """The input transform of backbone `name`, from its metadata only (no weights are built or downloaded)."""
    family, arch = resolve(name)
    return family.transform(name, arch)
