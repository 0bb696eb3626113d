"""The config that reproduces a train.py run: its experiment file when the run was only `experiment=X`, or else a
ready `# @package _global_` experiment file built from the run's overrides (the sweep's best job, a zoo row)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

# Overrides that say where and how a job ran, not what model it trains: left out of reproducing experiment files.
RUN_ONLY_PREFIXES = ("hydra.", "hydra/", "paths.", "notify.")
RUN_ONLY_GROUPS = ("hparams_search", "experiment", "notify")


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def model_overrides(overrides: Sequence[str]) -> list[str]:
    """The overrides that change the trained model: all but the experiment choice and where/how the run ran."""
    return [o for o in overrides if not (_key(o).startswith(RUN_ONLY_PREFIXES) or _key(o) in RUN_ONLY_GROUPS)]


def _raw(config: DictConfig, key: str) -> Any:
    """The value at dotted `key` as the job's config.yaml stores it (interpolations left as written)."""
    node: Any = OmegaConf.to_container(config, resolve=False)
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def config_dirs(job_dir: Path) -> list[tuple[Path, str]]:
    """The run's config folders in Hydra's search order, with who added them: "main" (conf/), "command-line"
    (--config-dir), "hydra.searchpath"."""
    runtime = OmegaConf.load(job_dir / ".hydra" / "hydra.yaml").hydra.runtime
    return [
        (Path(s.path), str(s.provider))
        for s in runtime.get("config_sources") or []
        if s.schema == "file" and s.path
    ]


def experiment_file(job_dir: Path) -> Path | None:
    """The experiment file that alone reproduces the run: the run chose an experiment (on the command line or by
    default) and changed nothing else about the model, and the file is still in one of its config folders."""
    hydra_dir = job_dir / ".hydra"
    if model_overrides([str(o) for o in OmegaConf.load(hydra_dir / "overrides.yaml")]):
        return None
    choice = OmegaConf.load(hydra_dir / "hydra.yaml").hydra.runtime.choices.get("experiment")
    if not choice:
        return None
    found = (folder / "experiment" / f"{choice}.yaml" for folder, _ in config_dirs(job_dir))
    return next((f for f in found if f.is_file()), None)


def experiment_text(
    job_dir: Path, header: Sequence[str] = (), name: str | None = None, leave_out: Sequence[str] = ()
) -> str:
    """A `# @package _global_` experiment file that reproduces the job in `job_dir`: its experiment as the base,
    the config groups it chose on the command line as `override /group: option`, and every value it set
    (swept or given) as it was in the job's config. Where and how the job ran (paths.*, hydra.*, hparams_search)
    is left out, and so are a search's own settings: the file trains the same model outside the search.

    `header`: comment lines (without `# `) put first; `name`: the experiment's `name` (default: the job's);
    `leave_out`: override keys not to reproduce."""
    hydra_dir = job_dir / ".hydra"
    overrides = [str(o) for o in OmegaConf.load(hydra_dir / "overrides.yaml")]
    config = OmegaConf.load(hydra_dir / "config.yaml")
    choices = OmegaConf.load(hydra_dir / "hydra.yaml").hydra.runtime.choices
    base = choices.get("experiment")

    added: list[str] = []
    overridden: list[str] = []
    values = OmegaConf.create({})
    skipped: list[str] = []
    for override in model_overrides(overrides):
        if _key(override) in leave_out:
            continue
        key = override.split("=", 1)[0]
        if override.startswith("~") or "=" not in override or "@" in key:
            skipped.append(override)  # deletions and package overrides have no plain YAML form here
            continue
        plain_key = key.lstrip("+")
        if plain_key in choices:  # a config group
            option = choices[plain_key]
            if key.startswith("+"):
                added.append(f"/{plain_key}: {option}")
            else:
                overridden.append(f"override /{plain_key}: {option}")
            continue
        OmegaConf.update(values, plain_key, _raw(config, plain_key), force_add=True)
    OmegaConf.update(values, "name", name or config.name, force_add=True)

    defaults = ([base] if base else []) + added + overridden
    lines = ["# @package _global_", *(f"# {h}" for h in header)]
    extra = [str(folder) for folder, provider in config_dirs(job_dir) if provider == "command-line"]
    if extra:
        lines.append(
            f"# Its configs also come from --config-dir {' '.join(extra)}: copy it to <that dir>/experiment/<name>.yaml"
            f" and train it with: python train.py --config-dir {extra[0]} experiment=<name>"
        )
    else:
        lines.append(
            "# Copy it to conf/experiment/<name>.yaml and train it with: python train.py experiment=<name>"
        )
    if skipped:
        lines.append(f"# Not reproduced (deletions, package overrides): {' '.join(skipped)}")
    if defaults:
        lines += ["defaults:", *(f"  - {d}" for d in defaults), ""]
    lines.append(OmegaConf.to_yaml(values).rstrip())
    return "\n".join(lines) + "\n"
