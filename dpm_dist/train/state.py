"""``RunState``: what a training run carries from step to step and across a resume.

The loop updates it; every checkpoint's ``meta.json`` saves it (:meth:`RunState.checkpoint_meta`) and a resume
reads it back (:meth:`RunState.from_meta`); the model files and ``results.json`` are written from it
(:meth:`RunState.model_file_meta`, :meth:`RunState.summary`); ``train()`` returns it to ``dpm-train``. One
typed record instead of dicts, so each file's keys are spelled in one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class RunState:
    config: dict[str, Any]  # the resolved configuration this run trains with ("config")
    config_changes: list[dict[str, Any]]  # the changes made on resume: [{"after_epoch", "changes"}]
    datasets: list[dict[str, Any]]  # the training datasets, in order (the manifest's "datasets")
    epoch: int = 0  # the epoch being trained, or the last one finished
    step: int = 0  # optimiser steps taken since the run began (skipped ones too)
    epoch_step: int = 0  # steps of `epoch` taken (resumed from a step checkpoint: > 0 and < epoch_steps)
    epoch_steps: int = 0  # the steps `epoch` has
    epoch_samples: int = 0  # samples of `epoch`'s global order trained so far (every rank's)
    best: float = -1.0  # the best search.metric of an evaluation so far
    results: dict[str, float] = field(default_factory=dict)  # the last evaluation's metrics
    best_epoch: int = 0  # the epoch of that best evaluation (0: none yet)
    best_results: dict[str, float] = field(default_factory=dict)  # its metrics
    evaluations: list[dict[str, Any]] = field(default_factory=list)  # every evaluation: {"epoch", "step", "results"}
    cmc: dict[str, list[float]] = field(default_factory=dict)  # the last evaluation's CMC curve(s) (never saved)
    chance_rank1: float | None = None  # the rank-1 of a random ranking of the evaluated data (never saved)
    num_skipped_corrupt: int = 0  # corrupt samples skipped, summed over ranks, up to the last count: sightings
    skipped_corrupt_keys: list[str] = field(default_factory=list)  # the distinct samples among them (sorted keys)
    num_skipped_steps: int = 0  # steps skipped for non-finite values (the same on every rank)
    rng_restored: bool = False  # resumed with every rank's RNG state (the same world size): no reseeding
    resumed_tag: str | None = None  # the checkpoint this invocation resumed from; None: a new run
    resumed_world_size: int = 0  # the world size that checkpoint was written with
    uncounted_corrupt: int = 0  # this rank's skipped samples not yet in num_skipped_corrupt (never saved)
    uncounted_keys: set[str] = field(default_factory=set)  # their keys, not yet in skipped_corrupt_keys (never saved)
    config_unwritten: bool = False  # resumed: config.yaml is rewritten with the first checkpoint saved (never saved)

    @classmethod
    def from_meta(
        cls, meta: dict[str, Any], config: dict[str, Any], changes: list[dict[str, Any]], datasets: list[dict[str, Any]]
    ) -> RunState:
        """The state saved in a checkpoint's ``meta.json`` (as :func:`dpm_dist.train.checkpoint.resume` returns it).
        A step checkpoint at the last step of its epoch is that epoch finished."""
        epoch_step, epoch_steps = int(meta.get("epoch_step", 0)), int(meta.get("epoch_steps", 0))
        mid_epoch = 0 < epoch_step < epoch_steps
        return cls(
            config=config,
            config_changes=changes,
            datasets=datasets,
            epoch=meta["epoch"],
            step=meta["step"],
            epoch_step=epoch_step if mid_epoch else 0,
            epoch_steps=epoch_steps if mid_epoch else 0,
            epoch_samples=int(meta.get("epoch_samples", 0)) if mid_epoch else 0,
            best=meta.get("best", -1.0),
            results=dict(meta.get("results", {})),
            best_epoch=meta.get("best_epoch", 0),
            best_results=dict(meta.get("best_results", {})),
            evaluations=list(meta.get("evaluations", [])),
            num_skipped_corrupt=meta.get("num_skipped_corrupt", 0),
            skipped_corrupt_keys=list(meta.get("skipped_corrupt_keys", [])),
            num_skipped_steps=meta.get("num_skipped_steps", 0),
            rng_restored=bool(meta.get("rng_restored")),
            resumed_tag=meta["tag"],
            resumed_world_size=meta["world_size"],
        )

    @property
    def mid_epoch(self) -> bool:
        """Resumed from a step checkpoint inside ``epoch`` (which is then not finished)."""
        return 0 < self.epoch_step < self.epoch_steps

    def position(self) -> str:
        """Where the run is, for messages: ``after step 31 (epoch 16, step 1 of 2)``, or after a whole epoch."""
        if not self.step:
            return "before the first step"
        if self.mid_epoch:
            return f"after step {self.step} (epoch {self.epoch}, step {self.epoch_step} of {self.epoch_steps})"
        return f"after epoch {self.epoch}, step {self.step}"

    def start_line(self) -> str:
        """How this invocation starts, for the start-up block."""
        if self.resumed_tag is None:
            return "new run"
        if self.mid_epoch:
            return (
                f"resumed from {self.resumed_tag} (epoch {self.epoch}, step {self.epoch_step} of {self.epoch_steps}; "
                f"step {self.step}, world size {self.resumed_world_size})"
            )
        return (
            f"resumed from {self.resumed_tag} (epoch {self.epoch}, step {self.step}, "
            f"world size {self.resumed_world_size})"
        )

    def checkpoint_meta(self, in_epoch: bool = False) -> dict[str, Any]:
        """What a checkpoint's ``meta.json`` holds of the run (the save adds epoch, step, tag, world size); ``in_epoch``:
        a step checkpoint's, with the position in the epoch (``epoch_step`` of ``epoch_steps``, ``epoch_samples``)."""
        position = (
            {"epoch_step": self.epoch_step, "epoch_steps": self.epoch_steps, "epoch_samples": self.epoch_samples}
            if in_epoch
            else {}
        )
        return position | {
            "best": self.best,
            "results": self.results,
            "best_epoch": self.best_epoch,
            "best_results": self.best_results,
            "evaluations": self.evaluations,
            "config": self.config,
            "config_changes": self.config_changes,
            "datasets": self.datasets,
            "num_skipped_corrupt": self.num_skipped_corrupt,
            "skipped_corrupt_keys": self.skipped_corrupt_keys,
            "num_skipped_steps": self.num_skipped_steps,
        }

    def model_file_meta(self) -> dict[str, Any]:
        """The metadata of ``model_best.pt`` / ``model_final.pt``."""
        meta = {
            "epoch": self.epoch,
            "step": self.step,
            "results": self.results,
            "config": self.config,
            "datasets": self.datasets,
        }
        return self._with_changes(meta)

    def record_evaluation(
        self, results: dict[str, float], metric: str, cmc: dict[str, list[float]], chance_rank1: float | None = None
    ) -> bool:
        """Keep an evaluation of this epoch (last results, history, CMC, chance, best); whether it is the best so far."""
        self.results, self.cmc, self.chance_rank1 = results, cmc, chance_rank1
        self.evaluations.append({"epoch": self.epoch, "step": self.step, "results": dict(results)})
        improved = results[metric] > self.best
        if improved:
            self.best, self.best_epoch, self.best_results = results[metric], self.epoch, dict(results)
        return improved

    def summary(self) -> dict[str, Any]:
        """``results.json``: the finished run: the last evaluation (``results``, its CMC curve ``cmc``), the best
        one (``best``: its ``search.metric``; ``best_epoch``, ``best_results``), every evaluation (``evaluations``)."""
        summary = {
            "results": self.results,
            "best": self.best,
            "epochs": self.epoch,
            "steps": self.step,
            "num_skipped_corrupt": self.num_skipped_corrupt,
            "datasets": self.datasets,
            "num_skipped_steps": self.num_skipped_steps,
            "best_epoch": self.best_epoch,
            "best_results": self.best_results,
            "evaluations": self.evaluations,
            "cmc": self.cmc,
            "chance_rank1": self.chance_rank1,
            "num_skipped_corrupt_samples": len(self.skipped_corrupt_keys),
            "skipped_corrupt_keys": self.skipped_corrupt_keys,
        }
        return self._with_changes(summary)

    def adopt_final_evaluation(self, summary: dict[str, Any] | None) -> None:
        """A run extended past its last epoch resumes from a checkpoint saved before that epoch's evaluation
        (so an evaluation failure costs no training); the evaluation itself is in ``results.json``: take it."""
        if not summary or summary.get("epochs") != self.epoch or summary.get("steps") != self.step:
            return
        self.results, self.best = dict(summary.get("results", {})), summary.get("best", self.best)
        self.best_epoch = summary.get("best_epoch", self.best_epoch)
        self.best_results = dict(summary.get("best_results", self.best_results))
        self.evaluations = list(summary.get("evaluations", self.evaluations))
        self.cmc, self.chance_rank1 = dict(summary.get("cmc", {})), summary.get("chance_rank1")

    def _with_changes(self, meta: dict[str, Any]) -> dict[str, Any]:
        return dict(meta, config_changes=self.config_changes) if self.config_changes else meta
