"""The model zoo from real runs: two tiny digits runs (a plain run of a user's experiment, and a sweep job with one
more override) listed with the configs that reproduce them, and --verify re-measuring them."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import ROOT
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from headstart.tools.remeasure import moved_metrics
from headstart.tools.zoo import main

TINY = """# @package _global_
defaults:
  - digits
name: zoo_tiny
trainer:
  max_epochs: 1
  limit_train_batches: 4
data:
  num_workers: 0
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A user's config dir with experiment zoo_tiny; run `plain` is `experiment=zoo_tiny` alone, run `swept` is job 0
    of `-m experiment=zoo_tiny model.hidden=[32] export.onnx=false` (no ONNX, no bundle: less to wait for); plus a
    folder of another script's run and an unfinished run. The two train.py processes run side by side, each in its
    own root (outputs/, multirun/, data/)."""
    root = tmp_path_factory.mktemp("zoo")
    conf = root / "user_conf"
    (conf / "experiment").mkdir(parents=True)
    (conf / "experiment" / "zoo_tiny.yaml").write_text(TINY)
    jobs = {"a": ([], []), "b": (["-m"], ["model.hidden=[32]", "export.onnx=false"])}
    started = [
        subprocess.Popen(
            [sys.executable, "train.py", *flags, "--config-dir", str(conf), *_overrides(root / name, extra)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, (flags, extra) in jobs.items()
    ]
    for process in started:
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, err[-3000:]
    (plain,) = (root / "a" / "outputs" / "zoo_tiny").iterdir()
    (swept,) = (root / "b" / "multirun" / "zoo_tiny").glob("*/0")
    # Not zoo entries: an evaluate.py run (it writes metrics.json too) and a run that never finished.
    other = root / "a" / "outputs" / "evaluate" / "2026-01-01_00-00-00"
    shutil.copytree(plain / ".hydra", other / ".hydra")
    hydra_yaml = other / ".hydra" / "hydra.yaml"
    hydra_yaml.write_text(hydra_yaml.read_text().replace("    name: train\n", "    name: evaluate\n"))
    (other / "metrics.json").write_text("{}")
    shutil.copytree(plain / ".hydra", root / "a" / "outputs" / "zoo_tiny" / "unfinished" / ".hydra")
    return {
        "conf": conf,
        "plain": plain,
        "swept": swept,
        "outputs": root / "a" / "outputs",
        "multirun": root / "b" / "multirun",
    }


def _overrides(root: Path, extra: list[str]) -> list[str]:
    return ["experiment=zoo_tiny", f"paths.root_dir={root}", *extra]


def _zoo(tmp_path: Path, dirs: list[Path], *flags: str) -> tuple[int, pd.DataFrame | None, Path]:
    out = tmp_path / "zoo"
    code = main([*(str(d) for d in dirs), "--out", str(out), *flags])
    table = pd.read_csv(out / "zoo.csv", keep_default_na=False) if (out / "zoo.csv").is_file() else None
    return code, table, out


def _row(table: pd.DataFrame, run: Path, out: Path) -> pd.Series:
    (row,) = [r for _, r in table.iterrows() if (out / r["run"]).resolve() == run.resolve()]
    return row


@pytest.mark.slow
def test_zoo_lists_both_runs_with_their_configs(runs, tmp_path, capsys):
    code, table, out = _zoo(tmp_path, [runs["outputs"], runs["multirun"]])
    assert code == 0
    assert len(table) == 2 and set(table["experiment"]) == {"zoo_tiny"}
    said = capsys.readouterr().out
    assert "skipped 2 folders" in said and "evaluate.py run" in said and "no metrics.json" in said

    plain, swept = _row(table, runs["plain"], out), _row(table, runs["swept"], out)
    # experiment=zoo_tiny alone: its own experiment file; with model.hidden=[32]: a ready experiment file
    assert (out / plain["config"]).resolve() == (runs["conf"] / "experiment" / "zoo_tiny.yaml").resolve()
    assert swept["config"] == f"zoo_configs/{swept['id']}.yaml" and (out / swept["config"]).is_file()
    assert (out / plain["bundle"] / "model.onnx").is_file() and (out / plain["onnx"]).is_file()
    assert swept["bundle"] == swept["onnx"] == ""  # export.onnx=false: nothing to point at
    for row, run in ((plain, runs["plain"]), (swept, runs["swept"])):
        assert (out / row["checkpoint"]).resolve() == (run / "checkpoints" / "best.ckpt").resolve()
        assert any((out / row["tensorboard"]).glob("events.out.tfevents.*"))
        metrics = json.loads((run / "metrics.json").read_text())
        assert row["monitor"] == "val/loss" and row["monitor_value"] == pytest.approx(metrics["val/loss"])
        assert row["test_acc"] == pytest.approx(metrics["test/label/acc"])
        assert row["test_loss"] == pytest.approx(metrics["test/loss"]) and row["trained_on"] == "images"
        assert row["params"] == metrics["cost/params"] and row["macs"] == metrics["cost/macs"]
    md = (out / "zoo.md").read_text()
    assert f"[{swept['id']}.yaml]({swept['config']})" in md and f"[bundle]({plain['bundle']})" in md


@pytest.mark.slow
def test_written_experiment_composes_to_the_run(runs, tmp_path):
    _, table, out = _zoo(tmp_path, [runs["multirun"]])
    (row,) = table.to_dict("records")
    search = tmp_path / "search"
    (search / "experiment").mkdir(parents=True)
    shutil.copy(out / row["config"], search / "experiment" / f"{row['id']}.yaml")
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose(
            "train",
            overrides=[
                f"experiment={row['id']}",
                f"hydra.searchpath=[file://{search},file://{runs['conf']}]",
            ],
        )
    composed = OmegaConf.to_container(cfg, resolve=False)
    ran = OmegaConf.to_container(OmegaConf.load(runs["swept"] / ".hydra" / "config.yaml"), resolve=False)
    del composed["paths"], ran["paths"]  # where it ran (paths.root_dir) is not part of the model
    assert composed == ran
    assert cfg.model.hidden == [32] and cfg.trainer.limit_train_batches == 4 and cfg.export.onnx is False


@pytest.mark.slow
def test_verify_passes_untouched_runs_and_flags_a_tampered_metric(runs, tmp_path, capsys):
    code, table, _ = _zoo(tmp_path / "untouched", [runs["outputs"]], "--verify")
    assert code == 0
    assert list(table["verify"]) == [
        "ok (12 metrics)"
    ]  # val and test: loss, acc, f1, top3_acc, e2e_acc, count

    copy = tmp_path / "copy" / "2026-01-01_00-00-00"
    shutil.copytree(runs["swept"], copy)
    metrics = json.loads((copy / "metrics.json").read_text())
    metrics["test/label/acc"] += 0.01
    (copy / "metrics.json").write_text(json.dumps(metrics))
    capsys.readouterr()
    code, table, out = _zoo(tmp_path / "tampered", [copy.parent], "--verify")
    assert code == 1
    (verdict,) = table["verify"]
    assert verdict.startswith("MOVED: test/label/acc ") and verdict.count("->") == 1
    assert f"verify {table['id'][0]}: MOVED: test/label/acc" in capsys.readouterr().out
    assert "MOVED: test/label/acc" in (out / "zoo.md").read_text()


def test_a_folder_without_runs_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty" / "notes").mkdir(parents=True)
    assert main([str(tmp_path / "empty"), "--out", str(tmp_path)]) == 2
    assert "no finished train.py runs under" in capsys.readouterr().err
    assert main([str(tmp_path / "absent"), "--out", str(tmp_path)]) == 2
    assert "absent: no such folder" in capsys.readouterr().err
    assert not (tmp_path / "zoo.md").exists()


def test_moved_metrics_tolerance_nan_and_missing():
    recorded = {
        "val/loss": 2.0,
        "test/label/acc": 0.5,
        "test/label/f1": None,
        "test/x/mae": 0.1,
        "dof/saved": 1.0,
    }
    now = {"val/loss": 2.0001, "test/label/acc": 0.5002, "test/label/f1": math.nan}
    moved = {m.metric: m for m in moved_metrics(recorded, now, tolerance=1e-4)}
    # loss: relative above 1 (1e-4 * 2 > 1e-4 moved); acc: absolute; NaN equals null; dof/ is not re-measured
    assert set(moved) == {"test/label/acc", "test/x/mae"}
    assert moved["test/x/mae"].now is None and "not measured" in str(moved["test/x/mae"])
    assert moved_metrics(recorded, {**now, "test/x/mae": 0.1}, tolerance=1e-3) == []
