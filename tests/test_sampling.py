"""P×K batch formation: the official sampler's semantics, the rank split, and the stream batcher."""

from __future__ import annotations

import copy
import itertools
import random
from collections import Counter, defaultdict

import numpy as np
import pytest

from dpm_dist.data.sampling import official_pk_indices, pk_batches, rank_batches, stream_seed


def reference_sampler(labels: list[int], num_ids: int, k: int) -> list[int]:
    """The official RandomIdentitySampler.__iter__ (TransReID/DPM datasets/sampler.py), global RNGs."""
    index_dic = defaultdict(list)
    for index, pid in enumerate(labels):
        index_dic[pid].append(index)
    pids = list(index_dic.keys())
    batch_idxs_dict = defaultdict(list)
    for pid in pids:
        idxs = copy.deepcopy(index_dic[pid])
        if len(idxs) < k:
            idxs = np.random.choice(idxs, size=k, replace=True)
        random.shuffle(idxs)
        batch_idxs = []
        for idx in idxs:
            batch_idxs.append(int(idx))
            if len(batch_idxs) == k:
                batch_idxs_dict[pid].append(batch_idxs)
                batch_idxs = []
    avai_pids = copy.deepcopy(pids)
    final_idxs = []
    while len(avai_pids) >= num_ids:
        selected_pids = random.sample(avai_pids, num_ids)
        for pid in selected_pids:
            batch_idxs = batch_idxs_dict[pid].pop(0)
            final_idxs.extend(batch_idxs)
            if len(batch_idxs_dict[pid]) == 0:
                avai_pids.remove(pid)
    return final_idxs


def uneven_labels(seed: int) -> list[int]:
    rng = random.Random(seed)
    labels = [pid for pid in range(23) for _ in range(rng.choice([1, 2, 3, 5, 9, 14]))]
    rng.shuffle(labels)
    return labels


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_official_sampler_is_the_reference_with_explicit_rngs(seed: int) -> None:
    labels = uneven_labels(seed)
    random.seed(seed)
    np.random.seed(seed)
    expected = reference_sampler(labels, 4, 4)
    got = official_pk_indices(labels, 4, 4, random.Random(seed), np.random.RandomState(seed))
    assert got == expected and len(got) > 0


def test_official_sampler_invariants() -> None:
    labels, p, k = uneven_labels(5), 4, 4
    flat = official_pk_indices(labels, p, k, random.Random(1), np.random.RandomState(1))
    assert len(flat) % (p * k) == 0
    counts = Counter(labels)
    for b in range(0, len(flat), p * k):
        block = [labels[i] for i in flat[b : b + p * k]]
        chunks = [block[j : j + k] for j in range(0, p * k, k)]
        assert all(len(set(c)) == 1 for c in chunks)  # K consecutive images of one id
        assert len({c[0] for c in chunks}) == p  # P distinct ids
    used = Counter(flat)
    for index, n in used.items():
        if counts[labels[index]] >= k:
            assert n == 1  # no image twice unless its id was up-sampled
    small = [pid for pid, n in counts.items() if n < k]
    assert any(labels[i] in small for i in flat)  # ids with fewer than K images are up-sampled, not skipped
    for pid, n in counts.items():  # leftovers (< K) dropped
        assert sum(1 for i in flat if labels[i] == pid) <= max(n, k) - max(n, k) % k


def test_rank_batches_equal_disjoint_round_robin() -> None:
    flat = list(range(10 * 8 + 5))
    per_rank = [rank_batches(flat, 8, r, 3) for r in range(3)]
    assert [len(b) for b in per_rank] == [3, 3, 3]
    assert per_rank[1][0] == list(range(8, 16)) and per_rank[0][1] == list(range(24, 32))
    seen = [i for batches in per_rank for batch in batches for i in batch]
    assert len(seen) == len(set(seen))


def check_pk(batch: list, p: int, k: int) -> None:
    counts = Counter(s[0] for s in batch)
    assert len(batch) == p * k and len(counts) == p and set(counts.values()) == {k}


def test_stream_batches_are_exact_pk_and_upsample_rare_ids() -> None:
    rng = random.Random(0)
    stream = ((pid, i) for i in range(100000) for pid in [rng.choice([0] * 30 + list(range(1, 12)))])
    batches = list(
        zip(
            range(40),
            pk_batches(stream, label=lambda s: s[0], num_ids=4, num_instances=3, buffer_size=30, rng=random.Random(1)),
        )
    )
    assert len(batches) == 40
    for _, batch in batches:
        check_pk(batch, 4, 3)


def test_stream_does_not_stall_on_a_run_of_one_id() -> None:
    stream = [(0, i) for i in range(500)] + [(1 + i % 6, i) for i in range(1000)]
    out = list(
        pk_batches(iter(stream), label=lambda s: s[0], num_ids=3, num_instances=2, buffer_size=20, rng=random.Random(0))
    )
    assert len(out) > 100
    for batch in out:
        check_pk(batch, 3, 2)


def test_stream_rejects_a_buffer_smaller_than_a_batch() -> None:
    with pytest.raises(ValueError, match="buffer"):
        next(pk_batches(iter([]), label=lambda s: s, num_ids=4, num_instances=4, buffer_size=10, rng=random.Random()))


def test_stream_seed_depends_on_every_part() -> None:
    seeds = {stream_seed(s, e, r) for s in range(3) for e in range(3) for r in range(3)}
    assert len(seeds) == 27 and all(0 <= s < 2**63 for s in seeds)


def test_stream_passes_over_a_sample_already_buffered() -> None:
    stream = [(pid, i) for _ in range(50) for pid in range(4) for i in range(3)]  # the same 12 samples, repeated
    out = list(
        zip(
            range(30),
            pk_batches(
                iter(stream),
                label=lambda s: s[0],
                num_ids=2,
                num_instances=3,
                buffer_size=12,
                rng=random.Random(0),
                key=lambda s: s,
            ),
        )
    )
    for _, batch in out:
        check_pk(batch, 2, 3)
        assert len(set(batch)) == 6  # no image twice in a batch


def test_stream_with_fewer_usable_identities_than_p_is_an_error_not_a_hang():
    # 2 identities × 2 samples repeat forever (a resampled stream whose other samples were all skipped):
    # the buffer holds every usable sample and still cannot form a batch of P=3 identities.
    samples = itertools.cycle([{"key": f"{pid}_{i}", "pid": pid} for pid in (0, 1) for i in (0, 1)])
    batches = pk_batches(
        samples,
        label=lambda s: s["pid"],
        num_ids=3,
        num_instances=2,
        buffer_size=6,
        rng=random.Random(0),
        key=lambda s: s["key"],
        num_distinct=lambda: 4,
    )
    with pytest.raises(ValueError, match="only 2 distinct identities in its 4 usable samples, fewer than P=3"):
        next(batches)
