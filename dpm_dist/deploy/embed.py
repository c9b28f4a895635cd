"""The library part of ``dpm-embed``: images -> (key, pid, camid, feat, feat_bn, mask) rows in a Parquet file.

Inputs: a folder (recursively, image suffixes of :data:`dpm_dist.data.layouts.IMAGE_EXTS`, hidden files
skipped; key = the path relative to the folder), a list file (one path per line relative to the list's
folder; key = the path as written), or shards (a local folder, http(s):// or s3:// root holding index.json,
read by :func:`dpm_dist.data.loader.build_eval_loader` exactly as dpm-eval reads them; key = the sample key).
pid and camid come from Market-style (``0001_c2s1_...``) or MSMT17 file names when parseable, else they
are null (a model with an SIE camera embedding then needs a default camera).

A model trained on several datasets with SIE (``meta["datasets"]``) embeds a camera as ``camid + cam_offset``
of the images' dataset (:func:`choose_dataset`); the ``camid`` column keeps the dataset's own camera id.

Every rank embeds a contiguous share with :func:`dpm_dist.eval.evaluator.extract` and the rows are
all-gathered, deduplicated and sorted by key with :func:`dpm_dist.eval.evaluator.gather_embeddings`, so the
file does not depend on the number of ranks; rank 0 writes it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from types import SimpleNamespace
from typing import Any

import torch
from PIL import Image

from dpm_dist.data.layouts import IMAGE_EXTS, is_hidden, parse_market_name, parse_msmt_name
from dpm_dist.deploy.loading import LoadedModel
from dpm_dist.dist import DistEnv
from dpm_dist.eval.evaluator import Embeddings, extract, gather_embeddings
from dpm_dist.fsio import atomic_path

log = logging.getLogger(__name__)
NAMES = ("market", "msmt17", "none")  # how pid/camid are read from file names
UNKNOWN = -1  # pid/camid not known: null in the file
SCHEMA_KEY = b"dpm"


@dataclasses.dataclass(frozen=True)
class ImageItem:
    key: str
    path: str  # absolute
    pid: int
    camid: int


def parse_name(name: str, names: str) -> tuple[int, int]:
    """(pid, camid) from a file name with the dataset layouts' parsers, (-1, -1) when it does not parse."""
    parser = {"market": parse_market_name, "msmt17": parse_msmt_name}.get(names)
    if parser is None:
        return UNKNOWN, UNKNOWN
    try:
        return parser(name)
    except ValueError:
        return UNKNOWN, UNKNOWN


def list_folder(root: str, *, names: str = "market") -> list[ImageItem]:
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root}: no such folder")
    items = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not is_hidden(d))
        for name in sorted(files):
            if name.lower().endswith(IMAGE_EXTS) and not is_hidden(name):
                path = os.path.join(folder, name)
                items.append(
                    ImageItem(os.path.relpath(path, root).replace(os.sep, "/"), path, *parse_name(name, names))
                )
    if not items:
        raise ValueError(f"{root}: no images ({', '.join(IMAGE_EXTS)}) in the folder or below it")
    return items


def list_file(path: str, *, names: str = "market") -> list[ImageItem]:
    """One image path per line, relative to the list file's folder (or absolute); blank and # lines skipped."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such list file")
    base, items, seen = os.path.dirname(os.path.abspath(path)), [], {}
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            entry = line.strip()
            if not entry or entry.startswith("#"):
                continue
            full = os.path.normpath(os.path.join(base, os.path.expanduser(entry)))
            if not os.path.isfile(full):
                raise FileNotFoundError(f"{path} line {lineno}: no such image file: {full}")
            if entry in seen:
                raise ValueError(f"{path} line {lineno}: {entry!r} is listed twice (first on line {seen[entry]})")
            seen[entry] = lineno
            items.append(ImageItem(entry, full, *parse_name(os.path.basename(entry), names)))
    if not items:
        raise ValueError(f"{path}: the list file names no images")
    return items


def choose_dataset(
    loaded: LoadedModel, name: str | None, manifest: dict[str, Any] | None = None, *, where: str = "INPUT"
) -> tuple[dict[str, Any] | None, str | None]:
    """The ``meta["datasets"]`` entry whose cameras the images have, and a note for the user (or None).

    ``name`` (``--dataset``) picks it. Without it, a model trained on several datasets with SIE takes the one
    entry that shard input's ``index.json`` (``manifest``: its ``dataset``, identities and cameras) identifies,
    else it is refused; any other model embeds as it always did (None: cameras unshifted).
    """
    if name is not None:
        entry = loaded.dataset(name)
        if manifest is not None and loaded.meta["sie"] and int(manifest.get("num_cams", 0)) > int(entry["num_cams"]):
            raise ValueError(
                f"{where}: index.json records {manifest['num_cams']} cameras, but dataset {name} of the model "
                f"has {entry['num_cams']} (cameras 0..{int(entry['num_cams']) - 1}); another --dataset?"
            )
        return entry, None
    if not loaded.needs_dataset:
        return None, None
    why = f"the model was trained on {len(loaded.datasets)} datasets with an SIE camera embedding (cameras shifted per dataset)"
    if manifest is None:
        raise ValueError(f"{why}: pass --dataset {loaded.dataset_names()}")
    facts = (manifest.get("dataset"), manifest.get("num_train_ids"), manifest.get("num_cams"))
    found = [d for d in loaded.datasets if (d.get("dataset"), d["num_train_ids"], d["num_cams"]) == facts]
    if len(found) != 1:
        raise ValueError(
            f"{why}, and {where}/index.json ({facts[0]}, {facts[1]} ids, {facts[2]} cameras) matches "
            f"{len(found) or 'none'} of them: pass --dataset {loaded.dataset_names()}"
        )
    entry = found[0]
    return entry, (
        f"{where}: index.json ({facts[0]}, {facts[1]} ids, {facts[2]} cameras) is dataset {entry['name']} of "
        f"the model: cameras + {entry['cam_offset']} (--dataset overrides)"
    )


def assign_cameras(
    items: list[ImageItem], loaded: LoadedModel, camid: int | None, dataset: dict[str, Any] | None = None
) -> list[ImageItem]:
    """Fill unknown cameras with ``camid``; a model with SIE cannot embed an image without a camera.

    With ``dataset`` (a ``meta["datasets"]`` entry) camera ids are that dataset's own, checked against its cameras.
    """
    limit = int(dataset["num_cams"]) if dataset else loaded.num_cams
    whose = f"dataset {dataset['name']}'s" if dataset else "the model's"
    if camid is not None and not 0 <= camid < max(limit, 1):
        raise ValueError(f"--camid {camid}: outside {whose} cameras 0..{max(limit, 1) - 1}")
    out = [dataclasses.replace(it, camid=camid) if it.camid == UNKNOWN and camid is not None else it for it in items]
    if loaded.meta["sie"]:
        missing = next((it for it in out if it.camid == UNKNOWN), None)
        if missing is not None:
            raise ValueError(
                f"{missing.path}: no camera id in the file name (Market-style `<pid>_c<cam>` or MSMT17) and "
                f"the model has an SIE camera embedding over {limit} cameras; pass --camid N"
            )
        bad = next((it for it in out if it.camid >= limit), None)
        if bad is not None:
            raise ValueError(
                f"{bad.path}: camera {bad.camid + 1} (camid {bad.camid}) is outside {whose} {limit} cameras"
            )
    return out


class _Images(torch.utils.data.Dataset):
    """Decoded, transformed images; a bad file becomes an error string, raised or counted in the main process."""

    def __init__(self, items: Sequence[ImageItem], transform: Any) -> None:
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[ImageItem, Any]:
        item = self.items[i]
        try:
            with Image.open(item.path) as img:
                return item, self.transform(img)
        except Exception as exc:  # PIL raises many types for a damaged file
            return item, f"{item.path}: cannot read the image ({exc})"


def _collate(rows: list[tuple[ImageItem, Any]]) -> tuple[dict[str, Any] | None, list[str]]:
    good = [(it, x) for it, x in rows if isinstance(x, torch.Tensor)]
    errors = [x for _, x in rows if isinstance(x, str)]
    if not good:
        return None, errors
    return {
        "images": torch.stack([x for _, x in good]),
        "keys": [it.key for it, _ in good],
        "roles": [""] * len(good),
        "pids": torch.tensor([it.pid for it, _ in good]),
        "camids": torch.tensor([it.camid for it, _ in good]),
    }, errors


def _folder_batches(
    items: Sequence[ImageItem],
    loaded: LoadedModel,
    *,
    batch_size: int,
    num_workers: int,
    skip_corrupt: bool,
    counter: list[int],
) -> Iterator[dict[str, Any]]:
    loader = torch.utils.data.DataLoader(
        _Images(items, loaded.transform),
        batch_size=batch_size,
        num_workers=min(num_workers, max(len(items) // batch_size, 1)),
        collate_fn=_collate,
    )
    for batch, errors in loader:
        for error in errors:
            if not skip_corrupt:
                raise ValueError(f"{error}; --skip-corrupt counts and skips such files")
            counter[0] += 1
            log.warning("skipping a corrupt image (%d so far on this rank): %s", counter[0], error)
        if batch is not None:
            yield batch


class _BothFeatures(torch.nn.Module):
    """The model with ``feat`` = [feat, feat_bn] side by side, so one extraction pass keeps both features.

    Known cameras are shifted by ``cam_offset`` on their way into the model only: the rows keep the dataset's own.
    """

    def __init__(self, net: torch.nn.Module, cam_offset: int = 0) -> None:
        super().__init__()
        self.net, self.cam_offset = net, int(cam_offset)

    def forward(self, images: torch.Tensor, camids: torch.Tensor) -> SimpleNamespace:
        if self.cam_offset:
            camids = torch.where(camids >= 0, camids + self.cam_offset, camids)
        out = self.net(images, camids)
        return SimpleNamespace(feat=torch.cat([out.feat, out.feat_bn], 1), mask=out.mask)


def _progress(batches: Iterable[dict[str, Any]], total: int, env: DistEnv) -> Iterator[dict[str, Any]]:
    from tqdm import tqdm

    with tqdm(total=total, unit="img", desc="dpm-embed", disable=not env.is_main, dynamic_ncols=True) as bar:
        for batch in batches:
            yield batch
            bar.update(len(batch["keys"]))


@dataclasses.dataclass
class EmbedResult:
    rows: Embeddings  # gathered and sorted by (role, key); feats hold [feat, feat_bn]
    paths: dict[str, str] | None  # key -> image file (folder and list inputs)
    num_expected: int
    seconds: float

    @property
    def num_skipped(self) -> int:
        return self.num_expected - len(self.rows)


def embed_items(
    loaded: LoadedModel,
    items: list[ImageItem],
    env: DistEnv,
    *,
    batch_size: int = 64,
    num_workers: int = 2,
    skip_corrupt: bool = False,
    cam_offset: int = 0,
) -> EmbedResult:
    """Embed ``items`` on every rank (a contiguous run of whole batches each) and gather the rows. Collective.

    ``cam_offset``: the images' dataset's (:func:`choose_dataset`), added to each known camera for the model.
    """
    start = time.perf_counter()
    # Whole global batches per rank: every batch holds the same images at any world size, so every row has the
    # same bits (a convolution's kernel, and so its rounding, depends on the batch size).
    num_batches = -(-len(items) // batch_size)
    lo, hi = (batch_size * (num_batches * r // env.world_size) for r in (env.rank, env.rank + 1))
    mine = items[lo:hi]
    batches = _folder_batches(
        mine, loaded, batch_size=batch_size, num_workers=num_workers, skip_corrupt=skip_corrupt, counter=[0]
    )
    local = extract(_BothFeatures(loaded.model, cam_offset), _progress(batches, len(mine), env), device=loaded.device)
    rows = gather_embeddings(local)
    return EmbedResult(rows, {it.key: it.path for it in items}, len(items), time.perf_counter() - start)


def _shard_config(loaded: LoadedModel, root: str, **fields: Any) -> Any:
    from dpm_dist.config import DataConfig

    return DataConfig(root=root, img_size=list(loaded.meta["img_size"]), **fields)


def read_shard_manifest(loaded: LoadedModel, root: str, *, s3_endpoint: str | None = None) -> dict[str, Any]:
    """``index.json`` of a shard root (local, http(s)://, s3://), read as :func:`embed_shards` reads it."""
    from dpm_dist.data.loader import io_options
    from dpm_dist.data.shards import read_manifest

    return read_manifest(root, io_options(_shard_config(loaded, root, s3_endpoint=s3_endpoint)))


def embed_shards(
    loaded: LoadedModel,
    root: str,
    env: DistEnv,
    *,
    roles: Sequence[str] = ("query", "gallery"),
    batch_size: int = 64,
    num_workers: int = 2,
    skip_corrupt: bool = False,
    s3_endpoint: str | None = None,
    cam_offset: int = 0,
    manifest: dict[str, Any] | None = None,
) -> EmbedResult:
    """Embed the ``roles`` splits of the shards under ``root`` as dpm-eval reads them. Collective.

    ``cam_offset`` as in :func:`embed_items`; ``manifest``: ``root``'s index.json when already read.
    """
    from dpm_dist.data.loader import build_eval_loader
    from dpm_dist.data.shards import shard_entries, split_contiguous

    start = time.perf_counter()
    cfg = _shard_config(
        loaded,
        root,
        eval_batch_size=batch_size,
        num_workers=num_workers,
        skip_corrupt=skip_corrupt,
        s3_endpoint=s3_endpoint,
    )
    manifest = manifest or read_shard_manifest(loaded, root, s3_endpoint=s3_endpoint)
    counts = {role: [int(e["num_samples"]) for e in shard_entries(manifest, role)] for role in roles}
    empty = [role for role in roles if not counts[role]]
    if empty:
        raise ValueError(
            f"{root}: index.json has no {empty[0]} split (its splits: {', '.join(sorted(manifest['splits']))})"
        )
    share = sum(counts[r][i] for r in roles for i in split_contiguous(counts[r], env.rank, env.world_size))

    def batches() -> Iterator[dict[str, Any]]:
        for role in roles:
            yield from build_eval_loader(cfg, env, role)

    local = extract(_BothFeatures(loaded.model, cam_offset), _progress(batches(), share, env), device=loaded.device)
    rows = gather_embeddings(local)
    return EmbedResult(rows, None, sum(sum(c) for c in counts.values()), time.perf_counter() - start)


# ---- the file ---------------------------------------------------------------------------------------------------


def write_embeddings(path: str, result: EmbedResult, loaded: LoadedModel, settings: dict[str, Any]) -> None:
    """Parquet: one row per image; feat/feat_bn/mask as fixed-size float32 lists; facts in the schema metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows, dim = result.rows, int(loaded.meta["embed_dim"])
    feats = rows.feats.reshape(len(rows), 2 * dim) if len(rows) else rows.feats.new_zeros(0, 2 * dim)
    masks = rows.masks.reshape(len(rows), dim) if len(rows) else rows.masks.new_zeros(0, dim)

    def vectors(x: torch.Tensor) -> pa.Array:
        return pa.FixedSizeListArray.from_arrays(pa.array(x.float().contiguous().numpy().reshape(-1)), dim)

    def nullable(values: torch.Tensor) -> pa.Array:
        return pa.array([int(v) if v >= 0 else None for v in values.tolist()], type=pa.int64())

    columns = {
        "key": pa.array(rows.keys, type=pa.string()),
        "role": pa.array([r or None for r in rows.roles], type=pa.string()),
        "pid": nullable(rows.pids),
        "camid": nullable(rows.camids),
        "path": pa.array(
            [result.paths.get(k) for k in rows.keys] if result.paths else [None] * len(rows), type=pa.string()
        ),
        "feat": vectors(feats[:, :dim]),
        "feat_bn": vectors(feats[:, dim:]),
        "mask": vectors(masks),
    }
    facts = {
        "model": {k: v for k, v in loaded.meta.items() if k != "config"},
        "embedding": settings,
        "num_rows": len(rows),
        "num_skipped": result.num_skipped,
    }
    table = pa.table(columns).replace_schema_metadata({SCHEMA_KEY: json.dumps(facts).encode()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_metadata(path: str) -> dict[str, Any]:
    """The ``dpm`` schema metadata of an embedding file; errors name the file."""
    import pyarrow.parquet as pq

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such embedding file")
    try:
        schema = pq.read_schema(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid (a ValueError) or OSError for non-Parquet bytes
        raise ValueError(f"{path}: not a Parquet file ({str(exc).splitlines()[0][:120]})") from None
    raw = (schema.metadata or {}).get(SCHEMA_KEY)
    missing = [c for c in ("key", "pid", "camid", "feat", "mask") if c not in schema.names]
    if raw is None or missing:
        raise ValueError(
            f"{path}: not a dpm-embed file (no {'dpm metadata' if raw is None else repr(missing[0]) + ' column'})"
        )
    return json.loads(raw)
