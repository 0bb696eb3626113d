"""The data a model was trained on, rebuilt from the config recorded in its checkpoint, bundle or ONNX metadata.

A recorded config is data someone handed over, not code: it never reaches `hydra.utils.instantiate`. Only the
DataModules headstart ships are rebuilt, each from plain fields (names, numbers, lists, mappings) that its
constructor validates. A recorded `_target_` that is not one of them, a `_target_` anywhere below, a field the
DataModule does not take, or a value that is not plain data is refused, and so is a built-in data set that is not
on this machine yet: rebuilding from a file never writes anything. The fix is always the same: name the data on the
command line (`data=folder data.root=...`), which is the user's own config.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from headstart.data.building import MARKER
from headstart.data.digits import DigitsDataModule
from headstart.data.images import CsvDataModule, FolderDataModule, ImageDataModule
from headstart.data.security import SecurityDataModule
from headstart.data.table import TableDataModule
from headstart.errors import ConfigError, DataError

KINDS: dict[str, type[ImageDataModule]] = {
    f"headstart.data.{cls.__name__}": cls
    for cls in (DigitsDataModule, FolderDataModule, CsvDataModule, TableDataModule, SecurityDataModule)
}
KINDS.update({f"{cls.__module__}.{cls.__name__}": cls for cls in list(KINDS.values())})

# Hydra's own keys, the input transform (the model's is used) and the training augmentation (evaluation does not
# augment; its entries are objects to build, which a recorded config may not ask for).
_IGNORED = {"_target_", "_convert_", "_recursive_", "transform", "augment"}
_FIX = "name the data on the command line instead: data=folder data.root=/path/to/images (or data=csv ...)"


def datamodule_from_record(recorded: Any, transform: Any, source: str) -> ImageDataModule:
    """The DataModule described by a recorded `data` config, with `transform` as its input transform.

    `source` names the file the record comes from (for messages). ConfigError when the record asks for anything but
    plain fields of a headstart DataModule; DataError when a built-in data set it names is not on this machine."""
    if not isinstance(recorded, Mapping):
        raise ConfigError(f"{source} records its data as {type(recorded).__name__}, not a mapping; {_FIX}")
    target = recorded.get("_target_")
    cls = KINDS.get(target) if isinstance(target, str) else None
    if cls is None:
        known = ", ".join(sorted({c.__name__ for c in KINDS.values()}))
        raise ConfigError(
            f"{source} records data of kind {target!r}; headstart rebuilds only its own data modules ({known}) "
            f"from a model file and never runs code named in one: {_FIX}"
        )
    accepted = _parameters(cls)
    kwargs: dict[str, Any] = {}
    for key, value in recorded.items():
        if key in _IGNORED:
            continue
        if key not in accepted:
            raise ConfigError(
                f"{source} records the field data.{key}, which {cls.__name__} does not take; {_FIX}"
            )
        _check_plain(value, f"data.{key}", source)
        kwargs[str(key)] = value
    _require_built(cls, kwargs, source)
    return cls(transform=transform, **kwargs)


def _parameters(cls: type) -> set[str]:
    """The keyword parameters of `cls`, following `**common` up to the base classes that define them."""
    names: set[str] = set()
    for klass in inspect.getmro(cls):
        if "__init__" not in vars(klass) or klass is object:
            continue
        params = inspect.signature(klass.__init__).parameters
        names |= {n for n, p in params.items() if n != "self" and p.kind is not p.VAR_KEYWORD}
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            break
    return names


def _check_plain(value: Any, where: str, source: str) -> None:
    """Plain data only: None, booleans, numbers, strings, and lists and string-keyed mappings of them."""
    if value is None or isinstance(value, bool | int | float | str):
        return
    if isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]", source)
        return
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str) or (k.startswith("_") and k.endswith("_")):
                raise ConfigError(
                    f"{source} records {where}.{k}: a recorded config may hold plain data only, not objects to "
                    f"build ({k!r}); {_FIX}"
                )
            _check_plain(v, f"{where}.{k}", source)
        return
    raise ConfigError(f"{source} records {where} as {type(value).__name__}, not plain data; {_FIX}")


def _require_built(cls: type, kwargs: dict[str, Any], source: str) -> None:
    """A built-in data set (digits, security scenes) is read where it was built; a model file never builds one."""
    if cls is DigitsDataModule or (cls is SecurityDataModule and kwargs.get("csv") is None):
        root = Path(str(kwargs.get("root", "data/digits" if cls is DigitsDataModule else "data/security")))
        if not (root.expanduser() / MARKER).is_file():
            raise DataError(
                f"{source} was trained on the built-in data set at {root}, which is not on this machine (no "
                f"{MARKER} there). Build it with train.py once (it writes the data set), or {_FIX}"
            )
