"""The synthetic occluded-person dataset: deterministic, sized by its flags, folder == shards."""

from __future__ import annotations

import hashlib
import io
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

from dpm_dist.cli.shards import main as shards_main
from dpm_dist.data.layouts import parse_market_name, scan_layout
from dpm_dist.data.shards import read_manifest, verify, write_records
from dpm_dist.data.synth import SynthSpec, synth_samples, write_synthetic_shards

SMALL = dict(num_ids=4, num_test_ids=3, images_per_id=5, query_per_id=2, gallery_per_id=4, height=32, width=16)


def shard_digest(root: Path) -> str:
    return hashlib.sha256(b"".join((p.name.encode() + p.read_bytes()) for p in sorted(root.iterdir()))).hexdigest()


def test_synth_is_deterministic_by_seed(tmp_path: Path) -> None:
    a = write_synthetic_shards(str(tmp_path / "a"), seed=1, max_count=5, **SMALL)
    b = write_synthetic_shards(str(tmp_path / "b"), seed=1, max_count=5, **SMALL)
    c = write_synthetic_shards(str(tmp_path / "c"), seed=2, max_count=5, **SMALL)
    assert shard_digest(Path(a)) == shard_digest(Path(b)) != shard_digest(Path(c))
    assert verify(a) == []


def test_synth_splits_cameras_and_occlusion(tmp_path: Path) -> None:
    spec = SynthSpec(seed=0, **SMALL)
    samples = list(synth_samples(spec))
    by_role = defaultdict(list)
    for s in samples:
        by_role[s.role].append(s)
        assert parse_market_name(s.source) == (s.pid, s.camid)  # Market-style names agree with the labels
        assert Image.open(io.BytesIO(s.jpg)).size == (16, 32)
    assert len(by_role["train"]) == 4 * 5 and len(by_role["query"]) == 3 * 2 and len(by_role["gallery"]) == 3 * 4
    assert {s.pid for s in by_role["train"]}.isdisjoint({s.pid for s in by_role["query"]})
    for pid in {s.pid for s in by_role["train"]}:
        assert len({s.camid for s in by_role["train"] if s.pid == pid}) >= 2
    for q in by_role["query"]:  # each query has a true match from another camera in the gallery
        assert any(g.pid == q.pid and g.camid != q.camid for g in by_role["gallery"])


def test_identities_differ_more_than_views_of_one_identity() -> None:
    """Learnability proxy: the mean colour of the central torso is closer within an id than across ids."""
    spec = SynthSpec(seed=0, num_ids=12, num_test_ids=0, images_per_id=8, train_occluded=0.0, height=128, width=64)
    feats = defaultdict(list)
    for s in synth_samples(spec):
        pixels = np.asarray(Image.open(io.BytesIO(s.jpg)), dtype=np.float32)
        feats[s.pid].append(pixels[40:70, 26:38].reshape(-1, 3).mean(0))
    centres = {pid: np.mean(v, 0) for pid, v in feats.items()}
    within = np.mean([np.linalg.norm(f - centres[pid]) for pid, v in feats.items() for f in v])
    across = np.mean([np.linalg.norm(centres[a] - centres[b]) for a in centres for b in centres if a < b])
    assert across > 2 * within


def test_synth_folder_then_write_equals_direct_shards(tmp_path: Path) -> None:
    args = [
        "--num-ids",
        "4",
        "--num-test-ids",
        "3",
        "--images-per-id",
        "5",
        "--height",
        "32",
        "--width",
        "16",
        "--max-count",
        "7",
        "--seed",
        "4",
    ]
    assert shards_main(["synth", "--out", str(tmp_path / "direct"), "--folder", str(tmp_path / "folder")] + args) == 0
    write_records(
        scan_layout("synthetic", str(tmp_path / "folder")),
        str(tmp_path / "written"),
        dataset="synthetic",
        max_count=7,
        seed=4,
    )
    direct, written = read_manifest(str(tmp_path / "direct")), read_manifest(str(tmp_path / "written"))
    assert direct["splits"] == written["splits"] and direct["relabel"] == written["relabel"]
    counts = Counter(n.split("-")[0] for n in (p.name for p in (tmp_path / "direct").glob("*.tar")))
    assert counts == {"train": 3, "query": 1, "gallery": 3}
