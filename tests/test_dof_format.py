"""The DoF feature-set format on real files: round trip, batch reads, resume, integrity checks, no pickle."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from headstart.dof import FORMAT_NAME, FORMAT_VERSION, DofError, DofWriter, fingerprint, open_dof
from headstart.dof.files import sha256_file

META = {"backbone": {"name": "toy", "weights_sha256": "ab" * 32}, "transform": {"size": 32}, "views": 1}
D = 8


def _shard(n: int, start: int, seed: int, dtype=np.float16) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 3, n).astype(np.float32)
    label[rng.random(n) < 0.3] = np.nan
    tags = (rng.random((n, 3)) < 0.5).astype(np.float32)
    if n:
        tags[0] = np.nan  # a sample without multilabel annotation
    return {
        "features": rng.standard_normal((n, D)).astype(dtype),
        "index": np.arange(start, start + n),
        "view": np.zeros(n, dtype=np.int64),
        "target.label": label,
        "target.person.tags": tags,
    }


SPLITS = {"train": [5, 7, 3], "val": [4, 0, 6]}


def _write(root: Path, splits: dict[str, list[int]] = SPLITS, finalize: bool = True) -> dict:
    """Write a set (shards in reverse order, to show that rows follow k) and return the expected arrays."""
    writer = DofWriter(root, META)
    expected = {}
    for s, (split, sizes) in enumerate(splits.items()):
        starts = np.cumsum([0, *sizes])
        shards = [_shard(n, int(starts[k]), seed=10 * s + k) for k, n in enumerate(sizes)]
        for k in reversed(range(len(sizes))):
            writer.write_shard(split, k, shards[k])
        expected[split] = {name: np.concatenate([sh[name] for sh in shards]) for name in shards[0]}
    if finalize:
        writer.finalize(stats={"seconds": 1.5, "images_per_second": 123.0})
    return expected


@pytest.fixture
def np_load_calls(monkeypatch) -> list:
    """Record the mmap_mode of every np.load call."""
    calls = []
    real = np.load

    def load(*args, **kwargs):
        calls.append(kwargs.get("mmap_mode"))
        return real(*args, **kwargs)

    monkeypatch.setattr(np, "load", load)
    return calls


def _edit_manifest(root: Path, **changes) -> None:
    path = root / "manifest.json"
    m = json.loads(path.read_text())
    m.update(changes)
    path.write_text(json.dumps(m))


# --- round trip and batch reads -------------------------------------------------------------------------------


def test_round_trip_keeps_values_dtypes_and_row_order(tmp_path):
    expected = _write(tmp_path / "set")
    dof = open_dof(tmp_path / "set", verify=True)
    assert dof.splits == ["train", "val"]
    assert dof.feature_shape == (D,) and dof.feature_dtype == np.float16
    assert dof.meta == META and dof.in_memory
    m = dof.manifest
    assert m["format"] == FORMAT_NAME and m["version"] == FORMAT_VERSION
    assert m["splits"]["train"] == {
        "count": 15,
        "shards": [{"k": 0, "count": 5}, {"k": 1, "count": 7}, {"k": 2, "count": 3}],
    }
    assert m["stats"] == {"seconds": 1.5, "images_per_second": 123.0}
    assert list(m["arrays"]) == ["features", "index", "view", "target.label", "target.person.tags"]
    assert dof.nbytes == sum(f.stat().st_size for f in (tmp_path / "set" / "shards").iterdir())
    assert sorted(m["files"]) == sorted(f"shards/{f.name}" for f in (tmp_path / "set" / "shards").iterdir())
    for split, arrays in expected.items():
        got = dof.split(split).arrays()
        assert list(got) == list(arrays) and len(dof.split(split)) == len(arrays["index"])
        for name, a in arrays.items():
            want_dtype = {"index": np.int64, "view": np.int16}.get(name, a.dtype)
            assert got[name].dtype == want_dtype
            np.testing.assert_array_equal(got[name], a)  # NaN == NaN here: missing labels survive
    assert np.isnan(dof.split("train").arrays()["target.person.tags"][0]).all()


@pytest.mark.parametrize("budget", [2 * 1024**3, 0], ids=["in_memory", "memmap"])
def test_take_matches_fancy_indexing_of_arrays(tmp_path, budget, np_load_calls):
    _write(tmp_path / "set")
    dof = open_dof(tmp_path / "set", memory_budget=budget)
    assert dof.in_memory == (budget > 0)
    rows = np.random.default_rng(0).permutation(15)
    rows = np.concatenate([rows, rows[:4]])  # repeats too
    split = dof.split("train")
    batch = split.take(rows)
    whole = split.arrays()
    assert list(batch) == split.array_names
    for name in split.array_names:
        assert not isinstance(batch[name], np.memmap)
        np.testing.assert_array_equal(batch[name], whole[name][rows])
    assert {k: v.shape[0] for k, v in split.take(np.array([], dtype=np.int64)).items()} == dict.fromkeys(
        split.array_names, 0
    )
    # memory-mapped: every read went through np.load(mmap_mode="r"), nothing was loaded whole
    assert np_load_calls and set(np_load_calls) == ({None} if dof.in_memory else {"r"})


def test_memmapped_take_reads_only_the_shards_it_needs(tmp_path, np_load_calls):
    _write(tmp_path / "set")
    split = open_dof(tmp_path / "set", memory_budget=0).split("train")
    batch = split.take(np.array([6, 5]))  # both rows lie in shard 1
    np.testing.assert_array_equal(batch["index"], [6, 5])
    assert len(np_load_calls) == len(split.array_names) and set(np_load_calls) == {"r"}
    split.take(np.array([11, 5]))  # shard 1 again: already open
    assert len(np_load_calls) == len(split.array_names)


def test_take_rejects_bad_rows(tmp_path):
    _write(tmp_path / "set")
    split = open_dof(tmp_path / "set").split("val")
    with pytest.raises(IndexError):
        split.take(np.array([10]))
    with pytest.raises(IndexError):
        split.take(np.array([-1]))
    with pytest.raises(TypeError):
        split.take(np.array([0.5]))


def test_feature_maps_float32(tmp_path):
    writer = DofWriter(tmp_path / "maps", {"cut": "layer3"})
    feats = np.random.default_rng(1).standard_normal((4, 2, 3, 3)).astype(np.float32)
    writer.write_shard("train", 0, {"features": feats, "index": np.arange(4), "view": [0, 1, 0, 1]})
    writer.finalize()
    dof = open_dof(tmp_path / "maps", memory_budget=0)
    assert dof.feature_shape == (2, 3, 3) and dof.feature_dtype == np.float32
    got = dof.split("train").take(np.array([3, 0]))
    np.testing.assert_array_equal(got["features"], feats[[3, 0]])
    np.testing.assert_array_equal(got["view"], [1, 0])


def test_unknown_split_lists_available(tmp_path):
    _write(tmp_path / "set")
    with pytest.raises(DofError, match=r"no split 'test'.*\['train', 'val'\]"):
        open_dof(tmp_path / "set").split("test")


# --- writing: validation, resume, manifest last ---------------------------------------------------------------


def test_write_shard_validates_arrays(tmp_path):
    writer = DofWriter(tmp_path / "set", META)
    ok = _shard(3, 0, 0)
    bad_cases = {
        "missing required": {k: v for k, v in ok.items() if k != "view"},
        "first dimension": {**ok, "index": np.arange(4)},
        "float16 or float32": {**ok, "features": ok["features"].astype(np.float64)},
        "integers": {**ok, "index": np.arange(3.0)},
        "invalid DoF array name": {**ok, "target_label": ok["target.label"]},
        "numbers only": {**ok, "target.label": np.array(["a", "b", "c"])},
    }
    for match, arrays in bad_cases.items():
        with pytest.raises(DofError, match=match):
            writer.write_shard("train", 0, arrays)
    with pytest.raises(DofError, match="split name"):
        writer.write_shard("../evil", 0, ok)
    writer.write_shard("train", 0, ok)
    with pytest.raises(DofError, match="feature dtype/per-sample shape"):
        writer.write_shard("train", 1, {**ok, "features": np.zeros((3, D + 1), np.float16)})
    with pytest.raises(DofError, match="arrays"):
        writer.write_shard("val", 0, {k: v for k, v in ok.items() if k != "target.label"})


def test_object_arrays_are_refused(tmp_path):
    writer = DofWriter(tmp_path / "set", META)
    ok = _shard(2, 0, 0)
    for name in ("features", "target.label"):
        obj = np.empty(2, dtype=object)
        obj[:] = [{"a": 1}, {"b": 2}]
        with pytest.raises(DofError, match="no pickled objects"):
            writer.write_shard("train", 0, {**ok, name: obj})
    assert not list((tmp_path / "set" / "shards").iterdir())


def test_manifest_is_written_last_and_incomplete_sets_are_refused(tmp_path):
    root = tmp_path / "set"
    _write(root, finalize=False)
    assert not (root / "manifest.json").exists()
    assert len(list((root / "shards").glob("*.done.json"))) == 6
    with pytest.raises(
        DofError, match=r"incomplete \(extraction did not finish\).*Rerun the extraction.*it resumes"
    ):
        open_dof(root)
    DofWriter(root, META).finalize()
    assert (root / "manifest.json").exists()
    leftovers = [p.name for p in root.rglob("*") if p.name.endswith((".tmp", ".done.json"))]
    assert leftovers == []
    open_dof(root, verify=True)


def test_writer_refuses_a_complete_set(tmp_path):
    _write(tmp_path / "set")
    with pytest.raises(DofError, match="already complete"):
        DofWriter(tmp_path / "set", META)


def test_resume_sees_completed_shards_and_redoes_broken_ones(tmp_path):
    root = tmp_path / "set"
    writer = DofWriter(root, META)
    shards = [_shard(4, 4 * k, k) for k in range(4)]
    for k in range(4):
        writer.write_shard("train", k, shards[k])
    del writer  # "interrupted"

    (root / "shards" / "train-00001.features.npy").unlink()  # file lost after its record was written
    path = root / "shards" / "train-00002.target.label.npy"
    path.write_bytes(path.read_bytes()[:-3])  # truncated
    (root / "shards" / "train-00003.view.npy.tmp").write_bytes(b"half a write")

    writer = DofWriter(root, META)
    assert writer.completed_shards() == {("train", 0), ("train", 3)}
    names = sorted(p.name for p in (root / "shards").iterdir())
    assert not any(n.startswith(("train-00001.", "train-00002.")) for n in names), names  # leftovers gone
    assert not any(n.endswith(".tmp") for n in names)
    with pytest.raises(DofError, match=r"lacks shard\(s\) \[1, 2\]"):
        writer.finalize()
    for k in (1, 2):
        writer.write_shard("train", k, shards[k])
    writer.finalize()
    got = open_dof(root, verify=True).split("train").arrays()
    np.testing.assert_array_equal(got["index"], np.arange(16))
    np.testing.assert_array_equal(got["features"], np.concatenate([s["features"] for s in shards]))


def test_resume_with_different_meta_is_refused(tmp_path):
    root = tmp_path / "set"
    DofWriter(root, META).write_shard("train", 0, _shard(2, 0, 0))
    assert DofWriter(root, dict(reversed(META.items()))).completed_shards() == {("train", 0)}  # same content
    with pytest.raises(DofError, match="different settings"):
        DofWriter(root, {**META, "views": 2})


def test_finalize_refuses_gaps_in_shard_numbering(tmp_path):
    writer = DofWriter(tmp_path / "set", META)
    writer.write_shard("train", 0, _shard(2, 0, 0))
    writer.write_shard("train", 2, _shard(2, 4, 2))
    with pytest.raises(DofError, match=r"'train' lacks shard\(s\) \[1\]"):
        writer.finalize()
    assert not (tmp_path / "set" / "manifest.json").exists()


# --- reading: integrity checks --------------------------------------------------------------------------------


def test_missing_directory_and_not_a_dof_manifest(tmp_path):
    with pytest.raises(DofError, match="does not exist"):
        open_dof(tmp_path / "nowhere")
    _write(tmp_path / "set")
    (tmp_path / "set" / "manifest.json").write_text("{not json")
    with pytest.raises(DofError, match="cannot be read as JSON"):
        open_dof(tmp_path / "set")
    (tmp_path / "set" / "manifest.json").write_text(
        json.dumps({"format": "something-else", "version": "1.0"})
    )
    with pytest.raises(DofError, match=r"not a DoF manifest.*something-else"):
        open_dof(tmp_path / "set")


def test_major_version_refused_minor_accepted(tmp_path):
    root = tmp_path / "set"
    _write(root)
    _edit_manifest(root, version="1.9")
    assert open_dof(root).splits == ["train", "val"]
    _edit_manifest(root, version="2.0")
    with pytest.raises(DofError, match=r"version 2\.0; this headstart reads version 1\.x"):
        open_dof(root)


def test_truncated_file_detected_at_open(tmp_path):
    root = tmp_path / "set"
    _write(root)
    path = root / "shards" / "val-00002.features.npy"
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(DofError, match=r"val-00002\.features\.npy.*truncated or altered.*extract again"):
        open_dof(root)
    path.unlink()
    with pytest.raises(DofError, match=r"val-00002\.features\.npy is missing"):
        open_dof(root)


def test_altered_file_of_same_size_detected_by_verify_only(tmp_path):
    root = tmp_path / "set"
    _write(root)
    path = root / "shards" / "train-00001.features.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    dof = open_dof(root)  # sizes match: the cheap check passes
    with pytest.raises(DofError, match=r"train-00001\.features\.npy does not match its sha256"):
        dof.verify()
    with pytest.raises(DofError, match=r"train-00001\.features\.npy does not match its sha256"):
        open_dof(root, verify=True)


RAN: list[str] = []


def _record(what: str) -> None:
    RAN.append(what)


class _Payload:
    """Unpickling this calls _record: a canary for pickled code being run."""

    def __reduce__(self):
        return (_record, ("executed",))


@pytest.mark.parametrize("budget", [2 * 1024**3, 0], ids=["in_memory", "memmap"])
def test_pickled_npy_is_refused_not_executed(tmp_path, budget):
    root = tmp_path / "set"
    _write(root)
    rel = "shards/train-00000.target.label.npy"
    obj = np.empty(5, dtype=object)
    obj[:] = [_Payload() for _ in range(5)]
    np.save(root / rel, obj, allow_pickle=True)
    np.load(root / rel, allow_pickle=True)  # the canary works: loading with pickle runs the payload
    assert RAN == ["executed"] * 5
    RAN.clear()
    m = json.loads((root / "manifest.json").read_text())
    m["files"][rel] = {"size": (root / rel).stat().st_size, "sha256": sha256_file(root / rel)}
    (root / "manifest.json").write_text(json.dumps(m))

    for verify in (True, False):  # sizes and hashes agree with the forged manifest; the .npy header does not
        with pytest.raises(DofError, match=r"train-00000\.target\.label\.npy.*never hold pickled objects"):
            open_dof(root, verify=verify, memory_budget=budget)
    assert RAN == []


def test_wrong_dtype_file_of_right_size_is_refused(tmp_path):
    root = tmp_path / "set"
    _write(root)
    rel = "shards/train-00000.index.npy"
    np.save(root / rel, np.arange(5, dtype=np.float64), allow_pickle=False)  # same size as int64
    with pytest.raises(DofError, match=r"holds float64.*manifest.json says int64"):
        open_dof(root, memory_budget=0)  # found in the file's header at open, not at the first read


# --- fingerprint ----------------------------------------------------------------------------------------------


def test_fingerprint_is_deterministic_order_independent_and_value_sensitive(tmp_path):
    spec = {
        "backbone": "resnet18",
        "size": 224,
        "mean": [0.485, 0.456, 0.406],
        "aug": {"flip": True, "views": 2},
    }
    fp = fingerprint(spec)
    assert len(fp) == 16 and int(fp, 16) >= 0
    reordered = {
        "aug": {"views": 2, "flip": True},
        "mean": [0.485, 0.456, 0.406],
        "size": 224,
        "backbone": "resnet18",
    }
    assert fingerprint(reordered) == fp
    assert fingerprint({**spec, "size": 225}) != fp
    assert fingerprint({**spec, "mean": [0.485, 0.456, 0.4060001]}) != fp
    assert fingerprint({**spec, "aug": {"flip": True, "views": 2.0}}) != fp
    assert fingerprint({**spec, "size": np.int64(224)}) == fp
    # same value in a fresh interpreter (no hash randomization involved)
    import subprocess
    import sys

    code = f"from headstart.dof import fingerprint; print(fingerprint({spec!r}))"
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == fp
    with pytest.raises(DofError, match="not JSON-serializable"):
        fingerprint({"f": object()})


# --- worker processes -----------------------------------------------------------------------------------------


def test_split_pickles_without_memmaps_and_reopens_in_a_new_process(tmp_path, monkeypatch, np_load_calls):
    _write(tmp_path / "set")
    split = open_dof(tmp_path / "set", memory_budget=0).split("train")
    rows = np.array([14, 0, 7])
    first = split.take(rows)
    n_open = len(np_load_calls)
    split.take(rows)
    assert len(np_load_calls) == n_open  # maps are cached within a process

    state = split.__getstate__()
    assert not any(
        isinstance(v, np.ndarray) and not isinstance(v, np.generic) and v.size > 3 for v in state.values()
    )
    blob = pickle.dumps(split)
    assert b"memmap" not in blob and len(blob) < 2000
    clone = pickle.loads(blob)
    for name, a in clone.take(rows).items():
        np.testing.assert_array_equal(a, first[name])
    assert len(np_load_calls) == 2 * n_open  # the clone opened its own maps

    real_pid = os.getpid()
    monkeypatch.setattr(os, "getpid", lambda: real_pid + 1)  # as in a forked DataLoader worker
    for name, a in split.take(rows).items():
        np.testing.assert_array_equal(a, first[name])
    assert len(np_load_calls) == 3 * n_open  # re-opened, not inherited


def test_in_memory_split_pickles_without_data(tmp_path):
    _write(tmp_path / "set")
    split = open_dof(tmp_path / "set").split("train")
    whole = split.arrays()
    assert not whole["features"].flags.writeable  # the cache cannot be corrupted by a caller
    blob = pickle.dumps(split)
    assert len(blob) < 2000
    np.testing.assert_array_equal(pickle.loads(blob).take(np.array([3]))["index"], whole["index"][[3]])
