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

from dpm_dist.cli.common import CONFIG_NAME, CONFIG_PATH

DEFAULT_TUNE = "tiny_asha"


def run(cfg_node: Any) -> list[dict[str, Any]]:
    """Validate the composed config, run (or resume) the search, print and write its results."""
    from dpm_dist.config import to_config
    from omegaconf import OmegaConf

    from dpm_dist.tune.results import BEST_EXPERIMENT, format_table, results_dir, write_best, write_csv
    from dpm_dist.tune.search import best_trial, publish_results, results_rows, run_search

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
    hydra.main(config_path=CONFIG_PATH, config_name=CONFIG_NAME, version_base="1.3")(run)()


if __name__ == "__main__":
    main()
