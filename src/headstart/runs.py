"""Run directories and run records: where a run writes, how to find the one to resume, its metrics.json, and the
config a model records about its run (plain data, paths made absolute)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, read_write

from headstart.errors import ConfigError
from headstart.serve.plain import plain

LAST_CHECKPOINT = Path("checkpoints") / "last.ckpt"


# Keys naming files and folders a run reads or writes. A model records them as absolute paths, so that its recorded
# config names the same files wherever it is read later (another working directory, a notebook's kernel).
PATH_KEYS = (
    "paths.root_dir",
    "paths.data_dir",
    "paths.log_dir",
    "paths.sweep_dir",
    "paths.output_dir",
    "data.root",
    "data.csv",
    "extract.dir",
    "extract.path",
    "ckpt_path",
    "backbone.weights",
)


# Sections about how a run was launched and reported, not what it trained: never recorded (`notify` holds URLs
# with tokens).
NOT_RECORDED = ("hydra", "notify")


def recorded_config(cfg: DictConfig) -> dict:
    """What a model records about its run (checkpoints, bundles, manifests): the resolved config as plain data,
    without the sections in NOT_RECORDED, with the paths in PATH_KEYS made absolute (backbone.weights only when it names a
    file)."""
    record = {str(k): plain(cfg[k]) for k in cfg if k not in NOT_RECORDED}
    for key in PATH_KEYS:
        section, _, leaf = key.rpartition(".")
        node = record.get(section) if section else record
        value = node.get(leaf) if isinstance(node, dict) else None
        if not isinstance(value, str) or not value:
            continue
        if key == "backbone.weights" and not os.path.exists(os.path.expanduser(value)):
            continue  # "pretrained", "none", a download name
        node[leaf] = str(
            Path(value).expanduser().absolute()
        )  # not normalized: data tables keep the same paths
    return record


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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(clean, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


# What a failed run keeps (to understand it, or to continue training with ckpt_path=...): never a result.
KEPT_WHEN_FAILED = (".hydra", "checkpoints", "tensorboard")
FAILED = "FAILED"


def claim_run_dir(path: str | Path) -> Path:
    """Create `path` exclusively and return it; when it exists (another run started in the same second), create
    `<path>_2`, `<path>_3`, ... instead. Two processes never get the same directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    candidate, n = path, 1
    while True:
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            n += 1
            candidate = path.with_name(f"{path.name}_{n}")


def fail_run_dir(run_dir: Path, message: str, keep_record: bool = False) -> str:
    """Leave no result of a failed run: remove everything but its config, log, checkpoints and TensorBoard events,
    and write `FAILED` with `message`. When nothing but the config and log would stay (the run failed before it
    trained), the directory goes entirely (and its parent when that leaves it empty), unless `keep_record` (a
    sweep's job: the sweep summary lists it as failed). Returns what was done, for the log."""
    if not run_dir.is_dir():
        return ""
    kept_work = False
    for entry in run_dir.iterdir():
        if entry.name in KEPT_WHEN_FAILED:
            kept_work |= entry.name != ".hydra" and any(p.is_file() for p in entry.rglob("*"))
        elif entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        elif entry.suffix != ".log":
            entry.unlink()
    if not kept_work and not keep_record:
        shutil.rmtree(run_dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            run_dir.parent.rmdir()  # only when empty
        return f"removed {run_dir}"
    (run_dir / FAILED).write_text(message.rstrip() + "\n")
    return f"{run_dir} keeps only its config, log{', checkpoints' if kept_work else ''} and {FAILED}"


def _overridden(config: DictConfig, key: str) -> bool:
    return any(str(o).split("=", 1)[0].lstrip("+~") == key for o in config.hydra.overrides.hydra)


class UniqueRunDir(Callback):
    """Hydra callback: every run and every sweep gets a directory of its own, created exclusively before Hydra
    writes into it (runs started in the same second would otherwise share `<date>_<time>/`). A directory the user
    names (hydra.run.dir=..., as Lightning's DDP ranks do) is used as given."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not _overridden(config, "hydra.run.dir"):
            with read_write(config.hydra.run):
                config.hydra.run.dir = str(claim_run_dir(config.hydra.run.dir))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if _overridden(config, "hydra.sweep.dir"):
            return
        claimed = str(claim_run_dir(config.hydra.sweep.dir))
        with read_write(config.hydra):
            config.hydra.sweep.dir = claimed
            # each job's config is composed again from these overrides: make it use the claimed directory
            quoted = claimed.replace("\\", "\\\\").replace("'", "\\'")
            config.hydra.overrides.hydra.append(f"hydra.sweep.dir='{quoted}'")
