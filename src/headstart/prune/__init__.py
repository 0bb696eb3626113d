"""The prune stage: structured channel pruning of a model's backbone (torch-pruning), its head left as it is.

- `importance`: the channel importance criteria a pruning run can rank channels by;
- `engine`: the pruner over a `HeadstartModel` (head and feature size protected), one iterative step, MACs/params;
- `recipe`: `prune(cfg)`, the iterative prune-and-fine-tune run behind prune.py.

The pruned widths themselves are plain data in `headstart.core.structure`, so that pruned checkpoints rebuild from
their hyperparameters and load with `weights_only=True`.
"""

from __future__ import annotations

from headstart.core.structure import apply_structure, pruned_structure
from headstart.errors import PruningError
from headstart.prune.engine import count_macs_params, make_pruner, protected_layers, prune_step
from headstart.prune.importance import IMPORTANCES, make_importance, needs_gradients

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
