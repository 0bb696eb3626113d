"""The widths of a pruned backbone as plain data, and how to give a freshly built backbone those widths.

A pruned checkpoint must load with `torch.load(..., weights_only=True)`, so it cannot hold pickled modules. Instead
the model's hyperparameters carry `structure = pruned_structure(model)`, and `HeadstartModel(..., structure=...)`
builds the backbone as usual and then calls `apply_structure` on it, before `load_state_dict` fills in the pruned
weights. The structure is:

    {
        "backbone": "resnet18",                    # the backbone name it was recorded on
        "modules": {                               # every module of the body whose shape changed: its widths
            "layer1.0.conv1": {"in_channels": 64, "out_channels": 40, "groups": 1},
            "layer1.0.bn1": {"num_features": 40},
            ...
        },
        "tensors": {                               # every parameter/buffer of the body whose shape changed
            "layer1.0.conv1.weight": [40, 64, 3, 3],
            "features.1.0.layer_scale": [88, 1, 1],    # e.g. torchvision ConvNeXt's bare Parameter
            ...
        },
    }

Names are relative to the backbone's `body`; all values are ints or lists of ints.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor, nn

from headstart.errors import ConfigError

__all__ = ["SHAPE_ATTRIBUTES", "apply_structure", "pruned_structure"]

# Module attributes that hold a width. Conv: in/out channels and groups (depthwise pruning changes groups);
# BatchNorm/InstanceNorm: num_features; Linear: in/out features; LayerNorm (and timm/torchvision LayerNorm2d):
# normalized_shape; GroupNorm: num_channels; PReLU: num_parameters; Embedding: embedding_dim.
SHAPE_ATTRIBUTES: tuple[str, ...] = (
    "in_channels",
    "out_channels",
    "groups",
    "num_features",
    "in_features",
    "out_features",
    "normalized_shape",
    "num_channels",
    "num_parameters",
    "embedding_dim",
)
_KEYS = ("backbone", "modules", "tensors")


def _plain(value: Any) -> int | list[int]:
    if isinstance(value, (tuple, list, torch.Size)):
        return [int(v) for v in value]
    return int(value)


def _shape_attributes(module: nn.Module) -> dict[str, int | list[int]]:
    out = {}
    for attr in SHAPE_ATTRIBUTES:
        value = getattr(module, attr, None)
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, int) or (
            isinstance(value, (tuple, list, torch.Size)) and all(isinstance(v, int) for v in value)
        ):
            out[attr] = _plain(value)
    return out


def _local_tensors(module: nn.Module) -> dict[str, Tensor]:
    tensors = {n: p for n, p in module.named_parameters(recurse=False)}
    tensors.update({n: b for n, b in module.named_buffers(recurse=False) if b is not None})
    return tensors


def _body_and_name(model_or_body: nn.Module) -> tuple[nn.Module, str | None]:
    """(the backbone body, the backbone name or None) of a HeadstartModel, a Backbone or a bare body."""
    backbone = getattr(model_or_body, "backbone", None)
    if isinstance(backbone, nn.Module) and hasattr(backbone, "body"):  # a HeadstartModel
        return backbone.body, getattr(backbone, "name", None)
    if backbone is None and hasattr(model_or_body, "head") and hasattr(model_or_body, "flow"):
        raise ConfigError(
            "this model has no backbone (it trains on stored features): there is nothing pruned"
        )
    body = getattr(model_or_body, "body", None)
    if isinstance(body, nn.Module) and hasattr(model_or_body, "feature_dim"):  # a Backbone
        return body, getattr(model_or_body, "name", None)
    return model_or_body, None


def _reference_body(name: str) -> nn.Module:
    """The unpruned body of backbone `name`, on the meta device when possible (no memory, no init cost)."""
    from headstart.core.backbones import build_backbone

    with contextlib.suppress(Exception), torch.device("meta"):
        return build_backbone(name, weights=None, freeze=False).body
    return build_backbone(name, weights=None, freeze=False).body


def pruned_structure(model: nn.Module) -> dict[str, Any]:
    """Plain data describing every module, parameter and buffer of the backbone body whose shape differs from a
    freshly built backbone of the same name (see the module docstring). Empty "modules"/"tensors" when unpruned."""
    body, name = _body_and_name(model)
    if name is None:
        raise ConfigError(
            "pruned_structure needs a HeadstartModel or a Backbone (to know the backbone's name)"
        )
    reference = dict(_reference_body(name).named_modules())
    modules: dict[str, dict[str, int | list[int]]] = {}
    tensors: dict[str, list[int]] = {}
    for module_name, module in body.named_modules():
        ref = reference.get(module_name)
        if ref is None or type(ref) is not type(module):
            raise ConfigError(
                f"the body of backbone {name!r} does not match a freshly built one at module {module_name!r}: "
                "only channel pruning (which keeps every module) can be recorded as a structure"
            )
        ref_tensors = _local_tensors(ref)
        changed = False
        for leaf, tensor in _local_tensors(module).items():
            ref_tensor = ref_tensors.get(leaf)
            if ref_tensor is None or tuple(ref_tensor.shape) != tuple(tensor.shape):
                tensors[f"{module_name}.{leaf}" if module_name else leaf] = _plain(tensor.shape)
                changed = True
        attrs = _shape_attributes(module)
        if attrs and (changed or attrs != _shape_attributes(ref)):
            modules[module_name] = attrs
    return {"backbone": name, "modules": modules, "tensors": tensors}


def _invalid(message: str) -> ConfigError:
    return ConfigError(f"model.structure does not fit the backbone: {message}")


def _resized(old: Tensor, shape: list[int]) -> Tensor:
    """A tensor of `shape` (dtype and device of `old`): its leading slice when it fits inside, else zeros.

    The values only matter until the pruned weights are loaded; a slice keeps sensible ones (BatchNorm running
    variances of 1, initialised weights) for anyone who forwards before loading.
    """
    if len(shape) == old.dim() and all(n <= m for n, m in zip(shape, old.shape, strict=True)):
        return old.detach()[tuple(slice(0, n) for n in shape)].clone()
    return torch.zeros(shape, dtype=old.dtype, device=old.device)


def apply_structure(model_or_body: nn.Module, structure: dict[str, Any]) -> nn.Module:
    """Give a freshly built body (or the backbone of a HeadstartModel, or a Backbone) the widths in `structure`.

    Sets each module's width attributes and replaces each listed parameter/buffer by a tensor of the recorded shape
    (parameters keep their `requires_grad`), in place. Returns the body. Raises ConfigError when the structure
    names a module or tensor the body does not have.
    """
    if not isinstance(structure, dict) or not set(structure) <= set(_KEYS):
        keys = sorted(structure) if isinstance(structure, dict) else type(structure).__name__
        raise _invalid(f"expected a dict with keys {', '.join(_KEYS)}, got {keys}")
    body, name = _body_and_name(model_or_body)
    recorded = structure.get("backbone")
    if recorded is not None and name is not None and recorded != name:
        raise _invalid(f"it was recorded on backbone {recorded!r}, not {name!r}")
    for module_name, attrs in (structure.get("modules") or {}).items():
        try:
            module = body.get_submodule(module_name)
        except AttributeError:
            raise _invalid(f"no module {module_name!r} in backbone {name or recorded!r}") from None
        for attr, value in attrs.items():
            if attr not in SHAPE_ATTRIBUTES or not hasattr(module, attr):
                raise _invalid(f"module {module_name!r} ({type(module).__name__}) has no width {attr!r}")
            setattr(module, attr, _widths(value, f"{module_name}.{attr}"))
    for tensor_name, shape in (structure.get("tensors") or {}).items():
        module_name, _, leaf = tensor_name.rpartition(".")
        try:
            module = body.get_submodule(module_name)
        except AttributeError:
            raise _invalid(f"no module {module_name!r} in backbone {name or recorded!r}") from None
        shape = list(_widths(shape if isinstance(shape, list) else [shape], tensor_name))
        if module._parameters.get(leaf) is not None:
            old = module._parameters[leaf]
            _check_shrinks(tensor_name, shape, old)
            setattr(module, leaf, nn.Parameter(_resized(old, shape), requires_grad=old.requires_grad))
        elif module._buffers.get(leaf) is not None:
            _check_shrinks(tensor_name, shape, module._buffers[leaf])
            module._buffers[leaf] = _resized(module._buffers[leaf], shape)
        else:
            raise _invalid(f"no parameter or buffer {tensor_name!r} in backbone {name or recorded!r}")
    return body


def _widths(value: Any, where: str) -> int | tuple[int, ...]:
    """A recorded width (an int, or a list of ints), checked: positive whole numbers only."""
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise _invalid(f"{where} is {value!r}; widths are whole numbers")
    return tuple(values) if isinstance(value, list) else int(value)


def _check_shrinks(name: str, shape: list[int], unpruned: Tensor) -> None:
    """Pruning only removes channels: a recorded shape fits inside the unpruned one (so it never allocates more)."""
    if len(shape) != unpruned.dim() or any(n > m for n, m in zip(shape, unpruned.shape, strict=True)):
        raise _invalid(
            f"{name} is recorded as {shape}, which does not fit inside its unpruned shape "
            f"{list(unpruned.shape)}; pruning only removes channels"
        )
