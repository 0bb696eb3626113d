"""Iterative structured channel pruning of a HeadstartModel's backbone with torch-pruning.

The head is never pruned: its weights and shapes stay bit-identical. Ignoring the head's layers is not enough for
that: torch-pruning couples the output channels of the backbone's last layers with the *input* columns of the head's
first Linear, and an ignored layer only stops groups in which it loses *output* channels, so pruning the backbone's
last conv would still cut columns out of the head. `make_pruner` therefore also protects every backbone layer whose
output channels are the features (the out-channel members of the head's input group: the last conv/Linear, its
norm, and for residual stages every layer writing into that residual stream). The feature size is thereby fixed.

Use:

    pruner = make_pruner(model, "magnitude", ratio=0.5, steps=5)
    for _ in range(5):
        prune_step(pruner, model, gradient_batches=...)   # batches only for taylor
        ... fine-tune (rebuild the optimizer: pruned parameters are new tensors) ...
    model.hparams["structure"] = pruned_structure(model)   # so the checkpoint rebuilds the pruned widths
"""

from __future__ import annotations

import contextlib
import logging
import types
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from headstart.core.model import HeadstartModel
from headstart.errors import ConfigError, PruningError
from headstart.prune.importance import make_importance, needs_gradients

log = logging.getLogger(__name__)

__all__ = ["count_macs_params", "make_pruner", "protected_layers", "prune_step"]

_BODY_PREFIX = "backbone.body."


class _ImageGraph(nn.Module):
    """images -> (logits of each task in flow order): the tensors torch-pruning traces (it cannot read a dict of
    task paths) and counts. Holds the model's own backbone and head, so pruning it prunes the model."""

    def __init__(self, model: HeadstartModel) -> None:
        super().__init__()
        self.backbone = model.backbone
        self.head = model.head
        self.paths = list(model.flow.leaf_paths)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits = self.head(self.backbone(images))
        return tuple(logits[p] for p in self.paths)


def _tp():
    import torch_pruning as tp

    return tp


def _check_model(model: HeadstartModel) -> None:
    if getattr(model, "backbone", None) is None:
        raise ConfigError(
            "pruning needs an image model with a backbone; this model is a head trained on stored features"
        )
    if model.input_transform is None:
        raise ConfigError("the model records no input transform, so the input size to prune at is unknown")


def _input_size(model: HeadstartModel, input_size: int | None) -> int:
    if input_size is not None:
        if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 1:
            raise ConfigError(f"input_size must be a positive integer, got {input_size!r}")
        return input_size
    return int(model.input_transform.crop)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _layer_name(name: str | None) -> str:
    return name[len(_BODY_PREFIX) :] if name and name.startswith(_BODY_PREFIX) else (name or "?")


def _why(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def _error(model: HeadstartModel, during: str, e: BaseException, layer: str | None = None) -> PruningError:
    where = f" at layer {_layer_name(layer)!r}" if layer else ""
    return PruningError(
        f"torch-pruning cannot prune backbone {model.backbone.name!r}{where} ({during}): {_why(e)}. "
        "Fix: choose another backbone (resnet, efficientnet, mobilenet, convnext, vgg, efficientnet_lite0 and "
        "small_cnn are tested), or another importance/ratio."
    )


@contextlib.contextmanager
def _layer_tracker(graph: nn.Module) -> Iterator[list[str]]:
    """While active, the list holds the names of the modules whose forward is running, innermost last; after an
    exception in a forward it still names the module that raised (its post-hook never ran)."""
    stack: list[str] = []
    names = {m: n for n, m in graph.named_modules()}
    handles = []

    def pre(module: nn.Module, _inputs: Any) -> None:
        stack.append(names.get(module, type(module).__name__))

    def post(_module: nn.Module, _inputs: Any, _output: Any) -> None:
        if stack:
            stack.pop()

    for m in graph.modules():
        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(post))
    try:
        yield stack
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _prunable(model: HeadstartModel) -> Iterator[None]:
    """Make the backbone traceable (every parameter requires grad: a frozen backbone builds no autograd graph) and
    restore, afterwards, every parameter's `requires_grad` and every module's train/eval mode by name. Restoring by
    name matters: torch-pruning replaces pruned parameters by new ones (which require grad)."""
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    training = {n: m.training for n, m in model.named_modules()}
    try:
        for p in model.backbone.parameters():
            p.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        for n, p in model.named_parameters():
            if n in requires_grad:
                p.requires_grad_(requires_grad[n])
            p.grad = None
        for n, m in model.named_modules():
            if n in training:
                m.training = training[n]


def _head_layers(model: HeadstartModel) -> list[nn.Module]:
    return [m for m in model.head.modules() if isinstance(m, nn.Linear)]


def _feature_producers(dg: Any, model: HeadstartModel) -> list[nn.Module]:
    """Backbone layers whose output channels are the head's input features: the out-channel members of the group
    that pruning the head's input columns would form."""
    head = set(model.head.modules())
    real = set(model.backbone.modules())
    producers: list[nn.Module] = []
    for layer in _head_layers(model):
        if layer not in dg.module2node:
            continue
        fn = dg.get_pruner_of_module(layer).prune_in_channels
        group = dg.get_pruning_group(layer, fn, list(range(layer.in_features)))
        for dep, _ in group:
            target = dep.target.module
            if (
                isinstance(target, nn.Module)
                and target in real
                and target not in head
                and target not in producers
                and dg.is_out_channel_pruning_fn(dep.handler)
            ):
                producers.append(target)
    return producers


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels


def _shared_stream_producers(dg: Any, model: HeadstartModel) -> list[nn.Module]:
    """Backbone layers whose output channels other layers also write to: residual streams (every block adding into
    them) and concatenations. Removing one such channel removes it from every block of the stream at once; on a
    pretrained EfficientNet-Lite0, pruning a quarter of a stage's stream moved its features far more than pruning a
    quarter of any block's expansion channels (feature cosine 0.54 against 0.94, with taylor importance)."""
    body = model.backbone.body
    shared: list[nn.Module] = []
    for layer in body.modules():
        if not isinstance(layer, nn.Conv2d | nn.Linear) or _is_depthwise(layer) or layer in shared:
            continue
        if layer not in dg.module2node:
            continue
        fn = dg.get_pruner_of_module(layer).prune_out_channels
        width = layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features
        group = dg.get_pruning_group(layer, fn, list(range(width)))
        producers = {
            dep.target.module
            for dep, _ in group
            if isinstance(dep.target.module, nn.Conv2d | nn.Linear)
            and not _is_depthwise(dep.target.module)
            and dg.is_out_channel_pruning_fn(dep.handler)
        }
        if len(producers) > 1:
            shared.extend(m for m in producers if m not in shared)
    return shared


def _build(model: HeadstartModel, build: Any) -> Any:
    """Run `build(graph)` (which traces the model) under `_prunable`, turning failures into one PruningError."""
    graph = _ImageGraph(model)
    with _prunable(model), _layer_tracker(graph) as stack, warnings.catch_warnings():
        # torch-pruning warns about bare nn.Parameters (ConvNeXt's layer_scale); pruning their last non-singleton
        # dimension is what those need, and the forward check after each step catches any that is wrong.
        warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
        try:
            return build(graph)
        except Exception as e:
            raise _error(model, "building the dependency graph", e, stack[-1] if stack else None) from e


def protected_layers(model: HeadstartModel, dependency_graph: Any | None = None) -> list[nn.Module]:
    """Every layer pruning must leave alone: all Linear layers of the head, plus the backbone layers that produce
    the feature channels (so that the feature size, the head's input, never changes).

    The feature producers are found on torch-pruning's dependency graph: `dependency_graph` when given (built over a
    graph that holds this model's backbone and head), else one is traced here at the model's input size.
    """
    _check_model(model)
    if dependency_graph is None:
        tp = _tp()
        side = _input_size(model, None)
        example = torch.randn(1, 3, side, side, device=_device(model))
        dependency_graph = _build(
            model,
            lambda graph: tp.DependencyGraph().build_dependency(graph, example_inputs=example, verbose=False),
        )
    return _head_layers(model) + _feature_producers(dependency_graph, model)


def _check_ratio(ratio: float, steps: int) -> None:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < float(ratio) < 1.0:
        raise ConfigError(
            f"pruning ratio must be a number strictly between 0 and 1 (the fraction of channels to remove), "
            f"got {ratio!r}"
        )
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"pruning steps must be an integer >= 1 (iterative pruning steps), got {steps!r}")


def make_pruner(
    model: HeadstartModel,
    importance: str,
    ratio: float,
    steps: int,
    round_to: int | None = 8,
    global_pruning: bool = False,
    input_size: int | None = None,
    residual_streams: bool = False,
) -> Any:
    """A torch-pruning BasePruner over `model`'s backbone that removes `ratio` of the prunable channels in `steps`
    equal iterative steps (each `prune_step` call does one), ranking channels by `importance` (see
    headstart.prune.importance). Channel counts are rounded to multiples of `round_to` (None: no rounding).
    The head and the feature size are protected (see `protected_layers`). `input_size` defaults to the model's crop.
    `residual_streams=False` (the default) also keeps every channel that several layers write to (residual additions,
    concatenations): then only channels inside blocks (expansions, bottleneck middles) are removed.

    The pruner also carries what `prune_step` needs: `headstart_importance`, `headstart_example` (the example input),
    `headstart_head` (the head's shapes, checked after every step).
    """
    _check_ratio(ratio, steps)
    _check_model(model)
    if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
        raise ConfigError(f"round_to must be a positive integer or None, got {round_to!r}")
    scorer = make_importance(importance)
    if importance == "bn_scale" and not any(isinstance(m, _BatchNorm) for m in model.backbone.modules()):
        raise ConfigError(
            f"importance 'bn_scale' ranks channels by BatchNorm scales, but backbone {model.backbone.name!r} has no "
            "BatchNorm layer (nothing would be pruned); use magnitude, taylor or lamp"
        )
    tp = _tp()
    side = _input_size(model, input_size)
    example = torch.randn(1, 3, side, side, device=_device(model))

    def build(graph: nn.Module) -> Any:
        pruner = tp.pruner.BasePruner(
            graph,
            example,
            importance=scorer,
            global_pruning=bool(global_pruning),
            pruning_ratio=float(ratio),
            iterative_steps=steps,
            ignored_layers=_head_layers(model),
            round_to=round_to,
        )
        producers = _feature_producers(pruner.DG, model)
        pruner.ignored_layers.extend(m for p in producers for m in p.modules())
        if not residual_streams:
            pruner.ignored_layers.extend(_shared_stream_producers(pruner.DG, model))
        if round_to:
            pruner._round_to = types.MethodType(round_kept_to_nearest, pruner)
        return pruner, producers

    pruner, producers = _build(model, build)
    log.info(
        "pruning backbone %s: protecting the head and the feature producers %s",
        model.backbone.name,
        ", ".join(_layer_name(pruner.DG._module2name.get(m)) for m in producers) or "(none found)",
    )
    pruner.headstart_importance = importance
    pruner.headstart_example = example
    pruner.headstart_head = {n: tuple(t.shape) for n, t in model.head.state_dict().items()}
    return pruner


def round_kept_to_nearest(pruner: Any, n_pruned: int, current_channels: int, round_to: int) -> int:
    """Channels to prune so that the kept count is the multiple of `round_to` NEAREST to what the schedule asks
    (at least `round_to`). torch-pruning rounds the kept count down, which in early steps halves small layers (16
    channels asked to keep 15 keep 8) and wrecked a pretrained EfficientNet-Lite0 in one step (val acc 0.99 -> 0.49)."""
    wanted = current_channels - n_pruned
    kept = max(round_to, round(wanted / round_to) * round_to)
    return max(current_channels - kept, 0)


def _batch_parts(batch: Any) -> tuple[torch.Tensor, Any] | None:
    if batch is None:  # every image of the batch was unreadable
        return None
    if isinstance(batch, dict):
        if "inputs" not in batch or "targets" not in batch:
            raise ConfigError(f"a gradient batch dict needs 'inputs' and 'targets', got keys {sorted(batch)}")
        return batch["inputs"], batch["targets"]
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise ConfigError(
        "gradient batches must be (images, targets) pairs or {'inputs': images, 'targets': {task: tensor}} dicts, "
        f"got {type(batch).__name__}"
    )


def _gradient_pass(model: HeadstartModel, batches: Iterable[Any]) -> int:
    """Accumulate the flow loss's gradients over `batches` (eval mode: BatchNorm statistics do not move)."""
    device = _device(model)
    class_weights = model._class_weights() if hasattr(model, "_class_weights") else {}
    smoothing = float(model.hparams.get("label_smoothing", 0.0) or 0.0)
    weighting = getattr(model, "weighting", None)
    model.eval()
    used = 0
    for batch in batches:
        parts = _batch_parts(batch)
        if parts is None:
            continue
        images, targets = parts
        targets = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in targets.items()}
        logits = model(images.to(device))
        loss, _ = model.flow.loss(
            logits, targets, class_weights, label_smoothing=smoothing, weighting=weighting
        )
        if not loss.requires_grad:  # no task applies in this batch
            continue
        loss.backward()
        used += 1
    return used


def prune_step(pruner: Any, model: HeadstartModel, gradient_batches: Iterable[Any] | None = None) -> None:
    """One iterative pruning step of a pruner from `make_pruner`.

    For taylor, a gradient pass over `gradient_batches` comes first: an iterable of `(images, targets)` pairs or
    `{"inputs", "targets"}` batch dicts (targets `{task: tensor}`), all of which is consumed, so pass a few batches
    (e.g. `itertools.islice(loader, 8)`). It runs in eval mode (BatchNorm statistics and dropout untouched), with the
    model's flow loss, and works on a frozen backbone. Afterwards parameters' `requires_grad` and modules'
    train/eval modes are as before and every `.grad` is cleared. Pruned parameters are new tensors: rebuild any
    optimizer afterwards. The pruner holds the model's modules: keep pruning the same model object.

    Raises PruningError when every step is already done or torch-pruning fails (naming the layer when known); the
    model may then be partly pruned.
    """
    if pruner.current_step >= pruner.iterative_steps:
        raise PruningError(
            f"all {pruner.iterative_steps} pruning steps of this pruner are done; make a new pruner to prune further"
        )
    importance = getattr(pruner, "headstart_importance", None)
    graph = pruner.model
    with _prunable(model):
        if importance is not None and needs_gradients(importance):
            if gradient_batches is None:
                raise ConfigError(f"importance {importance!r} needs gradient batches (labelled images)")
            for p in model.parameters():
                p.grad = None
            if _gradient_pass(model, gradient_batches) == 0:
                raise ConfigError(
                    f"importance {importance!r} needs gradients, but no gradient batch had a labelled task"
                )
        model.eval()
        current: list[str | None] = [None]  # the root layer of the group being scored or pruned

        def estimate(group: Any) -> Any:
            current[0] = pruner.DG._module2name.get(group[0].dep.target.module)
            return type(pruner).estimate_importance(pruner, group)

        pruner.estimate_importance = estimate
        try:
            for group in pruner.step(interactive=True):
                current[0] = pruner.DG._module2name.get(group[0].dep.target.module)
                group.prune()
        except Exception as e:
            raise _error(model, "pruning step", e, current[0]) from e
        finally:
            del pruner.estimate_importance
        with _layer_tracker(graph) as stack, torch.no_grad():
            try:
                graph(pruner.headstart_example.to(_device(model)))
            except Exception as e:
                raise _error(model, "the pruned model's forward", e, stack[-1] if stack else None) from e
    shapes = {n: tuple(t.shape) for n, t in model.head.state_dict().items()}
    expected = getattr(pruner, "headstart_head", shapes)
    if shapes != expected:  # a bug, not a user error: the protection above failed
        raise AssertionError(f"pruning changed the head of the model: {expected} -> {shapes}")


def count_macs_params(model: HeadstartModel, input_size: int | None = None) -> tuple[int, int]:
    """(multiply-accumulates, parameters) of the image model (backbone + head) on one image of the model's input
    size (or `input_size`), counted by torch-pruning."""
    _check_model(model)
    tp = _tp()
    side = _input_size(model, input_size)
    graph = _ImageGraph(model)
    example = torch.zeros(1, 3, side, side, device=_device(model))
    with torch.no_grad():
        macs, params = tp.utils.count_ops_and_params(graph, example)
    return int(macs), int(params)
