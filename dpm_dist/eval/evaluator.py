"""Distributed evaluation: exact-once extraction, all-gather, query-sharded retrieval (docs/method.md §7).

    every rank: its share of the query and gallery loaders ─► model (eval, fp32, no grad) ─► (key, role,
        pid, camid, feat before BN, mask)
    all ranks:  variable-length all-gather ─► dedupe by (role, key) ─► sort by (role, key) ─► split by role
    rank r:     query chunks r·n/W .. (r+1)·n/W against the whole gallery ─► additive sums (CMC counts,
        per-query AP/INP slots) ─► all-reduce ─► identical metrics on every rank

Samples are identified by their key, never by their position, so the result does not depend on the
number of ranks, the loader's order or padding. The query chunks have fixed boundaries and each query's
AP lands in its own slot of the reduced vector (every other rank adds exact zeros), so every world size
computes the same floats. Every function that talks to other ranks says "Collective" and must be called
by all ranks.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

import torch

from dpm_dist import dist
from dpm_dist.dist import DistEnv
from dpm_dist.eval.embeddings import Embeddings
from dpm_dist.eval.retrieval import (
    NonFiniteDistanceError,
    RankingSums,
    RetrievalMetrics,
    chunk_distance_fn,
    finalize,
    query_chunks,
    score_queries,
)
from dpm_dist.eval.sharded import GalleryShard, as_shard, evaluate_sharded, shard_gallery

ROLES = ("query", "gallery")


@torch.no_grad()
def extract(
    model: torch.nn.Module, batches: Iterable[dict[str, Any]], *, device: torch.device | str, neck_feat: str = "before"
) -> Embeddings:
    """Embed this rank's batches with the model in eval mode, no autocast (its train/eval mode is restored).

    The feature is taken before the BNNeck (``neck_feat="before"``, the official ``TEST.NECK_FEAT``) or
    after it (``"after"``: running statistics, so a direction shared by every image is removed).

    Inputs take the dtype of the model's weights: fp32 (docs/method.md §7.1) unless an engine keeps them in half.
    """
    was_training = model.training
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    model.eval()
    keys: list[str] = []
    roles: list[str] = []
    pids, camids, feats, masks = [], [], [], []
    try:
        for batch in batches:
            camid = batch["camids"].to(device)
            with torch.autocast(device_type=torch.device(device).type, enabled=False):
                out = model(batch["images"].to(device, dtype=dtype), camid)
            keys += list(batch["keys"])
            roles += list(batch["roles"])
            pids.append(batch["pids"].to(device))
            camids.append(camid)
            feats.append((out.feat_bn if neck_feat == "after" else out.feat).float())
            masks.append(out.mask.float())
    finally:
        model.train(was_training)
    return _concat(keys, roles, pids, camids, feats, masks, device=device)


def _concat(keys, roles, pids, camids, feats, masks, *, device) -> Embeddings:
    if not feats:  # a rank may hold no samples; it still takes part in every collective
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return Embeddings(
            [], [], empty, empty.clone(), torch.zeros(0, 0, device=device), torch.zeros(0, 0, device=device)
        )
    return Embeddings(keys, roles, torch.cat(pids).long(), torch.cat(camids).long(), torch.cat(feats), torch.cat(masks))


def gather_embeddings(local: Embeddings) -> Embeddings:
    """Every rank's embeddings, deduplicated by (role, key) and sorted by it. Collective.

    The result is the same on every rank and independent of how the samples were split over ranks.
    """
    dim = max(int(d) for d in dist.all_gather_objects(local.feats.shape[1] if len(local) else 0))
    feats = local.feats if len(local) else local.feats.new_zeros(0, dim)
    masks = local.masks if len(local) else local.masks.new_zeros(0, dim)
    names = [name for part in dist.all_gather_objects(list(zip(local.roles, local.keys))) for name in part]
    everything = Embeddings(
        keys=[k for _, k in names],
        roles=[r for r, _ in names],
        pids=dist.all_gather_varlen(local.pids),
        camids=dist.all_gather_varlen(local.camids),
        feats=dist.all_gather_varlen(feats.contiguous()),
        masks=dist.all_gather_varlen(masks.contiguous()),
    )
    first: dict[tuple[str, str], int] = {}
    for i, name in enumerate(names):
        j = first.setdefault(name, i)  # duplicates (padding) are the same sample: keep one
        if j != i and (everything.pids[i] != everything.pids[j] or everything.camids[i] != everything.camids[j]):
            raise ValueError(
                f"sample {name[1]!r} ({name[0]}) appears twice with different pid/camera; keys must be unique"
            )
    return everything.select([first[name] for name in sorted(first)])


def split_roles(embeddings: Embeddings) -> tuple[Embeddings, Embeddings]:
    """(query, gallery) by each sample's role; raises if either is empty or a role is unknown."""
    unknown = sorted(set(embeddings.roles) - set(ROLES))
    if unknown:
        raise ValueError(f"unknown sample roles {unknown}; expected {ROLES}")
    parts = [embeddings.select([i for i, r in enumerate(embeddings.roles) if r == role]) for role in ROLES]
    for role, part in zip(ROLES, parts):
        if len(part) == 0:
            raise ValueError(f"the evaluation set has no {role} samples")
    return parts[0], parts[1]


def evaluate_embeddings(
    query: Embeddings, gallery: Embeddings | GalleryShard, eval_cfg: Any, env: DistEnv
) -> RetrievalMetrics:
    """Metrics of gathered query/gallery embeddings, query chunks spread over the ranks. Collective.

    ``eval_cfg`` is a :class:`dpm_dist.config.EvalConfig` (distance, max_rank, query_chunk, rerank*). A
    :class:`~dpm_dist.eval.sharded.GalleryShard` gallery (``eval.shard_gallery``) is scored by
    :func:`dpm_dist.eval.sharded.evaluate_sharded`: every chunk on every rank against its share, the same floats.
    Sparse re-ranking is distributed by rows, so it scores a gathered gallery that way too, cut into shares.
    Non-finite features (a diverged model) raise :class:`NonFiniteDistanceError` on every rank alike.
    """
    refuse_nonfinite_features(query, gallery, env)
    if eval_cfg.rerank and eval_cfg.rerank_method == "sparse" and not isinstance(gallery, GalleryShard):
        gallery = as_shard(gallery, env)
    if isinstance(gallery, GalleryShard):
        return evaluate_sharded(query, gallery, eval_cfg, env)
    num_query = len(query)
    chunks = query_chunks(num_query, eval_cfg.query_chunk, rank=env.rank, world_size=env.world_size)
    if eval_cfg.rerank:
        chunk_distance = _reranked_chunks(query, gallery, eval_cfg, chunks)
    else:
        chunk_distance = chunk_distance_fn(query.feats, gallery.feats, q_mask=query.masks, metric=eval_cfg.distance)
    sums = score_queries(
        chunk_distance,
        query.pids,
        gallery.pids,
        query.camids,
        gallery.camids,
        chunks=chunks,
        max_rank=eval_cfg.max_rank,
    )
    max_rank = sums.cmc_counts.numel()
    total = dist.all_reduce_sum(sums.flat())
    return finalize(RankingSums.from_flat(total, num_query, max_rank), num_gallery=len(gallery))


def refuse_nonfinite_features(query: Embeddings, gallery: Embeddings | GalleryShard, env: DistEnv) -> None:
    """Raise :class:`NonFiniteDistanceError` (``N of M queries have NaN distances``) when a feature is NaN or
    infinite: a query's makes its row NaN, a gallery item's every row. Checked before any query chunk is scored,
    so every rank raises together instead of one rank stopping while the others wait in the all-reduce.
    Collective for a :class:`~dpm_dist.eval.sharded.GalleryShard` (each rank holds a share); a gathered
    gallery is the same on every rank."""

    def bad_rows(emb: Embeddings, masks: bool) -> torch.Tensor:  # the query's masks weigh its distances
        if not emb.feats.numel():
            return torch.zeros(len(emb), dtype=torch.bool)
        bad = ~torch.isfinite(emb.feats).all(1)
        return bad | ~torch.isfinite(emb.masks).all(1) if masks and emb.masks.shape == emb.feats.shape else bad

    local = gallery.local if isinstance(gallery, GalleryShard) else gallery
    gallery_bad = torch.tensor([int(bad_rows(local, False).sum())], dtype=torch.long, device=local.feats.device)
    if isinstance(gallery, GalleryShard):
        gallery_bad = dist.all_reduce_sum(gallery_bad)
    num_bad = len(query) if int(gallery_bad.item()) and len(query) else int(bad_rows(query, True).sum())
    if num_bad:
        raise NonFiniteDistanceError(num_bad, len(query))


def _reranked_chunks(query: Embeddings, gallery: Embeddings, eval_cfg: Any, chunks: list[tuple[int, int]]):
    """The dense re-ranking of this rank's query chunks against the whole gathered gallery."""
    from dpm_dist.eval.rerank import k_reciprocal_distance

    if not chunks:  # this rank scores no query (more ranks than chunks); it still joins the all-reduce
        return lambda start, end: query.feats.new_zeros(end - start, len(gallery))
    lo, hi = chunks[0][0], chunks[-1][1]
    rows = k_reciprocal_distance(
        query.feats,
        gallery.feats,
        k1=eval_cfg.rerank_k1,
        k2=eval_cfg.rerank_k2,
        lambda_value=eval_cfg.rerank_lambda,
        query_range=(lo, hi),
    )
    return lambda start, end: rows[start - lo : end - lo]


def extract_and_gather(
    model: torch.nn.Module,
    data_cfg: Any,
    env: DistEnv,
    *,
    device: torch.device | str,
    loaders: dict[str, Iterable[dict[str, Any]]] | None = None,
    neck_feat: str = "before",
    shard_gallery: bool = False,
    dataset: str | None = None,
) -> tuple[Embeddings, Embeddings | GalleryShard]:
    """(query, gallery) embeddings of the whole evaluation set, the same on every rank. Collective.

    With ``shard_gallery`` the gallery stays where it was extracted: this rank's deduplicated
    :class:`~dpm_dist.eval.sharded.GalleryShard` (features without masks; only keys, pids and cameras
    are gathered). ``dataset``: one of several ``data.roots`` (:func:`dpm_dist.data.loader.eval_datasets`).
    """
    if loaders is None:
        from dpm_dist.data.loader import build_eval_loader

        loaders = {role: build_eval_loader(data_cfg, env, role, dataset) for role in ROLES}
    parts = [extract(model, loaders[role], device=device, neck_feat=neck_feat) for role in ROLES]
    if shard_gallery:
        return gather_queries(parts[0]), _shard(parts[1], env)
    local = Embeddings(
        keys=parts[0].keys + parts[1].keys,
        roles=parts[0].roles + parts[1].roles,
        pids=torch.cat([parts[0].pids, parts[1].pids]),
        camids=torch.cat([parts[0].camids, parts[1].camids]),
        feats=_cat_rows(parts[0].feats, parts[1].feats),
        masks=_cat_rows(parts[0].masks, parts[1].masks),
    )
    return split_roles(gather_embeddings(local))


def gather_queries(local: Embeddings) -> Embeddings:
    """Every rank's query rows, deduplicated and sorted by key (as :func:`gather_embeddings`). Collective."""
    query = gather_embeddings(local)
    if len(query) == 0:
        raise ValueError("the evaluation set has no query samples")
    return query


def _shard(local: Embeddings, env: DistEnv) -> GalleryShard:
    """This rank's gallery share without its masks (the masked cosine uses only the query's). Collective."""
    no_mask = local.masks.new_zeros(len(local), 0)
    return shard_gallery(Embeddings(local.keys, local.roles, local.pids, local.camids, local.feats, no_mask), env)


def _cat_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return b if a.numel() == 0 else a if b.numel() == 0 else torch.cat([a, b])


def evaluate(
    model: torch.nn.Module,
    cfg: Any,
    env: DistEnv,
    *,
    device: torch.device | str,
    curves: dict[str, list[float]] | None = None,
    chance: dict[str, float] | None = None,
) -> dict[str, float]:
    """Evaluate ``model`` on ``cfg.data``'s query/gallery sets; the same dict on every rank. Collective.

    Keys: ``mAP``, ``mINP``, ``rank1``, ``rank5``, ``rank10``, ``num_query``, ``num_gallery``,
    ``num_valid_query`` (queries with a true match; the others are skipped as in the official code).
    With several ``data.roots`` each dataset is evaluated on its own query/gallery (:func:`merge_datasets`
    names the keys) and rank 0 prints :func:`dataset_table`. ``curves``, when given, receives the CMC curve
    (``cmc``: the fraction of valid queries matched within rank 1, 2, ...; ``<dataset>/cmc`` for several datasets);
    ``chance`` the rank-1 of a random ranking of the same data (``rank1``: :func:`chance_rank1`; with several
    datasets ``<dataset>/rank1`` each and ``rank1`` their mean, as the metrics).
    """
    from dpm_dist.data.loader import eval_datasets

    names = eval_datasets(cfg.data)
    if not names:
        return _evaluate_one(model, cfg, env, device, None, curves, chance)
    per = {name: _evaluate_one(model, cfg, env, device, name, curves, chance) for name in names}
    if chance is not None:
        chance["rank1"] = sum(chance[f"{name}/rank1"] for name in names) / len(names)
    if env.is_main:
        from tqdm import tqdm

        tqdm.write(dataset_table(per), file=sys.stdout)  # never onto a progress bar's line
        sys.stdout.flush()
    return merge_datasets(per)


def _evaluate_one(
    model: torch.nn.Module,
    cfg: Any,
    env: DistEnv,
    device: torch.device | str,
    dataset: str | None,
    curves: dict[str, list[float]] | None = None,
    chance: dict[str, float] | None = None,
) -> dict[str, float]:
    query, gallery = extract_and_gather(
        model,
        cfg.data,
        env,
        device=device,
        neck_feat=cfg.eval.neck_feat,
        shard_gallery=cfg.eval.shard_gallery,
        dataset=dataset,
    )
    metrics = evaluate_embeddings(query, gallery, cfg.eval, env)
    if curves is not None:
        curves[f"{dataset}/cmc" if dataset else "cmc"] = [float(v) for v in metrics.cmc.tolist()]
    if chance is not None:
        chance[f"{dataset}/rank1" if dataset else "rank1"] = chance_rank1(query, gallery, env)
    return metrics.as_dict()


def chance_rank1(query: Embeddings, gallery: Embeddings | GalleryShard, env: DistEnv) -> float:
    """The rank-1 of a random ranking under the evaluation's protocol: for each valid query (one with a true match
    left), the share of its kept gallery items (all but those of its identity and camera) that are true matches,
    averaged. What a model that learned nothing scores on this data. Collective for a sharded gallery."""

    def count(gallery_keys: torch.Tensor, query_keys: torch.Tensor) -> torch.Tensor:
        """How many gallery items hold each query's key (a sort, no query x gallery table)."""
        values, counts = torch.unique(gallery_keys.cpu(), return_counts=True)
        if not len(values):
            return torch.zeros(len(query_keys), dtype=torch.long)
        at = torch.searchsorted(values, query_keys.cpu()).clamp(max=len(values) - 1)
        return torch.where(values[at] == query_keys.cpu(), counts[at], 0)

    def per_query(pids: torch.Tensor, cams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For each query: the gallery items (of this share) of its identity, and of its identity and camera."""
        pair = 1 << 20  # (pid, camera) as one key; cameras are small non-negative numbers
        return count(pids, query.pids), count(pids * pair + cams, query.pids * pair + query.camids)

    local = gallery.local if isinstance(gallery, GalleryShard) else gallery
    same_id, same_cam = per_query(local.pids, local.camids)
    if isinstance(gallery, GalleryShard):  # each rank counted its share: the whole gallery's counts
        both = dist.all_reduce_sum(torch.stack([same_id, same_cam]).to(local.pids.device)).cpu()
        same_id, same_cam = both[0], both[1]
    matches, kept = (same_id - same_cam).double(), float(len(gallery)) - same_cam.double()
    valid = matches > 0
    return float((matches[valid] / kept[valid]).mean()) if bool(valid.any()) else 0.0


def _is_count(key: str) -> bool:
    return key.rsplit("/", 1)[-1].startswith("num_")


def merge_datasets(per: dict[str, dict[str, float]]) -> dict[str, float]:
    """One result dict for many datasets: ``<dataset>/<key>`` for each, and each plain key over all of them,
    the mean of the datasets' metrics (every dataset counts the same) and the sum of their counts (``num_*``)."""
    out = {f"{name}/{key}": value for name, metrics in per.items() for key, value in metrics.items()}
    for key in next(iter(per.values())):
        values = [metrics[key] for metrics in per.values()]
        out[key] = float(sum(values)) if _is_count(key) else float(sum(values) / len(values))
    return out


def dataset_table(per: dict[str, dict[str, float]]) -> str:
    """The per-dataset metrics as a table: rank-1, mAP, mINP, #query, #gallery; the last row is the mean."""
    merged = merge_datasets(per)
    width = max(len("dataset"), *(len(name) for name in per))
    head = f"{'dataset':<{width}}  rank-1     mAP    mINP  #query  #gallery"

    def row(name: str, m: dict[str, float]) -> str:
        return (
            f"{name:<{width}}  {m['rank1']:6.1%}  {m['mAP']:6.1%}  {m['mINP']:6.1%}  {int(m['num_query']):6d}  "
            f"{int(m['num_gallery']):8d}"
        )

    return "\n".join([head, *(row(name, m) for name, m in per.items()), row("mean", merged)])


def fetch_images(
    data_cfg: Any,
    env: DistEnv,
    wanted: set[tuple[str, str]],
    *,
    loaders: dict[str, Iterable[dict[str, Any]]] | None = None,
    dataset: str | None = None,
) -> dict[tuple[str, str], torch.Tensor]:
    """The (normalised) images of the wanted (role, key) samples, on every rank. Collective.

    A second pass over this rank's share of the loaders (decoding only, no model): the pictures are
    chosen after ranking, and keeping every image from the first pass would cost O(dataset) memory.
    """
    if loaders is None:
        from dpm_dist.data.loader import build_eval_loader

        loaders = {role: build_eval_loader(data_cfg, env, role, dataset) for role in ROLES}
    found: dict[tuple[str, str], torch.Tensor] = {}
    for role in ROLES:
        for batch in loaders[role]:
            for i, (key, r) in enumerate(zip(batch["keys"], batch["roles"])):
                if (r, key) in wanted:
                    found[(r, key)] = batch["images"][i].cpu()
    merged: dict[tuple[str, str], torch.Tensor] = {}
    for part in dist.all_gather_objects(found):
        merged.update(part)
    return merged
