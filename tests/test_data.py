"""headstart.data: sample tables, image DataModules, built-in digits and the Oxford-IIIT Pet builder."""

from __future__ import annotations

import io
import urllib.error
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, make_image, make_tree
from PIL import Image
from torch.utils.data import WeightedRandomSampler

from headstart.core.transforms import InputTransform, eval_transform
from headstart.data import (
    BadImageWarning,
    CsvDataModule,
    DigitsDataModule,
    FolderDataModule,
    ImbalanceWarning,
    csv_table,
    folder_table,
    load_rgb,
    materialize_digits,
    stratified_split,
)
from headstart.data.pets import build_dog_cat, main
from headstart.errors import ConfigError, DataError

T16 = InputTransform(resize=16, crop=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def truncated_jpeg(path: Path) -> Path:
    """A real JPEG cut in half: the header is intact (verify() passes) but decoding fails."""
    buf = io.BytesIO()
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=95)
    data = buf.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: len(data) // 2])
    return path


def split_of(table, root: Path) -> dict[str, str]:
    return {
        str(Path(p).relative_to(root)): s for p, s in zip(table.frame.path, table.frame.split, strict=True)
    }


# --- sample tables ----------------------------------------------------------------------------------------------


def test_folder_table_three_splits(tmp_path: Path) -> None:
    make_tree(tmp_path, {"train": {"b": 3, "a": 2}, "val": {"a": 1, "b": 1}, "test": {"a": 1, "c": 2}})
    t = folder_table(tmp_path)
    assert t.classes == ["a", "b", "c"]  # sorted union over splits
    assert t.class_counts("train") == [2, 3, 0]
    assert t.class_counts("val") == [1, 1, 0]
    assert t.class_counts("test") == [1, 0, 2]
    assert len(t.rows("train")) == 5 and t.rows("train").dtype == np.int64
    assert all(Path(p).is_absolute() for p in t.frame.path)
    for p, label in zip(t.frame.path, t.labels, strict=True):
        assert t.classes[int(label)] == Path(p).parent.name


def test_lone_train_folder_split_8_1_1_deterministic_and_stratified(tmp_path: Path) -> None:
    make_tree(
        tmp_path / "r1", {"train": {"cat": 20, "dog": 30}}, ext=".JPG"
    )  # extensions are case-insensitive
    t = folder_table(tmp_path / "r1")
    assert t.class_counts("train") == [16, 24]
    assert t.class_counts("val") == [2, 3]
    assert t.class_counts("test") == [2, 3]
    assert split_of(t, tmp_path / "r1") == split_of(folder_table(tmp_path / "r1"), tmp_path / "r1")
    # Same files created in another order elsewhere: same assignment (paths are sorted before splitting).
    for split in ("dog", "cat"):
        n = 30 if split == "dog" else 20
        for i in reversed(range(n)):
            make_image(tmp_path / "r2" / "train" / split / f"{split}_{i:03d}.JPG", seed=i)
    assert split_of(folder_table(tmp_path / "r2"), tmp_path / "r2") == split_of(t, tmp_path / "r1")
    other = folder_table(tmp_path / "r1", seed=1)
    assert split_of(other, tmp_path / "r1") != split_of(t, tmp_path / "r1")
    assert other.class_counts("val") == [2, 3]


def test_existing_val_folder_only_test_is_split_off(tmp_path: Path) -> None:
    make_tree(tmp_path, {"train": {"a": 10, "b": 10}, "val": {"a": 2, "b": 2}})
    t = folder_table(tmp_path)
    assert t.class_counts("val") == [2, 2]
    assert t.class_counts("test") == [1, 1]
    assert t.class_counts("train") == [9, 9]


def test_class_folders_only_layout(tmp_path: Path) -> None:
    make_tree(tmp_path, {"": {"zebra": 10, "ant": 10}})
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "ant" / "readme.md").write_text("not an image")
    (tmp_path / ".hidden").mkdir()
    make_image(tmp_path / ".hidden" / "x.png")
    t = folder_table(tmp_path)
    assert t.classes == ["ant", "zebra"]
    assert len(t) == 20
    assert (
        t.class_counts("train") == [8, 8]
        and t.class_counts("val") == [1, 1]
        and t.class_counts("test") == [1, 1]
    )


def test_stratified_split_keeps_one_for_train() -> None:
    s = stratified_split([0.0, 1.0, 1.0, np.nan, np.nan], 0.4, 0.4, seed=0)
    assert s[0] == "train"
    assert sorted(s[1:3]) == ["train", "val"] or sorted(s[1:3]) == ["test", "train"]
    with pytest.raises(ConfigError, match="val_fraction"):
        stratified_split([0.0], 0.6, 0.5)


def write_csv(path: Path, header: str, rows: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def test_csv_table_missing_labels_and_split_column(tmp_path: Path) -> None:
    for i in range(6):
        make_image(tmp_path / "img" / f"{i}.png", seed=i)
    csv = write_csv(
        tmp_path / "samples.csv",
        "file,kind,part",
        [
            "img/0.png,dog,train",
            "img/1.png,cat,train",
            "img/2.png,,train",
            "img/3.png,dog,val",
            "img/4.png,cat,test",
            f"{tmp_path / 'img' / '5.png'},,Validation",  # absolute path, missing label, split alias
        ],
    )
    t = csv_table(csv, path_column="file", label_column="kind", split_column="part")
    assert t.classes == ["cat", "dog"]
    assert list(t.frame.split) == ["train", "train", "train", "val", "test", "val"]
    assert t.labels[0] == 1 and t.labels[1] == 0 and np.isnan(t.labels[2]) and np.isnan(t.labels[5])
    assert t.frame.path[0] == str(tmp_path / "img" / "0.png")
    assert t.class_counts("train") == [1, 1]

    dm = CsvDataModule(
        str(csv), path_column="file", label_column="kind", split_column="part", transform=T16, num_workers=0
    )
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    labels = dict(zip(batch["index"].tolist(), batch["targets"]["label"].tolist(), strict=True))
    assert labels[0] == 1.0 and labels[1] == 0.0 and np.isnan(labels[2])


def test_csv_table_given_classes_root_and_auto_split(tmp_path: Path) -> None:
    for i in range(20):
        make_image(tmp_path / "imgs" / f"{i}.png", seed=i)
    csv = write_csv(
        tmp_path / "meta" / "s.csv", "path,label", [f"{i}.png,{'b' if i % 2 else 'a'}" for i in range(20)]
    )
    t = csv_table(csv, root=tmp_path / "imgs", classes=["b", "a", "unused"])
    assert t.classes == ["b", "a", "unused"]
    assert t.class_counts("train") == [8, 8, 0] and t.class_counts("val") == [1, 1, 0]
    assert list(t.frame.path) == [str(tmp_path / "imgs" / f"{i}.png") for i in range(20)]  # CSV order kept


def test_csv_errors(tmp_path: Path) -> None:
    make_image(tmp_path / "a.png")
    csv = write_csv(tmp_path / "s.csv", "path,label", ["a.png,cat", "a.png,cow"])
    with pytest.raises(DataError, match=r"line 3.*'cow'.*\['cat', 'dog'\]"):
        csv_table(csv, classes=["cat", "dog"])
    with pytest.raises(DataError, match=r"no column\(s\) \['species'\].*\['path', 'label'\]"):
        csv_table(csv, label_column="species")
    missing = write_csv(tmp_path / "m.csv", "path,label", ["a.png,cat", "nope/b.png,cat"])
    with pytest.raises(DataError, match=r"do not exist:\n.*line 3: .*nope/b\.png"):
        csv_table(missing)
    with pytest.raises(DataError, match="CSV file not found"):
        csv_table(tmp_path / "absent.csv")
    bad_split = write_csv(tmp_path / "b.csv", "path,label,split", ["a.png,cat,training"])
    with pytest.raises(DataError, match="'training' is not one of train/val/test"):
        csv_table(bad_split, split_column="split")


# --- DataModules ------------------------------------------------------------------------------------------------


def test_batch_contract(tmp_path: Path) -> None:
    make_tree(tmp_path, {"train": {"a": 3, "b": 2}, "val": {"a": 1, "b": 1}, "test": {"a": 1, "b": 1}})
    make_image(tmp_path / "train" / "b" / "gray.png", seed=9, gray=True)  # grayscale is converted to RGB
    dm = FolderDataModule(str(tmp_path), transform=T16, batch_size=4, num_workers=0)
    dm.setup("fit")
    dm.setup("test")  # idempotent
    assert dm.classes == ["a", "b"] and dm.num_classes == 2
    assert dm.class_counts() == [3, 3] and dm.class_counts("val") == [1, 1]
    seen = []
    for batch in dm.train_dataloader():
        x, y, idx = batch["inputs"], batch["targets"]["label"], batch["index"]
        assert x.dtype == torch.float32 and x.shape[1:] == (3, 16, 16)
        assert y.dtype == torch.float32 and y.shape == (x.shape[0],)
        assert idx.dtype == torch.long and idx.shape == (x.shape[0],)
        seen += idx.tolist()
    assert sorted(seen) == sorted(dm.table.rows("train").tolist())

    batch = next(iter(dm.val_dataloader()))
    tf = eval_transform(T16)
    for x, y, i in zip(batch["inputs"], batch["targets"]["label"], batch["index"], strict=True):
        path = dm.table.frame.path[int(i)]
        assert torch.equal(x, tf(load_rgb(path)))  # the index maps back to the file
        assert dm.classes[int(y)] == Path(path).parent.name
        assert dm.table.frame.split[int(i)] == "val"
    assert len(next(iter(dm.test_dataloader()))["index"]) == 2
    assert len(next(iter(dm.predict_dataloader()))["index"]) == 2


def test_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="on_bad_image"):
        FolderDataModule(str(tmp_path), on_bad_image="ignore")
    with pytest.raises(ConfigError, match="balance"):
        FolderDataModule(str(tmp_path), balance="oversample")
    make_tree(tmp_path, {"train": {"a": 2, "b": 1}})
    with pytest.raises(ConfigError, match="no input transform"):
        FolderDataModule(str(tmp_path)).setup()
    dm = FolderDataModule(str(tmp_path), transform=T16.to_dict(), num_workers=0)  # dict form works too
    dm.setup()
    assert len(dm.table) == 3


def test_missing_root_error_shows_layout_and_hint(tmp_path: Path) -> None:
    dm = FolderDataModule(
        str(tmp_path / "nowhere"), transform=T16, missing_hint="Build it: python -m my.builder"
    )
    with pytest.raises(DataError) as err:
        dm.setup()
    msg = str(err.value)
    assert str(tmp_path / "nowhere") in msg
    assert "ROOT/{train,val,test}/<class>/*.jpg" in msg
    assert "8:1:1" in msg and "data.root=" in msg
    assert "Build it: python -m my.builder" in msg
    (tmp_path / "empty" / "train" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="No images found"):
        folder_table(tmp_path / "empty")


def corrupt_tree(root: Path) -> tuple[Path, Path]:
    make_tree(root, {"train": {"a": 4, "b": 4}, "val": {"a": 1, "b": 1}, "test": {"a": 1, "b": 1}})
    garbage = root / "train" / "a" / "garbage.jpg"
    garbage.write_bytes(b"this is not a jpeg at all" * 10)
    truncated = truncated_jpeg(root / "train" / "b" / "truncated.jpg")
    return garbage, truncated


def test_corrupt_images_skipped_with_warning(tmp_path: Path) -> None:
    garbage, truncated = corrupt_tree(tmp_path)
    dm = FolderDataModule(str(tmp_path), transform=T16, batch_size=64, num_workers=0)
    with pytest.warns(BadImageWarning, match="garbage.jpg") as rec:
        dm.setup()
    assert "Skipping 1 unreadable" in str(rec[0].message)
    assert dm.bad_paths == [str(garbage)]
    assert str(garbage) not in set(dm.table.frame.path)
    # The truncated JPEG passes the quick scan; it fails while loading and is dropped from its batch.
    with pytest.warns(BadImageWarning, match="truncated.jpg"):
        batch = next(iter(dm.train_dataloader()))
    assert len(batch["index"]) == 8
    assert str(truncated) not in {dm.table.frame.path[i] for i in batch["index"].tolist()}


def test_corrupt_images_error_mode_names_paths(tmp_path: Path) -> None:
    garbage, truncated = corrupt_tree(tmp_path)
    dm = FolderDataModule(str(tmp_path), transform=T16, on_bad_image="error", num_workers=0)
    with pytest.raises(DataError, match="2 unreadable") as err:
        dm.setup()
    msg = str(err.value)
    assert str(garbage) in msg and str(truncated) in msg and "data.on_bad_image=skip" in msg


def test_bad_image_in_worker_does_not_crash(tmp_path: Path) -> None:
    _, truncated = corrupt_tree(tmp_path)
    dm = FolderDataModule(str(tmp_path), transform=T16, batch_size=3, num_workers=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadImageWarning)
        dm.setup()
    loader = dm.train_dataloader()
    assert loader.num_workers == 2 and loader.persistent_workers
    indices = []
    for _ in range(2):  # two epochs over the persistent workers
        for batch in loader:
            if batch is not None:
                indices += batch["index"].tolist()
    assert len(indices) == 2 * 8
    assert str(truncated) not in {dm.table.frame.path[i] for i in indices}


def imbalanced_tree(root: Path) -> None:
    make_tree(root, {"train": {"a": 12, "b": 3}, "val": {"a": 1, "b": 1}, "test": {"a": 1, "b": 1}})


def test_imbalance_warning_and_class_weights(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    imbalanced_tree(tmp_path)
    dm = FolderDataModule(str(tmp_path), transform=T16, num_workers=0)
    with pytest.warns(ImbalanceWarning, match=r"a=12, b=3.*data\.balance=sampler.*data\.balance=weights"):
        dm.setup()
    assert "imbalanced" in caplog.text
    w = dm.class_weights()
    assert np.isclose(np.mean(w), 1.0) and np.isclose(w[1] / w[0], 4.0)
    assert not isinstance(dm.train_dataloader().sampler, WeightedRandomSampler)

    with warnings.catch_warnings():
        warnings.simplefilter("error", ImbalanceWarning)  # chosen balancing: no warning
        FolderDataModule(str(tmp_path), transform=T16, balance="weights", num_workers=0).setup()
        FolderDataModule(str(tmp_path), transform=T16, imbalance_ratio=5.0, num_workers=0).setup()


def test_balance_sampler_draws_classes_evenly(tmp_path: Path) -> None:
    imbalanced_tree(tmp_path)
    dm = FolderDataModule(str(tmp_path), transform=T16, balance="sampler", batch_size=15, num_workers=0)
    dm.setup()
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, WeightedRandomSampler)
    assert loader.sampler.num_samples == 15 and loader.sampler.replacement
    torch.manual_seed(0)
    counts: Counter = Counter()
    for _ in range(20):
        for batch in loader:
            counts.update(batch["targets"]["label"].int().tolist())
    assert sum(counts.values()) == 300
    assert 0.4 < counts[1] / 300 < 0.6  # b is 20% of the files, about half of the draws


# --- built-in digits --------------------------------------------------------------------------------------------


def test_digits_materialize_and_load(tmp_path: Path) -> None:
    root = tmp_path / "data" / "digits"
    t32 = InputTransform(resize=32, crop=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    dm = DigitsDataModule(root=str(root), transform=t32, batch_size=16, num_workers=0)
    dm.prepare_data()
    files = sorted(root.rglob("*.png"))
    assert len(files) == 1797
    per_split = Counter(f.relative_to(root).parts[0] for f in files)
    assert per_split == {"train": 1439, "val": 179, "test": 179}
    assert {f.parent.name for f in files} == {str(d) for d in range(10)}
    with Image.open(files[0]) as im:
        assert im.mode == "L" and im.size == (8, 8)
        assert np.asarray(im).max() == 255  # 0..16 scaled to 0..255
    marker = root / ".complete"
    stamp = marker.stat().st_mtime_ns
    dm.prepare_data()  # second call: nothing rewritten
    assert materialize_digits(root) == root
    assert marker.stat().st_mtime_ns == stamp
    assert [p.name for p in root.parent.iterdir()] == ["digits"]  # no temp folders left

    dm.setup()
    assert dm.classes == [str(d) for d in range(10)]
    assert sum(dm.class_counts("val")) == 179
    batch = next(iter(dm.train_dataloader()))
    assert batch["inputs"].shape == (16, 3, 32, 32)
    assert batch["inputs"].min() >= -1.0 and batch["inputs"].max() <= 1.0
    assert batch["targets"]["label"].dtype == torch.float32


def test_digits_refuses_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "digits").mkdir()
    (tmp_path / "digits" / "mine.txt").write_text("user data")
    with pytest.raises(DataError, match="not a complete digits"):
        materialize_digits(tmp_path / "digits")
    assert (tmp_path / "digits" / "mine.txt").exists()


# --- Oxford-IIIT Pet builder ------------------------------------------------------------------------------------


def fake_pets(download_root: Path) -> None:
    """The layout torchvision's OxfordIIITPet reads: images/*.jpg and annotations/{trainval,test}.txt."""
    base = download_root / "oxford-iiit-pet"
    (base / "annotations").mkdir(parents=True)
    breeds = [("Abyssinian", 1, 1), ("Bengal", 2, 1), ("beagle", 3, 2), ("boxer", 4, 2)]  # class id, species
    lines: dict[str, list[str]] = {"trainval": [], "test": []}
    k = 0
    for name, cls, species in breeds:
        for i in range(1, 8):
            image_id = f"{name}_{i}"
            make_image(base / "images" / f"{image_id}.jpg", seed=k)
            k += 1
            split = "test" if i > 5 else "trainval"
            lines[split].append(f"{image_id} {cls} {species} {i}")
    for split, rows in lines.items():
        (base / "annotations" / f"{split}.txt").write_text("\n".join(rows) + "\n")


def test_pets_builder_from_existing_download(tmp_path: Path) -> None:
    fake_pets(tmp_path / "raw")
    out = build_dog_cat(tmp_path / "out", tmp_path / "raw", download=False, val_fraction=0.2)
    assert out == tmp_path / "out"
    t = folder_table(out)
    assert t.classes == ["cat", "dog"]
    assert (
        t.class_counts("train") == [8, 8]
        and t.class_counts("val") == [2, 2]
        and t.class_counts("test") == [4, 4]
    )
    assert {Path(p).name.split("_")[0] for p in t.frame.path[t.frame.label == 0]} == {"Abyssinian", "Bengal"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "raw"]  # no temp folders
    assert build_dog_cat(out, tmp_path / "raw", download=False) == out  # already built: nothing to do


def test_pets_cli_prints_counts(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    fake_pets(tmp_path / "raw")
    assert main([str(tmp_path / "out"), "--download-root", str(tmp_path / "raw"), "--no-download"]) == 0
    printed = capsys.readouterr().out
    assert "train" in printed and "cat=9 dog=9" in printed.replace("  ", " ")
    assert "test  cat=4  dog=4" in printed


def test_pets_offline_and_missing_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets.oxford_iiit_pet as tv_pets

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(tv_pets, "download_and_extract_archive", offline)
    with pytest.raises(DataError) as err:
        build_dog_cat(tmp_path / "out", tmp_path / "raw", download=True)
    msg = str(err.value)
    assert "Downloading Oxford-IIIT Pet" in msg and "failed" in msg and "network" in msg
    assert "train/cat/*.jpg" in msg  # how to lay it out by hand
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "raw").exists()  # nothing half-downloaded left behind
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    with pytest.raises(DataError, match="not found") as err:
        build_dog_cat(tmp_path / "out2", tmp_path / "empty", download=False)
    assert "download" in str(err.value)
    assert not (tmp_path / "out2").exists()
    assert main([str(tmp_path / "out3"), "--no-download"]) == 1


# --- real photos ------------------------------------------------------------------------------------------------


def test_real_dog_cat_small() -> None:
    root = SHARED_DATA / "dog_cat_small"
    if not root.is_dir():
        pytest.skip(f"{root} is not present")
    t224 = InputTransform(resize=64, crop=56)
    dm = FolderDataModule(str(root), transform=t224, batch_size=8, num_workers=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # balanced, readable: no warnings
        dm.setup()
    assert dm.classes == ["cat", "dog"]
    assert [dm.class_counts(s) for s in ("train", "val", "test")] == [[100, 100], [50, 50], [50, 50]]
    batch = next(iter(dm.test_dataloader()))
    assert batch["inputs"].shape == (8, 3, 56, 56)
    for i, y in zip(batch["index"].tolist(), batch["targets"]["label"].tolist(), strict=True):
        assert Path(dm.table.frame.path[i]).name.startswith(dm.classes[int(y)])
