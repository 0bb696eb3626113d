"""Validate a composed config before any work: unknown keys and wrong types stop the run with the key's name.

Plain sections are checked against dataclass schemas (OmegaConf structured configs); nodes that build objects
(`_target_`) are checked against the signature of what they build.
"""

from __future__ import annotations

import difflib
import inspect
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from headstart.errors import ConfigError
from headstart.train.loggers import check_logger_config

_HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}


@dataclass
class BackboneSchema:
    name: str = "small_cnn"
    weights: str | None = None
    freeze: bool = True
    trainable_stages: int = 0


@dataclass
class ModelSchema:
    hidden: list[int] = field(default_factory=list)
    dropout: float = 0.0
    label_smoothing: float = 0.0
    loss_weighting: str = "static"


@dataclass
class MonitorSchema:
    metric: str = "val/loss"
    mode: str = "min"


@dataclass
class PathsSchema:
    root_dir: str = "."
    data_dir: str = "data"
    log_dir: str = "outputs"
    sweep_dir: str = "multirun"
    output_dir: str = "outputs"


@dataclass
class ExtractSchema:
    dir: str = "dof"
    dataset: str = "default"
    path: str | None = None
    views: int = 1
    dtype: str = "float16"
    batch_size: int = 64
    shard_size: int = 4096
    num_workers: int = 2
    progress: bool = True
    train_batch_size: int = 1024
    memory_budget: int = 2 * 1024**3
    rank: int = 0  # distributed extraction (extract.py): this process, 0..world_size-1
    world_size: int = 1
    merge: bool = False


@dataclass
class ExportSchema:
    onnx: bool = True
    bundle: bool = True
    head_update: Any = "auto"
    golden: int = 4
    atol: float = 1e-4


@dataclass
class TuneSchema:
    lr_find: bool = False
    apply: bool = True
    min_lr: float = 1e-6
    max_lr: float = 1.0
    num_training: int = 100


@dataclass
class CostSchema:
    latency: bool = True
    runs: int = 20
    threads: int | None = 1
    device: str = "cpu"


@dataclass
class NotifySchema:
    urls: Any = field(default_factory=list)  # a list of apprise URLs, or one string
    jobs: str = "failed"


@dataclass
class TrainSchema:
    name: str = "default"
    seed: int = 42
    train: bool = True
    test: bool = True
    ckpt_path: str | None = None
    resume: str | None = None
    tags: list[str] = field(default_factory=list)
    features: bool = False
    verify: bool = False
    extract: ExtractSchema = field(default_factory=ExtractSchema)
    export: ExportSchema = field(default_factory=ExportSchema)
    monitor: MonitorSchema = field(default_factory=MonitorSchema)
    paths: PathsSchema = field(default_factory=PathsSchema)
    backbone: BackboneSchema = field(default_factory=BackboneSchema)
    model: ModelSchema = field(default_factory=ModelSchema)
    tune: TuneSchema = field(default_factory=TuneSchema)
    cost: CostSchema = field(default_factory=CostSchema)
    notify: NotifySchema | None = None
    flow: Any = None
    data: Any = None
    optimizer: Any = None
    scheduler: Any = None
    finetune: Any = None
    trainer: Any = None
    callbacks: Any = None
    logger: Any = None


def validate_train_config(cfg: DictConfig) -> None:
    """Raise ConfigError naming the first bad key of a composed train config."""
    plain = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]) if "hydra" in cfg else cfg
    try:
        OmegaConf.merge(OmegaConf.structured(TrainSchema), plain)
    except OmegaConfBaseException as e:
        raise ConfigError(_describe(e)) from None
    if cfg.model.loss_weighting not in ("static", "uncertainty"):
        raise ConfigError(
            f"model.loss_weighting must be 'static' or 'uncertainty', got {cfg.model.loss_weighting!r}"
        )
    if cfg.extract.dtype not in ("float16", "float32"):
        raise ConfigError(f"extract.dtype must be float16 or float32, got {cfg.extract.dtype!r}")
    if cfg.extract.views < 1:
        raise ConfigError(f"extract.views must be at least 1, got {cfg.extract.views}")
    if str(cfg.export.head_update) not in ("auto", "True", "False"):
        raise ConfigError(f"export.head_update must be auto, true or false, got {cfg.export.head_update!r}")
    if cfg.export.golden < 1:
        raise ConfigError(
            f"export.golden must be at least 1 (images checked against the export), got {cfg.export.golden}"
        )
    if cfg.monitor.mode not in ("min", "max"):
        raise ConfigError(f"monitor.mode must be 'min' or 'max', got {cfg.monitor.mode!r}")
    for key in ("data", "optimizer", "trainer"):
        if cfg.get(key) is None:
            raise ConfigError(f"'{key}' is missing from the config; choose one with {key}=<name>")
    check_targets(cfg, ["data", "optimizer", "scheduler", "finetune", "trainer", "callbacks", "logger"])
    check_logger_config(cfg)  # logger=mlflow or wandb without its extra
    from headstart.train.cost import check_cost_config  # lazy: both import Lightning and the model
    from headstart.train.lr_finder import check_tune_config
    from headstart.train.notify import check_notify_config

    check_tune_config(cfg)
    check_cost_config(cfg)
    check_notify_config(cfg)
    from headstart.train.finetune import build_schedule  # lazy: imports Lightning

    build_schedule(cfg)  # its values, and how it fits features= and backbone.trainable_stages


def check_targets(cfg: DictConfig, keys: list[str]) -> None:
    """Check every `_target_` node below `keys`: the target imports, and its keys are parameters of it."""
    for key in keys:
        node = cfg.get(key)
        if node is not None:
            _walk(node, key)


def _walk(node: Any, where: str) -> None:
    if isinstance(node, DictConfig):
        if "_target_" in node:
            _check_target(node, where)
        for k in node:
            if k not in _HYDRA_KEYS:
                _walk(node._get_node(k), f"{where}.{k}")
    elif isinstance(node, ListConfig):
        for i in range(len(node)):
            _walk(node._get_node(i), f"{where}[{i}]")


def _check_target(node: DictConfig, where: str) -> None:
    target = node._target_
    try:
        obj = get_object(target)
    except Exception:
        raise ConfigError(
            f"{where}._target_: cannot import '{target}'; check the spelling of the class path"
        ) from None
    params, hints, accepts_kwargs = _parameters(obj)
    if params is None:
        return
    for key in node:
        if key in _HYDRA_KEYS:
            continue
        if key not in params:
            if accepts_kwargs:
                continue
            close = difflib.get_close_matches(str(key), list(params), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; {target} accepts: {', '.join(params)}"
            raise ConfigError(f"unknown key '{where}.{key}'{hint}")
        value = node._get_node(key)
        if OmegaConf.is_interpolation(node, key) or OmegaConf.is_missing(node, key):
            continue
        value = value._value() if hasattr(value, "_value") else value
        expected = hints.get(key)
        if expected is not None and not _matches(value, expected):
            raise ConfigError(
                f"'{where}.{key}' must be {_type_name(expected)}, got {value!r} ({type(value).__name__})"
            )


def _parameters(obj: Any) -> tuple[dict[str, inspect.Parameter] | None, dict[str, Any], bool]:
    """Parameters a target accepts. A class whose __init__ passes **kwargs on to its base gets the base's too."""
    functions = [obj]
    if inspect.isclass(obj):
        functions = [c.__init__ for c in inspect.getmro(obj) if "__init__" in vars(c) and c is not object]
    params: dict[str, inspect.Parameter] = {}
    hints: dict[str, Any] = {}
    for fn in functions:
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):
            return None, {}, True
        own = {n: p for n, p in sig.parameters.items() if n != "self"}
        kinds = {p.kind for p in own.values()}
        params.update({n: p for n, p in own.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)})
        hints = {**_type_hints(fn), **hints}
        if inspect.Parameter.VAR_KEYWORD not in kinds:
            return params, hints, False
    return params, hints, True


def _type_hints(fn: Any) -> dict[str, Any]:
    try:
        return typing.get_type_hints(fn)
    except Exception:
        return {}


_SIMPLE = (int, float, bool, str)


def _matches(value: Any, expected: Any) -> bool:
    """Only simple annotations are checked (int, float, bool, str and Optional/Union of them); others pass."""
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(expected)
        if not all(o in _SIMPLE or o is type(None) for o in options):
            return True
        return any(_matches(value, o) for o in options)
    if expected is type(None):
        return value is None
    if expected not in _SIMPLE:
        return True
    if expected is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


_TYPE_NAMES = {
    int: "an integer",
    float: "a number",
    bool: "true or false",
    str: "a string",
    type(None): "null",
}


def _type_name(expected: Any) -> str:
    """How a user would say the type: 'an integer or null', not 'Optional'."""
    if typing.get_origin(expected) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(o) for o in typing.get_args(expected))
    return (
        _TYPE_NAMES.get(expected)
        or getattr(expected, "__name__", None)
        or str(expected).replace("typing.", "")
    )


def _describe(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None) or "?"
    msg = str(e).splitlines()[0]
    if "not in" in msg:
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        return (
            f"unknown key '{key}': {msg}. Check its spelling on the command line or in the config files"
            + (f" (section '{parent}')." if parent else ".")
        )
    return f"invalid value for '{key}': {msg}"
