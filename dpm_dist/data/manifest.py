"""The training and evaluation sets a :class:`~dpm_dist.config.DataConfig` names: manifests and shard lists.

One dataset (``data.root`` or ``data.train_urls``): its ``index.json``, with ``num_cams`` covering
``data.eval_root``'s cameras too. Many datasets (``data.roots``): the union of their manifests
(:func:`dpm_dist.data.union.union_manifest`), each dataset a :class:`~dpm_dist.data.union.Part` whose shifts keep
labels and cameras apart. A shard is listed as ``(url, index.json entry or None, its dataset)``: the entry (when
``data.verify_sha``) lets the reader check size and sha256.

No DataLoader, no pipeline: the loaders (:mod:`dpm_dist.data.loader`) build on these lists.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from dpm_dist.config import DataConfig
from dpm_dist.data.shards import ShardError, read_manifest, shard_entries
from dpm_dist.data.storage import IOOptions, StorageError, is_remote, join_url, local_path, object_size
from dpm_dist.data.union import Part, offset_parts, records, union_manifest

Shard = tuple[str, dict[str, Any] | None, Part]  # (url, index.json entry or None, its dataset)


def io_options(cfg: DataConfig) -> IOOptions:
    """The storage options (S3 endpoint, retries, back-off, timeout) of ``cfg``."""
    return IOOptions(
        s3_endpoint=cfg.s3_endpoint, retries=cfg.io_retries, backoff_s=cfg.io_backoff_s, timeout_s=cfg.io_timeout_s
    )


def train_root(cfg: DataConfig) -> str:
    """The folder or URL holding the training ``index.json`` of one dataset."""
    if cfg.root:
        return cfg.root
    if cfg.train_urls:
        return cfg.train_urls[0].rsplit("/", 1)[0] if "/" in cfg.train_urls[0] else "."
    raise ValueError(
        "config field `data.root`: set it (folder or URL holding index.json), `data.train_urls`, "
        "or `data.roots` (many datasets)"
    )


def parts(cfg: DataConfig) -> list[tuple[Part, dict[str, Any]]]:
    """Each training dataset with its index.json; one :class:`Part` without shifts unless ``data.roots`` has several."""
    opts = io_options(cfg)
    if len(cfg.roots) <= 1:
        root = cfg.roots[0] if cfg.roots else train_root(cfg)
        return [(Part(root), read_manifest(root, opts))]
    return offset_parts(list(cfg.roots), [read_manifest(root, opts) for root in cfg.roots])


def _merge(cfg: DataConfig, found: list[tuple[Part, dict[str, Any]]]) -> dict[str, Any]:
    if len(found) == 1:
        manifest = found[0][1]
        if cfg.eval_root:
            other = read_manifest(cfg.eval_root, io_options(cfg))
            manifest = {**manifest, "num_cams": max(manifest["num_cams"], other["num_cams"])}
        return {**manifest, "datasets": records(found, [])}
    return union_manifest(found, list(cfg.root_weights))


def load_manifest(cfg: DataConfig) -> dict[str, Any]:
    """``index.json`` of the training data, with ``num_cams`` covering ``data.eval_root``'s cameras too, and a
    ``datasets`` list (:func:`dpm_dist.data.union.records`). With several ``data.roots``: their union (identity and camera
    counts summed, label counts in order), ``dataset`` their common layout or ``generic``."""
    return _merge(cfg, parts(cfg))


def _urls(cfg: DataConfig, role: str, root: str, manifest: dict[str, Any]) -> list[tuple[str, dict[str, Any] | None]]:
    """(url, its index.json entry or None) of split ``role``: ``data.<role>_urls`` when given, else the manifest's."""
    entries = shard_entries(manifest, role)
    explicit = {"train": cfg.train_urls, "query": cfg.query_urls, "gallery": cfg.gallery_urls}[role]
    if not explicit:
        return [(join_url(root, e["name"]), e) for e in entries]
    by_name = {e["name"]: e for e in entries}
    return [(url, by_name.get(url.rsplit("/", 1)[-1])) for url in explicit]


def shard_list(
    cfg: DataConfig, role: str, root: str, manifest: dict[str, Any], part: Part | None = None
) -> list[Shard]:
    """The shards of split ``role`` under ``root`` (or ``data.<role>_urls`` when given), in manifest order."""
    part = part or Part(root)
    return [(url, entry if cfg.verify_sha else None, part) for url, entry in _urls(cfg, role, root, manifest)]


def _planned(cfg: DataConfig, roles: tuple[str, ...]) -> list[tuple[str, str, dict[str, Any] | None]]:
    """(role, url, index.json entry or None) of every shard the run will read, every dataset of ``data.roots``."""
    opts, out = io_options(cfg), []
    if "train" in roles:
        for part, manifest in parts(cfg):
            out += [("train", url, e) for url, e in _urls(cfg, "train", part.root, manifest)]
    for role in (r for r in ("query", "gallery") if r in roles):
        if len(cfg.roots) > 1:
            roots = list(cfg.roots)
        elif cfg.query_urls and cfg.gallery_urls and not (cfg.eval_root or cfg.roots or cfg.root):
            out += [(role, url, None) for url in (cfg.query_urls if role == "query" else cfg.gallery_urls)]
            continue
        else:
            roots = [(cfg.roots[0] if cfg.roots else None) or cfg.eval_root or train_root(cfg)]
        for root in roots:
            found = _urls(cfg, role, root, read_manifest(root, opts))
            if not found:
                raise ValueError(f"no {role} shards in {root} (index.json has no {role} split)")
            out += [(role, url, e) for url, e in found]
    return out


REMOTE_CHECKS_AT_ONCE = 16  # HEAD requests in flight while remote shards are checked


def check_shards(cfg: DataConfig, roles: tuple[str, ...] = ("train", "query", "gallery"), remote: bool = False) -> int:
    """Before anything runs: every shard the run will read (``roles`` of every dataset) exists and, with
    ``data.verify_sha``, has the size index.json records; every index.json read is valid. Remote shards (with
    ``remote``) are asked for their size (S3/HTTP HEAD, :data:`REMOTE_CHECKS_AT_ONCE` at a time, with the loader's
    retries), never read; without ``remote`` they are checked when read. Raises naming the first bad shard in
    the run's order; returns the number of shards checked."""
    planned = [p for p in _planned(cfg, roles) if remote or not is_remote(p[1])]
    opts = io_options(cfg)

    def size(url: str) -> int | StorageError | None:
        """The shard's size in bytes; None: missing (local) or not told (HTTP without Content-Length)."""
        if not is_remote(url):
            path = local_path(url)
            return os.path.getsize(path) if os.path.isfile(path) else None
        try:
            return object_size(url, opts)
        except StorageError as err:  # raised below, in the run's order
            return err

    urls = [url for _, url, _ in planned]
    if any(is_remote(url) for url in urls):
        with ThreadPoolExecutor(REMOTE_CHECKS_AT_ONCE) as pool:
            sizes = list(pool.map(size, urls))
    else:
        sizes = [size(url) for url in urls]
    for (role, url, entry), found in zip(planned, sizes, strict=True):
        if isinstance(found, StorageError):
            raise StorageError(f"{role} shard: {found} (index.json lists it; see `dpm-shards verify`)")
        if found is None and not is_remote(url):
            raise FileNotFoundError(f"{role} shard {url} does not exist (index.json lists it; see `dpm-shards verify`)")
        if cfg.verify_sha and entry is not None and found is not None and found != entry["num_bytes"]:
            what = "truncated" if found < entry["num_bytes"] else "longer than recorded"
            raise ShardError(
                f"{role} shard {url}: {what}: {found} bytes, index.json says {entry['num_bytes']} "
                "(see `dpm-shards verify`)"
            )
    return len(planned)


def train_shards(cfg: DataConfig) -> tuple[list[Shard], dict[str, Any]]:
    """Every training shard of every dataset, and the (merged) manifest; checks P against the identities."""
    found = parts(cfg)
    manifest = _merge(cfg, found)
    shards: list[Shard] = []
    for part, part_manifest in found:
        mine = shard_list(cfg, "train", part.root, part_manifest, part)
        if not mine:
            raise ValueError(f"no training shards in {part.root} (index.json has no train split)")
        shards += mine
    where = found[0][0].root if len(found) == 1 else f"the union of data.roots ({len(found)} datasets)"
    field = "data.global_num_ids" if cfg.global_num_ids else "data.num_ids"
    if manifest["num_train_ids"] < cfg.order_num_ids():
        raise ValueError(
            f"config field `{field}`: P={cfg.order_num_ids()} but the training set {where} has only "
            f"{manifest['num_train_ids']} identities"
        )
    return shards, manifest


def eval_datasets(cfg: DataConfig) -> list[str]:
    """The names of the datasets evaluated one by one (several ``data.roots``); [] for one evaluation set."""
    return [part.name for part, _ in parts(cfg)] if len(cfg.roots) > 1 else []


def eval_shards(cfg: DataConfig, role: str, dataset: str | None = None) -> list[Shard]:
    """Every ``role`` (query or gallery) shard of the evaluation set, or of ``dataset`` (one of several roots)."""
    if role not in ("query", "gallery"):
        raise ValueError(f"role {role!r}: expected 'query' or 'gallery'")
    part = _eval_part(cfg, dataset)
    root = part.root or cfg.eval_root or train_root(cfg)
    shards = shard_list(cfg, role, root, read_manifest(root, io_options(cfg)), part)
    if not shards:
        raise ValueError(f"no {role} shards in {root} (index.json has no {role} split)")
    return shards


def _eval_part(cfg: DataConfig, dataset: str | None) -> Part:
    if len(cfg.roots) <= 1:
        if dataset is not None:
            raise ValueError(f"dataset {dataset!r}: only several data.roots are evaluated by dataset")
        return Part(cfg.roots[0] if cfg.roots else "")
    by_name = {part.name: part for part, _ in parts(cfg)}
    if dataset not in by_name:
        raise ValueError(f"dataset {dataset!r}: data.roots holds {', '.join(by_name)}; evaluate one of them")
    return by_name[dataset]
