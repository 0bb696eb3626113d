"""Plain data: what checkpoints, manifests, bundles and hyperparameters may hold."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def plain(node: Any) -> Any:
    """A mapping or sequence as plain dicts and lists, a deep copy with string keys. A Hydra config node is a
    mapping too: reading it resolves its interpolations, so a composed config comes out as the values it stands for."""
    if isinstance(node, Mapping):
        return {str(k): plain(v) for k, v in node.items()}
    if isinstance(node, Sequence) and not isinstance(node, str | bytes):
        return [plain(v) for v in node]
    return node
