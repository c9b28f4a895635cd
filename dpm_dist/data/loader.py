"""Train and eval batches from shards on disk, HTTP(S) or S3. The only module building webdataset pipelines.

Train, ``data.sampler=stream``: each (rank, worker) resamples shards with its own seeded RNG (seed,
epoch, rank, worker), expands them to samples and forms P×K batches in a bounded buffer
(:func:`dpm_dist.data.sampling.pk_batches`); the loader stops after :func:`num_train_batches`, the same
count on every rank. Decoding and augmentation run in the DataLoader workers.

Train, ``data.sampler=exact``: the official per-epoch sampler (docs/method.md §5.5) over every training sample,
seeded by (seed, epoch) identically on all ranks, dealt to ranks as in docs/method.md §5.6; shards are read
through a local copy (remote shards are cached under ``data.cache_dir``) with random access.

Eval: query/gallery shards split contiguously over ranks by sample count, then over workers; each
sample is read exactly once, with no padding.

Many datasets (``data.roots``): the training set is their union, labels and cameras shifted per dataset
(:class:`Part`) so they never collide, keys prefixed ``<dataset>/``; ``data.root_weights`` shares the P×K
chunks between them. Each dataset is evaluated on its own query/gallery (``build_eval_loader(..., dataset=)``).
"""

from __future__ import annotations

import bisect
import hashlib
import io
import json
import logging
import os
import random
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from dpm_dist.config import DataConfig
from dpm_dist.data.sampling import (
    chunk_targets,
    official_pk_indices,
    pk_batches,
    rank_batches,
    stream_seed,
    weighted_pk_indices,
)
from dpm_dist.data.shards import (
    ShardError,
    decode_image,
    fetch_shard,
    iter_shard,
    read_manifest,
    shard_entries,
    split_contiguous,
    tar_members,
)
from dpm_dist.data.storage import IOOptions, is_remote, join_url, local_path
from dpm_dist.data.transforms import eval_transform, train_transform
from dpm_dist.data.union import Part, chunks_per_dataset, offset_parts, records, union_manifest
from dpm_dist.dist import DistEnv

log = logging.getLogger(__name__)
Shard = tuple[str, dict[str, Any] | None, Part]  # (url, index.json entry or None, its dataset)


def io_options(cfg: DataConfig) -> IOOptions:
    return IOOptions(
        s3_endpoint=cfg.s3_endpoint, retries=cfg.io_retries, backoff_s=cfg.io_backoff_s, timeout_s=cfg.io_timeout_s
    )


def _train_root(cfg: DataConfig) -> str:
    if cfg.root:
        return cfg.root
    if cfg.train_urls:
        return cfg.train_urls[0].rsplit("/", 1)[0] if "/" in cfg.train_urls[0] else "."
    raise ValueError(
        "config field `data.root`: set it (folder or URL holding index.json), `data.train_urls`, "
        "or `data.roots` (many datasets)"
    )


def _parts(cfg: DataConfig) -> list[tuple[Part, dict[str, Any]]]:
    """Each training dataset with its index.json; one :class:`Part` without shifts unless ``data.roots`` has several."""
    opts = io_options(cfg)
    if len(cfg.roots) <= 1:
        root = cfg.roots[0] if cfg.roots else _train_root(cfg)
        return [(Part(root), read_manifest(root, opts))]
    return offset_parts(list(cfg.roots), [read_manifest(root, opts) for root in cfg.roots])


def _merge(cfg: DataConfig, parts: list[tuple[Part, dict[str, Any]]]) -> dict[str, Any]:
    if len(parts) == 1:
        manifest = parts[0][1]
        if cfg.eval_root:
            other = read_manifest(cfg.eval_root, io_options(cfg))
            manifest = {**manifest, "num_cams": max(manifest["num_cams"], other["num_cams"])}
        return {**manifest, "datasets": records(parts, [])}
    return union_manifest(parts, list(cfg.root_weights))


def load_manifest(cfg: DataConfig) -> dict[str, Any]:
    """``index.json`` of the training data, with ``num_cams`` covering ``data.eval_root``'s cameras too, and a
    ``datasets`` list (:func:`dpm_dist.data.union.records`). With several ``data.roots``: their union (identity and camera
    counts summed, label counts in order), ``dataset`` their common layout or ``generic``."""
    return _merge(cfg, _parts(cfg))


def _shards(cfg: DataConfig, role: str, root: str, manifest: dict[str, Any], part: Part | None = None) -> list[Shard]:
    entries, part = shard_entries(manifest, role), part or Part(root)
    explicit = {"train": cfg.train_urls, "query": cfg.query_urls, "gallery": cfg.gallery_urls}[role]
    if not explicit:
        return [(join_url(root, e["name"]), e if cfg.verify_sha else None, part) for e in entries]
    by_name = {e["name"]: e for e in entries}
    return [(url, by_name.get(url.rsplit("/", 1)[-1]) if cfg.verify_sha else None, part) for url in explicit]


def num_train_batches(cfg: DataConfig, world_size: int, manifest: dict[str, Any] | None = None) -> int:
    """Batches per epoch on every rank. Stream: ``data.batches_per_epoch`` or samples / (P·K·W).

    Exact: an upper bound (the official ``__len__`` estimate / W); ``len()`` of the epoch's loader is exact.
    """
    manifest = manifest or load_manifest(cfg)
    if cfg.sampler == "stream":
        if cfg.batches_per_epoch:
            return cfg.batches_per_epoch
        return max(1, manifest["splits"]["train"]["num_samples"] // (cfg.batch_size * world_size))
    chunks = chunks_per_dataset(manifest, cfg.num_instances)
    if cfg.root_weights and len(chunks) > 1:
        chunks = chunk_targets(chunks, cfg.root_weights)
    return sum(chunks) // cfg.num_ids // world_size


# ---- per-sample work, shared by both train modes (runs in the workers)


def _train_item(
    jpg: bytes, meta: dict[str, Any], key: str, url: str, gen: torch.Generator, cfg: DataConfig
) -> dict[str, Any]:
    item = {"label": int(meta["label"]), "camid": int(meta["camid"]), "key": key, "image": None}
    try:
        img = decode_image(jpg, url=url, key=key)
    except ShardError as exc:
        if not cfg.skip_corrupt:
            raise
        _count_corrupt(exc)
        return item
    item["image"] = train_transform(
        img,
        gen,
        size=cfg.img_size,
        flip_prob=cfg.flip_prob,
        padding=cfg.padding,
        erase_prob=cfg.erase_prob,
        jitter=cfg.color_jitter,
    )
    return item


_NUM_CORRUPT = [0]
_CORRUPT_KEYS: set[str] = set()  # distinct (shard URL, key) pairs skipped in this process


def _count_corrupt(exc: Exception, where: tuple[str, str] | None = None) -> None:
    _NUM_CORRUPT[0] += 1
    if where is not None:
        _CORRUPT_KEYS.add(where)
    log.warning("skipping corrupt sample (%d so far in this process): %s", _NUM_CORRUPT[0], exc)


def _collate_train(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack a P×K batch; a skipped corrupt image (exact mode) is replaced by another image of its identity.

    ``num_skipped`` counts the corrupt samples skipped to make this batch (the loop adds them up: the
    workers' own counters never reach the main process)."""
    num_skipped = sum(item["image"] is None for item in items)
    for i, item in enumerate(items):
        if item["image"] is None:
            donors = [d for d in items if d["label"] == item["label"] and d["image"] is not None]
            if not donors:
                raise ShardError(f"sample {item['key']!r}: every image of its identity in the batch is corrupt")
            items[i] = {**donors[0], "image": donors[0]["image"].clone()}
    return {
        "images": torch.stack([it["image"] for it in items]),
        "pids": torch.tensor([it["label"] for it in items], dtype=torch.long),
        "camids": torch.tensor([it["camid"] for it in items], dtype=torch.long),
        "keys": [it["key"] for it in items],
        "num_skipped": num_skipped,
    }


# ---- stream mode


class _ResampledShards:
    """First pipeline stage: an endless, seeded draw of shards for this (rank, worker).

    Without ``weights`` every shard is equally likely (one dataset, or the union drawn as one). With them
    (one per dataset) a dataset is drawn first, then one of its shards: dataset d with probability
    proportional to w_d · shards_d / images_d, so the expected share of samples read from d is w_d.
    """

    def __init__(
        self,
        shards: list[Shard],
        seed_of: Callable[[], int],
        weights: list[float] | None = None,
        images: list[int] | None = None,
    ) -> None:
        self.shards, self.seed_of = shards, seed_of
        self.groups: list[list[int]] = []
        self.cumulative: list[float] = []
        if weights:
            names = list(dict.fromkeys(part.name for _, _, part in shards))
            self.groups = [[i for i, (_, _, part) in enumerate(shards) if part.name == name] for name in names]
            odds = [w * len(g) / max(n, 1) for w, g, n in zip(weights, self.groups, images or [])]
            self.cumulative = list(np.cumsum(odds) / sum(odds))

    def _draw(self, rng: random.Random) -> int:
        if not self.groups:
            return rng.randrange(len(self.shards))
        group = self.groups[min(bisect.bisect_right(self.cumulative, rng.random()), len(self.groups) - 1)]
        return group[rng.randrange(len(group))]

    def __call__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, seed = (info.id if info is not None else 0), self.seed_of()
        rng = random.Random(stream_seed(seed, worker))
        while True:
            url, entry, part = self.shards[self._draw(rng)]
            yield {"url": url, "entry": entry, "part": part, "seed": stream_seed(seed, worker, rng.getrandbits(62))}


def _decodes(sample: dict[str, Any]) -> bool:
    """Whether the image decodes; JPEG draft mode (1/8 scale) makes the check cheap but still reads it all."""
    try:
        with Image.open(io.BytesIO(sample["jpg"])) as img:
            img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
            img.load()
        return True
    except Exception as exc:
        _count_corrupt(
            ShardError(f"shard {sample['url']}: sample {sample['key']!r}: corrupt image ({exc})"),
            (sample["url"], sample["key"]),
        )
        return False


def _in_union(sample: dict[str, Any], part: Part) -> dict[str, Any]:
    key, meta = part.apply(sample["key"], sample["meta"])
    return {**sample, "key": key, "meta": meta}


def _expand(sources: Iterable[dict[str, Any]], opts: IOOptions, skip_corrupt: bool) -> Iterator[dict[str, Any]]:
    """Samples of each shard in a seeded order; with ``skip_corrupt`` undecodable ones are dropped here,
    before batching, so batches stay exactly P×K."""
    for src in sources:
        samples = [
            _in_union(s, src["part"]) for s in iter_shard(src["url"], fetch_shard(src["url"], src["entry"], opts))
        ]
        random.Random(src["seed"]).shuffle(samples)
        yield from (s for s in samples if not skip_corrupt or _decodes(s))


def _augment_batches(batches: Iterable[list[dict[str, Any]]], cfg: DataConfig, seed: int) -> Iterator[dict[str, Any]]:
    info = get_worker_info()
    worker = info.id if info is not None else 0
    seen = _NUM_CORRUPT[0]
    for number, batch in enumerate(batches):
        dropped = _NUM_CORRUPT[0] - seen  # skipped by _expand while this batch was being formed
        gen = torch.Generator().manual_seed(stream_seed(seed, worker, number))
        out = _collate_train([_train_item(s["jpg"], s["meta"], s["key"], s["url"], gen, cfg) for s in batch])
        out["num_skipped"] += dropped
        seen = _NUM_CORRUPT[0]
        yield out


class _Epoch:
    """``n`` batches of an endless loader; ``len()`` is ``n``."""

    def __init__(self, loader: Iterable[dict[str, Any]], n: int) -> None:
        self.loader, self.n = loader, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return islice(iter(self.loader), self.n)


def _stream_pipeline(
    cfg: DataConfig,
    env: DistEnv,
    shards: list[Shard],
    seed_of: Callable[[], int],
    num_samples: int,
    datasets: list[dict[str, Any]],
) -> Any:
    """The endless stream of P×K batches; ``seed_of()`` (the epoch's seed) is read each time it is iterated."""
    import webdataset as wds

    if len(shards) < env.world_size * max(1, cfg.num_workers):
        raise ValueError(
            f"{len(shards)} training shards for {env.world_size} ranks × {max(1, cfg.num_workers)} "
            "workers: write more, smaller shards (dpm-shards write --max-count) or lower data.num_workers"
        )
    # At most half the training set is buffered: a buffer holding nearly every sample could only refill
    # by re-drawing the few samples a batch released (about 34 reads per image measured; half: ~1).
    opts, buffer = io_options(cfg), max(cfg.batch_size, min(cfg.shuffle_buffer, num_samples // 2))
    weights = (
        (list(cfg.root_weights), [d["num_images"] for d in datasets]) if cfg.root_weights and len(datasets) > 1 else ()
    )
    return wds.DataPipeline(
        _ResampledShards(shards, seed_of, *weights),
        lambda src: _expand(src, opts, cfg.skip_corrupt),
        lambda samples: pk_batches(
            samples,
            label=lambda s: s["meta"]["label"],
            num_ids=cfg.num_ids,
            num_instances=cfg.num_instances,
            buffer_size=buffer,
            rng=random.Random(stream_seed(seed_of(), _worker_id())),
            key=lambda s: s["key"],
            num_distinct=lambda: num_samples - len(_CORRUPT_KEYS),
        ),
        lambda batches: _augment_batches(batches, cfg, seed_of()),
    )


def _stream_loader(
    cfg: DataConfig,
    env: DistEnv,
    shards: list[Shard],
    seed: int,
    n: int,
    num_samples: int,
    datasets: list[dict[str, Any]],
) -> _Epoch:
    pipeline = _stream_pipeline(cfg, env, shards, lambda: seed, num_samples, datasets)
    loader = DataLoader(
        pipeline,
        batch_size=None,
        num_workers=cfg.num_workers,
        pin_memory=cfg.pin_memory,
        persistent_workers=False,
        prefetch_factor=2 if cfg.num_workers else None,
    )
    return _Epoch(loader, n)


def _worker_id() -> int:
    info = get_worker_info()
    return info.id if info is not None else 0


# ---- exact mode


_INDEX_CACHE: dict[tuple[str, ...], list[tuple[str, int, int, str, dict[str, Any]]]] = {}


def _local_copy(url: str, entry: dict[str, Any] | None, cfg: DataConfig) -> str:
    """A local path for the shard: itself when local (checked once), else a sha-named cached download."""
    if not is_remote(url):
        if entry is not None:
            fetch_shard(url, entry, io_options(cfg))
        return local_path(url)
    cache = os.path.expanduser(cfg.cache_dir or "~/.cache/dpm-dist/shards")
    name = entry["sha256"] if entry else hashlib.sha256(url.encode()).hexdigest()
    path = os.path.join(cache, f"{name}.tar")
    if not (os.path.exists(path) and (entry is None or os.path.getsize(path) == entry["num_bytes"])):
        os.makedirs(cache, exist_ok=True)
        data = fetch_shard(url, entry, io_options(cfg))
        tmp = f"{path}.tmp.{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    return path


def _index_shards(cfg: DataConfig, shards: list[Shard]) -> list[tuple[str, int, int, str, dict[str, Any]]]:
    """(path, jpg offset, jpg size, key, meta) of every training sample, in shard order."""
    ident = tuple((u, part) for u, _, part in shards)
    if ident in _INDEX_CACHE:
        return _INDEX_CACHE[ident]
    index = []
    for url, entry, part in shards:
        path = _local_copy(url, entry, cfg)
        jpgs, metas = {}, {}
        with open(path, "rb") as f:
            for member in tar_members(url, f, os.path.getsize(path)):
                key, _, ext = member.name.partition(".")
                if ext == "jpg":
                    jpgs[key] = (member.offset_data, member.size)
                elif ext == "json":
                    f.seek(member.offset_data)
                    metas[key] = json.loads(f.read(member.size))
        for key in list(jpgs) + [k for k in metas if k not in jpgs]:
            if key not in jpgs or key not in metas:
                raise ShardError(f"shard {url}: sample {key!r} lacks .jpg or .json")
            index.append((path, *jpgs[key], *part.apply(key, metas[key])))
    _INDEX_CACHE[ident] = index
    return index


class _IndexedTrain(Dataset):
    """Random access to training samples; items are ``(index, augmentation seed)`` pairs."""

    def __init__(self, index: list[tuple[str, int, int, str, dict[str, Any]]], cfg: DataConfig) -> None:
        self.index, self.cfg = index, cfg

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item: tuple[int, int]) -> dict[str, Any]:
        path, offset, size, key, meta = self.index[item[0]]
        with open(path, "rb") as f:
            f.seek(offset)
            jpg = f.read(size)
        return _train_item(jpg, meta, key, path, torch.Generator().manual_seed(item[1]), self.cfg)


def _exact_batches(
    cfg: DataConfig,
    env: DistEnv,
    index: list[tuple[str, int, int, str, dict[str, Any]]],
    seed: int,
    epoch: int,
    datasets: list[dict[str, Any]],
) -> list[list[tuple[int, int]]]:
    """This rank's batches of the epoch: (sample index, augmentation seed) pairs."""
    shared = stream_seed(seed, epoch)  # the same on every rank, as rank 0's seed is in docs/method.md §5.6
    labels = [m["label"] for *_, m in index]
    rngs = (random.Random(shared), np.random.RandomState(shared % 2**32))
    if cfg.root_weights and len(datasets) > 1:
        starts = [d["id_offset"] for d in datasets]
        groups = [bisect.bisect_right(starts, label) - 1 for label in labels]
        flat = weighted_pk_indices(labels, groups, list(cfg.root_weights), cfg.num_ids, cfg.num_instances, *rngs)
    else:  # one dataset, or the union sampled as one: the official sampler
        flat = official_pk_indices(labels, cfg.num_ids, cfg.num_instances, *rngs)
    batches = rank_batches(flat, cfg.batch_size, env.rank, env.world_size)
    if not batches:
        raise ValueError(
            f"exact sampler: an epoch of {len(flat)} samples gives no {cfg.num_ids}×{cfg.num_instances} "
            f"batch for each of {env.world_size} ranks; lower data.num_ids or the world size"
        )
    return [[(i, stream_seed(shared, env.rank, b, j)) for j, i in enumerate(batch)] for b, batch in enumerate(batches)]


def _exact_loader(
    cfg: DataConfig, env: DistEnv, shards: list[Shard], seed: int, epoch: int, datasets: list[dict[str, Any]]
) -> DataLoader:
    index = _index_shards(cfg, shards)
    return DataLoader(
        _IndexedTrain(index, cfg),
        batch_sampler=_exact_batches(cfg, env, index, seed, epoch, datasets),
        num_workers=cfg.num_workers,
        collate_fn=_collate_train,
        pin_memory=cfg.pin_memory,
    )


def _train_shards(cfg: DataConfig) -> tuple[list[Shard], dict[str, Any]]:
    """Every training shard of every dataset, and the (merged) manifest; checks P against the identities."""
    parts = _parts(cfg)
    manifest = _merge(cfg, parts)
    shards: list[Shard] = []
    for part, part_manifest in parts:
        mine = _shards(cfg, "train", part.root, part_manifest, part)
        if not mine:
            raise ValueError(f"no training shards in {part.root} (index.json has no train split)")
        shards += mine
    where = parts[0][0].root if len(parts) == 1 else f"the union of data.roots ({len(parts)} datasets)"
    if manifest["num_train_ids"] < cfg.num_ids:
        raise ValueError(
            f"config field `data.num_ids`: P={cfg.num_ids} but the training set {where} has only "
            f"{manifest['num_train_ids']} identities"
        )
    return shards, manifest


def build_train_loader(cfg: DataConfig, env: DistEnv, *, epoch: int, seed: int) -> Iterable[dict[str, Any]]:
    """One epoch of P×K batches for ``env.rank``; every rank gets the same number of batches.

    Batches are dicts: ``images`` (B, 3, H, W) in [-1, 1], ``pids`` (relabelled 0..C-1), ``camids``, ``keys``.
    Deterministic given (seed, epoch, rank, num_workers); resuming at epoch e rebuilds the same stream.
    """
    shards, manifest = _train_shards(cfg)
    if cfg.sampler == "exact":
        return _exact_loader(cfg, env, shards, seed, epoch, manifest["datasets"])
    stream = stream_seed(seed, epoch, env.rank)
    return _stream_loader(
        cfg,
        env,
        shards,
        stream,
        num_train_batches(cfg, env.world_size, manifest),
        manifest["splits"]["train"]["num_samples"],
        manifest["datasets"],
    )


class _EpochBatches:
    """A batch sampler whose batches are replaced each epoch (a DataLoader's sampler cannot be)."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[int, int]]] = []

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return iter(self.batches)


class _PersistentEpoch:
    """One epoch of a DataLoader whose workers outlive it; ``len()`` is the epoch's batch count."""

    def __init__(self, owner: TrainLoader, n: int) -> None:
        self.owner, self.n = owner, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.owner.iterated:
            # A new DataLoader iterator draws its base seed from the global RNG, a persistent one's reset does not:
            # draw it here, so the main process' RNG (drop-path) runs as with a fresh loader each epoch.
            torch.empty((), dtype=torch.int64).random_()
        self.owner.iterated = True
        return islice(iter(self.owner.loader), self.n)


class TrainLoader:
    """The training batches of each epoch (:func:`build_train_loader`).

    ``data.persistent_workers`` (with ``data.num_workers > 0``) keeps one DataLoader and its worker processes for
    the whole run: the epoch reaches the workers through shared memory (stream: the seed every stage reads when
    the workers restart their pipeline) or the main process (exact: the batch sampler's list). The batches, and
    the main process' RNG, are the same as with a new loader each epoch (tests/test_loader.py).
    """

    def __init__(self, cfg: DataConfig, env: DistEnv, *, seed: int) -> None:
        self.cfg, self.env, self.seed = cfg, env, seed
        self.persistent = cfg.persistent_workers and cfg.num_workers > 0
        self.loader: DataLoader | None = None
        self.iterated = False

    def epoch(self, epoch: int) -> Iterable[dict[str, Any]]:
        cfg, env = self.cfg, self.env
        if not self.persistent:
            return build_train_loader(cfg, env, epoch=epoch, seed=self.seed)
        if self.loader is None:
            self._shards, self._manifest = _train_shards(cfg)
            self._build()
        datasets = self._manifest["datasets"]
        if cfg.sampler == "exact":
            self._sampler.batches = _exact_batches(cfg, env, self._index, self.seed, epoch, datasets)
            return _PersistentEpoch(self, len(self._sampler))
        self._seed_box.fill_(stream_seed(self.seed, epoch, env.rank))
        return _PersistentEpoch(self, num_train_batches(cfg, env.world_size, self._manifest))

    def _build(self) -> None:
        cfg, env = self.cfg, self.env
        common = dict(num_workers=cfg.num_workers, pin_memory=cfg.pin_memory, persistent_workers=True)
        if cfg.sampler == "exact":
            self._index, self._sampler = _index_shards(cfg, self._shards), _EpochBatches()
            self.loader = DataLoader(
                _IndexedTrain(self._index, cfg), batch_sampler=self._sampler, collate_fn=_collate_train, **common
            )
            return
        self._seed_box = torch.zeros((), dtype=torch.int64).share_memory_()
        box = self._seed_box
        pipeline = _stream_pipeline(
            cfg,
            env,
            self._shards,
            lambda: int(box),
            self._manifest["splits"]["train"]["num_samples"],
            self._manifest["datasets"],
        )
        self.loader = DataLoader(pipeline, batch_size=None, prefetch_factor=2, **common)


# ---- evaluation


class _EvalStream(IterableDataset):
    def __init__(self, shards: list[Shard], cfg: DataConfig) -> None:
        self.shards, self.cfg = shards, cfg

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        mine = self.shards[info.id :: info.num_workers] if info is not None else self.shards
        items: list[dict[str, Any]] = []
        for url, entry, part in mine:
            for s in iter_shard(url, fetch_shard(url, entry, io_options(self.cfg))):
                try:
                    img = decode_image(s["jpg"], url=url, key=s["key"])
                except ShardError as exc:
                    if not self.cfg.skip_corrupt:
                        raise
                    _count_corrupt(exc)
                    continue
                items.append({"image": eval_transform(img, size=self.cfg.img_size), **_in_union(s, part)})
                if len(items) == self.cfg.eval_batch_size:
                    yield _collate_eval(items)
                    items = []
        if items:
            yield _collate_eval(items)


def _collate_eval(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "images": torch.stack([it["image"] for it in items]),
        "pids": torch.tensor([int(it["meta"]["pid"]) for it in items], dtype=torch.long),
        "camids": torch.tensor([int(it["meta"]["camid"]) for it in items], dtype=torch.long),
        "keys": [it["key"] for it in items],
        "roles": [it["meta"]["role"] for it in items],
    }


def eval_datasets(cfg: DataConfig) -> list[str]:
    """The names of the datasets evaluated one by one (several ``data.roots``); [] for one evaluation set."""
    return [part.name for part, _ in _parts(cfg)] if len(cfg.roots) > 1 else []


def build_eval_loader(cfg: DataConfig, env: DistEnv, role: str, dataset: str | None = None) -> Iterable[dict[str, Any]]:
    """This rank's share of ``role`` (query or gallery): every sample once across ranks, no padding.

    Batches of up to ``eval_batch_size``: ``images``, ``pids`` (original), ``camids``, ``keys``, ``roles``.
    A rank whose share is empty gets an empty iterable. With several ``data.roots``, ``dataset`` (one of
    :func:`eval_datasets`) names the dataset; its cameras carry its training camera offset, its keys its name.
    """
    if role not in ("query", "gallery"):
        raise ValueError(f"role {role!r}: expected 'query' or 'gallery'")
    part = _eval_part(cfg, dataset)
    root = part.root or cfg.eval_root or _train_root(cfg)
    manifest = read_manifest(root, io_options(cfg))
    shards = _shards(cfg, role, root, manifest, part)
    if not shards:
        raise ValueError(f"no {role} shards in {root} (index.json has no {role} split)")
    counts = [e["num_samples"] if e else 1 for _, e, _ in shards]
    mine = [shards[i] for i in split_contiguous(counts, env.rank, env.world_size)]
    if not mine:
        return []
    workers = min(cfg.num_workers, len(mine))
    return DataLoader(_EvalStream(mine, cfg), batch_size=None, num_workers=workers, pin_memory=cfg.pin_memory)


def _eval_part(cfg: DataConfig, dataset: str | None) -> Part:
    if len(cfg.roots) <= 1:
        if dataset is not None:
            raise ValueError(f"dataset {dataset!r}: only several data.roots are evaluated by dataset")
        return Part(cfg.roots[0] if cfg.roots else "")
    parts = {part.name: part for part, _ in _parts(cfg)}
    if dataset not in parts:
        raise ValueError(f"dataset {dataset!r}: data.roots holds {', '.join(parts)}; evaluate one of them")
    return parts[dataset]
