"""Shard writing for every layout, the manifest, atomic writes, ``dpm-shards verify`` and the CLI."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dpm_dist.cli.shards import main as shards_main
from dpm_dist.data.layouts import parse_market_name, parse_msmt_name, scan_layout
from dpm_dist.data.shards import (
    Sample,
    ShardError,
    iter_shard,
    read_manifest,
    split_contiguous,
    verify,
    write_dataset,
    write_records,
)

DPM_SHARDS = str(Path(sys.executable).parent / "dpm-shards")


def run_shards(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """The installed ``dpm-shards`` command, run from ``cwd`` (paths in ``args`` relative to it)."""
    full_env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    return subprocess.run(
        [DPM_SHARDS, *args],
        cwd=cwd,
        env={**full_env, "DS_ACCELERATOR": "cpu", **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [ln for ln in proc.stderr.splitlines() if ln.strip()]


def save_image(path: Path, colour: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = {".jpg": "JPEG", ".png": "PNG", ".tif": "TIFF"}[path.suffix]
    Image.new("RGB", (8, 16), (colour, 255 - colour, 40)).save(path, format=fmt)


def market_folder(root: Path, ext: str = ".jpg") -> dict[str, list[tuple[int, int]]]:
    """Market-style folder: pids 0 (distractor), 2, 5, 11, junk -1 in the gallery; a digit-laden parent dir."""
    files = {
        "bounding_box_train": [(11, 1), (11, 2), (2, 1), (5, 3), (5, 3)],
        "query": [(2, 1), (5, 2)],
        "bounding_box_test": [(2, 2), (5, 1), (0, 4), (-1, 3)],
    }
    for sub, items in files.items():
        for i, (pid, cam) in enumerate(items):
            save_image(root / sub / f"{pid:04d}_c{cam}s1_{i:06d}_00{ext}", 10 * i + pid)
    return files


def test_market_style_layouts_round_trip(tmp_path: Path) -> None:
    src = tmp_path / "run_c9" / "Market"  # digits + "_c" in a parent folder must not be parsed
    market_folder(src)
    for layout in ("market1501", "dukemtmc", "occluded_duke"):
        out = tmp_path / layout
        manifest = write_records(scan_layout(layout, str(src)), str(out), dataset=layout, max_count=2)
        assert read_manifest(str(out)) == json.loads((out / "index.json").read_text())
        assert manifest["dataset"] == layout and manifest["num_train_ids"] == 3
        assert manifest["relabel"] == {"2": 0, "5": 1, "11": 2}  # sorted pids
        train = manifest["splits"]["train"]
        assert train["num_samples"] == 5 and len(train["shards"]) == 3 and train["cams"] == {"0": 2, "1": 1, "2": 2}
        gallery = manifest["splits"]["gallery"]
        assert gallery["num_samples"] == 3 and gallery["num_ids"] == 3  # junk -1 dropped, pid 0 kept
        assert manifest["num_cams"] == 4
        assert verify(str(out)) == []
        samples = [s for e in train["shards"] for s in iter_shard(e["name"], (out / e["name"]).read_bytes())]
        metas = {s["key"]: s["meta"] for s in samples}
        meta = metas["train_0011_c2s1_000001_00"]
        assert meta == {
            "pid": 11,
            "label": 2,
            "camid": 1,
            "split": "train",
            "role": "train",
            "source": "bounding_box_train/0011_c2s1_000001_00.jpg",
        }
        jpg = next(s["jpg"] for s in samples if s["key"] == "train_0011_c2s1_000001_00")
        assert jpg == (src / meta["source"]).read_bytes()  # JPEGs are copied, not re-encoded


def test_generic_layout_reencodes_png_and_allows_missing_splits(tmp_path: Path) -> None:
    for name in ("0003_c1_a.png", "0003_c2_b.png", "0007_c1_c.png"):
        save_image(tmp_path / "src" / "bounding_box_train" / name, 100)
    manifest = write_records(scan_layout("generic", str(tmp_path / "src")), str(tmp_path / "out"), dataset="generic")
    assert set(manifest["splits"]) == {"train"} and manifest["num_train_ids"] == 2
    shard = manifest["splits"]["train"]["shards"][0]["name"]
    sample = next(iter_shard(shard, (tmp_path / "out" / shard).read_bytes()))
    assert sample["jpg"][:3] == b"\xff\xd8\xff"
    assert Image.open(io.BytesIO(sample["jpg"])).size == (8, 16)


def test_msmt17_from_list_files(tmp_path: Path) -> None:
    lists = {
        "list_train.txt": ("train", [(0, 1), (0, 3), (4, 15)]),
        "list_val.txt": ("train", [(4, 2)]),
        "list_query.txt": ("test", [(9, 2)]),
        "list_gallery.txt": ("test", [(9, 5), (12, 2)]),
    }
    for list_name, (sub, items) in lists.items():
        lines = []
        for i, (pid, cam) in enumerate(items):
            rel = f"{pid:04d}/{pid:04d}_{i:03d}_{cam:02d}_0303morning_{i:04d}_0.jpg"
            save_image(tmp_path / "MSMT17_V1" / sub / rel, pid + i)
            lines.append(f"{rel} {pid}\n")
        (tmp_path / "MSMT17_V1" / list_name).write_text("".join(lines))
    manifest = write_records(
        scan_layout("msmt17", str(tmp_path / "MSMT17_V1")), str(tmp_path / "out"), dataset="msmt17"
    )
    assert manifest["splits"]["train"]["num_samples"] == 4  # train + val
    assert manifest["splits"]["train"]["cams"] == {"0": 1, "1": 1, "2": 1, "14": 1}
    assert manifest["relabel"] == {"0": 0, "4": 1} and manifest["num_cams"] == 15
    assert manifest["splits"]["gallery"]["num_ids"] == 2 and verify(str(tmp_path / "out")) == []


def test_occluded_reid_raw_release_is_renamed_like_rename_py(tmp_path: Path) -> None:
    src = tmp_path / "Occluded_REID"
    for folder in ("occluded_body_images", "whole_body_images"):
        for pid in (1, 200):
            for idx in (1, 2, 5):
                save_image(src / folder / f"{pid:03d}" / f"{pid:03d}_{idx:02d}.tif", pid % 255)
    manifest = write_records(scan_layout("occluded_reid", str(src)), str(tmp_path / "out"), dataset="occluded_reid")
    assert set(manifest["splits"]) == {"query", "gallery"} and manifest["num_train_ids"] == 0
    assert manifest["splits"]["query"]["cams"] == {"0": 6} and manifest["splits"]["gallery"]["cams"] == {"2": 6}
    out = tmp_path / "out"
    keys = {
        s["key"]: s["meta"]
        for role in ("query", "gallery")
        for e in manifest["splits"][role]["shards"]
        for s in iter_shard(e["name"], (out / e["name"]).read_bytes())
    }
    assert keys["query_0200_c1s1_000250_00"]["source"] == "occluded_body_images/200/200_05.tif"
    assert keys["gallery_0001_c3s3_000100_00"]["camid"] == 2 and keys["gallery_0001_c3s3_000100_00"]["pid"] == 1
    assert verify(str(out)) == []


def test_names_are_parsed_from_the_basename_and_bad_names_are_named(tmp_path: Path) -> None:
    assert parse_market_name("some/dir_c7/0042_c3s1_000151_01.jpg") == (42, 2)
    assert parse_market_name("-1_c1s1_000001_00.jpg") == (-1, 0)
    assert parse_msmt_name("0007/0007_011_09_0303morning_0015_0.jpg") == (7, 8)
    with pytest.raises(ValueError, match="holiday.jpg"):
        parse_market_name("query/holiday.jpg")
    save_image(tmp_path / "bounding_box_train" / "0001_c1s1_000001_00.jpg", 1)
    save_image(tmp_path / "bounding_box_train" / "person.jpg", 1)
    with pytest.raises(ValueError, match="person.jpg"):
        scan_layout("generic", str(tmp_path))
    (tmp_path / "bounding_box_train" / "person.jpg").unlink()
    with pytest.raises(ValueError, match="query"):
        scan_layout("market1501", str(tmp_path))  # missing folder named


def sample(i: int, role: str = "train") -> Sample:
    buf = io.BytesIO()
    Image.fromarray(np.full((16, 8, 3), i * 20 % 255, np.uint8)).save(buf, format="JPEG")
    return Sample(f"{role}_{i:04d}", buf.getvalue(), pid=i % 3, camid=i % 2, role=role, source=f"x/{i}.jpg")


def test_shards_roll_over_by_count_and_bytes(tmp_path: Path) -> None:
    by_count = write_dataset([sample(i) for i in range(10)], str(tmp_path / "a"), dataset="generic", max_count=4)
    assert [e["num_samples"] for e in by_count["splits"]["train"]["shards"]] == [4, 4, 2]
    same = [Sample(f"train_{i}", sample(0).jpg, i % 3, 0, "train", f"x/{i}.jpg") for i in range(10)]
    size = len(sample(0).jpg) + 1536
    by_bytes = write_dataset(same, str(tmp_path / "b"), dataset="generic", max_bytes=3 * size)
    assert [e["num_samples"] for e in by_bytes["splits"]["train"]["shards"]] == [3, 3, 3, 1]
    assert by_count["train_label_counts"] == [4, 3, 3]


def test_a_crash_while_writing_leaves_no_complete_looking_shard(tmp_path: Path) -> None:
    from dpm_dist.data.shards import write_shards

    samples = [sample(i) for i in range(6)]
    samples[5] = Sample("train_bad", sample(5).jpg, object(), 0, "train", "x/bad.jpg")  # fails mid-tar
    with pytest.raises(TypeError):
        write_shards(samples, str(tmp_path), "train", labels={}, max_count=4, max_bytes=1 << 30)
    names = sorted(os.listdir(tmp_path))
    assert names == ["train-00000.tar"]  # the finished shard only: no partial tar, no temp file
    with tarfile.open(tmp_path / names[0]) as tar:
        assert len(tar.getnames()) == 8


def test_verify_reports_problems_by_shard_and_key(tiny_shards: Path, tmp_path: Path) -> None:
    root = tmp_path / "copy"
    shutil.copytree(tiny_shards, root)
    manifest = read_manifest(str(root))
    first, second = (e["name"] for e in manifest["splits"]["train"]["shards"][:2])
    data = bytearray((root / first).read_bytes())
    data[2000] ^= 0xFF  # same size, different bytes
    (root / first).write_bytes(bytes(data))
    (root / second).unlink()
    problems = verify(str(root))
    assert any(first in p and "sha256 mismatch" in p for p in problems)
    assert any(second in p and "does not exist" in p for p in problems)
    assert len(problems) == 2  # the split's totals are not reported again for an unreadable shard
    assert shards_main(["verify", str(root)]) == 1
    assert shards_main(["verify", str(tiny_shards)]) == 0
    shutil.copytree(tiny_shards, tmp_path / "counts")
    manifest["splits"]["train"]["cams"]["0"] += 1  # sound shards, but index.json disagrees with them
    (tmp_path / "counts" / "index.json").write_text(json.dumps(manifest))
    assert [p for p in verify(str(tmp_path / "counts")) if p.startswith("split train: camera counts")]


def test_verify_decodes_every_image(tmp_path: Path) -> None:
    samples = [sample(i) for i in range(4)]
    samples[2] = Sample("train_0002", samples[2].jpg[:40], 2, 0, "train", "x/2.jpg")
    write_dataset(samples, str(tmp_path), dataset="generic")
    problems = verify(str(tmp_path))
    assert len(problems) == 1 and "train_0002" in problems[0] and "train-00000.tar" in problems[0]


def test_cli_write_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    market_folder(tmp_path / "src")
    assert (
        shards_main(
            [
                "write",
                "--layout",
                "market1501",
                "--src",
                str(tmp_path / "src"),
                "--out",
                str(tmp_path / "out"),
                "--max-bytes",
                "1kB",
            ]
        )
        == 0
    )
    manifest = read_manifest(str(tmp_path / "out"))
    assert len(manifest["splits"]["train"]["shards"]) == 5  # one sample per 1 kB shard
    assert "train: 5 images / 3 ids / 5 shards" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="2"):
        shards_main(["write", "--layout", "market1501", "--src", str(tmp_path / "nope"), "--out", str(tmp_path / "o2")])
    assert "nope" in capsys.readouterr().err


def noise_jpeg(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (64, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG", quality=90)


@pytest.mark.slow
def test_cli_write_refuses_a_truncated_jpeg_or_skips_and_records_it(tmp_path: Path) -> None:
    market_folder(tmp_path / "src")
    bad = tmp_path / "src" / "bounding_box_train" / "0002_c2s1_000009_00.jpg"
    noise_jpeg(bad, 0)
    bad.write_bytes(bad.read_bytes()[:300])  # a cut-off copy: headers fine, scan data missing
    proc = run_shards(["write", "--layout", "market1501", "--src", "src", "--out", "out"], tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    (line,) = error_lines(proc)
    assert line.startswith("dpm-shards: error: file ") and str(bad) in line and "cannot decode image" in line
    assert "--skip-corrupt" in line and not (tmp_path / "out").exists()  # nothing written

    proc = run_shards(["write", "--layout", "market1501", "--src", "src", "--out", "out", "--skip-corrupt"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {tmp_path / 'out'}: train: 5 images" in proc.stdout  # relative --out resolved
    (warning,) = error_lines(proc)
    assert "skipped 1 corrupt image(s)" in warning and "bounding_box_train/0002_c2s1_000009_00.jpg" in warning
    manifest = read_manifest(str(tmp_path / "out"))
    assert manifest["num_skipped"] == 1 and manifest["splits"]["train"]["num_samples"] == 5
    (skipped,) = manifest["skipped"]
    assert skipped["path"] == "bounding_box_train/0002_c2s1_000009_00.jpg" and skipped["reason"]
    assert run_shards(["verify", "out"], tmp_path).returncode == 0


@pytest.mark.slow
def test_hidden_files_are_ignored_and_jpeg_extensions_accepted(tmp_path: Path) -> None:
    market_folder(tmp_path / "src")
    train = tmp_path / "src" / "bounding_box_train"
    (train / "._0011_c1s1_000000_00.jpg").write_bytes(b"\x00\x05\x16\x07" + bytes(60))  # macOS AppleDouble
    (train / ".DS_Store").write_bytes(bytes(16))
    noise_jpeg(train / "0007_c1s1_000001_00.jpeg", 1)
    noise_jpeg(train / "0007_c2s1_000002_00.JPG", 2)
    proc = run_shards(["write", "--layout", "market1501", "--src", "src", "--out", "out"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "train: 7 images / 4 ids" in proc.stdout
    sources = {
        s["meta"]["source"]
        for e in read_manifest(str(tmp_path / "out"))["splits"]["train"]["shards"]
        for s in iter_shard(e["name"], (tmp_path / "out" / e["name"]).read_bytes())
    }
    assert {"bounding_box_train/0007_c1s1_000001_00.jpeg", "bounding_box_train/0007_c2s1_000002_00.JPG"} <= sources
    raw = tmp_path / "Occluded_REID"
    for folder in ("occluded_body_images", "whole_body_images"):
        save_image(raw / folder / "001" / "001_01.tif", 1)
        (raw / folder / ".DS_Store").write_bytes(bytes(16))  # a file beside the person folders
        (raw / folder / "001" / "._001_01.tif").write_bytes(bytes(16))
    assert len(scan_layout("occluded_reid", str(raw))) == 2


def test_bad_keys_are_refused_before_any_shard_is_written(tmp_path: Path) -> None:
    samples = [sample(i) for i in range(4)] + [sample(i, "gallery") for i in range(3)]
    samples[-1] = Sample("gallery_a.b", samples[-1].jpg, 1, 0, "gallery", "x/a.b.jpg")
    with pytest.raises(ShardError, match=r"gallery_a\.b"):
        write_dataset(samples, str(tmp_path / "out"), dataset="generic")
    assert not list(tmp_path.glob("out/*.tar"))  # the train shards were not written first


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing_src", "no_images", "verify_missing", "verify_not_shards"])
def test_cli_user_errors_are_one_line_naming_the_culprit(tmp_path: Path, case: str) -> None:
    for sub in ("bounding_box_train", "query", "bounding_box_test"):
        (tmp_path / "empty" / sub).mkdir(parents=True)
    (tmp_path / "empty" / "query" / "._0001_c1s1_000001_00.jpg").write_bytes(bytes(8))  # hidden: not an image
    args, culprit = {
        "missing_src": (
            ["write", "--layout", "market1501", "--src", "nope"],
            f"--src {tmp_path / 'nope'}: no such folder",
        ),
        "no_images": (["write", "--layout", "market1501", "--src", "empty"], f"{tmp_path / 'empty'}': no images found"),
        "verify_missing": (["verify", "gone"], f"no such folder: {tmp_path / 'gone'}"),
        "verify_not_shards": (["verify", "empty"], f"{tmp_path / 'empty'} holds no index.json"),
    }[case]
    proc = run_shards(args, tmp_path)
    assert proc.returncode == 2
    (line,) = error_lines(proc)
    assert line.startswith("dpm-shards: error: ") and culprit in line, line
    assert not (tmp_path / "shards").exists()
    debug = run_shards(args, tmp_path, HYDRA_FULL_ERROR="1")
    assert debug.returncode != 0 and "Traceback" in debug.stderr


@pytest.mark.slow
def test_cli_verify_names_a_damaged_shard_in_one_line(tiny_shards: Path, tmp_path: Path) -> None:
    shutil.copytree(tiny_shards, tmp_path / "copy")
    name = read_manifest(str(tmp_path / "copy"))["splits"]["gallery"]["shards"][1]["name"]
    data = bytearray((tmp_path / "copy" / name).read_bytes())
    data[1500] ^= 0x01
    (tmp_path / "copy" / name).write_bytes(bytes(data))
    proc = run_shards(["verify", "copy"], tmp_path)
    assert proc.returncode == 1
    (line,) = error_lines(proc)
    assert f"shard {tmp_path / 'copy' / name}: sha256 mismatch" in line
    assert proc.stdout.strip() == f"{tmp_path / 'copy'}: 1 problem(s)"


def test_split_contiguous_covers_every_shard_once() -> None:
    counts = [5, 1, 7, 3, 3, 9, 2]
    for world in (1, 2, 3, 5, 9):
        parts = [split_contiguous(counts, r, world) for r in range(world)]
        flat = [i for p in parts for i in p]
        assert flat == list(range(len(counts)))  # contiguous, in order, exactly once
    assert split_contiguous([4], 1, 2) == []
