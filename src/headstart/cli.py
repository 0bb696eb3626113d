"""The commands: `headstart-train`, `headstart-extract`, `headstart-evaluate`, `headstart-predict`,
`headstart-prune` (installed by the wheel) and the root scripts `python train.py`, ... (shims over the same mains).

Every command is a Hydra app over the configs in `conf/`: packaged into the wheel as `headstart/conf/`, read from the
repository root in a clone. `data/`, `dof/`, `outputs/` and `multirun/` go under the current folder (or
`HEADSTART_ROOT`, `paths.root_dir`); `--config-dir DIR` adds a folder of your own configs
(`DIR/experiment/NAME.yaml` for `experiment=NAME`).

The stages are imported when a command runs, so `--help` and `--cfg job` answer without loading PyTorch.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import hydra
from omegaconf import DictConfig

from headstart.errors import HeadstartError


def conf_dir() -> Path:
    """The Hydra configs: `headstart/conf/` in an installed wheel, `conf/` at the repository root in a clone
    (`pip install -e .` or `PYTHONPATH=src`)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parents[1] / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise HeadstartError(
        f"headstart's configs are missing: neither {here / 'conf'} (an installed wheel) nor {here.parents[1] / 'conf'} "
        "(a clone) holds train.yaml; reinstall headstart (pip install .) or restore conf/ in the clone"
    )


CONF = str(conf_dir())
T = TypeVar("T")


def null_groups_as_deletions(args: list[str], conf: Path) -> list[str]:
    """The command line with each `GROUP=null` (a config group of `conf`, e.g. `logger=null`) written as Hydra's
    deletion `~GROUP`: the group is left out. Hydra itself refuses null for a group ("Config group override must be
    a string or a list"), while `logger=null` is how users of the lightning-hydra-template turn logging off. Other
    arguments (`ckpt_path=null`, `logger.tensorboard=null`, sweeps) pass through unchanged."""
    out = []
    for arg in args:
        key, sep, value = arg.partition("=")
        is_group = sep and key.isidentifier() and (conf / key).is_dir()
        out.append(f"~{key}" if is_group and value == "null" else arg)
    return out


def _command(main: Callable[..., T]) -> Callable[..., T]:
    """A Hydra main as a command that also takes `GROUP=null` (see `null_groups_as_deletions`)."""

    @functools.wraps(main)
    def command(*args: Any, **kwargs: Any) -> T:
        if not args and not kwargs:  # from the command line (a config passed in goes straight through)
            sys.argv[1:] = null_groups_as_deletions(sys.argv[1:], Path(CONF))
        return main(*args, **kwargs)

    return command


def run_stage(stage: Callable[..., T], cfg: DictConfig, **kwargs: Any) -> T:
    """A stage as every command runs it: in a process whose C allocator is set up for PyTorch on the CPU
    (`headstart.core.cpu_forward.tune_cpu_allocator`), guarded (`headstart.entry.run_guarded`)."""
    from headstart.core.cpu_forward import tune_cpu_allocator
    from headstart.entry import run_guarded

    tune_cpu_allocator()
    return run_guarded(stage, cfg, **kwargs)


@_command
@hydra.main(version_base="1.3", config_path=CONF, config_name="train")
def train(cfg: DictConfig) -> float | None:
    """Train, test and export one model: headstart-train [experiment=NAME] [group=option ...] [key=value ...]"""
    from headstart.train.recipe import train as train_stage

    return run_stage(train_stage, cfg)


@_command
@hydra.main(version_base="1.3", config_path=CONF, config_name="extract")
def extract(cfg: DictConfig) -> None:
    """Extract a DoF feature set: headstart-extract [experiment=NAME] [extract.views=K] [verify=true]"""
    from headstart.train.extract import INTERRUPTED
    from headstart.train.extract import extract as extract_stage

    run_stage(extract_stage, cfg, interrupted=INTERRUPTED)


@_command
@hydra.main(version_base="1.3", config_path=CONF, config_name="evaluate")
def evaluate(cfg: DictConfig) -> None:
    """Evaluate a model: headstart-evaluate model=RUN_DIR|CKPT|ONNX|BUNDLE [data=...] [split=test]"""
    from headstart.evaluate.evaluation import evaluate as evaluate_stage

    run_stage(evaluate_stage, cfg)


@_command
@hydra.main(version_base="1.3", config_path=CONF, config_name="predict")
def predict(cfg: DictConfig) -> None:
    """Predict a folder, file or glob of images: headstart-predict model=BUNDLE inputs=FOLDER_OR_GLOB"""
    from headstart.evaluate.prediction import predict as predict_stage

    run_stage(predict_stage, cfg)


@_command
@hydra.main(version_base="1.3", config_path=CONF, config_name="prune")
def prune(cfg: DictConfig) -> None:
    """Prune a trained model: headstart-prune model=RUN_DIR_OR_CKPT [pruning.ratio=0.5] [pruning.steps=8]"""
    from headstart.prune.recipe import prune as prune_stage

    run_stage(prune_stage, cfg)
