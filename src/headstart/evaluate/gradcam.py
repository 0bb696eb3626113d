"""Grad-CAM heat maps for image models: where in the image the evidence for a decision lies.

Grad-CAM (Selvaraju et al., 2017) weighs the channels of a late feature map `A` [C, h, w] by the spatial mean of the
gradient of one score (a logit) with respect to them, and keeps the positive part of the weighted sum:
`cam = relu(sum_c mean_hw(d score / d A_c) * A_c)`.

The model sees the image resized (shorter side to `resize`) and center-cropped (`crop` x `crop`). The heat map is
computed on that crop and placed back into the original image's coordinates; what the crop cut off gets 0.

For people, `side_by_side` draws the image and its overlay next to each other at a readable size (`readable_size`):
an 8x8 digit is shown as 224x224 whole pixels, a photo is resized smoothly to a short side of 224.

Nothing of the model is changed behind the caller's back: no hook stays registered, no `requires_grad` flag, no
`.grad` and no train/eval mode of any module is different afterwards (also when an error is raised).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from headstart.core.backbones import Backbone
from headstart.core.model import HeadstartModel
from headstart.core.transforms import InputTransform, eval_transform
from headstart.errors import ConfigError

__all__ = ["READABLE", "enlarge", "grad_cam", "overlay", "readable_size", "side_by_side", "target_layer"]

READABLE = 224  # the short side, in pixels, of a picture meant for people (what the models see, too)

_CLASS_KINDS = ("binary", "multiclass")
_NO_BACKBONE = (
    "Grad-CAM needs an image model (a backbone that sees the pixels), but this model has no backbone "
    "(a head trained on DoF features has no backbone; use checkpoints/image_model.ckpt)"
)


# --------------------------------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------------------------------


def target_layer(backbone: Backbone) -> nn.Module:
    """The module whose activations Grad-CAM weighs.

    It is the last module of `backbone.body` (in execution order) whose output is a 4-D feature map [B, C, H, W]
    with H*W > 1, found by one forward pass with forward hooks on a dummy input at the transform's crop size. The
    pass runs in eval mode without gradients; hooks and modes are restored afterwards.

    Raises ConfigError when no module of the body gives such a map (e.g. a transformer whose tokens are never a
    spatial map).
    """
    if backbone is None:
        raise ConfigError(_NO_BACKBONE)
    crop = backbone.transform.crop
    param = next(backbone.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    fired: list[tuple[nn.Module, tuple[int, ...]]] = []

    def record(module: nn.Module, _inputs: object, output: object) -> None:
        if isinstance(output, torch.Tensor):
            fired.append((module, tuple(output.shape)))

    with _preserved_modes(backbone), _hooked(backbone.body.modules(), record), torch.no_grad():
        backbone.eval()
        backbone.body(torch.zeros(1, 3, crop, crop, device=device, dtype=dtype))
    for module, shape in reversed(fired):
        if len(shape) == 4 and shape[2] * shape[3] > 1:
            return module
    raise ConfigError(
        f"Grad-CAM: backbone {backbone.name!r} has no module whose output is a spatial feature map "
        f"[B, C, H, W] with H*W > 1 at its input size {crop}x{crop}, so there is nothing to weigh. "
        "Grad-CAM works with convolutional backbones (resnet*, efficientnet*, mobilenet*, convnext*, small_cnn)."
    )


def grad_cam(
    model: HeadstartModel,
    image: Image.Image,
    task: str | None = None,
    target: int | None = None,
    *,
    layer: nn.Module | None = None,
) -> np.ndarray:
    """float32 heat map in [0, 1] with the ORIGINAL image's size (shape [H, W] of `image`).

    Args:
        model: an image model (with a backbone); it may be frozen, in train or eval mode, on any device. The map is
            computed in eval mode; every module's mode is restored afterwards.
        image: a PIL image of any mode (converted to RGB) and any size.
        task: a task path. Default: the first binary or multiclass task of the flow (the first task if there is
            none). Regression kinds explain their logit; multilabel explains the logit of class `target`.
        target: the class index to explain. Default: the predicted class (multiclass), the class with the largest
            logit (multilabel). Binary: 1 explains the positive logit, 0 its negation; by default the sign that
            explains the prediction. Regression kinds take no target.
        layer: the module to weigh (a module of `model.backbone.body`); default `target_layer(model.backbone)`.
            Pass it when explaining many images with one model to save the search pass.

    The map is `relu(sum_c w_c * A_c)` with `w_c` the spatial mean of d(score)/d(A_c), upsampled (bilinear) to the
    crop the model sees, placed into the original image's coordinates (outside the crop: 0) and divided by its
    maximum. It is all zeros only when no location has positive evidence for the score.
    """
    backbone = model.backbone
    if backbone is None:
        raise ConfigError(_NO_BACKBONE)
    path = _resolve_task(model, task)
    if layer is None:
        layer = target_layer(backbone)
    elif not any(m is layer for m in backbone.body.modules()):
        raise ConfigError("grad_cam: `layer` must be a module of model.backbone.body")
    t = backbone.transform
    rgb = image.convert("RGB")
    param = next(backbone.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    x = eval_transform(t)(rgb).unsqueeze(0).to(device=device, dtype=dtype)

    captured: list[torch.Tensor] = []

    def capture(_module: nn.Module, _inputs: object, output: object) -> None:
        if isinstance(output, torch.Tensor):
            captured.append(output)

    with (
        _preserved_modes(model),
        _hooked([layer], capture),
        torch.inference_mode(False),
        torch.enable_grad(),
    ):
        model.eval()
        # The input requires grad so that a graph is built even when no parameter does (a frozen backbone);
        # model.forward would run a frozen backbone under no_grad, hence backbone and head are called here.
        x = x.detach().clone().requires_grad_(True)
        logits = model.head(backbone(x))
        if not captured:
            raise ConfigError("grad_cam: the chosen layer did not run in the backbone's forward pass")
        activation = captured[-1]  # a module that runs more than once: its last output
        if activation.dim() != 4:
            raise ConfigError(
                f"grad_cam: the chosen layer gives a {activation.dim()}-D output, not a feature map [B, C, H, W]"
            )
        score = _score(model, path, logits[path], target)
        (grads,) = torch.autograd.grad(score, [activation], allow_unused=True)
    if grads is None:  # the score does not depend on the layer (a degenerate model)
        return np.zeros((image.height, image.width), dtype=np.float32)
    weights = grads.detach().float().mean(dim=(2, 3), keepdim=True)  # [1, C, 1, 1]
    cam = torch.relu((weights * activation.detach().float()).sum(dim=1, keepdim=True))  # [1, 1, h, w]
    cam = torch.nn.functional.interpolate(cam, size=(t.crop, t.crop), mode="bilinear", align_corners=False)
    full = _to_original(cam[0, 0].cpu().numpy().astype(np.float64), t, image.width, image.height)
    peak = float(full.max()) if full.size else 0.0
    if not np.isfinite(peak) or peak <= 0:
        return np.zeros((image.height, image.width), dtype=np.float32)
    return np.clip(full / peak, 0.0, 1.0).astype(np.float32)


def overlay(image: Image.Image, cam: np.ndarray, alpha: float = 0.45, cmap: str = "jet") -> Image.Image:
    """RGB image of the original size: the heat map (matplotlib colormap `cmap`, 'jet' or 'inferno') blended over
    the image with weight `alpha` (0: only the image, 1: only the heat map)."""
    import matplotlib

    values = _cam_values(image, cam, "overlay")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"overlay: alpha must be in [0, 1], got {alpha}")
    colors = matplotlib.colormaps[cmap](values)[..., :3]  # float [H, W, 3] in [0, 1]
    heat = Image.fromarray(np.round(colors * 255).astype(np.uint8), mode="RGB")
    return Image.blend(image.convert("RGB"), heat, alpha)


def readable_size(width: int, height: int, short: int = READABLE) -> tuple[int, int, Image.Resampling]:
    """(width, height, resampling) at which a person can read an image of `width` x `height`.

    Tiny images (short side at most `short` / 2, e.g. 8x8 digits) are enlarged by the smallest whole factor that
    brings the short side to at least `short`, with nearest-neighbour resampling: every pixel becomes a sharp
    square, so what the model saw stays visible instead of a blur. Every other image gets a short side of exactly
    `short`, resized smoothly (bicubic up, Lanczos down), so large photos do not make huge report pictures.
    """
    if width < 1 or height < 1 or short < 1:
        raise ValueError(f"readable_size: sizes must be positive, got {width}x{height} and short={short}")
    side = min(width, height)
    if 2 * side <= short:
        factor = -(-short // side)
        return width * factor, height * factor, Image.Resampling.NEAREST
    scale = short / side
    resample = Image.Resampling.BICUBIC if scale > 1 else Image.Resampling.LANCZOS
    return max(short, round(width * scale)), max(short, round(height * scale)), resample


def enlarge(image: Image.Image, short: int = READABLE) -> Image.Image:
    """The image resized to `readable_size` (a copy; the image itself is not changed)."""
    width, height, resample = readable_size(image.width, image.height, short)
    if (width, height) == image.size:
        return image.copy()
    return image.resize((width, height), resample)


def side_by_side(
    image: Image.Image,
    cam: np.ndarray,
    caption: str = "",
    *,
    short: int = READABLE,
    alpha: float = 0.45,
    cmap: str = "jet",
) -> Image.Image:
    """One RGB picture for people: the image (left) and its Grad-CAM overlay (right), both at `readable_size`,
    with `caption` (e.g. "3, predicted 9") written above them.

    `cam` has the original image's size (what `grad_cam` returns). It is resized bilinearly to the shown size
    before blending, so an enlarged tiny image shows a smooth heat map over sharp pixels.
    """
    rgb = image.convert("RGB")
    values = _cam_values(rgb, cam, "side_by_side")
    big = enlarge(rgb, short)
    heat = np.asarray(Image.fromarray(values.astype(np.float32)).resize(big.size, Image.Resampling.BILINEAR))
    gap = max(4, short // 28)
    font = _font(max(12, short // 14)) if caption else None
    band = int(font.getbbox("Ag")[3]) + 2 * gap if font is not None else 0
    picture = Image.new("RGB", (2 * big.width + gap, band + big.height), "white")
    picture.paste(big, (0, band))
    picture.paste(overlay(big, np.clip(heat, 0.0, 1.0), alpha, cmap), (big.width + gap, band))
    if font is not None:
        ImageDraw.Draw(picture).text(
            (gap, gap), _fit(caption, font, picture.width - 2 * gap), fill="black", font=font
        )
    return picture


# --------------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------------


def _cam_values(image: Image.Image, cam: np.ndarray, caller: str) -> np.ndarray:
    """The heat map as float64 in [0, 1] (NaN: 0), checked to have the image's size."""
    cam = np.asarray(cam)
    if cam.shape != (image.height, image.width):
        raise ValueError(
            f"{caller}: the heat map has shape {cam.shape}, the image is {image.height}x{image.width} (H x W)"
        )
    return np.clip(np.nan_to_num(cam.astype(np.float64), nan=0.0), 0.0, 1.0)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's own font at `size` pixels (bundled, no system fonts needed); its small bitmap font where Pillow was
    built without FreeType or is older than 10.1."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def _fit(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int) -> str:
    """`text`, shortened with "..." where it would be wider than `width` pixels."""
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


@contextlib.contextmanager
def _preserved_modes(module: nn.Module) -> Iterator[None]:
    """Restore every submodule's `training` flag on exit (a plain `.train(mode)` would not: frozen parts of a
    backbone stay in eval mode under train)."""
    modes = [(m, m.training) for m in module.modules()]
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


@contextlib.contextmanager
def _hooked(modules: object, hook: object) -> Iterator[None]:
    handles = []
    try:
        for m in modules:
            handles.append(m.register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


def _resolve_task(model: HeadstartModel, task: str | None) -> str:
    tasks = model.flow.tasks
    if task is None:
        for path, t in tasks.items():
            if t.kind in _CLASS_KINDS:
                return path
        return next(iter(tasks))
    if task not in tasks:
        raise ConfigError(f"grad_cam: unknown task {task!r}; the model's tasks are: {', '.join(tasks)}")
    return task


def _score(model: HeadstartModel, path: str, logits: torch.Tensor, target: int | None) -> torch.Tensor:
    """The scalar Grad-CAM explains: one logit of the single image (binary: signed)."""
    kind = model.flow.tasks[path].kind
    row = logits[0]
    if kind in ("multiclass", "multilabel"):
        n = row.shape[-1]
        if target is None:
            return row.max()
        if isinstance(target, bool) or not 0 <= int(target) < n:
            raise ConfigError(
                f"grad_cam: target {target!r} is not a class index of task {path!r} (0..{n - 1})"
            )
        return row[int(target)]
    value = row.reshape(())
    if kind == "binary":
        if target is None:
            return value if float(value.detach()) >= 0 else -value
        if isinstance(target, bool) or int(target) not in (0, 1):
            raise ConfigError(f"grad_cam: target of binary task {path!r} must be 0 or 1, got {target!r}")
        return value if int(target) == 1 else -value
    if target is not None:
        raise ConfigError(
            f"grad_cam: task {path!r} is a {kind} task; it takes no target (its logit is explained)"
        )
    return value


def _to_original(cam: np.ndarray, t: InputTransform, width: int, height: int) -> np.ndarray:
    """Place a [crop, crop] map into an image of size width x height: the crop is a centered square of side
    crop * shorter_side / resize there; the map is resampled (bilinear) onto it, everything outside is 0."""
    side = t.crop * min(width, height) / t.resize
    rows = _resample_matrix(height, (height - side) / 2, side, cam.shape[0])  # [H, crop]
    cols = _resample_matrix(width, (width - side) / 2, side, cam.shape[1])  # [W, crop]
    return rows @ cam @ cols.T


def _resample_matrix(n_out: int, start: float, side: float, n_in: int) -> np.ndarray:
    """[n_out, n_in] bilinear weights: output pixel i (center i + 0.5) samples the input, which spans
    [start, start + side) in output coordinates; output pixels outside that span get no weight (0)."""
    centers = np.arange(n_out, dtype=np.float64) + 0.5
    u = (centers - start) * n_in / side  # continuous input coordinate (pixel j covers [j, j + 1))
    inside = (u >= 0) & (u < n_in)
    p = np.clip(u - 0.5, 0, n_in - 1)
    j0 = np.floor(p).astype(np.int64)
    j1 = np.minimum(j0 + 1, n_in - 1)
    frac = p - j0
    m = np.zeros((n_out, n_in), dtype=np.float64)
    idx = np.arange(n_out)
    np.add.at(m, (idx, j0), 1 - frac)
    np.add.at(m, (idx, j1), frac)
    m[~inside] = 0
    return m
