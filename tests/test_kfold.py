"""k-fold cross-validation: the fold assignment, every data path that uses it (folders, CSV, multi-task tables, DoF
sets), its errors, and a real `train.py -m data.fold=0,1 data.folds=2` sweep with its mean ± std summary."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, compose_train, make_image, make_tree, run_script

from headstart.core.transforms import InputTransform
from headstart.data import CsvDataModule, FolderDataModule, TableDataModule
from headstart.data.extraction import find_or_extract
from headstart.data.features import FeatureDataModule
from headstart.data.kfold import kfold_assign
from headstart.errors import ConfigError
from headstart.train.config import validate_train_config
from headstart.train.crossval import fold_summary
from headstart.train.recipe import build_datamodule
from headstart.train.sweeps import best_fold_setting_job

T16 = InputTransform(resize=16, crop=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
# train+val pool: a 9, b 7, c 5 (21 samples); test: 2 of each
TREE = {
    "train": {"a": 7, "b": 5, "c": 4},
    "val": {"a": 2, "b": 2, "c": 1},
    "test": {"a": 2, "b": 2, "c": 2},
}


def _folder(root: Path, **kwargs) -> FolderDataModule:
    dm = FolderDataModule(str(root), transform=T16, num_workers=0, **kwargs)
    dm.setup("fit")
    return dm


def _paths(dm, split: str) -> list[str]:
    frame = dm.table.frame
    return sorted(frame["path"][frame["split"] == split])


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    make_tree(tmp_path / "imgs", TREE)
    return tmp_path / "imgs"


def test_assignment_is_stratified_balanced_seeded_and_order_free() -> None:
    rng = np.random.default_rng(3)
    paths = np.array([f"img/{i:04d}.png" for i in range(211)])
    labels = rng.integers(0, 4, len(paths)).astype(float)
    labels[rng.random(len(paths)) < 0.1] = np.nan  # unlabelled samples are spread too
    folds = kfold_assign(paths, labels, 5, seed=0)
    assert set(folds) == set(range(5))
    assert np.ptp(np.bincount(folds)) <= 1  # fold sizes differ by at most one
    for key in (*range(4), None):
        members = np.isnan(labels) if key is None else labels == key
        assert np.ptp(np.bincount(folds[members], minlength=5)) <= 1  # so do each class's counts
    perm = rng.permutation(len(paths))
    assert (kfold_assign(paths[perm], labels[perm], 5, seed=0) == folds[perm]).all()  # listing order is moot
    assert (kfold_assign(paths, labels, 5, seed=0) == folds).all()
    assert (kfold_assign(paths, labels, 5, seed=1) != folds).any()


def test_folds_are_disjoint_cover_the_pool_and_leave_test_alone(tree: Path) -> None:
    plain = _folder(tree)
    pool = sorted(_paths(plain, "train") + _paths(plain, "val"))
    vals = []
    for i in range(3):
        dm = _folder(tree, folds=3, fold=i)
        assert _paths(dm, "test") == _paths(plain, "test")
        assert sorted(_paths(dm, "train") + _paths(dm, "val")) == pool
        assert len(_paths(dm, "val")) == 7  # 21 samples in 3 folds
        vals.append(set(_paths(dm, "val")))
    assert sum(len(v) for v in vals) == len(pool) and set().union(*vals) == set(pool)  # disjoint, covering
    counts = np.array([_folder(tree, folds=3, fold=i).class_counts("val") for i in range(3)])
    assert (counts.max(axis=0) - counts.min(axis=0) <= 1).all() and (counts.sum(axis=0) == [9, 7, 5]).all()

    # the same files listed by a CSV in another order get the same folds
    frame = plain.table.frame.sample(frac=1.0, random_state=0)
    csv = tree.parent / "samples.csv"
    pd.DataFrame(
        {
            "path": frame["path"],
            "label": [plain.classes[int(y)] for y in frame["label"]],
            "split": frame["split"],
        }
    ).to_csv(csv, index=False)
    for i in range(3):
        dm = CsvDataModule(str(csv), split_column="split", transform=T16, num_workers=0, folds=3, fold=i)
        dm.setup("fit")
        assert set(_paths(dm, "val")) == vals[i]


def test_multitask_table_folds_stratify_by_the_first_multiclass_task(tmp_path: Path) -> None:
    rows = []
    for i in range(24):
        make_image(tmp_path / f"img/{i:02d}.png", seed=i)
        kind = ["cat", "dog", "bird"][i % 3] if i < 21 else ""
        rows.append(
            {
                "path": f"img/{i:02d}.png",
                "split": "test" if i % 8 == 7 else "train",
                "blocked": i % 2,
                "kind": kind,
            }
        )
    pd.DataFrame(rows).to_csv(tmp_path / "t.csv", index=False)
    flow = {
        "tasks": {
            "blocked": {"kind": "binary"},
            "kind": {"kind": "multiclass", "classes": ["cat", "dog", "bird"]},
        }
    }
    seen, counts = [], []  # pool: cat 6, dog 6, bird 7 and 2 unlabelled (rows 7, 15, 23 are test)
    for i in range(2):
        dm = TableDataModule(
            str(tmp_path / "t.csv"), flow, split_column="split", transform=T16, num_workers=0, folds=2, fold=i
        )
        dm.setup("fit")
        table = dm.table
        assert len(table.rows("test")) == 3
        val = table.rows("val")
        counts.append(table.class_counts("val"))
        assert (table.targets["blocked"] == np.arange(24) % 2).all()  # targets stay with their rows
        seen.append(set(table.frame["path"][val]))
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 21
    assert np.sum(counts, axis=0).tolist() == [6, 6, 7] and np.ptp(counts, axis=0).max() <= 1  # stratified


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"folds": 1, "fold": 0}, r"data.folds=1: .*at least 2"),
        ({"folds": 3, "fold": 3}, r"data.fold=3 is out of range .*0..2.*data.fold=0,1,2 data.folds=3"),
        ({"fold": 1}, r"data.fold=1 needs data.folds"),
        ({"folds": 3}, r"data.folds=3 needs data.fold.*-m data.fold=0,1,2 data.folds=3"),
    ],
)
def test_bad_fold_settings_are_config_errors(tree: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        FolderDataModule(str(tree), transform=T16, **kwargs).setup("fit")


def test_pool_too_small_for_the_folds_names_the_class(tree: Path) -> None:
    with pytest.raises(
        ConfigError,
        match=r"data.folds=6 needs at least 6 samples of every class.*'c' has 5.*lower data.folds to 5",
    ):
        _folder(tree, folds=6, fold=0)


def test_config_keys_need_no_plus_and_are_type_checked(tree: Path, tmp_path: Path) -> None:
    cfg = compose_train(["data=folder", f"data.root={tree}", "data.fold=1", "data.folds=3"], tmp_path)
    validate_train_config(cfg)
    assert (cfg.data.fold, cfg.data.folds) == (1, 3)
    for data in ("digits", "csv", "table", "security", "dog_cat"):
        assert compose_train([f"data={data}"], tmp_path).data.folds is None
    with pytest.raises(
        ConfigError, match=r"data.folds=3 needs data.fold"
    ):  # not buried by Hydra's instantiate
        build_datamodule(compose_train(["data=folder", f"data.root={tree}", "data.folds=3"], tmp_path))
    with pytest.raises(ConfigError, match=r"'data.folds' must be"):
        validate_train_config(compose_train(["data=folder", "data.folds=many", "data.fold=0"], tmp_path))


def test_dof_set_is_shared_by_all_folds_and_folds_like_the_images(tree: Path, tmp_path: Path) -> None:
    base = [
        "data=folder",
        f"data.root={tree}",
        "backbone=small_cnn",
        "extract.progress=false",
        "extract.views=2",
    ]
    with pytest.raises(ConfigError, match="'c' has 5"):  # a bad data.folds stops the run before extraction
        build_datamodule(compose_train([*base, "data.fold=0", "data.folds=6", "features=true"], tmp_path))
    assert not (tmp_path / "dof").exists()
    with pytest.raises(ConfigError, match="without cross-validation folds"):  # a set holds the pool unfolded
        find_or_extract(FolderDataModule(str(tree), folds=3, fold=0), None, tmp_path / "dof", "x")
    sets = set()
    for i in range(3):
        fold = [*base, f"data.fold={i}", "data.folds=3", "data.split_seed=4"]
        images = build_datamodule(compose_train(fold, tmp_path))
        features = build_datamodule(compose_train([*fold, "features=true"], tmp_path))
        assert isinstance(features, FeatureDataModule)
        sets.add(features.path)
        samples = np.array(features.dof.meta["samples"]["path"])
        for split in ("train", "val", "test"):
            rows = features.split(split).take(np.arange(len(features.split(split))))
            assert sorted(set(samples[rows["index"]])) == _paths(images, split), (i, split)
            if split == "val":  # validated once, on the plain view
                assert (rows["view"] == 0).all() and len(set(rows["index"])) == len(rows["index"])
            if split == "train":  # stored training samples keep their augmented view
                assert set(rows["view"]) == {0, 1}
        assert features.class_counts("val") == images.class_counts("val")
    assert (
        len(sets) == 1 and len(list(next(iter(sets)).parent.iterdir())) == 1
    )  # one extraction for all folds


@pytest.mark.slow
def test_kfold_sweep_reports_mean_and_std_over_folds(tmp_path: Path, digits_root: Path) -> None:
    args = [
        "train.py",
        "-m",
        "data.fold=0,1",
        "data.folds=2",
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=2",
    ]
    args += [f"data.root={digits_root / 'digits'}", "data.num_workers=0", "logger={}", "export.onnx=false"]
    result = run_script([*args, f"paths.root_dir={tmp_path}"], cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = list((tmp_path / "multirun" / "digits").iterdir())
    jobs = [json.loads((sweep / j / "metrics.json").read_text()) for j in ("0", "1")]
    assert jobs[0]["test/label/count"] == jobs[1]["test/label/count"]  # the same held-out test split
    assert (
        jobs[0]["val/label/count"] + jobs[1]["val/label/count"] == 1618
    )  # digits' train+val pool, once each
    folds = pd.read_csv(sweep / "folds.csv")
    assert len(folds) == 1 and folds.loc[0, "n"] == 2 and folds.loc[0, "folds"] == "0,1"
    for metric in ("val/loss", "val/label/acc", "test/label/acc"):
        values = [j[metric] for j in jobs]
        assert folds.loc[0, f"{metric} mean"] == pytest.approx(np.mean(values))
        assert folds.loc[0, f"{metric} std"] == pytest.approx(np.std(values, ddof=1))
    mean, std = folds.loc[0, "val/loss mean"], folds.loc[0, "val/loss std"]
    assert f"{mean:.4f} ± {std:.4f}" in (sweep / "summary.md").read_text().split("## Cross-validation")[1]
    assert "cross-validation over data.fold" in result.stdout + result.stderr
    best = (sweep / "best_experiment.yaml").read_text()  # the setting, trained once without folds
    assert "by mean val/loss over the folds" in best and "fold" not in best.split("\n", 2)[2]


def test_fold_summary_groups_by_the_other_overrides() -> None:
    table = pd.DataFrame(
        {
            "job": [str(i) for i in range(7)],
            "data.fold": ["0", "1", "2", "0", "1", "2", "3"],
            "model.dropout": ["0", "0", "0", "0.2", "0.2", "0.2", "0.2"],
            "status": ["ok", "ok", "ok", "ok", "ok", "ok", "failed"],
            "val/loss": [1.0, 2.0, 3.0, 0.5, 0.7, 0.9, np.nan],
        }
    )
    summary = fold_summary(table, "val/loss", "min")
    assert list(summary["model.dropout"]) == ["0.2", "0"]  # best mean first
    assert list(summary["n"]) == [3, 3] and list(summary["folds"]) == [
        "0,1,2",
        "0,1,2",
    ]  # the failed fold left out
    assert summary["val/loss mean"].tolist() == pytest.approx([0.7, 2.0])
    assert summary["val/loss std"].tolist() == pytest.approx([0.2, 1.0])
    assert fold_summary(table.drop(columns="data.fold")) is None  # not a k-fold sweep
    assert best_fold_setting_job(table, summary) == "3"  # the best setting's first finished job
