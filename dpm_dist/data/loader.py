"""Train and eval batches from shards on disk, HTTP(S) or S3. The only module building webdataset pipelines.

Train, ``data.sampler=stream``: each (rank, worker) resamples shards with its own seeded RNG (seed,
epoch, rank, worker), expands them to samples and forms P×K batches in a bounded buffer
(:func:`dpm_dist.data.sampling.pk_batches`); the loader stops after :func:`num_train_batches`, the same
count on every rank. Decoding and augmentation run in the DataLoader workers.

Train, ``data.sampler=exact``: the official per-epoch sampler (docs/method.md §5.5) over every training sample,
seeded by (seed, epoch) identically on all ranks, dealt to ranks as in docs/method.md §5.6; shards are read
through a local copy with random access (:mod:`dpm_dist.data.shard_cache`).

Each sampler has one build path (:class:`_StreamLoader`, :class:`_ExactLoader`): a DataLoader plus the one
place the epoch enters (the seed its pipeline stages read, the batch sampler's list). :class:`TrainLoader`
builds it once per epoch, or once per run with ``data.persistent_workers``.

Eval: query/gallery shards split contiguously over ranks by sample count, then over workers; each
sample is read exactly once, with no padding.

Many datasets (``data.roots``): the training set is their union (:mod:`dpm_dist.data.manifest`), labels and
cameras shifted per dataset (:class:`~dpm_dist.data.union.Part`) so they never collide, keys prefixed
``<dataset>/``; ``data.root_weights`` shares the P×K chunks between them. Each dataset is evaluated on its own
query/gallery (``build_eval_loader(..., dataset=)``).
"""

from __future__ import annotations

import bisect
import io
import logging
import random
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from dpm_dist.config import DataConfig
from dpm_dist.data.manifest import Shard, eval_datasets, eval_shards, io_options, load_manifest, train_shards
from dpm_dist.data.sampling import (
    chunk_targets,
    draw_seed,
    global_position,
    official_pk_indices,
    pk_batches,
    rank_batches,
    stream_seed,
    weighted_pk_indices,
)
from dpm_dist.data.shard_cache import SampleIndex, index_shards
from dpm_dist.data.shards import ShardError, decode_image, fetch_shard, iter_shard, split_contiguous
from dpm_dist.data.storage import IOOptions
from dpm_dist.data.transforms import eval_transform, train_transform
from dpm_dist.data.union import Part, chunks_per_dataset
from dpm_dist.dist import DistEnv

__all__ = [
    "TrainLoader",
    "build_eval_loader",
    "build_train_loader",
    "eval_datasets",
    "io_options",
    "load_manifest",
    "num_train_batches",
]

log = logging.getLogger(__name__)


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
    if cfg.global_num_ids:  # one global P×K order, whatever the world size
        return sum(chunks) // cfg.global_num_ids
    return sum(chunks) // cfg.num_ids // world_size


def _worker() -> tuple[int, int]:
    """(this DataLoader worker's id, the number of workers); (0, 1) in the main process."""
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


# ---- per-sample work, shared by both train modes (runs in the workers)


def _train_item(
    jpg: bytes, meta: dict[str, Any], key: str, url: str, gen: torch.Generator, cfg: DataConfig, seed: int
) -> dict[str, Any]:
    """One augmented sample; ``seed`` (its draws' key, :func:`dpm_dist.data.sampling.draw_seed`) goes with it."""
    item = {"label": int(meta["label"]), "camid": int(meta["camid"]), "key": key, "image": None, "seed": seed}
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
# Distinct (shard URL, key) pairs skipped in this process: not a cache, a count (stream mode takes them out of the
# distinct samples it can buffer); it grows only with the corrupt samples the training set holds.
_CORRUPT_KEYS: set[tuple[str, str]] = set()
# Keys of the samples stream mode dropped since its last batch (handed on with the batch, then cleared).
_DROPPED_KEYS: list[str] = []


def _count_corrupt(exc: Exception, where: tuple[str, str] | None = None) -> None:
    _NUM_CORRUPT[0] += 1
    if where is not None:
        _CORRUPT_KEYS.add(where)
    log.warning("skipping corrupt sample (%d so far in this process): %s", _NUM_CORRUPT[0], exc)


def _collate_train(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack a P×K batch; a skipped corrupt image (exact mode) is replaced by another image of its identity.

    ``num_skipped`` counts the corrupt samples skipped to make this batch and ``skipped_keys`` names them (the loop
    adds them up, sightings and distinct samples: the workers' own counters never reach the main process)."""
    skipped_keys = [item["key"] for item in items if item["image"] is None]
    num_skipped = len(skipped_keys)
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
        # Each sample's draw seed: drop-path masks keyed by the sample (engine.invariant) read it.
        "sample_seeds": torch.tensor([it["seed"] for it in items], dtype=torch.long),
        "num_skipped": num_skipped,
        "skipped_keys": skipped_keys,
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
        worker, seed = _worker()[0], self.seed_of()
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
        _DROPPED_KEYS.append(sample["key"])
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
    worker, seen = _worker()[0], _NUM_CORRUPT[0]
    _DROPPED_KEYS.clear()
    for number, batch in enumerate(batches):
        dropped = _NUM_CORRUPT[0] - seen  # skipped by _expand while this batch was being formed
        gen = torch.Generator().manual_seed(stream_seed(seed, worker, number))
        out = _collate_train(
            [
                _train_item(s["jpg"], s["meta"], s["key"], s["url"], gen, cfg, stream_seed(seed, worker, number, j))
                for j, s in enumerate(batch)
            ]
        )
        out["num_skipped"] += dropped
        out["skipped_keys"] += _DROPPED_KEYS
        _DROPPED_KEYS.clear()
        seen = _NUM_CORRUPT[0]
        yield out


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
            rng=random.Random(stream_seed(seed_of(), _worker()[0])),
            key=lambda s: s["key"],
            num_distinct=lambda: num_samples - len(_CORRUPT_KEYS),
        ),
        lambda batches: _augment_batches(batches, cfg, seed_of()),
    )


class _StreamLoader:
    """``data.sampler=stream``: a DataLoader over the endless pipeline; :meth:`set_epoch` writes the epoch's seed into
    shared memory, where every stage reads it when (re)started, also in workers that outlive the epoch."""

    def __init__(
        self, cfg: DataConfig, env: DistEnv, shards: list[Shard], manifest: dict[str, Any], seed: int, persistent: bool
    ) -> None:
        self.env, self.seed = env, seed
        self.n = num_train_batches(cfg, env.world_size, manifest)
        box = self.seed_box = torch.zeros((), dtype=torch.int64).share_memory_()
        num_samples = manifest["splits"]["train"]["num_samples"]
        pipeline = _stream_pipeline(cfg, env, shards, lambda: int(box), num_samples, manifest["datasets"])
        self.loader = DataLoader(
            pipeline,
            batch_size=None,
            num_workers=cfg.num_workers,
            pin_memory=cfg.pin_memory,
            persistent_workers=persistent,
            prefetch_factor=2 if cfg.num_workers else None,
        )

    replays = True  # a resume inside an epoch reads the stream's first batches again (TrainLoader.epoch)

    def set_epoch(self, epoch: int, start: int = 0) -> int:
        """Point the pipeline at ``epoch``; returns its batch count (``start``: see :meth:`TrainLoader.epoch`)."""
        self.seed_box.fill_(stream_seed(self.seed, epoch, self.env.rank))
        return self.n


# ---- exact mode


class _IndexedTrain(Dataset):
    """Random access to training samples; items are ``(index, augmentation seed)`` pairs."""

    def __init__(self, index: SampleIndex, cfg: DataConfig) -> None:
        self.index, self.cfg = index, cfg

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item: tuple[int, int]) -> dict[str, Any]:
        path, offset, size, key, meta = self.index[item[0]]
        with open(path, "rb") as f:
            f.seek(offset)
            jpg = f.read(size)
        return _train_item(jpg, meta, key, path, torch.Generator().manual_seed(item[1]), self.cfg, item[1])


def _exact_batches(
    cfg: DataConfig,
    env: DistEnv,
    index: SampleIndex,
    seed: int,
    epoch: int,
    datasets: list[dict[str, Any]],
    sample_keyed: bool = False,
) -> list[list[tuple[int, int]]]:
    """This rank's batches of the epoch: (sample index, augmentation seed) pairs.

    The epoch's global P×K order uses P = ``data.global_num_ids`` when set (every world size draws the same order),
    else the per-rank ``data.num_ids``. Seeds are keyed by (rank, batch, place in the rank's batch), or with
    ``sample_keyed`` (``engine.invariant``) by the sample's place in the global order
    (:func:`~dpm_dist.data.sampling.draw_seed`): the same on one rank."""
    shared = stream_seed(seed, epoch)  # the same on every rank, as rank 0's seed is in docs/method.md §5.6
    labels = [m["label"] for *_, m in index]
    rngs = (random.Random(shared), np.random.RandomState(shared % 2**32))
    if cfg.root_weights and len(datasets) > 1:
        starts = [d["id_offset"] for d in datasets]
        groups = [bisect.bisect_right(starts, label) - 1 for label in labels]
        flat = weighted_pk_indices(
            labels, groups, list(cfg.root_weights), cfg.order_num_ids(), cfg.num_instances, *rngs
        )
    else:  # one dataset, or the union sampled as one: the official sampler
        flat = official_pk_indices(labels, cfg.order_num_ids(), cfg.num_instances, *rngs)
    batches = rank_batches(flat, cfg.batch_size, env.rank, env.world_size)
    if not batches:
        raise ValueError(
            f"exact sampler: an epoch of {len(flat)} samples gives no {cfg.num_ids}×{cfg.num_instances} "
            f"batch for each of {env.world_size} ranks; lower data.num_ids or the world size"
        )
    if sample_keyed:
        size = cfg.batch_size
        return [
            [(i, draw_seed(shared, b, global_position(env.rank, j, size))) for j, i in enumerate(batch)]
            for b, batch in enumerate(batches)
        ]
    return [[(i, stream_seed(shared, env.rank, b, j)) for j, i in enumerate(batch)] for b, batch in enumerate(batches)]


class _EpochBatches:
    """A batch sampler whose batches are replaced each epoch (a DataLoader's sampler cannot be)."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[int, int]]] = []

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return iter(self.batches)


class _ExactLoader:
    """``data.sampler=exact``: a DataLoader with random access to every training sample; :meth:`set_epoch` refills
    its batch sampler's list (the main process hands the batches to the workers, also to ones that outlive it)."""

    def __init__(
        self,
        cfg: DataConfig,
        env: DistEnv,
        index: SampleIndex,
        manifest: dict[str, Any],
        seed: int,
        persistent: bool,
        sample_keyed: bool = False,
    ) -> None:
        self.cfg, self.env, self.index, self.seed, self.sample_keyed = cfg, env, index, seed, sample_keyed
        self.datasets, self.batches = manifest["datasets"], _EpochBatches()
        self.loader = DataLoader(
            _IndexedTrain(index, cfg),
            batch_sampler=self.batches,
            num_workers=cfg.num_workers,
            collate_fn=_collate_train,
            pin_memory=cfg.pin_memory,
            persistent_workers=persistent,
        )

    replays = False  # a resume inside an epoch starts the batch list at its position: nothing is read again

    def set_epoch(self, epoch: int, start: int = 0) -> int:
        """Deal ``epoch``'s batches from its batch ``start`` on (a resume inside the epoch); returns their count
        in the whole epoch."""
        batches = _exact_batches(self.cfg, self.env, self.index, self.seed, epoch, self.datasets, self.sample_keyed)
        self.batches.batches = batches[start:]
        return len(batches)


# ---- the training loader of a run


class _Epoch:
    """The batches ``start..n-1`` of an epoch of ``n`` batches of ``loader``; ``len()`` is ``n``. ``replay``: the
    loader yields the epoch from its first batch, and the first ``start`` are read and dropped. ``before`` runs each
    time the epoch is iterated."""

    def __init__(
        self,
        loader: Iterable[dict[str, Any]],
        n: int,
        before: Callable[[], None] | None = None,
        start: int = 0,
        replay: bool = False,
    ) -> None:
        self.loader, self.n, self.before, self.start, self.replay = loader, n, before, min(start, n), replay

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.before is not None:
            self.before()
        skip = self.start if self.replay else 0
        return islice(iter(self.loader), skip, skip + self.n - self.start)


class TrainLoader:
    """The training batches of each epoch (:func:`build_train_loader`).

    The manifest, the shard list and (exact) the sample index are read once. Each epoch gets a new DataLoader
    (:class:`_StreamLoader` or :class:`_ExactLoader`), or, with ``data.persistent_workers`` (and
    ``data.num_workers > 0``), one DataLoader and its worker processes serve the whole run: the epoch reaches the
    workers through shared memory (stream: the seed every stage reads when the workers restart their pipeline) or
    the main process (exact: the batch sampler's list). The batches, and the main process' RNG, are the same either
    way (tests/test_loader.py).
    """

    def __init__(
        self, cfg: DataConfig, env: DistEnv, *, seed: int, persistent: bool | None = None, sample_keyed: bool = False
    ) -> None:
        """``persistent``: keep the workers for the run; ``None`` as ``data.persistent_workers`` says.
        ``sample_keyed`` (``engine.invariant``): exact-mode augmentation keyed by the sample's place in the global
        order, not by the rank. ``data.global_num_ids`` is shared out over ``env.world_size`` ranks here."""
        cfg = cfg.for_world_size(env.world_size)
        self.cfg, self.env, self.seed, self.sample_keyed = cfg, env, seed, sample_keyed
        keep = cfg.persistent_workers if persistent is None else persistent
        self.persistent = keep and cfg.num_workers > 0
        self.loader: DataLoader | None = None
        self.iterated = False
        self._built: _StreamLoader | _ExactLoader | None = None
        self._data: tuple[list[Shard], dict[str, Any], SampleIndex] | None = None

    def epoch(self, epoch: int, start: int = 0, replay: bool = True) -> _Epoch:
        """The batches of ``epoch`` on this rank; ``len()`` is their count. Iterate it before asking for the next.

        ``start``: resume inside the epoch, with its batch ``start`` (0-based): the exact sampler deals the epoch's
        list from there (nothing is read again); the stream sampler reads its first ``start`` batches again and drops
        them (``replay``; the same batches as before only with the same world size and ``data.num_workers``), or,
        with ``replay=False``, yields the remaining count from the stream's start.
        """
        if self._built is None or not self.persistent:
            self._built = self._build()
            self.loader = self._built.loader
        n = self._built.set_epoch(epoch, start)
        replays = replay and self._built.replays
        return _Epoch(self._built.loader, n, self._reused if self.persistent else None, start, replays)

    def _build(self) -> _StreamLoader | _ExactLoader:
        """The one build path of the sampler; the data it reads are read on the first call only."""
        cfg = self.cfg
        if self._data is None:
            shards, manifest = train_shards(cfg)
            index = index_shards(shards, cfg.cache_dir, io_options(cfg)) if cfg.sampler == "exact" else []
            self._data = shards, manifest, index
        shards, manifest, index = self._data
        if cfg.sampler == "exact":
            return _ExactLoader(cfg, self.env, index, manifest, self.seed, self.persistent, self.sample_keyed)
        return _StreamLoader(cfg, self.env, shards, manifest, self.seed, self.persistent)

    def _reused(self) -> None:
        if self.iterated:
            # A new DataLoader iterator draws its base seed from the global RNG, a persistent one's reset does not:
            # draw it here, so the main process' RNG (drop-path) runs as with a fresh loader each epoch.
            torch.empty((), dtype=torch.int64).random_()
        self.iterated = True


def build_train_loader(cfg: DataConfig, env: DistEnv, *, epoch: int, seed: int) -> Iterable[dict[str, Any]]:
    """One epoch of P×K batches for ``env.rank``; every rank gets the same number of batches.

    Batches are dicts: ``images`` (B, 3, H, W) in [-1, 1], ``pids`` (relabelled 0..C-1), ``camids``, ``keys``.
    Deterministic given (seed, epoch, rank, num_workers); resuming at epoch e rebuilds the same stream.
    A new DataLoader whatever ``data.persistent_workers`` says (:class:`TrainLoader` keeps one for a run).
    """
    return TrainLoader(cfg, env, seed=seed, persistent=False).epoch(epoch)


# ---- evaluation


class _EvalStream(IterableDataset):
    def __init__(self, shards: list[Shard], cfg: DataConfig) -> None:
        self.shards, self.cfg = shards, cfg

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, num_workers = _worker()
        mine = self.shards[worker::num_workers]
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


def build_eval_loader(cfg: DataConfig, env: DistEnv, role: str, dataset: str | None = None) -> Iterable[dict[str, Any]]:
    """This rank's share of ``role`` (query or gallery): every sample once across ranks, no padding.

    Batches of up to ``eval_batch_size``: ``images``, ``pids`` (original), ``camids``, ``keys``, ``roles``.
    A rank whose share is empty gets an empty iterable. With several ``data.roots``, ``dataset`` (one of
    :func:`eval_datasets`) names the dataset; its cameras carry its training camera offset, its keys its name.
    """
    shards = eval_shards(cfg, role, dataset)
    counts = [e["num_samples"] if e else 1 for _, e, _ in shards]
    mine = [shards[i] for i in split_contiguous(counts, env.rank, env.world_size)]
    if not mine:
        return []
    workers = min(cfg.num_workers, len(mine))
    return DataLoader(_EvalStream(mine, cfg), batch_size=None, num_workers=workers, pin_memory=cfg.pin_memory)
