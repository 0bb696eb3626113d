"""evaluate(): metrics, confusion matrices, speed, wrong predictions, Grad-CAM and a report for any model."""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig

from headstart.data import load_rgb
from headstart.errors import DataError
from headstart.evaluate.loading import LoadedModel, load_model, model_datamodule
from headstart.flow import FlowMetrics, TaskFlow
from headstart.runs import write_json
from headstart.tables import markdown_table
from headstart.train.reports import task_metrics_table, write_task_tables
from headstart.visuals import confusion_figure

log = logging.getLogger(__name__)

CLASSIFICATION = ("binary", "multiclass")


@dataclass
class Outputs:
    """Everything the model said about one split, in data order."""

    index: torch.Tensor  # rows of the data's sample table
    paths: list[str]
    logits: dict[str, torch.Tensor]
    targets: dict[str, torch.Tensor]
    metrics: dict[str, float]


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Evaluate `cfg.model` on `cfg.split` of its data; write the evaluation folder; return the metrics."""
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_model(cfg.model, cfg.runtime, cfg.threads, work_dir=out, base=cfg.get("base"))
    datamodule = model_datamodule(cfg.get("data"), loaded, split=cfg.split)
    outputs = run_split(loaded, datamodule, cfg.split)

    metrics = outputs.metrics
    kinds = {p: t.kind for p, t in loaded.flow.tasks.items()}
    write_json(out / "metrics.json", metrics)
    write_task_tables(metrics, cfg.split, kinds, out)
    confusions = write_confusions(loaded.flow, outputs, out / "confusion")
    wrong = copy_wrong(loaded.flow, outputs, out / "wrong", limit=cfg.wrong.limit) if cfg.wrong.copy else []
    speed = measure(loaded, outputs.paths, cfg.speed)
    write_json(out / "speed.json", speed)
    cams = write_gradcams(loaded, outputs, out / "gradcam", cfg.gradcam)
    report = write_report(out, cfg, loaded, outputs, confusions, wrong, speed, cams)
    log.info("evaluation of %s on %s (%d images): %s", cfg.model, cfg.split, len(outputs.paths), report)
    log.info("metrics: %s", {k: round(v, 4) for k, v in metrics.items() if not k.endswith("/count")})
    return metrics


# ---- data -----------------------------------------------------------------------------------------------------------


def run_split(loaded: LoadedModel, datamodule: L.LightningDataModule, split: str) -> Outputs:
    """Run the model over one split: metrics (the same FlowMetrics as training) and every sample's logits."""
    flow = loaded.flow
    metrics = FlowMetrics(flow)
    frame_paths = datamodule.table.frame["path"].astype(str).to_numpy()
    index, logits, targets = [], {p: [] for p in flow.leaf_paths}, {p: [] for p in flow.leaf_paths}
    for batch in datamodule.dataloader(split):
        if batch is None:
            continue
        out = loaded.runner(batch["inputs"])
        _, per_task = flow.loss(out, batch["targets"])
        metrics.update(out, batch["targets"], per_task)
        index.append(batch["index"])
        for p in flow.leaf_paths:
            logits[p].append(out[p])
            targets[p].append(batch["targets"][p])
    if not index:
        raise DataError(f"split {split!r} has no readable images to evaluate")
    values = {f"{split}/{k}": float(v) for k, v in metrics.compute().items()}
    idx = torch.cat(index)
    return Outputs(
        index=idx,
        paths=[frame_paths[i] for i in idx.tolist()],
        logits={p: torch.cat(v) for p, v in logits.items()},
        targets={p: torch.cat(v) for p, v in targets.items()},
        metrics=values,
    )


# ---- pictures and files ---------------------------------------------------------------------------------------------


def class_names(task) -> list[str]:
    return list(task.classes) if task.kind == "multiclass" else ["no", "yes"]


def decision_name(task, value: torch.Tensor) -> str | None:
    """The class name of a decoded value or target of a classification task; None when it is NaN."""
    if torch.isnan(value):
        return None
    index = int(value > 0.5) if task.kind == "binary" else int(value)
    return class_names(task)[index]


def confusion_matrices(flow: TaskFlow, outputs: Outputs) -> dict[str, np.ndarray]:
    """Counts per (true, predicted) class of each binary and multiclass task, on the samples where it applies by
    ground truth and by prediction (the others are counted in `e2e_acc` and listed among the wrong ones)."""
    predicted = flow.predict(outputs.logits)
    masks = flow.masks(outputs.targets)
    out: dict[str, np.ndarray] = {}
    for path, task in flow.tasks.items():
        if task.kind not in CLASSIFICATION:
            continue
        names = class_names(task)
        value = predicted[path]["value"]
        rows = masks[path] & ~torch.isnan(value)
        truth, guess = outputs.targets[path][rows], value[rows]
        if task.kind == "binary":
            truth, guess = truth > 0.5, guess > 0.5
        matrix = np.zeros((len(names), len(names)), dtype=np.int64)
        np.add.at(matrix, (truth.long().numpy(), guess.long().numpy()), 1)
        out[path] = matrix
    return out


def write_confusions(flow: TaskFlow, outputs: Outputs, folder: Path) -> dict[str, Path]:
    """One PNG per binary and multiclass task."""
    written: dict[str, Path] = {}
    for path, matrix in confusion_matrices(flow, outputs).items():
        folder.mkdir(parents=True, exist_ok=True)
        fig = confusion_figure(matrix, class_names(flow.tasks[path]), title=path)
        written[path] = folder / f"{_safe(path)}.png"
        fig.savefig(written[path], dpi=100)
    return written


def wrong_predictions(flow: TaskFlow, outputs: Outputs) -> list[dict[str, Any]]:
    """Samples a classification task got wrong where it applies by ground truth: {i, path, task, true, predicted}."""
    predicted = flow.predict(outputs.logits)
    masks = flow.masks(outputs.targets)
    rows: list[dict[str, Any]] = []
    for path, task in flow.tasks.items():
        if task.kind not in CLASSIFICATION:
            continue
        for i in torch.nonzero(masks[path]).flatten().tolist():
            truth = decision_name(task, outputs.targets[path][i])
            guess = decision_name(task, predicted[path]["value"][i]) or "not_applicable"
            if guess != truth:
                rows.append(
                    {"i": i, "path": outputs.paths[i], "task": path, "true": truth, "predicted": guess}
                )
    return rows


def copy_wrong(
    flow: TaskFlow, outputs: Outputs, folder: Path, limit: int | None = None
) -> list[dict[str, Any]]:
    """Copy wrongly predicted images to `wrong/<true>__as__<predicted>/` (`wrong/<task>/...` for several tasks)."""
    rows = wrong_predictions(flow, outputs)
    multi = len(flow.tasks) > 1
    for row in rows if limit is None else rows[:limit]:
        pair = f"{_safe(row['true'])}__as__{_safe(row['predicted'])}"
        target = folder / _safe(row["task"]) / pair if multi else folder / pair
        target.mkdir(parents=True, exist_ok=True)
        src = Path(row["path"])
        dest = target / f"{row['i']:05d}_{src.name}"
        shutil.copyfile(src, dest)
        row["copy"] = str(dest.relative_to(folder.parent))
    if rows:
        import pandas as pd

        pd.DataFrame(rows).to_csv(folder.parent / "wrong.csv", index=False)
    return rows


def write_gradcams(loaded: LoadedModel, outputs: Outputs, folder: Path, count: int) -> list[dict[str, Any]]:
    """Grad-CAM overlays for `count` images (wrong ones first) of the first classification task; PyTorch only."""
    if count <= 0 or loaded.torch_model is None:
        return []
    from headstart.evaluate.gradcam import grad_cam, overlay

    flow = loaded.flow
    path = next((p for p, t in flow.tasks.items() if t.kind in CLASSIFICATION), flow.leaf_paths[0])
    task = flow.tasks[path]
    wrong = [r["i"] for r in wrong_predictions(flow, outputs) if r["task"] == path]
    order = list(dict.fromkeys(wrong[: (count + 1) // 2] + list(range(len(outputs.paths)))))[:count]
    predicted = flow.predict(outputs.logits)[path]["value"]
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for k, i in enumerate(order):
        image = load_rgb(outputs.paths[i])
        label = ""
        if task.kind in CLASSIFICATION:
            truth = decision_name(task, outputs.targets[path][i]) or "unlabelled"
            label = f"{truth}__as__{decision_name(task, predicted[i]) or 'not_applicable'}"
        file = folder / f"{k:02d}_{_safe(label or 'image')}.png"
        overlay(image, grad_cam(loaded.torch_model, image, task=path)).save(file)
        written.append({"path": file, "image": outputs.paths[i], "label": label, "task": path})
    return written


def measure(loaded: LoadedModel, paths: list[str], opts: DictConfig) -> dict[str, Any]:
    """Batch-1 latency and batch-N throughput of the runtime actually used, on real preprocessed images."""
    from headstart.core.transforms import eval_transform
    from headstart.speed import machine_info, measure_speed, torch_threads

    t = eval_transform(loaded.transform)
    images = torch.stack([t(load_rgb(p)) for p in paths[: min(len(paths), opts.throughput_batch)]])

    def make_batch(n: int) -> torch.Tensor:
        reps = -(-n // len(images))
        return images.repeat(reps, 1, 1, 1)[:n].contiguous()

    runner = loaded.runner
    with torch_threads(runner.threads):
        speed = measure_speed(
            runner,
            make_batch,
            latency_batch=1,
            throughput_batch=int(opts.throughput_batch),
            min_runs=int(opts.min_runs),
            min_seconds=float(opts.min_seconds),
        )
    return {**speed, "machine": machine_info(runner.threads, runner.runtime)}


# ---- the report -----------------------------------------------------------------------------------------------------


def write_report(
    out: Path,
    cfg: DictConfig,
    loaded: LoadedModel,
    outputs: Outputs,
    confusions: dict[str, Path],
    wrong: list[dict[str, Any]],
    speed: dict[str, Any],
    cams: list[dict[str, Any]],
) -> Path:
    from headstart.speed import format_speed

    kinds = {p: t.kind for p, t in loaded.flow.tasks.items()}
    table = task_metrics_table(outputs.metrics, cfg.split, kinds)
    lines = [
        f"# Evaluation: {cfg.model}",
        "",
        f"- model: `{loaded.source}` ({loaded.kind}), runtime **{loaded.runner.runtime}**, "
        f"{loaded.runner.threads} threads",
        f"- data: split `{cfg.split}`, {len(outputs.paths)} images",
        f"- loss: {outputs.metrics.get(f'{cfg.split}/loss', float('nan')):.4f}",
        "",
        "## Metrics per task",
        "",
        "On the samples where each task applies by ground truth; `e2e_acc` also counts the flow's decisions.",
        "",
        markdown_table(table.fillna("")) if not table.empty else "(no task had labelled samples)",
        "",
        "## Speed",
        "",
        format_speed(speed, speed["machine"]),
        "",
    ]
    if confusions:
        lines += ["## Confusion matrices", ""]
        lines += [f"![{p}]({path.relative_to(out)})" for p, path in confusions.items()]
        lines.append("")
    lines += ["## Wrong predictions", ""]
    if not cfg.wrong.copy:
        lines.append("Not copied (wrong.copy=false).")
    elif not wrong:
        lines.append("None: every classification decision was right.")
    else:
        import pandas as pd

        counts = pd.DataFrame(wrong).groupby(["task", "true", "predicted"]).size().reset_index(name="images")
        lines += [
            f"{len(wrong)} wrong decisions; the images are copied under `wrong/` (list: `wrong.csv`).",
            "",
            markdown_table(counts.sort_values("images", ascending=False)),
        ]
    lines.append("")
    lines += ["## Grad-CAM", ""]
    if loaded.torch_model is None:
        lines.append(
            "Not available: Grad-CAM needs gradients, and this model is ONNX only (evaluate the .ckpt)."
        )
    elif not cams:
        lines.append("Off (gradcam=0).")
    else:
        lines.append(f"Where the backbone looked for task `{cams[0]['task']}` (wrong predictions first).")
        lines.append("")
        lines += [
            f"![{c['label']}]({c['path'].relative_to(out)}) `{Path(c['image']).name}` {c['label']}"
            for c in cams
        ]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)).strip("._") or "_"
