"""Dataset folder layouts -> lists of :class:`Record` (docs/method.md §6.4, §6.5). Pure file listing, no image I/O.

pid and camid come from the file *name* only (the official regex searched the full path, so a folder
such as ``run_c1/`` broke it). Junk pid −1 is dropped, pid 0 (Market distractors) is kept, training
pids are relabelled in sorted order by :func:`relabel`.

Hidden entries (a leading dot: macOS ``._*`` resource forks, ``.DS_Store``) are never images: the official
parsers' ``glob('*.jpg')`` would pick up ``._0001_c1s1_000001_00.jpg`` and fail on it, so they are skipped.
Extensions are matched case-insensitively and ``.jpeg`` counts as JPEG (the official parsers take ``*.jpg``
only; this is our documented extension).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass

MARKET_RE = re.compile(r"^([-\d]+)_c(\d+)")
MARKET_FOLDERS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
JPEG_EXTS = (".jpg", ".jpeg")
IMAGE_EXTS = JPEG_EXTS + (".png", ".bmp", ".tif", ".tiff")
SPLITS = ("train", "query", "gallery")


@dataclass(frozen=True)
class Record:
    """One image of a dataset: where it is and what it shows. ``role`` is train, query or gallery."""

    path: str  # absolute source file
    source: str  # path relative to the dataset root (recorded in the shard's json)
    key: str  # unique sample key inside the dataset, no dots
    pid: int
    camid: int  # 0-based
    role: str


def parse_market_name(name: str) -> tuple[int, int]:
    """``(pid, camid)`` of a Market/Duke-style file name ``0001_c2s1_000151_01.jpg`` (camid 0-based)."""
    match = MARKET_RE.match(os.path.basename(name))
    if match is None:
        raise ValueError(f"file {name!r}: name has no `<pid>_c<cam>` prefix, cannot read pid/camid")
    pid, cam = int(match.group(1)), int(match.group(2))
    if cam < 1:
        raise ValueError(f"file {name!r}: camera {cam} is not 1-based")
    return pid, cam - 1


def parse_msmt_name(name: str) -> tuple[int, int]:
    """``(pid, camid)`` of an MSMT17 name ``0000_000_01_0303morning_0015_0.jpg`` (third field = camera)."""
    parts = os.path.basename(name).split("_")
    if len(parts) < 3 or not (parts[0].isdigit() and parts[2].isdigit()) or int(parts[2]) < 1:
        raise ValueError(f"file {name!r}: not an MSMT17 name `<pid>_<idx>_<cam>_...`, cannot read pid/camid")
    return int(parts[0]), int(parts[2]) - 1


def make_key(role: str, source: str) -> str:
    """Sample key: role + file name without extension, every character outside [A-Za-z0-9_-] -> '_'."""
    stem = os.path.splitext(os.path.basename(source))[0]
    return re.sub(r"[^A-Za-z0-9_-]", "_", f"{role}_{stem}")


def is_hidden(name: str) -> bool:
    """A leading dot: ``._x.jpg`` (macOS AppleDouble), ``.DS_Store``, editor and sync droppings."""
    return name.startswith(".")


def _list_images(folder: str, exts: tuple[str, ...]) -> list[str]:
    if not os.path.isdir(folder):
        raise ValueError(f"folder {folder!r} does not exist (expected by the dataset layout)")
    return sorted(n for n in os.listdir(folder) if n.lower().endswith(exts) and not is_hidden(n))


def scan_market_style(
    root: str,
    *,
    folders: dict[str, str] | None = None,
    exts: tuple[str, ...] = JPEG_EXTS,
    optional: tuple[str, ...] = (),
) -> list[Record]:
    """Market-1501 / DukeMTMC-reID / Occluded-Duke / generic: one flat folder per split."""
    records: list[Record] = []
    for role, sub in (folders or MARKET_FOLDERS).items():
        folder = os.path.join(root, sub)
        if role in optional and not os.path.isdir(folder):
            continue
        for name in _list_images(folder, exts):
            pid, camid = parse_market_name(os.path.join(sub, name))
            if pid == -1:
                continue  # junk
            source = f"{sub}/{name}"
            records.append(Record(os.path.join(folder, name), source, make_key(role, source), pid, camid, role))
    return records


def _msmt_dirs(root: str) -> tuple[str, str]:
    for train, test in (("train", "test"), ("mask_train_v2", "mask_test_v2")):
        if os.path.isdir(os.path.join(root, train)):
            return train, test
    raise ValueError(f"folder {root!r}: no MSMT17 `train/` (V1) or `mask_train_v2/` (V2) folder")


def scan_msmt17(root: str) -> list[Record]:
    """MSMT17 from its list files: train = list_train + list_val, query/gallery from their lists."""
    train_dir, test_dir = _msmt_dirs(root)
    lists = {
        "train": (train_dir, ["list_train.txt", "list_val.txt"]),
        "query": (test_dir, ["list_query.txt"]),
        "gallery": (test_dir, ["list_gallery.txt"]),
    }
    records: list[Record] = []
    for role, (sub, names) in lists.items():
        for list_name in names:
            list_path = os.path.join(root, list_name)
            if not os.path.isfile(list_path):
                if list_name == "list_val.txt":
                    continue
                raise ValueError(f"file {list_path!r}: MSMT17 list file is missing")
            with open(list_path) as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    parts = line.split()
                    rel = parts[0]
                    pid, camid = parse_msmt_name(rel)
                    if len(parts) > 1 and int(parts[1]) != pid:
                        raise ValueError(
                            f"file {list_path!r} line {lineno}: pid {parts[1]} disagrees with file name {rel!r}"
                        )
                    source = f"{sub}/{rel}"
                    records.append(
                        Record(os.path.join(root, sub, rel), source, make_key(role, source), pid, camid, role)
                    )
    return records


def scan_occluded_reid(root: str) -> list[Record]:
    """Occluded-REID: the raw release converted as Rename.py does (docs/method.md §6.5), or an already renamed folder.

    ``occluded_body_images/XXX/XXX_YY.tif`` -> query, camera 1 (camid 0);
    ``whole_body_images/XXX/XXX_YY.tif`` -> gallery, camera 3 (camid 2). Keys follow Rename.py's names.
    """
    if not os.path.isdir(os.path.join(root, "occluded_body_images")):
        folders = {"query": "query", "gallery": "bounding_box_test"}
        return scan_market_style(root, folders=folders, exts=IMAGE_EXTS)
    records: list[Record] = []
    for role, sub, cam, sess in (("query", "occluded_body_images", 1, 1), ("gallery", "whole_body_images", 3, 3)):
        folder = os.path.join(root, sub)
        if not os.path.isdir(folder):
            raise ValueError(f"folder {folder!r} does not exist (raw Occluded-REID needs both image folders)")
        persons = [p for p in os.listdir(folder) if not is_hidden(p) and os.path.isdir(os.path.join(folder, p))]
        for person in sorted(persons):
            for name in _list_images(os.path.join(folder, person), IMAGE_EXTS):
                match = re.match(r"^(\d+)_(\d+)$", os.path.splitext(name)[0])
                if match is None:
                    raise ValueError(f"file {os.path.join(sub, person, name)!r}: not an Occluded-REID `XXX_YY` name")
                pid, idx = int(match.group(1)), int(match.group(2))
                renamed = f"{pid:04d}_c{cam}s{sess}_{idx * 50:06d}_00"
                source = f"{sub}/{person}/{name}"
                records.append(
                    Record(os.path.join(folder, person, name), source, f"{role}_{renamed}", pid, cam - 1, role)
                )
    return records


LAYOUTS: dict[str, Callable[[str], list[Record]]] = {
    "market1501": scan_market_style,
    "dukemtmc": scan_market_style,
    "occluded_duke": scan_market_style,
    "msmt17": scan_msmt17,
    "occluded_reid": scan_occluded_reid,
    "generic": lambda root: scan_market_style(root, exts=IMAGE_EXTS, optional=("train", "query", "gallery")),
    "synthetic": scan_market_style,
}


def scan_layout(layout: str, root: str) -> list[Record]:
    """All records of the dataset folder ``root`` read with ``layout`` (a key of :data:`LAYOUTS`)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    if not os.path.isdir(root):
        raise ValueError(f"dataset folder {root!r} does not exist")
    records = LAYOUTS[layout](root)
    if not records:
        raise ValueError(f"dataset folder {root!r}: no images found for layout {layout!r}")
    seen: dict[str, str] = {}
    for rec in records:
        if rec.key in seen:
            raise ValueError(f"file {rec.source!r}: sample key {rec.key!r} collides with {seen[rec.key]!r}")
        seen[rec.key] = rec.source
    return records


def relabel(pids: list[int]) -> dict[int, int]:
    """pid -> 0..C-1 in sorted pid order (the same on every rank; fast-reid #523)."""
    return {pid: label for label, pid in enumerate(sorted(set(pids)))}
