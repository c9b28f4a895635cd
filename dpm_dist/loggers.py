"""Metric sinks behind one tiny protocol. Only rank 0 writes; no sink ever runs a collective.

The only module that imports ``torch.utils.tensorboard``.
"""

from __future__ import annotations

import io
import logging
import os
import re
import sys
import time
import warnings
from typing import Any, Protocol

from dpm_dist.dist import DistEnv


class MetricLogger(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self, hparams: dict[str, Any] | None = None, final: dict[str, float] | None = None) -> None: ...


class NullLogger:
    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def close(self, hparams=None, final=None) -> None:
        pass


class TensorBoardLogger:
    """Scalars under hierarchical tags (``train/loss_id``, ``lr/main_weight``, ``eval/mAP``) + hparams."""

    def __init__(self, log_dir: str, purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = log_dir
        # purge_step: a resumed run tells readers to drop the crashed run's events from this step on.
        self.writer = SummaryWriter(log_dir=log_dir, purge_step=purge_step)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def log_image(self, tag: str, png_path: str, step: int) -> None:
        """An image summary of a picture file (PNG/JPEG) already written to disk."""
        import numpy as np
        from PIL import Image

        with Image.open(png_path) as image:
            pixels = np.asarray(image.convert("RGB"))
        self.writer.add_image(tag, pixels, step, dataformats="HWC")
        self.writer.flush()

    def close(self, hparams: dict[str, Any] | None = None, final: dict[str, float] | None = None) -> None:
        if hparams is not None:
            clean = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams.items()}
            self.writer.add_hparams(clean, {f"hparam/{k}": v for k, v in (final or {}).items()}, run_name=".")
        self.writer.close()


class StdoutLogger:
    """One compact line per logged step; eval results in full. Written with ``tqdm.write``, so a progress
    bar on the terminal is cleared first and redrawn after: the two never share a line."""

    def __init__(self, stream=None) -> None:
        self.stream = stream
        self.start = time.time()

    def log(self, metrics: dict[str, float], step: int) -> None:
        from tqdm import tqdm

        # eval/<dataset>/...: each dataset's metrics (several data.roots) are in the table the evaluator prints
        keys = [k for k in metrics if k.startswith("eval/") and k.count("/") == 1] or [
            k for k in metrics if k in _HEADLINE
        ]
        body = " ".join(_metric_text(k, metrics[k]) for k in keys)
        if body:
            tqdm.write(f"[step {step} +{time.time() - self.start:.0f}s] {body}", file=self.stream or sys.stdout)
            (self.stream or sys.stdout).flush()

    def close(self, hparams=None, final=None) -> None:
        pass


def _metric_text(key: str, value: float) -> str:
    """``loss=17.13``; an evaluation metric (fractions in TensorBoard and results.json) in percent with one
    decimal, as the end-of-run summary prints it: ``mAP=24.0%``."""
    name = key.split("/")[-1]
    return f"{name}={value:.1%}" if key.startswith("eval/") else f"{name}={value:.4g}"


_HEADLINE = (
    "train/loss",
    "train/loss_id",
    "train/loss_mask_id",
    "train/loss_hem",
    "train/loss_triplet",
    "train/acc",
    "perf/samples_per_sec",
)


class MultiLogger:
    def __init__(self, *sinks: MetricLogger) -> None:
        self.sinks = sinks

    def log(self, metrics: dict[str, float], step: int) -> None:
        for sink in self.sinks:
            sink.log(metrics, step)

    def close(self, hparams=None, final=None) -> None:
        for sink in self.sinks:
            sink.close(hparams, final)


def build_logger(log_cfg: Any, env: DistEnv, purge_step: int | None = None) -> MetricLogger:
    """TensorBoard (``<output_dir>/tb``) + stdout on rank 0; a no-op logger elsewhere. ``purge_step``: the
    first step a resumed run writes again (events of the crashed run from there on are dropped)."""
    if not env.is_main:
        return NullLogger()
    sinks: list[MetricLogger] = []
    if log_cfg.tensorboard:  # first: once a step is on stdout, it is on disk too
        sinks.append(TensorBoardLogger(os.path.join(log_cfg.output_dir, "tb"), purge_step=purge_step))
    sinks.append(StdoutLogger())
    return MultiLogger(*sinks)


# ---- what libraries print (set once per process, at the command's boundary) ---------------------------------

# Output no user can act on, hidden at the default log.level=warning (log.level=info or debug shows it):
QUIET_LOGGERS = (
    "torch.utils.cpp_extension",  # "No CUDA runtime is found, using CUDA_HOME=..." on every CPU rank
    "timm.scheduler.cosine_lr",  # "Cosine annealing scheduler will have no effect..." when optim.epochs=1
)
QUIET_WARNINGS = (  # (message regex, category) for warnings.filterwarnings
    (r"`torch\.distributed\.all_gather_into_tensor` is deprecated", FutureWarning),  # DeepSpeed's ZeRO gathers
)
QUIET_PRINTS = (re.compile(r"^DeepSpeed deepspeed\.ops\.\S+ built successfully$"),)  # a print() in deepspeed.comm
QUIET_RECORDS = (  # (logger, message regex): single lines of a logger whose other warnings still show
    ("DeepSpeed", re.compile(r"^Setting accelerator to CPU\.")),  # on every CPU run without DS_ACCELERATOR, stdout
)


class _DropRecords(logging.Filter):
    """Drops the records of :data:`QUIET_RECORDS` (on the named logger: DeepSpeed's does not propagate)."""

    def __init__(self, pattern: re.Pattern[str]) -> None:
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


class _QuietStdout(io.TextIOBase):
    """``sys.stdout`` minus whole lines that match :data:`QUIET_PRINTS` (a plain ``print`` cannot be leveled)."""

    def __init__(self, stream: Any) -> None:
        self.stream, self.pending = stream, ""

    def write(self, text: str) -> int:
        *lines, self.pending = (self.pending + text).split("\n")
        kept = [ln + "\n" for ln in lines if not any(p.match(ln) for p in QUIET_PRINTS)]
        if kept:
            self.stream.write("".join(kept))
        return len(text)

    def flush(self) -> None:
        if self.pending:
            self.stream.write(self.pending)
            self.pending = ""
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:  # fileno, isatty, encoding... of the real stream
        return getattr(self.stream, name)


def configure_library_output(level: str) -> None:
    """``log.level``: ``warning`` shows libraries' warnings and errors but not the noise above (the root
    logger at WARNING also hides the compiler lines DeepSpeed's op probes log at INFO, and botocore's
    per-connection "Found credentials" lines); ``info``/``debug`` show everything, DeepSpeed's logger too.
    dpm-dist's own loggers stay at INFO."""
    numeric = getattr(logging, level.upper())
    logging.getLogger().setLevel(numeric)
    logging.getLogger("dpm_dist").setLevel(min(numeric, logging.INFO))
    if numeric >= logging.WARNING:
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        for message, category in QUIET_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category)
        for name, pattern in QUIET_RECORDS:
            logger = logging.getLogger(name)  # DeepSpeed's logger is this object once deepspeed is imported
            if not any(isinstance(f, _DropRecords) and f.pattern is pattern for f in logger.filters):
                logger.addFilter(_DropRecords(pattern))
        if not isinstance(sys.stdout, _QuietStdout):
            real, sys.stdout = sys.stdout, _QuietStdout(sys.stdout)
            for handler in logging.getLogger().handlers:  # Hydra's console handler: still recognised by tqdm's redirect
                if isinstance(handler, logging.StreamHandler) and handler.stream is real:
                    handler.setStream(sys.stdout)
    else:
        for logger in (logging.getLogger("DeepSpeed"),):  # its own handler, WARNING by default
            logger.setLevel(numeric)
            for handler in logger.handlers:
                handler.setLevel(numeric)
