"""The run's loggers, from the `logger` group: tensorboard (the default), csv, mlflow, wandb, several at once
(`logger=[tensorboard,csv]`) or none (`logger=null`). Each `conf/logger/*.yaml` puts its logger under its own key,
so a list of options merges into one `logger` section and every entry with a `_target_` becomes one logger.

MLflow and Weights & Biases are optional extras: a config that names one whose package is missing is a ConfigError
at validation, before any data is read or any file written, with the install command as the fix."""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig

from headstart.errors import ConfigError

if TYPE_CHECKING:
    from lightning.pytorch.loggers import Logger

# Logger class -> (the module it needs, the headstart extra that installs it: pip install -e .[extra]).
EXTRAS: dict[str, tuple[str, str]] = {
    "MLFlowLogger": ("mlflow", "mlflow"),
    "WandbLogger": ("wandb", "wandb"),
}


def logger_configs(cfg: DictConfig) -> dict[str, DictConfig]:
    """The configured loggers by key (`logger.tensorboard`, `logger.csv`, ...); an entry set to null is off."""
    section = cfg.get("logger") or {}
    return {str(k): c for k, c in section.items() if isinstance(c, DictConfig) and "_target_" in c}


def has_logger(cfg: DictConfig) -> bool:
    """Whether the run logs anywhere: callbacks that only write to a logger step aside when it does not."""
    return bool(logger_configs(cfg))


def check_logger_config(cfg: DictConfig) -> None:
    """Fail early, with the install command, when a configured logger needs a package that is not installed."""
    for key, node in logger_configs(cfg).items():
        name = str(node._target_).rsplit(".", 1)[-1]
        if name not in EXTRAS:
            continue
        module, extra = EXTRAS[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(
                f"logger.{key} ({name}) needs the '{module}' package, which is not installed; "
                f"install it with pip install -e '.[{extra}]' (in a clone) or pip install 'headstart[{extra}]', "
                "or choose another logger (logger=tensorboard, logger=csv, logger=null)"
            )


def build_loggers(cfg: DictConfig) -> list[Logger]:
    """The configured loggers, instantiated. A logger whose package is missing (one headstart has no extra for,
    such as Comet or Neptune in a config of your own) ends as a ConfigError naming it, not a traceback."""
    loggers = []
    for key, node in logger_configs(cfg).items():
        try:
            loggers.append(instantiate(node))
        except InstantiationException as e:
            if isinstance(e.__cause__, ModuleNotFoundError):
                raise ConfigError(f"logger.{key}: {e.__cause__}") from None
            raise
    return loggers
