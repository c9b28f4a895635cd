"""Identity-balanced P×K batch formation. Pure Python; RNGs are passed in, never global.

* :func:`official_pk_indices` is the official ``RandomIdentitySampler.__iter__`` (docs/method.md §5.5) with the
  global ``random`` / ``numpy.random`` replaced by explicit generators.
* :func:`weighted_pk_indices` is an epoch over several datasets whose P×K chunks are shared by given weights.
* :func:`rank_batches` cuts that list into P×K batches and deals them to ranks round-robin (docs/method.md §5.6),
  the same count to every rank: global batch b is blocks bW..bW+W−1, so the ranks share one global P×K order.
* :func:`draw_seed` keys a sample's random draws by its place in that global order (``engine.invariant``).
* :func:`pk_batches` forms P×K batches from an endless sample stream with a bounded buffer.
"""

from __future__ import annotations

import hashlib
import random
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np


def stream_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, epoch, rank, worker, ...), stable across processes and runs."""
    digest = hashlib.blake2b(",".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def official_pk_indices(
    labels: Sequence[int], num_ids: int, num_instances: int, rng: random.Random, np_rng: np.random.RandomState
) -> list[int]:
    """One epoch of the official sampler: a flat index list, consecutive P×K blocks of distinct ids.

    Per id (in first-seen order): copy its indices, up-sample to K with replacement if it has fewer,
    shuffle, cut into chunks of K dropping the remainder. Then while at least P ids have chunks: draw P
    distinct ids and pop the first chunk of each.
    """
    index_dic = _by_label(labels)
    pids = list(index_dic)
    chunks = {pid: _chunks(index_dic[pid], num_instances, rng, np_rng) for pid in pids}
    avail, out = list(pids), []
    while len(avail) >= num_ids:
        for pid in rng.sample(avail, num_ids):
            out.extend(chunks[pid].pop(0))
            if not chunks[pid]:
                avail.remove(pid)
    return out


def _by_label(labels: Sequence[int]) -> dict[int, list[int]]:
    index_dic: dict[int, list[int]] = defaultdict(list)
    for index, label in enumerate(labels):
        index_dic[label].append(index)
    return index_dic


def _chunks(idxs: list[int], num_instances: int, rng: random.Random, np_rng: np.random.RandomState) -> list[list[int]]:
    """The official chunks of one identity: up-sampled to K with replacement if it has fewer, shuffled, cut into K's."""
    idxs = list(idxs)
    if len(idxs) < num_instances:
        idxs = [int(i) for i in np_rng.choice(idxs, size=num_instances, replace=True)]
    rng.shuffle(idxs)
    return [idxs[start : start + num_instances] for start in range(0, len(idxs) - num_instances + 1, num_instances)]


def chunk_targets(chunks: Sequence[int], weights: Sequence[float]) -> list[int]:
    """Chunks each dataset gives a weighted epoch: the union's total ``sum(chunks)`` shared by weight (>= 1 each)."""
    total, norm = sum(chunks), sum(weights)
    return [max(1, round(total * w / norm)) for w in weights]


def weighted_pk_indices(
    labels: Sequence[int],
    groups: Sequence[int],
    weights: Sequence[float],
    num_ids: int,
    num_instances: int,
    rng: random.Random,
    np_rng: np.random.RandomState,
) -> list[int]:
    """One epoch over several datasets (``groups[i]``: sample i's dataset) with P×K chunks shared by ``weights``.

    Each identity is cut into chunks as :func:`official_pk_indices` does. Dataset d then gives
    :func:`chunk_targets` chunks: a random subset of its chunks when that is fewer, else whole extra rounds
    of its chunking (fresh shuffles: images repeat across chunks, never within one) plus a random part of
    one more. Batches draw P distinct identities with probability proportional to their chunks left, so
    every dataset is used up at the same pace and its share of each batch stays near its weight; the epoch
    ends when fewer than P identities have chunks left.
    """
    index_dic = _by_label(labels)
    group_of = {pid: groups[idxs[0]] for pid, idxs in index_dic.items()}
    members: dict[int, list[int]] = defaultdict(list)
    for pid in index_dic:
        members[group_of[pid]].append(pid)
    order = sorted(members)
    rounds = {pid: _chunks(index_dic[pid], num_instances, rng, np_rng) for pid in index_dic}
    targets = chunk_targets([sum(len(rounds[p]) for p in members[g]) for g in order], [weights[g] for g in order])
    chunks: dict[int, list[list[int]]] = defaultdict(list)
    for g, target in zip(order, targets):
        _fill(members[g], index_dic, rounds, target, chunks, num_instances, rng, np_rng)
    avail = [pid for pid in index_dic if chunks[pid]]
    left = np.array([len(chunks[pid]) for pid in avail], dtype=np.float64)
    out: list[int] = []
    while len(avail) >= num_ids:
        picks = np_rng.choice(len(avail), size=num_ids, replace=False, p=left / left.sum())
        for i in picks:
            out.extend(chunks[avail[i]].pop(0))
            left[i] -= 1
        keep = left > 0
        if not keep.all():
            avail, left = [pid for pid, k in zip(avail, keep) if k], left[keep]
    return out


def _fill(
    pids: list[int],
    index_dic: dict[int, list[int]],
    first: dict[int, list[list[int]]],
    target: int,
    chunks: dict[int, list[list[int]]],
    num_instances: int,
    rng: random.Random,
    np_rng: np.random.RandomState,
) -> None:
    """Append ``target`` chunks of the identities ``pids`` to ``chunks``: whole rounds, then a random part of one."""
    round_ = first
    while True:
        flat = [(pid, c) for pid in pids for c in round_[pid]]
        keep = range(len(flat)) if target >= len(flat) else sorted(rng.sample(range(len(flat)), target))
        for j in keep:
            chunks[flat[j][0]].append(flat[j][1])
        target -= len(keep)
        if target <= 0:
            return
        round_ = {pid: _chunks(index_dic[pid], num_instances, rng, np_rng) for pid in pids}


def rank_batches(indices: Sequence[int], batch_size: int, rank: int, world_size: int) -> list[list[int]]:
    """Batches ``rank, rank+W, ...`` of the flat list cut into ``batch_size`` blocks; equal count per rank."""
    num_batches = len(indices) // batch_size // world_size
    return [
        list(indices[(b * world_size + rank) * batch_size : (b * world_size + rank + 1) * batch_size])
        for b in range(num_batches)
    ]


def resume_position(samples_done: int, batch_size: int, world_size: int) -> tuple[int, int]:
    """Where an epoch resumes after ``samples_done`` samples of its global order were trained: the steps of
    ``batch_size`` samples per rank on ``world_size`` ranks that covers (each rank skips its first so many batches of
    :func:`rank_batches`), and the samples after them that are trained again (0 when the new global batch divides
    ``samples_done``; any other position falls back to the step boundary before it)."""
    per_step = batch_size * world_size
    return samples_done // per_step, samples_done % per_step


def draw_seed(epoch_seed: int, step: int, position: int) -> int:
    """The seed of every random draw touching the sample at ``position`` (0-based) of global batch ``step`` of an
    epoch (``engine.invariant``; docs/method.md, "Sample-keyed random draws"): its augmentation, and through
    :func:`draw_place_seed` its drop-path masks. Never the rank, the worker or the place in a rank's batch.

    ``epoch_seed`` is the exact sampler's ``stream_seed(seed, epoch)``. The slot that holds the rank in the per-rank
    seeds (``stream_seed(epoch_seed, rank, step, index)``) is 0 here, so one rank draws what it always drew."""
    return stream_seed(epoch_seed, 0, step, position)


def draw_place_seed(sample_seed: int, place: int) -> int:
    """The seed of the draws at ``place`` (e.g. 1: step 1's forward, 2: step 2's) of a sample whose
    :func:`draw_seed` is ``sample_seed``; distinct from the augmentation's (``sample_seed`` itself)."""
    return stream_seed(sample_seed, place)


def global_position(rank: int, index: int, rank_batch_size: int) -> int:
    """Where the ``index``-th sample of ``rank``'s batch sits in the global batch: :func:`rank_batches` deals each
    global batch to the ranks in contiguous blocks of ``rank_batch_size``, in rank order."""
    return rank * rank_batch_size + index


def pk_batches(
    samples: Iterable[Any],
    *,
    label: Callable[[Any], Hashable],
    num_ids: int,
    num_instances: int,
    buffer_size: int,
    rng: random.Random,
    key: Callable[[Any], Hashable] | None = None,
    num_distinct: Callable[[], int] | None = None,
) -> Iterator[list[Any]]:
    """Endless P×K batches (lists of samples) from a shuffled, endless sample stream.

    The buffer fills to ``buffer_size`` samples, then each batch draws P distinct ids among those with
    at least K buffered samples and takes K random samples of each. When fewer than P ids are ready,
    the largest not-ready ids are up-sampled with replacement (like the official sampler does for ids
    with fewer than K images). When the buffer holds fewer than P distinct ids, the oldest sample of the
    largest id is evicted, so a buffer of one id cannot stall the stream. With ``key``, a sample whose
    key is already buffered (a resampled shard seen twice) is passed over; then ``num_distinct()``, the
    number of distinct samples the stream can still yield (it shrinks as corrupt ones are skipped),
    caps the buffer, so it never waits for samples that do not exist, and a stream whose every usable
    sample is buffered in fewer than P identities is an error instead of a hang.
    """
    if buffer_size < num_ids * num_instances:
        raise ValueError(f"shuffle buffer {buffer_size} cannot hold one {num_ids}×{num_instances} batch")
    buffer: OrderedDict[Hashable, list[Any]] = OrderedDict()
    size = 0
    held: set[Hashable] = set()
    for sample in samples:
        if key is not None:
            if key(sample) in held:
                continue
            held.add(key(sample))
        buffer.setdefault(label(sample), []).append(sample)
        size += 1
        bound = num_distinct() if num_distinct is not None else None
        if size < (buffer_size if bound is None else min(buffer_size, bound)):
            continue
        if len(buffer) < num_ids:
            if bound is not None and size >= bound:
                raise ValueError(
                    f"the training stream holds only {len(buffer)} distinct identities in its {size} "
                    f"usable samples, fewer than P={num_ids} (corrupt samples skipped?)"
                )
            largest = max(buffer, key=lambda k: len(buffer[k]))
            held.discard(key(buffer[largest].pop(0)) if key is not None else None)
            size -= 1
            if not buffer[largest]:
                del buffer[largest]
            continue
        batch = _take_batch(buffer, num_ids, num_instances, rng)
        if key is not None:
            held.difference_update(key(s) for s in batch)
        yield batch
        size = sum(len(v) for v in buffer.values())


def _take_batch(
    buffer: OrderedDict[Hashable, list[Any]], num_ids: int, num_instances: int, rng: random.Random
) -> list[Any]:
    ready = [k for k, v in buffer.items() if len(v) >= num_instances]
    if len(ready) >= num_ids:
        chosen = rng.sample(ready, num_ids)
    else:
        rest = sorted((k for k in buffer if k not in set(ready)), key=lambda k: -len(buffer[k]))
        chosen = ready + rest[: num_ids - len(ready)]
    batch: list[Any] = []
    for pid in chosen:
        items = buffer[pid]
        if len(items) >= num_instances:
            picks = rng.sample(range(len(items)), num_instances)
            batch.extend(items[i] for i in picks)
            for i in sorted(picks, reverse=True):
                items.pop(i)
        else:
            batch.extend(items + [rng.choice(items) for _ in range(num_instances - len(items))])
            items.clear()
        if not items:
            del buffer[pid]
    return batch
