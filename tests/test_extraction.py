"""DoF sets end to end: extract.py and training on features, on tiny generated data and on the real photos."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, compose_train, make_tree, run_script, shared_data

from headstart import Predictor
from headstart.core.model import HeadstartModel
from headstart.data.features import FeatureDataModule, RowBatchSampler
from headstart.dof import DofWriter, open_dof
from headstart.errors import ConfigError, DataError
from headstart.train.extract import extract
from headstart.train.reattach import check_reattached
from headstart.train.recipe import train


@pytest.fixture
def tiny(tmp_path: Path) -> list[str]:
    """Overrides for a tiny folder data set (30 images, 3 classes) on the small CNN with fixed random weights."""
    make_tree(tmp_path / "imgs", {"train": {"a": 8, "b": 8, "c": 8}, "val": {"a": 2, "b": 2, "c": 2}})
    return ["data=folder", f"data.root={tmp_path / 'imgs'}", "backbone=small_cnn", "extract.progress=false"]


def _extract(overrides: list[str], tmp_path: Path) -> Path:
    return extract(compose_train(overrides, tmp_path, config="extract"))


def test_extract_writes_a_complete_verifiable_set_and_reuses_it(tiny, tmp_path):
    path = _extract(tiny, tmp_path)
    assert path.parent == tmp_path / "dof" / "digits"  # extract.dataset defaults to the experiment name
    dof = open_dof(path, verify=True)
    meta = dof.meta
    assert meta["backbone"]["name"] == "small_cnn" and len(meta["backbone"]["weights_sha256"]) == 64
    assert meta["transform"]["crop"] == 32
    assert meta["flow"]["tasks"]["label"]["classes"] == ["a", "b", "c"]
    counts = {s: len(dof.split(s)) for s in dof.splits}
    assert counts["val"] == 6 and counts["train"] + counts["test"] == 24 and counts["test"] >= 3
    assert dof.feature_shape == (128,) and dof.feature_dtype == np.float16
    stats = dof.manifest["stats"]
    assert stats["hnct_seconds_per_epoch"] > 0 and stats["feature_bytes_per_sample"] == 256
    assert stats["config"]["backbone"]["name"] == "small_cnn"
    assert all(len(f["sha256"]) == 64 for f in dof.manifest["files"].values())
    # the stored rows map back to their files and labels
    train_rows = dof.split("train").arrays()
    paths = [meta["samples"]["path"][i] for i in train_rows["index"]]
    assert all(
        Path(p).parent.name == "abc"[int(y)] for p, y in zip(paths, train_rows["target.label"], strict=True)
    )

    mtimes = {p: p.stat().st_mtime_ns for p in path.rglob("*.npy")}
    assert _extract(tiny, tmp_path) == path
    assert {p: p.stat().st_mtime_ns for p in path.rglob("*.npy")} == mtimes  # reused, not recomputed


def test_fingerprint_changes_with_what_determines_the_features(tiny, tmp_path):
    base = _extract(tiny, tmp_path)
    assert _extract([*tiny, "extract.dtype=float32"], tmp_path) != base
    assert _extract([*tiny, "seed=7"], tmp_path) != base  # other random weights


def test_interrupted_extraction_resumes_from_finished_shards(tiny, tmp_path, monkeypatch):
    overrides = [*tiny, "extract.shard_size=4"]
    written = []
    original = DofWriter.write_shard

    def failing(self, split, k, arrays):
        if len(written) == 3:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C
        written.append((split, k))
        original(self, split, k, arrays)

    monkeypatch.setattr(DofWriter, "write_shard", failing)
    with pytest.raises(KeyboardInterrupt):
        _extract(overrides, tmp_path)
    (root,) = (tmp_path / "dof" / "digits").iterdir()
    assert not (root / "manifest.json").exists()
    with pytest.raises(DataError, match="incomplete"):
        open_dof_as_user(root)

    monkeypatch.setattr(
        DofWriter, "write_shard", lambda self, s, k, a: (written.append((s, k)), original(self, s, k, a))
    )
    first = list(written)
    assert _extract(overrides, tmp_path) == root
    again = written[len(first) :]
    assert not set(first) & set(again)  # finished shards were not recomputed
    assert sum(len(open_dof(root).split(s)) for s in open_dof(root).splits) == 30


def open_dof_as_user(root: Path):
    return FeatureDataModule(root).setup()


def test_damaged_shards_are_found(tiny, tmp_path):
    path = _extract(tiny, tmp_path)
    shard = next(path.glob("shards/train-*.features.npy"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes
    shard.write_bytes(bytes(data))
    assert _extract(tiny, tmp_path) == path  # sizes are fine: reused without hashing
    with pytest.raises(DataError, match=shard.name):
        _extract([*tiny, "verify=true"], tmp_path)
    shard.write_bytes(bytes(data[:-10]))  # truncated: found at open time
    with pytest.raises(DataError, match=shard.name):
        _extract(tiny, tmp_path)


def test_extract_py_verify_reports_an_altered_shard_cleanly(tiny, tmp_path):
    result = run_script(["extract.py", *tiny, f"paths.root_dir={tmp_path}", "data.num_workers=0"], cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    path = Path(result.stdout.strip().splitlines()[-1])
    shard = next(path.glob("shards/val-*.features.npy"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    result = run_script(["extract.py", *tiny, f"paths.root_dir={tmp_path}", "verify=true"], cwd=ROOT)
    assert result.returncode == 2
    assert shard.name in result.stderr and "Traceback" not in result.stderr


def test_views_store_augmented_copies_and_training_draws_one_per_sample(tiny, tmp_path):
    overrides = [
        *tiny,
        "extract.views=3",
        "+data.augment=[{_target_: torchvision.transforms.v2.RandomInvert, p: 1.0}]",
    ]
    path = _extract(overrides, tmp_path)
    dof = open_dof(path)
    train_split = dof.split("train").arrays()
    n = len(set(train_split["index"].tolist()))
    assert sorted(set(train_split["view"].tolist())) == [0, 1, 2]
    assert len(train_split["index"]) == 3 * n
    assert dof.meta["views"] == 3 and dof.meta["augment"][0]["_target_"].endswith("RandomInvert")
    by_view = {v: train_split["features"][train_split["view"] == v] for v in (0, 1)}
    assert not np.allclose(by_view[0], by_view[1])  # inverted images give other features

    sampler = RowBatchSampler(train_split["index"], batch_size=5, shuffle=True, seed=0)
    epochs = [np.concatenate(list(sampler)) for _ in range(4)]
    for rows in epochs:
        assert sorted(train_split["index"][rows].tolist()) == sorted(set(train_split["index"].tolist()))
    drawn_views = {int(train_split["view"][r]) for rows in epochs for r in rows}
    assert drawn_views == {0, 1, 2}


def test_train_on_features_reports_benefit_and_reattaches(tiny, tmp_path):
    cfg = compose_train([*tiny, "features=true", "trainer.max_epochs=3"], tmp_path)
    train(cfg)
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["dof/epochs"] == 3 and metrics["dof/hnct_s"] > metrics["dof/tnct_s"] > 0
    assert 0 < metrics["dof/benefit_ratio"] < 1
    head_ckpt = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)
    assert head_ckpt["hyper_parameters"]["backbone"] is None
    assert not any(k.startswith("backbone.") for k in head_ckpt["state_dict"])
    full = HeadstartModel.from_checkpoint(run / "checkpoints" / "image_model.ckpt")
    assert full.backbone is not None and full.backbone.name == "small_cnn"
    head = HeadstartModel.from_checkpoint(run / "checkpoints" / "best.ckpt")
    (dof_path,) = (tmp_path / "dof" / "digits").iterdir()
    assert check_reattached(full, head, open_dof(dof_path), samples=6) < 2e-2


def test_memory_mapped_set_trains_the_same_way(tiny, tmp_path):
    cfg = compose_train([*tiny, "features=true", "trainer.max_epochs=1", "extract.memory_budget=0"], tmp_path)
    train(cfg)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["test/label/count"] >= 1
    (dof_path,) = (tmp_path / "dof" / "digits").iterdir()
    dm = FeatureDataModule(dof_path, batch_size=4, memory_budget=0)
    dm.setup()
    assert not dm.dof.in_memory
    batch = next(iter(dm.train_dataloader()))
    assert batch["inputs"].shape == (4, 128) and batch["inputs"].dtype == torch.float32


def test_a_set_made_with_another_backbone_is_refused(tiny, tmp_path):
    path = _extract(tiny, tmp_path)
    cfg = compose_train(
        [*tiny, "features=true", f"extract.path={path}", "backbone=resnet18", "backbone.weights=null"],
        tmp_path,
    )
    with pytest.raises(ConfigError, match=r"extracted with backbone 'small_cnn'.*'resnet18'"):
        train(cfg)
    cfg = compose_train([*tiny, "features=true", f"extract.path={path}", "seed=3"], tmp_path)
    with pytest.raises(ConfigError, match="other 'small_cnn' weights"):
        train(cfg)


@pytest.mark.slow
def test_dog_cat_on_dof_features_reaches_96_percent(dog_cat_small_dof, tmp_path):
    root = shared_data("dog_cat_small")
    dof_path = (
        dog_cat_small_dof  # extracted once per session (conftest); training on a missing set extracts it
    )
    # (test_train_on_features_reports_benefit_and_reattaches)
    cfg = compose_train(["experiment=dog_cat_dof", f"data.root={root}", f"extract.path={dof_path}"], tmp_path)
    train(cfg)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["test/label/acc"] >= 0.96, metrics
    assert (tmp_path / "run" / "checkpoints" / "image_model.ckpt").is_file()

    # Another site retrains the head on the same backbone's features and ships only the head: applied on the first
    # run's bundle it must predict exactly like the full export of the retrained model.
    site = tmp_path / "site2"
    train(
        compose_train(
            [
                "experiment=dog_cat_dof",
                f"data.root={root}",
                f"extract.path={dof_path}",
                "seed=7",
                "trainer.max_epochs=2",
                "optimizer.lr=0.01",
            ],
            site,
        )
    )
    update, full = site / "run" / "head_update", site / "run" / "bundle"
    assert sum(f.stat().st_size for f in update.iterdir()) < 48 * 1024  # the head alone: KB, not MB
    images = sorted((root / "test").rglob("*.jpg"))[:12]
    combined = Predictor.load(update, base=tmp_path / "run" / "bundle").predict(images)
    alone = Predictor.load(full).predict(images)
    first = Predictor.load(tmp_path / "run" / "bundle").predict(images)
    assert [c["label"]["value"] for c in combined] == [a["label"]["value"] for a in alone]
    assert [c["label"]["score"] for c in combined] == pytest.approx(
        [a["label"]["score"] for a in alone], abs=1e-5
    )
    assert [c["label"]["score"] for c in combined] != pytest.approx(
        [f["label"]["score"] for f in first], abs=1e-3
    )


@pytest.mark.slow
def test_hymenoptera_on_dof_features_reaches_92_percent_val(tmp_path):
    root = shared_data("hymenoptera")
    cfg = compose_train(
        [
            "experiment=dog_cat_dof",
            "name=hymenoptera_dof",
            "extract.dataset=hymenoptera",
            f"data.root={root}",
            "extract.progress=false",
        ],
        tmp_path,
    )
    train(cfg)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["val/label/acc"] >= 0.92, metrics
