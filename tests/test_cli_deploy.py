"""dpm-export, dpm-embed and dpm-search as a user runs them: installed commands, a working folder outside the
repository, relative paths; one-line errors naming the culprit; the same files on 1 process and 2 gloo ranks.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import free_port
from tests.test_deploy import save_tiny_model

VENV_BIN = Path(sys.executable).parent


def dpm(command: str, *args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    environ.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", **env)
    return subprocess.run(
        [str(VENV_BIN / command), *args], cwd=cwd, env=environ, capture_output=True, text=True, timeout=240
    )


def torchrun(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(free_port()),
            "-m",
            module,
            *args,
        ],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


def one_line_error(proc: subprocess.CompletedProcess, prog: str, *needles: str) -> str:
    lines = [
        ln
        for ln in proc.stderr.strip().splitlines()  # the run-folder note and the progress bar are fine
        if ln.strip() and "is a run folder: using" not in ln and "%|" not in ln
    ]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "Traceback" not in proc.stderr
    return lines[0]


def table(path: Path):
    import pyarrow.parquet as pq

    return pq.read_table(path)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory, tiny_shards: Path) -> Path:
    """A user's folder: runs/tiny/model_final.pt, photos/ (the test images as files, two levels), the shards."""
    from dpm_dist.data.shards import iter_shard

    root = tmp_path_factory.mktemp("user")
    save_tiny_model(root / "runs" / "tiny" / "model_final.pt")
    (root / "photos" / "cam2").mkdir(parents=True)
    for shard in sorted(tiny_shards.glob("query-*.tar")) + sorted(tiny_shards.glob("gallery-*.tar")):
        for sample in iter_shard(str(shard), shard.read_bytes()):
            name = sample["meta"]["source"].rsplit("/", 1)[-1]
            sub = "cam2" if "_c2" in name else ""
            (root / "photos" / sub / name).write_bytes(sample["jpg"])
    shutil.copytree(tiny_shards, root / "shards")
    return root


@pytest.fixture(scope="module")
def photos_parquet(work: Path) -> subprocess.CompletedProcess:
    """``dpm-embed runs/tiny photos -o photos.parquet`` on one process: the folder test checks it, the two-rank test
    compares with it, the search tests read it. (Decoding workers, the default 2: the list and corrupt-image tests.)"""
    return dpm(
        "dpm-embed", "runs/tiny", "photos", "-o", "photos.parquet", "--workers", "0", "--batch-size", "4", cwd=work
    )


@pytest.fixture(scope="module")
def queries_over_http(work: Path, http_root: str) -> subprocess.CompletedProcess:
    """The query shards embedded from the web server into ``web.parquet``: the shards test compares it with the
    other readers, the search tests take it as their query file."""
    return dpm(
        "dpm-embed",
        "runs/tiny",
        f"{http_root}/synthetic",
        "--role",
        "query",
        "-o",
        "web.parquet",
        "--workers",
        "0",
        cwd=work,
    )


# ---- dpm-export -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "output, kind",
    [("out/model.onnx", "onnx, dynamo exporter, opset 18"), ("model_ts.pt", "torchscript, torch.jit.trace")],
)
@pytest.mark.slow
def test_dpm_export_writes_the_format_of_the_suffix_and_checks_it(work, output, kind):
    proc = dpm("dpm-export", "runs/tiny", output, cwd=work)
    assert proc.returncode == 0, proc.stderr
    wrote, parity = proc.stdout.strip().splitlines()
    assert wrote.startswith(f"dpm-export: wrote {work / output} ({kind}; input 64x32, 3 cameras, test feature feat)")
    assert parity.startswith("dpm-export: parity vs eager PyTorch at batch 3: ")
    assert "Warning" not in proc.stderr and "Traceback" not in proc.stderr
    assert (work / output).is_file()


@pytest.mark.slow
def test_dpm_export_errors_name_the_culprit(work, tmp_path):
    one_line_error(
        dpm("dpm-export", "runs/tiny", "model.engine", cwd=work),
        "dpm-export",
        "model.engine",
        ".onnx (ONNX) or .pt (TorchScript)",
    )
    one_line_error(
        dpm("dpm-export", "runs/nothere", "m.pt", cwd=work), "dpm-export", "CHECKPOINT", str(work / "runs" / "nothere")
    )
    (tmp_path / "bad.pt").write_bytes(b"not a model")
    one_line_error(
        dpm("dpm-export", str(tmp_path / "bad.pt"), "m.pt", cwd=work), "dpm-export", "bad.pt", "not a torch file"
    )


@pytest.mark.slow
def test_dpm_export_to_onnx_without_the_deploy_extra_says_how_to_install_it(work, tmp_path):
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\nfor name in ('onnx', 'onnxscript', 'onnxruntime'):\n    sys.modules[name] = None\n"
    )
    proc = dpm("dpm-export", "runs/tiny", "model.onnx", cwd=work, PYTHONPATH=str(blocker))
    one_line_error(proc, "dpm-export", 'pip install "dpm-dist[deploy]"', "onnx")
    assert not (work / "model.onnx").exists()


# ---- dpm-embed --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_dpm_embed_over_a_folder_gives_load_models_embeddings(work, photos_parquet):
    import dpm_dist

    proc = photos_parquet
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert (
        last.startswith("dpm-embed: 25 images in ")
        and "images/s on 1 rank" in last
        and last.endswith(str(work / "photos.parquet"))
    )
    assert "25/25" in proc.stderr  # the progress bar
    rows = table(work / "photos.parquet").to_pylist()
    assert [r["key"] for r in rows] == sorted(r["key"] for r in rows) and any(
        r["key"].startswith("cam2/") for r in rows
    )
    first = rows[0]
    pid, cam = re.match(r"(\d+)_c(\d+)", first["key"].rsplit("/", 1)[-1]).groups()
    assert (
        first["pid"] == int(pid)
        and first["camid"] == int(cam) - 1
        and first["path"] == str(work / "photos" / first["key"])
    )
    loaded = dpm_dist.load_model(work / "runs" / "tiny")
    ref = loaded.embed([r["path"] for r in rows[:4]], camids=[r["camid"] for r in rows[:4]])
    torch.testing.assert_close(torch.tensor([r["feat"] for r in rows[:4]]), ref.feat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor([r["mask"] for r in rows[:4]]), ref.mask, rtol=1e-5, atol=1e-5)
    import json

    meta = json.loads(table(work / "photos.parquet").schema.metadata[b"dpm"])
    assert (
        meta["model"]["img_size"] == [64, 32]
        and meta["embedding"]["input_kind"] == "folder"
        and meta["num_skipped"] == 0
    )


@pytest.mark.slow
def test_dpm_embed_over_a_folder_writes_the_same_file_on_two_ranks(work, photos_parquet):
    two = torchrun(
        "dpm_dist.cli.embed",
        "runs/tiny",
        "photos",
        "-o",
        "photos2.parquet",
        "--workers",
        "0",
        "--batch-size",
        "4",
        cwd=work,
    )
    assert two.returncode == 0, two.stderr
    assert photos_parquet.returncode == 0, photos_parquet.stderr  # the same options on one process
    assert table(work / "photos.parquet").equals(table(work / "photos2.parquet"))  # every column, every bit


@pytest.mark.slow
def test_dpm_embed_a_list_file_needs_a_camera_for_unparseable_names(work, tmp_path):
    photos = sorted((work / "photos").glob("*.jpg"))[:2]
    (tmp_path / "imgs").mkdir()
    shutil.copy(photos[0], tmp_path / "imgs" / "frame_a.jpg")
    shutil.copy(photos[1], tmp_path / "imgs" / "frame_b.jpg")
    (tmp_path / "list.txt").write_text("imgs/frame_a.jpg\n\n# a comment\nimgs/frame_b.jpg\n")
    proc = dpm("dpm-embed", str(work / "runs" / "tiny"), "list.txt", "-o", "l.parquet", cwd=tmp_path)
    one_line_error(proc, "dpm-embed", str(tmp_path / "imgs" / "frame_a.jpg"), "--camid")
    proc = dpm("dpm-embed", str(work / "runs" / "tiny"), "list.txt", "-o", "l.parquet", "--camid", "1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = table(tmp_path / "l.parquet").to_pylist()
    assert [(r["key"], r["pid"], r["camid"]) for r in rows] == [
        ("imgs/frame_a.jpg", None, 1),
        ("imgs/frame_b.jpg", None, 1),
    ]
    (tmp_path / "list.txt").write_text("imgs/frame_a.jpg\nimgs/missing.jpg\n")
    one_line_error(
        dpm("dpm-embed", str(work / "runs" / "tiny"), "list.txt", cwd=tmp_path),
        "dpm-embed",
        "list.txt line 2",
        "missing.jpg",
    )


@pytest.mark.slow
def test_a_corrupt_image_is_an_error_naming_it_or_a_counted_skip(work, tmp_path):
    shutil.copytree(work / "photos", tmp_path / "photos")
    victim = sorted((tmp_path / "photos").glob("*.jpg"))[3]
    victim.write_bytes(victim.read_bytes()[:200])  # truncated JPEG
    model = str(work / "runs" / "tiny")
    one_line_error(dpm("dpm-embed", model, "photos", cwd=tmp_path), "dpm-embed", str(victim), "--skip-corrupt")
    proc = dpm("dpm-embed", model, "photos", "-o", "e.parquet", "--skip-corrupt", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "24 images" in proc.stdout and "1 corrupt skipped" in proc.stdout
    assert str(victim) in proc.stderr  # the logged skip names the file
    assert len(table(tmp_path / "e.parquet")) == 24


@pytest.mark.slow
def test_dpm_embed_shards_writes_the_same_file_on_one_process_two_ranks_and_over_http_and_s3(
    work, queries_over_http, s3_shards, s3_endpoint
):
    model = "runs/tiny"
    one = dpm("dpm-embed", model, "shards", "-o", "one.parquet", "--workers", "0", cwd=work)
    assert one.returncode == 0, one.stderr
    two = torchrun("dpm_dist.cli.embed", model, "shards", "-o", "two.parquet", "--workers", "0", cwd=work)
    assert two.returncode == 0, two.stderr
    assert "on 2 ranks" in two.stdout
    assert queries_over_http.returncode == 0, queries_over_http.stderr
    s3 = dpm(
        "dpm-embed",
        model,
        s3_shards,
        "--s3-endpoint",
        s3_endpoint,
        "--role",
        "query",
        "-o",
        "s3.parquet",
        "--workers",
        "0",
        cwd=work,
    )
    assert s3.returncode == 0, s3.stderr
    assert table(work / "s3.parquet").equals(table(work / "web.parquet"))  # the same bucket objects as the web files
    a, b, q = table(work / "one.parquet"), table(work / "two.parquet"), table(work / "web.parquet")
    assert a.num_rows == 25 and set(a.column("role").to_pylist()) == {"query", "gallery"}
    assert a.drop_columns(["mask"]).equals(b.drop_columns(["mask"]))  # keys, labels, features: every bit
    # The HMG's convolutions pick their kernel by batch size, and the shard loader's batches depend on the split.
    diff = (torch.tensor(a.column("mask").to_pylist()) - torch.tensor(b.column("mask").to_pylist())).abs().max()
    assert diff <= 1e-6
    queries = a.filter(a.column("role").to_numpy(zero_copy_only=False) == "query")
    assert q.equals(queries)


# ---- dpm-search -------------------------------------------------------------------------------------------------

SEARCH = ["web.parquet", "gallery.parquet", "-k", "5", "--exclude-same-camera"]  # the queries: queries_over_http


@pytest.mark.slow
def test_dpm_search_is_the_evaluators_ranking(work, queries_over_http):
    from dpm_dist.deploy.search import read_rows
    from dpm_dist.eval.retrieval import distance_matrix, top_k_gallery

    assert queries_over_http.returncode == 0, queries_over_http.stderr
    proc = dpm(
        "dpm-embed", "runs/tiny", "shards", "--role", "gallery", "-o", "gallery.parquet", "--workers", "0", cwd=work
    )
    assert proc.returncode == 0, proc.stderr
    proc = dpm("dpm-search", *SEARCH, "--output-dir", "s1", cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"dpm-search: top-5 of 10 queries (masked_cosine) -> {work / 's1' / 'topk.parquet'}"
    lists = table(work / "s1" / "topk.parquet")

    q = read_rows(str(work / "web.parquet"), feature="feat", role="query").rows
    g = read_rows(str(work / "gallery.parquet"), feature="feat", role="gallery").rows
    for i, record in enumerate(lists.to_pylist()):
        row = distance_matrix(q.feats[i : i + 1], g.feats, q_mask=q.masks[i : i + 1])[0]
        top = top_k_gallery(row, int(q.pids[i]), int(q.camids[i]), g.pids, g.camids, 5).tolist()
        assert record["query"] == q.keys[i] and record["gallery"] == [g.keys[j] for j in top]


@pytest.mark.slow
def test_dpm_search_on_two_ranks_writes_the_same_lists(work):
    if not (work / "s1" / "topk.parquet").exists():
        pytest.skip("needs test_dpm_search_is_the_evaluators_ranking's files")
    two = torchrun("dpm_dist.cli.search", *SEARCH, "--output-dir", "s2", cwd=work)
    assert two.returncode == 0, two.stderr
    assert table(work / "s1" / "topk.parquet").equals(table(work / "s2" / "topk.parquet"))


@pytest.mark.slow
def test_dpm_search_keeps_every_gallery_row_by_default_and_draws_pictures(work, photos_parquet):
    assert photos_parquet.returncode == 0, photos_parquet.stderr
    proc = dpm(
        "dpm-search",
        "photos.parquet",
        "photos.parquet",
        "-k",
        "3",
        "--format",
        "jsonl",
        "--pictures",
        "2",
        "--output-dir",
        "s3",
        cwd=work,
    )
    assert proc.returncode == 0, proc.stderr
    import json

    lists = [json.loads(line) for line in (work / "s3" / "topk.jsonl").read_text().splitlines()]
    assert len(lists) == 25 and all(len(r["gallery"]) == 3 for r in lists)
    assert sum(r["query"] in r["gallery"] for r in lists) >= 20  # an image is (nearly always) among its own nearest
    assert sorted(p.name for p in (work / "s3" / "pictures").iterdir()) == ["ranked_00.png", "ranked_01.png"]
    one_line_error(dpm("dpm-search", "photos.parquet", "nothere.parquet", cwd=work), "dpm-search", "nothere.parquet")
    one_line_error(
        dpm("dpm-search", "photos.parquet", "runs/tiny/model_final.pt", cwd=work),
        "dpm-search",
        "model_final.pt",
        "not a Parquet file",
    )


@pytest.mark.slow
def test_dpm_search_says_how_many_it_returned_when_the_gallery_is_smaller_than_k(work, photos_parquet):
    assert photos_parquet.returncode == 0, photos_parquet.stderr
    proc = dpm("dpm-search", "photos.parquet", "photos.parquet", "-k", "1000", "--output-dir", "s4", cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == (
        "dpm-search: 25 gallery images for each of 25 queries (-k 1000 asked for more: the gallery holds 25 images) "
        f"(masked_cosine) -> {work / 's4' / 'topk.parquet'}"
    )
    assert "top-1000" not in proc.stdout + proc.stderr
    assert {len(g) for g in table(work / "s4" / "topk.parquet").column("gallery").to_pylist()} == {25}


# ---- a model trained on several datasets (data.roots): --dataset and the camera offsets -------------------------


@pytest.fixture(scope="module")
def two(work: Path) -> Path:
    """``work`` with runs/two/model_final.pt: a model of datasets a (2 cameras) and b (3 cameras, offset 2)."""
    from tests.test_deploy import save_two_dataset_model

    save_two_dataset_model(work / "runs" / "two" / "model_final.pt")
    return work


def forward(model: Path, paths: list[str], camids: list[int]):
    """The model's own output for images and *model* camera ids: no dpm-embed code in between."""
    from PIL import Image

    import dpm_dist

    loaded = dpm_dist.load_model(model)
    images = []
    for path in paths:
        with Image.open(path) as img:
            images.append(loaded.transform(img))
    with torch.no_grad():
        return loaded.model(torch.stack(images), torch.tensor(camids))


def embedding_meta(path: Path) -> dict:
    import json

    return json.loads(table(path).schema.metadata[b"dpm"])


@pytest.mark.slow
def test_dpm_embed_of_a_two_dataset_model_needs_dataset_and_shifts_the_cameras_by_its_offset(two):
    from tests.test_deploy import TWO_DATASETS

    one_line_error(
        dpm("dpm-embed", "runs/two", "photos", "-o", "x.parquet", cwd=two), "dpm-embed", "2 datasets", "--dataset a|b"
    )
    assert not (two / "x.parquet").exists()
    proc = dpm("dpm-embed", "runs/two", "photos", "-o", "b.parquet", "--dataset", "b", "--workers", "0", cwd=two)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1].startswith("dpm-embed: 25 images of dataset b (cameras + 2) in ")
    rows = table(two / "b.parquet").to_pylist()[:5]
    own = [int(re.match(r"\d+_c(\d+)", r["key"].rsplit("/", 1)[-1]).group(1)) - 1 for r in rows]
    assert [r["camid"] for r in rows] == own and len(set(own)) > 1  # the column keeps the dataset's own camera
    feats = torch.tensor([r["feat"] for r in rows])
    ref = forward(two / "runs" / "two", [r["path"] for r in rows], [c + 2 for c in own])
    torch.testing.assert_close(feats, ref.feat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor([r["mask"] for r in rows]), ref.mask, rtol=1e-5, atol=1e-5)
    unshifted = forward(two / "runs" / "two", [r["path"] for r in rows], own)  # what dpm-embed did before
    assert (feats - unshifted.feat).abs().max() > 1e-3
    meta = embedding_meta(two / "b.parquet")
    assert (meta["embedding"]["dataset"], meta["embedding"]["cam_offset"], meta["embedding"]["dataset_from"]) == (
        "b",
        2,
        "--dataset",
    )
    assert meta["model"]["datasets"] == TWO_DATASETS
    # The photos' third camera is not one of a's two (an unknown name: test_deploy.py, the same check).
    one_line_error(
        dpm("dpm-embed", "runs/two", "photos", "--dataset", "a", cwd=two),
        "dpm-embed",
        "_c3",
        "outside dataset a's 2 cameras",
    )


@pytest.mark.slow
def test_dpm_embed_camid_is_the_datasets_own_camera(two, tmp_path):
    photos = sorted((two / "photos").glob("*.jpg"))[:2]
    (tmp_path / "imgs").mkdir()
    for photo, name in zip(photos, ("frame_a.jpg", "frame_b.jpg")):
        shutil.copy(photo, tmp_path / "imgs" / name)
    (tmp_path / "list.txt").write_text("imgs/frame_a.jpg\nimgs/frame_b.jpg\n")
    model = str(two / "runs" / "two")
    one_line_error(
        dpm("dpm-embed", model, "list.txt", "--dataset", "b", "--camid", "3", cwd=tmp_path),
        "dpm-embed",
        "--camid 3",
        "dataset b's cameras 0..2",
    )
    proc = dpm(
        "dpm-embed",
        model,
        "list.txt",
        "--dataset",
        "b",
        "--camid",
        "2",
        "-o",
        "l.parquet",
        "--workers",
        "0",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    rows = table(tmp_path / "l.parquet").to_pylist()
    assert [r["camid"] for r in rows] == [2, 2]
    ref = forward(two / "runs" / "two", [r["path"] for r in rows], [4, 4])  # b's camera 2 is the model's 4
    torch.testing.assert_close(torch.tensor([r["feat"] for r in rows]), ref.feat, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_dpm_embed_shards_whose_index_json_names_one_dataset_select_it(two, tmp_path):
    import json

    from dpm_dist.config import DataConfig
    from dpm_dist.data.loader import build_eval_loader
    from dpm_dist.dist import DistEnv

    proc = dpm("dpm-embed", "runs/two", "shards", "--role", "query", "-o", "qb.parquet", "--workers", "0", cwd=two)
    assert proc.returncode == 0, proc.stderr
    assert (
        "dpm-embed: shards: index.json (synthetic, 8 ids, 3 cameras) is dataset b of the model: cameras + 2"
        in proc.stderr
    )
    meta = embedding_meta(two / "qb.parquet")
    assert (meta["embedding"]["dataset"], meta["embedding"]["cam_offset"], meta["embedding"]["dataset_from"]) == (
        "b",
        2,
        "index.json",
    )
    rows = {r["key"]: r for r in table(two / "qb.parquet").to_pylist()}
    batch = next(
        iter(
            build_eval_loader(
                DataConfig(root=str(two / "shards"), img_size=[64, 32], eval_batch_size=4, num_workers=0),
                DistEnv(),
                "query",
            )
        )
    )
    import dpm_dist

    loaded = dpm_dist.load_model(two / "runs" / "two")
    with torch.no_grad():
        ref = loaded.model(batch["images"], batch["camids"] + 2)
    assert [rows[k]["camid"] for k in batch["keys"]] == batch["camids"].tolist()
    torch.testing.assert_close(torch.tensor([rows[k]["feat"] for k in batch["keys"]]), ref.feat, rtol=1e-5, atol=1e-5)
    one_line_error(
        dpm("dpm-embed", "runs/two", "shards", "--dataset", "a", cwd=two),
        "dpm-embed",
        "index.json records 3 cameras",
        "dataset a of the model has 2",
    )
    other = tmp_path / "other"
    shutil.copytree(two / "shards", other)
    manifest = json.loads((other / "index.json").read_text())
    (other / "index.json").write_text(json.dumps(dict(manifest, dataset="market1501")))
    one_line_error(
        dpm("dpm-embed", str(two / "runs" / "two"), "other", cwd=tmp_path),
        "dpm-embed",
        "other/index.json (market1501, 8 ids, 3 cameras) matches none",
        "--dataset a|b",
    )


@pytest.mark.slow
def test_dpm_search_refuses_the_same_camera_exclusion_across_two_datasets(two, tmp_path):
    import json

    import pyarrow.parquet as pq

    if not (two / "qb.parquet").exists():
        pytest.skip("needs test_dpm_embed_shards_whose_index_json_names_one_dataset_select_it's file")
    shutil.copy(two / "qb.parquet", tmp_path / "qb.parquet")
    query = table(tmp_path / "qb.parquet")  # the same rows as if embedded with --dataset a
    meta = embedding_meta(tmp_path / "qb.parquet")
    meta["embedding"].update(dataset="a", cam_offset=0)
    pq.write_table(query.replace_schema_metadata({b"dpm": json.dumps(meta).encode()}), tmp_path / "ga.parquet")
    one_line_error(
        dpm("dpm-search", "qb.parquet", "ga.parquet", "--exclude-same-camera", cwd=tmp_path),
        "dpm-search",
        "--exclude-same-camera",
        "qb.parquet was embedded as dataset b",
        "ga.parquet as a",
    )
    proc = dpm("dpm-search", "qb.parquet", "ga.parquet", "-k", "1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert len(table(tmp_path / "search" / "topk.parquet")) == 10
