"""`hydra/launcher=stacked`: a sweep's DoF jobs that differ only in head and optimizer hyperparameters train as one
stack of heads over one stream of feature batches; every other job runs alone, as Hydra's basic launcher runs it.

A Hydra launcher plugin (Hydra finds it in the `hydra_plugins` namespace package). Each job still gets its own run
directory written through Hydra's `run_job` (its .hydra/ config and overrides, its log, the job callbacks), so the
sweepers (grid, Optuna) and the sweep summary see ordinary jobs. What stacks and why: headstart.train.stacking and
docs/sweeps.md. Only Hydra is imported here: Hydra imports every plugin when it starts, also for --help.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

log = logging.getLogger(__name__)


class StackedLauncher(Launcher):
    """Runs a batch of sweep jobs: stackable groups as one stack each (at most `max_heads` heads), the rest one by
    one. Keeps what the groups share (the opened DoF set, the backbone, the re-attach check) for the whole sweep."""

    def __init__(self, max_heads: int = 64) -> None:
        super().__init__()
        if int(max_heads) < 1:
            raise ValueError(f"hydra.launcher.max_heads must be at least 1, got {max_heads}")
        self.max_heads = int(max_heads)
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None
        self.cache: Any = None
        self.reasons_said: set[str] = set()

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from headstart.train import stacking  # imported when a sweep runs, not when Hydra scans its plugins

        assert self.config is not None and self.hydra_context is not None
        if self.cache is None:
            self.cache = stacking.StackCache()
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        log.info("Launching %d jobs, stacking what can be stacked", len(job_overrides))
        groups: dict[tuple[str, ...], list[tuple[int, DictConfig]]] = {}
        composed: dict[tuple[str, ...], tuple[DictConfig, list[str]]] = {}
        for i, overrides in enumerate(job_overrides):
            idx = initial_job_idx + i
            log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
            key = stacking.group_key(list(overrides))
            sweep_config = None
            if key in composed:  # the group's first job, with this job's own head and optimizer values
                sweep_config = derived_config(*composed[key], list(overrides), stacking)
            if sweep_config is None:
                sweep_config = self.hydra_context.config_loader.load_sweep_config(
                    self.config, list(overrides)
                )
                composed.setdefault(key, (sweep_config, list(overrides)))
            with open_dict(sweep_config):
                sweep_config.hydra.job.id = idx
                sweep_config.hydra.job.num = idx
            groups.setdefault(key, []).append((idx, sweep_config))
        returns: dict[int, JobReturn] = {}
        for members in groups.values():
            for start in range(0, len(members), self.max_heads):
                returns.update(self._run_group(members[start : start + self.max_heads], stacking))
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return [returns[initial_job_idx + i] for i in range(len(job_overrides))]

    def _run_group(self, members: list[tuple[int, DictConfig]], stacking: Any) -> dict[int, JobReturn]:
        cfgs, reason = [], None
        try:
            cfgs = [self._job_config(config) for _, config in members]
            reason = stacking.why_not_stacked(cfgs[0])
        except Exception as e:  # a config that does not resolve: the job alone reports it as usual
            reason = f"their config does not resolve ({type(e).__name__})"
        if reason is not None:
            if reason not in self.reasons_said:
                log.info(
                    "stacked launcher: jobs run one by one, as the basic launcher runs them, where %s", reason
                )
                self.reasons_said.add(reason)
            return {idx: self._run_alone(config) for idx, config in members}
        jobs = [str(OmegaConf.select(config, "hydra.sweep.subdir")) for _, config in members]
        log.info("stacked launcher: jobs %s train as one stack of %d heads", ", ".join(jobs), len(jobs))
        from headstart.errors import HeadstartError

        try:
            group = stacking.train_group(cfgs, jobs, self.cache)
        except HeadstartError:
            # A user error (bad data, config): the first job alone reports it the way every headstart run does.
            first_idx, first = members[0]
            out = {first_idx: self._run_alone(first)}
            out.update({idx: self._run_alone(config) for idx, config in members[1:]})
            return out
        finally:
            self._restore()
        return {
            idx: run_job(
                hydra_context=self.hydra_context,
                task_function=_Writer(stacking.write_job, group, k),
                config=config,
                job_dir_key="hydra.sweep.dir",
                job_subdir_key="hydra.sweep.subdir",
            )
            for k, (idx, config) in enumerate(members)
        }

    def _run_alone(self, config: DictConfig) -> JobReturn:
        ret = run_job(
            hydra_context=self.hydra_context,
            task_function=self.task_function,
            config=config,
            job_dir_key="hydra.sweep.dir",
            job_subdir_key="hydra.sweep.subdir",
        )
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return ret

    def _job_config(self, sweep_config: DictConfig) -> DictConfig:
        """A job's config as its task sees it (no hydra node), resolved with its own output directory, the way
        Hydra's run_job sets it."""
        output_dir = os.path.join(
            str(OmegaConf.select(sweep_config, "hydra.sweep.dir")),
            str(OmegaConf.select(sweep_config, "hydra.sweep.subdir")),
        )
        with read_write(sweep_config.hydra.runtime), open_dict(sweep_config.hydra.runtime):
            sweep_config.hydra.runtime.output_dir = os.path.abspath(output_dir)  # as run_job will set it
        HydraConfig.instance().set_config(sweep_config)
        task = OmegaConf.masked_copy(sweep_config, [k for k in sweep_config if k != "hydra"])  # a copy
        OmegaConf.resolve(task)
        return task

    def _restore(self) -> None:
        HydraConfig.instance().set_config(self.config)


def derived_config(
    first: DictConfig, first_overrides: list[str], overrides: list[str], stacking: Any
) -> DictConfig | None:
    """The config Hydra composes for `overrides`, made from the composed config of `first_overrides` (a job of the
    same group: the same overrides but for STACKABLE values), so that a group of N jobs is composed once, not N
    times. None where that is not plainly the same (other keys set, a deletion): then the job is composed."""
    parser = OverridesParser.create()
    mine = [o for o in overrides if stacking.override_key(o) in stacking.STACKABLE]
    theirs = [o for o in first_overrides if stacking.override_key(o) in stacking.STACKABLE]
    if sorted(map(stacking.override_key, mine)) != sorted(map(stacking.override_key, theirs)):
        return None
    parsed = parser.parse_overrides(mine)
    if any(o.is_delete() or o.is_sweep_override() for o in parsed):
        return None
    config = copy.deepcopy(first)
    with read_write(config), open_dict(config):
        for o in parsed:
            OmegaConf.update(config, o.key_or_group, o.value(), merge=False, force_add=True)
        config.hydra.overrides.task = list(overrides)
        dirname = config.hydra.job.config.override_dirname
        exclude = set(dirname.exclude_keys)
        lines = sorted(
            o.input_line for o in parser.parse_overrides(overrides) if o.key_or_group not in exclude
        )
        config.hydra.job.override_dirname = dirname.item_sep.join(lines).replace("=", dirname.kv_sep)
    return config


class _Writer:
    """The task function of a stacked job: writes its run directory from the trained stack.

    It writes with the job's config as resolved before training (the group's `cfgs`: the same values as the config
    run_job hands it, whose interpolations would be resolved again on every read)."""

    def __init__(self, write: Any, group: Any, k: int) -> None:
        self.write, self.group, self.k = write, group, k

    def __call__(self, cfg: DictConfig) -> Any:
        return self.write(self.group.cfgs[self.k], self.group, self.k)
