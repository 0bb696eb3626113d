"""Re-attach a head trained on DoF features to its backbone, and check the image model answers the same."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch

from headstart.core.backbones import Backbone
from headstart.core.model import CONFIG_KEY, HeadstartModel
from headstart.core.transforms import InputTransform, eval_transform
from headstart.data import load_rgb
from headstart.dof import DofSet
from headstart.errors import WeightsError


def attach_backbone(
    head_model: HeadstartModel, backbone: Backbone, backbone_config: dict, weights_sha256: str
) -> HeadstartModel:
    """The image model: `backbone` under the head of `head_model`. Its weights hash must be the DoF set's.

    `backbone_config` (plain: name, weights, ...) is what the checkpoint records about where the backbone came from.
    """
    found = backbone.weights_sha256()
    if found != weights_sha256:
        raise WeightsError(
            f"backbone '{backbone.name}' (weights={backbone_config.get('weights')}) is not the one the DoF set was "
            f"extracted with (weights sha256 {found[:12]} instead of {weights_sha256[:12]}); re-attach the head to "
            "the backbone and weights named in the set's manifest.json"
        )
    config = {**backbone_config, "freeze": True, "trainable_stages": 0}
    hparams = {**dict(head_model.hparams), "feature_dim": None, "transform": None}
    full = HeadstartModel(**{**hparams, "backbone": {**config, "weights": None}})
    full.backbone.load_state_dict(backbone.state_dict())
    full.head.load_state_dict(head_model.head.state_dict())
    full.hparams.backbone = config
    full.run_config = head_model.run_config
    return full.eval()


def check_reattached(
    full: HeadstartModel, head_model: HeadstartModel, dof: DofSet, samples: int = 8
) -> float:
    """Outputs of the image model on images against the head on the stored features: the largest logit difference.

    Raises AssertionError when they differ beyond the stored dtype's tolerance or any decision changes.
    """
    split = dof.split("val" if "val" in dof.splits else dof.splits[0])
    rows = np.flatnonzero(split.take(np.arange(len(split)))["view"] == 0)[:samples]
    stored = split.take(rows)
    paths = [dof.meta["samples"]["path"][i] for i in stored["index"]]
    transform = eval_transform(InputTransform.from_dict(dof.meta["transform"]))
    images = torch.stack([transform(load_rgb(p)) for p in paths])
    head_model.eval()
    with torch.no_grad():
        on_images = full(images.to(full.device))
        on_features = head_model(torch.from_numpy(stored["features"]).float().to(head_model.device))
    tolerance = 2e-2 if dof.feature_dtype == np.float16 else 1e-3
    worst = 0.0
    for task, logits in on_images.items():
        a, b = logits.float().cpu(), on_features[task].float().cpu()
        diff = float((a - b).abs().max())
        scale = max(1.0, float(b.abs().max()))
        # NaN fails every comparison: written so that a NaN logit (a diverged head) is a failure, never a pass
        if not diff <= tolerance * scale or not torch.equal(a.argmax(-1), b.argmax(-1)):
            raise AssertionError(
                f"re-attached model disagrees with the head on stored features for task '{task}': "
                f"max |logit difference| {diff:.4g} (tolerance {tolerance * scale:.3g}); the set may be stale"
            )
        worst = max(worst, diff)
    return worst


def save_model(model: HeadstartModel, path: Path) -> Path:
    """A checkpoint with plain hyperparameters and weights only: loads with `HeadstartModel.from_checkpoint`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "hyper_parameters": dict(model.hparams),
            "state_dict": model.state_dict(),
            "pytorch-lightning_version": L.__version__,
            **({CONFIG_KEY: model.run_config} if model.run_config is not None else {}),
        },
        tmp,
    )
    tmp.replace(path)
    return path
