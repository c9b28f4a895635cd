"""Fault ``nonfinite``: rank 0's batch images are NaN at the given 1-based steps, as a corrupt input would make them.

``fault_env("nonfinite", DPM_FAULT_NONFINITE_STEPS="1,3,4")``. Wraps ``DPMEngine.step`` (the loop calls it once
per step): the batch it is given on rank 0 at those steps has its images times NaN. Steps count from the first
step of this process, which in a new run is the run's first step.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Any

from after_import import after_import

STEPS_ENV = "DPM_FAULT_NONFINITE_STEPS"


def _steps() -> frozenset[int]:
    raw = os.environ.get(STEPS_ENV, "")
    try:
        return frozenset(int(part) for part in raw.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"{STEPS_ENV}={raw!r}: expected step numbers such as 3,4") from None


def _rank() -> int:
    import torch.distributed as tdist

    return tdist.get_rank() if tdist.is_available() and tdist.is_initialized() else 0


def _patch(engine: ModuleType) -> None:
    cls, poisoned, taken = engine.DPMEngine, _steps(), [0]
    step = cls.step

    def step_with_nan_images(self: Any, batch: dict[str, Any]) -> dict[str, float]:
        taken[0] += 1
        if taken[0] in poisoned and _rank() == 0:
            batch = dict(batch, images=batch["images"] * float("nan"))
        return step(self, batch)

    cls.step = step_with_nan_images


after_import("dpm_dist.train.engine", _patch)
