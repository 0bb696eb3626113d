"""Run directories: where a run writes, how to find the one to resume, and its metrics.json."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

from headstart.errors import ConfigError

LAST_CHECKPOINT = Path("checkpoints") / "last.ckpt"


def resolve_resume(
    ckpt_path: str | None, resume: str | None, experiment_dir: Path, current: Path
) -> str | None:
    """The checkpoint to continue from: an explicit `ckpt_path`, or `resume=latest` (newest run of the experiment)."""
    if ckpt_path and resume:
        raise ConfigError("give either ckpt_path=... or resume=latest, not both")
    if ckpt_path:
        if not Path(ckpt_path).is_file():
            raise ConfigError(f"ckpt_path={ckpt_path}: no such checkpoint file")
        return str(ckpt_path)
    if resume is None:
        return None
    if resume != "latest":
        raise ConfigError(
            f"resume={resume!r}: the only value is 'latest' (or pass ckpt_path=PATH/TO/last.ckpt)"
        )
    candidates = [
        run / LAST_CHECKPOINT
        for run in experiment_dir.glob("*")
        if (run / LAST_CHECKPOINT).is_file() and run.resolve() != current.resolve()
    ]
    if not candidates:
        raise ConfigError(
            f"resume=latest: no earlier run with {LAST_CHECKPOINT} under {experiment_dir}; "
            "train once without resume=, or pass ckpt_path=..."
        )
    return str(max(candidates, key=lambda p: p.stat().st_mtime))


def write_json(path: Path, data: dict) -> None:
    """Write JSON atomically (temp file, then rename), with NaN turned into null."""
    clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in data.items()}
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(clean, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def discard_run_dir(run_dir: Path) -> None:
    """Remove a run directory that holds nothing but what Hydra wrote at start (config, log)."""
    if not run_dir.is_dir():
        return
    own = {".hydra", "train.log", "extract.log", "prune.log", "evaluate.log"}
    if all(p.name in own for p in run_dir.iterdir()):
        shutil.rmtree(run_dir, ignore_errors=True)
