"""Figures for people: confusion matrices and prediction grids.

Built with matplotlib's object API (no pyplot): no global state, no display, nothing to close.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from matplotlib.figure import Figure


def confusion_figure(matrix: torch.Tensor | np.ndarray, classes: Sequence[str], title: str = "") -> Figure:
    """Counts per (true, predicted) cell; rows are the truth."""
    m = np.asarray(matrix.cpu() if isinstance(matrix, torch.Tensor) else matrix)
    n = len(classes)
    size = max(3.0, 0.45 * n + 1.5)
    fig = Figure(figsize=(size, size))
    ax = fig.subplots()
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(n), labels=classes, rotation=45, ha="right")
    ax.set_yticks(range(n), labels=classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    threshold = m.max() / 2 if m.size else 0
    for i in range(n):
        for j in range(n):
            ax.text(
                j,
                i,
                int(m[i, j]),
                ha="center",
                va="center",
                color="white" if m[i, j] > threshold else "black",
            )
    fig.tight_layout()
    return fig


def prediction_grid(
    images: torch.Tensor, truths: Sequence[str], predictions: Sequence[str], columns: int = 4
) -> Figure:
    """images float[N,3,H,W] in [0,1]; titles show the prediction, green when right, red when wrong."""
    n = images.shape[0]
    rows = max(1, int(np.ceil(n / columns)))
    # Small panels, large titles: TensorBoard shows a figure scaled down to its card (about 330 px wide).
    fig = Figure(figsize=(1.7 * columns, 1.95 * rows))
    axes = fig.subplots(rows, columns, squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= n:
            continue
        ax.imshow(images[k].permute(1, 2, 0).cpu().numpy())
        right = truths[k] == predictions[k]
        ax.set_title(
            f"{predictions[k]}" + ("" if right else f" (true {truths[k]})"),
            color="green" if right else "red",
            fontsize=15,
        )
    fig.tight_layout()
    return fig
