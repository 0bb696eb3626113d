"""Shared test helpers: the repository root, the real data beside it, composing configs the way users do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


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
    """`python train.py` with no arguments (only the output root moved to a temp dir), run once per session and
    shared by every test that reads what the main job writes or prints."""
    base = tmp_path_factory.mktemp("main_job")
    result = run_script(["train.py", f"paths.root_dir={base}"], cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = sorted(p.parent for p in base.glob("outputs/*/*/.hydra"))
    return MainJob(run=run, output=result.stdout + result.stderr)


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
    base = tmp_path_factory.mktemp("dog_cat_small_dof")
    cfg = compose_train(
        ["experiment=dog_cat", f"data.root={root}", "extract.progress=false"], base, config="extract"
    )
    return extract(cfg)
