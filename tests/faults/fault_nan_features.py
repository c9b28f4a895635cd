"""Fault ``nan_features``: a diverged model's features, in an evaluation: some query features are NaN.

``fault_env("nan_features", DPM_FAULT_NAN_QUERIES="3", DPM_FAULT_NAN_AT_EVAL="1")``. Wraps
``dpm_dist.eval.evaluator.extract`` (once per role and dataset in each evaluation): in the given 1-based
evaluation of this process (counted by the extractions that hold query rows), the features of this process's first
``DPM_FAULT_NAN_QUERIES`` query rows are NaN, as a model with NaN weights would make them.
"""

from __future__ import annotations

import dataclasses
import os
from types import ModuleType
from typing import Any

from after_import import after_import


def _patch(evaluator: ModuleType) -> None:
    extract, calls = evaluator.extract, [0]
    count, at = int(os.environ.get("DPM_FAULT_NAN_QUERIES", "1")), int(os.environ.get("DPM_FAULT_NAN_AT_EVAL", "1"))

    def extract_with_nan(*args: Any, **kwargs: Any) -> Any:
        out = extract(*args, **kwargs)
        if "query" not in out.roles:
            return out
        calls[0] += 1
        if calls[0] != at:
            return out
        rows = [i for i, role in enumerate(out.roles) if role == "query"][:count]
        feats = out.feats.clone()
        feats[rows] = float("nan")
        return dataclasses.replace(out, feats=feats)

    evaluator.extract = extract_with_nan


after_import("dpm_dist.eval.evaluator", _patch)
