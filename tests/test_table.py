"""headstart.data.table (multi-task CSV sample tables) and headstart.data.security (synthetic home-camera scenes)."""

from __future__ import annotations

import io
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_image
from PIL import Image

from headstart.core.transforms import InputTransform
from headstart.data.images import BadImageWarning
from headstart.data.security import (
    LEAF_PATHS,
    MARKER,
    SECURITY_FLOW,
    SHIRT_COLOURS,
    SecurityDataModule,
    make_security,
)
from headstart.data.table import (
    MultiTaskTable,
    TableDataModule,
    leaf_specs,
    multitask_csv_table,
)
from headstart.errors import ConfigError, DataError

T16 = InputTransform(resize=16, crop=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))

FLOW = {
    "tasks": {
        "blocked": {"kind": "binary"},
        "kind": {"kind": "multiclass", "classes": ["cat", "dog", "bird"], "given": "~blocked"},
        "count": {"kind": "multiclass", "classes": 3},
        "person": {
            "given": "~blocked",
            "tasks": {
                "x": {"kind": "bounded_regression", "scale": 64},
                "colour": {"kind": "multilabel", "classes": ["red", "green", "blue"]},
            },
        },
        "age": {"kind": "regression"},
    }
}
PATHS = ["blocked", "kind", "count", "person.x", "person.colour", "age"]
HEADER = "path,split,blocked,kind,count,person.x,person.colour,age\n"
ROWS = [  # every kind, names and indices, empty cells, multilabel "-"
    'img/a.png,train,1,cat,0,12.5,"0,2",3.5',
    'img/b.png,train,false,2,2,,"red,blue",-1',
    "img/c.png,val,yes,dog,,64,-,",
    "img/d.png,test,0,,1,0,,1e2",
    "img/e.png,train,TRUE,bird,1,3,green,0",
    "img/f.png,train,no,cat,2,7,none,2",
]


def write_table(root: Path, rows: list[str] = ROWS, header: str = HEADER, images: bool = True) -> Path:
    if images:
        for i, name in enumerate("abcdef"):
            make_image(root / "img" / f"{name}.png", seed=i)
    csv = root / "samples.csv"
    csv.write_text(header + "\n".join(rows) + "\n")
    return csv


def nan_eq(a: np.ndarray, b: list) -> bool:
    return np.array_equal(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), equal_nan=True)


# --- flow spec walking ----------------------------------------------------------------------------------------


def test_leaf_specs_in_declaration_order_with_dotted_paths() -> None:
    leaves = leaf_specs(FLOW)
    assert [x.path for x in leaves] == PATHS
    assert [x.kind for x in leaves] == [
        "binary",
        "multiclass",
        "multiclass",
        "bounded_regression",
        "multilabel",
        "regression",
    ]
    assert leaves[2].classes == ("0", "1", "2")
    assert leaves[3].scale == 64.0
    assert [x.path for x in leaf_specs(SECURITY_FLOW)] == LEAF_PATHS


@pytest.mark.parametrize(
    "flow, match",
    [
        ({}, "tasks"),
        ({"tasks": {"a": {"kind": "ordinal"}}}, "ordinal"),
        ({"tasks": {"a": {"kind": "multiclass"}}}, "classes"),
        ({"tasks": {"a": {"kind": "multiclass", "classes": ["x", "x"]}}}, "repeat"),
        ({"tasks": {"a": {"kind": "bounded_regression"}}}, "scale"),
        ({"tasks": {"g": {"tasks": {}}}}, "g"),
    ],
)
def test_bad_flow_spec_is_config_error(tmp_path: Path, flow: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        TableDataModule(str(tmp_path / "x.csv"), flow, transform=T16)


# --- the table reader -----------------------------------------------------------------------------------------


def test_every_kind_parsed(tmp_path: Path) -> None:
    t = multitask_csv_table(write_table(tmp_path), FLOW, split_column="split")
    assert isinstance(t, MultiTaskTable) and len(t) == 6
    assert list(t.targets) == PATHS
    assert nan_eq(t.targets["blocked"], [1, 0, 1, 0, 1, 0])
    assert nan_eq(t.targets["kind"], [0, 2, 1, math.nan, 2, 0])  # names and indices; empty = NaN
    assert nan_eq(t.targets["count"], [0, 2, math.nan, 1, 1, 2])  # classes given as a count
    assert nan_eq(t.targets["person.x"], [12.5, math.nan, 64, 0, 3, 7])
    assert nan_eq(t.targets["age"], [3.5, -1, math.nan, 100, 0, 2])
    colour = t.targets["person.colour"]
    assert colour.shape == (6, 3) and colour.dtype == np.float32
    assert nan_eq(colour[0], [1, 0, 1])  # "0,2"
    assert nan_eq(colour[1], [1, 0, 1])  # "red,blue"
    assert nan_eq(colour[2], [0, 0, 0])  # "-": present, no class
    assert nan_eq(colour[3], [math.nan] * 3)  # empty: a missing row
    assert nan_eq(colour[4], [0, 1, 0])
    assert nan_eq(colour[5], [0, 0, 0])  # "none"
    assert t.frame.split.tolist() == ["train", "train", "val", "test", "train", "train"]
    assert t.classes == ["cat", "dog", "bird"]  # the first multiclass task, for single-label code
    assert nan_eq(t.labels, [0, 2, 1, math.nan, 2, 0])
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in t.paths)
    assert t.label_counts("train") == {
        "blocked": 4,
        "kind": 4,
        "count": 4,
        "person.x": 3,
        "person.colour": 4,
        "age": 4,
    }
    sub = t.subset(np.array([False, True, True, False, False, True]))
    assert isinstance(sub, MultiTaskTable) and len(sub) == 3
    assert nan_eq(sub.targets["person.colour"], [[1, 0, 1], [0, 0, 0], [0, 0, 0]])


def test_split_without_split_column_is_deterministic_and_order_free(tmp_path: Path) -> None:
    rows = [f"img/{i:03d}.png,1,cat,0,1,-,1" for i in range(40)]
    for i in range(40):
        make_image(tmp_path / "img" / f"{i:03d}.png", seed=i, size=(4, 4))
    header = "path,blocked,kind,count,person.x,person.colour,age\n"
    a = multitask_csv_table(write_table(tmp_path, rows, header, images=False), FLOW)
    assert a.frame.split.value_counts().to_dict() == {"train": 32, "val": 4, "test": 4}
    b = multitask_csv_table(write_table(tmp_path, rows[::-1], header, images=False), FLOW)
    assert dict(zip(a.paths, a.frame.split, strict=True)) == dict(zip(b.paths, b.frame.split, strict=True))
    c = multitask_csv_table(write_table(tmp_path, rows, header, images=False), FLOW, seed=1)
    assert a.frame.split.tolist() != c.frame.split.tolist()


@pytest.mark.parametrize(
    "column, value, match",
    [
        ("kind", "fish", "not one of the classes"),
        ("count", "3", "not one of the classes"),
        ("blocked", "2", "binary"),
        ("person.x", "65", r"outside the range \[0, 64\]"),
        ("person.x", "-0.5", "outside the range"),
        ("person.colour", "red,purple", "not one of the classes"),
        ("person.colour", "0,,1", "empty class"),
        ("age", "abc", "not a number"),
        ("age", "inf", "finite"),
    ],
)
def test_bad_label_names_row_column_value(tmp_path: Path, column: str, value: str, match: str) -> None:
    rows = list(ROWS)
    cells = rows[4].split(",")
    cells[HEADER.strip().split(",").index(column)] = f'"{value}"'
    rows[4] = ",".join(cells)
    with pytest.raises(DataError, match=match) as err:
        multitask_csv_table(write_table(tmp_path, rows), FLOW, split_column="split")
    msg = str(err.value)
    assert "row 5 (line 6)" in msg and f"column '{column}'" in msg and repr(value) in msg
    assert "fix" in msg.lower() or "write" in msg.lower()


def test_several_bad_labels_reported_together(tmp_path: Path) -> None:
    rows = [r.replace("cat", "cow") for r in ROWS]
    with pytest.raises(DataError, match="2 bad label") as err:
        multitask_csv_table(write_table(tmp_path, rows), FLOW, split_column="split")
    assert "row 1 " in str(err.value) and "row 6 " in str(err.value)


def test_missing_label_column_lists_columns(tmp_path: Path) -> None:
    header = HEADER.replace("person.x", "x")
    with pytest.raises(DataError, match=r"no column\(s\) \['person.x'\]") as err:
        multitask_csv_table(write_table(tmp_path, header=header), FLOW, split_column="split")
    assert "its columns are ['path', 'split', 'blocked', 'kind', 'count', 'x'" in str(err.value)
    with pytest.raises(DataError, match=r"\['where'\]"):
        multitask_csv_table(write_table(tmp_path), FLOW, split_column="where")


def test_missing_image_path_and_missing_csv(tmp_path: Path) -> None:
    csv = write_table(tmp_path)
    (tmp_path / "img" / "c.png").unlink()
    with pytest.raises(DataError, match=r"row 3 \(line 4\), column 'path', value 'img/c.png'") as err:
        multitask_csv_table(csv, FLOW, split_column="split")
    assert "data.root" in str(err.value)
    with pytest.raises(DataError, match="CSV file not found"):
        multitask_csv_table(tmp_path / "nope.csv", FLOW)


def test_bad_split_value(tmp_path: Path) -> None:
    rows = list(ROWS)
    rows[1] = rows[1].replace(",train,", ",dev,")
    with pytest.raises(DataError, match=r"row 2 \(line 3\), column 'split', value 'dev'"):
        multitask_csv_table(write_table(tmp_path, rows), FLOW, split_column="split")


# --- the DataModule -------------------------------------------------------------------------------------------


def test_batch_contract_through_a_dataloader(tmp_path: Path) -> None:
    dm = TableDataModule(
        str(write_table(tmp_path)), FLOW, split_column="split", transform=T16, batch_size=8, num_workers=0
    )
    dm.setup("fit")
    assert dm.flow_spec == FLOW and dm.leaf_paths == PATHS
    assert dm.classes == ["cat", "dog", "bird"] and dm.num_classes == 3
    batch = next(iter(dm.train_dataloader()))
    assert batch["inputs"].shape == (4, 3, 16, 16) and batch["inputs"].dtype == torch.float32
    assert batch["index"].dtype == torch.long and sorted(batch["index"].tolist()) == [0, 1, 4, 5]
    targets = batch["targets"]
    assert list(targets) == PATHS
    for path in PATHS:
        assert targets[path].dtype == torch.float32
        assert targets[path].shape == ((4, 3) if path == "person.colour" else (4,))
    by_row = {int(r): k for k, r in enumerate(batch["index"])}
    assert torch.isnan(targets["person.x"][by_row[1]])
    assert targets["person.colour"][by_row[0]].tolist() == [1.0, 0.0, 1.0]
    assert targets["kind"][by_row[1]].item() == 2.0
    test = next(iter(dm.test_dataloader()))
    assert torch.isnan(test["targets"]["person.colour"]).all() and test["targets"]["age"].item() == 100.0


def test_no_multiclass_task_classes_none_and_balance_rejected(tmp_path: Path) -> None:
    flow = {"tasks": {"blocked": {"kind": "binary"}}}
    csv = write_table(tmp_path)
    dm = TableDataModule(str(csv), flow, split_column="split", transform=T16, num_workers=0)
    dm.setup()
    assert dm.classes is None and dm.num_classes == 0
    with pytest.raises(ConfigError, match="single-label tasks only"):
        dm.class_weights()
    for balance in ("weights", "sampler"):
        with pytest.raises(ConfigError, match="single-label tasks only"):
            TableDataModule(str(csv), flow, transform=T16, balance=balance)


def test_bad_images_skipped(tmp_path: Path) -> None:
    csv = write_table(tmp_path)
    (tmp_path / "img" / "b.png").write_bytes(b"not an image")  # caught by the scan in setup
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
    (tmp_path / "img" / "e.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # verify() passes
    dm = TableDataModule(str(csv), FLOW, split_column="split", transform=T16, batch_size=8, num_workers=0)
    with pytest.warns(BadImageWarning, match="Skipping 1 unreadable"):
        dm.setup()
    assert len(dm.table) == 5 and dm.bad_paths[0].endswith("b.png")
    assert len(dm.table.targets["person.colour"]) == 5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadImageWarning)
        batch = next(iter(dm.train_dataloader()))
    assert batch["inputs"].shape[0] == 2  # a, f (e fails to decode and is dropped by the collate)
    assert batch["targets"]["person.colour"].shape == (2, 3)
    dm = TableDataModule(str(csv), FLOW, split_column="split", transform=T16, on_bad_image="error")
    with pytest.raises(DataError, match="unreadable"):
        dm.setup()


# --- the security data set ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def security(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_security(tmp_path_factory.mktemp("sec") / "security", n=300, seed=3)


def read(root: Path) -> pd.DataFrame:
    return pd.read_csv(root / "samples.csv", dtype=str, keep_default_na=False)


def test_security_counts_splits_images(security: Path) -> None:
    df = read(security)
    assert list(df.columns) == ["path", "split", *LEAF_PATHS]
    assert len(df) == 300 and (security / MARKER).is_file()
    counts = df.split.value_counts().to_dict()
    assert counts["train"] == pytest.approx(240, abs=5) and counts["val"] == pytest.approx(30, abs=3)
    assert counts["test"] == pytest.approx(30, abs=3)
    assert len(list((security / "images").glob("*.png"))) == 300
    for p in df.path[:20]:
        with Image.open(security / p) as im:
            assert im.size == (64, 64) and im.mode == "RGB"
    assert not list(security.parent.glob(".security.tmp-*"))  # no temporary folder left behind


def test_security_labels_follow_conditions(security: Path) -> None:
    df = read(security)
    assert set(df.camera_blocked) == {"0", "1"}  # never missing
    blocked = df.camera_blocked == "1"
    assert 0 < blocked.sum() < len(df)
    for col in LEAF_PATHS[1:]:
        assert (df[col][blocked] == "").all(), col
    assert (df.door_locked[df.door_open == "1"] == "").all()
    assert (df.person_present[df.door_open == "0"] == "").all()
    person_cols = [c for c in LEAF_PATHS if c.startswith("person.")]
    for col in person_cols:
        assert (df[col][df.person_present == "0"] == "").all(), col
    # partial labels: some applicable labels are missing, roughly 10% of them
    unblocked = df[~blocked]
    missing_door = (unblocked.door_open == "").mean()
    assert 0.02 < missing_door < 0.2
    person_cells = df.loc[df.person_present == "1", person_cols].to_numpy()
    assert 0.02 < (person_cells == "").mean() < 0.2
    x = pd.to_numeric(df["person.face_x1"][df["person.face_x1"] != ""])
    assert x.between(0, 64).all() and x.nunique() > 10
    assert set(df["person.shirt"]) - {""} <= set(SHIRT_COLOURS)
    colours = {c for cell in df["person.face_colour"] if cell for c in cell.split(",")}
    assert colours == {"red", "green", "blue"}
    # the whole table reads back through the table reader under SECURITY_FLOW
    t = multitask_csv_table(security / "samples.csv", SECURITY_FLOW, split_column="split")
    fc = t.targets["person.face_colour"]
    present = ~np.isnan(fc).all(axis=1)
    assert (fc[present].sum(axis=1) >= 1).all()  # at least one channel on


def test_security_images_show_their_labels(security: Path) -> None:
    """Spot-check the cues: the head square's colour and left edge, the shirt's colour."""
    df = read(security)
    rows = df[(df["person.face_x1"] != "") & (df["person.face_colour"] != "") & (df["person.shirt"] != "")]
    assert len(rows) > 10
    for _, r in rows.head(10).iterrows():
        img = np.asarray(Image.open(security / r.path)).astype(int)
        x1 = int(r["person.face_x1"])
        bits = [int(c in r["person.face_colour"].split(",")) * 255 for c in ("red", "green", "blue")]
        assert np.abs(img[17, x1 + 1] - bits).max() < 20
        assert np.abs(img[40, x1 + 7] - SHIRT_COLOURS[r["person.shirt"]]).max() < 20
    blocked = df[df.camera_blocked == "1"].path.iloc[0]
    assert np.asarray(Image.open(security / blocked)).mean() < 90


def test_security_deterministic_and_idempotent(security: Path, tmp_path: Path) -> None:
    again = make_security(tmp_path / "s2", n=300, seed=3)
    assert read(again).equals(read(security))
    for p in read(security).path[:10]:
        assert (again / p).read_bytes() == (security / p).read_bytes()
    other = make_security(tmp_path / "s3", n=300, seed=4)
    assert not read(other).equals(read(security))
    stamp = (security / "samples.csv").stat().st_mtime_ns
    assert make_security(security, n=300, seed=3) == security  # already complete: nothing rewritten
    assert (security / "samples.csv").stat().st_mtime_ns == stamp
    with pytest.raises(DataError, match="n=300, seed=9"):
        make_security(security, n=300, seed=9)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("x")
    with pytest.raises(DataError, match="not a complete security data set"):
        make_security(tmp_path / "junk", n=20)


def test_security_datamodule(tmp_path: Path) -> None:
    dm = SecurityDataModule(
        str(tmp_path / "security"), n=60, seed=0, transform=T16, batch_size=16, num_workers=0
    )
    assert dm.flow_spec == SECURITY_FLOW and dm.classes == list(SHIRT_COLOURS)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.table) == 60 and (tmp_path / "security" / MARKER).is_file()
    batch = next(iter(dm.val_dataloader()))
    assert list(batch["targets"]) == LEAF_PATHS
    assert batch["targets"]["person.face_colour"].shape == (batch["inputs"].shape[0], 3)
    assert not torch.isnan(batch["targets"]["camera_blocked"]).any()
    # Pointing csv at another table trains on it without generating anything.
    csv = write_table(tmp_path / "user")
    user = SecurityDataModule(str(tmp_path / "unused"), csv=str(csv), flow=FLOW, transform=T16, num_workers=0)
    user.prepare_data()
    user.setup()
    assert not (tmp_path / "unused").exists() and user.leaf_paths == PATHS
