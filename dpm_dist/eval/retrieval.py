"""Masked retrieval and the Market protocol (docs/method.md §7) as pure tensor functions: no process group, no I/O.

Distances. DPM scores query i against gallery j with the query's mask only:
``cos_ij = <q̂_i, normalize(m_i ⊙ ĝ_j)>``, ``d_ij = arccos(clip(cos_ij, -1+1e-5, 1-1e-5))``. Here that is two
matrix products, ``((Q̂ ⊙ M) Ĝᵀ) / max(√(M² (Ĝ²)ᵀ), 1e-12)`` (docs/method.md §10.4), evaluated a chunk of queries at
a time so that the Q×G matrix never has to exist.

Ranking order. arccos is strictly decreasing, so in exact arithmetic ordering by ``arccos(clip(cos))``
ascending is the same as ordering by ``-clip(cos)`` ascending, ties included (ties are exactly the pairs
with equal clipped cosines, e.g. every ``cos > 1-1e-5``). The official code evaluates the arccos in
float32, which rounds neighbouring cosines near 0 onto one value (float32 spacing is ~1e-9 at cos 0.01
but ~1.2e-7 at π/2), and then breaks those spurious ties with numpy's unstable quicksort, i.e. in an
arbitrary order. We rank by :func:`ranking_distance` (``-clip(cos)``, exact: negation does not round),
which is the clipped-arccos order without the rounding ties, and break the remaining true ties by the
gallery index (a stable sort). The reported distance values (:func:`arccos_distance`) are the official
ones.

Metrics. :func:`cmc_map_minp` is the Market protocol of the official ``eval_func``: per query, drop
gallery items with the same pid and the same camera; skip queries with no true match left (error if
none is left); CMC from the first match, AP = mean over matches of precision at the match, and mINP as
in fast-reid/AGW (#matches / rank of the hardest match). It never sorts a whole row: every metric is a
function of the ranks of the true matches, and the rank of match t is the number of kept items that
precede it: a histogram of the items over distance cells, and a binary search of the query's few sorted
match keys only for the items that share a cell with a match (:class:`_Cells`).

Non-finite distances. ``+inf`` ranks last and ``-inf`` first (callers mask pairs with them), ties broken by the
gallery index as for finite values, and any finite range (float32 rows spanning -3e38..3e38 included) is ranked
exactly; a NaN distance has no place in a ranking and is refused (:class:`NonFiniteDistanceError`, naming how
many queries have one: a diverged model produces NaN features).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

CLIP_EPS = 1e-5  # official clip before arccos (docs/method.md §7.4)
NORM_EPS = 1e-12  # F.normalize's eps, as in the official code
METRICS = ("masked_cosine", "cosine", "euclidean")


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, p=2, dim=1, eps=NORM_EPS)


GALLERY_BLOCK = 512  # gallery rows per matrix product (see Gallery)


@dataclass(frozen=True)
class Gallery:
    """Gallery features prepared once for repeated chunked scoring, L2-normalised, in zero-padded blocks.

    Every product is a loop of ``(C, D) @ (D, GALLERY_BLOCK)`` matrix products of one fixed shape. A BLAS
    picks its kernel (and so its rounding) by shape: on this CPU's MKL an item's distance changed by an
    ulp with the number of columns next to it, and a batched product of one block differs from one of
    three. With one fixed shape an item's distance has the same bits whatever gallery it sits in and
    wherever, so a rank scoring its gallery share computes exactly the floats one process computes on
    the whole gallery. (Measured on 1 thread: as fast as one plain product.)
    """

    feat: torch.Tensor  # (blocks, GALLERY_BLOCK, D) ĝ
    sq_norm: torch.Tensor  # (G,) ‖ĝ‖², for the Euclidean distance
    size: int  # G, the real rows

    @classmethod
    def build(cls, g_feat: torch.Tensor, *, normalize: bool = True) -> Gallery:
        """From raw features (L2-normalised here) or, with ``normalize=False``, rows already normalised."""
        size, dim = g_feat.shape
        padded = g_feat.new_empty((-(-size // GALLERY_BLOCK) * GALLERY_BLOCK, dim))
        padded[size:] = 0
        sq_norm = g_feat.new_empty(size)
        step = 8 * GALLERY_BLOCK  # row by row anyway: small pieces, no full-size temporary
        for start in range(0, size, step):
            part, out = g_feat[start : start + step], padded[start : min(start + step, size)]
            F.normalize(part, p=2, dim=1, eps=NORM_EPS, out=out) if normalize else out.copy_(part)
            sq_norm[start : start + step] = (out * out).sum(1)
        return cls(feat=padded.view(-1, GALLERY_BLOCK, dim), sq_norm=sq_norm, size=size)

    def blockwise(
        self, like: torch.Tensor, score: Callable[[torch.Tensor, torch.Tensor, slice], object]
    ) -> torch.Tensor:
        """(C, G) built block by block: ``score(block, buf, columns)`` fills a (C, GALLERY_BLOCK) buffer from one
        gallery block, then its real columns are copied out. One write of the result; every other pass
        stays in the block-sized buffer (fresh (C, G) temporaries cost page faults and memory traffic)."""
        out = like.new_empty((like.shape[0], self.size))
        buf = like.new_empty((like.shape[0], GALLERY_BLOCK))
        for b, block in enumerate(self.feat):
            cols = slice(b * GALLERY_BLOCK, min((b + 1) * GALLERY_BLOCK, self.size))
            score(block, buf, cols)
            out[:, cols] = buf[:, : cols.stop - cols.start]
        return out

    def product(self, q: torch.Tensor, *, squares: bool = False) -> torch.Tensor:
        """(C, G) ``q @ ĝᵀ`` (or ``q @ (ĝ ⊙ ĝ)ᵀ``, the masked cosine's denominator operand), block by block."""
        return self.blockwise(q, lambda block, buf, _: torch.mm(q, (block * block if squares else block).T, out=buf))


def _as_gallery(g_feat: torch.Tensor | Gallery) -> Gallery:
    return g_feat if isinstance(g_feat, Gallery) else Gallery.build(g_feat)


def _clip(x: torch.Tensor) -> torch.Tensor:
    return x.clamp_(-1.0 + CLIP_EPS, 1.0 - CLIP_EPS)


def _masked_cosine(
    q_feat: torch.Tensor, q_mask: torch.Tensor, gallery: Gallery, *, negate: bool, clip: bool = False
) -> torch.Tensor:
    # Negating the small (C, D) operand negates the product exactly (rounding is sign-symmetric), so the
    # ranking distance -cos costs no pass over the (C, G) matrix.
    q = l2_normalize(q_feat) * q_mask
    q = q.neg_() if negate else q
    mask_sq = q_mask * q_mask
    norm_sq = q.new_empty((q.shape[0], GALLERY_BLOCK))

    def score(block: torch.Tensor, cos: torch.Tensor, _: slice) -> None:
        torch.mm(q, block.T, out=cos)
        torch.mm(mask_sq, (block * block).T, out=norm_sq)  # ‖m_i ⊙ ĝ_j‖², squares on the fly: no G×D copy
        cos.mul_(norm_sq.clamp_min_(NORM_EPS * NORM_EPS).rsqrt_())  # / max(‖m ⊙ ĝ‖, eps)
        if clip:
            _clip(cos)

    return gallery.blockwise(q, score)


def _cosine(q_feat: torch.Tensor, gallery: Gallery, *, negate: bool, clip: bool = False) -> torch.Tensor:
    q = l2_normalize(q_feat)
    q = q.neg_() if negate else q

    def score(block: torch.Tensor, cos: torch.Tensor, _: slice) -> None:
        torch.mm(q, block.T, out=cos)
        if clip:
            _clip(cos)

    return gallery.blockwise(q, score)


def masked_cosine_similarity(
    q_feat: torch.Tensor, q_mask: torch.Tensor, g_feat: torch.Tensor | Gallery
) -> torch.Tensor:
    """(Q, G) cosines ``<q̂_i, normalize(m_i ⊙ ĝ_j)>`` as two matrix products (features need not be normalised)."""
    return _masked_cosine(q_feat, q_mask, _as_gallery(g_feat), negate=False)


def cosine_similarity(q_feat: torch.Tensor, g_feat: torch.Tensor | Gallery) -> torch.Tensor:
    """(Q, G) plain cosines of the L2-normalised features (the masked cosine with an all-ones mask)."""
    return _cosine(q_feat, _as_gallery(g_feat), negate=False)


def euclidean_distance(q_feat: torch.Tensor, g_feat: torch.Tensor | Gallery) -> torch.Tensor:
    """(Q, G) squared Euclidean distances of the L2-normalised features (official ``euclidean_distance``)."""
    gallery = _as_gallery(g_feat)
    q_hat = l2_normalize(q_feat)
    q_sq = (q_hat * q_hat).sum(1, keepdim=True)

    def score(block: torch.Tensor, buf: torch.Tensor, cols: slice) -> None:
        torch.mm(q_hat, block.T, out=buf)
        buf.mul_(-2.0).add_(q_sq)[:, : cols.stop - cols.start].add_(gallery.sq_norm[None, cols])

    return gallery.blockwise(q_hat, score)


def ranking_distance(cos: torch.Tensor) -> torch.Tensor:
    """``-clip(cos)``: orders exactly as ``arccos(clip(cos))`` (see the module docstring), without rounding ties."""
    return cos.neg().clamp_(-1.0 + CLIP_EPS, 1.0 - CLIP_EPS)


def arccos_distance(cos: torch.Tensor) -> torch.Tensor:
    """The official distance values ``arccos(clip(cos, -1+1e-5, 1-1e-5))``."""
    return cos.clamp(-1.0 + CLIP_EPS, 1.0 - CLIP_EPS).arccos_()


def distance_matrix(
    q_feat: torch.Tensor,
    g_feat: torch.Tensor | Gallery,
    *,
    q_mask: torch.Tensor | None = None,
    metric: str = "masked_cosine",
) -> torch.Tensor:
    """(Q, G) ranking distances, smaller is better: what the evaluator sorts.

    ``masked_cosine`` (DPM, needs ``q_mask``) and ``cosine`` give :func:`ranking_distance` of the cosine
    (bit for bit ``ranking_distance(masked_cosine_similarity(...))``); ``euclidean`` the squared
    Euclidean distance of the normalised features.
    """
    gallery = _as_gallery(g_feat)
    if metric == "masked_cosine":
        if q_mask is None:
            raise ValueError("metric masked_cosine needs the query masks (q_mask)")
        return _masked_cosine(q_feat, q_mask, gallery, negate=True, clip=True)
    if metric == "cosine":
        return _cosine(q_feat, gallery, negate=True, clip=True)
    if metric == "euclidean":
        return euclidean_distance(q_feat, gallery)
    raise ValueError(f"unknown metric {metric!r}; expected one of {', '.join(METRICS)}")


# ---------------------------------------------------------------------------------------------------
# Ranks of the true matches


def same_pid_pairs(
    q_pids: torch.Tensor, g_pids: torch.Tensor, order: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of all query/gallery pairs with the same pid, row-major with columns ascending.

    Found through the gallery sorted by pid (O(pairs)), not by comparing the whole (Q, G) grid; ``order``
    is ``argsort(g_pids, stable=True)`` when the caller keeps it for several query chunks.
    """
    order = torch.argsort(g_pids, stable=True) if order is None else order
    sorted_pids = g_pids[order]
    lo = torch.searchsorted(sorted_pids, q_pids)
    num = torch.searchsorted(sorted_pids, q_pids, right=True) - lo
    rows = torch.repeat_interleave(torch.arange(q_pids.numel(), device=q_pids.device), num)
    within = torch.arange(rows.numel(), device=q_pids.device) - (torch.cumsum(num, 0) - num)[rows]
    return rows, order[lo[rows] + within]


def true_matches(
    q_pids: torch.Tensor,
    g_pids: torch.Tensor,
    q_camids: torch.Tensor,
    g_camids: torch.Tensor,
    order: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(match rows, match cols, junk rows, junk cols): same pid other camera, and same pid same camera."""
    rows, cols = same_pid_pairs(q_pids, g_pids, order)
    junk = q_camids[rows] == g_camids[cols]
    return rows[~junk], cols[~junk], rows[junk], cols[junk]


def match_table(
    rows: torch.Tensor, values: torch.Tensor, tie: torch.Tensor, num_q: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each query's true matches sorted by (distance, tie index), padded with (inf, int64 max).

    ``rows``/``values``/``tie`` list the matches in any order. Returns ``(match_val, match_tie, num_rel)``
    with ``match_val``/``match_tie`` of shape (num_q, max matches + 1): the padding column lets any count
    index it.
    """
    device = values.device
    order = torch.argsort(tie, stable=True)
    order = order[torch.argsort(values[order], stable=True)]
    order = order[torch.argsort(rows[order], stable=True)]
    rows, values, tie = rows[order], values[order], tie[order]
    num_rel = torch.bincount(rows, minlength=num_q)
    width = max(int(num_rel.max()) if num_q else 0, 1) + 1
    slot = torch.arange(rows.numel(), device=device) - (torch.cumsum(num_rel, 0) - num_rel)[rows]
    match_val = torch.full((num_q, width), float("inf"), dtype=values.dtype, device=device)
    match_tie = torch.full((num_q, width), torch.iinfo(torch.int64).max, dtype=torch.int64, device=device)
    match_val[rows, slot] = values
    match_tie[rows, slot] = tie
    return match_val, match_tie, num_rel


class NonFiniteDistanceError(ValueError):
    """Distances with NaN cannot be ranked; ``num_queries`` query rows hold at least one."""

    def __init__(self, num_queries: int, of: int) -> None:
        self.num_queries, self.of = num_queries, of
        super().__init__(
            f"{num_queries} of {of} queries have NaN distances (non-finite features: a diverged model?); "
            "nothing was ranked"
        )


def refuse_nan(dist: torch.Tensor) -> None:
    """Raise :class:`NonFiniteDistanceError` when a row of ``dist`` holds a NaN."""
    bad = int(torch.isnan(dist).any(1).sum()) if dist.numel() else 0
    if bad:
        raise NonFiniteDistanceError(bad, dist.shape[0])


def count_at_or_before(
    dist: torch.Tensor,
    tie: torch.Tensor,
    match_val: torch.Tensor,
    match_tie: torch.Tensor,
    junk_rows: torch.Tensor,
    junk_cols: torch.Tensor,
) -> torch.Tensor:
    """(Q, width-1) int64: kept columns of ``dist`` ranked at or before each sorted match (matches included).

    An item is ahead of another when its distance is smaller, or equal with a smaller tie index
    (``tie``, one per column). The columns may be any part of the gallery as long as the table lists
    all of each query's matches: counts over disjoint parts add up to the matches' ranks.
    """
    refuse_nan(dist)
    num_rows, width = match_val.shape
    counts = torch.zeros((num_rows, width + 1), dtype=torch.int64, device=dist.device)
    if dist.numel():
        cells = _Cells.build(dist, match_val, match_tie)
        per_cell = torch.zeros(
            (num_rows, CELLS), dtype=torch.int32, device=dist.device
        )  # items per cell (int32: faster)
        one = torch.ones((), dtype=torch.int32, device=dist.device)
        for start in range(0, dist.shape[1], RANK_PIECE):  # column pieces: small temporaries, reused memory
            piece = dist[:, start : start + RANK_PIECE]
            item_cell = cells.of(piece)
            per_cell.scatter_add_(1, item_cell, one.expand_as(item_cell))
            rows, cols = cells.holds_match.gather(1, item_cell).nonzero(as_tuple=True)
            bucket = _buckets(rows, piece[rows, cols], tie[start + cols], match_val, match_tie)
            counts.index_put_((rows, bucket), torch.tensor(1, device=dist.device), accumulate=True)
        # An item in a cell holding no match has exactly the matches of the lower cells ahead of it: bucket t
        # holds the items of the cells from match t-1's cell to match t's (cells holding a match left out).
        before = torch.zeros((num_rows, CELLS + 1), dtype=torch.int64, device=dist.device)
        torch.cumsum(per_cell.masked_fill_(cells.holds_match, 0), 1, out=before[:, 1:])
        edges = torch.cat(
            [
                cells.match_cell.new_zeros(num_rows, 1),
                cells.match_cell,
                cells.match_cell.new_full((num_rows, 1), CELLS),
            ],
            1,
        )
        within = before.gather(1, edges)
        counts += within[:, 1:] - within[:, :-1]
    bucket = _buckets(junk_rows, dist[junk_rows, junk_cols], tie[junk_cols], match_val, match_tie)
    counts.index_put_((junk_rows, bucket), torch.tensor(-1, device=dist.device), accumulate=True)
    return counts.cumsum(1)[:, : width - 1]


RANK_PIECE = 8192  # gallery columns ranked at once in count_at_or_before
CELLS = 16384  # distance cells per query chunk (_Cells)


@dataclass
class _Cells:
    """A table that replaces most of ``searchsorted(match_val, dist)``'s binary searches by one look-up.

    The chunk's distances are cut into CELLS cells by one non-decreasing map. An item in a cell holding no
    match has exactly the matches of the lower cells ahead of it; only the items of cells
    holding a match (a few per cent) need a search. The same integers as searching every item, for any
    non-decreasing map: when the distances are not all finite or their range overflows their dtype, the map is
    taken over the finite values in float64 halves (so it cannot overflow or produce NaN) and ``±inf`` fall
    into the first and last cells, where the exact search orders them.
    """

    lo: torch.Tensor
    scale: torch.Tensor
    match_cell: torch.Tensor  # (Q, W) int64: each sorted match's cell (CELLS for padding), non-decreasing
    holds_match: torch.Tensor  # (Q, CELLS) bool
    wide: bool = False  # the float64-halves map (non-finite values or an overflowing range)

    @classmethod
    def build(cls, dist: torch.Tensor, match_val: torch.Tensor, match_tie: torch.Tensor) -> _Cells:
        lo, hi = dist.min(), dist.max()
        one = torch.ones((), dtype=dist.dtype, device=dist.device)
        if bool(torch.isfinite(hi - lo)):
            cells = cls(lo, (CELLS / (hi - lo)).clamp_(max=1e30) if bool(hi > lo) else one, one, one)
        else:
            finite = torch.isfinite(dist)
            lo = dist.masked_fill(~finite, float("inf")).min().double() / 2 if bool(finite.any()) else one.double()
            hi = dist.masked_fill(~finite, float("-inf")).max().double() / 2 if bool(finite.any()) else one.double()
            cells = cls(lo, (CELLS / (hi - lo)).clamp_(max=1e30) if bool(hi > lo) else one.double(), one, one, True)
        padding = match_tie == torch.iinfo(torch.int64).max  # match_table's padding (+inf): past every item
        m_cell = cells.of(match_val).masked_fill_(padding, CELLS)
        per_cell = torch.zeros((dist.shape[0], CELLS + 1), dtype=torch.int64, device=dist.device)
        per_cell.scatter_add_(1, m_cell, torch.ones_like(m_cell))
        cells.match_cell, cells.holds_match = m_cell, per_cell[:, :CELLS] > 0
        return cells

    def of(self, x: torch.Tensor) -> torch.Tensor:
        """floor((x - lo)·scale) clamped to the cells: non-decreasing in x (``±inf`` to the end cells)."""
        if self.wide:
            return (x.double() / 2 - self.lo).mul_(self.scale).floor_().clamp_(0, CELLS - 1).long()
        return (x - self.lo).mul_(self.scale).floor_().clamp_(0, CELLS - 1).long()


def _buckets(
    rows: torch.Tensor, values: torch.Tensor, tie: torch.Tensor, match_val: torch.Tensor, match_tie: torch.Tensor
) -> torch.Tensor:
    """Per listed item (row, distance, tie index): the number of its row's matches strictly ahead of it.

    The matches with a smaller distance (a binary search of the row's sorted matches) and, for an item
    whose distance equals a match's (a tie, e.g. the match itself), the tied matches with a smaller tie index.
    """
    if rows.numel() == 0:
        return rows.clone()
    count = torch.bincount(rows, minlength=match_val.shape[0])
    slot = torch.arange(rows.numel(), device=rows.device) - (count.cumsum(0) - count)[rows]
    searched = values.new_full((match_val.shape[0], int(count.max())), float("inf"))
    searched[rows, slot] = values  # rows padded to one length: one batched search, no (n, W) copy
    bucket = torch.searchsorted(match_val, searched)[rows, slot]
    tied = (match_val[rows, bucket] == values).nonzero().squeeze(1)
    if tied.numel():
        t_rows = rows[tied]
        ahead = (match_val[t_rows] == values[tied][:, None]) & (match_tie[t_rows] < tie[tied][:, None])
        bucket[tied] += ahead.sum(1)
    return bucket


def valid_ranks(at_or_before: torch.Tensor, num_rel: torch.Tensor) -> torch.Tensor:
    """The 1-based match ranks, zero past each query's ``num_rel`` matches."""
    width = at_or_before.shape[1]
    return at_or_before * (torch.arange(width, device=num_rel.device)[None, :] < num_rel[:, None])


def match_ranks(
    dist: torch.Tensor, q_pids: torch.Tensor, g_pids: torch.Tensor, q_camids: torch.Tensor, g_camids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """1-based ranks of each query's true matches in its kept gallery list, ascending.

    Kept: every gallery item except those with the query's pid *and* camera. True match: same pid,
    other camera. Ties in distance are ordered by gallery index (a stable sort).

    Returns:
        ``ranks`` (Q, R) int64, row i valid in its first ``num_rel[i]`` entries (0 after), and
        ``num_rel`` (Q,) int64.
    """
    m_rows, m_cols, j_rows, j_cols = true_matches(q_pids, g_pids, q_camids, g_camids)
    match_val, match_tie, num_rel = match_table(m_rows, dist[m_rows, m_cols], m_cols, dist.shape[0])
    tie = torch.arange(dist.shape[1], device=dist.device)
    return valid_ranks(count_at_or_before(dist, tie, match_val, match_tie, j_rows, j_cols), num_rel), num_rel


# ---------------------------------------------------------------------------------------------------
# Metrics from match ranks: additive sums (for query shards) and their final values


@dataclass
class RankingSums:
    """Per-query results of scored queries. Sums over disjoint query shards are exact (one writer per slot).

    ``ap``, ``inp``, ``num_rel`` and ``first_rank`` have one slot per query of the whole query set; a
    shard fills only its own slots (0 elsewhere, also for queries without a match).
    """

    cmc_counts: torch.Tensor  # (max_rank,) int64: valid queries whose first match is within rank k+1
    ap: torch.Tensor  # (Q,) float64
    inp: torch.Tensor  # (Q,) float64
    num_rel: torch.Tensor  # (Q,) int64: true matches kept (0: skipped)
    first_rank: torch.Tensor  # (Q,) int64: rank of the first true match (0: skipped)

    @classmethod
    def zeros(cls, num_query: int, max_rank: int, device: torch.device | str = "cpu") -> RankingSums:
        f64: dict[str, Any] = dict(dtype=torch.float64, device=device)
        i64: dict[str, Any] = dict(dtype=torch.int64, device=device)
        return cls(
            torch.zeros(max_rank, **i64),
            torch.zeros(num_query, **f64),
            torch.zeros(num_query, **f64),
            torch.zeros(num_query, **i64),
            torch.zeros(num_query, **i64),
        )

    def add_(self, ranks: torch.Tensor, num_rel: torch.Tensor, start: int) -> RankingSums:
        """Account queries ``start .. start+len(num_rel)`` from their :func:`match_ranks` output."""
        valid = num_rel > 0
        n = num_rel.clamp_min(1)
        first = ranks[:, 0]
        hist = torch.bincount(
            first[valid].clamp_max(self.cmc_counts.numel() + 1), minlength=self.cmc_counts.numel() + 2
        )
        self.cmc_counts += hist[1:-1].cumsum(0)  # first rank r counts for every k >= r
        slot = torch.arange(ranks.shape[1], device=ranks.device, dtype=torch.float64)[None, :] + 1.0
        precision = torch.where(ranks > 0, slot / ranks.clamp_min(1).to(torch.float64), 0.0)
        last = ranks.gather(1, (n - 1)[:, None]).squeeze(1)
        end = start + num_rel.numel()
        self.ap[start:end] = precision.sum(1) / n * valid
        self.inp[start:end] = torch.where(valid, n.to(torch.float64) / last.clamp_min(1).to(torch.float64), 0.0)
        self.num_rel[start:end] = num_rel
        self.first_rank[start:end] = torch.where(valid, first, 0)
        return self

    def flat(self) -> torch.Tensor:
        """All fields in one float64 vector (integers below 2**53 are exact), for a single all-reduce."""
        return torch.cat([self.cmc_counts.double(), self.ap, self.inp, self.num_rel.double(), self.first_rank.double()])

    @classmethod
    def from_flat(cls, flat: torch.Tensor, num_query: int, max_rank: int) -> RankingSums:
        cmc, ap, inp, num_rel, first = flat.split([max_rank, num_query, num_query, num_query, num_query])
        return cls(cmc.round().long(), ap, inp, num_rel.round().long(), first.round().long())


@dataclass
class RetrievalMetrics:
    cmc: torch.Tensor  # (max_rank,) float64: fraction of valid queries matched within rank k+1
    mAP: float
    mINP: float
    num_valid: int  # queries with at least one true match (the rest are skipped, as in the official code)
    num_query: int
    num_gallery: int
    ap: torch.Tensor  # (Q,) per-query AP (0 for skipped queries)
    num_rel: torch.Tensor  # (Q,)

    def as_dict(self, ranks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
        out = {"mAP": self.mAP, "mINP": self.mINP}
        out.update({f"rank{k}": float(self.cmc[min(k, self.cmc.numel()) - 1]) for k in ranks})
        out.update(
            {
                "num_query": float(self.num_query),
                "num_gallery": float(self.num_gallery),
                "num_valid_query": float(self.num_valid),
            }
        )
        return out


def effective_max_rank(max_rank: int, num_gallery: int) -> int:
    """The official code shortens the CMC to the gallery size when the gallery is smaller."""
    return max(1, min(max_rank, num_gallery))


def finalize(sums: RankingSums, *, num_gallery: int) -> RetrievalMetrics:
    """Means over the valid queries, in query order (so every shard layout gives the same floats)."""
    valid = sums.num_rel > 0
    num_valid = int(valid.sum())
    if num_valid == 0:
        raise ValueError(
            "no query has a true match in the gallery once same-pid-same-camera items are removed; "
            "check the query/gallery split and the camera ids"
        )
    return RetrievalMetrics(
        cmc=sums.cmc_counts.double() / num_valid,
        mAP=float(sums.ap.sum() / num_valid),
        mINP=float(sums.inp.sum() / num_valid),
        num_valid=num_valid,
        num_query=int(sums.num_rel.numel()),
        num_gallery=num_gallery,
        ap=sums.ap,
        num_rel=sums.num_rel,
    )


def query_chunks(num_query: int, chunk: int, *, rank: int = 0, world_size: int = 1) -> list[tuple[int, int]]:
    """This rank's contiguous run of ``[start, end)`` query chunks.

    Chunk boundaries depend on ``chunk`` only, never on the world size, so every chunk is the same
    matrix product on any number of ranks (identical floats); ranks take whole chunks.
    """
    bounds = [(s, min(s + chunk, num_query)) for s in range(0, num_query, chunk)]
    n = len(bounds)
    return bounds[rank * n // world_size : (rank + 1) * n // world_size]


def score_queries(
    chunk_distance: Callable[[int, int], torch.Tensor],
    q_pids: torch.Tensor,
    g_pids: torch.Tensor,
    q_camids: torch.Tensor,
    g_camids: torch.Tensor,
    *,
    chunks: list[tuple[int, int]],
    max_rank: int = 50,
) -> RankingSums:
    """Rank the given query chunks against the whole gallery; ``chunk_distance(start, end)`` gives (end-start, G)."""
    num_gallery = g_pids.numel()
    sums = RankingSums.zeros(q_pids.numel(), effective_max_rank(max_rank, num_gallery), device=g_pids.device)
    try:
        for start, end in chunks:
            ranks, num_rel = match_ranks(
                chunk_distance(start, end), q_pids[start:end], g_pids, q_camids[start:end], g_camids
            )
            sums.add_(ranks, num_rel, start)
    except NonFiniteDistanceError:  # name the count over every chunk, not just the first bad one
        bad = sum(int(torch.isnan(chunk_distance(s, e)).any(1).sum()) for s, e in chunks)
        raise NonFiniteDistanceError(bad, sum(e - s for s, e in chunks)) from None
    return sums


def cmc_map_minp(
    dist: torch.Tensor,
    q_pids: torch.Tensor,
    g_pids: torch.Tensor,
    q_camids: torch.Tensor,
    g_camids: torch.Tensor,
    *,
    max_rank: int = 50,
    query_chunk: int = 1024,
) -> RetrievalMetrics:
    """CMC, mAP and mINP of a (Q, G) distance matrix (smaller is better) under the Market protocol."""
    sums = score_queries(
        lambda s, e: dist[s:e],
        q_pids,
        g_pids,
        q_camids,
        g_camids,
        chunks=query_chunks(dist.shape[0], query_chunk),
        max_rank=max_rank,
    )
    return finalize(sums, num_gallery=dist.shape[1])


def evaluate_features(
    q_feat: torch.Tensor,
    g_feat: torch.Tensor,
    q_pids: torch.Tensor,
    g_pids: torch.Tensor,
    q_camids: torch.Tensor,
    g_camids: torch.Tensor,
    *,
    q_mask: torch.Tensor | None = None,
    metric: str = "masked_cosine",
    max_rank: int = 50,
    query_chunk: int = 256,
) -> RetrievalMetrics:
    """Single-process convenience: distances chunk by chunk, then :func:`finalize`. Never builds Q×G."""
    sums = score_queries(
        chunk_distance_fn(q_feat, g_feat, q_mask=q_mask, metric=metric),
        q_pids,
        g_pids,
        q_camids,
        g_camids,
        chunks=query_chunks(q_feat.shape[0], query_chunk),
        max_rank=max_rank,
    )
    return finalize(sums, num_gallery=g_feat.shape[0])


def chunk_distance_fn(
    q_feat: torch.Tensor, g_feat: torch.Tensor, *, q_mask: torch.Tensor | None = None, metric: str = "masked_cosine"
) -> Callable[[int, int], torch.Tensor]:
    """``(start, end) -> distance_matrix`` of those queries against the (once-prepared) gallery."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {', '.join(METRICS)}")
    if metric == "masked_cosine" and q_mask is None:
        raise ValueError("metric masked_cosine needs the query masks (q_mask)")
    gallery = Gallery.build(g_feat)

    def chunk(start: int, end: int) -> torch.Tensor:
        mask = q_mask[start:end] if q_mask is not None else None
        return distance_matrix(q_feat[start:end], gallery, q_mask=mask, metric=metric)

    return chunk


def top_k_gallery(
    dist_row: torch.Tensor, q_pid: int, q_camid: int, g_pids: torch.Tensor, g_camids: torch.Tensor, k: int
) -> torch.Tensor:
    """Indices of the first ``k`` kept gallery items of one query, in (distance, index) order."""
    kept = (~((g_pids == q_pid) & (g_camids == q_camid))).nonzero().squeeze(1)
    order = torch.sort(dist_row[kept], stable=True).indices
    return kept[order[:k]]


def pick_queries(ap: torch.Tensor, num_rel: torch.Tensor, num: int) -> list[int]:
    """``num`` valid queries spread from the lowest to the highest AP (deterministic), for pictures."""
    valid = (num_rel > 0).nonzero().squeeze(1)
    if num <= 0 or valid.numel() == 0:
        return []
    by_ap = valid[torch.sort(ap[valid], stable=True).indices]
    positions = torch.linspace(0, by_ap.numel() - 1, min(num, by_ap.numel())).round().long()
    return sorted(set(by_ap[positions].tolist()))
