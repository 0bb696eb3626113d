"""docs/python_api.md runs as written: every Python block, in order, in one fresh process where hydra and omegaconf
cannot be imported (the API below the stages takes plain arguments)."""

from __future__ import annotations

import ast
import math
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
    assert lines[0] == "torch.Size([2, 128]) 32 True"  # features, the transform's resize, the registry
    # a set extracted (not reused) with the folder's 24 images dealt 20/2/2, 128 features each, verified
    assert re.search(r"^[0-9a-f]{16} False \{'test': 2, 'train': 20, 'val': 2\} \(128,\)$", done.stdout, re.M)
    metrics = ast.literal_eval(next(line for line in lines if line.startswith("{'val/")))
    assert metrics["val/label/acc"] == 1.0 and math.isfinite(metrics["val/loss"])  # dark vs light: learned
    counts = re.search(r"^MACs, parameters: \((\d+), (\d+)\) -> \((\d+), (\d+)\)$", done.stdout, re.M)
    macs, params, pruned_macs, pruned_params = map(int, counts.groups())
    assert pruned_macs < macs and pruned_params < params
    files = ast.literal_eval(next(line for line in lines if line.startswith("files: "))[7:])
    answers = ast.literal_eval(next(line for line in lines if line.startswith("answers: "))[9:])
    assert {"SHA256SUMS", "model.json", "model.onnx"} <= set(files)
    assert set(answers) <= {"dark", "light"} and len(answers) == 3
    assert lines[-1].startswith("label: ")  # the explanation of one photo
