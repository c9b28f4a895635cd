"""dpm-tune: search-space validation, and real searches on a local Ray cluster (CPU, 2 DeepSpeed workers a trial).

The slow test runs the ``dpm-tune`` command itself (a local Ray instance per run, started and shut down
by the command) from a working folder with relative paths: a search of 2 tiny trials first over-committed
(2 at once on 2 CPUs, their drivers holding both: every worker group times out, all trials fail, exit 2),
then resumed by the plain command under the limit (1 at once) with ASHA, rank 1 of the first trial to reach
epoch 2 exiting once (the fault ``trial_crash``, tests/faults/fault_trial_crash.py) and recovered from the
epoch-1 checkpoint; that run is interrupted with SIGINT after its first trial, while the second one runs
(exit 130), and resumed by re-running the same command; the best trial's preset is then trained by ``dpm-train``.
"""

from __future__ import annotations

import csv
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from dpm_dist.cli.common import CONFIG_MODULE
from dpm_dist.config import SearchConfig, register_configs, to_config
from tests.conftest import fault_env

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TUNE_PRESETS = sorted(p.stem for p in (CONFIGS / "tune").glob("*.yaml"))
VENV_BIN = Path(sys.executable).parent
RUN_TIMEOUT_S = 420  # one dpm-tune command; the whole slow test stays well under this on 2 cores


def _base(overrides: list[str]) -> dict:
    register_configs()
    with initialize_config_module(config_module=CONFIG_MODULE, version_base=None):
        node = compose("train", overrides=overrides)
    return OmegaConf.to_container(OmegaConf.structured(to_config(node)), resolve=True)


# ---- search space and configuration (no Ray cluster) ---------------------------------------------


@pytest.mark.parametrize("preset", TUNE_PRESETS)
def test_every_tune_preset_composes_and_its_space_is_valid(preset):
    from dpm_dist.tune.search import check_space, param_space

    base = _base([f"+tune={preset}"])
    assert base["search"]["space"], preset
    check_space(base)
    assert set(param_space(base["search"]["space"])) == set(base["search"]["space"])
    text = (CONFIGS / "tune" / f"{preset}.yaml").read_text().splitlines()
    assert text[1].startswith(f"# dpm-tune tune={preset}")


@pytest.mark.parametrize(
    "entry, searcher, message",
    [
        (
            {"loss.alpah": {"type": "uniform", "low": 0.1, "high": 0.9}},
            "random",
            "search.space.loss.alpah`: not a searchable",
        ),
        (
            {"model.img_size": {"type": "choice", "values": [[128, 64]]}},
            "random",
            "search.space.model.img_size`: not a searchable",
        ),
        (
            {"loss.beta": {"type": "loguniform", "low": 0.3, "high": 0.01}},
            "random",
            "search.space.loss.beta`: low (0.3) must be < high",
        ),
        (
            {"loss.beta": {"type": "loguniform", "low": 0.0, "high": 0.3}},
            "random",
            "search.space.loss.beta`: loguniform needs low > 0",
        ),
        (
            {"loss.margin": {"type": "normal", "low": 0.2, "high": 0.5}},
            "random",
            "search.space.loss.margin`: unknown type 'normal'",
        ),
        (
            {"loss.scale": {"type": "grid", "values": [16.0, 30.0]}},
            "optuna",
            "search.space.loss.scale`: type grid cannot be used with search.searcher=optuna",
        ),
        (
            {"loss.scale": {"type": "choice", "values": [16.0]}},
            "grid",
            "search.space.loss.scale`: search.searcher=grid needs every entry",
        ),
        (
            {"loss.scale": {"type": "choice", "values": []}},
            "random",
            "search.space.loss.scale`: values must be a non-empty list",
        ),
        (
            {"loss.margin": {"type": "uniform", "low": 0.2}},
            "random",
            "search.space.loss.margin`: type uniform needs high",
        ),
        (
            {"loss.margin": {"type": "uniform", "low": 0.2, "high": 0.5, "q": 0.1}},
            "random",
            "search.space.loss.margin`: unexpected keys ['q']",
        ),
        (
            {"optim.epochs": {"type": "randint", "low": 2.5, "high": 9}},
            "random",
            "search.space.optim.epochs`: randint needs integer",
        ),
        ({"loss.alpha": "uniform(0, 1)"}, "random", "search.space.loss.alpha`: expected {type: ..., ...}"),
        (
            {"data.num_ids": {"type": "uniform", "low": 4, "high": 8}},
            "random",
            "search.space.data.num_ids`: type uniform samples floats but the field is int",
        ),
        (
            {"engine.update_mode": {"type": "randint", "low": 0, "high": 2}},
            "random",
            "search.space.engine.update_mode`: type randint samples numbers but the field is str",
        ),
    ],
)
def test_bad_search_space_entry_is_a_clear_error(entry, searcher, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        SearchConfig(searcher=searcher, space=entry)


@pytest.mark.parametrize(
    "entry, message",
    [
        (
            {"loss.alpha": {"type": "uniform", "low": 0.5, "high": 1.5}},
            "search.space.loss.alpha`: value 1.5 gives an invalid config",
        ),
        (
            {"optim.epochs": {"type": "choice", "values": [3, 0]}},
            "search.space.optim.epochs`: value 0 gives an invalid config",
        ),
        (
            {"data.num_ids": {"type": "randint", "low": 1, "high": 8}},
            "search.space.data.num_ids`: value 1 gives an invalid config",
        ),
    ],
)
def test_space_values_outside_the_schema_are_a_clear_error(entry, message):
    from dpm_dist.tune.search import check_space

    base = _base(["+tune=tiny_asha"])
    base["search"]["space"] = entry
    with pytest.raises(ValueError, match=re.escape(message)):
        check_space(base)


@pytest.mark.slow
def test_bad_entry_stops_dpm_tune_before_any_trial(tiny_shards, tmp_path):
    proc = subprocess.run(
        [
            str(VENV_BIN / "dpm-tune"),
            f"data.root={tiny_shards}",
            f"search.storage_path={tmp_path}",
            "search.space={loss.beta: {type: loguniform, low: 0.3, high: 0.01}}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode != 0
    assert "search.space.loss.beta`: low (0.3) must be < high (0.01)" in proc.stdout + proc.stderr
    assert not (tmp_path / "tiny_asha").exists()


@pytest.mark.slow
def test_missing_data_root_fails_in_seconds_naming_the_field(tmp_path):
    proc = subprocess.run(
        [str(VENV_BIN / "dpm-tune"), "data.root=shards/nowhere", "search.storage_path=storage"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=_env(),
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"dpm-tune: error: config field `data.root`: no such folder: {tmp_path / 'shards' / 'nowhere'} "
        f"(make shards with `dpm-shards write ...` or `dpm-shards synth --out {tmp_path / 'shards' / 'nowhere'}`)"
    ]
    assert "ray" not in proc.stdout.lower() and not (tmp_path / "storage").exists()  # no Ray started


@pytest.mark.slow
def test_remote_data_root_that_does_not_answer_fails_before_ray_starts(tmp_path):
    import socket

    with socket.socket() as sock:  # a port nothing listens on once this closes it
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/x"
    proc = subprocess.run(
        [str(VENV_BIN / "dpm-tune"), f"data.root={url}", "data.io_backoff_s=0.1", "search.storage_path=storage"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=_env(),
    )
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith(
        f"dpm-tune: error: config field `data.root`: {url}/index.json is unreachable after 3 attempts"
    ), line
    assert "ray" not in proc.stdout.lower() and not (tmp_path / "storage").exists()  # no Ray started


@pytest.mark.slow
def test_help_and_cfg_job_still_work(tmp_path):
    help_ = subprocess.run(
        [str(VENV_BIN / "dpm-tune"), "--help"], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert help_.returncode == 0 and "Configuration groups" in help_.stdout
    assert help_.stdout.startswith("dpm-tune: search DPM's loss weights"), help_.stdout[:500]
    assert "Usage: dpm-tune [tune=PRESET] [experiment=PRESET]" in help_.stdout
    assert f"tune: {', '.join(TUNE_PRESETS)}" in help_.stdout  # every preset, in order
    assert "Powered by Hydra" not in help_.stdout and "my_app" not in help_.stdout
    job = subprocess.run(
        [str(VENV_BIN / "dpm-tune"), "--cfg", "job", "search.worker_start_retries=0"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert job.returncode == 0 and "worker_start_retries: 0" in job.stdout and "name: tiny_asha" in job.stdout


def test_failed_trials_give_a_non_zero_exit_naming_the_first_error(capsys):
    from dpm_dist.cli.tune import EXIT_ALL_FAILED, EXIT_SOME_FAILED, _check_failures
    from dpm_dist.tune.results import error_line

    _check_failures([], 3, "/s/x")
    failed = [("a_00001", "ValueError: bad", "/s/x/trial_a_00001/error.txt")]
    with pytest.raises(SystemExit) as some:
        _check_failures(failed, 3, "/s/x")
    assert some.value.code == EXIT_SOME_FAILED == 1
    assert (
        capsys.readouterr().err.splitlines()[0]
        == "dpm-tune: error: 1 of 3 trials failed (trial_a_00001); first error (trial_a_00001): ValueError: bad"
    )
    with pytest.raises(SystemExit) as every:
        _check_failures(failed * 3, 3, "/s/x")
    assert every.value.code == EXIT_ALL_FAILED == 2
    assert (
        "dpm-tune: error: all 3 trials failed; first error (trial_a_00001): ValueError: bad\n  "
        "each failed trial's error: /s/x/trial_<id>/error.txt" in capsys.readouterr().err
    )
    nested = RuntimeError(
        "ray::ImplicitFunc.train()\n  File x\nray.train.ControllerError: Training failed due to "
        "controller error:\nThe worker group startup timed out after 5.0 seconds"
    )
    assert error_line(nested) == (
        "ray.train.ControllerError: Training failed due to controller error: "
        "The worker group startup timed out after 5.0 seconds"
    )


def test_trial_config_applies_sampled_values_and_output_dir():
    from dpm_dist.tune.search import trial_config

    base = _base(["+tune=tiny_asha"])
    cfg = trial_config(base, {"loss.alpha": 0.25, "loss.scale": 64.0, "optim.base_lr": 0.004}, output_dir="/x/rank_1")
    assert (cfg.loss.alpha, cfg.loss.scale, cfg.optim.base_lr, cfg.log.output_dir) == (0.25, 64.0, 0.004, "/x/rank_1")
    assert cfg.loss.beta == base["loss"]["beta"]


def test_concurrency_follows_the_cluster_resources():
    from dpm_dist.tune.search import concurrent_trials

    search = SearchConfig(workers_per_trial=2, cpus_per_worker=1.0, driver_cpus=1.0).__dict__
    assert concurrent_trials(search, {"CPU": 7.0}) == 2
    gpu = SearchConfig(workers_per_trial=4, cpus_per_worker=8.0, gpus_per_worker=1.0).__dict__
    assert concurrent_trials(gpu, {"CPU": 128.0, "GPU": 16.0}) == 3  # CPUs: 128 // 33 = 3, GPUs: 16 // 4 = 4
    assert concurrent_trials(dict(gpu, max_concurrent_trials=1), {"CPU": 128.0, "GPU": 16.0}) == 1
    with pytest.raises(ValueError, match="one trial needs 3 CPUs"):
        concurrent_trials(search, {"CPU": 2.0})


def test_asha_runs_on_the_reported_epoch():
    from dpm_dist.tune.search import _scheduler

    asha = _scheduler(SearchConfig(grace_period=2, reduction_factor=3).__dict__, epochs=9)
    assert (asha._time_attr, asha._max_t, asha._reduction_factor) == ("epoch", 9, 3)
    assert [rung for rung, _ in asha._brackets[0]._rungs] == [6, 2]  # stop decisions at epochs 2 and 6
    assert type(_scheduler(SearchConfig(scheduler="fifo").__dict__, epochs=9)).__name__ == "FIFOScheduler"


class _Trial:
    def __init__(self, trial_id: str):
        self.trial_id, self.status = trial_id, "PENDING"

    def set_status(self, status: str) -> None:
        self.status = status

    def __str__(self) -> str:
        return f"trial_{self.trial_id}"  # as Tune names a trial in dpm-tune


class _Controller:
    def __init__(self, trials):
        self.trials, self.stopped = trials, []

    def get_trials(self):
        return self.trials

    def stop_trial(self, trial):
        self.stopped.append(trial.trial_id)
        trial.set_status("TERMINATED")


def _asha(grace_period=1, epochs=3):
    from dpm_dist.tune.search import TrialCap, _scheduler

    cap = TrialCap(_scheduler(SearchConfig(grace_period=grace_period, reduction_factor=2).__dict__, epochs=epochs))
    cap.set_search_properties("mAP", "max")
    return cap


def test_a_resumed_search_makes_the_asha_decisions_of_the_uninterrupted_one(monkeypatch):
    """Tune saves no scheduler state: the resumed ASHA's rungs are rebuilt from the reported results, so the trial
    that the uninterrupted search stops at epoch 1 is stopped after a resume too (it ran to the end before)."""
    from dpm_dist.tune.search import ReportedResults, TrialCap

    monkeypatch.setattr(TrialCap, "current_limit", 3)
    reports = [("a", 1, 0.5), ("b", 1, 0.6), ("a", 2, 0.55), ("c", 1, 0.4), ("b", 2, 0.7), ("c", 2, 0.45)]

    def decisions(cap, trials, results):
        controller = _Controller(list(trials.values()))
        return [cap.on_trial_result(controller, trials[t], {"epoch": e, "mAP": v}) for t, e, v in results]

    whole = _asha()
    trials = {t: _Trial(t) for t in "abc"}
    for trial in trials.values():
        whole.on_trial_add(_Controller([]), trial)
    uninterrupted = decisions(whole, trials, reports)
    assert uninterrupted[3] == "STOP"  # c at epoch 1: below the rung's cutoff

    done, rest = reports[:3], reports[3:]  # interrupted after a's epoch 2; c not started
    saved = ReportedResults("mAP")  # the results, saved with the search's state (Tune pickles callbacks' state)
    for t, e, v in done:
        saved.on_trial_result(0, [], _Trial(t), {"epoch": e, "mAP": v})
    monkeypatch.setattr(TrialCap, "history", {})
    ReportedResults("mAP").set_state(pickle.loads(pickle.dumps(saved.get_state())))  # Tune's resume, before re-adding
    assert TrialCap.history == {"a": [(1, 0.5, 0), (2, 0.55, 2)], "b": [(1, 0.6, 1)]}  # n: the search's order
    resumed = _asha()  # a new scheduler, as Tuner.restore unpickles the first run's
    trials = {t: _Trial(t) for t in "abc"}
    for trial in trials.values():
        resumed.on_trial_add(_Controller([]), trial)
    assert decisions(resumed, trials, rest) == uninterrupted[3:]
    assert TrialCap.history == {}


def test_a_trial_interrupted_just_after_a_stopping_report_is_stopped_when_the_search_resumes(monkeypatch, capsys):
    """The interrupted run received b's epoch-2 report (below a's at the rung) and its checkpoint, but stopped before
    it could stop b; the resumed search stops b before it starts again (it used to train b to the end), whatever
    the order in which Tune re-adds the trials: the rungs are rebuilt in the order the results came."""
    from dpm_dist.tune.search import ReportedResults, TrialCap

    monkeypatch.setattr(TrialCap, "current_limit", 1)
    monkeypatch.setattr(TrialCap, "history", {})
    monkeypatch.setattr(TrialCap, "to_replay", [])
    saved = ReportedResults("mAP")
    for t, e, v in [("a", 1, 0.20), ("a", 2, 0.238), ("a", 3, 0.25), ("b", 1, 0.21), ("b", 2, 0.233)]:
        saved.on_trial_result(0, [], _Trial(t), {"epoch": e, "mAP": v})
    ReportedResults("mAP").set_state(pickle.loads(pickle.dumps(saved.get_state())))
    cap = _asha(grace_period=2)
    a, b = _Trial("a"), _Trial("b")
    a.status = "TERMINATED"  # a finished before the interruption; b is re-queued
    controller = _Controller([b, a])
    for trial in (b, a):  # b first: replaying b's results on its own would find an empty rung
        cap.on_trial_add(controller, trial)
    assert cap.choose_trial_to_run(controller) is None
    assert controller.stopped == ["b"] and b.status == "TERMINATED"
    assert (
        "dpm-tune: trial_b stopped by the scheduler at epoch 2 (reported before the interruption)"
        in capsys.readouterr().out
    )
    assert TrialCap.to_replay == []


@pytest.mark.parametrize(
    ("overrides", "global_ids", "any_size"),
    [
        (["engine.invariant=auto", "data.num_ids=3"], 6, True),  # 2 workers: auto was on in the trial
        (["engine.invariant=on", "data.global_num_ids=12"], 12, True),
        (["engine.invariant=off", "data.num_ids=3"], 0, False),
        (["engine.invariant=auto", "data.num_ids=3", "search.workers_per_trial=1"], 0, False),  # auto: off on 1
    ],
)
def test_the_best_preset_trains_the_trials_model_on_any_world_size_when_the_trial_was_invariant(
    tmp_path, overrides, global_ids, any_size
):
    """dpm-tune's best preset states the trial's global batch and turns the invariant mode on (not auto, which is off
    on one rank), so 1, 2, 3 or 6 ranks run the trial's global batch in the trial's mode; a trial that was not
    invariant is reproduced on its own world size only, and the preset and the printed line say so."""
    from dpm_dist.config import for_world_size
    from dpm_dist.tune.results import write_best

    trial_cfg = _base(["experiment=tiny", "search.workers_per_trial=2", *overrides])
    trial = {"trial": "t0", "summary": "mAP=0.5", "overrides": {"loss.alpha": 0.4}}
    path = write_best(trial_cfg, trial, str(tmp_path), "s")
    header = open(path).read().splitlines()[3]
    preset = OmegaConf.load(path)
    workers = trial_cfg["search"]["workers_per_trial"]
    ran = for_world_size(to_config(OmegaConf.create(trial_cfg)), workers)
    schema = OmegaConf.structured(to_config(OmegaConf.create(trial_cfg)))  # the typed config the preset fills
    if not any_size:
        assert header.startswith(f"# It trains the trial's model on {workers} rank(s), as it ran"), header
        assert preset.data.global_num_ids == trial_cfg["data"]["global_num_ids"] == 0
        return
    assert header == (
        "# It trains the trial's model on any number of ranks that divides its global batch (engine.invariant=on, "
        f"data.global_num_ids={global_ids}; it ran on {workers})"
    )
    assert preset.engine.invariant == "on" and preset.data.global_num_ids == global_ids
    assert ran.engine.invariant == "on" and ran.data.num_ids * workers == global_ids
    for ranks in (1, 2, 3, 6):
        runs = for_world_size(to_config(OmegaConf.merge(schema, preset)), ranks)
        assert runs.engine.invariant == "on" and runs.data.num_ids * ranks == global_ids  # the trial's global batch
        assert runs.engine.gather_triplet and runs.engine.hem_global_batch


def test_a_restored_trial_reports_the_result_of_the_epoch_it_resumes_from_again():
    """The interrupted search may never have received the result of the epoch the trial's Ray Train run checkpointed
    last (a CI run: epoch 2 saved after the search stopped, so ASHA judged the trial at epoch 2's rung on epoch 3's
    result); the restored worker reports it again first. Nothing for a new trial, a step checkpoint, or an epoch
    without an evaluation."""
    from dpm_dist.tune.search import restored_result

    evaluations = [
        {"epoch": 1, "step": 2, "results": {"mAP": 0.23}},
        {"epoch": 2, "step": 4, "results": {"mAP": 0.232}},
    ]
    assert restored_result({"epoch": 2, "evaluations": evaluations}) == {"mAP": 0.232, "epoch": 2}
    assert restored_result({"epoch": 1, "evaluations": evaluations}) == {"mAP": 0.23, "epoch": 1}
    assert restored_result({}) is None
    assert restored_result({"epoch": 2, "epoch_step": 1, "evaluations": evaluations}) is None
    assert restored_result({"epoch": 3, "evaluations": evaluations}) is None


def test_tune_group_is_added_to_the_hydra_overrides():
    from dpm_dist.cli.tune import hydra_argv

    assert hydra_argv(["a.b=1"]) == ["+tune=tiny_asha", "a.b=1"]
    assert hydra_argv(["tune=optuna_asha", "a.b=1"]) == ["+tune=optuna_asha", "a.b=1"]
    assert hydra_argv(["+tune=grid_margin_scale"]) == ["+tune=grid_margin_scale"]
    assert hydra_argv(["--cfg", "job", "a.b=1"]) == ["--cfg", "job", "+tune=tiny_asha", "a.b=1"]
    assert hydra_argv(["--cfg", "job"]) == ["--cfg", "job", "+tune=tiny_asha"]


# ---- a real search on a local Ray cluster ----------------------------------------------------------

TUNE_ARGS = [
    "tune=tiny_asha",
    "data.root=shards/x",
    "data.num_ids=4",  # relative to the working folder
    "data.num_instances=2",
    "optim.epochs=3",
    "optim.steps_per_epoch=2",
    "search.num_samples=2",
    "search.grace_period=2",  # ASHA's only rung is epoch 2: no trial can be stopped at epoch 1
    "search.driver_cpus=1",  # a trial (driver + 2 workers of 0.5) takes both CPUs: 1 at once fits
    "search.storage_path=storage",
    "search.local_dir=local",
    "search.results_dir=results",
    "search.num_cpus=2",
]
# 2 trials at once on 2 CPUs: 2 drivers hold both CPUs and no worker group (1 CPU) can start; it never will,
# so a short start timeout only cuts the wait
OVERCOMMITTED = ["search.max_concurrent_trials=2", "search.worker_start_timeout_s=2", "search.worker_start_retries=0"]


def _max_running(log: str) -> int:
    """The most trials running at once, from dpm-tune's line at each trial start."""
    counts = [int(n) for n in re.findall(r"dpm-tune: trial_\w+ started; trials running: (\d+)", log)]
    assert counts, log[-3000:]
    return max(counts)


def _scratch_trials(tmp_path: Path) -> list[str]:
    folder = tmp_path / "local" / "tiny_asha"
    return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []


def _stop(proc: subprocess.Popen) -> None:
    """End a dpm-tune run (and with it the local Ray instance it started) if it is still going."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


def _env(faults: str = "", **params: str) -> dict[str, str]:
    """The commands' environment; ``faults`` (with their ``params``): test-side faults in every process of the
    command, Ray's workers too (``fault_env``, tests/faults/)."""
    env = dict(
        os.environ, DS_ACCELERATOR="cpu", RAY_ENABLE_UV_RUN_RUNTIME_ENV="0", RAY_DEDUP_LOGS="0", PYTHONUNBUFFERED="1"
    )
    if not faults:
        return env
    injected = fault_env(faults, **params)
    return dict(env, PYTHONPATH=injected["PYTHONPATH"], DPM_TEST_FAULTS=injected["DPM_TEST_FAULTS"], **params)


def _assert_quiet(output: str) -> None:
    """At the default log.level a search prints dpm-tune's own lines and the table, not Ray's progress tables, the
    workers' output or Ray's TensorBoard command for its temporary folder."""
    lines = output.splitlines()
    assert len(lines) < 60, output[-4000:]
    assert "tensorboard --logdir" not in output and "Traceback" not in output, output[-4000:]


def _first_at(log: str, trial: str, epoch: int) -> float:
    """The mAP ``trial`` reported first at ``epoch`` or later (what ASHA records at that rung), from dpm-tune's lines
    (a resumed trial's result.json in storage starts over)."""
    found = re.findall(rf"dpm-tune: trial_{trial} epoch (\d+): mAP=([\d.]+)%", log)
    return next(float(v) for e, v in found if int(e) >= epoch)


def _result_lines(storage: Path) -> dict[str, int]:
    return {p.parent.name: len(p.read_text().splitlines()) for p in storage.glob("tiny_asha/trial_*/result.json")}


@pytest.mark.slow
def test_search_overcommitted_resumed_interrupted_resumed_and_best_config_reused(tiny_shards, tmp_path):
    shutil.copytree(tiny_shards, tmp_path / "shards" / "x")
    command = [str(VENV_BIN / "dpm-tune"), *TUNE_ARGS]
    marker = tmp_path / "trial_crash.marker"  # rank 1 of the first trial to report epoch 2 exits, once per search
    crash = _env("trial_crash", DPM_FAULT_TRIAL_CRASH_EPOCH="2", DPM_FAULT_TRIAL_CRASH_MARKER=str(marker))
    over = subprocess.run(
        command + OVERCOMMITTED, capture_output=True, text=True, env=crash, cwd=tmp_path, timeout=RUN_TIMEOUT_S
    )
    (tmp_path / "run0.log").write_text(over.stdout + over.stderr)
    assert over.returncode == 2, over.stdout[-3000:] + over.stderr[-3000:]
    assert re.search(
        r"dpm-tune: error: all 2 trials failed; first error \(trial_\w+\): ray\.train\.ControllerError: "
        r"Training failed due to controller error: The worker group startup timed out after 2\.0 seconds",
        over.stderr,
    ), over.stderr[-3000:]
    assert f"each failed trial's error: {tmp_path / 'storage' / 'tiny_asha'}/trial_<id>/error.txt" in over.stderr
    assert "results of tiny_asha" in over.stdout  # the table is still printed and written
    _assert_quiet(over.stdout + over.stderr)
    assert [r["status"] for r in csv.DictReader(open(tmp_path / "results" / "results.csv"))] == ["ERROR"] * 2
    assert len(list((tmp_path / "storage" / "tiny_asha").glob("trial_*/error.txt"))) == 2

    log1 = open(tmp_path / "run1.log", "w")
    first = subprocess.Popen(  # log.level=info: the workers' output too (the fault's line)
        [*command, "log.level=info"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=crash,
        cwd=tmp_path,
    )
    try:
        completed = interrupted = None
        for line in first.stdout:  # Ctrl-C once a first trial is done and a second one has reported epoch 1
            log1.write(line)
            if found := re.search(r"dpm-tune: trial_(\w+) ended after epoch", line):
                completed = completed or found.group(1)
            elif (found := re.search(r"dpm-tune: trial_(\w+) epoch 1: mAP=", line)) and completed:
                interrupted = found.group(1)
                first.send_signal(signal.SIGINT)
                break
        assert interrupted is not None, (tmp_path / "run1.log").read_text()[-3000:]
        log1.write(first.communicate(timeout=RUN_TIMEOUT_S)[0])
    finally:
        _stop(first)
        log1.close()
    run1 = (tmp_path / "run1.log").read_text()
    assert first.returncode == 130, run1[-3000:]
    assert re.search(
        r"dpm-tune: interrupted; 1 of 2 trials unfinished; re-run the same command from this folder "
        r"to resume: " + re.escape(f"dpm-tune {' '.join(TUNE_ARGS)}"),
        run1,
    ), run1[-3000:]
    assert "dpm-tune: resuming" in run1 and "dpm-tune: at most 1 trial(s) at once" in run1
    assert _max_running(run1) == 1  # the 2 errored trials resumed one at a time, not both at once
    assert _scratch_trials(tmp_path) == []  # the workers' run folders are removed, also after Ctrl-C
    assert "fault trial_crash: rank 1 exits at epoch 2" in run1
    assert marker.exists()
    table1 = {r["trial"]: r for r in csv.DictReader(open(tmp_path / "results" / "results.csv"))}
    assert table1[interrupted]["status"] == "interrupted" and int(table1[interrupted]["epochs"]) >= 1  # not 0
    storage = tmp_path / "storage"
    lines_before = _result_lines(storage)
    assert lines_before.get(f"trial_{completed}", 0) >= 1

    second = subprocess.run(command, capture_output=True, text=True, env=crash, cwd=tmp_path, timeout=RUN_TIMEOUT_S)
    (tmp_path / "run2.log").write_text(second.stdout + second.stderr)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "dpm-tune: resuming" in second.stdout
    # the interrupted run may have received the interrupted trial's epoch-2 report (and ASHA's decision on it)
    # before it stopped: the resumed search then carries the decision out instead of training the trial on
    stopped_on_resume = f"dpm-tune: trial_{interrupted} stopped by the scheduler at epoch 2" in second.stdout
    if not stopped_on_resume:
        assert _max_running(second.stdout) == 1
    assert "rank 1 exits" not in second.stdout  # the injected crash happens once per search
    assert _scratch_trials(tmp_path) == []
    _assert_quiet(second.stdout + second.stderr)

    rows = list(csv.DictReader(open(tmp_path / "results" / "results.csv")))
    print("\n" + second.stdout[second.stdout.index("results of tiny_asha") :])
    assert len(rows) == 2 and {r["status"] for r in rows} <= {"done", "stopped"}
    by_trial = {r["trial"]: r for r in rows}
    assert by_trial[completed]["status"] == "done" and by_trial[completed]["epochs"] == "3"
    # ASHA's one rung (epoch 2) holds the completed trial's mAP: the resumed trial is stopped below it, as it
    # would have been without the interruption (a resumed ASHA used to start with empty rungs and stop nothing)
    at_rung = {t: _first_at(run1 + second.stdout, t, 2) for t in (completed, interrupted)}
    if at_rung[interrupted] != at_rung[completed]:  # as printed, in percent with one decimal
        expected = "stopped" if at_rung[interrupted] < at_rung[completed] else "done"
        assert by_trial[interrupted]["status"] == expected, (at_rung, by_trial[interrupted])
    assert by_trial[completed]["restored_from"] == "1"  # rank 1 died at epoch 2; restart from epoch 1's checkpoint
    if not stopped_on_resume:  # the interrupted trial resumed from its last checkpoint
        assert int(by_trial[interrupted]["restored_from"]) >= 1
    else:
        assert by_trial[interrupted]["status"] == "stopped" and by_trial[interrupted]["epochs"] == "2"
    assert _result_lines(storage)[f"trial_{completed}"] == lines_before[f"trial_{completed}"]  # not redone
    assert float(rows[0]["mAP"]) >= max(float(r["mAP"]) for r in rows)
    assert list((storage / "tiny_asha" / f"trial_{completed}" / "tensorboard").glob("events.out.tfevents.*"))

    # each trial's folder is a run folder for dpm-eval (model_best.pt, model_final.pt), relative path
    evaluated = subprocess.run(
        [str(VENV_BIN / "dpm-eval"), "--checkpoint", f"storage/tiny_asha/trial_{completed}"],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=tmp_path,
        timeout=300,
    )
    assert evaluated.returncode == 0, evaluated.stdout[-3000:] + evaluated.stderr[-3000:]
    assert f"trial_{completed} is a run folder: evaluating model_best.pt" in evaluated.stdout + evaluated.stderr
    assert "mAP" in evaluated.stdout
    assert (storage / "tiny_asha" / f"trial_{completed}" / "model_final.pt").is_file()

    best = tmp_path / "results" / "best"
    assert "trains the trial's model on 2 rank(s), as it ran (search.workers_per_trial)" in second.stdout
    header = (best / "experiment" / "best.yaml").read_text().splitlines()[1]
    assert header.startswith(f"# dpm-train --config-dir {best} experiment=best")
    train = subprocess.run(
        [
            str(VENV_BIN / "dpm-train"),
            "--config-dir",
            str(best),
            "experiment=best",
            "optim.epochs=1",
            f"log.output_dir={tmp_path / 'retrain'}",
        ],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=tmp_path,
        timeout=300,
    )
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    used = OmegaConf.load(tmp_path / "retrain" / "config.yaml")
    for key in ("loss.alpha", "loss.beta", "loss.margin", "loss.scale"):
        assert OmegaConf.select(used, key) == pytest.approx(float(rows[0][key])), key
    assert json.loads((tmp_path / "retrain" / "results.json").read_text())["epochs"] == 1


@pytest.mark.slow
def test_search_stored_on_s3_resumes_from_the_bucket(tiny_shards, tmp_path, s3_endpoint):
    """One Optuna trial with storage in a (moto) S3 bucket; the same command again restores it from there."""
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}, skip_instance_cache=True)
    fs.mkdir("dpm-sweeps")
    command = [
        str(VENV_BIN / "dpm-tune"),
        "tune=tiny_asha",
        f"data.root={tiny_shards}",
        "data.num_ids=4",
        "data.num_instances=2",
        "optim.epochs=1",
        "optim.steps_per_epoch=1",
        "search.num_samples=1",
        "search.searcher=optuna",
        "search.storage_path=s3://dpm-sweeps/team",
        f"search.s3_endpoint={s3_endpoint}",
        f"search.local_dir={tmp_path / 'local'}",
        "search.num_cpus=2",
    ]
    first = subprocess.run(command, capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=RUN_TIMEOUT_S)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    [trial] = [p.rsplit("/", 1)[1] for p in fs.ls("dpm-sweeps/team/tiny_asha") if "/trial_" in p]
    assert fs.ls(f"dpm-sweeps/team/tiny_asha/{trial}/train/epoch_0001")  # the merged checkpoint of both workers
    assert fs.exists(f"dpm-sweeps/team/tiny_asha/{trial}/model_best.pt")  # the trial's model, next to its checkpoints
    assert fs.exists("dpm-sweeps/team/tiny_asha/results/results.csv")
    assert fs.exists("dpm-sweeps/team/tiny_asha/results/best/experiment/best.yaml")
    results = fs.cat(f"dpm-sweeps/team/tiny_asha/{trial}/result.json").decode()

    second = subprocess.run(command, capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=RUN_TIMEOUT_S)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "dpm-tune: resuming dpm-sweeps/team/tiny_asha" in second.stdout
    assert fs.cat(f"dpm-sweeps/team/tiny_asha/{trial}/result.json").decode() == results  # nothing re-run
    rows = list(csv.DictReader(open(tmp_path / "runs" / "tune" / "tiny_asha" / "results.csv")))
    assert [r["trial"] for r in rows] == [trial.removeprefix("trial_")] and rows[0]["status"] == "done"
