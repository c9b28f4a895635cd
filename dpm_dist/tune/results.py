"""The results of a search as a person reads them: an aligned table, a CSV and the best trial as a preset.

Plain Python and OmegaConf (no Ray): :mod:`dpm_dist.tune.search` turns Ray's result grid into rows.
"""

from __future__ import annotations

import csv
import os
from typing import Any

from omegaconf import OmegaConf

BEST_EXPERIMENT = "best"


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
    config = dict(best)
    config["search"] = {"metric": best["search"]["metric"], "mode": best["search"]["mode"]}
    config["log"] = dict(best["log"], output_dir=f"runs/{search_name}_best")
    searched = ", ".join(f"{k}={v}" for k, v in trial["overrides"].items())
    header = (f"# @package _global_\n"
              f"# dpm-train --config-dir {folder} experiment={BEST_EXPERIMENT}\n"
              f"# Best trial {trial['trial']} of search {search_name}: {trial['summary']}; {searched}\n")
    path = os.path.join(folder, "experiment", f"{BEST_EXPERIMENT}.yaml")
    with open(path, "w") as f:
        f.write(header + OmegaConf.to_yaml(OmegaConf.create(config)))
    with open(os.path.join(folder, "overrides.txt"), "w") as f:
        f.write("".join(f"{k}={v}\n" for k, v in trial["overrides"].items()))
    return path
