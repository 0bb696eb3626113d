"""A DoF set is trusted only as far as it is checked: an edited manifest, non-finite features and two extractions
of one set at once are refused or serialized, never turned into a silently wrong model."""

from __future__ import annotations

import json
import logging
import multiprocessing
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, compose_train, make_tree, run_script

import headstart.train.extract as extraction
from headstart.data.features import FeatureDataModule
from headstart.dof import DofError, DofWriter, fingerprint, open_dof
from headstart.dof.files import sha256_file
from headstart.dof.info import describe
from headstart.errors import DataError
from headstart.train.recipe import train

# --- a tiny extracted set, made once and copied by each test that edits it ----------------------------------------


def _overrides(images: Path) -> list[str]:
    return ["data=folder", f"data.root={images}", "backbone=small_cnn", "extract.progress=false"]


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> tuple[Path, Path]:
    """(images, set): 30 generated images in 3 class folders and their DoF set through the small CNN."""
    base = tmp_path_factory.mktemp("trust")
    make_tree(base / "imgs", {"train": {"a": 8, "b": 8, "c": 8}, "val": {"a": 2, "b": 2, "c": 2}})
    path = extraction.extract(compose_train(_overrides(base / "imgs"), base, config="extract"))
    return base / "imgs", path


@pytest.fixture
def copy(made, tmp_path) -> Path:
    """A copy of the set, filed as extraction files it (`dof/<dataset>/<fingerprint>/`) under tmp_path."""
    _, path = made
    dest = tmp_path / "dof" / path.parent.name / path.name
    shutil.copytree(path, dest)
    return dest


def _edit(root: Path, change) -> None:
    """Edit manifest.json as a person would: load, change, save indented."""
    path = root / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest, indent=1))


def _swap_classes(m: dict) -> None:
    classes = m["meta"]["flow"]["tasks"]["label"]["classes"]
    classes[0], classes[1] = classes[1], classes[0]


def _rehash(m: dict) -> None:
    """What a forger would do after an edit: recompute the fingerprints the manifest records."""
    m["meta"]["fingerprint"] = fingerprint(m["meta"]["fingerprint_spec"])
    m["meta_fingerprint"] = fingerprint(m["meta"])


# --- item 2: an edited manifest is refused, naming what changed ---------------------------------------------------


def test_swapped_class_order_is_refused_by_open_and_by_training(made, copy, tmp_path):
    images, _ = made
    assert open_dof(copy, verify=True).meta["flow"]["tasks"]["label"]["classes"] == ["a", "b", "c"]
    _edit(copy, _swap_classes)
    edited = r"manifest.json of DoF set .* was edited: .*meta\.flow differs from the fingerprint spec"
    with pytest.raises(
        DofError, match=edited + r".*\[\"b\", \"a\", \"c\"\].*\[\"a\", \"b\", \"c\"\].*describe"
    ):
        open_dof(copy, verify=True)
    with pytest.raises(DataError, match=edited):
        FeatureDataModule(copy).setup()
    cfg = compose_train([*_overrides(images), "features=true", "trainer.max_epochs=1"], tmp_path)
    with pytest.raises(DataError, match=edited):  # train.py features=true finds the set by fingerprint
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_each_layer_of_a_forged_manifest_is_caught(copy, tmp_path):
    """Someone who edits the spec too, then the fingerprints, then files the set elsewhere is still stopped, and
    a sample table rewritten to match the swapped classes is caught by verify, which reads the shards."""
    _edit(copy, lambda m: (_swap_classes(m), m["meta"]["fingerprint_spec"]["flow"].update(m["meta"]["flow"])))
    with pytest.raises(
        DofError, match=r"fingerprint_spec hashes to [0-9a-f]{16}, not to the recorded fingerprint"
    ):
        open_dof(copy)
    _edit(copy, _rehash)
    with pytest.raises(
        DofError, match=rf"filed under fingerprint {copy.name} but its meta records fingerprint"
    ):
        open_dof(copy)
    elsewhere = tmp_path / "my_set"
    copy.rename(elsewhere)
    with pytest.raises(
        DofError, match=r"labelled with a class other than their class folder \(e.g. .* is labelled '[ab]'\)"
    ):
        open_dof(elsewhere)

    def relabel(m: dict) -> None:  # labels 0 and 1 swapped too, so that every class folder matches again
        m["meta"]["samples"]["label"] = [
            {0.0: 1.0, 1.0: 0.0}.get(v, v) for v in m["meta"]["samples"]["label"]
        ]
        _rehash(m)

    _edit(elsewhere, relabel)
    assert open_dof(elsewhere).splits  # the cheap checks pass now
    with pytest.raises(DofError, match=r"disagrees with its shards: sample \d+ .* is stored with label"):
        open_dof(elsewhere, verify=True)


def test_an_edited_sample_table_or_backbone_is_named(copy):
    text = (copy / "manifest.json").read_text()
    _edit(copy, lambda m: m["meta"]["samples"]["split"].reverse())
    with pytest.raises(
        DofError, match=r"meta no longer matches its fingerprint \(meta hashes to .*a field of meta"
    ):
        open_dof(copy)
    (copy / "manifest.json").write_text(text)
    _edit(copy, lambda m: m["meta"]["backbone"].update(weights_sha256="0" * 64))
    with pytest.raises(DofError, match=r"meta\.backbone\.weights_sha256 is \"0000"):
        open_dof(copy)


def _as_float32(m: dict) -> None:
    m["feature"]["dtype"] = m["arrays"]["features"]["dtype"] = "float32"


def test_a_dtype_edit_is_caught_at_open(copy, tmp_path):
    _edit(copy, _as_float32)
    with pytest.raises(DofError, match=r"feature dtype is float32 but the set was extracted as \"float16\""):
        open_dof(copy)
    # a set without a fingerprint spec: the shards' .npy headers say what they hold, both ways
    for written, claimed in ((np.float16, "float32"), (np.float32, "float16")):
        root = tmp_path / f"plain_{claimed}"
        writer = DofWriter(root, {"backbone": "toy"})
        features = np.ones((4, 3), dtype=written)
        writer.write_shard(
            "train", 0, {"features": features, "index": np.arange(4), "view": np.zeros(4, int)}
        )
        writer.finalize()
        _edit(
            root, lambda m, c=claimed: m["feature"].update(dtype=c) or m["arrays"]["features"].update(dtype=c)
        )
        with pytest.raises(
            DofError, match=rf"features\.npy holds {np.dtype(written).name} \[4, 3\] but manifest"
        ):
            open_dof(root, memory_budget=0)


def test_describe_edits_only_descriptive_fields_and_keeps_the_set_verifiable(copy):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "headstart.dof",
            "describe",
            str(copy),
            "--name",
            "tiny",
            "--license",
            "CC-BY-4.0",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"name": "tiny", "license": "CC-BY-4.0"}
    dof = open_dof(copy, verify=True)
    assert dof.manifest["info"] == {"name": "tiny", "license": "CC-BY-4.0"}
    assert describe(copy, source="generated", name="") == {"license": "CC-BY-4.0", "source": "generated"}
    with pytest.raises(DofError, match=r"'description' must be a string, got int"):
        describe(copy, description=3)
    with pytest.raises(DofError, match=r"no descriptive field\(s\) \['labels'\]"):
        describe(copy, labels="x")
    _edit(copy, _swap_classes)  # describing an edited set would bless it: refused
    with pytest.raises(DofError, match="was edited"):
        describe(copy, name="again")
    result = subprocess.run(
        [sys.executable, "-m", "headstart.dof", "describe", str(copy), "--name", "x"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2 and "was edited" in result.stderr and "Traceback" not in result.stderr


def test_a_version_1_0_set_is_still_read(copy):
    def downgrade(m: dict) -> None:  # 1.0: no info, no classes in the spec, no record of the folder layout
        m["version"] = "1.0"
        del m["info"], m["meta"]["fingerprint_spec"]["flow"], m["meta"]["samples"]["class_folders"]
        _rehash(m)

    _edit(copy, downgrade)
    old = copy.rename(copy.with_name(json.loads((copy / "manifest.json").read_text())["meta"]["fingerprint"]))
    assert open_dof(old, verify=True).splits
    _edit(old, lambda m: (_swap_classes(m), _rehash(m)))  # a swap in a 1.0 set: its class folders tell
    with pytest.raises(DofError, match="other than their class folder"):
        open_dof(old)


# --- item 3: non-finite features are refused when written, extracted and read ------------------------------------


def _finite_shard(n: int = 6) -> dict[str, np.ndarray]:
    return {
        "features": np.random.default_rng(0).standard_normal((n, 4)).astype(np.float16),
        "index": np.arange(100, 100 + n),
        "view": np.zeros(n, dtype=np.int16),
        "target.label": np.zeros(n, dtype=np.float32),
    }


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_the_writer_refuses_non_finite_features_naming_the_row(tmp_path, bad):
    writer = DofWriter(tmp_path / "set", {})
    shard = _finite_shard()
    shard["features"][4, 2] = bad
    with pytest.raises(
        DofError, match=r"'val' k=3: the features of row\(s\) \[4\] \(sample index \[104\]\) are not"
    ):
        writer.write_shard("val", 3, shard)
    shard = _finite_shard()
    shard["target.label"][1] = np.inf
    with pytest.raises(DofError, match=r"target 'target.label' is infinite in row\(s\) \[1\]"):
        writer.write_shard("val", 3, shard)
    assert not list((tmp_path / "set" / "shards").iterdir())


def _plant_inf(root: Path, rel: str, row: int) -> None:
    """Put an inf into a stored feature and record the file's new sha256: only the value check can see it."""
    path = root / rel
    features = np.load(path)
    features[row, 0] = np.inf
    np.save(path, features, allow_pickle=False)
    _edit(root, lambda m: m["files"][rel].update(size=path.stat().st_size, sha256=sha256_file(path)))


def test_the_reader_refuses_non_finite_features_in_memory_memmapped_and_verified(tmp_path):
    root = tmp_path / "set"
    writer = DofWriter(root, {})
    for k in range(2):
        writer.write_shard("train", k, {**_finite_shard(), "index": np.arange(6 * k, 6 * k + 6)})
    writer.finalize()
    _plant_inf(root, "shards/train-00001.features.npy", row=2)
    named = (
        r"shards/train-00001\.features\.npy holds non-finite features \(NaN or inf\) in row 2.*extract again"
    )
    with pytest.raises(DofError, match=named):
        open_dof(root, verify=True)
    with pytest.raises(DofError, match=named):
        open_dof(root).split("train").take(np.array([0]))  # in memory: the whole split is checked once
    split = open_dof(root, memory_budget=0).split("train")
    assert split.take(np.arange(6))["features"].shape == (
        6,
        4,
    )  # memory-mapped: batches without it are served
    with pytest.raises(DofError, match=named):
        split.take(np.array([1, 8]))
    with pytest.raises(DofError, match=named):
        split.arrays()


def test_extraction_refuses_a_backbone_that_gives_nan_or_overflows(made, tmp_path, monkeypatch):
    images, _ = made
    cfg = compose_train(_overrides(images), tmp_path, config="extract")
    built = extraction.frozen_backbone

    def broken(scale: float):
        def build(cfg):
            backbone = built(cfg)
            with torch.no_grad():
                for p in backbone.parameters():
                    p.mul_(scale) if np.isfinite(scale) else p.fill_(scale)
            return backbone

        return build

    monkeypatch.setattr(extraction, "frozen_backbone", broken(float("nan")))
    with pytest.raises(
        DataError, match=r"backbone 'small_cnn' gives NaN or inf features for \d+ image\(s\): .*png"
    ):
        extraction.extract(cfg)
    monkeypatch.setattr(extraction, "frozen_backbone", broken(30.0))  # finite, beyond float16's 65504
    with pytest.raises(DataError, match=r"exceed the range of float16.*extract\.dtype=float32"):
        extraction.extract(cfg)
    assert not list((tmp_path / "dof").rglob("manifest.json"))


@pytest.mark.slow
def test_train_py_stops_on_an_inf_in_a_shard(made, copy, tmp_path):
    images, _ = made
    rel = sorted(json.loads((copy / "manifest.json").read_text())["files"])[0]
    assert rel.endswith(".features.npy")
    _plant_inf(copy, rel, row=0)
    result = run_script(
        [
            "train.py",
            *_overrides(images),
            "features=true",
            f"paths.root_dir={tmp_path}",
            f"hydra.run.dir={tmp_path / 'run'}",
            "data.num_workers=0",
            "trainer.max_epochs=1",
            "export.onnx=false",
        ],
        cwd=ROOT,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"{Path(rel).name} holds non-finite features" in result.stderr and "extract again" in result.stderr
    assert "Traceback" not in result.stderr
    shipped = [
        p.name
        for p in (tmp_path / "run").rglob("*")
        if p.suffix in (".ckpt", ".onnx") or p.name == "metrics.json"
    ]
    assert shipped == []  # no model, no metrics


# --- item 8: two extractions of one set at once -----------------------------------------------------------------


class _Messages(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _extract_concurrently(cfg, barrier, results) -> None:
    """One of two processes extracting the same set; shards are written slowly so that the two overlap."""
    torch.set_num_threads(1)
    messages = _Messages()
    logger = logging.getLogger("headstart.data.extraction")
    logger.addHandler(messages)
    logger.setLevel(logging.INFO)
    write = DofWriter.write_shard

    def slowly(self, *args, **kwargs):
        time.sleep(0.2)
        return write(self, *args, **kwargs)

    DofWriter.write_shard = slowly
    barrier.wait()
    try:
        path, reused = extraction.dof_for_config(cfg)
        results.put((str(path), reused, None, messages.lines))
    except BaseException as e:  # reported to the test, which names it
        results.put((None, None, f"{type(e).__name__}: {e}", messages.lines))


def test_two_extractions_of_one_set_at_once_wait_and_reuse(made, tmp_path):
    images, _ = made
    cfg = compose_train([*_overrides(images), "extract.shard_size=8"], tmp_path, config="extract")
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_extract_concurrently, args=(cfg, barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    got = [results.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert [g[2] for g in got] == [None, None], got  # both succeed
    assert got[0][0] == got[1][0] and sorted(g[1] for g in got) == [False, True]  # one extracted, one reused
    assert any("waiting for another extraction" in line for g in got for line in g[3])
    root = Path(got[0][0])
    dof = open_dof(root, verify=True)
    assert sum(len(dof.split(s)) for s in dof.splits) == 30
    on_disk = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}
    assert on_disk == {"manifest.json", *dof.manifest["files"]}  # no .done.json, no .tmp, no lock inside
    assert [p.name for p in root.parent.iterdir()] == [root.name]  # no lock file left beside it
