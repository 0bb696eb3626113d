"""evaluate(): metrics, confusion matrices, speed, wrong predictions, Grad-CAM and a report for any model."""

from __future__ import annotations

import itertools
import logging
import re
import shutil
from collections.abc import Iterable, Sequence
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
NOT_APPLICABLE = "not applicable"  # a decision whose condition is false by prediction


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


def decisions(flow: TaskFlow, outputs: Outputs, path: str) -> list[tuple[int, str | None, str | None]]:
    """(row, true class, predicted class) of every sample for classification task `path`. The truth is None where
    the task does not apply by ground truth, the prediction None where it does not apply by prediction."""
    task = flow.tasks[path]
    guesses = flow.predict(outputs.logits)[path]["value"]
    applies = flow.masks(outputs.targets)[path]
    return [
        (
            i,
            decision_name(task, outputs.targets[path][i]) if applies[i] else None,
            decision_name(task, guesses[i]),
        )
        for i in range(len(outputs.paths))
    ]


def wrong_predictions(flow: TaskFlow, outputs: Outputs) -> list[dict[str, Any]]:
    """Samples a classification task got wrong where it applies by ground truth: {i, path, task, true, predicted}."""
    rows: list[dict[str, Any]] = []
    for path, task in flow.tasks.items():
        if task.kind not in CLASSIFICATION:
            continue
        for i, truth, guess in decisions(flow, outputs, path):
            if truth is not None and guess != truth:
                rows.append(
                    {
                        "i": i,
                        "path": outputs.paths[i],
                        "task": path,
                        "true": truth,
                        "predicted": guess or NOT_APPLICABLE,
                    }
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


def caption(task: str, truth: str | None, guess: str | None, *, name_task: bool = False) -> str:
    """How a decision reads for people: "3, predicted 9"; with `name_task` (flows with several tasks)
    "door_open: no, predicted yes". A missing label reads "unlabelled", a false condition "not applicable"."""
    text = f"{truth or 'unlabelled'}, predicted {guess or NOT_APPLICABLE}"
    return f"{task}: {text}" if name_task else text


def round_robin(groups: Iterable[Sequence[int]]) -> list[int]:
    """The first of each group, then the second of each, ...: a short prefix covers as many groups as it can."""
    return [i for layer in itertools.zip_longest(*groups) for i in layer if i is not None]


def pick_examples(flow: TaskFlow, outputs: Outputs, path: str, count: int) -> list[dict[str, Any]]:
    """`count` samples to show for classification task `path`: {i, right, true, predicted} (`right` is None where
    the task does not apply by ground truth).

    Wrong decisions take up to half of the places (more when there are too few right ones), then right ones; each
    is taken in turn from every true class (class order, data order within a class), so a few examples span the
    classes instead of being the first files, which a sorted folder would make all one class. Samples the task
    does not apply to by ground truth come last. The choice is deterministic: the same split gives the same
    examples.
    """
    names = class_names(flow.tasks[path])
    wrong: dict[str, list[int]] = {name: [] for name in names}
    right: dict[str, list[int]] = {name: [] for name in names}
    rest: list[int] = []
    found: dict[int, dict[str, Any]] = {}
    for i, truth, guess in decisions(flow, outputs, path):
        ok = None if truth is None else guess == truth
        found[i] = {"i": i, "right": ok, "true": truth, "predicted": guess}
        if ok is None:
            rest.append(i)
        else:
            (right if ok else wrong)[truth].append(i)
    wrong_order, right_order = round_robin(wrong.values()), round_robin(right.values())
    n_wrong = min(len(wrong_order), max((count + 1) // 2, count - len(right_order)))
    order = wrong_order[:n_wrong] + right_order[: count - n_wrong]
    order += rest[: max(0, count - len(order))]
    return [found[i] for i in order]


def write_gradcams(loaded: LoadedModel, outputs: Outputs, folder: Path, count: int) -> list[dict[str, Any]]:
    """Grad-CAM pictures (the image and its overlay side by side, readable size, captioned) for `count` examples
    of the first classification task (`pick_examples`: wrong ones first, spread over the classes); PyTorch only."""
    if count <= 0 or loaded.torch_model is None:
        return []
    from headstart.evaluate.gradcam import grad_cam, side_by_side, target_layer

    flow = loaded.flow
    path = next((p for p, t in flow.tasks.items() if t.kind in CLASSIFICATION), None)
    if path is None:  # no classification task: the first task, in data order
        path = flow.leaf_paths[0]
        examples = [{"i": i, "right": None} for i in range(min(count, len(outputs.paths)))]
    else:
        examples = pick_examples(flow, outputs, path, count)
    name_task = len(flow.tasks) > 1
    folder.mkdir(parents=True, exist_ok=True)
    layer = target_layer(loaded.torch_model.backbone)  # found once for all the images
    written = []
    for k, example in enumerate(examples):
        i = example["i"]
        image = load_rgb(outputs.paths[i])
        if "true" in example:
            label = caption(path, example["true"], example["predicted"], name_task=name_task)
            truth, guess = example["true"] or "unlabelled", example["predicted"] or NOT_APPLICABLE
            stem = {
                True: f"right_{truth}",
                False: f"wrong_{truth}_predicted_{guess}",
                None: f"unlabelled_predicted_{guess}",
            }[example["right"]]
        else:
            label, stem = (path if name_task else ""), "image"
        cam = grad_cam(loaded.torch_model, image, task=path, layer=layer)
        file = folder / f"{k:02d}_{_safe(stem)}.png"
        side_by_side(image, cam, label).save(file)
        written.append(
            {"path": file, "image": outputs.paths[i], "label": label, "task": path, "right": example["right"]}
        )
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
        lines += [
            f"Where the backbone looked for task `{cams[0]['task']}`: each picture is the image (left) and the "
            "evidence for the predicted class over it (right; red: strong, blue: none). Wrong predictions first, "
            "then right ones, taken in turn from each true class.",
            "",
        ]
        headings = {False: "Wrong", True: "Right", None: "Other examples"}
        for right, group in itertools.groupby(cams, key=lambda c: c["right"]):
            lines += [f"### {headings[right]}", ""]
            for c in group:
                name = Path(c["image"]).name
                lines += [f"**{c['label']}** (`{name}`)" if c["label"] else f"`{name}`", ""]
                lines += [f"![{c['label'] or name}]({c['path'].relative_to(out)})", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)).strip("._") or "_"
