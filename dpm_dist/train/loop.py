"""The training loop: check the checkpoint's config → build → resume → for each epoch: steps, then evaluate and
save. Read it top to bottom. A finished run is left untouched; a resume with another configuration is refused
unless ``log.allow_config_change`` names the fields, and then recorded (``config_changes``) in what the run writes.

``train(cfg, env, report)`` is what ``dpm-train`` (any launcher) and the Ray Tune trainable call; it returns the
run's :class:`~dpm_dist.train.state.RunState`, the one record of what is saved, resumed and written.
Every rank runs every line; only the loggers and file writes are rank-0 gated.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import sys
import time
from collections.abc import Callable
from typing import Any, cast

import numpy as np
import torch
from omegaconf import OmegaConf

from dpm_dist import dist
from dpm_dist.config import DPMConfig
from dpm_dist.dist import DistEnv
from dpm_dist.fsio import write_text_atomic
from dpm_dist.train import checkpoint
from dpm_dist.train.state import RunState

log = logging.getLogger(__name__)

# report(metrics, epoch, checkpoint_folder): the Ray Tune hook; called on every rank after each eval.
Reporter = Callable[[dict[str, float], int, str | None], None]


# Stop signals: Ctrl-C, SIGTERM (Slurm, Kubernetes, spot pre-emption) and SIGUSR1 (Slurm's --signal) are handled
# alike: the handler only records the signal; the loop acts on it at the next step boundary (and after an
# evaluation, a save or the wait for a first batch), on every rank at the same step, so no signal is lost.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
_stop: dict[str, int] = {"installed": 0, "signum": 0, "count": 0}


def stop_name(signum: int) -> str:
    return "interrupted (SIGINT)" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"


class RunStopped(Exception):
    """A stop signal acted on at a step boundary (every rank raises it at the same step). ``detail`` says when,
    what is saved and how to go on; the exit status is 128 + the signal's number (130, 143, 138)."""

    def __init__(self, signum: int, detail: str) -> None:
        super().__init__(f"{stop_name(signum)} {detail}")
        self.signum, self.detail = signum, detail


def install_stop_handlers(signals: tuple[int, ...] = STOP_SIGNALS) -> None:
    """Record ``signals`` instead of dying (main thread). DataLoader workers forked later inherit the handler:
    they ignore a terminal's Ctrl-C (no worker tracebacks) and die of the others as before (their loader ends
    them). A third Ctrl-C gives up waiting (``KeyboardInterrupt``)."""

    def record(signum: int, frame: Any) -> None:
        if os.getpid() != _stop["installed"]:  # a forked DataLoader worker
            if signum != signal.SIGINT:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
            return
        _stop["count"] += 1
        _stop["signum"] = _stop["signum"] or signum
        if signum == signal.SIGINT and _stop["count"] >= 3:
            raise KeyboardInterrupt

    for signum in signals:
        signal.signal(signum, record)
    _stop.update(installed=os.getpid(), signum=0, count=0)


def _stop_signal(env: DistEnv) -> int:
    """The stop signal any rank has received (collective when distributed and the handlers are installed), or 0."""
    if not _stop["installed"]:
        return 0
    if not env.distributed:
        return _stop["signum"]
    got = dist.all_reduce_sum(torch.tensor([float(_stop["signum"] == s) for s in STOP_SIGNALS]))
    return next((int(s) for s, n in zip(STOP_SIGNALS, got.tolist(), strict=True) if n > 0), 0)


def _stopped(cfg: DPMConfig, signum: int, state: RunState, where: str, saved_now: bool = False) -> RunStopped:
    """What a stop leaves: the latest checkpoint (``saved_now``: the step checkpoint written at this stop) and the
    steps a resume redoes."""
    ckpts = os.path.join(cfg.log.output_dir, "checkpoints")
    meta = checkpoint.latest_meta(ckpts)
    if meta is None:
        saved = f"no checkpoint was saved yet in {ckpts}; re-running the same command starts the run over"
    else:
        redo = state.step - int(meta["step"])
        plural = redo != 1
        again = (
            f" (the {redo} step{'s' if plural else ''} since it {'are' if plural else 'is'} trained again)"
            if redo
            else " (no step is trained again)"
            if saved_now
            else ""
        )
        now = ", written at this stop," if saved_now else ""
        saved = (
            f"the latest checkpoint is {checkpoint.describe(meta, cfg.optim.epochs)}{now} in {ckpts}; "
            f"re-run the same command to resume from it{again}"
        )
    return RunStopped(signum, f"{where}; {saved}")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_dataset(cfg: DPMConfig, manifest: dict[str, Any], saved: dict[str, Any] | None = None) -> None:
    """``data.dataset`` must name the layout the training shards (of every root) were written with (``generic``
    takes any); a resumed run trains on the datasets its checkpoint recorded, in order (their location may change)."""
    from dpm_dist.data.union import same_datasets

    for entry in manifest["datasets"]:
        written = entry.get("dataset")
        if cfg.data.dataset != "generic" and written and written != cfg.data.dataset:
            where = entry["root"] if cfg.data.roots else cfg.data.root or "data.train_urls"
            raise ValueError(
                f"config field `data.dataset`: {cfg.data.dataset!r}, but the shards in {where} were written as "
                f"{written!r} (index.json); set data.dataset={written}, or data.dataset=generic for any shards"
            )
    differ = same_datasets((saved or {}).get("datasets"), manifest["datasets"])
    if differ:
        raise ValueError(
            f"config field `data.root{'s' if cfg.data.roots else ''}`: {cfg.log.output_dir} was trained on {differ}; "
            "a run resumes on the same datasets in the same order (another location is fine): use a new log.output_dir"
        )


def build_engine(cfg: DPMConfig, env: DistEnv, manifest: dict[str, Any]):
    """Model (+ ImageNet weights) wrapped in the two DeepSpeed engines."""
    from dpm_dist.model.dpm import build_model
    from dpm_dist.model.weights import load_imagenet_vit
    from dpm_dist.train.engine import DPMEngine

    seed_everything(cfg.engine.seed)  # identical initial weights on every rank
    model = build_model(cfg.model, num_classes=manifest["num_train_ids"], num_cams=manifest["num_cams"])
    if cfg.model.pretrained:
        load_imagenet_vit(model, cfg.model.pretrained)
    return DPMEngine.from_config(cfg, env, model)


def _progress_bar(cfg: DPMConfig, env: DistEnv, total: int):
    """A tqdm bar with ETA on rank 0 (``log.progress``); a disabled, silent one elsewhere."""
    from tqdm import tqdm

    return tqdm(
        total=total,
        disable=not (env.is_main and cfg.log.progress and total),
        unit="it",
        file=sys.stderr,
        mininterval=2.0,
        dynamic_ncols=True,
    )


def _epoch_steps(cfg: DPMConfig, loader: Any) -> int:
    n = len(loader)
    return min(n, cfg.optim.steps_per_epoch) if cfg.optim.steps_per_epoch else n


def _eval_due(cfg: DPMConfig, epoch: int) -> bool:
    return epoch % cfg.eval.period == 0 or epoch == cfg.optim.epochs


def _is_count(key: str) -> bool:
    """``num_query``, ``num_gallery``...: sizes of the evaluation, not metrics (no scalars, no hparam metrics)."""
    return key.rsplit("/", 1)[-1].startswith("num_")  # <dataset>/num_query too


def resume_plan(cfg: DPMConfig, resolved: dict[str, Any], saved: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The run's record of configuration changes, extended by this resume's; raises ``ValueError`` when the
    checkpoint was trained with another configuration (:func:`checkpoint.config_changes`) or past ``optim.epochs``."""
    if saved is None:
        return []
    changes = checkpoint.config_changes(saved.get("config", {}), resolved, cfg.log.allow_config_change)
    if "model.classifier" in changes:
        raise ValueError(
            f"config field `model.classifier`: {cfg.log.output_dir} was trained with "
            f"{changes['model.classifier'][0]!r}; a run cannot switch between a replicated and a sharded head "
            "on resume: use a new log.output_dir"
        )
    if saved["epoch"] > cfg.optim.epochs:
        raise ValueError(
            f"config field `optim.epochs`: {cfg.optim.epochs}, but {cfg.log.output_dir} already holds "
            f"{saved['tag']} (epoch {saved['epoch']}); set optim.epochs >= {saved['epoch']} or use a new log.output_dir"
        )
    history = list(saved.get("config_changes", []))
    # A step checkpoint: the changes apply from its next step, inside its epoch.
    mid = _mid_epoch(saved) is not None
    where = {"after_epoch": saved["epoch"] - 1, "after_step": saved["step"]} if mid else {"after_epoch": saved["epoch"]}
    return history + [{**where, "changes": changes}] if changes else history


def _mid_epoch(saved: dict[str, Any]) -> int | None:
    """``None`` for a checkpoint at the end of its epoch, else the steps of its epoch it had taken (a step checkpoint)."""
    step, steps = int(saved.get("epoch_step", 0)), int(saved.get("epoch_steps", 0))
    return step if 0 < step < steps else None


def is_finished(cfg: DPMConfig, saved: dict[str, Any] | None) -> bool:
    """The last epoch is checkpointed and the run's files were written: re-running changes nothing."""
    if not saved or _mid_epoch(saved) is not None:
        return False
    return saved["epoch"] == cfg.optim.epochs and os.path.isfile(os.path.join(cfg.log.output_dir, "results.json"))


def write_config(out_dir: str, resolved: dict[str, Any], history: list[dict[str, Any]]) -> None:
    """``config.yaml``: the resolved config, headed by the changes made on resume, if any."""
    lines = [
        f"# from {_change_start(h)}: {k} {old!r} -> {new!r}" for h in history for k, (old, new) in h["changes"].items()
    ]
    head = (
        "# This run's configuration changed when it was resumed (values below are the latest):\n"
        + "\n".join(lines)
        + "\n"
        if lines
        else ""
    )
    write_text_atomic(os.path.join(out_dir, "config.yaml"), head + OmegaConf.to_yaml(OmegaConf.create(resolved)))


def _change_start(change: dict[str, Any]) -> str:
    """Where a change made on resume starts: ``epoch 4``, or ``step 7 (epoch 4)`` after a step checkpoint."""
    epoch = f"epoch {change['after_epoch'] + 1}"
    return f"step {change['after_step'] + 1} ({epoch})" if "after_step" in change else epoch


_HPARAMS = {
    "alpha": "loss.alpha",
    "beta": "loss.beta",
    "margin": "loss.margin",
    "scale": "loss.scale",
    "lr": "optim.base_lr",
    "update_mode": "engine.update_mode",
}


def hparams_of(
    cfg: DPMConfig, resolved: dict[str, Any], history: list[dict[str, Any]], world_size: int
) -> dict[str, Any]:
    """TensorBoard hparams; a value changed on resume reads as its history (``"0.5 -> 0.3 @ epoch 4"``)."""
    flat = checkpoint.flatten(resolved)
    out: dict[str, Any] = {"world_size": world_size}
    for name, key in _HPARAMS.items():
        steps = [(h["after_epoch"] + 1, h["changes"][key]) for h in history if key in h["changes"]]
        out[name] = (
            flat[key]
            if not steps
            else f"{steps[0][1][0]} -> " + " -> ".join(f"{new} @ epoch {e}" for e, (_, new) in steps)
        )
    return out


def print_summary(cfg: DPMConfig, env: DistEnv, manifest: dict[str, Any], steps: int, state: RunState) -> None:
    """The start-up block on rank 0: data, batch, schedule, engine, output folder, fresh or resumed."""
    from dpm_dist.data.union import describe_datasets
    from dpm_dist.model.weights import backbone_start

    if not env.is_main:
        return
    weights, warning = backbone_start(cfg.model)
    d, e, train_split = cfg.data, cfg.engine, manifest["splits"]["train"]
    source = d.root or (
        f"{len(d.roots)} datasets" if len(d.roots) > 1 else d.roots[0] if d.roots else f"{len(d.train_urls)} shard URLs"
    )
    lines = [
        f"dpm-train {cfg.name}",
        f"  data      {d.dataset}: {source} ({train_split['num_samples']} images, {manifest['num_train_ids']} identities, "
        f"{manifest['num_cams']} cameras; sampler {d.sampler})",
        *(f"            {line}" for line in describe_datasets(manifest["datasets"])),
        f"  batch     {d.num_ids} ids x {d.num_instances} images x {env.world_size} rank{'s' if env.distributed else ''} = "
        f"{d.batch_size * env.world_size} images per step",
        f"  schedule  {cfg.optim.epochs} epochs x {steps} steps, evaluated every {cfg.eval.period} epochs and at the end",
        f"  engine    {e.precision}, ZeRO-{e.zero_stage}, update mode {e.update_mode}",
        f"  weights   {weights}",
        f"  output    {cfg.log.output_dir}",
        f"  start     {state.start_line()}",
    ]
    print("\n".join(lines), flush=True)
    if warning:
        log.warning(warning)


def check_nonfinite(cfg: DPMConfig, env: DistEnv, engine: Any, step: int, ckpt_root: str) -> None:
    """Log a skipped step; ``engine.max_nonfinite_steps`` in a row stop the run (on every rank: they agree)."""
    streak, limit = engine.nonfinite_streak, cfg.engine.max_nonfinite_steps
    if env.is_main:
        log.warning(
            "step %d: update skipped for non-finite %s (%d in a row; engine.max_nonfinite_steps=%d)",
            step,
            ", ".join(engine.last_skip),
            streak,
            limit,
        )
    if streak < limit:
        return
    last = checkpoint.latest_meta(ckpt_root)
    good = (
        f"{last['tag']} (epoch {last['epoch']}, step {last['step']}) in {ckpt_root}"
        if last
        else f"none yet ({ckpt_root})"
    )
    raise ValueError(
        f"step {step}: {streak} steps in a row skipped for non-finite values ({', '.join(engine.streak_causes)}; "
        f"engine.max_nonfinite_steps={limit}); last good checkpoint: {good}"
    )


def resolved_config(cfg: DPMConfig) -> dict[str, Any]:
    """The configuration as plain values (interpolations resolved): what checkpoints and files record."""
    return cast(dict[str, Any], OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True))


def preflight(cfg: DPMConfig) -> None:
    """The checks of :func:`train` that need no process group: the resume against the latest checkpoint's
    configuration and the dataset against the shards. Raises ``ValueError`` naming the field."""
    from dpm_dist.data.manifest import load_manifest  # not the loader: no torchvision in the preflight

    resolved = resolved_config(cfg)
    saved = checkpoint.latest_meta(os.path.join(cfg.log.output_dir, "checkpoints"))  # verified by train() itself
    resume_plan(cfg, resolved, saved)
    if not is_finished(cfg, saved):
        check_dataset(cfg, load_manifest(cfg.data), saved)


def train(cfg: DPMConfig, env: DistEnv, report: Reporter | None = None) -> RunState:
    """Train (or resume) the run in ``cfg.log.output_dir``; returns its state: the last evaluation's metrics
    (``results``), the skipped samples and steps. A finished run returns the state it was saved with."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    from dpm_dist.data.loader import load_manifest

    out_dir, ckpt_root = cfg.log.output_dir, os.path.join(cfg.log.output_dir, "checkpoints")
    resolved = resolved_config(cfg)
    saved = checkpoint.find_resumable(ckpt_root, env)  # collective: verifies the manifest, else falls back
    history = resume_plan(cfg, resolved, saved)  # before anything is written
    if saved is not None and is_finished(cfg, saved):
        if env.is_main:
            print(
                f"{out_dir} is finished ({saved['tag']}, epoch {saved['epoch']} of {cfg.optim.epochs}): nothing to train, "
                f"no file changed; a larger optim.epochs extends it",
                flush=True,
            )
        finished = RunState.from_meta(saved, resolved, history, saved.get("datasets", []))
        finished.adopt_final_evaluation(_read_results(out_dir))  # the last epoch's evaluation came after its save
        return finished
    manifest = load_manifest(cfg.data)
    check_dataset(cfg, manifest, saved)
    if cfg.engine.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    if env.is_main:
        os.makedirs(ckpt_root, exist_ok=True)
        if saved is None:
            write_config(out_dir, resolved, history)
    with logging_redirect_tqdm():  # library log lines go through tqdm.write: never onto the bar's line
        return _run(cfg, env, report, manifest, RunState(resolved, history, manifest["datasets"]), saved)


def _run(
    cfg: DPMConfig,
    env: DistEnv,
    report: Reporter | None,
    manifest: dict[str, Any],
    state: RunState,
    saved: dict[str, Any] | None,
) -> RunState:
    """Build -> resume -> for each epoch: steps, then evaluate, save, report -> the final files. On every rank."""
    from dpm_dist.config import for_world_size
    from dpm_dist.data.loader import TrainLoader
    from dpm_dist.loggers import build_logger

    cfg = for_world_size(cfg, env.world_size)  # data.global_num_ids per rank, engine.invariant decided (not recorded)
    engine = build_engine(cfg, env, manifest)
    if saved:
        meta = checkpoint.resume(engine, os.path.join(cfg.log.output_dir, "checkpoints"), env, saved)
        assert meta is not None  # the meta it was given, with rng_restored
        state = RunState.from_meta(meta, state.config, state.config_changes, state.datasets)
        state.adopt_final_evaluation(_read_results(cfg.log.output_dir))
    engine.skipped_steps = state.num_skipped_steps  # non-finite steps: the same on every rank
    if not state.rng_restored:  # fresh run, or another world size: seed per rank and epoch
        seed_everything(cfg.engine.seed * 1000 + env.rank + 7919 * (state.epoch + 1))  # drop-path RNG
    loaders = TrainLoader(cfg.data, env, seed=cfg.engine.seed, sample_keyed=cfg.engine.invariant == "on")
    first, last = state.epoch + (0 if state.mid_epoch else 1), cfg.optim.epochs
    start = _resume_start(loaders.cfg.batch_size, env, state) if state.mid_epoch else 0
    loader = loaders.epoch(first, start, replay=_same_stream(cfg, env, saved)) if first <= last else None
    steps = _epoch_steps(cfg, loader) if loader is not None else 0
    print_summary(cfg, env, manifest, steps, state)
    # Reopening the event files after a crash: TensorBoard drops what the crashed run logged past the checkpoint.
    logger = build_logger(cfg.log, env, purge_step=state.step + 1 if saved else None)
    state.config_unwritten = saved is not None  # a fresh run wrote config.yaml already; a resumed one at its first save
    # The bar is closed (its line ended) on Ctrl-C too, so the interrupt message gets a line of its own.
    with _progress_bar(cfg, env, steps * (last - first + 1) - min(start, steps)) as bar:
        for epoch in range(first, last + 1):
            signum = _stop_signal(env)  # collective: after the previous epoch's evaluation and save
            if signum:
                raise _stopped(cfg, signum, state, state.position())
            state.epoch = epoch
            engine.start_epoch(epoch)
            loader = loader if epoch == first else loaders.epoch(epoch)
            bar.set_description(f"epoch {epoch}/{last}")
            _train_epoch(cfg, env, engine, loader, state, logger, bar, resumed=epoch == first and state.mid_epoch)
            final = epoch == last  # saved before its evaluation: an evaluation failure costs no training
            improved = _evaluate(cfg, env, engine, state, logger) if _eval_due(cfg, epoch) and not final else False
            stopping = _stop_signal(env)  # collective: a stop at the epoch's end saves it, due or not
            folder = _save(cfg, env, engine, state, improved) if _save_due(cfg, epoch) or stopping else None
            if final:
                _final_evaluation(cfg, env, engine, state, logger)
            if report is not None and _eval_due(cfg, epoch):
                report(dict(state.results, epoch=epoch), epoch, folder)
    if first > last:  # the last epoch was saved but its evaluation did not finish: evaluate it now
        _final_evaluation(cfg, env, engine, state, logger)
    _finish(cfg, env, engine, state, logger)
    return state


def _resume_start(batch_size: int, env: DistEnv, state: RunState) -> int:
    """The batch a run resumed from a step checkpoint starts its epoch with: the one after the samples of the epoch's
    global order trained so far, in this world's steps (:func:`~dpm_dist.data.sampling.resume_position`). On another
    world size whose global batch (``batch_size`` per rank) does not divide them, the step boundary before, said in
    one line."""
    from dpm_dist.data.sampling import resume_position

    start, again = resume_position(state.epoch_samples, batch_size, env.world_size)
    if again and env.is_main:
        log.warning(
            "resuming epoch %d at its step %d of this world size: the %d samples trained before the stop are not a whole "
            "number of global batches of %d; the last %d of them are trained again",
            state.epoch,
            start + 1,
            state.epoch_samples,
            batch_size * env.world_size,
            again,
        )
    state.epoch_samples -= again  # the position resumed at: what the next step checkpoint counts from
    return start


def _same_stream(cfg: DPMConfig, env: DistEnv, saved: dict[str, Any] | None) -> bool:
    """Whether the stream sampler's batches of a resumed epoch are the ones it had: the same world size and
    ``data.num_workers`` (each (rank, worker) draws its own stream). Then its first batches are read again."""
    if not saved:
        return True
    workers = saved.get("config", {}).get("data", {}).get("num_workers", cfg.data.num_workers)
    return int(saved["world_size"]) == env.world_size and workers == cfg.data.num_workers


def _train_epoch(
    cfg: DPMConfig,
    env: DistEnv,
    engine: Any,
    loader: Any,
    state: RunState,
    logger: Any,
    bar: Any,
    resumed: bool = False,
) -> None:
    """One epoch's steps (``resumed``: from the position of a step checkpoint on): update, count the skipped samples,
    the bar, a log every ``log.log_every`` steps, a step checkpoint every ``log.checkpoint_every_steps``; a streak of
    non-finite steps stops the run (:func:`check_nonfinite`); a stop signal saves a step checkpoint and stops it."""
    t_data, t_epoch, seen = 0.0, time.time(), 0
    t_mark, steps = time.time(), _epoch_steps(cfg, loader)
    start = min(getattr(loader, "start", 0), steps)
    state.epoch_steps = steps
    if not resumed:
        state.epoch_step, state.epoch_samples = 0, 0
    state.epoch_step = start
    rng = torch.get_rng_state()
    batches = iter(loader)  # a DataLoader iterator draws its base seed from the global RNG ...
    if resumed and state.rng_restored:
        torch.set_rng_state(rng)  # ... which the run resumed had drawn before the steps its checkpoint holds
    for i, batch in enumerate(batches, start=start):
        if i >= steps:  # optim.steps_per_epoch
            break
        t_data += time.time() - t_mark
        metrics = engine.step(batch)
        state.uncounted_corrupt += int(batch.get("num_skipped", 0))
        state.uncounted_keys.update(batch.get("skipped_keys", ()))
        state.step += 1
        state.epoch_step = i + 1
        state.epoch_samples += batch["images"].shape[0] * env.world_size
        seen += batch["images"].shape[0] * env.world_size
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", refresh=False)
        if state.step % cfg.log.log_every == 0:
            elapsed = max(time.time() - t_epoch, 1e-9)
            perf = {"perf/samples_per_sec": seen / elapsed, "perf/data_time": t_data / (i + 1 - start)}
            logger.log(_step_logs(engine, metrics, perf, state.epoch), state.step)
        if engine.last_skip:
            check_nonfinite(cfg, env, engine, state.step, os.path.join(cfg.log.output_dir, "checkpoints"))
        last = i + 1 >= steps  # the epoch's last step goes on to its evaluation and checkpoint first
        every = cfg.log.checkpoint_every_steps
        due = bool(every) and state.step % every == 0 and not (last and _save_due(cfg, state.epoch))
        signum = 0 if last else _stop_signal(env)  # collective
        if due or signum:
            _save(cfg, env, engine, state, False, in_epoch=True)
        if signum:
            raise _stopped(cfg, signum, state, state.position(), saved_now=True)
        t_mark = time.time()


def _step_logs(engine: Any, metrics: dict[str, float], perf: dict[str, float], epoch: int) -> dict[str, float]:
    """A step's scalars: losses, learning rates, throughput, the epoch and the non-finite steps skipped so far."""
    logs = {f"train/{k}": v for k, v in metrics.items()}
    logs.update({f"lr/{k}": v for k, v in engine.learning_rates().items()})
    logs.update(perf)
    logs.update({"train/epoch": epoch, "train/skipped_steps": engine.skipped_steps})
    return logs


def _evaluate(cfg: DPMConfig, env: DistEnv, engine: Any, state: RunState, logger: Any) -> bool:
    """The epoch's evaluation (collective), logged and kept in ``state``; whether it is the best so far."""
    from dpm_dist.eval.evaluator import evaluate

    # Each rank's BatchNorm running statistics drift apart in training (its own batches); the model files hold rank
    # 0's, so every rank evaluates with rank 0's, as DDP's broadcast buffers give the official code. Training
    # itself never reads them (BN uses the batch's statistics), so no loss or weight changes.
    for buffer in engine.model.buffers():
        dist.broadcast_tensor(buffer, src=0)
    curves: dict[str, list[float]] = {}
    chance: dict[str, float] = {}
    results = evaluate(engine.model, cfg, env, device=engine.device, curves=curves, chance=chance)
    logger.log({f"eval/{k}": v for k, v in results.items() if not _is_count(k)}, state.step)
    return state.record_evaluation(results, cfg.search.metric, curves, chance.get("rank1"))


def _read_results(out_dir: str) -> dict[str, Any] | None:
    """The run's ``results.json``, or None."""
    try:
        with open(os.path.join(out_dir, "results.json")) as f:
            return cast(dict[str, Any], json.load(f))
    except (OSError, ValueError):
        return None


class FinalEvaluationError(ValueError):
    """The end-of-run evaluation failed after the last epoch was saved (checkpoint and ``model_final.pt``)."""


def _reason(err: BaseException) -> str:
    """The first line of ``err``; of an exception raised in a DataLoader worker, the worker's own message."""
    text = str(err)
    head = text.split("\n", 1)[0]
    if head.startswith("Caught ") and "DataLoader worker" in head:
        name = head.split()[1]
        hits = [ln for ln in text.splitlines() if ln.split(": ", 1)[0].rsplit(".", 1)[-1] == name]
        text = hits[-1].split(": ", 1)[1] if hits else text
    return text.strip().split("\n", 1)[0] or type(err).__name__


def _final_evaluation(cfg: DPMConfig, env: DistEnv, engine: Any, state: RunState, logger: Any) -> None:
    """The end of the run, after the last epoch's checkpoint: ``model_final.pt``, then the evaluation (collective),
    then ``model_final.pt`` again with its metrics and, on a new best, ``model_best.pt`` and the ``best`` pointer.
    A failed evaluation raises :class:`FinalEvaluationError` saying what is saved and how to evaluate it."""
    from dpm_dist.model.files import save_model_file

    out_dir, ckpt_root = cfg.log.output_dir, os.path.join(cfg.log.output_dir, "checkpoints")
    final_file = os.path.join(out_dir, "model_final.pt")
    weights = engine.model_state()  # collective: a sharded head's W is gathered onto rank 0
    if env.is_main:
        save_model_file(weights, final_file, state.model_file_meta())
    try:
        improved = _evaluate(cfg, env, engine, state, logger)
    except (ValueError, OSError) as err:
        tag = checkpoint.tag_for(state.epoch)
        raise FinalEvaluationError(
            f"the final evaluation failed: {_reason(err)}; the training is saved ({tag} in {ckpt_root}, and "
            f"{final_file}): evaluate it with `dpm-eval --checkpoint {final_file}`, or re-run the same command"
        ) from err
    if env.is_main:
        save_model_file(weights, final_file, state.model_file_meta())  # now with the final metrics
        if improved and cfg.log.keep_best:
            write_text_atomic(os.path.join(ckpt_root, "best"), checkpoint.tag_for(state.epoch))
            save_model_file(weights, os.path.join(out_dir, "model_best.pt"), state.model_file_meta())


def _save_due(cfg: DPMConfig, epoch: int) -> bool:
    return epoch % cfg.log.checkpoint_every == 0 or epoch == cfg.optim.epochs or _eval_due(cfg, epoch)


def _count_skipped(state: RunState, engine: Any) -> None:
    """Every rank's corrupt samples skipped since the last count, summed (sightings), and their keys, united
    (distinct samples) (collective); the engine's skipped steps."""
    sums = dist.all_reduce_sum(torch.tensor([state.uncounted_corrupt, len(state.uncounted_keys)]))
    state.num_skipped_corrupt += int(sums[0].item())
    if int(sums[1].item()):  # the same on every rank: all gather, or none
        keys = set(state.skipped_corrupt_keys).union(*dist.all_gather_objects(sorted(state.uncounted_keys)))
        state.skipped_corrupt_keys = sorted(keys)
    state.uncounted_corrupt, state.uncounted_keys = 0, set()
    state.num_skipped_steps = engine.skipped_steps


def _save(cfg: DPMConfig, env: DistEnv, engine: Any, state: RunState, improved: bool, in_epoch: bool = False) -> str:
    """The epoch's checkpoint, or (``in_epoch``) a step checkpoint at the run's position in the epoch (collective);
    then ``config.yaml`` if due, and ``model_best.pt`` on a new best."""
    from dpm_dist.model.files import save_model_file

    _count_skipped(state, engine)  # collective
    folder = checkpoint.save(
        engine,
        os.path.join(cfg.log.output_dir, "checkpoints"),
        epoch=state.epoch,
        step=state.step,
        env=env,
        meta=state.checkpoint_meta(in_epoch=in_epoch),
        keep_last=cfg.log.keep_last,
        keep_last_steps=cfg.log.keep_last_steps,
        is_best=improved and cfg.log.keep_best,
    )
    if env.is_main and state.config_unwritten:  # only now do weights trained with this configuration exist
        write_config(cfg.log.output_dir, state.config, state.config_changes)
    state.config_unwritten = False
    if improved and cfg.log.keep_best:
        weights = engine.model_state()  # collective: a sharded head's W is gathered onto rank 0
        if env.is_main:
            save_model_file(weights, os.path.join(cfg.log.output_dir, "model_best.pt"), state.model_file_meta())
    return folder


def _finish(cfg: DPMConfig, env: DistEnv, engine: Any, state: RunState, logger: Any) -> None:
    """``results.json`` (rank 0; ``model_final.pt`` is written by :func:`_final_evaluation`), the hparams; every
    rank waits for them."""
    _count_skipped(state, engine)  # collective
    if env.is_main:
        write_text_atomic(os.path.join(cfg.log.output_dir, "results.json"), json.dumps(state.summary(), indent=2))
    final = {k: v for k, v in state.results.items() if isinstance(v, float) and not _is_count(k)}
    logger.close(hparams_of(cfg, state.config, state.config_changes, env.world_size), final)
    dist.barrier()
