"""What every entry script shares: user errors end with one clear message and leave no half-written run."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn, TypeVar

from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from omegaconf import DictConfig

from headstart.errors import HeadstartError
from headstart.runs import fail_run_dir

log = logging.getLogger("headstart")
T = TypeVar("T")

INTERRUPTED = 130  # the shell's status for a process stopped by Ctrl-C (128 + SIGINT)


def run_guarded(fn: Callable[[DictConfig], T], cfg: DictConfig, interrupted: str = "interrupted") -> T:
    """Call a stage function. A HeadstartError ends as its one-line message (no traceback) with status 2; Ctrl-C
    ends as `interrupted` (what is kept and how to go on) with status 130. Either way the run directory keeps no
    result (see `headstart.runs.fail_run_dir`)."""
    quiet_libraries()
    try:
        return fn(cfg)
    except KeyboardInterrupt:
        _end(cfg, interrupted, INTERRUPTED)
    except (HeadstartError, InstantiationException) as raised:
        e = _user_error(raised)
        if e is None:
            raise
        _end(cfg, str(e), 2)


class _DropAdverts(logging.Filter):
    """Drops Lightning's product tips ("💡 Tip: ... try installing litlogger"): not about the user's run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡")


def quiet_libraries() -> None:
    """One line per message, no adverts, no warnings the user cannot act on.

    - The `lightning` package gives itself a console handler ("INFO: ...") on import, besides propagating to the
      handlers Hydra configured: every Lightning message printed twice. Where logging is configured (root has
      handlers: Hydra's console and train.log), Lightning's own handler is removed; its messages keep reaching both.
    - Lightning's logger connector advertises litlogger on every Trainer.
    - Lightning 2.6 calls torch's deprecated `LeafSpec` on every validate and test (a FutureWarning about
      Lightning's code, not the user's).
    """
    if logging.getLogger().handlers:
        lightning_log = logging.getLogger("lightning")
        for handler in list(lightning_log.handlers):
            lightning_log.removeHandler(handler)
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropAdverts) for f in rank_zero.filters):
        rank_zero.addFilter(_DropAdverts())
    warnings.filterwarnings(
        "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning
    )


def _end(cfg: DictConfig, message: str, status: int) -> NoReturn:
    output_dir = cfg.get("paths", {}).get("output_dir") if "paths" in cfg else None
    in_sweep = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    log.error("%s", message)
    done = ""
    if output_dir and _rank_zero():  # DDP ranks share the run directory: rank 0 cleans it up
        done = fail_run_dir(Path(output_dir), message, keep_record=in_sweep)
    if done:
        log.info("%s", done)
    print(f"\nheadstart: error: {message}", file=sys.stderr)
    sys.exit(status)


def _rank_zero() -> bool:
    """Whether this is the first process of a run (Lightning's launchers, torchrun and SLURM set these variables)."""
    ranks = [os.environ.get(name, "0") for name in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK")]
    return all(not r.isdigit() or int(r) == 0 for r in ranks)


def _user_error(e: BaseException) -> HeadstartError | None:
    """The HeadstartError behind `e`: itself, or what a constructor raised inside Hydra's `instantiate` (which wraps
    it in an InstantiationException with the call in the message)."""
    while e is not None and not isinstance(e, HeadstartError):
        e = e.__cause__
    return e
