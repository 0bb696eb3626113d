"""Decision thresholds tuned on validation data after training, stored in the checkpoint with the flow."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from headstart.core.model import HeadstartModel
from headstart.errors import DivergedError
from headstart.flow import NonFiniteError


@torch.no_grad()
def tune_on_validation(model: HeadstartModel, loader: DataLoader) -> dict:
    """Run `model` over `loader`, tune the flow's binary and multilabel thresholds, store them in its hparams.

    DivergedError when the model's validation outputs are NaN where a threshold is tuned."""
    model.eval()
    logits: dict[str, list[torch.Tensor]] = {}
    targets: dict[str, list[torch.Tensor]] = {}
    for batch in loader:
        if batch is None:
            continue
        out = model(batch["inputs"].to(model.device))
        for path in model.flow.leaf_paths:
            logits.setdefault(path, []).append(out[path].float().cpu())
            targets.setdefault(path, []).append(batch["targets"][path].cpu())
    if not logits:
        return {}
    try:
        tuned = model.flow.tune_thresholds(
            {p: torch.cat(v) for p, v in logits.items()}, {p: torch.cat(v) for p, v in targets.items()}
        )
    except NonFiniteError as e:
        raise DivergedError(
            f"thresholds cannot be tuned on validation data: {e}. The model gives NaN there; train again with a "
            "lower learning rate (optimizer.lr=...), or check the data for non-finite values"
        ) from None
    model.hparams.flow = model.flow.to_spec()
    return tuned


def store_flow_in_checkpoint(path: str | Path, flow_spec: dict) -> None:
    """Rewrite a checkpoint's flow hyperparameter (thresholds included), atomically."""
    path = Path(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    ckpt["hyper_parameters"]["flow"] = flow_spec
    tmp = path.with_suffix(".tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, path)
