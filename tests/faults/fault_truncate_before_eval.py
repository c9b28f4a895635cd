"""Fault ``truncate_before_eval``: a shard is cut short after the start-up checks, just before an evaluation.

``fault_env("truncate_before_eval", DPM_FAULT_TRUNCATE_SHARD="shards/gallery-00000.tar",
DPM_FAULT_TRUNCATE_AT_EVAL="1")``. Wraps ``dpm_dist.eval.evaluator.evaluate`` (the training loop imports it at
each evaluation): before the given 1-based evaluation of this process, the shard file loses its second half,
as a disk or a copy that fails mid-run would leave it.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Any

from after_import import after_import

SHARD_ENV = "DPM_FAULT_TRUNCATE_SHARD"
AT_ENV = "DPM_FAULT_TRUNCATE_AT_EVAL"


def _patch(evaluator: ModuleType) -> None:
    evaluate, calls, at = evaluator.evaluate, [0], int(os.environ.get(AT_ENV, "1"))

    def evaluate_after_truncating(*args: Any, **kwargs: Any) -> dict[str, float]:
        calls[0] += 1
        if calls[0] == at:
            path = os.environ[SHARD_ENV]
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
        return evaluate(*args, **kwargs)

    evaluator.evaluate = evaluate_after_truncating


after_import("dpm_dist.eval.evaluator", _patch)
