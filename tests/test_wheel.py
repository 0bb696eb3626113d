"""The installable tool: a wheel (`pip install .`) carries conf/ and installs headstart-train, ...; the commands work
from any folder and write data/, outputs/ there. The root scripts of a clone are shims over the same mains."""

from __future__ import annotations

import json
import os
import runpy
import shutil
import subprocess
import sys
import sysconfig
from importlib.metadata import version
from pathlib import Path

import pytest
from conftest import ROOT

from headstart import cli

COMMANDS = ("train", "extract", "evaluate", "predict", "prune")


def _run(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HEADSTART_ROOT")}
    env |= {"PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def _ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, f"{result.args}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def test_a_clone_reads_conf_at_the_repository_root_and_its_scripts_are_shims():
    assert cli.conf_dir() == ROOT / "conf"
    for name in COMMANDS:  # python <name>.py runs the very main headstart-<name> runs
        assert runpy.run_path(str(ROOT / f"{name}.py"))[name] is getattr(cli, name)


def _build_wheel(tmp_path: Path) -> Path:
    """The wheel of a copy of the checkout's packaging inputs (no build/ or egg-info left in the repository), built
    offline with the setuptools installed here."""
    setuptools = version("setuptools")
    assert tuple(int(p) for p in setuptools.split(".")[:2]) >= (70, 1), (
        f"setuptools {setuptools} cannot build wheels by itself (70.1 can); `make test` installs the locked one"
    )
    source = tmp_path / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    shutil.copytree(ROOT / "src", source / "src", ignore=ignore)
    shutil.copytree(ROOT / "conf", source / "conf", ignore=ignore)
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    dist = tmp_path / "dist"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-cache-dir"]
    _ok(
        _run(
            [*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(dist), str(source)],
            tmp_path,
        )
    )
    (wheel,) = dist.glob("headstart-*.whl")
    return wheel


def _venv_with(wheel: Path, tmp_path: Path) -> Path:
    """A fresh environment outside the repository holding the wheel, borrowing this one's installed dependencies."""
    env = tmp_path / "env"
    _ok(_run([sys.executable, "-m", "venv", "--without-pip", str(env)], tmp_path))
    python = env / "bin" / "python"
    pip = [
        sys.executable,
        "-m",
        "pip",
        "--disable-pip-version-check",
        "--no-cache-dir",
        "--python",
        str(python),
    ]
    # Installed before the dependencies are borrowed: pip sees no other headstart and touches nothing outside env/.
    _ok(_run([*pip, "install", "--no-deps", "--no-index", str(wheel)], tmp_path))
    site = Path(
        _ok(
            _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path)
        ).strip()
    )
    borrowed = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (site / "_borrowed_dependencies.pth").write_text("".join(f"{p}\n" for p in borrowed))
    return env


@pytest.mark.slow
def test_the_wheel_installs_commands_that_train_from_any_folder(tmp_path):
    wheel = _build_wheel(tmp_path)
    env = _venv_with(wheel, tmp_path)
    work = tmp_path / "work"  # an empty folder: no conf/, no scripts, not the repository
    work.mkdir()

    where = _ok(
        _run([str(env / "bin" / "python"), "-c", "from headstart import cli; print(cli.conf_dir())"], work)
    )
    assert Path(where.strip()) == next(env.glob("lib/python*/site-packages/headstart/conf")), (
        "the wheel's configs"
    )
    assert next(env.glob("lib/python*/site-packages/headstart/py.typed")).is_file()
    # the stacked launcher: a Hydra plugin in the hydra_plugins namespace, beside the headstart package
    assert next(
        env.glob("lib/python*/site-packages/hydra_plugins/headstart_launcher/stacked_launcher.py")
    ).is_file()

    # every command is installed and names its main; one shows its help (each costs a Hydra start)
    script = (
        "from importlib.metadata import entry_points\n"
        "for ep in entry_points(group='console_scripts'):\n"
        "    if ep.name.startswith('headstart-') and callable(ep.load()): print(ep.name, ep.value)\n"
    )
    loaded = set(_ok(_run([str(env / "bin" / "python"), "-c", script], work)).splitlines())
    assert loaded == {f"headstart-{n} headstart.cli:{n}" for n in COMMANDS}
    assert all((env / "bin" / f"headstart-{name}").is_file() for name in COMMANDS)
    shown = _ok(_run([str(env / "bin" / "headstart-train"), "--help"], work))
    assert shown.startswith("headstart-train (python train.py)") and "experiment: digits, dog_cat" in shown

    # --config-dir adds the user's own experiments beside the packaged ones
    mine = work / "my_conf" / "experiment" / "my_own.yaml"
    mine.parent.mkdir(parents=True)
    mine.write_text("# @package _global_\ndefaults:\n  - digits\n\nname: my_own\noptimizer:\n  lr: 0.0123\n")
    job = _ok(
        _run(
            [
                str(env / "bin" / "headstart-train"),
                "--config-dir",
                "my_conf",
                "experiment=my_own",
                "--cfg",
                "job",
            ],
            work,
        )
    )
    assert (
        "name: my_own" in job
        and "lr: 0.0123" in job
        and "max_epochs: 15" in job
        and "_target_: headstart.data.DigitsDataModule" in job
    )

    result = _run(
        [
            str(env / "bin" / "headstart-train"),
            "experiment=digits",
            "trainer.max_epochs=1",
            "+trainer.limit_train_batches=4",
            "cost.latency=false",
        ],
        work,
    )
    _ok(result)
    (run,) = (work / "outputs" / "digits").iterdir()
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= metrics["test/label/acc"] <= 1.0
    assert (run / "train.log").is_file() and (run / "bundle" / "model.json").is_file()
    assert {"train", "val", "test"} <= {p.name for p in (work / "data" / "digits").iterdir()}
    assert str(env) in (run / ".hydra" / "hydra.yaml").read_text(), (
        "the run used the installed package's configs"
    )
