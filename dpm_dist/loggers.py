"""Metric sinks behind one tiny protocol. Only rank 0 writes; no sink ever runs a collective.

The only module that imports ``torch.utils.tensorboard``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Optional, Protocol

from dpm_dist.dist import DistEnv


class MetricLogger(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self, hparams: Optional[dict[str, Any]] = None, final: Optional[dict[str, float]] = None) -> None: ...


class NullLogger:
    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def close(self, hparams=None, final=None) -> None:
        pass


class TensorBoardLogger:
    """Scalars under hierarchical tags (``train/loss_id``, ``lr/main_weight``, ``eval/mAP``) + hparams."""

    def __init__(self, log_dir: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = log_dir
        self.writer = SummaryWriter(log_dir=log_dir)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self, hparams: Optional[dict[str, Any]] = None, final: Optional[dict[str, float]] = None) -> None:
        if hparams is not None:
            clean = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams.items()}
            self.writer.add_hparams(clean, {f"hparam/{k}": v for k, v in (final or {}).items()}, run_name=".")
        self.writer.close()


class StdoutLogger:
    """One compact line per logged step; eval results in full."""

    def __init__(self, stream=sys.stdout) -> None:
        self.stream = stream
        self.start = time.time()

    def log(self, metrics: dict[str, float], step: int) -> None:
        keys = [k for k in metrics if k.startswith("eval/")] or [k for k in metrics if k in _HEADLINE]
        body = " ".join(f"{k.split('/')[-1]}={metrics[k]:.4g}" for k in keys)
        if body:
            print(f"[step {step} +{time.time() - self.start:.0f}s] {body}", file=self.stream, flush=True)

    def close(self, hparams=None, final=None) -> None:
        if final:
            print("final: " + json.dumps(final), file=self.stream, flush=True)


_HEADLINE = ("train/loss", "train/loss_id", "train/loss_mask_id", "train/loss_hem", "train/loss_triplet", "train/acc", "perf/samples_per_sec")


class MultiLogger:
    def __init__(self, *sinks: MetricLogger) -> None:
        self.sinks = sinks

    def log(self, metrics: dict[str, float], step: int) -> None:
        for sink in self.sinks:
            sink.log(metrics, step)

    def close(self, hparams=None, final=None) -> None:
        for sink in self.sinks:
            sink.close(hparams, final)


def build_logger(log_cfg: Any, env: DistEnv) -> MetricLogger:
    """TensorBoard (``<output_dir>/tb``) + stdout on rank 0; a no-op logger elsewhere."""
    if not env.is_main:
        return NullLogger()
    sinks: list[MetricLogger] = [StdoutLogger()]
    if log_cfg.tensorboard:
        sinks.append(TensorBoardLogger(os.path.join(log_cfg.output_dir, "tb")))
    return MultiLogger(*sinks)
