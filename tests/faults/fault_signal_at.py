"""Fault ``signal_at``: a signal at a given step, so a stop or a crash lands at a known step of the run.

``fault_env("signal_at", DPM_FAULT_SIGNAL_STEP="4", DPM_FAULT_SIGNAL="KILL")``. Wraps ``DPMEngine.step`` (the loop
calls it once per step): when this process is about to take its step ``DPM_FAULT_SIGNAL_STEP`` (1-based, counted
from the first step of this process), it sends itself ``SIG<DPM_FAULT_SIGNAL>``:

* ``KILL`` (every rank): the process dies before that step, as in a crash or ``kill -9`` of the job; whatever the
  loop saved after the step before (a step checkpoint) is on disk.
* ``USR1``, ``INT`` or ``TERM`` (rank 0 only, as a scheduler's signal to one process would): the loop's handler
  records it, that step is taken, and every rank stops at the step boundary after it.
* ``STOP`` (the rank ``DPM_FAULT_SIGNAL_RANK``, default 1): that rank freezes before the step, as a hung node; the
  others wait for it in their next collective.

``DPM_FAULT_SIGNAL_RANK`` names the one global rank that signals itself, whatever the signal.
"""

from __future__ import annotations

import os
import signal
from types import ModuleType
from typing import Any

from after_import import after_import

STEP_ENV, SIGNAL_ENV, RANK_ENV = "DPM_FAULT_SIGNAL_STEP", "DPM_FAULT_SIGNAL", "DPM_FAULT_SIGNAL_RANK"


def _rank() -> int:
    import torch.distributed as tdist

    return tdist.get_rank() if tdist.is_available() and tdist.is_initialized() else 0


def _patch(engine: ModuleType) -> None:
    cls, at, taken = engine.DPMEngine, int(os.environ[STEP_ENV]), [0]
    signum = signal.Signals[f"SIG{os.environ.get(SIGNAL_ENV, 'KILL')}"]
    default = "" if signum == signal.SIGKILL else "1" if signum == signal.SIGSTOP else "0"
    rank = os.environ.get(RANK_ENV, default)
    step = cls.step

    def step_with_signal(self: Any, batch: dict[str, Any]) -> dict[str, float]:
        taken[0] += 1
        if taken[0] == at and (not rank or _rank() == int(rank)):
            os.kill(os.getpid(), signum)
        return step(self, batch)

    cls.step = step_with_signal


after_import("dpm_dist.train.engine", _patch)
