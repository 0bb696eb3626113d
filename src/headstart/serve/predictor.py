"""Predictor: load a bundle (a folder or an http(s) URL) and predict on images with ONNX Runtime.

Needs only numpy, pillow, onnxruntime and safetensors: no torch, Lightning or Hydra.

    from headstart import Predictor
    p = Predictor.load("outputs/dog_cat/2026-11-23_10-00-00/bundle")
    p.predict("cat.jpg")        # {"label": {"applicable": True, "value": "cat", "score": 0.97}}
    print(p.explain("cat.jpg")) # the TaskFlow tree of decisions

A head update (a head-only bundle) is applied on top of a base bundle with the same backbone:
`Predictor.load(update, base=base_bundle)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from headstart.errors import BundleError, DataError
from headstart.serve.bundle import open_bundle
from headstart.serve.decode import decode, explain
from headstart.serve.flowspec import FlowSpec, TaskSpec
from headstart.serve.runtime import FEATURES_NAME, HeadRunner, OnnxRunner
from headstart.serve.transform import InputTransform, load_rgb, preprocess

ImageLike = str | Path | Image.Image | np.ndarray


class Predictor:
    """A bundle ready to run: preprocessing, the ONNX graph(s) and the flow that decodes their logits."""

    def __init__(
        self,
        description: dict[str, Any],
        runner: OnnxRunner,
        head: HeadRunner | None = None,
        source: str | None = None,
    ) -> None:
        self.description = description
        self.flow = FlowSpec.from_spec(description["flow"])
        self.flow.load_state({"thresholds": description.get("thresholds") or {}})
        self.transform = InputTransform.from_dict(description["transform"])
        self.runner = runner
        self.head = head
        self.source = source

    # ---- loading --------------------------------------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        source: str | Path,
        base: str | Path | None = None,
        threads: int | None = None,
        cache_dir: str | Path | None = None,
        verify: bool = True,
    ) -> Predictor:
        """Load a bundle folder or URL (bundle.open_bundle: files against SHA256SUMS, model.json's fields, the graph
        against its description and, with `verify`, against the stored golden outputs). A head update needs `base`,
        a full bundle with the same backbone, verified the same way."""
        opened = open_bundle(source, threads, cache_dir, golden=verify)
        desc = opened.description
        if desc["kind"] == "full":
            if base is not None:
                raise BundleError(
                    f"{source} is a full bundle; base= is only for head updates. Load it without base="
                )
            return cls(desc, opened.runner, source=str(source))
        if base is None:
            raise BundleError(
                f"{source} is a head update (only the head, for backbone {desc['backbone']['weights_sha256'][:12]}); "
                "load it on top of its base bundle: Predictor.load(update, base=BASE_BUNDLE)"
            )
        opened_base = open_bundle(base, threads, cache_dir, golden=verify)
        base_desc = opened_base.description
        if base_desc["kind"] != "full":
            raise BundleError(f"base {base} is itself a head update; the base must be a full bundle")
        want, have = desc["backbone"], base_desc["backbone"]
        if want["weights_sha256"] != have["weights_sha256"] or want["feature_dim"] != have["feature_dim"]:
            raise BundleError(
                f"head update {source} was trained on backbone {want['name']} with weights sha256 "
                f"{want['weights_sha256'][:12]}, but base {base} has {have['name']} with "
                f"{have['weights_sha256'][:12]}: the head would get features it never saw. Use a base bundle "
                "exported from that backbone"
            )
        if desc.get("transform") and desc["transform"] != base_desc["transform"]:
            raise BundleError(
                f"head update {source} expects the input transform {desc['transform']}, but base {base} uses "
                f"{base_desc['transform']}; use a base bundle with the same preprocessing"
            )
        merged = {
            **desc,
            "transform": base_desc["transform"],
            "base": {"source": str(base), **base_desc["backbone"]},
        }
        return cls(merged, opened_base.runner, head=opened.runner, source=str(source))

    # ---- running --------------------------------------------------------------------------------------------------

    @property
    def tasks(self) -> list[str]:
        return self.flow.leaf_paths

    def preprocess(self, images: Sequence[ImageLike]) -> np.ndarray:
        """float32[N, 3, crop, crop]: each image decoded to RGB, resized, center-cropped and normalized."""
        side = self.transform.crop
        out = np.empty((len(images), 3, side, side), dtype=np.float32)
        for i, x in enumerate(images):
            out[i] = preprocess(to_pil(x), self.transform)
        return out

    def logits(self, images: Sequence[ImageLike] | np.ndarray, batch_size: int = 32) -> dict[str, np.ndarray]:
        """{task: logits} for images (or an already preprocessed float32[N, 3, H, W] array); no images give logits
        with 0 rows."""
        if isinstance(images, np.ndarray) and images.ndim == 4:
            batches = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
        else:
            batches = [self.preprocess(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
        if not batches:
            return {p: np.zeros(_logit_shape(t, 0), dtype=np.float32) for p, t in self.flow.tasks.items()}
        parts = [self._run(b) for b in batches]
        return {t: np.concatenate([p[t] for p in parts]) for t in self.tasks}

    runtime = "onnxruntime"

    @property
    def threads(self) -> int:
        return self.runner.threads

    def __call__(self, images: Any) -> dict[str, np.ndarray]:
        """{task: logits} for a preprocessed float32 batch (numpy; evaluate.py wraps it to take and give torch)."""
        return self._run(np.asarray(images, dtype=np.float32))

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        if self.head is None:
            return self.runner(batch)
        features = self.runner.run(batch)[FEATURES_NAME]
        return self.head(features)

    def predict(self, x: ImageLike | Sequence[ImageLike], batch_size: int = 32) -> Any:
        """Decoded outputs per task: `{task: {"applicable", "value", "score"}}` for one image, a list for a list
        (an empty one for an empty one).

        value: binary True/False, multiclass the class name, multilabel the list of class names that are on,
        regression kinds a float; None where the task does not apply (its condition is false)."""
        single = not isinstance(x, list | tuple)
        images = [x] if single else list(x)
        rows = decode(self.flow, self.logits(images, batch_size))
        return rows[0] if single else rows

    def explain(self, x: ImageLike | Sequence[ImageLike]) -> str | list[str]:
        """The TaskFlow tree of decisions (value, probability, logit of each task that applies) per image."""
        single = not isinstance(x, list | tuple)
        images = [x] if single else list(x)
        logits = self.logits(images)
        texts = [explain(self.flow, logits, i) for i in range(len(images))]
        return texts[0] if single else texts

    def __repr__(self) -> str:
        kind = "head update on a base bundle" if self.head is not None else "bundle"
        return f"Predictor({kind} {self.source!r}, tasks={self.tasks})"


def to_pil(x: ImageLike) -> Image.Image:
    """An RGB PIL image from a path, a PIL image or an array (H x W, H x W x 3|4, uint8 or floats in [0, 1])."""
    if isinstance(x, Image.Image):
        return x.convert("RGB")
    if isinstance(x, str | Path):
        try:
            return load_rgb(x)
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read image {x}: {e}") from None
    if isinstance(x, np.ndarray):
        a = x
        if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3, 4):
            a = np.moveaxis(a, 0, -1)  # CHW -> HWC
        if a.ndim == 3 and a.shape[-1] == 1:
            a = a[..., 0]
        if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
            raise DataError(f"an image array must be H x W or H x W x 3 (RGB), got shape {x.shape}")
        if a.dtype != np.uint8:
            if np.issubdtype(a.dtype, np.floating) and a.size and float(np.nanmax(a)) <= 1.0:
                a = a * 255.0
            a = np.clip(a, 0, 255).astype(np.uint8)
        return Image.fromarray(a).convert("RGB")
    raise DataError(f"cannot predict on a {type(x).__name__}: pass a path, a PIL image or a numpy array")


def _logit_shape(task: TaskSpec, rows: int) -> tuple[int, ...]:
    """The shape of a task's logits for `rows` images: one logit per image, or one per class."""
    return (rows,) if task.num_outputs == 1 else (rows, task.num_outputs)
