"""Loggers: none (logger=null), CSV, several at once, and the optional MLflow and W&B extras (skipped when absent)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import ROOT, compose_train, run_script

from headstart.cli import null_groups_as_deletions
from headstart.errors import ConfigError
from headstart.train.config import validate_train_config
from headstart.train.loggers import build_loggers

# Short digits runs: one epoch of a few batches, no latency timing.
SHORT = ["trainer.max_epochs=1", "+trainer.limit_train_batches=4", "cost.latency=false", "data.num_workers=0"]


def _train(args: list[str], tmp_path: Path, digits_root: Path) -> Path:
    result = run_script(
        ["train.py", *args, *SHORT, f"paths.root_dir={tmp_path}", f"paths.data_dir={digits_root}"], cwd=ROOT
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = sorted(p.parent for p in tmp_path.glob("outputs/*/*/.hydra"))
    assert (run / "metrics.json").is_file() and (run / "checkpoints" / "best.ckpt").is_file()
    return run


def test_group_null_on_the_command_line_is_a_deletion():
    conf = ROOT / "conf"
    args = ["logger=null", "callbacks=null", "ckpt_path=null", "logger.tensorboard=null", "+x=null", "y=null"]
    assert null_groups_as_deletions(args, conf) == [
        "~logger",
        "~callbacks",
        "ckpt_path=null",
        "logger.tensorboard=null",
        "+x=null",
        "y=null",
    ]


@pytest.mark.parametrize("option, extra", [("mlflow", "mlflow"), ("wandb", "wandb")])
def test_a_logger_without_its_extra_names_the_install_command(option, extra, tmp_path, monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    cfg = compose_train([f"logger=[csv,{option}]"], tmp_path)
    with pytest.raises(ConfigError, match=rf"logger\.{option} .*pip install -e '\.\[{extra}\]'"):
        validate_train_config(cfg)


@pytest.mark.slow
def test_tensorboard_and_csv_at_once(tmp_path, digits_root):
    run = _train(["logger=[tensorboard,csv]", "export.onnx=false"], tmp_path, digits_root)
    assert any((run / "tensorboard").glob("events.*"))
    rows = pd.read_csv(run / "csv" / "metrics.csv")
    assert rows["val/loss"].notna().any() and rows["train/loss"].notna().any()
    assert rows["cost/params"].notna().any()  # logged after testing: the loggers are flushed at the end
    assert (run / "csv" / "hparams.yaml").is_file()


@pytest.mark.slow
def test_logger_null_trains_and_ships_without_logging(tmp_path, digits_root):
    run = _train(["logger=null"], tmp_path, digits_root)
    assert not (run / "tensorboard").exists() and not (run / "csv").exists()
    assert "val/loss" in json.loads((run / "metrics.json").read_text())
    assert (run / "bundle").is_dir()


@pytest.mark.slow  # creating the SQLite store takes its migrations (some 10 s)
def test_mlflow_logs_to_a_local_store_under_the_output_root(tmp_path):
    pytest.importorskip("mlflow")
    cfg = compose_train(["logger=mlflow"], tmp_path)
    validate_train_config(cfg)
    (tmp_path / "outputs").mkdir()
    (logger,) = build_loggers(cfg)
    logger.log_metrics({"val/loss": 0.5}, step=1)
    logger.finalize("success")
    assert (tmp_path / "outputs" / "mlflow.db").is_file()
    history = logger.experiment.get_metric_history(logger.run_id, "val/loss")
    assert [m.value for m in history] == [0.5]
    assert logger.experiment.get_run(logger.run_id).data.tags["run_dir"] == str(tmp_path / "run")


@pytest.mark.slow  # wandb starts its service process
def test_wandb_logs_offline_under_the_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):  # wandb's own files
        monkeypatch.setenv(name, str(tmp_path / "wandb_home"))
    cfg = compose_train(["logger=wandb"], tmp_path)
    validate_train_config(cfg)
    (logger,) = build_loggers(cfg)
    logger.log_metrics({"val/loss": 0.5}, step=1)
    logger.experiment.finish()
    (offline,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    assert any(offline.glob("*.wandb"))
