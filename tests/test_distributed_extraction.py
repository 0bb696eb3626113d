"""Distributed extraction: independent ranks write parts of a DoF set, one merge makes the set a single process
would have written (same files, same bytes)."""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import ROOT, compose_train, make_tree, run_script

import headstart.data.extraction as engine
import headstart.train.extract as extraction
from headstart.dof import open_dof
from headstart.errors import ConfigError, DataError

VOLATILE = ("created", "stats")  # the manifest's date and timings differ between any two extractions


@pytest.fixture
def tiny(tmp_path: Path) -> list[str]:
    """30 images, 3 classes, small CNN; 4 rows per shard so that every split has several shards to share."""
    make_tree(tmp_path / "imgs", {"train": {"a": 8, "b": 8, "c": 8}, "val": {"a": 2, "b": 2, "c": 2}})
    return [
        "data=folder",
        f"data.root={tmp_path / 'imgs'}",
        "backbone=small_cnn",
        "extract.progress=false",
        "extract.shard_size=4",
    ]


def _extract(overrides: list[str], out: Path) -> Path:
    return extraction.extract(compose_train(overrides, out, config="extract"))


def _rank(r: int, n: int = 2) -> list[str]:
    return [f"extract.rank={r}", f"extract.world_size={n}"]


def _files(root: Path) -> dict[str, str]:
    """sha256 of every file under root; the manifest without its date and timings."""
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if path.name == "manifest.json":
            manifest = json.loads(path.read_text())
            data = json.dumps(
                {k: v for k, v in manifest.items() if k not in VOLATILE}, sort_keys=True
            ).encode()
        else:
            data = path.read_bytes()
        out[str(path.relative_to(root))] = hashlib.sha256(data).hexdigest()
    return out


@pytest.fixture
def no_auto_merge(monkeypatch):
    """Ranks that do not merge (as when the last two ranks finish at once on a file system slow to show each other's
    files): the parts are merged explicitly. Calling the fixture's value lets ranks merge again."""
    monkeypatch.setattr(engine, "finished_parts", lambda root, world_size: {})
    return lambda: monkeypatch.undo()


@pytest.mark.slow
def test_two_concurrent_ranks_write_the_set_one_process_writes(tiny, tmp_path):
    single = _extract(tiny, tmp_path / "single")
    base = [
        "extract.py",
        *tiny,
        f"paths.root_dir={tmp_path / 'dist'}",
        "data.num_workers=0",
        f"hydra.run.dir={tmp_path / 'hydra'}",
    ]
    with ThreadPoolExecutor(2) as pool:  # both ranks at once, as two jobs of a SLURM array would run
        results = list(pool.map(lambda r: run_script([*base, *_rank(r)], cwd=ROOT), range(2)))
    for result in results:
        assert result.returncode == 0, result.stderr[-2000:]
    root = tmp_path / "dist" / "dof" / "digits" / single.name
    assert (root / "manifest.json").is_file()  # the last rank to finish merged
    assert not (root / "parts").exists()
    assert any(single.name in r.stdout for r in results)
    assert _files(root) == _files(single)
    assert open_dof(root, verify=True).manifest["stats"]["distributed"]["world_size"] == 2

    merged = run_script([*base, "extract.world_size=2", "extract.merge=true"], cwd=ROOT)
    assert merged.returncode == 0, merged.stderr[-2000:]  # merging a merged set: nothing to do
    assert merged.stdout.strip().splitlines()[-1] == str(root)


def test_explicit_merge_refuses_missing_ranks_then_merges(tiny, tmp_path, no_auto_merge):
    single = _extract(tiny, tmp_path / "single")
    out = tmp_path / "dist"
    part = _extract([*tiny, *_rank(0)], out)
    assert part.name == single.name and not (part / "manifest.json").exists()
    with pytest.raises(DataError, match=r"rank\(s\) \[1\] of 2 have not finished.*extract.rank=R"):
        _extract([*tiny, "extract.world_size=2", "extract.merge=true"], out)
    assert sorted(p.name for p in part.iterdir()) == ["parts"]  # nothing written outside the parts
    _extract([*tiny, *_rank(1)], out)
    assert not (part / "manifest.json").exists()
    assert _extract([*tiny, "extract.world_size=2", "extract.merge=true"], out) == part
    assert _files(part) == _files(single)


def test_a_damaged_part_is_named_and_its_rank_redoes_it(tiny, tmp_path, no_auto_merge):
    single = _extract(tiny, tmp_path / "single")
    out = tmp_path / "dist"
    for r in range(2):
        root = _extract([*tiny, *_rank(r)], out)
    record = root / "parts" / "rank-0-of-2" / "part.json"
    text = record.read_text()
    record.write_text(
        text.replace('"meta_fingerprint": "', '"meta_fingerprint": "0')
    )  # as if other libraries
    with pytest.raises(DataError, match=r"rank 0's part .* was made with other settings.*run rank 0 again"):
        _extract([*tiny, "extract.world_size=2", "extract.merge=true"], out)
    record.write_text(text)
    lost = next((root / "parts" / "rank-1-of-2" / "shards").glob("*.features.npy"))
    lost.unlink()
    with pytest.raises(DataError, match=rf"{lost.name} of rank 1 is missing.*run rank 1 again"):
        _extract([*tiny, "extract.world_size=2", "extract.merge=true"], out)
    assert not (root / "shards").exists() and not (root / "manifest.json").exists()
    no_auto_merge()
    _extract([*tiny, *_rank(1)], out)  # redoes the lost shard; last to finish: merges
    assert _files(root) == _files(single)


def test_ranks_of_another_config_are_not_mixed_in(tiny, tmp_path, no_auto_merge):
    out = tmp_path / "dist"
    root = _extract([*tiny, *_rank(0)], out)
    other = _extract([*tiny, *_rank(1), "seed=7"], out)  # other random weights: another set
    assert other != root
    with pytest.raises(DataError, match=r"rank 1's part was found under .*another config.*backbone"):
        _extract([*tiny, "extract.world_size=2", "extract.merge=true"], out)

    _extract([*tiny, *_rank(1), "extract.shard_size=8"], out)  # same set, other shard plan
    with pytest.raises(DataError, match=r"rank 1 ran with other settings.*shard_size"):
        _extract([*tiny, "extract.world_size=2", "extract.merge=true"], out)
    with pytest.raises(DataError, match=r"rank-1-of-2 .*other settings.*shard_size"):
        _extract([*tiny, *_rank(1)], out)  # the part is resumed only with the plan it was started with
    assert not (root / "manifest.json").exists() and not (root / "shards").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (_rank(2), r"extract.rank=2 is out of range for extract.world_size=2: ranks are 0..1"),
        (_rank(0, 0), r"extract.world_size=0 is invalid"),
        (["extract.merge=true"], r"extract.merge=true merges the parts.*extract.world_size=N"),
    ],
)
def test_impossible_ranks_are_config_errors_and_write_nothing(tiny, tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        _extract([*tiny, *override], tmp_path)
    assert not (tmp_path / "dof").exists()


def test_extract_py_reports_a_bad_rank_without_traceback(tiny, tmp_path):
    result = run_script(
        ["extract.py", *tiny, f"paths.root_dir={tmp_path}", f"hydra.run.dir={tmp_path / 'h'}", *_rank(3)],
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert "extract.rank=3 is out of range" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "dof").exists()
