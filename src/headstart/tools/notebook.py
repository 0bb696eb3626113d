"""Run the entry scripts from a notebook exactly as on the command line, and look at what they wrote.

`run("train", "trainer.max_epochs=5")` is `python train.py trainer.max_epochs=5` in a subprocess (the kernel stays
free of Lightning's and Hydra's global state); it returns the run directory, which is known before the script starts
because the helper composes the same config the script will and passes its `hydra.run.dir` along.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import deque
from pathlib import Path

from headstart.errors import HeadstartError
from headstart.runs import claim_run_dir

SCRIPTS = ("train", "extract", "evaluate", "predict", "prune")
# The lines worth showing in a notebook: headstart's own log lines (metrics, exports, the DoF benefit, the cost
# table that follows them) and errors; progress bars and Lightning's banners stay in the run's log.
_SHOWN = re.compile(r"\]\[headstart[.\w]*\]\[|^\s{2}\S|^\|")
_WIDTH = 400  # longer lines (a flow's metrics) are cut; the whole line is in the run's log
_ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # terminal control sequences (rich's cursor)


def repo_root() -> Path:
    """The checkout that holds the entry scripts and conf/ (headstart installed with `pip install -e .`)."""
    root = Path(__file__).resolve().parents[3]
    if not (root / "train.py").is_file() or not (root / "conf").is_dir():
        raise HeadstartError(
            f"the entry scripts (train.py, ...) are not beside the installed package ({root}); run the notebooks "
            'from a clone installed with pip install -e ".[dev]"'
        )
    return root


def run_dir_of(script: str, overrides: list[str]) -> Path:
    """The directory `python <script>.py overrides` will write, resolved now (its date and time included) and
    created exclusively, as the script itself would (`headstart.runs.claim_run_dir`)."""
    from hydra import compose, initialize_config_dir

    root = repo_root()
    with initialize_config_dir(version_base="1.3", config_dir=str(root / "conf")):
        cfg = compose(script, overrides=overrides, return_hydra_config=True)
    path = Path(str(cfg.hydra.run.dir))
    return claim_run_dir(path if path.is_absolute() else root / path)


def run(script: str, *overrides: str, echo: bool = True) -> Path:
    """Run `python <script>.py overrides` from the repository root and return the directory it wrote.

    With `echo`, headstart's own log lines are printed as they come. A failing script raises a HeadstartError
    with the end of its output (the one-line `headstart: error: ...` message included)."""
    if script not in SCRIPTS:
        raise HeadstartError(f"script must be one of {', '.join(SCRIPTS)}, got {script!r}")
    flags = [o for o in overrides if o.startswith("-")]
    if flags:
        raise HeadstartError(
            f"run() takes overrides (key=value, group=option), not {' '.join(flags)}; for a sweep (-m) run the "
            f"script from a terminal: python {script}.py -m ..."
        )
    root = repo_root()
    args = list(overrides)
    out = run_dir_of(script, args)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0"}
    command = [sys.executable, f"{script}.py", *args, f"hydra.run.dir={out}"]
    tail: deque[str] = deque(maxlen=40)
    with subprocess.Popen(
        command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = _ESCAPES.sub("", raw).rstrip()
            tail.append(line)
            if echo and _SHOWN.search(line):
                print(line if len(line) <= _WIDTH else line[: _WIDTH - 4] + " ...")
    if proc.returncode != 0:
        shown = "\n".join(tail)
        raise HeadstartError(f"python {script}.py {' '.join(args)} failed (exit {proc.returncode}):\n{shown}")
    return out
