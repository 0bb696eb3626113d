"""What a run shows in TensorBoard: the learning curves on the first screen, one-off numbers out of the way, and an
HParams table of the hyperparameters a person tunes.

TensorBoard's Time Series dashboard groups charts by the first part of their tag, sorts the groups alphabetically
and opens the first ones. headstart's metric names (`val/loss`, `train/label/acc`: what `monitor.metric`,
metrics.json and the console use) are kept everywhere else; only TensorBoard sees them regrouped by
`tensorboard_tag`:

    curves/   loss and each task's headline metric (acc; mae for regression; the monitored metric), train and val
              side by side: `curves/label/acc/train`, `curves/label/acc/val`, `curves/loss/train`, ...
    lr/       the learning rate of each parameter group (Lightning's `lr-AdamW` as `lr/AdamW`)
    metrics/  every other per-epoch metric (f1, top-k, end-to-end accuracy of conditional tasks, per-task losses)
    steps/    the per-step training loss
    summary/  one value per run: the final val and test metrics, cost (params, MACs, latency), the DoF benefit;
              also HParams' metric columns and the `summary` text
    time/, tune/  epoch wall times, the learning-rate finder
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from headstart.serve.plain import plain
from headstart.train.reproduce import model_overrides

SPLITS = ("train", "val")
CURVE_METRICS = ("loss", "acc", "mae")
# Groups of one value per run: under summary/, which sorts after the curves.
ONE_OFF_GROUPS = ("test", "cost", "dof")
# The hyperparameters a person tunes (column: config key). HParams lists the columns by name and ticks the first five:
# augment, backbone, base_lr, batch_size, dropout. base_lr: the head's learning rate (a fine-tuned backbone's is
# base_lr x finetune.backbone_lr_ratio).
TUNED = {
    "base_lr": "optimizer.lr",
    "weight_decay": "optimizer.weight_decay",
    "batch_size": "data.batch_size",
    "backbone": "backbone.name",
    "freeze": "backbone.freeze",
    "trainable_stages": "backbone.trainable_stages",
    "hidden": "model.hidden",
    "dropout": "model.dropout",
    "label_smoothing": "model.label_smoothing",
    "epochs": "trainer.max_epochs",
    "seed": "seed",
}
MAX_HPARAMS = 25
# Keys a command line or sweep sets that say how or where a run ran, not what it trains: no HParams column.
NOT_TUNED = ("name", "tags", "ckpt_path", "resume", "train", "test", "monitor.metric", "monitor.mode")
NOT_TUNED_PREFIXES = (
    "logger.",
    "callbacks.",
    "cost.",
    "export.",
    "extract.",
    "tune.",
    "trainer.limit_",
    "trainer.fast_dev_run",
    "trainer.devices",
    "trainer.accelerator",
    "trainer.num_nodes",
    "trainer.strategy",
    "trainer.enable_",
    "trainer.log_every_n_steps",
    "trainer.check_val_every_n_epoch",
    "trainer.default_root_dir",
    "data.num_workers",
    "data.pin_memory",
    "data.root",
    "data.csv",
    "data.on_bad_image",
)


def tensorboard_tag(name: str, headline: str | None = None) -> str:
    """The tag a metric is shown under in TensorBoard (see the module doc). `headline`: the monitored metric
    (`val/label/f1`), drawn with the curves."""
    if name.startswith("summary/"):
        return name
    if name.startswith("lr-"):
        return "lr/" + name[len("lr-") :]
    split, _, rest = name.partition("/")
    if split in SPLITS and rest:
        if rest.endswith("_step"):
            return f"steps/{rest[: -len('_step')]}/{split}"
        headline_rest = headline.partition("/")[2] if headline else None
        group = "curves" if rest.rsplit("/", 1)[-1] in CURVE_METRICS or rest == headline_rest else "metrics"
        return f"{group}/{rest}/{split}"
    if split == "final":
        return "summary/" + rest
    if split in ONE_OFF_GROUPS:
        return "summary/" + name
    return name


def metric_name(tag: str) -> str:
    """The metric a TensorBoard tag shows: the inverse of `tensorboard_tag` for the per-epoch and per-step metrics
    and the learning rates (`curves/loss/val` -> `val/loss`); any other tag (and a run logged before this layout) as
    it is."""
    group, _, rest = tag.partition("/")
    body, _, split = rest.rpartition("/")
    if group in ("curves", "metrics") and body and split in SPLITS:
        return f"{split}/{body}"
    if group == "steps" and body and split in SPLITS:
        return f"{split}/{body}_step"
    if group == "lr" and rest:
        return "lr-" + rest
    return tag


class CurvesTensorBoardLogger(TensorBoardLogger):
    """Lightning's TensorBoardLogger with headstart's layout: tags regrouped by `tensorboard_tag`, and without
    Lightning's `epoch` scalar (a staircase chart; the x axis is the step)."""

    def __init__(self, *args: Any, headline: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.headline = headline

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        shown = {tensorboard_tag(k, self.headline): v for k, v in metrics.items() if k != "epoch"}
        if shown:
            super().log_metrics(shown, step)

    @rank_zero_only
    def log_hyperparams(self, params: Any, metrics: dict[str, Any] | None = None) -> None:
        if metrics is not None:
            metrics = {tensorboard_tag(k, self.headline): v for k, v in metrics.items()}
        super().log_hyperparams(params, metrics)


def tuned_hyperparameters(cfg: DictConfig, overrides: list[str] | None = None) -> dict[str, Any]:
    """At most 25 hyperparameters a person tunes, as HParams columns: learning rate (base_lr), weight decay, batch size,
    backbone, freeze and fine-tuning schedule, head widths, dropout, label smoothing, augmentation, epochs, seed,
    optimizer, scheduler, features, plus every other key a sweep or the command line set that changes the model
    (`overrides`: Hydra's task overrides, `key=value`; not where or how the run ran: paths, loggers, export, ...). Values are numbers or strings (a bool as "true"/"false": TensorBoard shows a
    Python bool as 0.0000)."""
    # Not the whole config: `notify` may hold ${oc.env:...} secrets that must never be resolved into a log.
    config = {str(k): plain(cfg[k]) for k in cfg if k not in ("hydra", "paths", "notify")}
    out: dict[str, Any] = {}
    for column, key in TUNED.items():
        found, value = _lookup(config, key)
        if found:
            out[column] = value
    if config.get("features"):
        out["batch_size"] = _lookup(config, "extract.train_batch_size")[1]
    out["finetune"] = _choice(config.get("finetune"))
    out["augment"] = _choice(_lookup(config, "data.augment")[1])
    out["optimizer"] = _choice(config.get("optimizer"))
    out["scheduler"] = _choice(config.get("scheduler"))
    out["features"] = bool(config.get("features"))
    known = set(TUNED.values())
    for override in model_overrides(overrides or []):
        key, sep, _ = override.lstrip("+~").partition("=")
        if not sep or key in known or key in NOT_TUNED or key.startswith(NOT_TUNED_PREFIXES):
            continue
        found, value = _lookup(config, key)
        if found and key not in out:
            out[key] = value if not isinstance(value, dict) else _choice(value)
        if len(out) >= MAX_HPARAMS:
            break
    return {k: _shown(v) for k, v in list(out.items())[:MAX_HPARAMS]}


def _lookup(config: dict, key: str) -> tuple[bool, Any]:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _choice(node: Any) -> str:
    """A config section as one word: its class (`AdamW`, `CosineAnnealingLR`), its classes joined for a list of
    transforms, or "none"."""
    if node is None or node == [] or node == {}:
        return "none"
    if isinstance(node, list):
        return "+".join(_choice(n) for n in node)
    if isinstance(node, dict):
        target = node.get("_target_") or node.get("name")
        return str(target).rsplit(".", 1)[-1] if target else "custom"
    return str(node)


def _shown(value: Any) -> float | int | str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | str):
        return value
    if value is None:
        return "none"
    return str(value)
