"""docs/python_api.md runs as written: every Python block, in order, in one fresh process where hydra and omegaconf
cannot be imported (the API below the stages takes plain arguments)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from conftest import ROOT

DOC = ROOT / "docs" / "python_api.md"
BLOCKED = ("hydra", "omegaconf")


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_the_page_covers_each_plain_api() -> None:
    code = "\n".join(_blocks())
    for name in (
        "build_backbone",
        "TaskFlow",
        "find_or_extract",
        "HeadstartModel",
        "make_pruner",
        "Predictor",
    ):
        assert name in code, name


@pytest.mark.slow
def test_every_block_runs_without_hydra(tmp_path) -> None:
    guard = "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in BLOCKED)
    script = tmp_path / "python_api.py"
    script.write_text(guard + "\n".join(_blocks()))
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    # the blocks print what they computed: a feature batch, a finite loss, a reused=False set, a pruned model
    assert lines[0].startswith("torch.Size([2, 128])")
    assert "reused" not in done.stderr
    shapes = next(line for line in lines if line.startswith("{'val/loss'") or "val/label/acc" in line)
    assert "val/label/acc" in shapes
    assert any(line.endswith("False {'train': 19, 'val': 2, 'test': 3} (128,)") for line in lines), lines
