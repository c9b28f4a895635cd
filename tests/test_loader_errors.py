"""Bad input: every case raises an error naming the shard/key/URL (or, when configured, a counted skip)."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from dpm_dist.data.loader import build_eval_loader, build_train_loader, load_manifest
from dpm_dist.data.shards import ShardError, read_manifest, write_dataset
from dpm_dist.data.storage import StorageError
from dpm_dist.data.synth import SynthSpec, synth_samples
from dpm_dist.dist import DistEnv
from tests.conftest import free_port
from tests.test_loader import data_cfg


@pytest.fixture
def copy(tiny_shards: Path, tmp_path: Path) -> Path:
    root = tmp_path / "copy"
    shutil.copytree(tiny_shards, root)
    return root


@pytest.fixture(scope="module")
def corrupt_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 ids × 2 train images (so every P=3×K=2 batch holds every image), one of them a cut-off JPEG."""
    spec = SynthSpec(
        seed=0, num_ids=3, num_test_ids=2, images_per_id=2, query_per_id=1, gallery_per_id=2, height=32, width=16
    )
    samples = list(synth_samples(spec))
    bad = next(i for i, s in enumerate(samples) if s.role == "train")
    samples[bad] = samples[bad].__class__(**{**vars(samples[bad]), "jpg": samples[bad].jpg[:200]})
    root = tmp_path_factory.mktemp("corrupt")
    write_dataset(samples, str(root), dataset="synthetic", max_count=3)
    return root


CORRUPT_KEY = "train_0001_c1s1_000000_00"  # the first training image synthesised


@pytest.mark.parametrize("sampler", ["stream", "exact"])
def test_corrupt_image_is_named_or_skipped_and_counted(
    corrupt_root: Path, sampler: str, caplog: pytest.LogCaptureFixture
) -> None:
    key = CORRUPT_KEY
    cfg = data_cfg(str(corrupt_root), sampler=sampler, shuffle_buffer=6, batches_per_epoch=10)
    with pytest.raises(ShardError, match=rf"shard .*train-0000\d\.tar.*{key}.*corrupt image"):
        list(build_train_loader(cfg, DistEnv(), epoch=1, seed=0))
    skip = data_cfg(str(corrupt_root), sampler=sampler, shuffle_buffer=6, batches_per_epoch=10, skip_corrupt=True)
    with caplog.at_level(logging.WARNING, logger="dpm_dist.data.loader"):
        batches = list(build_train_loader(skip, DistEnv(), epoch=1, seed=0))
    assert batches
    for batch in batches:
        assert sorted(Counter(batch["pids"].tolist()).values()) == [2, 2, 2]  # still exactly P×K
        assert key not in batch["keys"]  # replaced by the other image of the same identity
    assert any(key in r.getMessage() and "skipping corrupt sample" in r.getMessage() for r in caplog.records)
    assert sum(b["num_skipped"] for b in batches) >= 1  # what the training loop adds up and reports


def test_truncated_tar_is_named(copy: Path) -> None:
    name = read_manifest(str(copy))["splits"]["train"]["shards"][0]["name"]
    data = (copy / name).read_bytes()
    (copy / name).write_bytes(data[: len(data) // 2 + 100])
    with pytest.raises(ShardError, match=rf"{name}: truncated: \d+ bytes, index.json says {len(data)}"):
        build_train_loader(data_cfg(str(copy), sampler="exact"), DistEnv(), epoch=1, seed=0)
    for sampler in ("exact", "stream"):  # without the manifest's sizes the tar reader must notice
        cfg = data_cfg(str(copy), sampler=sampler, verify_sha=False, train_urls=[str(copy / name)], batches_per_epoch=3)
        with pytest.raises(ShardError, match=rf"{name}: truncated"):
            list(build_train_loader(cfg, DistEnv(), epoch=1, seed=0))


def test_sha_mismatch_is_named(copy: Path) -> None:
    name = read_manifest(str(copy))["splits"]["gallery"]["shards"][1]["name"]
    data = bytearray((copy / name).read_bytes())
    data[1500] ^= 0x01
    (copy / name).write_bytes(bytes(data))
    with pytest.raises(ShardError, match=rf"{name}: sha256 mismatch"):
        list(build_eval_loader(data_cfg(str(copy)), DistEnv(), "gallery"))


def test_missing_shard_is_named_even_from_a_worker_process(copy: Path) -> None:
    name = read_manifest(str(copy))["splits"]["gallery"]["shards"][0]["name"]
    (copy / name).unlink()
    with pytest.raises(StorageError, match=rf"{name} does not exist"):
        list(build_eval_loader(data_cfg(str(copy), num_workers=2), DistEnv(), "gallery"))


@pytest.mark.slow
def test_unreachable_storage_fails_after_bounded_retries(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")  # credentials present: the endpoint is what fails
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    port = free_port()  # nothing listens there
    dead = f"http://127.0.0.1:{port}/x"
    with caplog.at_level(logging.WARNING, logger="dpm_dist.data.storage"):
        with pytest.raises(StorageError, match=rf"{dead}/index.json is unreachable after 2 attempts"):
            load_manifest(data_cfg(dead))
        with pytest.raises(StorageError, match=r"s3://bucket/x/index.json is unreachable after 2 attempts"):
            load_manifest(data_cfg("s3://bucket/x", s3_endpoint=f"http://127.0.0.1:{port}"))
    retries = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert len(retries) == 2 and "attempt 1 of 2" in retries[0]  # one logged retry per URL


@pytest.mark.slow
def test_missing_s3_credentials_are_named_and_not_retried(s3_shards: str, s3_endpoint: str, tmp_path: Path) -> None:
    empty = tmp_path / "empty_aws_file"
    empty.write_text("")  # a developer's ~/.aws must not leak in
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "HYDRA_FULL_ERROR"}
    env.update(
        AWS_SHARED_CREDENTIALS_FILE=str(empty),
        AWS_CONFIG_FILE=str(empty),
        AWS_EC2_METADATA_DISABLED="true",
        AWS_DEFAULT_REGION="us-east-1",
        DS_ACCELERATOR="cpu",
    )
    cmd = [str(Path(sys.executable).parent / "dpm-shards"), "verify", s3_shards, "--s3-endpoint", s3_endpoint]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.strip()]  # no "retrying" warnings before it
    assert line.startswith(f"dpm-shards: error: {s3_shards}/index.json: no credentials found")
    assert "AWS_ACCESS_KEY_ID" in line and "AWS_PROFILE" in line and "data.s3_endpoint" in line
    assert "attempts" not in line


def test_unauthorised_storage_is_not_retried(
    http_root: str, s3_shards: str, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(StorageError, match=rf"access to {http_root}/private/x/index.json was refused"):
        load_manifest(data_cfg(f"{http_root}/private/x"))
    import moto.settings

    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # the server now checks credentials
    with pytest.raises(StorageError, match=rf"access to {s3_shards}/index.json was refused"):
        load_manifest(data_cfg(s3_shards, s3_endpoint=s3_endpoint))
    with pytest.raises(StorageError, match="s3://no-such-bucket/x/index.json does not exist"):
        monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", float("inf"))
        load_manifest(data_cfg("s3://no-such-bucket/x", s3_endpoint=s3_endpoint))


def test_fewer_identities_than_p_is_an_error(tiny_shards: Path) -> None:
    for sampler in ("stream", "exact"):
        with pytest.raises(ValueError, match="P=9 but the training set .* has only 8 identities"):
            build_train_loader(
                data_cfg(str(tiny_shards), sampler=sampler, num_ids=9, shuffle_buffer=18), DistEnv(), epoch=1, seed=0
            )
