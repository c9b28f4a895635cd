"""Fault ``trial_crash``: in a search, rank 1 of a trial exits (status 17) at the report of the given epoch,
once per search, as a lost worker would; Ray Train restarts the trial's workers from the last checkpoint.

``fault_env("trial_crash", DPM_FAULT_TRIAL_CRASH_EPOCH="2", DPM_FAULT_TRIAL_CRASH_MARKER="/abs/marker")``: the
rank that exits first creates the marker file (exclusively), so no later trial, restart or re-run of the
search exits again. Wraps ``dpm_dist.train.loop.train``, which the trial worker imports when it starts, to wrap
the ``report`` it is given on rank 1.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from types import ModuleType
from typing import Any

from after_import import after_import

EPOCH_ENV, MARKER_ENV = "DPM_FAULT_TRIAL_CRASH_EPOCH", "DPM_FAULT_TRIAL_CRASH_MARKER"


def _first(marker: str) -> bool:
    """Whether this process is the first to get here in this search (it creates the marker)."""
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def _exit_once(report: Callable[..., None], at_epoch: int, marker: str) -> Callable[..., None]:
    def report_or_exit(metrics: dict[str, float], epoch: int, folder: str | None) -> None:
        if epoch == at_epoch and _first(marker):
            import ray.train

            ray.train.get_all_reported_checkpoints()  # the previous epoch's checkpoint is registered: nothing is lost
            print(f"fault trial_crash: rank 1 exits at epoch {epoch}", flush=True)
            os._exit(17)
        report(metrics, epoch, folder)

    return report_or_exit


def _patch(loop: ModuleType) -> None:
    train, at_epoch, marker = loop.train, int(os.environ[EPOCH_ENV]), os.environ[MARKER_ENV]

    def train_with_a_crash(cfg: Any, env: Any, report: Callable[..., None] | None = None) -> Any:
        if report is not None and env.rank == 1:
            report = _exit_once(report, at_epoch, marker)
        return train(cfg, env, report=report)

    loop.train = train_with_a_crash


after_import("dpm_dist.train.loop", _patch)
