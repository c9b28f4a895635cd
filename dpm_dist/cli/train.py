"""``dpm-train``: the Hydra entry point. The same command runs under any launcher.

    dpm-train                                   # the CPU demo (experiment=tiny on the synthetic shards)
    dpm-train experiment=occluded_duke engine=zero1_fp16 model.pretrained=/path/jx_vit_base_p16_224-80ecf9dd.pth
    torchrun --nproc-per-node 8 -m dpm_dist.cli.train experiment=occluded_duke
    deepspeed --hostfile hostfile --no_local_rank --module dpm_dist.cli.train experiment=occluded_duke

Re-running the same command resumes from ``<log.output_dir>/checkpoints/latest`` (with the checkpoint's
configuration: docs/training.md, "Resuming").
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from collections.abc import Iterator
from typing import Any

from dpm_dist.cli.common import (
    CONFIG_NAME,
    CONFIG_PATH,
    check_local_inputs,
    check_overrides,
    help_config,
    insert_override,
    one_process_checks,
    resolve_paths,
    run_guarded,
)

PROG = "dpm-train"
# launch/torchrun.sh and launch/slurm.sbatch run the command once with this set before starting the ranks: the
# checks that need no process group, so a user error is reported once instead of restarted (--max-restarts).
PREFLIGHT_ENV = "DPM_PREFLIGHT"
GROUPS = ("experiment", "model", "engine")  # the config groups dpm-train uses (tune/ is dpm-tune's)
HELP = """dpm-train: train DPM (occluded person ReID), on one process or under any launcher (torchrun, deepspeed,
Slurm); re-running the same command resumes the run in log.output_dir.

Usage: dpm-train [experiment=PRESET] [engine=PRESET] [model=PRESET] [section.field=value ...]
       torchrun --nproc-per-node N -m dpm_dist.cli.train [the same arguments]

== Configuration groups ==
Compose your configuration from those groups (group=option)

{groups}

== Config ==
Override anything in the config (section.field=value); log.level=info shows the libraries' own output.

$CONFIG

--cfg job prints the composed config; --config-dir DIR adds presets of your own; --hydra-help: Hydra's flags.
"""


def interrupted_hint(cfg: Any) -> str:
    """What Ctrl-C leaves behind and how to go on (rank 0 only: one line per run, not per rank)."""
    from dpm_dist.dist import DistEnv
    from dpm_dist.train.checkpoint import describe, latest_meta

    if cfg is None:
        return "nothing was saved"
    if not DistEnv.from_env().is_main:
        return ""
    ckpts = os.path.join(cfg.log.output_dir, "checkpoints")
    meta = latest_meta(ckpts)
    if meta is None:
        return f"no checkpoint was saved in {ckpts}; re-running the same command starts the run over"
    return (
        f"the latest checkpoint is {describe(meta, cfg.optim.epochs)} in {ckpts}; "
        "re-run the same command to resume from it"
    )


def print_end(
    cfg: Any,
    results: dict[str, float],
    skipped_corrupt: int = 0,
    skipped_steps: int = 0,
    corrupt_samples: int = 0,
    chance_rank1: float | None = None,
) -> None:
    """The closing block: the metrics, what was skipped (the run's ``num_skipped_corrupt``: sightings, of
    ``corrupt_samples`` distinct samples, and ``num_skipped_steps``), then where everything was written."""
    from dpm_dist.train.checkpoint import latest_meta

    out, tb = cfg.log.output_dir, os.path.join(cfg.log.output_dir, "tb")
    print(json.dumps({"results": results, "tensorboard": tb}), flush=True)
    per = per_dataset(results)
    if per:
        from dpm_dist.eval.evaluator import dataset_table

        print(dataset_table(per), flush=True)
    if results:
        mean = f"mean of {len(per)} datasets: " if per else ""
        print(
            f"{mean}rank-1 {results['rank1']:.1%}  mAP {results['mAP']:.1%}  mINP {results.get('mINP', float('nan')):.1%}  "
            f"({int(results['num_query'])} queries, {int(results['num_gallery'])} gallery images)",
            flush=True,
        )
        if chance_rank1 is not None:
            valid = int(results.get("num_valid_query", results["num_query"]))
            over = f"over the {valid} queries with a match" + (f", the mean of the {len(per)} datasets'" if per else "")
            print(
                f"chance level: rank-1 {chance_rank1:.1%} on this data (a random ranking: each query's true matches "
                f"among its gallery images, averaged {over})",
                flush=True,
            )
    if skipped_corrupt:
        distinct = corrupt_samples or skipped_corrupt
        print(
            f"skipped {distinct} corrupt training sample{'s' if distinct != 1 else ''}, {skipped_corrupt} "
            f"time{'s' if skipped_corrupt != 1 else ''} in all (each time a batch drew one; data.skip_corrupt=true; "
            "each is named in the log above)",
            flush=True,
        )
    if skipped_steps:
        print(
            f"skipped {skipped_steps} training step{'s' if skipped_steps > 1 else ''} with non-finite losses or "
            "gradients (no update applied; TensorBoard train/skipped_steps)",
            flush=True,
        )
    written = [
        f
        for f in ("model_final.pt", "model_best.pt", "results.json", "config.yaml")
        if os.path.isfile(os.path.join(out, f))
    ]
    meta = latest_meta(os.path.join(out, "checkpoints"))
    if meta:
        written.append(f"checkpoints/ (latest {meta['tag']})")
    print(f"written to {out}: {', '.join(written)}", flush=True)
    if os.path.isdir(tb):
        print(f"TensorBoard: tensorboard --logdir {tb}", flush=True)


def per_dataset(results: dict[str, float]) -> dict[str, dict[str, float]]:
    """The ``<dataset>/<key>`` entries of several datasets' results (``merge_datasets``), by dataset; {} for one."""
    per: dict[str, dict[str, float]] = {}
    for key, value in results.items():
        name, _, metric = key.rpartition("/")
        if name:
            per.setdefault(name, {})[metric] = value
    return per


def run_training(cfg_node: Any, state: dict[str, Any]) -> dict[str, float]:
    """Validate the composed config, join the process group, train, and return the final metrics."""
    from dpm_dist.config import to_config
    from dpm_dist.dist import DistEnv, init_process_group, peer_failures
    from dpm_dist.loggers import configure_library_output

    cfg = resolve_paths(to_config(cfg_node))
    configure_library_output(cfg.log.level)  # before deepspeed is imported
    preflight_only = os.environ.get(PREFLIGHT_ENV, "") not in ("", "0")
    # before any process group or model; remote shards once for the run (the launch scripts' preflight or one rank)
    check_local_inputs(cfg, remote_shards=preflight_only or one_process_checks())
    state["cfg"] = cfg
    from dpm_dist.train.loop import STOP_SIGNALS, RunStopped, install_stop_handlers, preflight, stop_name, train
    from dpm_dist.train.run_lock import check_free, hold

    if preflight_only:
        check_free(cfg.log.output_dir)  # a live run in the folder: refused once, before torchrun starts ranks
        preflight(cfg)
        return {}

    env = DistEnv.from_env()
    from dpm_dist.config import for_world_size

    for_world_size(cfg, env.world_size)  # data.global_num_ids this world size cannot share: one line, no process group
    # SIGINT, SIGTERM, SIGUSR1: recorded, acted on at the next step boundary. Under torchrun, SIGTERM stays
    # torchrun's way to stop the ranks at once (a restart after a rank died); launch/torchrun.sh forwards a
    # SIGTERM it receives as SIGUSR1 and names it in a file (stop_signal).
    elastic = "TORCHELASTIC_RESTART_COUNT" in os.environ
    install_stop_handlers(tuple(s for s in STOP_SIGNALS if not (elastic and s == signal.SIGTERM)))
    # Global rank 0 holds the run folder for the whole run, before anything there is read (resume) or written.
    with hold(cfg.log.output_dir, enabled=env.is_main), no_restart_after_a_mistake(cfg.log.output_dir):
        init_process_group(env, timeout_s=cfg.engine.collective_timeout_s)
        with peer_failures(env, cfg.engine.collective_timeout_s):  # a lost node: one line naming it, not a traceback
            try:
                run = train(cfg, env)
            except RunStopped as stop:  # a signal, acted on at a step boundary by every rank
                for other in STOP_SIGNALS:  # more of them while exiting (Python restores the defaults): ignored
                    signal.signal(other, signal.SIG_IGN)
                signum = stop_signal(stop.signum)
                if env.is_main:
                    print(f"{PROG}: {stop_name(signum)} {stop.detail}", file=sys.stderr, flush=True)
                raise SystemExit(stopped_status(128 + signum)) from None
    if env.is_main:
        print_end(
            cfg,
            run.results,
            run.num_skipped_corrupt,
            run.num_skipped_steps,
            len(run.skipped_corrupt_keys),
            run.chance_rank1,
        )
    return run.results


# launch/torchrun.sh and slurm.sbatch name a file here: a rank stopped by a signal writes its exit status into it
# and exits 0, so that torchrun ends quietly instead of restarting it; the script then exits with that status.
# launch/torchrun.sh writes the name of the signal it received and forwarded into <file>.signal.
STOP_STATUS_ENV = "DPM_STOP_STATUS_FILE"


def stop_signal(signum: int) -> int:
    """The signal the launcher received (``<DPM_STOP_STATUS_FILE>.signal``: SIGTERM, forwarded as SIGUSR1), else
    ``signum``."""
    path = os.environ.get(STOP_STATUS_ENV, "")
    if not path:
        return signum
    try:
        with open(f"{path}.signal") as f:
            name = f.read().strip()
    except OSError:
        return signum
    return int(signal.Signals[name]) if name in signal.Signals.__members__ else signum


def stopped_status(status: int) -> int:
    """The exit status of a rank stopped by a signal: ``status`` (128 + the signal), or 0 under launch/torchrun.sh
    after writing ``status`` into its :data:`STOP_STATUS_ENV` file."""
    path = os.environ.get(STOP_STATUS_ENV, "")
    if not path:
        return status
    try:
        with open(path, "w") as f:
            f.write(f"{status}\n")
    except OSError:
        return status
    return 0


STOP_FILE = ".dpm-stopped"  # in log.output_dir: the error that stopped the previous attempt of a restarted job


@contextlib.contextmanager
def no_restart_after_a_mistake(out_dir: str) -> Iterator[None]:
    """Under torchrun restarts, a ``ValueError`` (a bad value in the data or the run: a non-finite streak, a
    corrupt shard, ...) or a checkpoint that could not be written (a full disk) would stop every restart at the
    same place again: the attempt that met it records it, and the restarted ranks stop at once with the same
    line instead of replaying the work since the last checkpoint. A failure of a machine or of a read (a lost
    peer, storage out of retries) is restarted as usual. A new launch (restart count 0) forgets the record."""
    attempt, restarts = os.environ.get("TORCHELASTIC_RESTART_COUNT"), os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")
    if attempt is None or restarts == "0":
        yield
        return
    stop = os.path.join(out_dir, STOP_FILE)
    if attempt == "0":
        with contextlib.suppress(FileNotFoundError):
            os.remove(stop)
    elif os.path.isfile(stop):
        with open(stop) as f:
            raise ValueError(f"{f.read().strip()} (stopped again at once: a restart would only repeat it)")
    from dpm_dist.train.checkpoint import CheckpointSaveError

    try:
        yield
    except (ValueError, CheckpointSaveError) as err:
        with contextlib.suppress(OSError):  # a full disk may refuse even this
            with open(stop, "w") as f:
                f.write(str(err).splitlines()[0] if str(err) else type(err).__name__)
        raise


def main() -> None:
    import hydra
    from hydra.core.config_store import ConfigStore

    from dpm_dist.config import register_configs

    register_configs()
    ConfigStore.instance().store(
        group="hydra/help", name="dpm_train", node=help_config(PROG, HELP, GROUPS), provider="dpm_dist"
    )
    run_guarded(PROG, lambda: check_overrides(sys.argv[1:]))  # one line naming the field, not Hydra's advice
    sys.argv[1:] = insert_override(sys.argv[1:], "hydra/help=dpm_train")
    state: dict[str, Any | None] = {"cfg": None}

    def task(cfg_node: Any) -> None:
        run_guarded(PROG, lambda: run_training(cfg_node, state), on_interrupt=lambda: interrupted_hint(state["cfg"]))

    hydra.main(config_path=CONFIG_PATH, config_name=CONFIG_NAME, version_base="1.3")(task)()


if __name__ == "__main__":
    main()
