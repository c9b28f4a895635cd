"""Ray Tune search over DPM's α, β, m, s (and lr): each trial is a Ray Train run of N DeepSpeed workers.

The only module that imports ``ray``. Shape of a search (Ray 2.60, Train V2)::

    Tuner(trial_driver)                      one Tune function trial per sampled config (1 CPU)
      └─ TorchTrainer(train_worker).fit()    a Ray Train run with search.workers_per_trial workers
           └─ dpm_dist.train.loop.train(cfg, env, report)   the same loop as dpm-train, on every worker

Each periodic evaluation is reported by every worker with its files of the checkpoint just written
(Ray merges them into one checkpoint folder in storage), and forwarded to Tune by
``TuneReportCallback`` for the searcher and the ASHA scheduler (time attribute ``epoch``). Workers
keep their run folders on node-local scratch; a restarted worker group (``FailureConfig``) or a
restored search (``Tuner.restore``) rebuilds them from the Ray checkpoint alone, so nothing relies
on a file system shared between nodes except ``search.storage_path`` (NFS or S3 on clusters).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import posixpath
import shutil
import tempfile
import time
from typing import Any, ClassVar, cast

import ray
import ray.train
import ray.tune
from omegaconf import OmegaConf
from ray.train.torch import TorchConfig, TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from dpm_dist import dist
from dpm_dist.config import DPMConfig, to_config
from dpm_dist.dist import DistEnv
from dpm_dist.fsio import write_text_atomic

FORWARDED_ENV = ("DS_ACCELERATOR", "OMP_NUM_THREADS")  # driver env vars the training workers also need
PG_KEY = "ray_placement_group"  # reported by the workers: the placement group their trial holds
RELEASE_GRACE_S = 10.0  # after a trial ends, time for its Tune actor (and Train controller) to exit
# Read by Ray Train V2 in the process calling fit() and propagated to its controller (ray/train/v2/_internal/constants.py).
WORKER_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


# ---- search space ---------------------------------------------------------------------------------


def param_space(space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Tune domains keyed by dotted config key, from validated ``search.space`` entries."""
    tune = ray.tune
    builders = {
        "uniform": lambda e: tune.uniform(e["low"], e["high"]),
        "loguniform": lambda e: tune.loguniform(e["low"], e["high"]),
        "quniform": lambda e: tune.quniform(e["low"], e["high"], e["q"]),
        "randint": lambda e: tune.randint(e["low"], e["high"]),
        "choice": lambda e: tune.choice(list(e["values"])),
        "grid": lambda e: tune.grid_search(list(e["values"])),
    }
    return {key: builders[entry["type"]](entry) for key, entry in space.items()}


def _extremes(entry: dict[str, Any]) -> list[Any]:
    if "values" in entry:
        return list(entry["values"])
    if entry["type"] == "randint":
        return [entry["low"], entry["high"] - 1]
    return [entry["low"], entry["high"]]


def check_space(base: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the entry when a value of ``search.space`` makes an invalid config.

    Every entry's bounds (or values) are applied to the base config and validated by the schema,
    so α ∈ [0, 1.5] fails here instead of in the trials.
    """
    space = base["search"]["space"]
    if not space:
        raise ValueError("config field `search.space`: empty; pick a configs/tune/*.yaml (tune=...) or set entries")
    for key, entry in space.items():
        for value in _extremes(entry):
            try:
                trial_config(base, {key: value})
            except Exception as err:  # schema type errors (OmegaConf) and range checks (ValueError)
                raise ValueError(
                    f"config field `search.space.{key}`: value {value!r} gives an invalid config: {err}"
                ) from err


def trial_config(base: dict[str, Any], overrides: dict[str, Any], output_dir: str | None = None) -> DPMConfig:
    """The validated config of one trial: the resolved base config with the sampled dotted overrides."""
    node = OmegaConf.create(base)
    for key, value in overrides.items():
        OmegaConf.update(node, key, value, merge=False)
    if output_dir is not None:
        node.log.output_dir = output_dir
    return to_config(node)


# ---- per-worker training function ---------------------------------------------------------------


def _materialize(checkpoint: ray.train.Checkpoint | None, run_dir: str) -> dict[str, Any]:
    """Rebuild ``run_dir/checkpoints`` from the Ray checkpoint (an ``epoch_XXXX`` folder); its meta.json ({}:
    none, a new trial)."""
    shutil.rmtree(run_dir, ignore_errors=True)  # stale local state of an earlier attempt on this node
    ckpt_root = os.path.join(run_dir, "checkpoints")
    os.makedirs(ckpt_root)
    if checkpoint is None:
        return {}
    staging = os.path.join(ckpt_root, "incoming")
    checkpoint.to_directory(staging)
    with open(os.path.join(staging, "meta.json")) as f:
        meta = json.load(f)
    os.replace(staging, os.path.join(ckpt_root, meta["tag"]))
    write_text_atomic(os.path.join(ckpt_root, "latest"), meta["tag"])
    return meta


def restored_result(meta: dict[str, Any]) -> dict[str, Any] | None:
    """The evaluation of the epoch a restored trial resumes from (from its checkpoint's meta.json), or None.

    A search interrupted (Ctrl-C) saves its state as it stops, while the trial's Ray Train run may still checkpoint
    one more epoch: the resumed trial then starts after an epoch whose result the search never received, and ASHA
    would judge the trial at that epoch's rung on a later epoch's result. The worker reports it again first; a
    result the search had already received changes nothing (ASHA records a trial once per rung).
    """
    epoch = int(meta.get("epoch", 0))
    if not epoch or meta.get("epoch_step"):  # none, or a step checkpoint (Ray gets epoch checkpoints only)
        return None
    done = [e for e in meta.get("evaluations", []) if int(e.get("epoch", -1)) == epoch]
    return dict(done[-1]["results"], epoch=epoch) if done else None


def _upload_tensorboard(run_dir: str) -> None:
    """Copy rank 0's TensorBoard folder next to the trial's Ray Train run in storage."""
    import pyarrow.fs

    local_tb = os.path.join(run_dir, "tb")
    if not os.path.isdir(local_tb):
        return
    storage = ray.train.get_context().get_storage()
    dest = posixpath.join(posixpath.dirname(storage.experiment_fs_path), "tensorboard")
    storage.storage_filesystem.create_dir(dest, recursive=True)
    pyarrow.fs.copy_files(local_tb, dest, destination_filesystem=storage.storage_filesystem)


TRIAL_FILES = ("model_best.pt", "model_final.pt", "results.json")  # rank 0's, copied into the trial's folder


def _upload_trial_files(run_dir: str, uploaded: dict[str, int]) -> None:
    """Copy rank 0's model files (and results.json) that are new or rewritten since the last copy into the
    trial's folder in storage (``<storage>/<name>/trial_<id>/``), so ``dpm-eval --checkpoint`` takes that folder
    like a ``dpm-train`` run folder. ``uploaded``: file name -> mtime of the copy made, updated here."""
    import pyarrow.fs

    storage = ray.train.get_context().get_storage()
    dest = posixpath.dirname(storage.experiment_fs_path)
    fs = storage.storage_filesystem
    for name in TRIAL_FILES:
        local = os.path.join(run_dir, name)
        if not os.path.isfile(local) or uploaded.get(name) == os.stat(local).st_mtime_ns:
            continue
        mtime = os.stat(local).st_mtime_ns
        fs.create_dir(dest, recursive=True)
        partial = posixpath.join(dest, f".{name}.partial")  # a reader never sees half a model file
        pyarrow.fs.copy_files(local, partial, destination_filesystem=fs)
        fs.move(partial, posixpath.join(dest, name))
        uploaded[name] = mtime


def _placement_group_id() -> str:
    group = ray.util.get_current_placement_group()
    return group.id.hex() if group is not None else ""


def scratch_root(search: dict[str, Any]) -> str:
    """The node-local scratch folder of the workers' run folders: ``search.local_dir`` or <system temp>/dpm-tune."""
    return search["local_dir"] or os.path.join(tempfile.gettempdir(), "dpm-tune")


def train_worker(loop: dict[str, Any]) -> None:
    """One Ray Train worker of a trial: restore the run folder from Ray's checkpoint, then ``train``.

    The run folder is scratch: the trial's Ray checkpoints in storage are the state a restart resumes
    from, so a worker that finished removes it.
    """
    from dpm_dist.train.loop import train

    # Ray made the process group (TorchConfig.timeout_s); DeepSpeed's own groups get the same bound.
    dist.bound_new_groups(datetime.timedelta(seconds=loop["base"]["engine"]["collective_timeout_s"]))
    ctx = ray.train.get_context()
    env = DistEnv(
        rank=ctx.get_world_rank(),
        local_rank=ctx.get_local_rank(),
        world_size=ctx.get_world_size(),
        local_world_size=ctx.get_local_world_size(),
    )
    run_dir = os.path.join(loop["local_dir"], f"rank_{env.rank}")
    restored = _materialize(ray.train.get_checkpoint(), run_dir)
    restored_epoch = int(restored.get("epoch", 0))
    cfg = trial_config(loop["base"], loop["overrides"], output_dir=run_dir)
    uploaded: dict[str, int] = {}
    again = restored_result(restored)
    if again is not None:  # every rank reports, as after each evaluation; no checkpoint: the search has it
        ray.train.report(dict(again, restored_epoch=restored_epoch, **{PG_KEY: _placement_group_id()}))

    def report(metrics: dict[str, float], epoch: int, folder: str | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(folder) if folder else None
        if env.is_main:  # before the report: ASHA may stop the trial on it
            _upload_tensorboard(run_dir)
            _upload_trial_files(run_dir, uploaded)
        extra = {"epoch": epoch, "restored_epoch": restored_epoch, PG_KEY: _placement_group_id()}
        ray.train.report(
            dict(metrics, **extra),
            checkpoint=checkpoint,
            checkpoint_dir_name=os.path.basename(folder) if folder else None,
            delete_local_checkpoint_after_upload=not env.is_main,
        )

    train(cfg, env, report=report)
    if env.is_main:
        _upload_trial_files(run_dir, uploaded)  # model_final.pt, results.json
    shutil.rmtree(run_dir, ignore_errors=True)


# ---- per-trial driver (the Tune function) ---------------------------------------------------------


def trial_driver(config: dict[str, Any], *, base: dict[str, Any]) -> None:
    """One Tune trial: a Ray Train run whose name and storage stay fixed, so a re-run resumes it."""
    search = base["search"]
    ctx = ray.tune.get_context()
    storage = ctx.get_storage()
    trial_id = ctx.get_trial_id()
    loop = {
        "base": base,
        "overrides": dict(config),
        "local_dir": os.path.join(scratch_root(search), search["name"], trial_id),
    }
    env_vars = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    os.environ[WORKER_START_TIMEOUT_ENV] = str(float(search["worker_start_timeout_s"]))  # this trial actor only
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=loop,
        torch_config=TorchConfig(timeout_s=int(base["engine"]["collective_timeout_s"])),  # a lost worker fails fast
        scaling_config=ray.train.ScalingConfig(
            num_workers=search["workers_per_trial"],
            use_gpu=search["gpus_per_worker"] > 0,
            resources_per_worker=_worker_resources(search),
        ),
        run_config=ray.train.RunConfig(
            name="train",
            storage_path=storage.trial_fs_path,
            storage_filesystem=storage.storage_filesystem,
            # A worker group that cannot get its resources fails the trial after a few timed-out starts
            # (Ray's default, -1, retries forever: the hang of an over-committed cluster).
            failure_config=ray.train.FailureConfig(
                max_failures=search["max_failures"], controller_failure_limit=search["worker_start_retries"]
            ),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute=search["metric"], checkpoint_score_order=search["mode"]
            ),
            callbacks=[TuneReportCallback()],
            worker_runtime_env={"env_vars": env_vars},
        ),
    )
    trainer.fit()


def _worker_resources(search: dict[str, Any]) -> dict[str, float]:
    resources = {"CPU": float(search["cpus_per_worker"])}
    if search["gpus_per_worker"] > 0:
        resources["GPU"] = float(search["gpus_per_worker"])
    return resources


def concurrent_trials(search: dict[str, Any], cluster: dict[str, float]) -> int:
    """``search.max_concurrent_trials``, or as many trials as the cluster's CPUs and GPUs hold.

    Raises ``ValueError`` when not even one trial fits (Ray Train would wait for resources forever);
    on an autoscaling cluster set ``search.max_concurrent_trials`` to skip the check.
    """
    if search["max_concurrent_trials"] > 0:
        return int(search["max_concurrent_trials"])
    workers = search["workers_per_trial"]
    need = {
        "CPU": search["driver_cpus"] + workers * search["cpus_per_worker"],
        "GPU": workers * search["gpus_per_worker"],
    }
    fits = [int(cluster.get(kind, 0) // amount) for kind, amount in need.items() if amount > 0]
    if fits and min(fits) < 1:
        raise ValueError(
            f"config field `search.workers_per_trial`: one trial needs {need['CPU']:g} CPUs and "
            f"{need['GPU']:g} GPUs (driver_cpus + workers_per_trial × cpus/gpus_per_worker) but the Ray "
            f"cluster has {cluster.get('CPU', 0):g} CPUs and {cluster.get('GPU', 0):g} GPUs"
        )
    return max(1, min(fits)) if fits else 1


# ---- the search ------------------------------------------------------------------------------------


def storage_of(search: dict[str, Any]) -> tuple[str, Any]:
    """(storage path, pyarrow filesystem or None) for ``search.storage_path`` (local path or s3://)."""
    path = search["storage_path"] or "runs/tune"
    if not path.startswith("s3://"):
        return os.path.abspath(path), None
    if not search["s3_endpoint"]:
        return path, None  # pyarrow's own S3 with the AWS default credential chain
    import pyarrow.fs
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": search["s3_endpoint"]})
    return path[len("s3://") :], pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


class ReleaseStoppedTrials(ray.tune.Callback):
    """Remove the worker placement group of every trial Tune stopped (ASHA) or that failed.

    Stopping a trial kills its Tune actor, and with it the Ray Train controller it owns, before the
    controller can remove its workers' placement group; a group lives as long as the job that
    created it. Ray Train's own cleaner actor needs the State API (the dashboard of ray[default]);
    without it the group's CPUs/GPUs stay reserved until ``dpm-tune`` exits and later trials wait
    forever. This removes them from the Tune driver a little after the trial ended instead.
    """

    def setup(self, **info: Any) -> None:
        self.groups: dict[str, str] = {}
        self.due: list[tuple[float, str]] = []

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if result.get(PG_KEY):
            self.groups[trial.trial_id] = result[PG_KEY]

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._schedule(trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._schedule(trial)

    def _schedule(self, trial: Any) -> None:
        if trial.trial_id in self.groups:
            self.due.append((time.monotonic() + RELEASE_GRACE_S, self.groups.pop(trial.trial_id)))

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        from ray.util.placement_group import PlacementGroup, placement_group_table

        now = time.monotonic()
        for deadline, group_id in [d for d in self.due if d[0] <= now]:
            self.due.remove((deadline, group_id))
            group = PlacementGroup(ray.PlacementGroupID.from_hex(group_id))
            if placement_group_table(group).get("state") == "CREATED":
                ray.util.remove_placement_group(group)


class ShowTrials(ray.tune.Callback):
    """dpm-tune's own lines, at every ``log.level``: each trial's start with the number of trials then running
    (the concurrency a user can check), each report (epoch and metrics) and its end or failure."""

    def __init__(self) -> None:
        self.last: dict[str, dict] = {}  # trial id -> its last result

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        running = 1 + sum(t.status == "RUNNING" for t in trials if t is not trial)  # it becomes RUNNING just after
        print(f"dpm-tune: {trial} started; trials running: {running}", flush=True)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self.last[trial.trial_id] = result
        # in percent, as dpm-train's evaluation lines and summary (the results and the CSV keep fractions)
        shown = ", ".join(f"{k}={result[k]:.1%}" for k in ("mAP", "rank1") if isinstance(result.get(k), float))
        print(f"dpm-tune: {trial} epoch {result.get('epoch')}: {shown}", flush=True)

    def _epoch(self, trial: Any) -> int:
        """The last epoch ``trial`` reported: in this run, or before it (a resumed search's saved results)."""
        return (self.last.get(trial.trial_id) or getattr(trial, "last_result", None) or {}).get("epoch", 0)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        print(f"dpm-tune: {trial} ended after epoch {self._epoch(trial)}", flush=True)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        epoch = self._epoch(trial)
        where = f" (its error: {trial.path}/error.txt)" if getattr(trial, "path", None) else ""
        print(f"dpm-tune: {trial} failed after epoch {epoch}{where}", flush=True)


ShowTrialStarts = ShowTrials  # its former name, pickled in the tuner.pkl of searches started before


class ReportedResults(ray.tune.Callback):
    """Every trial's reported (epoch, metric) in the order the search received them, kept with the search's saved
    state and handed to :class:`TrialCap` when a search is resumed, so ASHA's rungs are rebuilt from it.

    Tune saves no scheduler state (``tuner.pkl`` holds the scheduler as the first run started it) and a resumed
    trial's ``result.json`` in storage starts over; Tune does save callbacks' state with the experiment's, and
    restores it before it re-adds the trials (``TuneController.resume``).
    """

    def __init__(self, metric: str) -> None:
        self.metric = metric
        # trial id -> [(epoch, metric, n)], n numbering the search's reports (searches saved before: no n)
        self.history: dict[str, list[tuple]] = {}

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if "epoch" in result and self.metric in result:
            n = sum(len(r) for r in self.history.values())
            self.history.setdefault(trial.trial_id, []).append((int(result["epoch"]), float(result[self.metric]), n))

    def get_state(self) -> dict[str, Any]:
        return {"history": self.history}

    def set_state(self, state: dict[str, Any]) -> None:
        self.history = {t: list(r) for t, r in state["history"].items()}
        TrialCap.history = {t: list(r) for t, r in self.history.items()}


class TrialCap(ray.tune.schedulers.TrialScheduler):
    """The search's scheduler (ASHA, FIFO) with at most ``concurrent_trials`` trials running or starting.

    The searcher's limit only gates *new* trials. ``Tuner.restore`` re-queues every unfinished and errored
    trial as PENDING at once, and Tune starts each one whose driver CPUs fit; their Ray Train worker groups
    then wait for CPUs the drivers hold (the hang of a resumed search). Here the trials beyond the limit
    are added PAUSED instead and started one by one as slots free. Tune pickles this object (with the
    first run's settings) into ``tuner.pkl`` and a restored search gets it back, so the limit is read
    from ``current_limit``, which :func:`build_tuner` sets from this run's command and cluster.
    """

    current_limit: int = 1  # set by build_tuner in the process that runs the search (the Tune driver)
    # trial id -> its reported (epoch, metric, n), set by ReportedResults when a search is restored: Tune saves no
    # scheduler state, so ASHA's rungs are rebuilt from them (see replay)
    history: ClassVar[dict[str, list[tuple]]] = {}
    # the restored trials' results not yet replayed: (order, trial, epoch, metric)
    to_replay: ClassVar[list[tuple[tuple[int, ...], Any, int, float]]] = []

    def __init__(self, base: ray.tune.schedulers.TrialScheduler) -> None:
        super().__init__()
        self.base = base

    @property
    def limit(self) -> int:
        return TrialCap.current_limit

    @property
    def metric(self) -> str | None:
        return self.base.metric

    @property
    def supports_buffered_results(self) -> bool:
        return self.base.supports_buffered_results

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        return self.base.set_search_properties(metric, mode, **spec)

    def _active(self, controller: Any, other_than: Any = None) -> int:
        return sum(t.status in ("RUNNING", "PENDING") for t in controller.get_trials() if t is not other_than)

    def on_trial_add(self, controller: Any, trial: Any) -> None:
        self.base.on_trial_add(controller, trial)
        for i, (epoch, value, *n) in enumerate(TrialCap.history.pop(trial.trial_id, [])):
            TrialCap.to_replay.append(((n[0],) if n else (-1, i), trial, epoch, value))
        if trial.status == "PENDING" and self._active(controller, other_than=trial) >= self.limit:
            trial.set_status("PAUSED")  # Tune files the trial by this status right after this call

    def replay(self, controller: Any) -> None:
        """Record the restored trials' past results in ASHA's rungs, in the order the search received them, so
        that the resumed search stops the trials the uninterrupted one would.

        Called once every trial is re-added (a cutoff depends on the other trials' results). A restored trial
        that ASHA stops on these results is stopped now: the interrupted run took that decision when the trial
        reported but could not carry it out (the trial was being interrupted), and training it on would give it
        epochs the uninterrupted search never ran.
        """
        pending, TrialCap.to_replay = sorted(TrialCap.to_replay, key=lambda r: r[0]), []
        sign = getattr(self.base, "_metric_op", 1)  # 1 for mode=max, -1 for min: ASHA keeps the maximum
        stopped: dict[Any, int] = {}
        for _, trial, epoch, value in pending:
            bracket = getattr(self.base, "_trial_info", {}).get(trial.trial_id)  # ASHA only (FIFO keeps no state)
            if bracket is None or trial in stopped:
                continue
            decision = bracket.on_result(trial, epoch, sign * value)  # records the result at its rung
            if decision == ray.tune.schedulers.TrialScheduler.STOP and trial.status in ("PENDING", "PAUSED"):
                stopped[trial] = epoch
        for trial, epoch in stopped.items():
            print(
                f"dpm-tune: {trial} stopped by the scheduler at epoch {epoch} (reported before the interruption)",
                flush=True,
            )
            controller.stop_trial(trial)  # TERMINATED, as ASHA stops a trial; its checkpoints and results stay

    def on_trial_error(self, controller: Any, trial: Any) -> None:
        self.base.on_trial_error(controller, trial)

    def on_trial_result(self, controller: Any, trial: Any, result: dict) -> str:
        if TrialCap.to_replay:  # Tune chooses a trial to run before it runs one; this is only a safeguard
            self.replay(controller)
        return self.base.on_trial_result(controller, trial, result)

    def on_trial_complete(self, controller: Any, trial: Any, result: dict) -> None:
        self.base.on_trial_complete(controller, trial, result)

    def on_trial_remove(self, controller: Any, trial: Any) -> None:
        self.base.on_trial_remove(controller, trial)

    def choose_trial_to_run(self, controller: Any) -> Any:
        if TrialCap.to_replay:
            self.replay(controller)
        trial = self.base.choose_trial_to_run(controller)
        if trial is not None and trial.status == "PAUSED" and self._active(controller) >= self.limit:
            return None
        return trial

    def debug_string(self) -> str:
        return f"{self.base.debug_string()} At most {self.limit} trials at once."


def _trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


def experiment_path(search: dict[str, Any]) -> tuple[str, Any]:
    """(``<storage>/<name>``, pyarrow filesystem or None): where Tune keeps the search's state."""
    storage_path, fs = storage_of(search)
    return posixpath.join(storage_path, search["name"]), fs


def build_tuner(base: dict[str, Any]) -> ray.tune.Tuner:
    """A new Tuner, or the interrupted one restored from storage (finished trials are not redone).

    A restored Tuner keeps the TuneConfig pickled by the first run (searcher, scheduler with its
    :class:`TrialCap`) and takes the trainable (the trial config) from this run; unfinished and
    errored trials resume from their last checkpoint.
    """
    search = base["search"]
    limit = concurrent_trials(search, ray.cluster_resources())  # a ValueError before any trial starts
    TrialCap.current_limit = limit
    print(
        f"dpm-tune: at most {limit} trial(s) at once ({'search.max_concurrent_trials' if search['max_concurrent_trials'] else 'what the cluster holds'})",
        flush=True,
    )
    storage_path, fs = storage_of(search)
    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(trial_driver, base=base), {"cpu": search["driver_cpus"]}
    )
    experiment, _ = experiment_path(search)
    if ray.tune.Tuner.can_restore(experiment, storage_filesystem=fs):
        print(f"dpm-tune: resuming {experiment}", flush=True)
        tuner = ray.tune.Tuner.restore(
            experiment,
            trainable,
            resume_unfinished=True,
            resume_errored=True,
            restart_errored=False,
            storage_filesystem=fs,
        )
        # The restored RunConfig is the first run's: the reporting follows this run's log.level instead.
        run_config = tuner._local_tuner.get_run_config() if tuner._local_tuner is not None else None
        if run_config is not None:
            run_config.verbose = RAY_VERBOSITY[base["log"]["level"]]
            run_config.callbacks = tune_callbacks(search)
        return tuner
    return ray.tune.Tuner(
        trainable,
        param_space=param_space(search["space"]),
        tune_config=ray.tune.TuneConfig(
            metric=search["metric"],
            mode=search["mode"],
            num_samples=search["num_samples"],
            search_alg=_searcher(search, limit),
            scheduler=TrialCap(_scheduler(search, base["optim"]["epochs"])),
            trial_dirname_creator=_trial_dirname,
            trial_name_creator=_trial_dirname,
        ),
        run_config=ray.tune.RunConfig(
            name=search["name"],
            storage_path=storage_path,
            storage_filesystem=fs,
            failure_config=ray.tune.FailureConfig(max_failures=0),
            verbose=RAY_VERBOSITY[base["log"]["level"]],
            callbacks=tune_callbacks(search),
        ),
    )


def tune_callbacks(search: dict[str, Any]) -> list[ray.tune.Callback]:
    """The search's callbacks: ours, and Tune's CSV and JSON loggers (progress.csv, result.json per trial).

    Always the same list in the same order: Tune restores the callbacks' saved state by position.

    Not Tune's TensorBoardX logger: with it Tune prints a ``tensorboard --logdir /tmp/ray/...`` command for
    a temporary copy, and each trial's TensorBoard files (the full training scalars of rank 0) are in
    ``<storage>/<name>/trial_<id>/tensorboard`` already (docs/tuning.md). Read by Tune in this process.
    """
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    return [
        ReleaseStoppedTrials(),
        ShowTrials(),
        ReportedResults(search["metric"]),
        CSVLoggerCallback(),
        JsonLoggerCallback(),
    ]


def _searcher(search: dict[str, Any], max_concurrent: int) -> Any:
    if search["searcher"] == "optuna":
        import optuna
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(sampler=optuna.samplers.TPESampler(seed=search["seed"])), max_concurrent)
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(random_state=search["seed"], max_concurrent=max_concurrent)


def _scheduler(search: dict[str, Any], epochs: int) -> Any:
    if search["scheduler"] == "fifo":
        return ray.tune.schedulers.FIFOScheduler()
    return ray.tune.schedulers.ASHAScheduler(
        time_attr="epoch",
        max_t=search["max_t"] or epochs,
        grace_period=search["grace_period"],
        reduction_factor=search["reduction_factor"],
    )


# log.level -> Ray Tune's own reporting (RunConfig.verbose: 0 silent, 1 status tables, 2 every result) and
# whether the trials' workers' output (training lines, Ray Train's controller) is forwarded to this command.
RAY_VERBOSITY = {"warning": 0, "info": 1, "debug": 2}


def workers_output_shown(level: str) -> bool:
    return RAY_VERBOSITY[level] > 0


def connect(search: dict[str, Any], level: str = "warning") -> None:
    """Join ``search.ray_address`` / ``$RAY_ADDRESS``, or start a local Ray instance.

    At ``log.level=warning`` the workers' output stays in Ray's session logs (``log_to_driver=False``); the
    command prints its own line per trial start, report and end, and a failed trial's error line.
    """
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    if not workers_output_shown(level):
        # Tune's output engine prints its experiment table, each trial's error and the /tmp/ray path of its
        # error file whatever RunConfig.verbose says; the former one is silent at verbose=0. The controller's
        # traceback of each failed trial is its error.txt again (dpm-tune names that file in one line).
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        logging.getLogger("ray.tune.execution.tune_controller").setLevel(logging.CRITICAL)
    address = search["ray_address"] or os.environ.get("RAY_ADDRESS")
    shown, ray_level = workers_output_shown(level), getattr(logging, level.upper())
    if address:
        ray.init(address=address, log_to_driver=shown, logging_level=ray_level)
    else:
        ray.init(
            num_cpus=search["num_cpus"] or None, include_dashboard=False, log_to_driver=shown, logging_level=ray_level
        )


def run_search(base: dict[str, Any]) -> ray.tune.ResultGrid:
    """Validate the space, run (or resume) the search, and return Tune's results.

    The workers' scratch folders on this node are removed at the end, whatever the outcome: a resumed
    trial rebuilds them from its checkpoint in storage.
    """
    check_space(base)
    connect(base["search"], base["log"]["level"])
    try:
        return build_tuner(base).fit()
    finally:
        clean_scratch(base["search"])


def clean_scratch(search: dict[str, Any]) -> None:
    """Remove the ``<scratch>/<name>/<trial>`` folders on this node, then ``<scratch>/<name>`` (and the default root) if empty."""
    folder = os.path.join(scratch_root(search), search["name"])
    if not os.path.isdir(folder):
        return
    for entry in os.scandir(folder):
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
    for empty in (folder, os.path.dirname(folder)) if not search["local_dir"] else (folder,):
        try:
            os.rmdir(empty)
        except OSError:
            return  # not empty (another search's folder) or already gone


def saved_trials(search: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Trial id -> ``{"status", "config", "epoch"}`` in the search's last saved state (what a re-run resumes from).

    Tune marks the trials it stops on Ctrl-C TERMINATED in memory but saves them as RUNNING/PENDING,
    so this tells an interrupted search (unfinished trials) from a finished one; the config is there
    also for a trial that never reported (its ``Result.config`` is None).
    """
    experiment, fs = experiment_path(search)
    analysis = ray.tune.ExperimentAnalysis(experiment, storage_filesystem=fs)
    return {
        t.trial_id: {
            "status": t.status,
            "config": dict(t.config or {}),
            "epoch": int((t.last_result or {}).get("epoch") or 0),  # saved with the state, even when result files lag
        }
        for t in analysis.trials
    }


# ---- results ---------------------------------------------------------------------------------------


def best_trial(rows: list[dict[str, Any]], base: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(full resolved config, trial summary) of the first row of :func:`dpm_dist.tune.results.results_rows`, or None."""
    search = base["search"]
    if not rows or rows[0][search["metric"]] is None:
        return None
    row = rows[0]
    overrides = {key: row[key] for key in search["space"]}
    config = cast(
        dict[str, Any], OmegaConf.to_container(OmegaConf.structured(trial_config(base, overrides)), resolve=True)
    )
    summary = f"{search['metric']}={row[search['metric']]:.4f} at epoch {row['best_epoch']}"
    return config, {"trial": row["trial"], "overrides": overrides, "summary": summary}


def publish_results(local_dir: str, search: dict[str, Any]) -> str | None:
    """Copy results.csv and best/ into ``<storage>/<name>/results`` when the storage is remote; its URI."""
    import pyarrow.fs

    path, fs = storage_of(search)
    if fs is None and not path.startswith("s3://"):
        return None  # local storage: results_dir defaults to the experiment folder itself
    dest = posixpath.join(path, search["name"], "results")
    if fs is None:
        fs, dest = pyarrow.fs.FileSystem.from_uri(dest)
    fs.create_dir(dest, recursive=True)
    pyarrow.fs.copy_files(local_dir, dest, destination_filesystem=fs)
    return f"s3://{dest}"
