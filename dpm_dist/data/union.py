"""Many datasets at once (``data.roots``, docs/data.md "Many datasets"): names, label and camera offsets, the
union's manifest, and the ``datasets`` record that checkpoints, results and model files carry. Pure: the
manifests are read by :mod:`dpm_dist.data.loader`.

Dataset d gets ``id_offset`` = the training identities of the datasets before it and ``cam_offset`` = their
cameras, so labels and camera ids of the union never collide; its keys become ``<name>/<key>``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dpm_dist.data.shards import FORMAT


@dataclass(frozen=True)
class Part:
    """One dataset of the training union: its root, name, and the shifts that keep labels and cameras apart."""

    root: str
    name: str = ""  # "" when there is one dataset: keys, labels and cameras stay as written
    id_offset: int = 0
    cam_offset: int = 0

    def apply(self, key: str, meta: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """The sample's key and metadata in the union: ``<name>/key``, label + id offset, camid + camera offset."""
        if not self.name:
            return key, meta
        label = int(meta.get("label", -1))
        return f"{self.name}/{key}", {
            **meta,
            "label": label + self.id_offset if label >= 0 else -1,
            "camid": int(meta["camid"]) + self.cam_offset,
        }


def dataset_names(roots: list[str], written: list[str | None]) -> list[str]:
    """Names of the datasets of ``data.roots``: index.json's ``dataset``; where two share it, the root's folder
    name; where those clash too, ``<name>_<position in data.roots>``. Characters outside [A-Za-z0-9_-] become _."""

    def clean(name: str) -> str:
        return re.sub(r"[^A-Za-z0-9_-]+", "_", name) or "dataset"

    def unique(names: list[str], fix: Callable[[int, str], str]) -> list[str]:
        return [fix(i, n) if names.count(n) > 1 else n for i, n in enumerate(names)]

    names = unique(
        [clean(w or "dataset") for w in written], lambda i, n: clean(roots[i].rstrip("/").rsplit("/", 1)[-1])
    )
    names = unique(names, lambda i, n: f"{n}_{i}")
    if len(set(names)) != len(names):
        raise ValueError(f"config field `data.roots`: cannot name its datasets apart ({names}); rename a folder")
    return names


Parts = list[tuple[Part, dict[str, Any]]]  # each dataset with its index.json


def offset_parts(roots: list[str], manifests: list[dict[str, Any]]) -> Parts:
    """The datasets of several roots, named and shifted in the order given."""
    parts, ids, cams = [], 0, 0
    for name, root, manifest in zip(dataset_names(roots, [m.get("dataset") for m in manifests]), roots, manifests):
        parts.append((Part(root, name, ids, cams), manifest))
        ids, cams = ids + manifest["num_train_ids"], cams + manifest["num_cams"]
    return parts


def _train_images(manifest: dict[str, Any]) -> int:
    return int(manifest["splits"].get("train", {}).get("num_samples", 0))


def records(parts: Parts, weights: list[float]) -> list[dict[str, Any]]:
    """The ``datasets`` list runs record: where each dataset is, its shifts, sizes and sampling weight
    (``weights`` normalised; [] gives each its share of the training images)."""
    raw = weights or [_train_images(m) for _, m in parts]
    return [
        {
            "name": part.name or (m.get("dataset") or "dataset"),
            "root": part.root,
            "dataset": m.get("dataset"),
            "id_offset": part.id_offset,
            "cam_offset": part.cam_offset,
            "num_train_ids": m["num_train_ids"],
            "num_cams": m["num_cams"],
            "num_images": _train_images(m),
            "weight": w / max(sum(raw), 1e-12),
        }
        for (part, m), w in zip(parts, raw)
    ]


def union_manifest(parts: Parts, weights: list[float]) -> dict[str, Any]:
    """One manifest for several datasets: identity and camera counts summed, label counts in order, split
    sizes summed (no shard lists: those stay with each dataset), ``dataset`` their common layout or ``generic``."""
    manifests = [m for _, m in parts]
    written = {m.get("dataset") for m in manifests}
    splits = {
        role: {
            "num_samples": sum(m["splits"].get(role, {}).get("num_samples", 0) for m in manifests),
            "num_ids": sum(m["splits"].get(role, {}).get("num_ids", 0) for m in manifests),
        }
        for role in ("train", "query", "gallery")
    }
    return {
        "format": FORMAT,
        "dataset": written.pop() if len(written) == 1 else "generic",
        "splits": splits,
        "num_train_ids": sum(m["num_train_ids"] for m in manifests),
        "num_cams": sum(m["num_cams"] for m in manifests),
        "train_label_counts": [n for m in manifests for n in m["train_label_counts"]],
        "datasets": records(parts, weights),
    }


def chunks_per_dataset(manifest: dict[str, Any], num_instances: int) -> list[int]:
    """The official sampler's K-chunks of each dataset: Σ over its identities of ⌊max(n, K) / K⌋."""
    k, counts, out = num_instances, manifest["train_label_counts"], []
    for entry in manifest["datasets"]:
        mine = counts[entry["id_offset"] : entry["id_offset"] + entry["num_train_ids"]]
        out.append(sum(max(n, k) // k for n in mine))
    return out


def describe_datasets(datasets: list[dict[str, Any]]) -> list[str]:
    """One line per dataset of several (none for one): where it is, its sizes, label and camera ranges, weight."""
    if len(datasets) < 2:
        return []
    return [
        f"{d['name']}: {d['root']} ({d['num_images']} images, labels {d['id_offset']}-{d['id_offset'] + d['num_train_ids'] - 1}, "
        f"cameras {d['cam_offset']}-{d['cam_offset'] + d['num_cams'] - 1}, weight {d['weight']:.3g})"
        for d in datasets
    ]


def same_datasets(saved: list[dict[str, Any]] | None, current: list[dict[str, Any]]) -> str | None:
    """None when ``current`` holds the datasets ``saved`` recorded, in order (their location may differ; a
    record from before ``datasets`` existed matches anything); else what differs, in words."""
    if not saved:
        return None

    def facts(entries: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
        return [(e.get("dataset"), e["num_train_ids"], e["num_cams"]) for e in entries]

    if facts(saved) == facts(current):
        return None

    def words(entries: list[dict[str, Any]]) -> str:
        return ", ".join(
            f"{e['name']} ({e.get('dataset')}: {e['num_train_ids']} ids, {e['num_cams']} cameras)" for e in entries
        )

    return f"{len(saved)} dataset{'s' * (len(saved) > 1)} [{words(saved)}], but the data now gives {len(current)} [{words(current)}]"
