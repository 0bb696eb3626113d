"""Sweeps as users run them: an Optuna search (hydra-optuna-sweeper), parallel jobs (hydra-joblib-launcher),
submitit (local; SLURM configured), and the sweep summary with the best job as a ready-to-run experiment file."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from conftest import ROOT, compose_train, fake_job, make_tree, run_script
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from headstart.train.sweeps import BEST_EXPERIMENT, best_experiment_text, summarize_sweep

# Tiny folder data, one epoch of a few batches, nothing shipped: the machinery, not the model, is under test.
FAST = [
    "experiment=digits",
    "data=folder",
    "data.num_workers=0",
    "trainer.max_epochs=1",
    "logger={}",
    "export.onnx=false",
]


def _data(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    make_tree(data, {"train": {"a": 8, "b": 8}})
    return data


def _sweep_dir(tmp_path: Path, name: str = "digits") -> Path:
    (sweep,) = list((tmp_path / "multirun" / name).iterdir())
    return sweep


def _compose_experiment(experiment_file: Path, tmp_path: Path, extra: list[str] | None = None):
    """Compose train.yaml with `experiment_file` as a user's conf/experiment/<name>.yaml."""
    search = tmp_path / "user_conf"
    (search / "experiment").mkdir(parents=True, exist_ok=True)
    (search / "experiment" / "picked.yaml").write_text(experiment_file.read_text())
    return compose_train(
        ["experiment=picked", f"hydra.searchpath=[file://{search}]", *(extra or [])], tmp_path
    )


# --- the best job as an experiment file (no plugin needed) ----------------------------------------------------


def test_best_experiment_reproduces_the_best_jobs_groups_and_values(tmp_path):
    sweep = tmp_path / "sweep"
    common = ["experiment=digits", f"paths.root_dir={tmp_path}", "data.num_workers=0"]
    fake_job(
        sweep / "0",
        tmp_path,
        [*common, "optimizer=sgd", "optimizer.lr=0.05", "model.hidden=[32,16]", "model.dropout=0.25"],
        {"val/loss": 0.5, "val/label/acc": 0.9},
    )
    fake_job(
        sweep / "1",
        tmp_path,
        [*common, "optimizer=adamw", "optimizer.lr=0.5", "model.hidden=[]", "model.dropout=0.0"],
        {"val/loss": 0.9, "val/label/acc": 0.6},
    )
    table = summarize_sweep(sweep)
    assert list(table["job"]) == ["0", "1"]
    text = (sweep / BEST_EXPERIMENT).read_text()
    assert text.startswith("# @package _global_\n")
    assert "override /optimizer: sgd" in text and "paths" not in text.split("\n", 3)[-1]

    cfg = _compose_experiment(sweep / BEST_EXPERIMENT, tmp_path)
    assert cfg.optimizer._target_ == "torch.optim.SGD"
    assert cfg.optimizer.lr == 0.05
    assert list(cfg.model.hidden) == [32, 16]
    assert cfg.model.dropout == 0.25
    assert cfg.name == "digits_best"
    assert cfg.backbone.name == "small_cnn"  # from the base experiment


def test_best_experiment_skips_failed_jobs(tmp_path):
    sweep = tmp_path / "sweep"
    common = ["experiment=digits", f"paths.root_dir={tmp_path}"]
    fake_job(sweep / "0", tmp_path, [*common, "optimizer.lr=0.1"], {})  # failed: no metrics
    fake_job(sweep / "1", tmp_path, [*common, "optimizer.lr=0.2"], {"val/loss": 1.0})
    summarize_sweep(sweep)
    assert "lr: 0.2" in (sweep / BEST_EXPERIMENT).read_text()
    assert "(job 1, val/loss = 1)" in best_experiment_text(sweep / "1")


def test_search_configs_compose(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose("train", overrides=["hparams_search=dog_cat_optuna"], return_hydra_config=True)
    assert cfg.name == "dog_cat_dof" and cfg.features is True  # the search runs on DoF features
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
    assert cfg.hydra.sweeper.direction == "minimize" and cfg.hydra.sweeper.storage is None
    assert set(cfg.hydra.sweeper.params) >= {"optimizer.lr", "model.dropout", "model.hidden"}
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose(
            "train", overrides=["hparams_search=digits_optuna", "monitor.mode=max"], return_hydra_config=True
        )
    assert cfg.hydra.sweeper.direction == "maximize"


# --- Optuna ------------------------------------------------------------------------------------------------------


def _multirun(tmp_path: Path, data: Path, overrides: list[str], fast: list[str] = FAST):
    """`train.py -m <overrides>` on the tiny data, as a user runs it; the finished process and its sweep directory."""
    result = run_script(
        ["train.py", "-m", *overrides, *fast, f"data.root={data}", f"paths.root_dir={tmp_path}"], cwd=ROOT
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result, _sweep_dir(tmp_path)


def test_optuna_search_summary_and_best_experiment(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    data = _data(tmp_path)
    _, sweep = _multirun(tmp_path, data, ["hparams_search=digits_optuna", "hydra.sweeper.n_trials=2"])
    results = OmegaConf.load(sweep / "optimization_results.yaml")
    summary = pd.read_csv(sweep / "summary.csv")
    assert len(summary) == 2 and (summary["status"] == "ok").all()
    assert {"optimizer.lr", "model.dropout"} <= set(summary.columns)
    best = summary.iloc[0]
    # the sweeper's best is the summary's
    assert best["val/loss"] == pytest.approx(results.best_value, rel=1e-6)
    assert best["optimizer.lr"] == pytest.approx(results.best_params["optimizer.lr"])

    cfg = _compose_experiment(sweep / BEST_EXPERIMENT, tmp_path)
    job = OmegaConf.load(sweep / str(best["job"]) / ".hydra" / "config.yaml")
    assert cfg.optimizer.lr == job.optimizer.lr == pytest.approx(results.best_params["optimizer.lr"])
    assert cfg.model.dropout == job.model.dropout
    assert list(cfg.model.hidden) == list(job.model.hidden)
    assert cfg.data.root == str(data) and cfg.trainer.max_epochs == 1
    assert cfg.export.onnx is False  # given on the command line, so part of the best job


# --- launchers ---------------------------------------------------------------------------------------------------


def test_joblib_runs_optuna_trials_in_parallel_processes_with_the_default_data_workers(tmp_path):
    """As users run it: data.num_workers stays at its default (2 loader workers inside each joblib process), and
    with debug=fast_dev_run the summary agrees with Optuna's results (every finished trial is "ok")."""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    data = _data(tmp_path)
    result, sweep = _multirun(
        tmp_path,
        data,
        [
            "hparams_search=digits_optuna",
            "hydra/launcher=joblib",
            "hydra.launcher.n_jobs=2",
            "hydra.sweeper.n_jobs=2",
            "hydra.sweeper.n_trials=2",
            "debug=fast_dev_run",
        ],
        fast=[o for o in FAST if not o.startswith("data.num_workers")],
    )
    assert "Joblib.Parallel(n_jobs=2" in result.stdout + result.stderr
    summary = pd.read_csv(sweep / "summary.csv")
    assert len(summary) == 2 and (summary["status"] == "ok").all()
    results = OmegaConf.load(sweep / "optimization_results.yaml")
    assert summary["val/loss"].min() == pytest.approx(results.best_value, rel=1e-6)


def test_submitit_local_runs_jobs(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    data = _data(tmp_path)
    _, sweep = _multirun(tmp_path, data, ["hydra/launcher=submitit_local", "optimizer.lr=1e-3"])
    assert (sweep / ".submitit").is_dir()
    summary = pd.read_csv(sweep / "summary.csv")
    assert len(summary) == 1 and (summary["status"] == "ok").all()
    assert (sweep / BEST_EXPERIMENT).is_file()


def test_slurm_launcher_config(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose(
            "train",
            overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.partition == "gpu" and launcher.gpus_per_node == 1 and launcher.tasks_per_node == 1
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        stock = compose("train", overrides=["hydra/launcher=submitit_slurm"], return_hydra_config=True)
    assert stock.hydra.launcher._target_.endswith("SlurmLauncher")
