"""Random access to training samples for ``data.sampler=exact``: local copies of the shards and their sample index.

A local shard is read in place (checked once against its ``index.json`` entry); a remote one (HTTP(S), S3) is
downloaded once into ``data.cache_dir`` under its sha256 (or its URL's hash without an entry), through
:func:`dpm_dist.fsio.write_bytes_atomic`, so a crash or a second process never leaves a torn shard behind.

The index (where each sample's JPEG lies in which local file, with its key and metadata) is kept in memory for the
:data:`MAX_INDEXES` most recently used shard lists of the process, so each new epoch's loader skips the scan.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any, Generic, TypeVar

from dpm_dist.data.manifest import Shard
from dpm_dist.data.shards import ShardError, fetch_shard, tar_members
from dpm_dist.data.storage import IOOptions, is_remote, local_path
from dpm_dist.fsio import write_bytes_atomic

SampleIndex = list[tuple[str, int, int, str, dict[str, Any]]]  # (local path, jpg offset, jpg size, key, meta)
MAX_INDEXES = 4  # shard lists whose index stays in memory: a run uses one; tests and notebooks a few
DEFAULT_CACHE_DIR = "~/.cache/dpm-dist/shards"

V = TypeVar("V")


class LRU(Generic[V]):
    """A dict holding at most ``maxsize`` entries; putting one more drops the least recently used."""

    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError(f"maxsize={maxsize}: an LRU holds at least one entry")
        self.maxsize = maxsize
        self._items: OrderedDict[Hashable, V] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Hashable) -> V | None:
        if key not in self._items:
            return None
        self._items.move_to_end(key)
        return self._items[key]

    def put(self, key: Hashable, value: V) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.maxsize:
            self._items.popitem(last=False)

    def clear(self) -> None:
        self._items.clear()


_INDEXES: LRU[SampleIndex] = LRU(MAX_INDEXES)


def local_copy(url: str, entry: dict[str, Any] | None, cache_dir: str | None, opts: IOOptions) -> str:
    """A local path for the shard: itself when local (checked once), else a sha-named cached download."""
    if not is_remote(url):
        if entry is not None:
            fetch_shard(url, entry, opts)
        return local_path(url)
    name = entry["sha256"] if entry else hashlib.sha256(url.encode()).hexdigest()
    path = os.path.join(os.path.expanduser(cache_dir or DEFAULT_CACHE_DIR), f"{name}.tar")
    if not (os.path.exists(path) and (entry is None or os.path.getsize(path) == entry["num_bytes"])):
        write_bytes_atomic(path, fetch_shard(url, entry, opts))
    return path


def index_shards(shards: list[Shard], cache_dir: str | None, opts: IOOptions) -> SampleIndex:
    """(path, jpg offset, jpg size, key, meta) of every training sample, in shard order; remembered per list of
    (url, dataset) for the process (the :data:`MAX_INDEXES` latest lists)."""
    ident = tuple((url, part) for url, _, part in shards)
    index = _INDEXES.get(ident)
    if index is None:
        index = [sample for shard in shards for sample in _index_shard(shard, cache_dir, opts)]
        _INDEXES.put(ident, index)
    return index


def _index_shard(shard: Shard, cache_dir: str | None, opts: IOOptions) -> SampleIndex:
    url, entry, part = shard
    path = local_copy(url, entry, cache_dir, opts)
    jpgs, metas = {}, {}
    with open(path, "rb") as f:
        for member in tar_members(url, f, os.path.getsize(path)):
            key, _, ext = member.name.partition(".")
            if ext == "jpg":
                jpgs[key] = (member.offset_data, member.size)
            elif ext == "json":
                f.seek(member.offset_data)
                metas[key] = json.loads(f.read(member.size))
    index: SampleIndex = []
    for key in list(jpgs) + [k for k in metas if k not in jpgs]:
        if key not in jpgs or key not in metas:
            raise ShardError(f"shard {url}: sample {key!r} lacks .jpg or .json")
        index.append((path, *jpgs[key], *part.apply(key, metas[key])))
    return index
