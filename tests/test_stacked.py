"""hydra/launcher=stacked: a DoF sweep's jobs that differ only in head and optimizer hyperparameters train as one stack
of heads, and every job still leaves the run directory it would leave alone."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import ROOT, compose_train, make_tree, run_script, shared_data
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from headstart.core.model import HeadstartModel
from headstart.data.features import FeatureDataModule
from headstart.dof import DofWriter
from headstart.train.stacked import StackedHeads, Stopping
from headstart.train.stacking import group_key, why_not_stacked

FLOW = {"tasks": {"label": {"kind": "multiclass", "classes": ["a", "b"]}}}


def test_hydra_finds_the_stacked_launcher_in_this_install():
    # Hydra 1.3 lists the hydra_plugins namespace's folders; an install that hides them (a mapped editable install)
    # loses the launcher with "Unknown plugin class" only when a sweep starts.
    from hydra.core.plugins import Plugins
    from hydra.plugins.launcher import Launcher

    assert "StackedLauncher" in [c.__name__ for c in Plugins.instance().discover(Launcher)]


# --- which jobs stack ---------------------------------------------------------------------------------------------


def test_jobs_group_by_everything_but_their_head_and_optimizer_values():
    a = ["optimizer.lr=0.1", "model.dropout=0.2", "data.root=x", "seed=1"]
    b = ["optimizer.lr=0.01", "model.dropout=0.0", "data.root=x", "seed=2"]
    assert group_key(a) == group_key(b) == ("data.root=x",)
    assert group_key(["optimizer.lr=0.1", "data.root=y"]) != group_key(a)
    assert group_key(["optimizer.lr=0.1", "backbone=resnet18"]) != group_key(["optimizer.lr=0.1"])
    stackable = ["model.hidden=[128]", "+model.label_smoothing=0.1", "++optimizer.weight_decay=0", "seed=3"]
    assert group_key(stackable) == ()


def test_what_cannot_stack_says_why(tmp_path):
    features = ["experiment=digits", "features=true"]
    assert why_not_stacked(compose_train(features, tmp_path)) is None
    cases = {
        "features=false": "images",
        "tune.lr_find=true": "lr_find",
        "trainer.devices=2": "several devices",
        "resume=latest": "checkpoint",
        "train=false": "do not train",
    }
    for override, reason in cases.items():
        assert reason in why_not_stacked(compose_train([*features, override], tmp_path)), override


# --- the stack itself, on a small synthetic set -----------------------------------------------------------------


@pytest.fixture(scope="module")
def feature_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A separable two-class DoF set: 512 train rows of 16 features, 128 val, 128 test."""
    root = tmp_path_factory.mktemp("stack") / "set"
    rng = np.random.default_rng(0)
    writer = DofWriter(root, {"flow": FLOW, "transform": None, "samples": {}})
    for split, n in (("train", 512), ("val", 128), ("test", 128)):
        labels = rng.integers(0, 2, n)
        features = (rng.standard_normal((n, 16)) + labels[:, None] * 0.8).astype(np.float32)
        writer.write_shard(
            split,
            0,
            {
                "features": features,
                "index": np.arange(n),
                "view": np.zeros(n, np.int16),
                "target.label": labels.astype(np.float32),
            },
        )
    writer.finalize({})
    return root


def _head(seed: int, dropout: float = 0.0) -> HeadstartModel:
    L.seed_everything(seed, verbose=False)
    return HeadstartModel(flow=FLOW, feature_dim=16, head={"hidden": [8], "dropout": dropout})


def _fit(feature_set: Path, heads: list, lrs: list, epochs: int = 4, **kwargs) -> StackedHeads:
    datamodule = FeatureDataModule(feature_set, batch_size=64, seed=0)
    stack = StackedHeads(
        heads,
        lrs=lrs,
        weight_decays=[1e-2] * len(heads),
        make_optimizer=lambda params: torch.optim.AdamW(params),
        make_scheduler=lambda optimizer: torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs),
        **kwargs,
    )
    trainer = L.Trainer(
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(stack, datamodule=datamodule)
    return stack


def test_each_head_learns_in_the_stack_exactly_as_it_learns_alone(feature_set):
    stack = _fit(feature_set, [_head(1), _head(2), _head(3)], lrs=[1e-2, 3e-3, 1e-3])
    alone = _fit(feature_set, [_head(2)], lrs=[3e-3])
    for (name, a), b in zip(
        stack.heads[1].state_dict().items(), alone.heads[0].state_dict().values(), strict=True
    ):
        assert torch.allclose(a, b, atol=1e-6), name
    assert stack.states[1].history == alone.states[0].history  # every epoch's metrics and the learning rate
    history = stack.states[0].history
    assert sorted(history) == [0, 1, 2, 3]
    assert history[3]["val/label/acc"] > 0.75  # it learned the separable set
    lrs = [history[e]["lr-AdamW"] for e in range(4)]
    assert lrs[0] == pytest.approx(1e-2) and lrs == sorted(lrs, reverse=True)  # its own cosine schedule


def test_best_weights_early_stopping_and_divergence_are_per_head(feature_set):
    broken = _head(3)
    with torch.no_grad():
        next(broken.head.parameters()).fill_(float("nan"))
    heads = [_head(1), _head(2), broken]
    # val/loss "max" stops a learning head after one epoch without an increase; "min" would keep it going
    stack = _fit(
        feature_set,
        heads,
        lrs=[1e-2, 1e-2, 1e-2],
        epochs=5,
        monitor="val/loss",
        mode="min",
        stopping=Stopping(monitor="val/loss", mode="max", patience=1),
    )
    learner, stopped, diverged = stack.states
    assert (
        stopped.stopped_epoch == 1 and learner.stopped_epoch == 1
    )  # both stop: the check is per head, not shared
    assert diverged.failure is not None and "diverged" in diverged.failure
    assert diverged.best_weights is None and torch.isnan(next(stack.heads[2].head.parameters())).all()

    stack = _fit(
        feature_set,
        [_head(1), _head(2)],
        lrs=[1e-2, 0.0],
        epochs=4,
        monitor="val/loss",
        mode="min",
        stopping=Stopping(monitor="val/loss", mode="min", patience=2),
    )
    learner, frozen = stack.states
    assert (
        learner.stopped_epoch is None and learner.best_epoch == 3
    )  # kept improving: all epochs, best the last
    assert frozen.stopped_epoch == 2 and frozen.best_epoch == 0  # lr 0: never better than its first epoch
    assert sorted(frozen.history) == [0, 1, 2]  # nothing recorded after it stopped
    before = {k: v.clone() for k, v in stack.heads[0].state_dict().items()}
    stack.use_best()
    assert all(
        torch.equal(before[k], v) for k, v in stack.heads[0].state_dict().items()
    )  # the last was the best


# --- as users run it --------------------------------------------------------------------------------------------


def _sweep(tmp_path: Path, name: str = "digits") -> Path:
    (sweep,) = list((tmp_path / "multirun" / name).iterdir())
    return sweep


@pytest.mark.slow
def test_a_grid_sweep_stacks_and_each_job_keeps_its_run_directory(tmp_path):
    grid = ["optimizer.lr=1e-3,1e-2", "model.dropout=0.0,0.2"]
    common = ["experiment=digits", "features=true", "trainer.max_epochs=3", "data.num_workers=0"]
    common.append("trainer.log_every_n_steps=1")
    result = run_script(
        ["train.py", "-m", *common, "hydra/launcher=stacked", *grid, f"paths.root_dir={tmp_path}"], cwd=ROOT
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout + result.stderr
    assert "jobs 0, 1, 2, 3 train as one stack of 4 heads" in out
    sweep = _sweep(tmp_path)
    summary = pd.read_csv(sweep / "summary.csv")
    assert len(summary) == 4 and (summary["status"] == "ok").all()
    assert (sweep / "best_experiment.yaml").is_file()
    shipped = []
    for job in ("0", "1", "2", "3"):
        run = sweep / job
        overrides = dict(o.split("=", 1) for o in OmegaConf.load(run / ".hydra" / "overrides.yaml"))
        metrics = json.loads((run / "metrics.json").read_text())
        assert {"val/loss", "test/label/acc", "cost/params", "cost/macs", "dof/benefit_ratio"} <= set(metrics)
        assert metrics["cost/macs"] > 0 and 0 < metrics["dof/benefit_ratio"] < 1
        assert (run / "val_metrics.md").is_file() and (run / "test_metrics.csv").is_file()
        cost = json.loads((run / "cost.json").read_text())
        model = HeadstartModel.from_checkpoint(run / "checkpoints" / "best.ckpt")  # alone, weights_only
        assert model.hparams.head["dropout"] == float(overrides["model.dropout"])
        assert model.run_config["optimizer"]["lr"] == float(overrides["optimizer.lr"])
        events = EventAccumulator(str(run / "tensorboard"))
        events.Reload()
        assert len(events.Scalars("curves/loss/val")) == 3 and len(events.Scalars("lr/AdamW")) == 3
        steps = [e.step for e in events.Scalars("steps/loss/train")]  # every log_every_n_steps (1), as alone
        assert steps == list(range(len(steps))) and len(steps) % 3 == 0 and len(steps) >= 3
        per_epoch = (
            len(steps) // 3
        )  # charted where a job alone charts them: epoch ends, and lr at epoch starts
        assert [e.step for e in events.Scalars("curves/loss/val")] == [
            per_epoch * (e + 1) - 1 for e in range(3)
        ]
        assert [e.step for e in events.Scalars("lr/AdamW")] == [per_epoch * e for e in range(3)]
        assert len(events.Scalars("time/train_epoch_s")) == 3
        assert "trained side by side with 3 other jobs" in (run / "train.log").read_text()
        if (run / "checkpoints" / "image_model.ckpt").is_file():
            shipped.append(job)
            assert (run / "model.onnx").is_file() and (run / "bundle").is_dir()
            assert cost["latency"]["onnx"]["p50_ms"] > 0  # the shipped job's export is timed, as alone
        else:
            assert "latency" not in cost
    best = str(summary.iloc[0]["job"])
    assert shipped == [best]  # the stack's best job ships; the others keep their head checkpoints


@pytest.mark.slow
def test_a_stacked_job_reaches_the_test_accuracy_of_the_same_job_alone(dog_cat_small_dof, tmp_path):
    """On real photos and a pretrained backbone: a job of a stack and the same job trained alone (same seed) agree
    within a point of test accuracy."""
    root = shared_data("dog_cat_small")
    common = [
        "experiment=dog_cat_dof",
        f"data.root={root}",
        f"extract.path={dog_cat_small_dof}",  # extracted once per session (conftest)
        "trainer.max_epochs=8",
        "export.onnx=false",
        "cost.latency=false",
        "data.num_workers=0",
        f"paths.root_dir={tmp_path}",
    ]
    result = run_script(
        ["train.py", "-m", *common, "hydra/launcher=stacked", "optimizer.lr=1e-3,3e-3"], cwd=ROOT
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = pd.read_csv(_sweep(tmp_path, "dog_cat_dof") / "summary.csv")
    stacked = summary[summary["optimizer.lr"] == 3e-3].iloc[0]
    alone = tmp_path / "alone"
    result = run_script(["train.py", *common, "optimizer.lr=3e-3", f"hydra.run.dir={alone}"], cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    alone_acc = json.loads((alone / "metrics.json").read_text())["test/label/acc"]
    assert alone_acc >= 0.9  # a real model, not two chance-level ones
    assert abs(alone_acc - stacked["test/label/acc"]) <= 0.01, (alone_acc, stacked["test/label/acc"])


@pytest.mark.slow
def test_an_optuna_search_stacks_each_batch_of_trials(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    args = [
        "train.py",
        "-m",
        "hparams_search=digits_optuna",
        "features=true",
        "hydra/launcher=stacked",
        "hydra.sweeper.n_trials=4",
        "hydra.sweeper.n_jobs=2",
        "trainer.max_epochs=2",
        "data.num_workers=0",
        f"paths.root_dir={tmp_path}",
    ]
    result = run_script(args, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout + result.stderr
    assert (
        "jobs 0, 1 train as one stack of 2 heads" in out and "jobs 2, 3 train as one stack of 2 heads" in out
    )
    sweep = _sweep(tmp_path)
    summary = pd.read_csv(sweep / "summary.csv")
    assert len(summary) == 4 and (summary["status"] == "ok").all()
    results = OmegaConf.load(sweep / "optimization_results.yaml")
    assert summary.iloc[0]["val/loss"] == pytest.approx(
        results.best_value, rel=1e-6
    )  # the sweeper got each value
    assert out.count("checked on stored samples") == 1  # the re-attach check: once per set and backbone


@pytest.mark.slow
def test_jobs_on_images_run_one_by_one_and_it_says_so_once(tmp_path):
    data = tmp_path / "data"
    make_tree(data, {"train": {"a": 8, "b": 8}})
    args = [
        "train.py",
        "-m",
        "experiment=digits",
        "data=folder",
        f"data.root={data}",
        "data.num_workers=0",
        "trainer.max_epochs=1",
        "logger={}",
        "export.onnx=false",
        "hydra/launcher=stacked",
        "optimizer.lr=1e-3,1e-2",
        f"paths.root_dir={tmp_path}",
    ]
    result = run_script(args, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout + result.stderr
    assert out.count("jobs run one by one, as the basic launcher runs them, where they train on images") == 1
    summary = pd.read_csv(_sweep(tmp_path) / "summary.csv")
    assert len(summary) == 2 and (summary["status"] == "ok").all()


def test_a_groups_jobs_get_the_config_hydra_composes_for_them(tmp_path):
    from hydra import compose, initialize_config_dir

    from headstart.train import stacking
    from hydra_plugins.headstart_launcher.stacked_launcher import derived_config

    common = ["experiment=dog_cat_dof", f"paths.root_dir={tmp_path}"]
    first = [*common, "optimizer.lr=0.001", "model.hidden=[]", "seed=1"]
    other = [*common, "optimizer.lr=0.01", "model.hidden=[128,64]", "seed=7"]
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        composed_first = compose("train", overrides=first, return_hydra_config=True)
        composed_other = compose("train", overrides=other, return_hydra_config=True)
    derived = derived_config(composed_first, first, other, stacking)
    assert derived is not None
    assert list(derived.hydra.overrides.task) == other
    assert derived.hydra.job.override_dirname == composed_other.hydra.job.override_dirname

    def job(
        config,
    ):  # what the job's task sees (paths interpolate hydra's runtime directory: resolved per job)
        return {k: v for k, v in OmegaConf.to_container(config).items() if k not in ("hydra", "paths")}

    assert job(derived) == job(composed_other)
    # another set of stackable keys, or a deletion: composed as usual
    assert derived_config(composed_first, first, [*common, "optimizer.lr=0.01"], stacking) is None
