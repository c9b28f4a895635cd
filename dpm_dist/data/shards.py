"""The shard format: writing, reading, verifying (see ``shards/README.md`` for the schema).

A dataset is a folder (or URL prefix) holding ``index.json`` and tar shards ``{role}-{i:05d}.tar`` of
``{key}.jpg`` + ``{key}.json`` members. Shards are written with :func:`dpm_dist.fsio.atomic_path` (a
temporary name, fsynced and renamed), so a crash never leaves a complete-looking half shard; ``index.json``
is written last the same way.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageFile

from dpm_dist.data.layouts import SPLITS, Record, relabel
from dpm_dist.data.storage import IOOptions, StorageError, join_url, read_bytes
from dpm_dist.fsio import atomic_path, write_bytes_atomic

FORMAT = "dpm-shards/1"
MANIFEST = "index.json"


class ShardError(ValueError):
    """Bad shard content: the message names the shard and, where known, the sample key."""


@dataclass(frozen=True)
class Sample:
    """One encoded sample ready to be written."""

    key: str
    jpg: bytes
    pid: int
    camid: int
    role: str
    source: str


class CorruptImageError(ValueError):
    """A source image that does not decode; ``path`` is the file, ``reason`` what the decoder said."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"file {path!r}: cannot decode image ({reason})")
        self.path, self.reason = path, reason


@contextmanager
def _strict_decoding() -> Iterator[None]:
    """PIL's global ``LOAD_TRUNCATED_IMAGES`` (set by some libraries) would pad a cut-off JPEG with grey."""
    saved, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved


def encode_jpeg(path: str, quality: int = 95) -> bytes:
    """JPEG bytes of an image file, decoded first so a corrupt file never reaches a shard: JPEGs are
    copied unchanged, other formats are re-encoded. Raises :class:`CorruptImageError` naming the file."""
    with open(path, "rb") as f:
        data = f.read()
    is_jpeg = data[:3] == b"\xff\xd8\xff"
    try:
        with _strict_decoding(), Image.open(io.BytesIO(data)) as img:
            if is_jpeg:  # draft (1/8-scale DCT) still reads every entropy-coded byte, so truncation is caught
                img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
                img.load()
                return data
            out = io.BytesIO()
            img.convert("RGB").save(out, format="JPEG", quality=quality)
            return out.getvalue()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:  # what PIL's decoders raise
        raise CorruptImageError(path, str(exc) or type(exc).__name__) from exc


def samples_from_records(records: Iterable[Record], skipped: list[dict[str, str]] | None = None) -> Iterator[Sample]:
    """Encoded samples; with a ``skipped`` list, a corrupt image is appended there (``{"path", "reason"}``,
    path relative to the dataset folder) instead of raising. A missing or unreadable file always raises."""
    for rec in records:
        try:
            jpg = encode_jpeg(rec.path)
        except CorruptImageError as exc:
            if skipped is None:
                raise
            skipped.append({"path": rec.source, "reason": exc.reason})
            continue
        yield Sample(rec.key, jpg, rec.pid, rec.camid, rec.role, rec.source)


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # mtime 0: byte-identical reruns
    tar.addfile(info, io.BytesIO(data))


def file_sha256(path: str, *, sync: bool = False) -> str:
    """The sha256 of a file (hex); ``sync``: fsync it first (on disk before a manifest vouches for it)."""
    with open(path, "rb") as f:
        if sync:
            os.fsync(f.fileno())
        return hashlib.file_digest(f, "sha256").hexdigest()


def check_keys(samples: Sequence[Sample]) -> None:
    """Refuse bad or duplicate sample keys before anything is written (a key becomes a tar member name)."""
    for s in samples:
        if "." in s.key or "/" in s.key:
            raise ShardError(f"sample key {s.key!r} (file {s.source!r}) must not contain '.' or '/'")
    keys = Counter(s.key for s in samples)
    dupes = [k for k, n in keys.items() if n > 1]
    if dupes:
        raise ShardError(f"duplicate sample keys, e.g. {dupes[0]!r}")


def write_shards(
    samples: Sequence[Sample], out_dir: str, prefix: str, *, labels: dict[int, int], max_count: int, max_bytes: int
) -> list[dict[str, Any]]:
    """Write ``samples`` into ``{prefix}-%05d.tar`` shards; each closes at ``max_count`` samples or ``max_bytes``."""
    check_keys(samples)
    entries: list[dict[str, Any]] = []
    batch: list[Sample] = []

    def flush() -> None:
        name = f"{prefix}-{len(entries):05d}.tar"
        path = os.path.join(out_dir, name)

        with (
            atomic_path(path) as tmp,
            open(tmp, "wb") as f,
            tarfile.open(fileobj=f, mode="w", format=tarfile.GNU_FORMAT) as tar,
        ):
            for s in batch:
                meta = {
                    "pid": s.pid,
                    "label": labels.get(s.pid, -1),
                    "camid": s.camid,
                    "split": "train" if s.role == "train" else "test",
                    "role": s.role,
                    "source": s.source,
                }
                _add_member(tar, f"{s.key}.jpg", s.jpg)
                _add_member(tar, f"{s.key}.json", json.dumps(meta, sort_keys=True).encode())
        entries.append(
            {"name": name, "num_samples": len(batch), "num_bytes": os.path.getsize(path), "sha256": file_sha256(path)}
        )
        batch.clear()

    size = 0
    for sample in samples:
        batch.append(sample)
        size += len(sample.jpg) + 1536  # two tar headers + json
        if len(batch) >= max_count or size >= max_bytes:
            flush()
            size = 0
    if batch:
        flush()
    return entries


def _split_stats(samples: Sequence[Sample]) -> dict[str, Any]:
    cams = Counter(s.camid for s in samples)
    return {
        "num_samples": len(samples),
        "num_ids": len({s.pid for s in samples}),
        "cams": {str(c): cams[c] for c in sorted(cams)},
    }


def write_dataset(
    samples: Iterable[Sample],
    out_dir: str,
    *,
    dataset: str,
    max_count: int = 1000,
    max_bytes: int = 64 << 20,
    seed: int = 0,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write train/query/gallery shards and ``index.json`` into ``out_dir``; returns the manifest.

    Training samples are shuffled (seeded) so identities spread over shards, which the stream sampler
    needs; query and gallery keep key order. Samples are held in memory: ReID sets are a few GB at most.
    """
    by_role: dict[str, list[Sample]] = {role: [] for role in SPLITS}
    for s in samples:
        if s.role not in by_role:
            raise ShardError(f"file {s.source!r}: unknown role {s.role!r}")
        by_role[s.role].append(s)
    check_keys([s for group in by_role.values() for s in group])
    labels = relabel([s.pid for s in by_role["train"]])
    for group in by_role.values():
        group.sort(key=lambda s: s.key)  # the same shards whatever order the files were listed in
    random.Random(seed).shuffle(by_role["train"])
    os.makedirs(out_dir, exist_ok=True)
    splits = {}
    for role, group in by_role.items():
        if group:
            shards = write_shards(group, out_dir, role, labels=labels, max_count=max_count, max_bytes=max_bytes)
            splits[role] = {"shards": shards, **_split_stats(group)}
    all_cams = [s.camid for group in by_role.values() for s in group]
    manifest = {
        "format": FORMAT,
        "dataset": dataset,
        "splits": splits,
        "num_train_ids": len(labels),
        "num_cams": max(all_cams) + 1 if all_cams else 0,
        "relabel": {str(pid): label for pid, label in labels.items()},
        "train_label_counts": [n for _, n in sorted(Counter(labels[s.pid] for s in by_role["train"]).items())],
        **(extra or {}),
    }
    write_bytes_atomic(os.path.join(out_dir, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True).encode())
    return manifest


def write_records(
    records: Sequence[Record], out_dir: str, *, dataset: str, skip_corrupt: bool = False, **kwargs: Any
) -> dict[str, Any]:
    """:func:`write_dataset` over files found by :func:`dpm_dist.data.layouts.scan_layout`. Every image is
    decoded first (nothing is written if one fails); with ``skip_corrupt`` undecodable ones are left out and
    listed in the manifest's ``skipped`` (``num_skipped`` counts them)."""
    skipped: list[dict[str, str]] = []
    samples = list(samples_from_records(records, skipped if skip_corrupt else None))
    if not samples:
        raise ValueError(f"no decodable images among the {len(records)} files found ({len(skipped)} corrupt)")
    extra = {**(kwargs.pop("extra", None) or {}), "skipped": skipped, "num_skipped": len(skipped)}
    return write_dataset(samples, out_dir, dataset=dataset, extra=extra, **kwargs)


# ---- reading


def read_manifest(root: str, opts: IOOptions = IOOptions()) -> dict[str, Any]:
    url = join_url(root, MANIFEST)
    try:
        manifest = json.loads(read_bytes(url, opts))
    except json.JSONDecodeError as exc:
        raise ShardError(f"manifest {url}: not valid JSON ({exc})") from exc
    if manifest.get("format") != FORMAT:
        raise ShardError(f"manifest {url}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def shard_entries(manifest: dict[str, Any], role: str) -> list[dict[str, Any]]:
    return list(manifest["splits"].get(role, {}).get("shards", []))


def fetch_shard(url: str, entry: dict[str, Any] | None, opts: IOOptions) -> bytes:
    """The shard's bytes, checked against its manifest entry (size, then sha256) when one is given."""
    data = read_bytes(url, opts)
    if entry is not None:
        if len(data) != entry["num_bytes"]:
            what = "truncated" if len(data) < entry["num_bytes"] else "longer than recorded"
            raise ShardError(f"shard {url}: {what}: {len(data)} bytes, index.json says {entry['num_bytes']}")
        sha = hashlib.sha256(data).hexdigest()
        if sha != entry["sha256"]:
            raise ShardError(f"shard {url}: sha256 mismatch: {sha} != {entry['sha256']} from index.json")
    return data


def tar_members(url: str, fileobj: Any, size: int) -> list[tarfile.TarInfo]:
    """Members of a complete tar; a cut-off archive (even at a member boundary, which ``tarfile``
    accepts silently) is a :class:`ShardError` naming the shard."""
    try:
        with tarfile.open(fileobj=fileobj, mode="r:") as tar:
            members = tar.getmembers()
    except (tarfile.TarError, EOFError) as exc:
        raise ShardError(f"shard {url}: truncated or corrupt tar ({exc})") from exc
    end = max(((m.offset_data + m.size + 511) // 512 * 512 for m in members), default=0)
    if size < end + 1024:  # a finished tar ends with two zero blocks after the last member
        raise ShardError(f"shard {url}: truncated tar: {size} bytes, members and end marker need {end + 1024}")
    return members


def iter_shard(url: str, data: bytes) -> Iterator[dict[str, Any]]:
    """``{"key", "jpg", "meta", "url"}`` for each sample of a shard held in memory."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    tar_members(url, io.BytesIO(data), len(data))
    source = [{"url": url, "stream": io.BytesIO(data)}]
    try:
        for raw in group_by_keys(tar_file_expander(source)):
            key = raw["__key__"]
            if "jpg" not in raw or "json" not in raw:
                raise ShardError(f"shard {url}: sample {key!r} lacks .jpg or .json (has {sorted(raw)})")
            try:
                meta = json.loads(raw["json"])
            except json.JSONDecodeError as exc:
                raise ShardError(f"shard {url}: sample {key!r}: bad json ({exc})") from exc
            yield {"key": key, "jpg": raw["jpg"], "meta": meta, "url": url}
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ShardError(f"shard {url}: truncated or corrupt tar ({exc.args[0] if exc.args else exc})") from exc


def decode_image(data: bytes, *, url: str, key: str) -> Image.Image:
    """RGB image of a sample; a corrupt or truncated JPEG is a :class:`ShardError` naming shard and key."""
    try:
        with _strict_decoding(), Image.open(io.BytesIO(data)) as img:
            return img.convert("RGB")
    except Exception as exc:
        raise ShardError(f"shard {url}: sample {key!r}: corrupt image ({exc})") from exc


def verify(root: str, opts: IOOptions = IOOptions()) -> list[str]:
    """Problems found in the dataset at ``root`` (empty when it is sound): counts, sha256, every image."""
    manifest = read_manifest(root, opts)
    problems: list[str] = []
    for role, split in manifest["splits"].items():
        total, pids, cams, unreadable = 0, set(), Counter(), False
        for entry in split["shards"]:
            url = join_url(root, entry["name"])
            try:
                count = 0
                for sample in iter_shard(url, fetch_shard(url, entry, opts)):
                    count += 1
                    pids.add(sample["meta"]["pid"])
                    cams[sample["meta"]["camid"]] += 1
                    try:
                        decode_image(sample["jpg"], url=url, key=sample["key"]).load()
                    except ShardError as exc:
                        problems.append(str(exc))
                if count != entry["num_samples"]:
                    problems.append(f"shard {url}: {count} samples, index.json says {entry['num_samples']}")
                total += count
            except (ShardError, StorageError) as exc:
                problems.append(str(exc))
                unreadable = True
        if unreadable:
            continue  # the split's totals are off by that shard: one line per damaged shard, not two
        if total != split["num_samples"] or len(pids) != split["num_ids"]:
            problems.append(
                f"split {role}: {total} samples / {len(pids)} ids, index.json says "
                f"{split['num_samples']} / {split['num_ids']}"
            )
        if {str(c): n for c, n in sorted(cams.items())} != split["cams"]:
            problems.append(f"split {role}: camera counts {dict(cams)} differ from index.json {split['cams']}")
    return problems


# ---- assignment of shards to ranks and workers (pure)


def split_contiguous(counts: Sequence[int], rank: int, world_size: int) -> list[int]:
    """Shard indices of ``rank``: a contiguous run, balanced by sample count; every shard exactly once."""
    total, start, mine = sum(counts), 0, []
    for i, n in enumerate(counts):
        # a shard belongs to the rank whose share holds the shard's first sample
        if start * world_size // max(total, 1) == rank if total else i % world_size == rank:
            mine.append(i)
        start += n
    return mine
