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

Each trial's folder (``<storage>/<name>/trial_<id>/``) holds its ``model_best.pt`` / ``model_final.pt`` like a
``dpm-train`` run folder (``dpm-eval --checkpoint`` takes it). At the default ``log.level=warning`` the command
prints its own line per trial start, report and end; ``log.level=info`` adds Ray's tables and the trials' output.

Exit status (after the table is written): 0 every trial ended (done or stopped by ASHA), 1 some trials
failed, 2 all trials failed or a user error before Ray started (one line ``dpm-tune: error: ...``),
130 interrupted (Ctrl-C; re-running the same command resumes).
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from dpm_dist.cli.common import (
    CONFIG_NAME,
    CONFIG_PATH,
    absolute_path,
    check_local_inputs,
    check_overrides,
    help_config,
    insert_override,
    resolve_paths,
    run_guarded,
)

PROG = "dpm-tune"
DEFAULT_TUNE = "tiny_asha"
DEFAULT_STORAGE = "runs/tune"
EXIT_SOME_FAILED = 1  # the search finished, its table and best trial are written, but some trials failed
EXIT_ALL_FAILED = 2  # no trial ran to the end: most often the data or the config (like other user errors)
EXIT_INTERRUPTED = 130  # as run_guarded for Ctrl-C: re-running the same command resumes

_resume_command = PROG  # the command line as typed, for the resume hint
GROUPS = ("tune", "experiment", "model", "engine")  # the config groups dpm-tune uses
HELP = """dpm-tune: search DPM's loss weights and margins (alpha, beta, m, s, lr) with Ray Tune; each trial trains
like dpm-train on search.workers_per_trial workers. Re-running the same command resumes an interrupted search.

Usage: dpm-tune [tune=PRESET] [experiment=PRESET] [engine=PRESET] [model=PRESET] [section.field=value ...]
       RAY_ADDRESS=auto dpm-tune tune=optuna_asha ...   (on a node of a running Ray cluster)

At the end: the results table (also <results_dir>/results.csv), each trial's model_best.pt / model_final.pt in
<storage>/<name>/trial_<id>/ (dpm-eval --checkpoint that folder), and the best trial as a preset:
dpm-train --config-dir <results_dir>/best experiment=best. Exit 0 every trial ended, 1 some failed,
2 all failed or a user error, 130 interrupted.

== Configuration groups ==
Compose your configuration from those groups (group=option); tune= defaults to tiny_asha (the CPU demo)

{groups}

== Config ==
Override anything in the config (section.field=value; search.* for the search, docs/tuning.md);
log.level=info shows Ray's own progress tables and the libraries' output.

$CONFIG

--cfg job prints the composed config; --config-dir DIR adds presets of your own; --hydra-help: Hydra's flags.
"""


def search_config(cfg_node: Any) -> dict[str, Any]:
    """The validated config as a plain dict, every local path absolute (Ray workers run in other folders)."""
    import dataclasses

    from omegaconf import OmegaConf

    from dpm_dist.config import to_config

    cfg = resolve_paths(to_config(cfg_node))
    # in seconds, before Ray starts: local inputs; remote roots' index.json and shard sizes, with the loader's retries
    check_local_inputs(cfg, remote_shards=True)
    if not cfg.search.storage_path:
        cfg = dataclasses.replace(
            cfg, search=dataclasses.replace(cfg.search, storage_path=absolute_path(DEFAULT_STORAGE))
        )
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def run(cfg_node: Any) -> list[dict[str, Any]]:
    """Validate the composed config, run (or resume) the search, print and write its results.

    Exits non-zero after writing the results when a trial failed or the search was interrupted.
    """
    base = search_config(cfg_node)  # user errors in seconds, before the Ray import below

    from dpm_dist.tune.results import (
        BEST_EXPERIMENT,
        UNFINISHED,
        failed_trials,
        format_table,
        reproducible,
        results_dir,
        results_rows,
        write_best,
        write_csv,
    )
    from dpm_dist.tune.search import best_trial, publish_results, run_search, saved_trials

    search = base["search"]
    grid = run_search(base)
    saved = saved_trials(search)
    rows = results_rows(grid, base, saved)
    best = best_trial(rows, base)
    out = results_dir(search)
    os.makedirs(out, exist_ok=True)
    write_csv(rows, os.path.join(out, "results.csv"))
    print(f"\nresults of {search['name']} ({search['metric']}, best first):\n{format_table(rows)}")
    print(f"table: {os.path.join(out, 'results.csv')}")
    if best is not None:
        config, trial = best
        path = write_best(config, trial, out, search["name"])
        print(
            f"best: {trial['trial']} ({trial['summary']})\n  dpm-train --config-dir {os.path.dirname(os.path.dirname(path))} "
            f"experiment={BEST_EXPERIMENT}\n  trains the trial's model {reproducible(config)[1]}",
            flush=True,
        )
    remote = publish_results(out, search)
    if remote:
        print(f"results copied to {remote}", flush=True)
    unfinished = sorted(t for t, trial in saved.items() if trial["status"] in UNFINISHED)
    if unfinished:
        _exit(EXIT_INTERRUPTED, f"interrupted; {len(unfinished)} of {len(saved)} trials unfinished; {resume_hint()}")
    _check_failures(failed_trials(grid), len(rows), _experiment_uri(search))
    return rows


def _check_failures(failed: list[tuple[str, str, str]], total: int, experiment: str) -> None:
    if not failed:
        return
    trial, line, _ = failed[0]
    where = (
        f"each failed trial's error: {experiment}/trial_<id>/error.txt; its output: this command's log with "
        "log.level=info (else Ray's session logs, /tmp/ray/session_latest/logs)"
    )
    if len(failed) == total:
        _exit(EXIT_ALL_FAILED, f"all {total} trials failed; first error (trial_{trial}): {line}\n  {where}")
    names = ", ".join(f"trial_{t}" for t, _, _ in failed)
    _exit(
        EXIT_SOME_FAILED,
        f"{len(failed)} of {total} trials failed ({names}); first error (trial_{trial}): {line}\n  {where}",
    )


def _experiment_uri(search: dict[str, Any]) -> str:
    return f"{search['storage_path'].rstrip('/')}/{search['name']}"


def _exit(code: int, message: str) -> NoReturn:
    """``dpm-tune: error: ...`` (or ``dpm-tune: interrupted; ...``) on stderr, as run_guarded prints them."""
    print(f"{PROG}: {message if code == EXIT_INTERRUPTED else 'error: ' + message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def resume_hint() -> str:
    return f"re-run the same command from this folder to resume: {_resume_command}"


def hydra_argv(argv: Sequence[str]) -> list[str]:
    """``tune=x`` becomes ``+tune=x`` (the group is not in train.yaml's defaults); default ``+tune=tiny_asha``.

    The default joins the other overrides (Hydra takes them as one run of words, so ``--cfg job a=1`` works).
    """
    out = ["+" + a if a.startswith("tune=") else a for a in argv]
    return out if any(a.startswith("+tune=") for a in out) else insert_override(out, f"+tune={DEFAULT_TUNE}")


def main(argv: Sequence[str] | None = None) -> None:
    import hydra
    from hydra.core.config_store import ConfigStore

    from dpm_dist.config import register_configs

    global _resume_command
    register_configs()
    ConfigStore.instance().store(
        group="hydra/help", name="dpm_tune", node=help_config(PROG, HELP, GROUPS), provider="dpm_dist"
    )
    typed = list(sys.argv[1:] if argv is None else argv)
    _resume_command = shlex.join([PROG, *typed])
    sys.argv = [sys.argv[0], *hydra_argv(typed)]
    run_guarded(PROG, lambda: check_overrides(sys.argv[1:]))  # one line naming the field, not Hydra's advice
    sys.argv[1:] = insert_override(sys.argv[1:], "hydra/help=dpm_tune")

    def task(cfg_node: Any) -> None:
        run_guarded(PROG, lambda: run(cfg_node), on_interrupt=resume_hint)

    hydra.main(config_path=CONFIG_PATH, config_name=CONFIG_NAME, version_base="1.3")(task)()


if __name__ == "__main__":
    main()
