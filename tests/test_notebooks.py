"""The notebooks run top to bottom in a fresh kernel, as users run them, and live in git without outputs."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import nbformat
import pytest
from conftest import ROOT, shared_data
from nbclient import NotebookClient

from headstart.errors import HeadstartError
from headstart.tools.notebook import run

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
# real data a notebook reads from ../shared/data; without it the notebook cannot run and its test skips
NEEDS = {"02_dof": "dog_cat_small"}
# the figures each notebook must draw (a cell that silently draws nothing is a broken notebook)
FIGURES = {"01_quickstart": 3, "02_dof": 2, "03_taskflow": 1, "04_prune_and_ship": 2}
# What the test sets smaller than a user's defaults, to stay quick: papermill's convention, a cell assigning these
# values is inserted after the cell tagged `parameters` (each notebook still runs every cell, top to bottom)
QUICK = {
    "01_quickstart": {"EPOCHS": 2},
    "02_dof": {"IMAGE_EPOCHS": 1},
    "03_taskflow": {"EPOCHS": 3},
    "04_prune_and_ship": {"EPOCHS": 2, "STEPS": 2, "FINETUNE_EPOCHS": 1},
}


def test_the_guide_has_its_four_notebooks():
    assert [p.stem for p in NOTEBOOKS] == sorted(FIGURES)


def with_parameters(nb: nbformat.NotebookNode, values: dict[str, object]) -> nbformat.NotebookNode:
    """`nb` with a cell setting `values` after its cell tagged `parameters`, which must assign each of them."""
    (at,) = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assigned = set(re.findall(r"^(\w+) =", nb.cells[at].source, re.M))
    assert set(values) <= assigned, (
        f"the parameters cell assigns {sorted(assigned)}, not {sorted(set(values) - assigned)}"
    )
    cell = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in values.items()))
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(at + 1, cell)
    return nb


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs(path: Path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, f"{path.name} has no code"
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not dirty, (
        f"{path.name}: cells {dirty} hold outputs; clear them before committing "
        f"(jupyter nbconvert --clear-output --inplace notebooks/*.ipynb)"
    )


# What the notebooks write under the repository when run as the README says (no HEADSTART_ROOT)
WRITTEN = ("outputs", "multirun", "dof", "data")


@pytest.fixture
def repository_outputs(monkeypatch: pytest.MonkeyPatch):
    """Run as a user runs Jupyter: no HEADSTART_ROOT, so data, runs and DoF sets land in the repository's own
    folders; afterwards everything the test added there is removed again (what was there before stays)."""
    monkeypatch.delenv("HEADSTART_ROOT", raising=False)
    before = {p for top in WRITTEN for p in [ROOT / top, *(ROOT / top).glob("**/*")] if p.exists()}
    yield before
    for top in WRITTEN:
        for p in sorted([ROOT / top, *(ROOT / top).glob("**/*")], key=lambda p: len(p.parts)):
            if p not in before and p.exists():
                shutil.rmtree(p) if p.is_dir() else p.unlink()


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(
    path: Path, repository_outputs: set[Path], request: pytest.FixtureRequest
):
    if path.stem in NEEDS:
        shared_data(NEEDS[path.stem])
    if path.stem == "02_dof":
        # the set this session extracted for other tests (conftest), where a user's earlier run leaves it: the
        # notebook's extract.py finds it by its fingerprint and reuses it; extraction itself is tested elsewhere
        dof = request.getfixturevalue("dog_cat_small_dof")
        here = ROOT / "dof" / dof.parent.name / dof.name
        if not here.exists():
            shutil.copytree(dof, here)
    nb = with_parameters(nbformat.read(path, as_version=4), QUICK[path.stem])
    client = NotebookClient(  # the kernel runs in notebooks/, as `jupyter lab notebooks/` starts it
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    client.execute()  # raises CellExecutionError, with the cell and its traceback, on the first failing cell

    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code), "every code cell ran"
    figures = sum("image/png" in o.get("data", {}) for c in code for o in c.outputs)
    assert figures >= FIGURES[path.stem]
    written = set((ROOT / "outputs").rglob("metrics.json")) - repository_outputs
    assert written, "the notebook trained or evaluated a model"
    assert not any((path.parent / top).exists() for top in WRITTEN), "nothing is written beside the notebooks"


# ---- headstart.tools.notebook.run: the scripts as on the command line ---------------------------------------------------


@pytest.mark.slow
def test_run_returns_the_directory_the_script_wrote(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HEADSTART_ROOT", str(tmp_path))
    first = run("extract", "data.num_workers=0", echo=False)
    assert first.parent == tmp_path / "outputs" / "digits"
    assert (first / ".hydra" / "config.yaml").is_file()
    record = json.loads((first / "dof_set.json").read_text())
    dof = Path(record["path"])
    assert dof.parent == tmp_path / "dof" / "digits" and (dof / "manifest.json").is_file()
    assert record["reused"] is False and sum(record["splits"].values()) == 1797

    again = run("extract", "data.num_workers=0", echo=False)
    assert again != first
    assert json.loads((again / "dof_set.json").read_text()) == {**record, "reused": True}


@pytest.mark.slow
def test_a_failing_script_raises_with_its_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HEADSTART_ROOT", str(tmp_path))
    missing = tmp_path / "no_images"
    with pytest.raises(HeadstartError, match=rf"(?s)exit 2.*headstart: error: .*{missing.name}"):
        run("train", "data=folder", f"data.root={missing}", echo=False)
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("*.ckpt"))
    with pytest.raises(HeadstartError, match="script must be one of train, extract"):
        run("train.py")
    with pytest.raises(HeadstartError, match=r"not -m; for a sweep \(-m\) run the script from a terminal"):
        run("train", "-m", "seed=1,2")
