"""k-reciprocal re-ranking from sparse k-nearest-neighbour lists, distributed by rows (``eval.rerank_method=sparse``).

The same steps as :mod:`dpm_dist.eval.rerank` (Zhong et al. 2017, docs/method.md §7.6) without the dense
(Q+G)² matrices and without any rank holding all features. The joint set has N = Q + G rows with
world-size-independent **row ids**: query q is row q (queries sorted by key), gallery item g is row Q + g
(its global index). Rank r owns the queries ``r·Q/R .. (r+1)·Q/R`` and its gallery share.

1. Neighbour lists: every rank in turn broadcasts its own rows' features (one foreign block held at a
   time); each rank scores its rows against it in fixed-shape products and keeps, per row, the
   K = max(k1+1, k2) nearest (by squared distance of the normalised features, ties by row id) and the
   row maximum. The lists and maxima (N·K ids, N floats) are then all-gathered: never the features.
2. Encodings V of its own rows: the expanded k-reciprocal sets come from the gathered lists; their
   weights exp(-d / row max) take d from the row's own list where the member is in it (most are); for
   the others a second broadcast pass of the features computes the pair alone.
3. Query expansion: the mean of each own row's k2 neighbours' V rows. The foreign ones come in a third
   broadcast pass (each rank's V block in turn, keeping only the rows needed): at most
   min(N, k2·n_r) rows of at most (k1+1)·(round(k1/2)+2) entries per rank of n_r rows.
4. Jaccard by gallery columns: the expanded rows of all queries are all-gathered (Q rows); each rank
   builds an inverted index (column -> its gallery rows, the official ``invIndex``) and returns, for a
   chunk of queries, ``(1-λ)·jaccard + λ·original`` against its gallery share only: exactly the
   distances the gallery-sharded scoring needs (:mod:`dpm_dist.eval.sharded`).

Neighbour order: the squared distance before the division by the row maximum (the division keeps the
order, except where it rounds two distances onto one value), ties by row id; the dense implementation
orders the divided values, ties by index. Nothing else differs from it but rounding (pair distances
computed alone, sums in another order): ~1e-6 (``tests/test_retrieval_rerank.py``). Every value is
computed in fixed shapes and in a fixed order from row ids, so any world size gives the same bits.
Memory per rank: its own feature block and one foreign block with its padded copy for the products
(3 × N/R·D·4 bytes with even shares), its rows' V (N/R·(k1+1)(k1/2+2)·12 bytes), the gathered lists
(N·K·8 bytes), the queries' expanded rows, its share's inverted index and one block of queries. Every function that takes ``peers`` talks to other ranks ("Collective").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dpm_dist import dist
from dpm_dist.eval.retrieval import GALLERY_BLOCK, Gallery, l2_normalize, match_table

ROW_CHUNK = 256  # own rows scored at once, zero-padded to this shape
PAIR_CHUNK = 1 << 22  # (query entry, gallery row) pairs accumulated at once in the Jaccard step
PAIR_PIECE = 1 << 14  # (row, member) feature pairs multiplied at once for the weights of V
PIECE = 16  # gallery blocks (of GALLERY_BLOCK columns) scored before each merge of the neighbour lists


@dataclass(frozen=True)
class Peers:
    """The ranks taking part; the identity on one (so a single process needs no process group)."""

    rank: int = 0
    world: int = 1

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return dist.all_gather_varlen(tensor) if self.world > 1 else tensor

    def objects(self, obj) -> list:
        return dist.all_gather_objects(obj) if self.world > 1 else [obj]

    def broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        return dist.broadcast_tensor(tensor, src) if self.world > 1 else tensor

    def blocks(self, mine: torch.Tensor, sizes: list[int]):
        """(src, rank src's tensor) for every rank in turn, one held at a time. Collective."""
        for src, size in enumerate(sizes):
            if not size:  # nothing to send: no collective
                continue
            if src == self.rank:
                yield src, self.broadcast(mine.contiguous(), src)
            else:
                yield src, self.broadcast(mine.new_empty((size, *mine.shape[1:])), src)


def _distances(rows: torch.Tensor, rows_sq: torch.Tensor, cols: Gallery) -> torch.Tensor:
    """(C, n) squared distances, (‖a‖² + ‖b‖²) - 2·a·b clamped at 0; ``rows`` padded to ROW_CHUNK."""
    return (rows_sq[:, None] + cols.sq_norm[None, :]).sub_(cols.product(rows), alpha=2.0).clamp_min_(0.0)


def _padded(x: torch.Tensor, rows: int) -> torch.Tensor:
    return x if x.shape[0] == rows else torch.cat([x, x.new_zeros((rows - x.shape[0], *x.shape[1:]))])


def _merge(
    best_val: torch.Tensor, best_id: torch.Tensor, rows: torch.Tensor, values: torch.Tensor, ids: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best per row of (running lists, new candidates as flat (row, value, id) lists) by (value, id)."""
    num = best_val.shape[0]
    keep = torch.isfinite(best_val)
    old_rows = torch.arange(num, device=rows.device)[:, None].expand_as(best_val)[keep]
    val, idx, _ = match_table(
        torch.cat([old_rows, rows]), torch.cat([best_val[keep], values]), torch.cat([best_id[keep], ids]), num
    )
    if val.shape[1] < k:
        val = torch.cat([val, val.new_full((num, k - val.shape[1]), float("inf"))], 1)
        idx = torch.cat([idx, idx.new_full((num, k - idx.shape[1]), torch.iinfo(torch.int64).max)], 1)
    return val[:, :k], idx[:, :k]


def _scan(
    rows: torch.Tensor,
    rows_sq: torch.Tensor,
    num: int,
    cols: Gallery,
    cols_sq: torch.Tensor,
    col_ids: torch.Tensor,
    best_val: torch.Tensor,
    best_id: torch.Tensor,
    maxima: torch.Tensor,
) -> None:
    """Update the ``num`` real rows' k best lists and maxima (in place) with one block's columns.

    Distances ``((‖b‖² - 2·a·b) + ‖a‖²)`` clamped at 0, in fixed-shape ``(ROW_CHUNK, D) @ (D, 512)``
    products with ‖b‖² folded in (+inf on padding columns); PIECE blocks at a time, whose candidates are
    the entries at or below the running k-th value (or, while a row's list is not full, the piece's own k-th).
    """
    k = best_val.shape[1]
    buf = rows.new_empty((min(PIECE, cols.feat.shape[0]), rows.shape[0], GALLERY_BLOCK))
    for first in range(0, cols.feat.shape[0], PIECE):
        blocks = cols.feat[first : first + PIECE]
        d = buf[: blocks.shape[0]]
        for block, sq, part in zip(blocks, cols_sq[first : first + PIECE], d):
            torch.addmm(sq, rows, block.T, alpha=-2.0, out=part)
        d = d.add_(rows_sq[None, :, None]).clamp_min_(0.0)[:, :num]
        real = min(cols.size - first * GALLERY_BLOCK, d.shape[0] * GALLERY_BLOCK)
        flat = None
        tau = best_val[:, k - 1]
        if not bool(torch.isfinite(tau).all()):
            flat = d.permute(1, 0, 2).reshape(num, -1)[:, :real]
            tau = torch.minimum(tau, flat.topk(min(k, real), dim=1, largest=False).values[:, -1])
        if flat is not None:
            piece_max = flat.amax(1)
        elif real == d.shape[0] * GALLERY_BLOCK:
            piece_max = d.amax((0, 2))
        else:  # the padding columns (+inf) of the last block left out
            piece_max = d[-1, :, : real % GALLERY_BLOCK].amax(1)
            piece_max = torch.maximum(d[:-1].amax((0, 2)), piece_max) if d.shape[0] > 1 else piece_max
        maxima.copy_(torch.maximum(maxima, piece_max))
        b, r, c = (d <= tau[None, :, None]).nonzero(as_tuple=True)
        col = (first + b) * GALLERY_BLOCK + c
        keep = col < cols.size
        b, r, c, col = b[keep], r[keep], c[keep], col[keep]
        val, idx = _merge(best_val, best_id, r, d[b, r, c], col_ids[col], k)
        best_val.copy_(val)
        best_id.copy_(idx)


def _neighbours(
    ids: torch.Tensor, feat: torch.Tensor, sq: torch.Tensor, sizes: list[int], k: int, peers: Peers
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(n, k) nearest row ids of each own row (nearest first), their distances and (n,) row maxima. Collective."""
    num = feat.shape[0]
    best_val = feat.new_full((num, k), float("inf"))
    best_id = torch.full((num, k), torch.iinfo(torch.int64).max, dtype=torch.int64, device=feat.device)
    maxima = feat.new_zeros(num)
    id_blocks = peers.blocks(ids, sizes)
    for (_, block), (_, block_ids) in zip(peers.blocks(feat, sizes), id_blocks):
        cols = Gallery.build(block, normalize=False)
        cols_sq = cols.sq_norm.new_full((cols.feat.shape[0] * GALLERY_BLOCK,), float("inf"))
        cols_sq[: cols.size] = cols.sq_norm
        cols_sq = cols_sq.view(-1, 1, GALLERY_BLOCK)
        for start in range(0, num, ROW_CHUNK):
            end = min(start + ROW_CHUNK, num)
            _scan(
                _padded(feat[start:end], ROW_CHUNK),
                _padded(sq[start:end], ROW_CHUNK),
                end - start,
                cols,
                cols_sq,
                block_ids,
                best_val[start:end],
                best_id[start:end],
                maxima[start:end],
            )
    return best_id, best_val, maxima.clamp_min_(torch.finfo(feat.dtype).tiny)


def _reciprocal(table: torch.Tensor, rows: torch.Tensor, k: int) -> torch.Tensor:
    """(len(rows), k) mask: neighbour t of row i is k-reciprocal (i is among its k nearest)."""
    top = table[rows, :k]
    return (table[top][:, :, :k] == rows[:, None, None]).any(-1)


def _members(table: torch.Tensor, rows: torch.Tensor, recip_half: torch.Tensor, k1: int) -> torch.Tensor:
    """(len(rows), S) sorted row ids of each row's expanded k-reciprocal set, N (none) past its end."""
    num, half = table.shape[0], int(round(k1 / 2))  # numpy's np.around: round half to even, like Python's round
    members = torch.where(_reciprocal(table, rows, k1 + 1), table[rows, : k1 + 1], num)
    safe = members.clamp_max(num - 1)
    cand_sets = table[safe, : half + 1]
    cand_valid = recip_half[safe] & (members < num)[:, :, None]
    inside = (cand_sets[..., None] == members[:, None, None, :]).any(-1) & cand_valid
    accept = inside.sum(-1) * 3 > 2 * cand_valid.sum(-1)  # |H_c ∩ R(i)| > 2/3 |H_c|
    expanded = torch.where(cand_valid & accept[..., None], cand_sets, num).flatten(1)
    cols = torch.cat([members, expanded], 1).sort(dim=1).values
    cols[:, 1:][cols[:, 1:] == cols[:, :-1]] = num  # each member once
    return cols.sort(dim=1).values


@dataclass
class _Table:
    """What every rank knows of every row: its neighbour list, maximum, owner and place in the owner's block."""

    neighbours: torch.Tensor  # (N, K) row ids
    maxima: torch.Tensor  # (N,)
    owner: torch.Tensor  # (N,) rank
    position: torch.Tensor  # (N,) row in the owner's block


def _gather_table(
    ids: torch.Tensor, neighbours: torch.Tensor, maxima: torch.Tensor, sizes: list[int], peers: Peers
) -> _Table:
    """Collective: the neighbour lists and maxima of all rows (O(N·K), no features)."""
    all_ids = peers.gather(ids)
    num = all_ids.numel()
    device = ids.device
    table = _Table(
        neighbours.new_empty((num, neighbours.shape[1])), maxima.new_empty(num), ids.new_empty(num), ids.new_empty(num)
    )
    table.neighbours[all_ids] = peers.gather(neighbours)
    table.maxima[all_ids] = peers.gather(maxima)
    table.owner[all_ids] = torch.repeat_interleave(
        torch.arange(len(sizes), device=device), torch.tensor(sizes, device=device)
    )
    table.position[all_ids] = torch.cat([torch.arange(n, device=device) for n in sizes])
    return table


def _scanned(cols: torch.Tensor, near: torch.Tensor, near_val: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The scan's distances of the members in the row's own neighbour list (0 elsewhere), and where they are."""
    raw, found = near_val.new_zeros(cols.shape), torch.zeros(cols.shape, dtype=torch.bool, device=cols.device)
    for start in range(0, cols.shape[0], ROW_CHUNK):
        part = slice(start, start + ROW_CHUNK)
        hit = cols[part, :, None] == near[part, None, :]  # (c, S, K)
        found[part] = hit.any(-1)
        raw[part] = torch.where(found[part], near_val[part].gather(1, hit.to(torch.uint8).argmax(-1)), 0.0)
    return raw, found


def _encodings(
    ids: torch.Tensor,
    feat: torch.Tensor,
    sq: torch.Tensor,
    near_val: torch.Tensor,
    table: _Table,
    sizes: list[int],
    k1: int,
    peers: Peers,
) -> tuple[torch.Tensor, torch.Tensor]:
    """V of the own rows as padded rows: (n, S) sorted row ids (N = none) and weights (0 there). Collective.

    A member's distance is the neighbour scan's where the member is in the row's own list (most are), else
    computed alone from the features (its owner's block, in a second broadcast pass).
    """
    num = table.neighbours.shape[0]
    half = int(round(k1 / 2))
    everyone = torch.arange(num, device=ids.device)
    recip_half = torch.cat(
        [_reciprocal(table.neighbours, everyone[s : s + ROW_CHUNK], half + 1) for s in range(0, num, ROW_CHUNK)]
    )
    cols = (
        torch.cat(
            [
                _members(table.neighbours, ids[s : s + ROW_CHUNK], recip_half, k1)
                for s in range(0, ids.numel(), ROW_CHUNK)
            ]
        )
        if ids.numel()
        else ids.new_zeros(0, (k1 + 1) * (half + 2))
    )
    distance, found = _scanned(cols, table.neighbours[ids], near_val)
    valid = cols < num
    owner = torch.where(valid & ~found, table.owner[cols.clamp_max(num - 1)], -1)
    for src, block in peers.blocks(feat, sizes):  # the other members' features, one block at a time
        rows, slots = (owner == src).nonzero(as_tuple=True)
        block_sq = (block * block).sum(1)
        for p in range(0, rows.numel(), PAIR_PIECE):
            r, s = rows[p : p + PAIR_PIECE], slots[p : p + PAIR_PIECE]
            at = table.position[cols[r, s]]
            dot = (feat[r] * block[at]).sum(1)
            distance[r, s] = ((sq[r] + block_sq[at]) - 2.0 * dot).clamp_min_(0.0)
    weight = torch.exp(-(distance / table.maxima[ids, None])) * valid
    weight /= weight.sum(1, keepdim=True)
    width = max(peers.objects(int(valid.sum(1).max()) if ids.numel() else 0) + [1])
    return cols[:, :width].contiguous(), weight[:, :width].contiguous()


def _coalesce(rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, num: int) -> tuple[torch.Tensor, ...]:
    """COO entries with duplicates summed (in input order) and the "none" column (num) dropped, sorted by (row, col)."""
    keep = cols < num
    key = rows[keep] * (num + 1) + cols[keep]
    uniq, inverse = torch.unique(key, return_inverse=True)
    summed = torch.zeros(uniq.numel(), dtype=vals.dtype, device=vals.device).index_add_(0, inverse, vals[keep])
    return uniq // (num + 1), uniq % (num + 1), summed


def _expanded(
    ids: torch.Tensor, v_idx: torch.Tensor, v_val: torch.Tensor, table: _Table, sizes: list[int], k2: int, peers: Peers
) -> tuple[torch.Tensor, ...]:
    """Query expansion of the own rows as COO (local row, row id, value): the mean of the k2 nearest rows of V. Collective."""
    num, local = table.neighbours.shape[0], torch.arange(ids.numel(), device=ids.device)
    if k2 == 1:  # the dense implementation uses V itself
        return _coalesce(local[:, None].expand_as(v_idx).flatten(), v_idx.flatten(), v_val.flatten(), num)
    need = torch.unique(table.neighbours[ids, :k2])
    slot = ids.new_full((num,), -1)
    slot[need] = torch.arange(need.numel(), device=ids.device)
    need_idx = ids.new_full((need.numel(), v_idx.shape[1]), num)
    need_val = v_val.new_zeros(need_idx.shape)
    for (src, idx), (_, val) in zip(peers.blocks(v_idx, sizes), peers.blocks(v_val, sizes)):
        mine = need[table.owner[need] == src]
        need_idx[slot[mine]] = idx[table.position[mine]]
        need_val[slot[mine]] = val[table.position[mine]]
    parts = [_coalesce(local[:0], local[:0], v_val.new_zeros(0), num)]
    for start in range(0, ids.numel(), ROW_CHUNK):
        near = slot[table.neighbours[ids[start : start + ROW_CHUNK], :k2]]  # (c, k2)
        cols, vals = need_idx[near].flatten(1), need_val[near].flatten(1) / k2
        rows = local[start : start + near.shape[0], None].expand_as(cols)
        parts.append(_coalesce(rows.flatten(), cols.flatten(), vals.flatten(), num))
    return tuple(torch.cat(p) for p in zip(*parts))


class SparseReRanking:
    """Re-ranked distances of the queries against this rank's gallery share, built collectively.

    ``q_feat``: all queries (Q, D), the same on every rank, sorted by key; ``g_feat``: this rank's gallery
    rows (n, D) with their global indices ``g_index`` (n,) in a gallery of ``num_gallery``.
    :meth:`chunk` is then local (no collective).
    """

    def __init__(
        self,
        q_feat: torch.Tensor,
        g_feat: torch.Tensor,
        g_index: torch.Tensor,
        num_gallery: int,
        *,
        k1: int = 20,
        k2: int = 6,
        lambda_value: float = 0.3,
        peers: Peers = Peers(),
    ) -> None:
        num_q = q_feat.shape[0]
        if num_q + num_gallery <= max(k1, k2):
            raise ValueError(
                f"re-ranking needs more than max(k1, k2) = {max(k1, k2)} samples, got "
                f"{num_q + num_gallery} (eval.rerank_k1 / eval.rerank_k2)"
            )
        q_lo, q_hi = peers.rank * num_q // peers.world, (peers.rank + 1) * num_q // peers.world
        device = q_feat.device
        q_hat = l2_normalize(q_feat.float())
        g_hat = l2_normalize(g_feat.float()) if g_feat.numel() else q_hat.new_zeros(0, q_hat.shape[1])
        ids = torch.cat([torch.arange(q_lo, q_hi, device=device), num_q + g_index.to(device)])
        feat = torch.cat([q_hat[q_lo:q_hi], g_hat])
        sq = (feat * feat).sum(1)
        sizes = [int(n) for n in peers.objects(ids.numel())]
        neighbours, near_val, maxima = _neighbours(ids, feat, sq, sizes, max(k1 + 1, k2), peers)
        table = _gather_table(ids, neighbours, maxima, sizes, peers)
        encodings = _encodings(ids, feat, sq, near_val, table, sizes, k1, peers)
        rows, cols, vals = _expanded(ids, *encodings, table, sizes, k2, peers)
        own_q = q_hi - q_lo
        is_query = rows < own_q
        self.q_rows, self.q_cols, self.q_vals = _gather_queries(
            rows[is_query] + q_lo, cols[is_query], vals[is_query], peers
        )
        self.q_start = torch.searchsorted(self.q_rows, torch.arange(num_q + 1, device=device))  # rows are sorted
        g_rows, g_cols, g_vals = rows[~is_query] - own_q, cols[~is_query], vals[~is_query]
        order = torch.argsort(g_cols, stable=True)
        self.g_rows, self.g_vals = g_rows[order], g_vals[order]
        self.col_count = torch.bincount(g_cols, minlength=table.neighbours.shape[0])
        self.col_start = torch.cumsum(self.col_count, 0) - self.col_count
        self.q_hat, self.q_sq, self.q_max = q_hat, (q_hat * q_hat).sum(1), table.maxima[:num_q]
        self.gallery = Gallery.build(g_hat, normalize=False)
        self.lambda_value = lambda_value
        self._last: tuple[int, torch.Tensor] | None = None

    def chunk(self, start: int, end: int) -> torch.Tensor:
        """(end-start, n) re-ranked distances of queries start..end against this rank's gallery rows."""
        out = [
            self._block(lo)[max(start - lo, 0) : end - lo] for lo in range(start - start % ROW_CHUNK, end, ROW_CHUNK)
        ]
        return torch.cat(out)

    def _block(self, lo: int) -> torch.Tensor:
        """Queries lo..lo+ROW_CHUNK: fixed blocks, so a value does not depend on the caller's chunks."""
        if self._last is not None and self._last[0] == lo:
            return self._last[1]
        hi = min(lo + ROW_CHUNK, self.q_hat.shape[0])
        overlap = _overlap(
            self.q_rows,
            self.q_cols,
            self.q_vals,
            self.q_start,
            lo,
            hi,
            self.g_rows,
            self.g_vals,
            self.col_start,
            self.col_count,
            self.gallery.size,
        )
        original = (
            _distances(_padded(self.q_hat[lo:hi], ROW_CHUNK), _padded(self.q_sq[lo:hi], ROW_CHUNK), self.gallery)[
                : hi - lo
            ]
            / self.q_max[lo:hi, None]
        )
        jaccard = 1.0 - overlap / (2.0 - overlap)
        final = jaccard.mul_(1.0 - self.lambda_value).add_(original.mul_(self.lambda_value))
        self._last = (lo, final)
        return final


def _gather_queries(
    rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, peers: Peers
) -> tuple[torch.Tensor, ...]:
    """Every rank's expanded query rows, in row order (ranks own ascending query ranges). Collective.

    Packed in float64 (row ids below 2**53 and float32 values exactly); a leading dummy entry keeps every part non-empty.
    """
    packed = torch.stack([rows.double(), cols.double(), vals.double()], 1)
    everything = peers.gather(torch.cat([packed.new_full((1, 3), -1.0), packed]))
    everything = everything[everything[:, 0] >= 0]
    return everything[:, 0].long(), everything[:, 1].long(), everything[:, 2].to(vals.dtype)


def _overlap(rows, cols, vals, row_start, lo, hi, g_rows, g_vals, col_start, col_count, num_g) -> torch.Tensor:
    """(hi-lo, G) sum over shared columns of min(V_i, V_j), pair lists cut to PAIR_CHUNK."""
    overlap = torch.zeros((hi - lo, num_g), dtype=vals.dtype, device=vals.device)
    first, last = int(row_start[lo]), int(row_start[hi])
    counts = col_count[cols[first:last]]
    cum = torch.cumsum(counts, 0)
    begin = first
    while begin < last:
        stop = first + int(
            torch.searchsorted(cum, int(cum[begin - first] - counts[begin - first]) + PAIR_CHUNK, right=True)
        )
        stop = min(max(stop, begin + 1), last)
        q_rows, q_cols, q_vals = rows[begin:stop] - lo, cols[begin:stop], vals[begin:stop]
        num = col_count[q_cols]
        entry = torch.repeat_interleave(torch.arange(num.numel(), device=num.device), num)
        within = torch.arange(entry.numel(), device=num.device) - (torch.cumsum(num, 0) - num)[entry]
        pos = col_start[q_cols][entry] + within
        flat = q_rows[entry] * num_g + g_rows[pos]
        overlap.view(-1).index_add_(0, flat, torch.minimum(q_vals[entry], g_vals[pos]))
        begin = stop
    return overlap


def sparse_k_reciprocal_distance(
    q_feat: torch.Tensor,
    g_feat: torch.Tensor,
    *,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    query_range: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Re-ranked (Q, G) distances (or rows ``query_range``) in this process alone, equal to
    ``rerank.k_reciprocal_distance`` up to rounding."""
    reranked = SparseReRanking(
        q_feat,
        g_feat,
        torch.arange(g_feat.shape[0], device=g_feat.device),
        g_feat.shape[0],
        k1=k1,
        k2=k2,
        lambda_value=lambda_value,
    )
    start, end = query_range if query_range is not None else (0, q_feat.shape[0])
    return reranked.chunk(start, end)
