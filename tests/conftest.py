"""Shared test helpers: the repository root, the real data beside it, composing configs the way users do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from filelock import FileLock
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (`make test` runs `-n auto`), the workers split the cores: each worker's torch, and every
    script it runs, gets cores / workers threads, so that two workers do not fight over the same cores."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def once_per_run(tmp_path_factory: pytest.TempPathFactory, name: str, make: Callable[[Path], None]) -> Path:
    """A folder `make(folder)` fills once per test run, shared by every pytest-xdist worker (the first worker to
    need it makes it while the others wait on its lock)."""
    base = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:
        base = base.parent  # the run's temp dir, above each worker's own
    folder = base / name
    with FileLock(str(base / f"{name}.lock")):
        if not (folder / ".done").is_file():
            folder.mkdir(parents=True, exist_ok=True)
            make(folder)
            (folder / ".done").touch()
    return folder


def shared_data(name: str) -> Path:
    """A folder of ../shared/data, or skip the test when it is absent."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"{path} is absent (real test data lives in ../shared/data)")
    return path


def compose_train(overrides: list[str], tmp_path: Path, config: str = "train") -> DictConfig:
    """Compose conf/<config>.yaml with overrides; outputs, data and logs go under tmp_path."""
    base = [
        f"paths.root_dir={tmp_path}",
        f"paths.output_dir={tmp_path / 'run'}",
        "data.num_workers=0",
    ]
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        return compose(config, overrides=base + overrides)


def run_script(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run an entry script as a user would (python train.py ...) and capture its output."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def digits_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir shared by tests in one session, where digits are materialized once."""
    return tmp_path_factory.getbasetemp() / "data"


def make_image(path: Path, seed: int = 0, size: tuple[int, int] = (20, 14), gray: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) if gray else (size[1], size[0], 3)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)
    return path


def make_tree(root: Path, spec: dict[str, dict[str, int]], ext: str = ".png") -> None:
    """spec: {"train": {"cat": 3, ...}, ...}; use "" as split for class folders directly under root."""
    k = 0
    for split, by_class in spec.items():
        for cls, n in by_class.items():
            for i in range(n):
                make_image(root / split / cls / f"{cls}_{i:03d}{ext}", seed=k)
                k += 1


def fake_job(job: Path, tmp_path: Path, overrides: list[str], metrics: dict | None) -> None:
    """A job directory as Hydra leaves it: .hydra/{config,hydra,overrides}.yaml, plus the run's metrics.json
    (none when `metrics` is None: the job failed)."""
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    (job / ".hydra").mkdir(parents=True)
    hydra_node = OmegaConf.create({"hydra": OmegaConf.to_container(cfg.hydra, resolve=False)})
    OmegaConf.save(hydra_node, job / ".hydra" / "hydra.yaml")
    config = OmegaConf.to_container(cfg, resolve=False)
    del config["hydra"]
    OmegaConf.save(OmegaConf.create(config), job / ".hydra" / "config.yaml")
    OmegaConf.save(OmegaConf.create(overrides), job / ".hydra" / "overrides.yaml")
    if metrics is not None:
        (job / "metrics.json").write_text(json.dumps(metrics))


@dataclass(frozen=True)
class MainJob:
    """The main job as a user runs it: its run directory and everything it printed (stdout, then stderr)."""

    run: Path
    output: str


@pytest.fixture(scope="session")
def main_job(tmp_path_factory: pytest.TempPathFactory) -> MainJob:
    """`python train.py` with no arguments (only the output root moved to a temp dir), run once per test run and
    shared by every test that reads what the main job writes or prints (read only: tests run in parallel)."""

    def make(base: Path) -> None:
        result = run_script(["train.py", f"paths.root_dir={base}"], cwd=ROOT)
        assert result.returncode == 0, result.stderr[-3000:]
        (run,) = sorted(p.parent for p in base.glob("outputs/*/*/.hydra"))
        (base / "run.txt").write_text(str(run))
        (base / "output.txt").write_text(result.stdout + result.stderr)

    base = once_per_run(tmp_path_factory, "main_job", make)
    return MainJob(run=Path((base / "run.txt").read_text()), output=(base / "output.txt").read_text())


@pytest.fixture(scope="session")
def digits_run(main_job: MainJob) -> Path:
    """The main job's run directory."""
    return main_job.run


@pytest.fixture(scope="session")
def dog_cat_small_dof(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The DoF set of ../shared/data/dog_cat_small with the pretrained EfficientNet-Lite0 (`extract.py
    experiment=dog_cat`), extracted once per session for the tests that only read it (skips without the data)."""
    from headstart.train.extract import extract

    root = shared_data("dog_cat_small")

    def make(base: Path) -> None:
        cfg = compose_train(
            ["experiment=dog_cat", f"data.root={root}", "extract.progress=false"], base, config="extract"
        )
        (base / "set.txt").write_text(str(extract(cfg)))

    return Path((once_per_run(tmp_path_factory, "dog_cat_small_dof", make) / "set.txt").read_text())
