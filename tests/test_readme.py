"""The README's first two commands are what users run first on a clone and what CI runs; the Makefile behind them
installs the virtual environment on first use and again only when pyproject.toml or the lock changes."""

import os
import re
import shutil
import subprocess
from pathlib import Path

from conftest import ROOT

LOCK = "requirements/constraints.txt"


def _readme_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block, "the README starts with a bash block of commands"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_readme_starts_with_the_train_and_test_commands():
    assert _readme_commands() == ["make train", "make test"]


def test_ci_runs_exactly_the_readme_test_command():
    _, test = _readme_commands()
    ci = [
        line
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.startswith(("#", "set ", "cd "))
    ]
    assert ci == [test]


def _make_dry_run(target: str, venv: Path) -> list[str]:
    """The commands `make <target>` would run (make -n runs none) with its virtual environment at `venv`."""
    assert shutil.which("make"), "make is not installed: the README's commands need it"
    result = subprocess.run(
        ["make", "-n", "-C", str(ROOT), target, f"VENV={venv}"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "MAKEFLAGS": ""},
    )
    return [
        line.strip() for line in result.stdout.splitlines() if line.strip() and not line.startswith("make")
    ]


def test_make_installs_on_first_use_then_only_when_pyproject_or_the_lock_changes(tmp_path):
    venv = tmp_path / "venv"
    first = _make_dry_run("train", venv)
    assert f"python3.11 -m venv {venv}" in first[0]
    assert any(f'pip install -c {LOCK} -e ".[dev]"' in c for c in first), "installs .[dev] with the lock"
    assert first[-1] == f"{venv}/bin/python train.py", "then trains the main job"
    assert _make_dry_run("test", venv)[-1] == f"{venv}/bin/python -m pytest -n auto --dist loadfile"

    venv.mkdir()
    stamp = venv / ".installed"
    stamp.touch()  # installed, newer than pyproject.toml and the lock: nothing to install
    assert _make_dry_run("train", venv) == [f"{venv}/bin/python train.py"]
    assert _make_dry_run("test", venv) == [f"{venv}/bin/python -m pytest -n auto --dist loadfile"]

    for changed in ("pyproject.toml", LOCK):
        older = (ROOT / changed).stat().st_mtime - 10
        os.utime(stamp, (older, older))  # as if `changed` had been edited after the install
        assert any("pip install" in c for c in _make_dry_run("test", venv)), (
            f"{changed} changed: install again"
        )


def test_the_lock_pins_every_requirement_and_nothing_of_a_local_build():
    lines = [s for s in (ROOT / LOCK).read_text().splitlines() if s.strip() and not s.startswith("#")]
    names = {re.split(r"==", s)[0].lower().replace("_", "-") for s in lines}
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+==[^\s+@]+", s) for s in lines), "name==version lines only"
    assert "headstart" not in names
    assert {"torch", "lightning", "hydra-core", "pytest", "setuptools"} <= names


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_of_the_guide_point_at_files_and_headings_that_exist():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert len(pages) > 5
    broken = []
    for page in pages:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if target.startswith(("http://", "https://")):
                continue
            file, _, anchor = target.partition("#")
            path = (page.parent / file).resolve() if file else page
            if not path.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor:
                headings = re.findall(
                    r"^#+ (.+)$", re.sub(r"```.*?```", "", path.read_text(), flags=re.S), re.M
                )
                if anchor not in {_slug(h) for h in headings}:
                    broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, broken
