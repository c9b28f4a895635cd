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
    return subprocess.run([str(VENV_BIN / command), *args], cwd=cwd, env=environ, capture_output=True, text=True,
                          timeout=240)


def torchrun(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                           "127.0.0.1", "--master-port", str(free_port()), "-m", module, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=240)


def one_line_error(proc: subprocess.CompletedProcess, prog: str, *needles: str) -> str:
    lines = [ln for ln in proc.stderr.strip().splitlines()  # the run-folder note and the progress bar are fine
             if ln.strip() and "is a run folder: using" not in ln and "%|" not in ln]
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


# ---- dpm-export -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("output, kind", [("out/model.onnx", "onnx, dynamo exporter, opset 18"),
                                          ("model_ts.pt", "torchscript, torch.jit.trace")])
def test_dpm_export_writes_the_format_of_the_suffix_and_checks_it(work, output, kind):
    proc = dpm("dpm-export", "runs/tiny", output, cwd=work)
    assert proc.returncode == 0, proc.stderr
    wrote, parity = proc.stdout.strip().splitlines()
    assert wrote.startswith(f"dpm-export: wrote {work / output} ({kind}; input 64x32, 3 cameras, test feature feat)")
    assert parity.startswith("dpm-export: parity vs eager PyTorch at batch 3: ")
    assert "Warning" not in proc.stderr and "Traceback" not in proc.stderr
    assert (work / output).is_file()


def test_dpm_export_errors_name_the_culprit(work, tmp_path):
    one_line_error(dpm("dpm-export", "runs/tiny", "model.engine", cwd=work), "dpm-export", "model.engine",
                   ".onnx (ONNX) or .pt (TorchScript)")
    one_line_error(dpm("dpm-export", "runs/nothere", "m.pt", cwd=work), "dpm-export", "CHECKPOINT",
                   str(work / "runs" / "nothere"))
    (tmp_path / "bad.pt").write_bytes(b"not a model")
    one_line_error(dpm("dpm-export", str(tmp_path / "bad.pt"), "m.pt", cwd=work), "dpm-export", "bad.pt", "not a torch file")


def test_dpm_export_to_onnx_without_the_deploy_extra_says_how_to_install_it(work, tmp_path):
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text("import sys\nfor name in ('onnx', 'onnxscript', 'onnxruntime'):\n"
                                              "    sys.modules[name] = None\n")
    proc = dpm("dpm-export", "runs/tiny", "model.onnx", cwd=work, PYTHONPATH=str(blocker))
    one_line_error(proc, "dpm-export", 'pip install "dpm-dist[deploy]"', "onnx")
    assert not (work / "model.onnx").exists()


# ---- dpm-embed --------------------------------------------------------------------------------------------------

def test_dpm_embed_over_a_folder_gives_load_models_embeddings(work):
    import dpm_dist

    proc = dpm("dpm-embed", "runs/tiny", "photos", "-o", "photos.parquet", "--workers", "1", cwd=work)
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("dpm-embed: 25 images in ") and "images/s on 1 rank" in last and last.endswith(str(work / "photos.parquet"))
    assert "25/25" in proc.stderr  # the progress bar
    rows = table(work / "photos.parquet").to_pylist()
    assert [r["key"] for r in rows] == sorted(r["key"] for r in rows) and any(r["key"].startswith("cam2/") for r in rows)
    first = rows[0]
    pid, cam = re.match(r"(\d+)_c(\d+)", first["key"].rsplit("/", 1)[-1]).groups()
    assert first["pid"] == int(pid) and first["camid"] == int(cam) - 1 and first["path"] == str(work / "photos" / first["key"])
    loaded = dpm_dist.load_model(work / "runs" / "tiny")
    ref = loaded.embed([r["path"] for r in rows[:4]], camids=[r["camid"] for r in rows[:4]])
    torch.testing.assert_close(torch.tensor([r["feat"] for r in rows[:4]]), ref.feat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor([r["mask"] for r in rows[:4]]), ref.mask, rtol=1e-5, atol=1e-5)
    import json
    meta = json.loads(table(work / "photos.parquet").schema.metadata[b"dpm"])
    assert meta["model"]["img_size"] == [64, 32] and meta["embedding"]["input_kind"] == "folder" and meta["num_skipped"] == 0


@pytest.mark.slow
def test_dpm_embed_over_a_folder_writes_the_same_file_on_two_ranks(work):
    two = torchrun("dpm_dist.cli.embed", "runs/tiny", "photos", "-o", "photos2.parquet", "--workers", "0",
                   "--batch-size", "4", cwd=work)
    assert two.returncode == 0, two.stderr
    one = dpm("dpm-embed", "runs/tiny", "photos", "-o", "photos1.parquet", "--workers", "0", "--batch-size", "4", cwd=work)
    assert one.returncode == 0, one.stderr
    assert table(work / "photos1.parquet").equals(table(work / "photos2.parquet"))  # every column, every bit


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
    assert [(r["key"], r["pid"], r["camid"]) for r in rows] == [("imgs/frame_a.jpg", None, 1), ("imgs/frame_b.jpg", None, 1)]
    (tmp_path / "list.txt").write_text("imgs/frame_a.jpg\nimgs/missing.jpg\n")
    one_line_error(dpm("dpm-embed", str(work / "runs" / "tiny"), "list.txt", cwd=tmp_path), "dpm-embed",
                   "list.txt line 2", "missing.jpg")


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
def test_dpm_embed_shards_writes_the_same_file_on_one_process_two_ranks_and_over_http_and_s3(work, http_root, s3_shards,
                                                                                                s3_endpoint):
    model = "runs/tiny"
    one = dpm("dpm-embed", model, "shards", "-o", "one.parquet", "--workers", "0", cwd=work)
    assert one.returncode == 0, one.stderr
    two = torchrun("dpm_dist.cli.embed", model, "shards", "-o", "two.parquet", "--workers", "0", cwd=work)
    assert two.returncode == 0, two.stderr
    assert "on 2 ranks" in two.stdout
    web = dpm("dpm-embed", model, f"{http_root}/synthetic", "--role", "query", "-o", "web.parquet", "--workers", "0", cwd=work)
    assert web.returncode == 0, web.stderr
    s3 = dpm("dpm-embed", model, s3_shards, "--s3-endpoint", s3_endpoint, "--role", "query", "-o", "s3.parquet",
             "--workers", "0", cwd=work)
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

SEARCH = ["query.parquet", "gallery.parquet", "-k", "5", "--exclude-same-camera"]


def test_dpm_search_is_the_evaluators_ranking(work):
    from dpm_dist.deploy.search import read_rows
    from dpm_dist.eval.retrieval import distance_matrix, top_k_gallery

    for role in ("query", "gallery"):
        proc = dpm("dpm-embed", "runs/tiny", "shards", "--role", role, "-o", f"{role}.parquet", "--workers", "0", cwd=work)
        assert proc.returncode == 0, proc.stderr
    proc = dpm("dpm-search", *SEARCH, "--output-dir", "s1", cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"dpm-search: top-5 of 10 queries (masked_cosine) -> {work / 's1' / 'topk.parquet'}"
    lists = table(work / "s1" / "topk.parquet")

    q = read_rows(str(work / "query.parquet"), feature="feat", role="query").rows
    g = read_rows(str(work / "gallery.parquet"), feature="feat", role="gallery").rows
    for i, record in enumerate(lists.to_pylist()):
        row = distance_matrix(q.feats[i:i + 1], g.feats, q_mask=q.masks[i:i + 1])[0]
        top = top_k_gallery(row, int(q.pids[i]), int(q.camids[i]), g.pids, g.camids, 5).tolist()
        assert record["query"] == q.keys[i] and record["gallery"] == [g.keys[j] for j in top]


@pytest.mark.slow
def test_dpm_search_on_two_ranks_writes_the_same_lists(work):
    if not (work / "s1" / "topk.parquet").exists():
        pytest.skip("needs test_dpm_search_is_the_evaluators_ranking's files")
    two = torchrun("dpm_dist.cli.search", *SEARCH, "--output-dir", "s2", cwd=work)
    assert two.returncode == 0, two.stderr
    assert table(work / "s1" / "topk.parquet").equals(table(work / "s2" / "topk.parquet"))


def test_dpm_search_keeps_every_gallery_row_by_default_and_draws_pictures(work):
    proc = dpm("dpm-embed", "runs/tiny", "photos", "-o", "all.parquet", "--workers", "0", cwd=work)
    assert proc.returncode == 0, proc.stderr
    proc = dpm("dpm-search", "all.parquet", "all.parquet", "-k", "3", "--format", "jsonl", "--pictures", "2",
               "--output-dir", "s3", cwd=work)
    assert proc.returncode == 0, proc.stderr
    import json
    lists = [json.loads(line) for line in (work / "s3" / "topk.jsonl").read_text().splitlines()]
    assert len(lists) == 25 and all(len(r["gallery"]) == 3 for r in lists)
    assert sum(r["query"] in r["gallery"] for r in lists) >= 20  # an image is (nearly always) among its own nearest
    assert sorted(p.name for p in (work / "s3" / "pictures").iterdir()) == ["ranked_00.png", "ranked_01.png"]
    one_line_error(dpm("dpm-search", "all.parquet", "nothere.parquet", cwd=work), "dpm-search", "nothere.parquet")
    one_line_error(dpm("dpm-search", "all.parquet", "runs/tiny/model_final.pt", cwd=work), "dpm-search",
                   "model_final.pt", "not a Parquet file")
