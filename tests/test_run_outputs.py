"""What a ``dpm-train`` run leaves and says at its edges (issue 25 items 2 and 15): every shard is checked before
the first step, the last epoch is saved before the final evaluation (so a failed evaluation costs no training),
``results.json`` says when the run was best, and the lines it prints say what their numbers are.

Each test runs the real command from a folder outside the repository, with relative paths, on the tiny shards.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import RUN_TIMEOUT_S, TINY_TRAIN, VENV_BIN, fault_env, train_env


def _work(tmp_path: Path, tiny_shards: Path) -> Path:
    """A working folder holding a copy of the tiny shards (``shards``), which the test may damage."""
    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(tiny_shards, work / "shards")
    return work


def _train(work: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd = [str(VENV_BIN / "dpm-train"), *TINY_TRAIN, "data.root=shards", "log.output_dir=run", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=env or train_env(), cwd=work, timeout=RUN_TIMEOUT_S)


def _error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [ln for ln in proc.stderr.splitlines() if ln.strip()]


@pytest.mark.slow
def test_a_missing_query_shard_stops_the_run_before_the_first_step(tmp_path, tiny_shards):
    work = _work(tmp_path, tiny_shards)
    (work / "shards" / "query-00001.tar").unlink()
    proc = _train(work)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert _error_lines(proc) == [
        f"dpm-train: error: query shard {work}/shards/query-00001.tar does not exist "
        "(index.json lists it; see `dpm-shards verify`)"
    ], proc.stderr
    assert "[step" not in proc.stdout and not (work / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_a_truncated_shard_is_named_before_the_first_step(tmp_path, tiny_shards):
    work = _work(tmp_path, tiny_shards)
    shard = work / "shards" / "gallery-00002.tar"
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size - 512)
    proc = _train(work)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert _error_lines(proc) == [
        f"dpm-train: error: gallery shard {work}/shards/gallery-00002.tar: truncated: {size - 512} bytes, "
        f"index.json says {size} (see `dpm-shards verify`)"
    ], proc.stderr
    assert not (work / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_a_failed_final_evaluation_keeps_the_last_epoch_and_says_how_to_evaluate_it(tmp_path, tiny_shards):
    work = _work(tmp_path, tiny_shards)
    env = fault_env(
        "truncate_before_eval",
        DPM_FAULT_TRUNCATE_SHARD=str(work / "shards" / "gallery-00000.tar"),
        DPM_FAULT_TRUNCATE_AT_EVAL="1",
    )
    proc = _train(work, "optim.epochs=2", "eval.period=5", env=env)  # one evaluation: the final one
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = _error_lines(proc)
    assert len(lines) == 1, proc.stderr
    run = work / "run"
    assert lines[0].startswith(
        f"dpm-train: error: the final evaluation failed: shard {work}/shards/gallery-00000.tar: "
    )
    assert lines[0].endswith(
        f"the training is saved (epoch_0002 in {run}/checkpoints, and {run}/model_final.pt): evaluate it with "
        f"`dpm-eval --checkpoint {run}/model_final.pt`, or re-run the same command"
    ), lines
    assert (run / "checkpoints" / "latest").read_text().strip() == "epoch_0002"
    assert (run / "checkpoints" / "epoch_0002" / "meta.json").is_file()
    assert (run / "model_final.pt").is_file() and not (run / "results.json").exists()
    shutil.copy(tiny_shards / "gallery-00000.tar", work / "shards" / "gallery-00000.tar")  # the shard mended
    evaluated = subprocess.run(  # the command the line names
        [str(VENV_BIN / "dpm-eval"), "--checkpoint", "run/model_final.pt"],
        capture_output=True,
        text=True,
        env=train_env(),
        cwd=work,
        timeout=RUN_TIMEOUT_S,
    )
    assert evaluated.returncode == 0 and "rank-1 " in evaluated.stdout, evaluated.stdout[-2000:] + evaluated.stderr
    again = _train(work, "optim.epochs=2", "eval.period=5")
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    assert "resumed from epoch_0002" in again.stdout
    assert not re.search(r"^\[step [1-3] ", again.stdout, re.MULTILINE)  # nothing trained again: the evaluation only
    assert json.loads((run / "results.json").read_text())["epochs"] == 2
    assert (run / "checkpoints" / "latest").read_text().strip() == "epoch_0002"


@pytest.mark.slow
def test_results_json_says_when_the_run_was_best_and_metric_lines_print_percent(tmp_path, tiny_shards):
    work = _work(tmp_path, tiny_shards)
    proc = _train(work, "optim.epochs=2", "eval.period=1")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary = json.loads((work / "run" / "results.json").read_text())
    for key in ("results", "best", "epochs", "steps", "num_skipped_corrupt", "datasets", "num_skipped_steps"):
        assert key in summary  # what results.json held before
    history = summary["evaluations"]
    assert [(e["epoch"], e["step"]) for e in history] == [(1, 2), (2, 4)]
    assert history[-1]["results"] == summary["results"]
    best = max(history, key=lambda e: e["results"]["mAP"])  # search.metric: mAP; the first of equals
    assert (summary["best_epoch"], summary["best_results"]) == (best["epoch"], best["results"])
    assert summary["best"] == best["results"]["mAP"]
    cmc = summary["cmc"]["cmc"]
    assert len(cmc) == 15 and cmc == sorted(cmc) and cmc[-1] == 1.0  # 15 gallery images: the curve's length
    assert cmc[0] == summary["results"]["rank1"] and cmc[4] == summary["results"]["rank5"]
    # The metric lines in percent with one decimal, like the summary line; results.json keeps fractions.
    evals = [ln for ln in proc.stdout.splitlines() if ln.startswith("[step") and " mAP=" in ln]
    assert len(evals) == 2, proc.stdout
    last = summary["results"]
    assert evals[-1].endswith(
        f"mAP={last['mAP']:.1%} mINP={last['mINP']:.1%} rank1={last['rank1']:.1%} rank5={last['rank5']:.1%} "
        f"rank10={last['rank10']:.1%}"
    ), evals
    assert f"rank-1 {last['rank1']:.1%}  mAP {last['mAP']:.1%}" in proc.stdout
    # Chance level, from the evaluated data itself: for each query with a true match, the share of true matches
    # among its kept gallery images (the same identity and camera are dropped), averaged.
    chance = _chance_rank1(work / "shards")
    assert summary["chance_rank1"] == pytest.approx(chance, abs=1e-12)
    assert (
        f"chance level: rank-1 {chance:.1%} on this data (a random ranking: each query's true matches among its "
        f"gallery images, averaged over the {int(last['num_valid_query'])} queries with a match)\n"
    ) in proc.stdout


def _chance_rank1(shards: Path) -> float:
    from dpm_dist.data.shards import iter_shard, read_manifest, shard_entries

    manifest = read_manifest(str(shards))

    def people(role: str) -> list[tuple[int, int]]:
        return [
            (int(s["meta"]["pid"]), int(s["meta"]["camid"]))
            for e in shard_entries(manifest, role)
            for s in iter_shard(e["name"], (shards / e["name"]).read_bytes())
        ]

    shares = []
    for pid, cam in people("query"):
        kept = [g for g in people("gallery") if g != (pid, cam)]
        matches = sum(g[0] == pid for g in kept)
        if matches:
            shares.append(matches / len(kept))
    return sum(shares) / len(shares)


@pytest.mark.slow
def test_a_warmup_longer_than_the_run_names_the_field_to_lower_and_a_run_of_warmup_is_accepted(tmp_path, tiny_shards):
    work = _work(tmp_path, tiny_shards)
    proc = _train(work, "optim.epochs=2", "optim.warmup_epochs=3")
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert _error_lines(proc) == [
        "dpm-train: error: config field `optim.warmup_epochs`: 3 warmup epochs do not fit in optim.epochs=2: "
        "lower optim.warmup_epochs (at most 2) or raise optim.epochs"
    ], proc.stderr
    # The tiny preset (warmup_epochs: 2) with optim.epochs=2: refused before ("must be in [0, epochs)"), now
    # accepted; DPM_PREFLIGHT=1 runs the checks the launch scripts run before the ranks, and trains nothing.
    cmd = [str(VENV_BIN / "dpm-train"), "experiment=tiny", "data.root=shards", "log.output_dir=run", "optim.epochs=2"]
    env = dict(train_env(), DPM_PREFLIGHT="1", PYTHONPROFILEIMPORTTIME="1")  # each import on stderr
    checked = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=work, timeout=RUN_TIMEOUT_S)
    imports = [line for line in checked.stderr.splitlines() if line.startswith("import time:")]
    said = [line for line in checked.stderr.splitlines() if not line.startswith("import time:") and line.strip()]
    assert checked.returncode == 0 and not said, checked.stdout[-2000:] + "\n".join(said)[-3000:]
    # the launch scripts run this check before torchrun starts the ranks: no image stack (torchvision and, through
    # its ops, torch._dynamo: 1-2 s of a launch's start)
    loaded = {line.rsplit("|", 1)[-1].strip() for line in imports}
    assert "dpm_dist.train.loop" in loaded and not loaded & {"torchvision", "timm", "torch._dynamo"}, sorted(loaded)


@pytest.mark.slow
def test_a_diverged_model_at_the_final_evaluation_is_one_line_and_the_training_is_saved(tmp_path, tiny_shards):
    work = _work(tmp_path, tiny_shards)
    env = fault_env("nan_features", DPM_FAULT_NAN_QUERIES="3", DPM_FAULT_NAN_AT_EVAL="1")
    proc = _train(work, "optim.epochs=1", env=env)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    run = work / "run"
    assert _error_lines(proc) == [
        "dpm-train: error: the final evaluation failed: 3 of 10 queries have NaN distances (non-finite features: "
        f"a diverged model?); nothing was ranked; the training is saved (epoch_0001 in {run}/checkpoints, and "
        f"{run}/model_final.pt): evaluate it with `dpm-eval --checkpoint {run}/model_final.pt`, or re-run the same "
        "command"
    ], proc.stderr
    assert (run / "checkpoints" / "latest").read_text().strip() == "epoch_0001"


def test_non_finite_features_are_refused_before_any_chunk_is_scored_on_every_rank_alike():
    """In process, world size 1: the check every rank makes before scoring (a NaN query row: that query; a NaN
    gallery row: every query), the same for a gathered and a sharded gallery."""
    import torch

    from dpm_dist.dist import DistEnv
    from dpm_dist.eval.embeddings import Embeddings
    from dpm_dist.eval.evaluator import refuse_nonfinite_features
    from dpm_dist.eval.retrieval import NonFiniteDistanceError
    from dpm_dist.eval.sharded import as_shard

    def emb(n: int, role: str) -> Embeddings:
        ids = torch.arange(n)
        return Embeddings([f"{role}{i}" for i in range(n)], [role] * n, ids, ids, torch.ones(n, 4), torch.ones(n, 4))

    env = DistEnv()
    query, gallery = emb(5, "query"), emb(7, "gallery")
    refuse_nonfinite_features(query, gallery, env)  # finite: nothing
    query.feats[[1, 3]] = float("nan")
    with pytest.raises(NonFiniteDistanceError, match=r"^2 of 5 queries have NaN distances"):
        refuse_nonfinite_features(query, gallery, env)
    query.feats[[1, 3]] = 1.0
    query.masks[4, 0] = float("inf")
    with pytest.raises(NonFiniteDistanceError, match=r"^1 of 5 queries have NaN distances"):
        refuse_nonfinite_features(query, gallery, env)
    query.masks[4, 0] = 1.0
    gallery.feats[6, 2] = float("-inf")
    for g in (gallery, as_shard(gallery, env)):
        with pytest.raises(NonFiniteDistanceError, match=r"^5 of 5 queries have NaN distances"):
            refuse_nonfinite_features(query, g, env)


def test_check_shards_lists_every_shard_of_every_dataset_and_names_the_first_bad_one(tmp_path, tiny_shards):
    """In process: the start-up check of dpm-train/dpm-tune (one dataset, several data.roots, explicit URLs)."""
    from dpm_dist.config import DataConfig
    from dpm_dist.data.manifest import check_shards
    from dpm_dist.data.shards import ShardError

    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(tiny_shards, a)
    shutil.copytree(tiny_shards, b)
    assert check_shards(DataConfig(root=str(a))) == 8 + 2 + 3
    assert check_shards(DataConfig(roots=[str(a), str(b)])) == 2 * (8 + 2 + 3)
    assert check_shards(DataConfig(root=str(a)), ("query", "gallery")) == 2 + 3
    (b / "train-00003.tar").unlink()
    with pytest.raises(FileNotFoundError, match=rf"^train shard {b}/train-00003.tar does not exist"):
        check_shards(DataConfig(roots=[str(a), str(b)]))
    assert check_shards(DataConfig(roots=[str(a), str(b)]), ("query", "gallery")) == 2 * (2 + 3)
    with open(a / "query-00000.tar", "ab") as f:
        f.write(b"\0" * 512)
    with pytest.raises(ShardError, match=rf"^query shard {a}/query-00000.tar: longer than recorded"):
        check_shards(DataConfig(root=str(a)))
    assert check_shards(DataConfig(root=str(a), verify_sha=False)) == 13  # sizes are index.json's only when checked
    urls = [str(a / "gallery-00000.tar"), str(a / "gallery-00009.tar")]
    with pytest.raises(FileNotFoundError, match=r"^gallery shard .*/gallery-00009.tar does not exist"):
        check_shards(DataConfig(query_urls=[str(a / "query-00001.tar")], gallery_urls=urls), ("query", "gallery"))


def _damaged_copy(tiny_shards: Path, name: str) -> tuple[Path, int]:
    """A copy of the tiny shards beside them (served by ``http_root`` too): gallery-00002 cut by 512 bytes,
    query-00001 removed. Returns the folder and the cut shard's recorded size."""
    folder = tiny_shards.parent / name
    shutil.copytree(tiny_shards, folder)
    shard = folder / "gallery-00002.tar"
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size - 512)
    (folder / "query-00001.tar").unlink()
    return folder, size


def test_remote_shards_are_checked_by_size_at_start_up_over_http_and_s3(tiny_shards, http_root, s3_endpoint):
    """In process: the start-up check asks a remote shard's size (HTTP HEAD, S3 HEAD) and reads none; the first bad
    shard in the run's order is named (a missing one, a truncated one); without ``remote`` remote shards are left
    to the reader, as on the ranks of a launched run."""
    import s3fs

    from dpm_dist.config import DataConfig
    from dpm_dist.data.manifest import check_shards
    from dpm_dist.data.shards import ShardError
    from dpm_dist.data.storage import StorageError

    folder, size = _damaged_copy(tiny_shards, "damaged_remote")
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}, skip_instance_cache=True)
    if not fs.exists("dpm-check"):
        fs.mkdir("dpm-check")
    for path in sorted(folder.iterdir()):
        fs.put_file(str(path), f"dpm-check/damaged/{path.name}")
    http = f"{http_root}/{folder.name}"
    roots = [(http, {}), ("s3://dpm-check/damaged", {"s3_endpoint": s3_endpoint})]
    for root, extra in roots:
        cfg = DataConfig(root=root, io_retries=1, **extra)
        assert check_shards(cfg, ("train",), remote=True) == 8  # every train shard asked, none read
        assert check_shards(cfg, remote=False) == 0  # remote shards: checked when read
        with pytest.raises(
            StorageError, match=rf"^query shard: shard or manifest {root}/query-00001.tar does not exist"
        ):
            check_shards(cfg, remote=True)
        (folder / "query-00001.tar").write_bytes((tiny_shards / "query-00001.tar").read_bytes())
        if root.startswith("s3://"):
            fs.put_file(str(folder / "query-00001.tar"), "dpm-check/damaged/query-00001.tar")
        with pytest.raises(
            ShardError, match=rf"^gallery shard {root}/gallery-00002.tar: truncated: {size - 512} bytes"
        ):
            check_shards(cfg, remote=True)
        (folder / "query-00001.tar").unlink()
        assert check_shards(dataclasses.replace(cfg, verify_sha=False), ("gallery",), remote=True) == 3


@pytest.mark.slow
def test_a_truncated_remote_shard_stops_dpm_train_before_the_first_step(tmp_path, tiny_shards, http_root):
    """The real command on shards served over HTTP: the start-up check names the cut gallery shard in one line."""
    folder, size = _damaged_copy(tiny_shards, "damaged_http")
    (folder / "query-00001.tar").write_bytes((tiny_shards / "query-00001.tar").read_bytes())
    work = tmp_path / "work"
    work.mkdir()
    cmd = [str(VENV_BIN / "dpm-train"), *TINY_TRAIN, f"data.root={http_root}/{folder.name}", "log.output_dir=run"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=train_env(), cwd=work, timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert _error_lines(proc) == [
        f"dpm-train: error: gallery shard {http_root}/{folder.name}/gallery-00002.tar: truncated: {size - 512} "
        f"bytes, index.json says {size} (see `dpm-shards verify`)"
    ], proc.stderr
    assert "[step" not in proc.stdout and not (work / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_the_metrics_a_two_rank_run_reports_are_those_of_the_model_it_saved(
    uninterrupted: Path, tmp_path: Path
) -> None:
    """Each rank's BatchNorm running statistics drift apart in training; the evaluation must be that of the saved
    model (rank 0's), as DDP's broadcast buffers make it in the official code, so dpm-eval reproduces it."""
    reported = json.loads((uninterrupted / "results.json").read_text())["results"]
    proc = subprocess.run(
        [str(VENV_BIN / "dpm-eval"), "--checkpoint", str(uninterrupted / "model_final.pt"), "--output-dir", "ev"],
        cwd=tmp_path,
        env=train_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    evaluated = json.loads((tmp_path / "ev" / "results.json").read_text())["metrics"]
    assert {k: evaluated[k] for k in ("mAP", "mINP", "rank1")} == {k: reported[k] for k in ("mAP", "mINP", "rank1")}
