"""The library part of ``dpm-search``: the top-k gallery rows of every query row of two dpm-embed files.

Scoring is the evaluator's, never a copy: the gallery becomes a :class:`dpm_dist.eval.sharded.GalleryShard`
(one share per rank under torchrun, read from the file in row batches, so no rank holds the whole gallery;
the whole gallery at world size 1), and :func:`dpm_dist.eval.topk.write_topk` ranks every query chunk against
it in fixed gallery blocks (:class:`dpm_dist.eval.retrieval.Gallery`), keeps k candidates per query and
rank, merges them and writes ``topk.parquet`` (or ``.jsonl``). Distances: DPM's masked cosine (the query's
mask) or the plain cosine; reported as ``arccos(clip(cos))``. By default every gallery row counts; with
``exclude_junk`` the evaluator's protocol removes the query's own pid *and* camera. pid and camid are the
ones the files hold, each dataset's own (dpm-embed ``--dataset``): files embedded for two different datasets
share neither people nor cameras, so the exclusion is refused for them.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np
import torch

from dpm_dist.deploy.embed import read_metadata
from dpm_dist.dist import DistEnv
from dpm_dist.eval.embeddings import Embeddings

READ_BATCH = 8192  # rows per Parquet record batch


@dataclasses.dataclass
class EmbeddingRows:
    rows: Embeddings
    paths: list[str | None]
    meta: dict[str, Any]


def _vectors(column: Any, dim: int) -> torch.Tensor:
    return torch.from_numpy(
        np.array(column.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, dim)
    )


def _ids(column: Any) -> torch.Tensor:
    return torch.from_numpy(np.array(column.fill_null(-1).to_numpy(zero_copy_only=False), dtype=np.int64))


def read_rows(
    path: str, *, feature: str, role: str, share: tuple[int, int] = (0, 1), masks: bool = True
) -> EmbeddingRows:
    """Rows ``[r·N/W, (r+1)·N/W)`` of an embedding file (``share = (r, W)``), read in record batches."""
    import pyarrow.parquet as pq

    meta = read_metadata(path)
    dim = int(meta["model"]["embed_dim"])
    file = pq.ParquetFile(path)
    total = file.metadata.num_rows
    lo, hi = share[0] * total // share[1], (share[0] + 1) * total // share[1]
    columns = ["key", "pid", "camid", "path", feature] + (["mask"] if masks else [])
    keys, paths, pids, camids, feats, mask_parts, start = [], [], [], [], [], [], 0
    for batch in file.iter_batches(batch_size=READ_BATCH, columns=columns):
        end = start + batch.num_rows
        if end > lo and start < hi:
            batch = batch.slice(max(lo - start, 0), min(hi, end) - max(lo, start))
            keys += batch.column("key").to_pylist()
            paths += batch.column("path").to_pylist()
            pids.append(_ids(batch.column("pid")))
            camids.append(_ids(batch.column("camid")))
            feats.append(_vectors(batch.column(feature), dim))
            if masks:
                mask_parts.append(_vectors(batch.column("mask"), dim))
        start = end
    empty = torch.zeros(0, dim)
    rows = Embeddings(
        keys,
        [role] * len(keys),
        torch.cat(pids) if pids else torch.zeros(0, dtype=torch.long),
        torch.cat(camids) if camids else torch.zeros(0, dtype=torch.long),
        torch.cat(feats) if feats else empty,
        torch.cat(mask_parts) if mask_parts else torch.zeros(len(keys), 0),
    )
    return EmbeddingRows(rows, paths, meta)


def check_same_model(
    query_path: str, query_meta: dict[str, Any], gallery_path: str, gallery_meta: dict[str, Any]
) -> None:
    q, g = query_meta["model"], gallery_meta["model"]
    if q["embed_dim"] != g["embed_dim"]:
        raise ValueError(f"{query_path} has {q['embed_dim']}-wide features, {gallery_path} {g['embed_dim']}-wide")
    if q.get("source_sha256") != g.get("source_sha256"):
        raise ValueError(
            f"{query_path} and {gallery_path} were embedded with different models "
            f"({q.get('source')} and {g.get('source')}); their features are not comparable"
        )


def check_same_dataset(
    query_path: str, query_meta: dict[str, Any], gallery_path: str, gallery_meta: dict[str, Any]
) -> None:
    """The same-camera exclusion compares pid and camid, which are each dataset's own: one dataset, or none recorded."""
    q, g = ((m.get("embedding") or {}).get("dataset") for m in (query_meta, gallery_meta))
    if q is not None and g is not None and q != g:
        raise ValueError(
            f"--exclude-same-camera: {query_path} was embedded as dataset {q}, {gallery_path} as {g}; their "
            f"pids and camera ids are each dataset's own and never the same person or camera"
        )


def feature_column(meta: dict[str, Any], feature: str | None) -> str:
    """The column to score: ``before``/``after`` the BNNeck, else the model's own test feature."""
    if feature is None:
        return meta["model"].get("test_feature", "feat")
    return {"before": "feat", "after": "feat_bn"}[feature]


def search(
    query_path: str,
    gallery_path: str,
    out_dir: str,
    env: DistEnv,
    *,
    k: int = 10,
    distance: str = "masked_cosine",
    feature: str | None = None,
    exclude_junk: bool = False,
    fmt: str = "parquet",
    query_chunk: int = 256,
) -> tuple[str | None, EmbeddingRows, Any]:
    """Write ``out_dir/topk.<fmt>`` on rank 0; returns (its path there, the queries, the gallery share). Collective."""
    from dpm_dist.config import EvalConfig
    from dpm_dist.eval.sharded import shard_gallery
    from dpm_dist.eval.topk import write_topk

    if k < 1:
        raise ValueError(f"--topk must be >= 1, got {k}")
    q_meta, g_meta = read_metadata(query_path), read_metadata(gallery_path)
    check_same_model(query_path, q_meta, gallery_path, g_meta)
    if exclude_junk:
        check_same_dataset(query_path, q_meta, gallery_path, g_meta)
    column = feature_column(q_meta, feature)
    query = read_rows(query_path, feature=column, role="query")
    if len(query.rows) == 0:
        raise ValueError(f"{query_path}: no rows")
    share = read_rows(gallery_path, feature=column, role="gallery", share=(env.rank, env.world_size), masks=False)
    gallery = shard_gallery(share.rows, env)
    eval_cfg = EvalConfig(distance=distance, topk=k, topk_format=fmt, query_chunk=query_chunk, num_pictures=0)
    path = write_topk(out_dir, query.rows, gallery, eval_cfg, env, exclude_junk=exclude_junk)
    return path, query, share


def write_pictures(out_dir: str, topk_path: str, query: EmbeddingRows, gallery_path: str, num: int) -> list[str]:
    """Ranked lists of the first ``num`` queries from the written top-k file and the images the files name."""
    import pyarrow.parquet as pq
    from PIL import Image

    from dpm_dist.deploy.loading import TestTransform
    from dpm_dist.eval import pictures

    lists = pq.read_table(topk_path).to_pylist() if topk_path.endswith(".parquet") else _read_jsonl(topk_path)
    wanted = {key for rec in lists[:num] for key in rec["gallery"]}
    table = pq.read_table(gallery_path, columns=["key", "path"]).to_pylist()
    g_paths = {row["key"]: row["path"] for row in table if row["key"] in wanted}
    q_paths = dict(zip(query.rows.keys, query.paths))
    transform = TestTransform(tuple(query.meta["model"]["img_size"]))

    def image(path: str | None, key: str) -> torch.Tensor:
        if not path:
            raise ValueError(
                f"pictures need image paths, but the embedding of {key!r} records none (shard inputs record keys only)"
            )
        with Image.open(path) as img:
            return transform(img)

    written = []
    for n, rec in enumerate(lists[:num]):
        titles = [f"d={d:.3f}\n{key[-18:]}" for d, key in zip(rec["distance"], rec["gallery"])]
        written.append(
            pictures.save_ranked_list(
                os.path.join(out_dir, "pictures", f"ranked_{n:02d}.png"),
                image(q_paths[rec["query"]], rec["query"]),
                [image(g_paths[key], key) for key in rec["gallery"]],
                rec["match"],
                query_title=f"query\n{rec['query'][-18:]}",
                gallery_titles=titles,
            )
        )
    return written


def _read_jsonl(path: str) -> list[dict[str, Any]]:
    import json

    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def describe_lists(topk_path: str, gallery_path: str, k: int, num_queries: int, *, exclude_junk: bool) -> str:
    """What ``dpm-search`` wrote, in words: ``top-k`` when every list holds k items, else how many each holds
    and why (the gallery has fewer rows than ``-k`` asked for, or the same-camera exclusion removed some)."""
    import pyarrow.parquet as pq

    if topk_path.endswith(".parquet"):
        lengths = [len(g) for g in pq.read_table(topk_path, columns=["gallery"]).column("gallery").to_pylist()]
    else:
        lengths = [len(r["gallery"]) for r in _read_jsonl(topk_path)]
    lo, hi = min(lengths, default=0), max(lengths, default=0)
    if lo == k:
        return f"top-{k} of {num_queries} queries"
    size = pq.ParquetFile(gallery_path).metadata.num_rows
    held = str(lo) if lo == hi else f"{lo} to {hi}"  # exclusion: lists differ
    why = f"the gallery holds {size} images"
    if exclude_junk and lo < min(k, size):
        why += ", fewer after --exclude-same-camera"
    return f"{held} gallery images for each of {num_queries} queries (-k {k} asked for more: {why})"
