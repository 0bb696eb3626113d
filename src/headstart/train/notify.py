"""Notifications: one message when a run or a sweep ends or fails, with its headline metrics and its directory,
sent through apprise (e-mail, Slack, Teams, ntfy, a JSON webhook, ... chosen by URL; `pip install -e .[notify]`).
The run's message is sent by `headstart.train.callbacks.RunNotifier`, the sweep's by `SweepNotifier` here (a Hydra
callback, so this module stays free of Lightning: Hydra loads it for every command).

Off unless the run chose `notify=apprise`. URLs come from `HEADSTART_NOTIFY_URLS` (preferred: an environment
variable is never written into any file) and from `notify.urls`. A notification is a courtesy, never part of the
result: anything that goes wrong while sending (apprise missing, a bad URL, an unreachable endpoint) is one logged
warning, and the run goes on as if nothing had happened. apprise is imported only when a message is sent, so
headstart imports without it.

No secret is printed: a URL is named by its number and scheme only, and apprise's own log (which names URLs) is
kept from the run's log while a message is sent."""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, ListConfig, OmegaConf

from headstart.errors import ConfigError
from headstart.train.sweeps import best_job, sweep_table

log = logging.getLogger(__name__)

ENV_VAR = "HEADSTART_NOTIFY_URLS"
INSTALL = "pip install -e .[notify]  (or: pip install 'headstart[notify]')"
JOBS = ("none", "failed", "all")  # notify.jobs: which of a sweep's jobs send a message of their own
MAX_METRICS = 12  # test metric lines in a run's message (after the monitored metric)

_warned_missing = False


def notify_urls(section: Mapping | DictConfig | None) -> list[str]:
    """The apprise URLs to send to: those in `HEADSTART_NOTIFY_URLS` (separated by spaces, commas or new lines),
    then those in the section's `urls` (a list, or one string)."""
    urls = [u for u in re.split(r"[\s,]+", os.environ.get(ENV_VAR, "")) if u]
    try:
        configured = (section or {}).get("urls") or []
        if isinstance(configured, ListConfig):
            configured = OmegaConf.to_container(configured, resolve=True)
        if isinstance(configured, str):
            configured = [configured]
    except Exception as e:  # ${oc.env:VAR} with VAR unset: no URL from there, and the run goes on
        log.warning("notify: notify.urls cannot be resolved (%s); it adds no URL", str(e).splitlines()[0])
        configured = []
    for item in configured:
        urls += [u for u in re.split(r"[\s,]+", str(item or "")) if u]
    return urls


def literal_urls(section: DictConfig) -> bool:
    """Whether `notify.urls` holds a URL written out (not `${oc.env:VAR}`): Hydra saves those as given in the run's
    .hydra/ files (config.yaml, and overrides.yaml when given on the command line)."""
    urls = section._get_node("urls") if "urls" in section else None
    if urls is None or OmegaConf.is_interpolation(section, "urls"):
        return False
    if isinstance(urls, ListConfig):
        return any(not OmegaConf.is_interpolation(urls, i) and urls[i] for i in range(len(urls)))
    return bool(section.urls)


def check_notify_config(cfg: DictConfig) -> None:
    """ConfigError for a `notify.jobs` that is not one of none, failed, all."""
    section = cfg.get("notify")
    if section is not None and section.get("jobs", "failed") not in JOBS:
        raise ConfigError(f"notify.jobs must be one of {', '.join(JOBS)}, got {section.jobs!r}")


def send(title: str, body: str, urls: Sequence[str], failure: bool = False) -> bool:
    """Send one message to every URL; True when all of them took it. Never raises: apprise missing, a URL apprise
    does not understand and a service that did not take the message are each a warning naming the problem (URLs
    named by number and scheme, never in full: they hold tokens)."""
    global _warned_missing
    if not urls:
        log.warning(
            "notify: no URL to send to; set %s (or notify.urls) to an apprise URL, see docs/runs.md", ENV_VAR
        )
        return False
    try:
        import apprise
    except ImportError:
        if not _warned_missing:
            log.warning(
                "notify: notifications were asked for but apprise is not installed; install it with %s",
                INSTALL,
            )
            _warned_missing = True
        return False
    quiet = logging.getLogger("apprise")
    propagate, quiet.propagate = quiet.propagate, False  # apprise logs whole URLs: keep them out of train.log
    delivered = True
    try:
        kind = apprise.NotifyType.FAILURE if failure else apprise.NotifyType.SUCCESS
        for number, url in enumerate(urls, 1):
            name = f"URL {number} of {len(urls)} ({_scheme(url)})"
            service = apprise.Apprise()
            with apprise.LogCapture(level=logging.WARNING) as captured:
                if not service.add(url):
                    log.warning("notify: %s is not a URL apprise understands; see its URL formats", name)
                    delivered = False
                    continue
                ok = service.notify(body=body, title=title, notify_type=kind)
            if not ok:
                said = _scrub(captured.getvalue(), url)
                log.warning("notify: %s did not take the message%s", name, f": {said}" if said else "")
                delivered = False
    except Exception as e:  # a notification never fails a run
        log.warning("notify: sending failed (%s: %s)", type(e).__name__, _scrub(str(e), *urls))
        delivered = False
    finally:
        quiet.propagate = propagate
    return delivered


def _scheme(url: str) -> str:
    return url.split("://", 1)[0] + "://" if "://" in url else "no scheme"


def _scrub(text: str, *urls: str) -> str:
    """apprise's messages, one line, with every part of the URLs (user, password, host, path, tokens) blanked."""
    lines = [re.sub(r"^[\d\-: ,]+- \w+ - ", "", line).strip() for line in text.splitlines()]
    text = " ".join(line for line in lines if line)
    for url in urls:
        for part in sorted(re.split(r"[/:@?&=#,]+", url.split("://", 1)[-1]), key=len, reverse=True):
            if len(part) >= 3:
                text = text.replace(part, "***")
    return text


def _number(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, int | float) and not math.isnan(value) else "n/a"


def run_message(
    name: str,
    run_dir: Path,
    metrics: Mapping[str, Any],
    monitor: str,
    mode: str,
    error: str | None = None,
    where: str | None = None,
) -> tuple[str, str]:
    """The title and body of a run's message: the monitored metric, then the test metrics (the first MAX_METRICS,
    counts left out), where it stopped and why when it failed, and the run directory."""
    title = f"headstart: run {name} {'FAILED' if error else 'finished'}"
    lines = [f"error: {error}"] if error else []
    if where:
        lines.append(f"stopped at: {where}")
    if monitor in metrics:
        lines.append(f"{monitor} = {_number(metrics[monitor])} (monitored, {mode})")
    shown = [k for k in sorted(metrics) if k.startswith("test/") and not k.endswith("/count")]
    lines += [f"{k} = {_number(metrics[k])}" for k in shown[:MAX_METRICS]]
    if len(shown) > MAX_METRICS:
        lines.append(f"... and {len(shown) - MAX_METRICS} more in metrics.json")
    lines.append(f"run dir: {run_dir}")
    return title, "\n".join(lines)


def in_sweep() -> bool:
    """Whether this process runs a job of a Hydra multirun (-m)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def sweep_message(sweep_dir: Path) -> tuple[str, str, bool] | None:
    """The title and body of a sweep's message, and whether any job failed: how many jobs, how many failed, the
    best job with its monitored metric, the sweep directory. None when it holds no job."""
    found = sweep_table(sweep_dir)
    if found is None:
        return None
    table, monitor, mode = found
    failed = int((table["status"] != "ok").sum())
    name = sweep_dir.parent.name
    title = f"headstart: sweep {name} done, {len(table)} jobs" + (f", {failed} FAILED" if failed else "")
    lines = [f"{len(table)} jobs, {len(table) - failed} finished, {failed} failed"]
    best = best_job(table, monitor)
    if best is not None:
        row = table[table["job"] == best].iloc[0]
        lines.append(f"best job: {best} ({monitor} = {_number(row[monitor])}, {mode})")
        lines.append(f"best run dir: {sweep_dir / best}")
    else:
        lines.append(f"no job finished with {monitor}")
    lines.append(f"sweep dir: {sweep_dir.absolute()} (summary.md, best_experiment.yaml)")
    return title, "\n".join(lines), failed > 0


class SweepNotifier(Callback):
    """Hydra callback: one message when a multirun ends, if the sweep chose `notify=apprise`.

    Hydra calls `on_multirun_end` only when the sweep ran to its end: the basic sweeper re-raises the first
    failed job's error after its batch, so a sweep that fails so is reported by that job's own message
    (`notify.jobs=failed`, the default)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        section = config.get("notify")
        sweep_dir = Path(config.hydra.sweep.dir)
        if section is None or not sweep_dir.is_dir():
            return
        try:
            message = sweep_message(sweep_dir)
        except Exception as e:  # a damaged job dir: still say the sweep ended
            log.warning("notify: could not read the sweep's jobs (%s: %s)", type(e).__name__, e)
            message = (
                f"headstart: sweep {sweep_dir.parent.name} done",
                f"sweep dir: {sweep_dir.absolute()}",
                False,
            )
        if message is not None:
            title, body, any_failed = message
            send(title, body, notify_urls(section), failure=any_failed)
