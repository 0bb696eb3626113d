"""The package's structure holds: import contracts (lint-imports), no import cycles, no private names imported across
modules, one home for each helper, a docstring on every package, a short top level."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import grimp
from conftest import ROOT

PACKAGE = ROOT / "src" / "headstart"
# Names several modules may define on purpose: command-line entry points, lazy module attributes, and the float32
# decision rule written once for torch tensors on any device (flow) and once for numpy (serve), which
# tests/test_serve.py checks agree. The commands in headstart.cli are named for the stages they run.
SHARED_NAMES = {"main", "__getattr__", "decision_scores"}
COMMANDS = "headstart.cli"


def _modules() -> list[tuple[str, Path]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found.append((name, path))
    return found


def test_import_contracts_hold() -> None:
    """The layers and the forbidden imports in pyproject.toml's [tool.importlinter], checked by import-linter."""
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), over every import, lazy ones included."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.find_modules_directly_imported_by(v)):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for module in sorted(graph.modules):
        if module.startswith("headstart") and module not in index:
            visit(module)
    return groups


def test_no_import_cycles() -> None:
    graph = grimp.build_graph("headstart")
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = grimp.ImportGraph()
    for name in ("headstart", "headstart.a", "headstart.b", "headstart.c"):
        graph.add_module(name)
    graph.add_import(importer="headstart.a", imported="headstart.b")
    graph.add_import(importer="headstart.b", imported="headstart.a")
    graph.add_import(importer="headstart.c", imported="headstart.a")
    assert _cycles(graph) == [["headstart.a", "headstart.b"]]


def test_no_private_name_is_imported_across_modules() -> None:
    found = []
    for path in [*PACKAGE.rglob("*.py"), *(ROOT / "tests").glob("*.py"), *(ROOT / "benchmarks").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (
                node.level or (node.module or "").startswith("headstart")
            ):
                found += [
                    f"{path.relative_to(ROOT)}:{node.lineno} {a.name}"
                    for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__")
                ]
    assert found == []


def test_each_public_function_has_one_home() -> None:
    homes: dict[str, list[str]] = defaultdict(list)
    for name, path in _modules():
        if name == COMMANDS:
            continue
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef | ast.ClassDef) and not node.name.startswith("_"):
                homes[node.name].append(name)
    twice = {n: m for n, m in homes.items() if len(m) > 1 and n not in SHARED_NAMES}
    assert twice == {}


def test_every_package_says_its_job_and_the_top_level_stays_short() -> None:
    for name, path in _modules():
        if path.name == "__init__.py":
            assert ast.get_docstring(ast.parse(path.read_text())), f"{name} has no docstring"
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 8, top


def test_module_paths_recorded_before_the_layers_still_resolve() -> None:
    """Runs made before the layers recorded `_target_`s under the old flat module names; Hydra still finds them."""
    import importlib

    from hydra.utils import get_object

    import headstart

    old_targets = {
        "headstart.callbacks.DivergenceGuard": "headstart.train.callbacks",
        "headstart.callbacks.ConfusionMatrixLogger": "headstart.train.callbacks",
        "headstart.finetune.Full": "headstart.train.finetune",
        "headstart.finetune.LinearProbe": "headstart.train.finetune",
        "headstart.sweeps.SweepSummary": "headstart.train.sweeps",
        "headstart.runs.UniqueRunDir": "headstart.runs",
        "headstart.data.FolderDataModule": "headstart.data.images",
    }
    for target, home in old_targets.items():
        assert get_object(target).__module__ == home, target
    for old, new in headstart.MOVED_MODULES.items():
        assert getattr(headstart, old) is importlib.import_module(new)
