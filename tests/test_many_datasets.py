"""Many datasets at once (``data.roots``): the union's labels and cameras, weighted P×K sampling, per-dataset
evaluation at 1 and 2 ranks, ``dpm-train``/``dpm-eval`` from a folder of one's own, and the errors.

Two synthetic sets with different numbers of identities and cameras: ``a`` (8 training ids × 6 images, 3 cameras)
and ``b`` (5 × 4, 2 cameras). One tiny ``dpm-train`` run on both is shared by the end-to-end tests.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.conftest import RUN_TIMEOUT_S, TINY, TINY_TRAIN, VENV_BIN, run_ranks, train_env

B_SPEC = dict(
    seed=4,
    num_ids=5,
    num_test_ids=4,
    images_per_id=4,
    query_per_id=2,
    gallery_per_id=2,
    num_cams=2,
    height=32,
    width=16,
    max_count=5,
)


@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``<folder>/a`` and ``<folder>/b``: two synthetic shard sets (both written as ``synthetic``)."""
    from dpm_dist.data.synth import write_synthetic_shards

    folder = tmp_path_factory.mktemp("sets")
    write_synthetic_shards(str(folder / "a"), **TINY)
    write_synthetic_shards(str(folder / "b"), **B_SPEC)
    return folder


def data_cfg(roots: list[str], **kw: Any):
    from dpm_dist.config import DataConfig

    base = dict(
        dataset="synthetic",
        img_size=[32, 16],
        num_ids=3,
        num_instances=2,
        num_workers=0,
        shuffle_buffer=12,
        eval_batch_size=4,
        padding=2,
        io_retries=1,
        io_backoff_s=0.01,
        io_timeout_s=5.0,
    )
    return DataConfig(roots=[str(r) for r in roots], **{**base, **kw})


def batches(cfg, epochs=range(1, 2), env=None) -> list[dict[str, Any]]:
    from dpm_dist.data.loader import build_train_loader
    from dpm_dist.dist import DistEnv

    return [b for e in epochs for b in build_train_loader(cfg, env or DistEnv(), epoch=e, seed=0)]


def share_of_b(found: list[dict[str, Any]]) -> float:
    keys = [k for b in found for k in b["keys"]]
    return sum(k.startswith("b/") for k in keys) / len(keys)


# ---- the union: offsets, names, one root as data.root ----------------------------------------------------------


def test_labels_and_cameras_of_the_datasets_never_collide(sets: Path) -> None:
    from dpm_dist.data.loader import build_eval_loader, load_manifest
    from dpm_dist.dist import DistEnv

    cfg = data_cfg([sets / "a", sets / "b"])
    manifest = load_manifest(cfg)
    assert (manifest["num_train_ids"], manifest["num_cams"]) == (13, 5)  # W and SIE are sized for the union
    assert [
        (d["name"], d["id_offset"], d["cam_offset"], d["num_train_ids"], d["num_cams"], d["num_images"])
        for d in manifest["datasets"]
    ] == [("a", 0, 0, 8, 3, 48), ("b", 8, 3, 5, 2, 20)]
    assert [round(d["weight"], 3) for d in manifest["datasets"]] == [0.706, 0.294]  # proportional to images
    for sampler in ("exact", "stream"):
        seen: dict[str, set] = {"a": set(), "b": set()}
        for batch in batches(data_cfg([sets / "a", sets / "b"], sampler=sampler, batches_per_epoch=8), range(1, 3)):
            for key, label, cam in zip(batch["keys"], batch["pids"].tolist(), batch["camids"].tolist()):
                name = key.split("/")[0]
                assert (0 <= label < 8 and 0 <= cam < 3) if name == "a" else (8 <= label < 13 and 3 <= cam < 5), (
                    key,
                    label,
                    cam,
                )
                seen[name].add(label)
        assert seen["a"] and seen["b"] and not seen["a"] & seen["b"]
    query = list(build_eval_loader(cfg, DistEnv(), "query", "b"))
    assert {c for b in query for c in b["camids"].tolist()} <= {3, 4}  # the training camera offset of b
    assert all(k.startswith("b/query_") for b in query for k in b["keys"])
    assert {p for b in query for p in b["pids"].tolist()} == {6, 7, 8, 9}  # original pids: ranking is within b


def test_one_root_in_roots_gives_the_batches_of_data_root_bit_for_bit(sets: Path) -> None:
    from dpm_dist.config import DataConfig

    for sampler in ("exact", "stream"):
        plain = DataConfig(
            **{
                **vars(data_cfg([sets / "a"], sampler=sampler, batches_per_epoch=4)),
                "roots": [],
                "root": str(sets / "a"),
            }
        )
        one = data_cfg([sets / "a"], sampler=sampler, batches_per_epoch=4)
        for x, y in zip(batches(plain, range(2, 4)), batches(one, range(2, 4)), strict=True):
            assert (
                x["keys"] == y["keys"] and torch.equal(x["pids"], y["pids"]) and torch.equal(x["camids"], y["camids"])
            )
            assert torch.equal(x["images"], y["images"])


def test_dataset_names_come_from_index_json_then_folders_then_positions() -> None:
    from dpm_dist.data.union import dataset_names

    assert dataset_names(["/d/m", "/d/duke"], ["market1501", "dukemtmc"]) == ["market1501", "dukemtmc"]
    assert dataset_names(["/x/a", "s3://bucket/b/", "/y/m"], ["synthetic", "synthetic", "market1501"]) == [
        "a",
        "b",
        "market1501",
    ]
    assert dataset_names(["/x/s", "/y/s"], ["synthetic", "synthetic"]) == ["s_0", "s_1"]


# ---- sampling by weights -------------------------------------------------------------------------------------


def test_weighted_epochs_share_the_chunks_by_weight() -> None:
    """Three datasets of 40 × ~8, 10 × ~4 and 100 × ~20 images: P×K chunks drawn per dataset as weighted."""
    from dpm_dist.data.sampling import weighted_pk_indices

    rng, labels, groups, offset = random.Random(0), [], [], 0
    for group, (ids, images) in enumerate([(40, 8), (10, 4), (100, 20)]):
        for pid in range(ids):
            count = max(1, int(rng.gauss(images, 2)))
            labels += [offset + pid] * count
            groups += [group] * count
        offset += ids
    for weights in ([1, 1, 1], [0.2, 0.3, 0.5]):
        shares = []
        for seed in range(4):
            flat = weighted_pk_indices(labels, groups, weights, 8, 4, random.Random(seed), np.random.RandomState(seed))
            drawn = np.array([groups[i] for i in flat])
            assert len(flat) % 32 == 0 and len(flat) // 32 == 64  # the union's epoch length
            for block in np.array(flat).reshape(-1, 8, 4):  # P distinct identities × K images each
                assert len({labels[c[0]] for c in block}) == 8 and all(len({labels[i] for i in c}) == 1 for c in block)
            shares.append([float(np.mean(drawn == g)) for g in range(3)])
        expected = np.array(weights) / sum(weights)
        assert np.abs(np.mean(shares, 0) - expected).max() < 0.01, (weights, np.mean(shares, 0))


@pytest.mark.parametrize("sampler", ["exact", "stream"])
def test_weights_shift_the_measured_shares(sets: Path, sampler: str) -> None:
    """b holds 20 of the 68 training images: by default ~29% of every epoch; with weights [1, 3], ~75%."""
    measured = {}
    for weights in ([], [1, 3]):
        cfg = data_cfg([sets / "a", sets / "b"], sampler=sampler, root_weights=weights, batches_per_epoch=30)
        measured[str(weights)] = share_of_b(batches(cfg, range(1, 5)))
    assert abs(measured["[]"] - 20 / 68) < 0.04, measured
    assert abs(measured["[1, 3]"] - 0.75) < 0.04, measured


def test_two_ranks_deal_the_single_rank_epoch_of_the_union(sets: Path) -> None:
    from dpm_dist.dist import DistEnv

    cfg = data_cfg([sets / "a", sets / "b"], root_weights=[1, 3])
    single = [k for b in batches(cfg, range(3, 4)) for k in b["keys"]]
    ranks = [batches(cfg, range(3, 4), DistEnv(rank=r, world_size=2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(single) // 12
    dealt = [k for pair in zip(*ranks) for b in pair for k in b["keys"]]
    assert dealt == single[: len(dealt)]
    # stream: each rank its own seeded stream, as with one root: rank 0 of 2 reads what a single rank reads first
    stream = data_cfg([sets / "a", sets / "b"], root_weights=[1, 3], sampler="stream")
    alone, first = batches(stream), batches(stream, env=DistEnv(rank=0, world_size=2))
    assert len(first) == len(alone) // 2 and [b["keys"] for b in first] == [b["keys"] for b in alone[: len(first)]]


def test_a_remote_root_reads_as_a_local_one(sets: Path, tiny_shards: Path, http_root: str) -> None:
    local = data_cfg([tiny_shards, sets / "b"], sampler="stream", batches_per_epoch=3)
    remote = data_cfg([f"{http_root}/{tiny_shards.name}", sets / "b"], sampler="stream", batches_per_epoch=3)
    for x, y in zip(batches(local), batches(remote), strict=True):
        assert x["keys"] == y["keys"] and torch.equal(x["images"], y["images"])


# ---- errors naming the culprit ---------------------------------------------------------------------------------


def test_roots_with_root_eval_root_or_wrong_weights_is_refused(sets: Path) -> None:
    from dpm_dist.cli.common import compose_config

    with pytest.raises(
        ValueError, match=r"config field `data.roots`: cannot be combined with data.root .* unset data.root=null"
    ):
        compose_config(["data.roots=[x,y]"])  # the default preset sets data.root
    assert compose_config(["data.root=null", "data.roots=[x,y]"]).data.roots == ["x", "y"]
    with pytest.raises(ValueError, match=r"`data.roots`: cannot be combined with data.eval_root"):
        data_cfg(["x", "y"], eval_root="z")
    with pytest.raises(ValueError, match=r"`data.root_weights`: 1 weights for 2 data.roots"):
        data_cfg(["x", "y"], root_weights=[1.0])
    with pytest.raises(ValueError, match=r"`data.root_weights`: weights must be > 0"):
        data_cfg(["x", "y"], root_weights=[1.0, 0.0])
    with pytest.raises(ValueError, match=r"`data.roots`: a root is listed twice"):
        data_cfg(["x", "x"])


def test_an_unreachable_root_fails_at_once_naming_its_url(sets: Path, http_root: str) -> None:
    from dpm_dist.data.loader import load_manifest

    with pytest.raises(OSError, match=rf"{http_root}/no_such_set/index.json"):
        load_manifest(data_cfg([sets / "a", f"{http_root}/no_such_set"]))


def test_data_dataset_is_checked_against_every_root(sets: Path) -> None:
    from dpm_dist.config import DPMConfig
    from dpm_dist.data.loader import load_manifest
    from dpm_dist.train.loop import check_dataset

    cfg = data_cfg([sets / "a", sets / "b"])
    check_dataset(DPMConfig(data=cfg, model=_model_for(cfg)), load_manifest(cfg))  # both synthetic: fine
    wrong = data_cfg([sets / "a", sets / "b"], dataset="market1501")
    with pytest.raises(
        ValueError, match=rf"`data.dataset`: 'market1501', but the shards in {sets / 'a'} were written as 'synthetic'"
    ):
        check_dataset(DPMConfig(data=wrong, model=_model_for(wrong)), load_manifest(wrong))


@pytest.mark.slow
def test_a_resume_on_fewer_datasets_is_refused(work: Path) -> None:
    from dpm_dist.config import DPMConfig
    from dpm_dist.data.loader import load_manifest
    from dpm_dist.train.loop import check_dataset

    saved = json.loads((work / "run" / "checkpoints" / "epoch_0003" / "meta.json").read_text())
    one = data_cfg([work / "sets" / "a"])
    with pytest.raises(
        ValueError,
        match=r"`data.roots`: .* was trained on 2 datasets .*, but the data now gives 1 \[synthetic \(synthetic: 8 ids",
    ):
        check_dataset(DPMConfig(data=one, model=_model_for(one)), load_manifest(one), saved)
    both = data_cfg([work / "sets" / "a", work / "sets" / "b"])
    check_dataset(DPMConfig(data=both, model=_model_for(both)), load_manifest(both), saved)


def _model_for(cfg):
    from dpm_dist.config import ModelConfig

    return ModelConfig(img_size=list(cfg.img_size), patch_size=8, stride=[8, 8])


def test_the_three_dataset_preset_composes_without_data() -> None:
    from dpm_dist.cli.common import compose_config

    cfg = compose_config(["experiment=market_duke_msmt17"])
    assert cfg.data.roots == ["shards/market1501", "shards/dukemtmc", "shards/msmt17"] and cfg.data.root is None
    assert (cfg.data.dataset, cfg.data.root_weights, list(cfg.model.stride), cfg.loss.margin) == (
        "generic",
        [],
        [12, 12],
        0.3,
    )
    assert (cfg.optim.name, cfg.eval.neck_feat, cfg.eval.distance) == ("sgd", "before", "masked_cosine")


# ---- dpm-train and dpm-eval on two datasets --------------------------------------------------------------------


def _cli(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        args, capture_output=True, text=True, env=dict(train_env(), **env), cwd=cwd, timeout=RUN_TIMEOUT_S
    )


TWO = [*TINY_TRAIN, "data.root=null", "data.roots=[sets/a,sets/b]"]


@pytest.fixture(scope="module")
def work(sets: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A working folder where ``sets/a`` and ``sets/b`` are relative paths, with ``run``: 3 tiny epochs on both."""
    folder = tmp_path_factory.mktemp("many") / "work"
    folder.mkdir()
    (folder / "sets").symlink_to(sets)
    proc = _cli([str(VENV_BIN / "dpm-train"), *TWO, "log.output_dir=run"], folder)
    (folder / "train.log").write_text(proc.stdout + "\n----- stderr -----\n" + proc.stderr)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return folder


@pytest.mark.slow
def test_dpm_train_on_two_datasets_prints_and_records_each(work: Path) -> None:
    stdout = (work / "train.log").read_text().split("----- stderr -----")[0]
    sets = work / "sets"
    for line in (
        "  data      synthetic: 2 datasets (68 images, 13 identities, 5 cameras; sampler exact)\n",
        f"            a: {sets / 'a'} (48 images, labels 0-7, cameras 0-2, weight 0.706)\n",
        f"            b: {sets / 'b'} (20 images, labels 8-12, cameras 3-4, weight 0.294)\n",
    ):
        assert line in stdout, (line, stdout[:2000])
    table = stdout[stdout.index("dataset  rank-1     mAP    mINP  #query  #gallery") :].splitlines()[:4]
    assert [row.split()[0] for row in table[1:]] == ["a", "b", "mean"], table
    assert (
        table[1].split()[-2:] == ["10", "15"]
        and table[2].split()[-2:] == ["8", "8"]
        and table[3].split()[-2:] == ["18", "23"]
    )
    results = json.loads((work / "run" / "results.json").read_text())
    metrics = results["results"]
    for key in ("rank1", "mAP", "mINP", "rank5"):
        assert metrics[key] == pytest.approx((metrics[f"a/{key}"] + metrics[f"b/{key}"]) / 2)
    assert (metrics["num_query"], metrics["a/num_query"], metrics["b/num_gallery"]) == (18, 10, 8)
    offsets = [(d["name"], d["id_offset"], d["cam_offset"]) for d in results["datasets"]]
    assert offsets == [("a", 0, 0), ("b", 8, 3)]
    meta = json.loads((work / "run" / "checkpoints" / "epoch_0003" / "meta.json").read_text())
    assert meta["datasets"] == results["datasets"]
    final = torch.load(work / "run" / "model_final.pt", weights_only=True)
    assert final["meta"]["datasets"] == results["datasets"]
    assert final["model"]["backbone.sie_embed"].shape[0] == 5  # SIE has a row per camera of the union
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(work / "run" / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"eval/mAP", "eval/a/mAP", "eval/b/rank1"} <= tags and not [t for t in tags if "num_" in t], sorted(tags)


def _evaluate(env, model_path: str) -> dict[str, float]:
    from dpm_dist.config import to_config
    from dpm_dist.eval.evaluator import evaluate
    from dpm_dist.model.files import ModelFile, load_model_file

    file = ModelFile.read(model_path)
    cfg = to_config(file.config)
    model, _, _ = load_model_file(file, cfg.model)
    return evaluate(model, cfg, env, device="cpu")


@pytest.fixture(scope="module")
def one_rank(work: Path) -> dict[str, float]:
    return run_ranks(_evaluate, 1, work / "unused", str(work / "run" / "model_final.pt"))[0]


@pytest.mark.slow
def test_evaluation_on_one_and_two_gloo_ranks_gives_the_same_numbers(
    work: Path, one_rank: dict[str, float], tmp_path: Path
) -> None:
    two = run_ranks(_evaluate, 2, tmp_path / "two", str(work / "run" / "model_final.pt"))
    assert two[0] == two[1] == one_rank and {"a/mAP", "b/mAP", "mAP", "a/num_query"} <= set(one_rank)


@pytest.mark.slow
def test_dpm_eval_prints_the_table_and_writes_each_dataset(work: Path, one_rank: dict[str, float]) -> None:
    proc = _cli([str(VENV_BIN / "dpm-eval"), "--checkpoint", "run", "--output-dir", "ev", "eval.num_pictures=1"], work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (
        "dataset  rank-1     mAP    mINP  #query  #gallery" in proc.stdout
        and "mean of 2 datasets: rank-1 " in proc.stdout
    )
    result = json.loads((work / "ev" / "results.json").read_text())
    assert result["metrics"] == one_rank
    assert [d["name"] for d in result["datasets"]] == ["a", "b"] and result["data_roots"] == [
        str(work / "sets" / n) for n in "ab"
    ]
    assert {p.split("/")[0] for p in result["pictures"]} == {"a", "b"}  # each dataset's pictures in its own folder
    assert all((work / "ev" / p).is_file() for p in result["pictures"])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(work / "ev" / "tb"))
    acc.Reload()
    images = acc.Tags()["images"]
    assert "pictures/a/head_correlation_mean" in images and "pictures/b/head_correlation_mean" in images, images
    assert {"eval/a/mAP", "eval/mAP"} <= set(acc.Tags()["scalars"]) and not [
        t for t in acc.Tags()["scalars"] if "num_" in t
    ]


@pytest.mark.slow
def test_dpm_eval_refuses_other_datasets_for_a_many_dataset_model(work: Path) -> None:
    from dpm_dist.cli.eval import check_datasets
    from dpm_dist.config import DPMConfig

    meta = torch.load(work / "run" / "model_final.pt", weights_only=True)["meta"]
    swapped = data_cfg([work / "sets" / "b", work / "sets" / "a"])
    with pytest.raises(
        ValueError, match=r"`data.roots`: m.pt was trained on 2 datasets \[a .*\], but the data now gives 2 \[b "
    ):
        check_datasets(DPMConfig(data=swapped, model=_model_for(swapped)), meta, "m.pt")
    same = data_cfg([work / "sets" / "a", work / "sets" / "b"])
    assert check_datasets(DPMConfig(data=same, model=_model_for(same)), meta, "m.pt") is None
    one = DPMConfig(data=data_cfg([work / "sets" / "b"]), model=_model_for(same))
    assert "m.pt was trained on 2 datasets (a, b) with camera offsets" in check_datasets(one, meta, "m.pt")


@pytest.mark.slow
def test_dpm_eval_takes_the_roots_from_the_file_unless_a_root_is_given(work: Path) -> None:
    from dpm_dist.cli.eval import eval_config

    stored = torch.load(work / "run" / "model_final.pt", weights_only=True)["meta"]["config"]
    cfg, from_file = eval_config(stored, [])
    assert (
        cfg.data.roots == [str(work / "sets" / n) for n in "ab"] and cfg.data.root is None and "data.roots" in from_file
    )
    cfg, from_file = eval_config(
        stored, ["data.root=/elsewhere/b"]
    )  # one dataset of the many: the file's roots give way
    assert (cfg.data.root, cfg.data.roots) == ("/elsewhere/b", []) and "data.roots" not in from_file


@pytest.mark.slow
def test_resuming_on_other_datasets_is_refused_another_location_is_not(work: Path, tmp_path: Path) -> None:
    run = tmp_path / "work"
    run.mkdir()
    (run / "sets").symlink_to(work / "sets")
    (run / "moved").symlink_to(work / "sets")
    shutil.copytree(work / "run", run / "run")
    args = [str(VENV_BIN / "dpm-train"), *TINY_TRAIN, "data.root=null", "log.output_dir=run", "optim.epochs=4"]
    swapped = _cli(args + ["data.roots=[sets/b,sets/a]"], run)
    assert swapped.returncode == 2, swapped.stdout[-2000:] + swapped.stderr[-2000:]
    error = swapped.stderr.strip().splitlines()
    assert len(error) == 1 and error[0].startswith(
        f"dpm-train: error: config field `data.roots`: {run / 'run'} was trained on "
        "2 datasets [a (synthetic: 8 ids, 3 cameras), b (synthetic: 5 ids, 2 cameras)], "
        "but the data now gives 2 [b (synthetic: 5 ids, 2 cameras), a"
    ), error
    moved = _cli(args + ["data.roots=[moved/a,moved/b]"], run, DPM_PREFLIGHT="1")  # the checks of a resume, no training
    assert moved.returncode == 0, moved.stderr[-2000:]


@pytest.mark.slow
def test_dpm_train_errors_name_the_field_and_the_root(work: Path) -> None:
    both = _cli([str(VENV_BIN / "dpm-train"), *TINY_TRAIN, "data.roots=[sets/a,sets/b]", "log.output_dir=x"], work)
    assert both.returncode == 2 and both.stderr.strip().splitlines() == [
        "dpm-train: error: config field `data.roots`: cannot be combined with data.root (each root brings its own train, "
        "query and gallery splits); unset data.root=null"
    ], both.stderr
    missing = _cli(
        [
            str(VENV_BIN / "dpm-train"),
            *TINY_TRAIN,
            "data.root=null",
            "data.roots=[sets/a,sets/nope]",
            "log.output_dir=x",
        ],
        work,
    )
    assert missing.returncode == 2, missing.stderr
    assert (
        missing.stderr.strip()
        .splitlines()[0]
        .startswith(f"dpm-train: error: config field `data.roots`: no such folder: {work / 'sets' / 'nope'}")
    ), missing.stderr
    assert not (work / "x").exists()


# ---- dpm-train's closing lines (dpm_dist/cli/train.py print_end) -----------------------------------------------


def test_the_closing_lines_give_each_dataset_and_say_the_plain_numbers_are_their_mean(tmp_path: Path, capsys) -> None:
    from types import SimpleNamespace

    from dpm_dist.cli.train import print_end
    from dpm_dist.eval.evaluator import merge_datasets

    def metrics(rank1: float, m_ap: float, num_query: int) -> dict[str, float]:
        return {
            "rank1": rank1,
            "mAP": m_ap,
            "mINP": m_ap / 2,
            "num_query": num_query,
            "num_gallery": 2 * num_query,
            "num_valid_query": num_query,
        }

    cfg = SimpleNamespace(log=SimpleNamespace(output_dir=str(tmp_path)))
    print_end(cfg, merge_datasets({"market1501": metrics(0.9, 0.8, 10), "dukemtmc": metrics(0.7, 0.6, 30)}))
    lines = capsys.readouterr().out.splitlines()[1:5]
    assert [line.split()[0] for line in lines] == ["dataset", "market1501", "dukemtmc", "mean"], lines
    assert lines[1].split()[1:] == ["90.0%", "80.0%", "40.0%", "10", "20"]
    print_end(cfg, metrics(0.9, 0.8, 10))  # one dataset: the one line, as before
    assert (
        capsys.readouterr()
        .out.splitlines()[1]
        .startswith("rank-1 90.0%  mAP 80.0%  mINP 40.0%  (10 queries, 20 gallery")
    )
    print_end(cfg, merge_datasets({"market1501": metrics(0.9, 0.8, 10), "dukemtmc": metrics(0.7, 0.6, 30)}))
    assert (
        capsys.readouterr().out.splitlines()[5] == "mean of 2 datasets: rank-1 80.0%  mAP 70.0%  mINP 35.0%  "
        "(40 queries, 80 gallery images)"
    )


@pytest.mark.slow
def test_dpm_train_on_two_datasets_closes_with_each_and_their_mean(work: Path) -> None:
    stdout = (work / "train.log").read_text().split("----- stderr -----")[0]
    end = stdout[stdout.rindex('{"results": ') :].splitlines()
    assert [row.split()[0] for row in end[1:5]] == ["dataset", "a", "b", "mean"], end
    assert end[5].startswith("mean of 2 datasets: rank-1 ") and "(18 queries, 23 gallery images)" in end[5], end


@pytest.mark.slow
def test_dpm_embed_of_the_two_dataset_model_gives_the_evaluators_features_of_b(work: Path) -> None:
    """dpm-embed on sets/b's shards selects b from its index.json and shifts its cameras as dpm-eval does."""
    import pyarrow.parquet as pq

    from dpm_dist.config import to_config
    from dpm_dist.dist import DistEnv
    from dpm_dist.eval.evaluator import extract_and_gather
    from dpm_dist.model.files import ModelFile, load_model_file

    proc = _cli(
        [
            str(VENV_BIN / "dpm-embed"),
            "run",
            "sets/b",
            "--role",
            "query",
            "-o",
            "b.parquet",
            "--workers",
            "0",
            "--batch-size",
            "4",
        ],
        work,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "is dataset b of the model: cameras + 3" in proc.stderr
    rows = {r["key"]: r for r in pq.read_table(work / "b.parquet").to_pylist()}
    file = ModelFile.read(str(work / "run" / "model_final.pt"))
    cfg = to_config(file.config)
    model, _, _ = load_model_file(file, cfg.model)
    query, _ = extract_and_gather(model, cfg.data, DistEnv(), device="cpu", dataset="b")
    assert sorted(f"b/{k}" for k in rows) == query.keys
    assert [rows[k[2:]]["camid"] + 3 for k in query.keys] == query.camids.tolist()  # the file keeps b's own cameras
    torch.testing.assert_close(
        torch.tensor([rows[k[2:]]["feat"] for k in query.keys]), query.feats, rtol=1e-5, atol=1e-5
    )
