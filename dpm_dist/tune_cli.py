"""``dpm-tune``: hyper-parameter search over α, β, m, s (and lr) with Ray Tune; the Hydra entry point.

    dpm-tune                                         # tune=tiny_asha: the CPU demo on the synthetic shards
    dpm-tune tune=optuna_asha experiment=occluded_duke search.storage_path=s3://bucket/dpm-sweeps
    RAY_ADDRESS=auto dpm-tune tune=optuna_asha ...   # on a node of a running Ray cluster

The base config is composed exactly as for ``dpm-train`` (same overrides), plus a search preset from
``configs/tune/`` (``tune=<name>``; ``+tune=`` also works). Re-running the same command resumes an
interrupted search; finished trials are kept. At the end the results table is printed and written to
``<results_dir>/results.csv`` (also copied to ``<storage>/<name>/results/`` on S3), and the best trial
becomes an experiment preset for ``dpm-train``::

    dpm-train --config-dir <results_dir>/best experiment=best
"""

from __future__ import annotations

import os
import sys
from typing import Any, Optional, Sequence

from omegaconf import OmegaConf

from dpm_dist.cli import CONFIG_DIR

DEFAULT_TUNE = "tiny_asha"
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
    import csv

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


def run(cfg_node: Any) -> list[dict[str, Any]]:
    """Validate the composed config, run (or resume) the search, print and write its results."""
    from dpm_dist.config import to_config
    from dpm_dist.tune import best_trial, publish_results, results_rows, run_search

    cfg = to_config(cfg_node)
    base = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    grid = run_search(base)
    rows = results_rows(grid, base)
    best = best_trial(rows, base)
    out = results_dir(base["search"])
    os.makedirs(out, exist_ok=True)
    write_csv(rows, os.path.join(out, "results.csv"))
    print(f"\nresults of {base['search']['name']} ({base['search']['metric']}, best first):\n{format_table(rows)}")
    print(f"table: {os.path.join(out, 'results.csv')}")
    if best is not None:
        config, trial = best
        path = write_best(config, trial, out, base["search"]["name"])
        print(f"best: {trial['trial']} ({trial['summary']})\n  dpm-train --config-dir {os.path.dirname(os.path.dirname(path))} "
              f"experiment={BEST_EXPERIMENT}", flush=True)
    remote = publish_results(out, base["search"])
    if remote:
        print(f"results copied to {remote}", flush=True)
    return rows


def hydra_argv(argv: Sequence[str]) -> list[str]:
    """``tune=x`` becomes ``+tune=x`` (the group is not in train.yaml's defaults); default ``+tune=tiny_asha``."""
    out = ["+" + a if a.startswith("tune=") else a for a in argv]
    if not any(a.startswith("+tune=") for a in out):
        out.insert(0, f"+tune={DEFAULT_TUNE}")
    return out


def main(argv: Optional[Sequence[str]] = None) -> None:
    import hydra

    from dpm_dist.config import register_configs

    register_configs()
    sys.argv = [sys.argv[0], *hydra_argv(sys.argv[1:] if argv is None else argv)]
    hydra.main(config_path=CONFIG_DIR, config_name="train", version_base="1.3")(run)()


if __name__ == "__main__":
    main()
