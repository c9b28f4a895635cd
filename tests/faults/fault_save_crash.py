"""Fault ``save_crash``: SIGKILL the process in the middle of saving a checkpoint, as a crash or a pre-emption would.

``fault_env("save_crash", DPM_FAULT_SAVE_CRASH_EPOCH="3")``. Wraps ``DPMEngine.save`` (the checkpoint calls it once
per save): while it writes the folder of that epoch, the main DeepSpeed engine's files are written and the mask
engine's ``save_checkpoint`` kills the process instead. Every rank of the run does the same.
"""

from __future__ import annotations

import os
import signal
from types import ModuleType
from typing import Any

from after_import import after_import

EPOCH_ENV = "DPM_FAULT_SAVE_CRASH_EPOCH"


def _kill(*_args: Any, **_kwargs: Any) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _patch(engine: ModuleType) -> None:
    cls, tag = engine.DPMEngine, f"epoch_{int(os.environ[EPOCH_ENV]):04d}"
    save = cls.save

    def save_then_crash(self: Any, folder: str) -> None:
        if os.path.basename(os.path.normpath(folder)) == tag:
            self.mask.save_checkpoint = _kill  # this engine only, after the main engine's files
        save(self, folder)

    cls.save = save_then_crash


after_import("dpm_dist.train.engine", _patch)
