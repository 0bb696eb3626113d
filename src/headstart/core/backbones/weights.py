"""Backbone weights: the `backbone.weights` argument, weight files, loading them into a body, offline messages.

A weights file is `.pth`/`.pt`, `.safetensors` or a headstart `.ckpt`. Files are read with `weights_only=True`:
nothing but tensors and plain containers is ever unpickled. Loading is strict (every tensor of the body present with
its shape), except for the keys of the classifier the family removed, so a full ImageNet checkpoint loads into the
cut model.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from headstart.errors import WeightsError

__all__ = [
    "CKPT_PREFIX",
    "WEIGHT_SUFFIXES",
    "extract_state_dict",
    "load_into_body",
    "offline_message",
    "read_weights_file",
    "weights_source",
]

CKPT_PREFIX = "backbone.body."  # where a headstart checkpoint keeps its backbone
WEIGHT_SUFFIXES = (".pth", ".pt", ".safetensors", ".ckpt")


def weights_source(weights: str | Path | None) -> str | Path | None:
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


def offline_message(name: str, err: BaseException, where: str = "") -> str:
    """The one message for pretrained weights that could not be fetched, with the offline fixes."""
    return (
        f"Could not get the pretrained weights of backbone {name!r}: the download failed (no network?)"
        f"{where}. Error: {type(err).__name__}: {err}. "
        "Fixes: backbone.weights=none (random init), or backbone.weights=/path/to/file.pth|.safetensors|.ckpt "
        "(a local file), or for an ImageNet backbone that works offline: backbone=efficientnet_lite0."
    )


def read_weights_file(path: Path, name: str) -> dict[str, Tensor]:
    """A flat {name: tensor} dict from a .pth/.pt, .safetensors or .ckpt file (backbone.body.* keys stripped)."""
    if not path.is_file():
        raise WeightsError(
            f"Weights file {str(path)!r} for backbone {name!r} does not exist. backbone.weights must be none, "
            f"pretrained, or the path of an existing {'/'.join(WEIGHT_SUFFIXES)} file."
        )
    suffix = path.suffix.lower()
    if suffix not in WEIGHT_SUFFIXES:
        raise WeightsError(
            f"Weights file {str(path)!r} has an unsupported extension {suffix!r}; use one of {', '.join(WEIGHT_SUFFIXES)}."
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
    return extract_state_dict(raw, path)


def extract_state_dict(raw: object, path: Path) -> dict[str, Tensor]:
    """The tensors of what a file held: under `state_dict`/`model` if nested, a headstart checkpoint's backbone only,
    `module.` (DataParallel, DDP) stripped."""
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
    if any(k.startswith(CKPT_PREFIX) for k in state):  # a headstart/Lightning checkpoint: its backbone only
        state = {k[len(CKPT_PREFIX) :]: v for k, v in state.items() if k.startswith(CKPT_PREFIX)}
    elif all(k.startswith("module.") for k in state):  # saved from DataParallel / DDP
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _is_optional(key: str) -> bool:
    """BatchNorm's step counter: older files lack it and it plays no part in the forward pass."""
    return key.endswith("num_batches_tracked")


def load_into_body(
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
