"""The learning-rate finder (`tune.lr_find=true`): Lightning's range test before training.

The optimizer's learning rate rises from `tune.min_lr` to `tune.max_lr` over `tune.num_training` steps; the
suggestion is where the loss falls fastest. The model, optimizer, loops and random state are put back afterwards,
so a run that applies the suggestion trains exactly as a run started with `optimizer.lr=<suggestion>` would.
"""

from __future__ import annotations

import functools
import logging
import random
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BaseFinetuning
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.tuner import Tuner
from matplotlib.figure import Figure
from omegaconf import DictConfig, OmegaConf

from headstart.core.model import HeadstartModel
from headstart.errors import ConfigError

log = logging.getLogger(__name__)

# The suggestion skips the first 10 and the last loss value (as Lightning's) and needs two left for a slope.
SKIPPED = 10
MIN_POINTS = SKIPPED + 3


def check_tune_config(cfg: DictConfig) -> None:
    """Raise ConfigError for a `tune` section that cannot work; called before any work is done."""
    tune = cfg.get("tune")
    if tune is None or not tune.lr_find:  # extract.py's config has no tune section
        return
    if not 0 < tune.min_lr < tune.max_lr:
        raise ConfigError(
            f"tune.min_lr and tune.max_lr must satisfy 0 < min_lr < max_lr, got {tune.min_lr} and {tune.max_lr}"
        )
    if tune.num_training < 1:
        raise ConfigError(
            f"tune.num_training must be at least 1 (steps of the range test), got {tune.num_training}"
        )
    if cfg.get("ckpt_path") or cfg.get("resume"):
        raise ConfigError(
            "tune.lr_find=true finds a starting learning rate for a new model, but this run continues from a "
            "checkpoint whose optimizer state sets the learning rate; drop ckpt_path/resume or tune.lr_find"
        )
    if "ddp" in str((cfg.get("trainer") or {}).get("strategy", "")).lower():
        raise _distributed_error()


def find_lr(
    cfg: DictConfig, trainer: L.Trainer, model: HeadstartModel, datamodule: L.LightningDataModule
) -> dict[str, float]:
    """Run the range test when `cfg.tune.lr_find`; apply the suggestion (`cfg.tune.apply`) to the model's optimizer
    hyperparameters, the run's config and `cfg.optimizer.lr`. Writes `lr_find.png` into the run directory and a
    TensorBoard figure. Returns `tune/lr_suggested` (when there is one) and `tune/lr` (the learning rate training
    starts from) for metrics.json; nothing when the finder is off or skipped."""
    opts = cfg.tune
    if not opts.lr_find:
        return {}
    if trainer.fast_dev_run:
        log.info("tune.lr_find skipped: fast_dev_run runs one batch and nothing else")
        return {}
    if trainer.world_size > 1:
        raise _distributed_error()
    configured = model.hparams.optimizer.get("lr")
    with _kept_random_state(trainer.strategy.root_device.type == "cuda"), _training_steps_only(trainer):
        finder = Tuner(trainer).lr_find(
            model,
            datamodule=datamodule,
            min_lr=float(opts.min_lr),
            max_lr=float(opts.max_lr),
            num_training=int(opts.num_training),
            update_attr=False,
        )
    for metrics in model.metrics.values():  # the range test's steps must not count towards the first epoch
        metrics.reset()
    model.epoch_results.clear()
    for callback in trainer.callbacks:
        # The finder restores every callback's state from its checkpoint, which a fine-tuning schedule
        # (BaseFinetuning) takes for a resumed run: it would keep the optimizer's single group instead of giving the
        # backbone its own. Training starts fresh.
        if isinstance(callback, BaseFinetuning):
            callback._restarting = False
    lrs, losses = list(finder.results.get("lr", [])), list(finder.results.get("loss", []))
    suggestion = _suggestion(finder, len(lrs), opts, configured)
    applied = bool(opts.apply and suggestion is not None)
    if applied:
        _apply(cfg, model, suggestion)
    used = suggestion if applied else configured
    fig = lr_figure(lrs, losses, suggestion, configured, applied)
    path = Path(cfg.paths.output_dir) / "lr_find.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    values = {"tune/lr_suggested": suggestion} if suggestion is not None else {}
    if used is not None:
        values["tune/lr"] = float(used)
    _log(trainer.loggers, fig, values)
    return values


def _suggestion(finder: Any, points: int, opts: DictConfig, configured: float | None) -> float | None:
    """Lightning's suggestion, logged with what happens next; None with the reason when there is none."""
    keep = f"keeping the configured optimizer.lr={configured}"
    if points < MIN_POINTS:
        stopped = points < int(opts.num_training)
        why = (
            "the loss diverged early (lower tune.max_lr)"
            if stopped
            else f"raise tune.num_training (now {opts.num_training}) to at least {MIN_POINTS}"
        )
        log.warning(
            "learning-rate finder: no suggestion, only %d loss values recorded (a suggestion needs %d): %s; %s",
            points,
            MIN_POINTS,
            why,
            keep,
        )
        return None
    suggestion = steepest_descent_lr(finder.results["lr"], finder.results["loss"])
    if suggestion is None:
        log.warning("learning-rate finder: no suggestion (the recorded losses are not finite); %s", keep)
        return None
    suggestion = float(suggestion)
    then = (
        f"training with it (configured {configured})"
        if opts.apply
        else f"not applied (tune.apply=false), {keep}"
    )
    log.info(
        "learning-rate finder: suggested lr %.3g from %d steps between %g and %g; %s",
        suggestion,
        points,
        opts.min_lr,
        opts.max_lr,
        then,
    )
    return suggestion


def steepest_descent_lr(lrs: list[float], losses: list[float]) -> float | None:
    """The learning rate where the smoothed loss falls fastest per decade of learning rate, skipping the first
    `SKIPPED` points and the last; None without two finite points.

    Lightning's `suggestion()` takes the slope against the learning rate itself. The range test spaces rates
    exponentially, so that slope shrinks the low end's steps and picks rates far below the steepest part of the
    curve as the eye reads it on its log axis (Lightning-AI/pytorch-lightning#21141: on digits 5e-4 where the curve
    falls fastest near 1e-2). Against log10(lr) every step counts alike."""
    lr = np.asarray(lrs[SKIPPED:-1], dtype=np.float64)
    loss = np.asarray(losses[SKIPPED:-1], dtype=np.float64)
    finite = np.isfinite(loss) & (lr > 0)
    if finite.sum() < 2:
        return None
    lr, loss = lr[finite], loss[finite]
    slope = np.gradient(loss, np.log10(lr))
    return float(lr[int(np.argmin(slope))])


def _apply(cfg: DictConfig, model: HeadstartModel, lr: float) -> None:
    """Train with `lr`: the model's optimizer is rebuilt with it and its hyperparameters (which checkpoints record) say so; the
    run's config (checkpoints, bundle, TensorBoard's HPARAMS) says the same."""
    model.hparams.optimizer = {**model.hparams.optimizer, "lr": lr}
    if model.make_optimizer is not None:
        model.use_optimizer(functools.partial(model.make_optimizer, lr=lr), model.make_scheduler)
    if model.run_config is not None and isinstance(model.run_config.get("optimizer"), dict):
        model.run_config["optimizer"] = {**model.run_config["optimizer"], "lr": lr}
    OmegaConf.update(cfg, "optimizer.lr", lr, force_add=True)


def lr_figure(
    lrs: list[float], losses: list[float], suggestion: float | None, configured: float | None, applied: bool
) -> Figure:
    """Loss against learning rate (log scale), the suggestion as a red dot and the configured lr as a dashed line."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.plot(lrs, losses)
    if len(lrs) > SKIPPED:
        ax.axvspan(lrs[0], lrs[SKIPPED], color="0.92", label="not used by the suggestion")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss (smoothed)")
    if configured is not None:
        ax.axvline(
            float(configured), color="gray", linestyle="--", label=f"configured {float(configured):.3g}"
        )
    if suggestion is not None:
        i = (
            lrs.index(suggestion)
            if suggestion in lrs
            else int(np.argmin(np.abs(np.log(lrs) - np.log(suggestion))))
        )
        label = f"suggested {suggestion:.3g}" + (" (applied)" if applied else " (not applied)")
        ax.plot([lrs[i]], [losses[i]], "o", color="red", markersize=8, label=label)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    ax.set_title("learning-rate finder" + ("" if suggestion is not None else ": no suggestion"))
    fig.tight_layout()
    return fig


def _log(loggers: list[Logger], fig: Figure, values: dict[str, float]) -> None:
    for logger in loggers:
        if values:
            logger.log_metrics(values, step=0)
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_figure("tune/lr_find", fig, global_step=0)
            logger.experiment.flush()


def _distributed_error() -> ConfigError:
    return ConfigError(
        "tune.lr_find=true runs in one process only, not under trainer=ddp (several processes); find the rate in a "
        "single-process run (add tune.apply=false to only report it), then pass optimizer.lr=<suggestion> to the "
        "DDP run"
    )


@contextmanager
def _kept_random_state(cuda: bool) -> Iterator[None]:
    """Put Python's, NumPy's and torch's random generators back as they were: the range test draws from them
    (shuffling, augmentation, dropout), and training should not depend on whether it ran."""
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    cuda_states = torch.cuda.get_rng_state_all() if cuda else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


@contextmanager
def _training_steps_only(trainer: L.Trainer) -> Iterator[None]:
    """Let the range test take `num_training` steps whatever `trainer.max_epochs` is (a DoF set at batch 1024 may
    hold one batch per epoch), without validating between its epochs (it reads the training loss only)."""
    loop = trainer.fit_loop
    max_epochs, every = loop.max_epochs, trainer.check_val_every_n_epoch
    loop.max_epochs, trainer.check_val_every_n_epoch = -1, sys.maxsize
    try:
        yield
    finally:
        loop.max_epochs, trainer.check_val_every_n_epoch = max_epochs, every
