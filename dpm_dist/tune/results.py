"""The results of a search as a person reads them: an aligned table, a CSV and the best trial as a preset.

Plain Python and OmegaConf (no Ray import): the rows are read from Ray's result grid (``ResultGrid``: an
iterable of ``Result`` with ``path``, ``config``, ``metrics_dataframe``, ``error``) that
:mod:`dpm_dist.tune.search` returns.
"""

from __future__ import annotations

import csv
import os
import posixpath
import re
from collections.abc import Iterable
from typing import Any

from omegaconf import OmegaConf

BEST_EXPERIMENT = "best"
UNFINISHED = ("PENDING", "RUNNING", "PAUSED")  # Tune statuses of a trial an interrupted search left to resume


def results_dir(search: dict[str, Any]) -> str:
    """Where results.csv and best/ go: ``search.results_dir``, else next to a local search, else runs/tune/<name>."""
    if search["results_dir"]:
        return os.path.abspath(search["results_dir"])
    storage = search["storage_path"] or "runs/tune"
    root = "runs/tune" if "://" in storage else storage
    return os.path.abspath(os.path.join(root, search["name"]))


def format_table(rows: list[dict[str, Any]]) -> str:
    """The results table as aligned text (floats with 4 significant digits)."""
    if not rows:
        return "(no trials)"
    columns = list(rows[0])
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def write_csv(rows: list[dict[str, Any]], path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["trial"])
        writer.writeheader()
        writer.writerows(rows)


def write_best(best: dict[str, Any], trial: dict[str, Any], out_dir: str, search_name: str) -> str:
    """The best trial's full config as ``<out_dir>/best/experiment/best.yaml`` (+ ``overrides.txt``); its path.

    The file is an experiment preset holding every field, so ``dpm-train --config-dir <out_dir>/best
    experiment=best`` trains that trial's config whatever the base command was; the searched values
    alone are in ``overrides.txt`` (``loss.alpha=0.41``...) for appending to one's own command.
    """
    folder = os.path.join(out_dir, "best")
    os.makedirs(os.path.join(folder, "experiment"), exist_ok=True)
    config, where = reproducible(best)
    config["search"] = {"metric": best["search"]["metric"], "mode": best["search"]["mode"]}
    config["log"] = dict(best["log"], output_dir=f"runs/{search_name}_best")
    searched = ", ".join(f"{k}={v}" for k, v in trial["overrides"].items())
    header = (
        f"# @package _global_\n"
        f"# dpm-train --config-dir {folder} experiment={BEST_EXPERIMENT}\n"
        f"# Best trial {trial['trial']} of search {search_name}: {trial['summary']}; {searched}\n"
        f"# It trains the trial's model {where}\n"
    )
    path = os.path.join(folder, "experiment", f"{BEST_EXPERIMENT}.yaml")
    with open(path, "w") as f:
        f.write(header + OmegaConf.to_yaml(OmegaConf.create(config)))
    with open(os.path.join(folder, "overrides.txt"), "w") as f:
        f.write("".join(f"{k}={v}\n" for k, v in trial["overrides"].items()))
    return path


def reproducible(best: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The best trial's config as a preset that trains the trial's model, and on how many ranks it does.

    A trial runs on ``search.workers_per_trial`` ranks. In the world-size-invariant mode (``engine.invariant``
    on, or ``auto`` with more than one worker) its model depends on its global batch only, so the preset states
    that batch (``data.global_num_ids``: the trial's per-rank P × its workers, unless given) and
    ``engine.invariant=on`` (``auto`` would turn it off on one rank), and trains the same model on any number of
    ranks that divides it. Otherwise the trial's model is one of its world size, and the sentence says so.
    """
    from dpm_dist.config import for_world_size, to_config

    config = dict(best)
    workers = int(best["search"]["workers_per_trial"])
    ran = for_world_size(to_config(best), workers)  # the trial as it ran: `auto` decided, the per-rank P
    mode = best["engine"]["invariant"]
    if ran.engine.invariant == "on":
        global_ids = ran.data.global_num_ids or ran.data.num_ids * workers
        config["data"] = dict(best["data"], global_num_ids=global_ids)
        config["engine"] = dict(best["engine"], invariant="on")
        return config, (
            f"on any number of ranks that divides its global batch (engine.invariant=on, "
            f"data.global_num_ids={global_ids}; it ran on {workers})"
        )
    return config, (
        f"on {workers} rank(s), as it ran (search.workers_per_trial); engine.invariant={mode}, so on another "
        "number of ranks it trains another model (docs/training.md, World-size invariance)"
    )


def failed_trials(grid: Iterable[Any]) -> list[tuple[str, str, str]]:
    """(trial id, one line of its error, where its error file is) of every trial that ended in ERROR."""
    failed = []
    for result in grid:
        if result.error is not None:
            trial_id = posixpath.basename(result.path).removeprefix("trial_")
            failed.append((trial_id, error_line(result.error), posixpath.join(result.path, "error.txt")))
    return failed


def error_line(error: BaseException) -> str:
    """The line of a trial's error a person acts on: the innermost ``SomeError: message`` of its traceback(s)."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    raised = [
        i for i, ln in enumerate(lines) if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)(\(.*\))?:", ln)
    ]
    if not raised:
        return lines[0][:300] if lines else type(error).__name__
    line = lines[raised[-1]]
    if line.endswith(":") and raised[-1] + 1 < len(
        lines
    ):  # "ControllerError: Training failed due to controller error:"
        line = f"{line} {lines[raised[-1] + 1]}"
    return line if len(line) <= 300 else line[:297] + "..."


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value  # numpy scalars from the samplers


def results_rows(grid: Iterable[Any], base: dict[str, Any], saved: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per trial, best first: sampled values, status, epochs run, and the metrics of its best epoch.

    ``status`` is ``done`` (reached max_t), ``stopped`` (ASHA), ``interrupted`` (a re-run resumes it) or
    ``ERROR``, from the saved state ``saved`` (:func:`dpm_dist.tune.search.saved_trials`); ``epochs`` is the
    last epoch the trial reported, each report with its checkpoint (from the saved state too: a trial's result
    files in storage can lag behind it when a search is interrupted);
    ``restored_from`` is the epoch of the checkpoint a restarted worker group resumed from (0: never).
    """
    search = base["search"]
    metric, sign = search["metric"], 1.0 if search["mode"] == "max" else -1.0
    max_t = search["max_t"] or base["optim"]["epochs"]
    rows = []
    for result in grid:
        trial_id = os.path.basename(result.path).removeprefix("trial_")
        trial = saved.get(trial_id, {"status": "UNKNOWN", "config": {}})
        config = result.config or trial["config"]  # None for a trial that never reported
        row: dict[str, Any] = {"trial": trial_id}
        row.update({key: _plain(config.get(key)) for key in search["space"]})
        frame = result.metrics_dataframe
        status = "interrupted" if trial["status"] in UNFINISHED else trial["status"]
        reached = int(trial.get("epoch") or 0)  # the last epoch reported (and checkpointed) in the saved state
        if frame is None or frame.empty or metric not in frame:
            row.update(status=status, epochs=reached, best_epoch=None, mAP=None, rank1=None, mINP=None, restored_from=0)
        else:
            best = frame.loc[(frame[metric] * sign).idxmax()]
            epochs = max(int(frame["epoch"].max()), reached)
            if status == "TERMINATED":
                status = "done" if epochs >= max_t else "stopped"
            row.update(
                status=status,
                epochs=epochs,
                best_epoch=int(best["epoch"]),
                mAP=float(best["mAP"]),
                rank1=float(best["rank1"]),
                mINP=float(best["mINP"]),
                restored_from=int(frame["restored_epoch"].max()),
            )
        rows.append(row)
    return sorted(rows, key=lambda r: -sign * r[metric] if r[metric] is not None else float("inf"))
