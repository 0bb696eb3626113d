"""Trust, tried the way a careless or hostile user would: model files that name code, runs that diverge, runs
started in the same second, data with nothing to learn, failures that must end clean, and the ways Lightning and
Hydra users run several processes."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pandas as pd
import pytest
import torch
from conftest import ROOT, compose_train, fake_job, make_tree, run_script
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from headstart.core.model import HeadstartModel
from headstart.data import folder_table, make_security
from headstart.dof import open_dof
from headstart.entry import run_guarded
from headstart.errors import ConfigError, DataError, DivergedError
from headstart.evaluate.evaluation import evaluate
from headstart.prune.recipe import prune
from headstart.runs import FAILED, UniqueRunDir, claim_run_dir, recorded_config
from headstart.serve.plain import plain
from headstart.ship.bundle import describe_image_model, write_bundle
from headstart.ship.export import export_onnx
from headstart.tools.zoo import main as zoo_main
from headstart.train.callbacks import DivergenceGuard
from headstart.train.extract import extract, frozen_backbone
from headstart.train.reattach import attach_backbone, check_reattached, save_model
from headstart.train.recipe import build_callbacks, check_finite_checkpoint, train
from headstart.train.sweeps import BEST_EXPERIMENT, summarize_sweep

OPTIMIZER = {"_target_": "torch.optim.AdamW", "_partial_": True}
FLOW = {"tasks": {"label": {"kind": "multiclass", "classes": ["a", "b"]}}}
SCRIPTS = ("train", "extract", "evaluate", "predict", "prune")


def _compose(config: str, overrides: list[str], out: Path):
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        return compose(config, overrides=[f"paths.root_dir={out}", f"paths.output_dir={out}", *overrides])


def _run_dirs(base: Path) -> list[Path]:
    return sorted(p.parent for p in base.glob("outputs/*/*/.hydra"))


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("trust") / "imgs"
    make_tree(root, {"train": {"a": 6, "b": 6}, "val": {"a": 2, "b": 2}, "test": {"a": 2, "b": 2}})
    return root


def _image_model() -> HeadstartModel:
    torch.manual_seed(0)
    return HeadstartModel(
        flow=FLOW, optimizer=OPTIMIZER, backbone={"name": "small_cnn", "weights": None}
    ).eval()


# ---- 1. a model file never makes headstart run code ---------------------------------------------------------------


def _hostile(images: Path, tmp_path: Path) -> tuple[dict, Path]:
    """A recorded config whose data.root is a call of shutil.copyfile, and the file that call would write."""
    target = tmp_path / "written_by_the_model_file"
    data = {
        "_target_": "headstart.data.FolderDataModule",
        "root": {
            "_target_": "shutil.copyfile",
            "_args_": [str(images / "train" / "a" / "a_000.png"), str(target)],
        },
        "num_workers": 0,
    }
    return {"name": "hostile", "data": data}, target


def test_evaluate_py_runs_no_code_named_in_a_checkpoint(images, tmp_path):
    record, target = _hostile(images, tmp_path)
    model = _image_model()
    model.run_config = record
    ckpt = save_model(model, tmp_path / "hostile.ckpt")
    assert torch.load(ckpt, weights_only=True)["headstart_config"] == record  # a checkpoint anyone can write

    result = run_script(
        ["evaluate.py", f"model={ckpt}", "runtime=pytorch", f"paths.root_dir={tmp_path}"], cwd=ROOT
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "never runs code named in one" in result.stderr or "plain data only" in result.stderr
    assert "data=folder data.root=" in result.stderr and "Traceback" not in result.stderr
    assert not target.exists()
    assert not (tmp_path / "outputs" / "evaluate").exists()  # the failed evaluation left no folder


def test_no_entry_point_runs_code_named_in_a_model_file(images, tmp_path):
    record, target = _hostile(images, tmp_path)
    whole = {
        "name": "hostile",
        "data": {"_target_": "shutil.copyfile", "_args_": record["data"]["root"]["_args_"]},
    }
    model = _image_model()
    golden = torch.rand(2, 3, 32, 32)
    bundle = write_bundle(model, tmp_path / "bundle", golden, config=record)  # SHA256SUMS cover the record
    onnx = export_onnx(model, tmp_path / "model.onnx", metadata=describe_image_model(model, whole))
    model.run_config = record
    ckpt = save_model(model, tmp_path / "hostile.ckpt")

    for source in (bundle, onnx):
        with pytest.raises(ConfigError, match=r"never runs code|plain data only"):
            evaluate(_compose("evaluate", [f"model={source}"], tmp_path / "eval"))
    with pytest.raises(ConfigError, match=r"plain data only"):
        prune(_compose("prune", [f"model={ckpt}", "trainer.accelerator=cpu"], tmp_path / "prune"))

    # the zoo's --verify measures a run again from what its checkpoint records
    run = tmp_path / "runs" / "2026-01-01_00-00-00"
    fake_job(run, tmp_path, ["experiment=digits", f"paths.root_dir={tmp_path}"], {"val/loss": 1.0})
    hydra_yaml = OmegaConf.load(run / ".hydra" / "hydra.yaml")
    hydra_yaml.hydra.job.name = "train"  # what train.py records
    OmegaConf.save(hydra_yaml, run / ".hydra" / "hydra.yaml")
    (run / "checkpoints").mkdir()
    save_model(model, run / "checkpoints" / "best.ckpt")
    assert zoo_main([str(tmp_path / "runs"), "--verify", "--out", str(tmp_path / "zoo")]) == 1
    assert "plain data only" in (tmp_path / "zoo" / "zoo.md").read_text()

    # a DoF set's manifest is read, never built: an injected object is refused as an edit of the manifest
    make_tree(tmp_path / "few", {"train": {"a": 2, "b": 2}, "val": {"a": 1, "b": 1}})
    overrides = ["data=folder", f"data.root={tmp_path / 'few'}", "extract.progress=false"]
    dof_path = extract(compose_train(overrides, tmp_path / "x", config="extract"))
    manifest = json.loads((dof_path / "manifest.json").read_text())
    manifest["meta"]["flow"]["tasks"]["label"] = record["data"]["root"]
    (dof_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"manifest\.json of DoF set .* was edited"):
        train(compose_train([*overrides, "features=true"], tmp_path / "x"))

    # a sweep job's recorded config is read into best_experiment.yaml, never built
    sweep = tmp_path / "sweep"
    fake_job(sweep / "0", tmp_path, ["experiment=digits", f"paths.root_dir={tmp_path}"], {"val/loss": 1.0})
    config = OmegaConf.load(sweep / "0" / ".hydra" / "config.yaml")
    config.data.root = record["data"]["root"]
    OmegaConf.save(config, sweep / "0" / ".hydra" / "config.yaml")
    summarize_sweep(sweep)
    assert (sweep / BEST_EXPERIMENT).is_file()
    assert not target.exists()


def test_a_checkpoints_recorded_optimizer_is_never_built(images, tmp_path):
    model = _image_model()
    model.hparams.optimizer = {"_target_": "shutil.rmtree", "path": str(images)}
    model = HeadstartModel.from_checkpoint(save_model(model, tmp_path / "m.ckpt"))
    with pytest.raises(ConfigError, match="never builds the optimizer recorded"):
        model.configure_optimizers()
    model.use_optimizer(functools.partial(torch.optim.AdamW, lr=0.01))
    assert isinstance(model.configure_optimizers(), torch.optim.AdamW)
    assert images.is_dir()


def test_a_model_records_its_paths_absolute_as_they_were_given(tmp_path, monkeypatch):
    """Read from another working directory (a notebook's kernel runs in notebooks/), the recorded data is the same
    files; and not normalized, so a rebuilt sample table (the DoF fingerprint) has the very same paths."""
    monkeypatch.chdir(tmp_path)
    cfg = compose_train(["data=folder", "data.root=../imgs", "paths.root_dir=."], tmp_path)
    record = recorded_config(cfg)
    assert record["data"]["root"] == str(tmp_path / ".." / "imgs")
    assert record["paths"]["data_dir"] == str(tmp_path / "data") and "hydra" not in record


# ---- 3. a diverged run ships nothing ------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_diverging_run_stops_with_one_message_and_ships_nothing(tmp_path):
    make_tree(tmp_path / "imgs", {"train": {"a": 12, "b": 12}})
    result = run_script(
        [
            "train.py",
            "data=folder",
            f"data.root={tmp_path / 'imgs'}",
            "data.batch_size=4",
            "optimizer.lr=1e12",
            "export.onnx=false",
            "trainer.max_epochs=2",
            "+trainer.limit_train_batches=6",
            "data.num_workers=0",
            f"paths.root_dir={tmp_path}",
        ],
        cwd=ROOT,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "training diverged" in result.stderr and "optimizer.lr (now 1e+12)" in result.stderr
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.rglob("metrics.json")) and not list(tmp_path.rglob("best.ckpt"))


class _Features(L.LightningDataModule):
    """Two batches of features per split; `bad` puts a NaN into the second training or validation batch."""

    def __init__(self, bad: str) -> None:
        super().__init__()
        self.bad = bad

    def _batches(self, split: str) -> list[dict]:
        g = torch.Generator().manual_seed(0)
        out = []
        for i in range(2):
            x = torch.randn(8, 4, generator=g)
            if split == self.bad and i == 1:
                x[0, 0] = float("nan")
            out.append({"inputs": x, "targets": {"label": (x[:, 1] > 0).float()}, "index": torch.arange(8)})
        return out

    def train_dataloader(self):
        return DataLoader(self._batches("train"), batch_size=None)

    def val_dataloader(self):
        return DataLoader(self._batches("val"), batch_size=None)


def _fit(bad: str, guard: DivergenceGuard, tmp_path: Path) -> tuple[HeadstartModel, L.Trainer]:
    model = HeadstartModel(flow=FLOW, feature_dim=4)
    model.use_optimizer(functools.partial(torch.optim.AdamW, lr=0.01))
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, filename="best", monitor="val/loss")
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        callbacks=[checkpoints, guard],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=_Features(bad))
    return model, trainer


def test_a_nonfinite_loss_stops_the_run_or_skips_the_batch_and_nothing_nan_is_saved(tmp_path):
    with pytest.raises(DivergedError, match=r"at epoch 0, step 1: the training loss is nan"):
        _fit("train", DivergenceGuard(), tmp_path / "stop")
    assert not list((tmp_path / "stop").glob("*.ckpt"))

    model, _ = _fit("train", DivergenceGuard(on_nonfinite_loss="skip_batch"), tmp_path / "skip")
    assert [step[0] for step in model.nonfinite_steps] == [
        0,
        1,
    ]  # one skipped batch per epoch, never stepped on
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    check_finite_checkpoint(str(tmp_path / "skip" / "best.ckpt"))

    with pytest.raises(DivergedError, match=r"after epoch 0: val/\S+ is nan"):
        _fit("val", DivergenceGuard(), tmp_path / "val")
    assert not list((tmp_path / "val").glob("*.ckpt"))  # the guard runs before the checkpoint callback

    with pytest.raises(ConfigError, match="on_nonfinite_loss must be one of stop, skip_batch"):
        DivergenceGuard(on_nonfinite_loss="ignore")


def test_a_checkpoint_with_nonfinite_weights_is_refused_and_the_reattach_check_fails_on_nan(tmp_path):
    model = _image_model()
    with torch.no_grad():
        model.head.outputs["label"].weight[0, 0] = float("inf")
    with pytest.raises(DivergedError, match=r"holds NaN or inf in head\.outputs\.label\.weight"):
        check_finite_checkpoint(str(save_model(model, tmp_path / "inf.ckpt")))

    make_tree(tmp_path / "imgs", {"train": {"a": 3, "b": 3}, "val": {"a": 2, "b": 2}})
    overrides = ["data=folder", f"data.root={tmp_path / 'imgs'}", "extract.progress=false"]
    cfg = compose_train(overrides, tmp_path, config="extract")
    dof = open_dof(extract(cfg))
    head = HeadstartModel(flow=FLOW, optimizer=OPTIMIZER, feature_dim=128, transform=dof.meta["transform"])
    full = attach_backbone(
        head, frozen_backbone(cfg), plain(cfg.backbone), dof.meta["backbone"]["weights_sha256"]
    )
    assert check_reattached(full, head, dof) < 1e-3
    with torch.no_grad():
        for m in (head, full):
            m.head.outputs["label"].bias.fill_(float("nan"))
    with pytest.raises(AssertionError, match="max \\|logit difference\\| nan"):
        check_reattached(full, head, dof)


# ---- 4. every run its own directory --------------------------------------------------------------------------------


def test_runs_started_in_the_same_second_get_their_own_directories(tmp_path):
    assert claim_run_dir(tmp_path / "x") == tmp_path / "x"
    assert claim_run_dir(tmp_path / "x") == tmp_path / "x_2"
    assert claim_run_dir(tmp_path / "x") == tmp_path / "x_3"

    for script in SCRIPTS:  # every entry script claims its directory through the same Hydra callback
        with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
            cfg = compose(script, overrides=[f"paths.root_dir={tmp_path}"], return_hydra_config=True)
        assert next(iter(cfg.hydra.callbacks.values()))._target_ == "headstart.runs.UniqueRunDir"
    claimed = []
    for _ in range(2):  # two runs composed in the same second
        with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
            cfg = compose("train", overrides=[f"paths.root_dir={tmp_path}"], return_hydra_config=True)
        cfg.hydra.run.dir = str(tmp_path / "outputs" / "digits" / "same-second")
        UniqueRunDir().on_run_start(cfg)
        claimed.append(cfg.hydra.run.dir)
        cfg.hydra.sweep.dir = str(tmp_path / "multirun" / "same-second")
        UniqueRunDir().on_multirun_start(cfg)
        claimed.append(cfg.hydra.sweep.dir)
        # every job of the sweep is composed again from the hydra overrides: they name the claimed directory
        assert cfg.hydra.overrides.hydra[-1] == f"hydra.sweep.dir='{cfg.hydra.sweep.dir}'"
    assert len(set(claimed)) == 4 and all(Path(p).is_dir() for p in claimed)


@pytest.mark.slow
def test_two_runs_at_once_write_two_run_directories(tmp_path):
    args = [
        sys.executable,
        "train.py",
        "train=false",
        "test=false",
        "data.num_workers=0",
        f"paths.root_dir={tmp_path}",
    ]
    procs = [
        subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(2)
    ]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read().decode()[-2000:]
    runs = _run_dirs(tmp_path)
    assert len(runs) == 2
    assert all((r / "train.log").is_file() and (r / ".hydra" / "config.yaml").is_file() for r in runs)


# ---- 6. nothing to learn is refused -------------------------------------------------------------------------------


def test_a_class_folder_without_images_is_refused_by_train_py(tmp_path):
    make_tree(tmp_path / "imgs", {"train": {"cat": 4, "dog": 4}})
    (tmp_path / "imgs" / "train" / "bird").mkdir()
    result = run_script(
        ["train.py", "data=folder", f"data.root={tmp_path / 'imgs'}", f"paths.root_dir={tmp_path}"], cwd=ROOT
    )
    assert result.returncode == 2
    assert (
        f"class folder(s) without images under {tmp_path / 'imgs'}: {tmp_path / 'imgs' / 'train' / 'bird'}"
        in (result.stderr)
    )
    assert "Traceback" not in result.stderr and "inf" not in result.stderr
    assert not (tmp_path / "outputs" / "default").exists()  # no empty outputs/<name>/ left behind


def test_one_class_or_a_class_or_task_without_training_samples_is_refused(tmp_path):
    make_tree(tmp_path / "one", {"train": {"cat": 4}})
    with pytest.raises(DataError, match=r"found one class under .*: 'cat'\. A classifier needs at least two"):
        folder_table(tmp_path / "one")

    make_tree(
        tmp_path / "nodog", {"train": {"cat": 6}, "val": {"cat": 1, "dog": 1}, "test": {"cat": 1, "dog": 1}}
    )
    cfg = compose_train(["data=folder", f"data.root={tmp_path / 'nodog'}"], tmp_path)
    with pytest.raises(DataError, match="class 'dog' has no training sample"):
        train(cfg)

    root = make_security(tmp_path / "security", n=20, seed=0)
    table = pd.read_csv(root / "samples.csv", dtype=str, keep_default_na=False)
    table["path"] = [str(root / p) for p in table["path"]]
    table["camera_blocked"] = ""  # the root task of the flow: not one label
    table.to_csv(tmp_path / "empty_root_task.csv", index=False)
    cfg = compose_train(
        [
            "experiment=security",
            "data=table",
            f"data.csv={tmp_path / 'empty_root_task.csv'}",
            "data.split_column=split",
        ],
        tmp_path,
    )
    with pytest.raises(DataError, match="task 'camera_blocked' has no training sample"):
        train(cfg)
    assert not (tmp_path / "run" / "metrics.json").exists()


# ---- 7. failures end clean ----------------------------------------------------------------------------------------


def test_a_truncated_checkpoint_is_one_clear_message(tmp_path):
    model = _image_model()
    ckpt = save_model(model, tmp_path / "whole.ckpt")
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    result = run_script(["train.py", f"ckpt_path={truncated}", f"paths.root_dir={tmp_path}"], cwd=ROOT)
    assert result.returncode == 2
    assert f"{truncated} cannot be read as a checkpoint" in result.stderr and "Traceback" not in result.stderr
    assert _run_dirs(tmp_path) == []


def test_ctrl_c_during_extraction_says_how_to_resume(tmp_path):
    make_tree(tmp_path / "imgs", {"train": {"a": 120, "b": 120}})
    args = [
        sys.executable,
        "extract.py",
        "data=folder",
        f"data.root={tmp_path / 'imgs'}",
        "data.num_workers=0",
        "extract.shard_size=8",
        "extract.batch_size=4",
        f"paths.root_dir={tmp_path}",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        args,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # Ctrl-C as in a terminal: a test run started in the background (bash `cmd &`) ignores SIGINT, and its
        # children would inherit that and finish the extraction instead
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "extracting" in line:
            proc.send_signal(signal.SIGINT)
            break
    out = "".join(lines) + proc.stdout.read()
    assert proc.wait(timeout=120) == 130, out[-2000:]
    assert "extraction interrupted: the shards finished so far are kept" in out
    assert "run the same command again to resume" in out
    assert "Traceback" not in out and "KeyboardInterrupt" not in out
    (dof,) = (tmp_path / "dof" / "digits").iterdir()
    assert not (dof / "manifest.json").exists()  # not complete, nothing pretends it is
    assert _run_dirs(tmp_path) == []


def test_a_failed_export_leaves_no_result_but_the_checkpoints_to_continue_from(tmp_path, monkeypatch):
    import headstart.ship.shipping

    def failing_export(model, path, metadata=None):
        raise headstart.errors.ExportError("the export failed (for this test)")

    monkeypatch.setattr(headstart.ship.shipping, "export_onnx", failing_export)
    make_tree(tmp_path / "imgs", {"train": {"a": 6, "b": 6}})
    cfg = compose_train(["data=folder", f"data.root={tmp_path / 'imgs'}", "trainer.max_epochs=1"], tmp_path)
    with pytest.raises(SystemExit) as ended:
        run_guarded(train, cfg)
    assert ended.value.code == 2
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir()) == [FAILED, "checkpoints", "tensorboard"]
    assert "the export failed" in (run / FAILED).read_text()
    assert (run / "checkpoints" / "last.ckpt").is_file()


def test_a_wrong_type_names_the_expected_type(tmp_path):
    from headstart.train.config import validate_train_config

    with pytest.raises(ConfigError, match=r"'trainer.max_epochs' must be an integer or null, got 'abc'"):
        validate_train_config(compose_train(["trainer.max_epochs=abc"], tmp_path))


# ---- 9. several processes, as Lightning and Hydra users run them ---------------------------------------------------


@pytest.mark.slow
def test_ddp_spawn_trains_and_tests(tmp_path):
    make_tree(
        tmp_path / "imgs", {"train": {"a": 6, "b": 6}, "val": {"a": 2, "b": 2}, "test": {"a": 3, "b": 2}}
    )
    result = run_script(
        [
            "train.py",
            "++trainer.strategy=ddp_spawn",
            "trainer.devices=2",
            "trainer.accelerator=cpu",
            "trainer.max_epochs=1",
            "data=folder",
            f"data.root={tmp_path / 'imgs'}",
            "data.batch_size=4",
            "export.onnx=false",
            "cost.latency=false",
            "data.num_workers=0",
            f"paths.root_dir={tmp_path}",
        ],
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = _run_dirs(tmp_path)
    metrics = json.loads((run / "metrics.json").read_text())
    # every test image once over both processes (each spawn starts its metrics afresh)
    assert metrics["test/label/count"] == 5 and metrics["val/label/count"] == 4
    assert metrics["test/label/acc"] == metrics["test/label/e2e_acc"]


def test_without_a_logger_the_callbacks_that_need_one_step_aside(tmp_path):
    make_tree(tmp_path / "imgs", {"train": {"a": 6, "b": 6}})
    cfg = compose_train(
        [
            "data=folder",
            f"data.root={tmp_path / 'imgs'}",
            "logger.tensorboard=null",
            "trainer.max_epochs=1",
            "export.onnx=false",
            "cost.latency=false",
        ],
        tmp_path,
    )
    assert not any(type(c).__name__ == "LearningRateMonitor" for c in build_callbacks(cfg))
    train(cfg)
    assert (tmp_path / "run" / "metrics.json").is_file() and not (tmp_path / "run" / "tensorboard").exists()
