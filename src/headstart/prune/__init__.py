"""Structured channel pruning of a model's backbone (torch-pruning), its head left exactly as it is.

- `importance`: the channel importance criteria a pruning run can rank channels by;
- `engine`: the pruner over a `HeadstartModel` (head and feature size protected), one iterative step, MACs/params;
- `structure`: the pruned widths as plain data, so that pruned checkpoints rebuild from their hyperparameters and
  load with `weights_only=True`.
"""

from __future__ import annotations

from headstart.errors import HeadstartError


class PruningError(HeadstartError):
    """torch-pruning cannot prune this backbone (tracing, a pruning step, or the pruned model's forward fails)."""


from headstart.core.structure import apply_structure, pruned_structure  # noqa: E402
from headstart.prune.importance import IMPORTANCES, make_importance, needs_gradients  # noqa: E402

__all__ = [
    "IMPORTANCES",
    "PruningError",
    "apply_structure",
    "count_macs_params",
    "make_importance",
    "make_pruner",
    "needs_gradients",
    "protected_layers",
    "prune_step",
    "pruned_structure",
]


def __getattr__(name: str):
    # The engine imports torch-pruning and headstart.core.model; load it only when it is asked for, so that
    # headstart.core.model can import the structure helpers without an import cycle.
    if name in ("count_macs_params", "make_pruner", "protected_layers", "prune_step"):
        from headstart.prune import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'headstart.prune' has no attribute {name!r}")
