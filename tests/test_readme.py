"""The README's first three commands are what CI runs (install, then tests) and what users run first."""

import re

from conftest import ROOT


def _readme_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block, "the README starts with a bash block of commands"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_readme_starts_with_install_main_and_test_commands():
    install, main, test = _readme_commands()
    assert "pip install" in install
    assert main.endswith("python train.py")
    assert "pytest" in test


def test_ci_runs_exactly_the_readme_install_and_test_commands():
    install, _, test = _readme_commands()
    ci = [
        line
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.startswith(("#", "set ", "cd "))
    ]
    assert ci == [install, test]
