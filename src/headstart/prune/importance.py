"""Channel importance criteria: how a pruning step ranks the channels it may remove.

- `magnitude`: group L2 norm of the weights of every layer coupled to a channel (torch-pruning's default);
- `taylor`: |weight x gradient| summed over the group (first-order Taylor estimate of the loss change); it needs a
  gradient pass over a few labelled batches before each step;
- `lamp`: layer-adaptive magnitude (LAMP scores), comparable across layers, useful with global pruning;
- `bn_scale`: |gamma| of the BatchNorm layers in the group (network slimming); groups without a BatchNorm
  (LayerNorm or Linear-only groups, e.g. ConvNeXt) are then never pruned;
- `random`: a baseline.
"""

from __future__ import annotations

from headstart.errors import ConfigError

IMPORTANCES: tuple[str, ...] = ("magnitude", "taylor", "lamp", "bn_scale", "random")


def _check(name: str) -> str:
    if not isinstance(name, str) or name not in IMPORTANCES:
        raise ConfigError(f"Unknown pruning importance {name!r}; use one of: {', '.join(IMPORTANCES)}.")
    return name


def needs_gradients(name: str) -> bool:
    """True for criteria that read `.grad` (taylor): a gradient pass must precede each pruning step."""
    return _check(name) == "taylor"


def make_importance(name: str):
    """A fresh torch-pruning importance object for criterion `name` (one of IMPORTANCES)."""
    import torch_pruning as tp

    name = _check(name)
    if name == "magnitude":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if name == "taylor":
        return tp.importance.GroupTaylorImportance()
    if name == "lamp":
        return tp.importance.LAMPImportance(p=2)
    if name == "bn_scale":
        return tp.importance.BNScaleImportance()
    return tp.importance.RandomImportance()
