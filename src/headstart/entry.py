"""What every entry script shares: user errors end with one clear message and leave no half-written run."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from hydra.errors import InstantiationException
from omegaconf import DictConfig

from headstart.errors import HeadstartError
from headstart.runs import discard_run_dir

log = logging.getLogger("headstart")
T = TypeVar("T")


def run_guarded(fn: Callable[[DictConfig], T], cfg: DictConfig) -> T:
    """Call a stage function; on a HeadstartError print its message (no traceback) and exit with status 2."""
    try:
        return fn(cfg)
    except (HeadstartError, InstantiationException) as raised:
        e = _user_error(raised)
        if e is None:
            raise
        log.error("%s", e)
        print(f"\nheadstart: error: {e}", file=sys.stderr)
        output_dir = cfg.get("paths", {}).get("output_dir") if "paths" in cfg else None
        if output_dir:
            discard_run_dir(Path(output_dir))
        sys.exit(2)


def _user_error(e: BaseException) -> HeadstartError | None:
    """The HeadstartError behind `e`: itself, or what a constructor raised inside Hydra's `instantiate` (which wraps
    it in an InstantiationException with the call in the message)."""
    while e is not None and not isinstance(e, HeadstartError):
        e = e.__cause__
    return e
