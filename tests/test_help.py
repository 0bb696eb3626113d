"""`--help` of every entry script describes the app: what it does, its config groups, its main options and three
example commands, each of which composes as written."""

from __future__ import annotations

import shlex
import subprocess
import sys

import pytest
from conftest import ROOT

APPS = ("train", "extract", "evaluate", "predict", "prune")


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def _examples(text: str, app: str) -> list[list[str]]:
    lines = text.split("== Examples ==", 1)[1].splitlines()
    commands = [line.split("#", 1)[0].strip() for line in lines if line.strip().startswith("headstart-")]
    return [shlex.split(c) for c in commands]


@pytest.mark.parametrize("app", APPS)
def test_help_describes_the_app_and_its_examples_compose(app: str) -> None:
    shown = _run([f"{app}.py", "--help"])
    assert shown.returncode == 0, shown.stderr
    text = shown.stdout
    assert text.startswith(f"headstart-{app} (python {app}.py): ")
    assert "powered by Hydra" not in text
    groups = text.split("== Config groups (group=option) ==", 1)[1]
    assert "paths: default" in groups  # the app's own groups, listed by Hydra
    assert "== Main options ==" in text and "--cfg job" in text
    examples = _examples(text, app)
    assert len(examples) == 3
    for command in examples:
        name, *overrides = command
        script = f"{name.removeprefix('headstart-')}.py"
        # a sweep example composes its first job: -m dropped, the first value of each swept key
        overrides = [o.split(",")[0] for o in overrides if o != "-m"]
        composed = _run([script, *overrides, "--cfg", "job"])
        assert composed.returncode == 0, f"{command}: {composed.stderr[-1500:]}"
