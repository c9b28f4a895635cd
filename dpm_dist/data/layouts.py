"""Dataset folder layouts -> lists of :class:`Record` (docs/method.md §6.4, §6.5). Pure file listing, no image I/O.

pid and camid come from the file *name* only (the official regex searched the full path, so a folder
such as ``run_c1/`` broke it). Junk pid −1 is dropped, pid 0 (Market distractors) is kept, training
pids are relabelled in sorted order by :func:`relabel`.

Hidden entries (a leading dot: macOS ``._*`` resource forks, ``.DS_Store``) are never images: the official
parsers' ``glob('*.jpg')`` would pick up ``._0001_c1s1_000001_00.jpg`` and fail on it, so they are skipped.
Extensions are matched case-insensitively and ``.jpeg`` counts as JPEG (the official parsers take ``*.jpg``
only; this is our documented extension).

A dataset of one's own (docs/data.md, "Your own dataset") comes as a list file (:func:`read_list`: CSV/TSV of
path, identity, camera, role) or a ``<root>/<role>/<identity>/<camera>_*.jpg`` tree (:func:`scan_folders`);
identities and cameras are any strings, numbered by :func:`own_dataset`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

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


# ---- a dataset of one's own: a list file or a role/identity/camera folder tree --------------------------------

OWN_LAYOUTS = ("folders", "list")
LIST_COLUMNS = ("path", "identity", "camera", "role")
MAX_NAMED = 8  # bad rows named by line in the second line of the error


@dataclass(frozen=True)
class Row:
    """One image of a dataset of one's own, before numbering: names are the strings the user wrote."""

    path: str  # absolute file
    source: str  # as listed (list) or relative to the root (folders), '/'-separated
    identity: str
    camera: str
    role: str
    where: str  # "LIST line N" or "file ROOT/REL": what a message names


@dataclass
class OwnDataset:
    """:class:`Record` s of a list or folders dataset, the name -> integer maps and the warnings."""

    records: list[Record]
    identities: dict[str, int]  # identity name -> pid: training ones 0..C-1, then test-only ones C..
    cameras: dict[str, int]  # camera name -> camid 0..N-1
    warnings: list[str] = field(default_factory=list)
    where: dict[str, str] = field(default_factory=dict)  # Record.path -> where it was listed


class _BadRows:
    """Collects bad rows; :meth:`check` raises one ValueError: the first in full, the others by line/file."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str, str]] = []  # (full message, short place, short reason)

    def add(self, where: str, problem: str, place: str, reason: str) -> None:
        self.items.append((f"{where}: {problem}", place, reason))

    def check(self) -> None:
        if not self.items:
            return
        first, rest = self.items[0][0], self.items[1:]
        if not rest:
            raise ValueError(first)
        named = ", ".join(f"{place} ({reason})" for _, place, reason in rest[:MAX_NAMED])
        more = f", ... {len(rest) - MAX_NAMED} more" if len(rest) > MAX_NAMED else ""
        raise ValueError(f"{first}\nand {len(rest)} more bad row(s): {named}{more}")


def natural_key(text: str) -> tuple[list[str | int], str]:
    """Sort key putting ``cam2`` before ``cam10`` (digit runs compared as numbers; ties by the plain string)."""
    parts: list[str | int] = [int(p) if i % 2 else p for i, p in enumerate(re.split(r"(\d+)", text))]
    return parts, text


def _delimiter(list_path: str, header_line: str) -> str:
    ext = os.path.splitext(list_path)[1].lower()
    if ext == ".csv":  # Excel in locales with a decimal comma writes ';'
        return ";" if ";" in header_line and "," not in header_line else ","
    if ext in (".tsv", ".tab"):
        return "\t"
    return "\t" if "\t" in header_line else ","


def read_list(list_path: str) -> list[Row]:
    """The rows of a list file: CSV (``.csv``; ``;``-separated when the header row has ``;`` and no ``,``) or TSV (``.tsv``, ``.tab``; another extension: a tab in the header
    line means TSV), UTF-8, a header row naming the columns ``path, identity, camera, role`` (any order, any case;
    other columns are ignored), then one row per image. Cells are stripped of surrounding spaces; blank rows and
    rows starting with ``#`` are skipped. A relative path is relative to the list file's folder.

    Raises ValueError naming the file and line of the first bad row (and the lines of the others): wrong column
    count, an empty path/identity/camera, a role other than train/query/gallery (any case), a file that does not
    exist, a file listed twice for one role."""
    base = os.path.dirname(os.path.abspath(list_path))
    with open(list_path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ValueError(f"{list_path} line {line}: not UTF-8 text ({exc.reason}; save the list as UTF-8)") from exc
    lines = text.splitlines()
    first = next((ln for ln in lines if ln.strip() and not ln.lstrip().startswith("#")), "")
    reader = csv.reader(io.StringIO(text), delimiter=_delimiter(list_path, first))
    header: list[str] | None = None
    cols: dict[str, int] = {}
    rows: list[Row] = []
    seen: dict[tuple[str, str], int] = {}
    bad = _BadRows()
    try:
        for cells in reader:
            n = reader.line_num
            cells = [c.strip() for c in cells]
            if not any(cells) or cells[0].startswith("#"):
                continue
            where = f"{list_path} line {n}"
            if header is None:
                header = [c.lower() for c in cells]
                missing = [c for c in LIST_COLUMNS if c not in header]
                twice = [c for c in LIST_COLUMNS if header.count(c) > 1]
                if missing or twice:
                    what = f"missing {', '.join(missing)}" if missing else f"{', '.join(twice)} twice"
                    raise ValueError(
                        f"{where}: the header row must name the columns {', '.join(LIST_COLUMNS)} ({what}; "
                        f"got {', '.join(repr(c) for c in cells)})"
                    )
                cols = {c: header.index(c) for c in LIST_COLUMNS}
                continue
            if len(cells) != len(header):
                bad.add(where, f"{len(cells)} columns, the header has {len(header)}", f"line {n}", "column count")
                continue
            path, identity, camera, role = (cells[cols[c]] for c in LIST_COLUMNS)
            empty = next((c for c, v in zip(("path", "identity", "camera"), (path, identity, camera)) if not v), None)
            if empty:
                bad.add(where, f"empty {empty} column", f"line {n}", f"empty {empty}")
                continue
            if role.lower() not in SPLITS:
                bad.add(where, f"unknown role {role!r} (expected train, query or gallery)", f"line {n}", "unknown role")
                continue
            role = role.lower()
            full = os.path.normpath(path if os.path.isabs(path) else os.path.join(base, path))
            if not os.path.isfile(full):
                bad.add(where, f"file {path!r} not found ({full})", f"line {n}", "missing file")
                continue
            if (role, full) in seen:
                bad.add(
                    where,
                    f"file {path!r} is listed for {role} on line {seen[role, full]} already",
                    f"line {n}",
                    "twice",
                )
                continue
            seen[role, full] = n
            source = path.replace(os.sep, "/") if os.path.isabs(path) else os.path.normpath(path).replace(os.sep, "/")
            rows.append(Row(full, source, identity, camera, role, where))
    except csv.Error as exc:
        raise ValueError(f"{list_path} line {reader.line_num}: cannot read the row ({exc})") from exc
    if header is None:
        raise ValueError(f"{list_path}: empty; expected a header row {','.join(LIST_COLUMNS)} and one row per image")
    bad.check()
    if not rows:
        raise ValueError(f"{list_path}: a header row but no image rows")
    return rows


def scan_folders(root: str) -> tuple[list[Row], list[str]]:
    """Rows and warnings of a ``<root>/<role>/<identity>/<camera>_<anything>.<ext>`` tree.

    Role folders ``train``, ``query``, ``gallery`` (each optional, at least one); every folder inside one is an
    identity (its name, any string); the camera is the file name up to its first ``_``; images are
    :data:`IMAGE_EXTS` in any case, other files and hidden entries are ignored. Errors (one ValueError naming the
    first file, then the others): an image outside an identity folder, a folder inside an identity folder, a name
    without a ``<camera>_`` prefix. Other folders beside the role folders are a warning."""
    roles = [r for r in SPLITS if os.path.isdir(os.path.join(root, r))]
    if not roles:
        raise ValueError(
            f"folder {root!r}: no train/, query/ or gallery/ folder "
            "(layout folders: <root>/<role>/<identity>/<camera>_<anything>.jpg)"
        )
    warnings = []
    others = sorted(
        n for n in os.listdir(root) if not is_hidden(n) and n not in SPLITS and os.path.isdir(os.path.join(root, n))
    )
    if others:
        warnings.append(f"{root}: ignored folder(s) that are not a role (train, query, gallery): {', '.join(others)}")
    rows: list[Row] = []
    bad = _BadRows()
    for role in roles:
        for entry in sorted(os.listdir(os.path.join(root, role))):
            rel = f"{role}/{entry}"
            full = os.path.join(root, role, entry)
            if is_hidden(entry):
                continue
            if not os.path.isdir(full):
                if entry.lower().endswith(IMAGE_EXTS):
                    bad.add(
                        f"file {full}",
                        f"an image directly in {role}/ (it belongs in {role}/<identity>/)",
                        rel,
                        "no identity folder",
                    )
                continue
            for name in sorted(os.listdir(full)):
                path, rel_name = os.path.join(full, name), f"{rel}/{name}"
                if is_hidden(name):
                    continue
                if os.path.isdir(path):
                    bad.add(
                        f"folder {path}",
                        "the folders layout has no level below <role>/<identity>/",
                        rel_name,
                        "subfolder",
                    )
                    continue
                if not name.lower().endswith(IMAGE_EXTS):
                    continue
                camera, sep, _ = os.path.splitext(name)[0].partition("_")
                if not sep or not camera:
                    problem = "no `<camera>_` prefix" if not sep else "empty camera (the name starts with `_`)"
                    bad.add(f"file {path}", f"name has {problem}" if not sep else problem, rel_name, "camera")
                    continue
                rows.append(Row(path, rel_name, entry, camera, role, f"file {path}"))
    bad.check()
    if not rows:
        raise ValueError(f"folder {root!r}: no images in <role>/<identity>/ folders ({', '.join(IMAGE_EXTS)})")
    return rows, warnings


def _own_keys(rows: list[Row]) -> list[str]:
    """Keys ``<role>_<source without extension>`` (characters outside [A-Za-z0-9_-] -> '_', the role not
    repeated); keys that still collide get ``_<8 hex digits of the source's sha1>``, whatever the row order."""
    keys = []
    for row in rows:
        stem = re.sub(r"[^A-Za-z0-9_-]", "_", os.path.splitext(row.source)[0])
        keys.append(stem if stem.startswith(f"{row.role}_") else f"{row.role}_{stem}")
    counts = Counter(keys)
    return [
        f"{k}_{hashlib.sha1(r.source.encode()).hexdigest()[:8]}" if counts[k] > 1 else k for k, r in zip(keys, rows)
    ]


def _plural(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _query_warnings(rows: Iterable[Row]) -> list[str]:
    """Query images that the evaluation can never match: no gallery image of their identity at all, or gallery
    images only from the query's own camera (same-camera matches are junk: the query is skipped)."""
    gallery: dict[str, set[str]] = {}
    queries = []
    for row in rows:
        if row.role == "gallery":
            gallery.setdefault(row.identity, set()).add(row.camera)
        elif row.role == "query":
            queries.append(row)
    out = []
    absent = [q for q in queries if q.identity not in gallery]
    if absent:
        ids = {q.identity for q in absent}
        out.append(
            f"{absent[0].where}: identity {absent[0].identity!r} has query images but none in the gallery (in all "
            f"{_plural(len(ids), 'identity', 'identities')}, {_plural(len(absent), 'query image', 'query images')}; "
            "the evaluation skips them: they cannot be matched)"
        )
    same = [q for q in queries if q.identity in gallery and gallery[q.identity] == {q.camera}]
    if same:
        out.append(
            f"{same[0].where}: identity {same[0].identity!r} has gallery images only from camera {same[0].camera!r}, "
            f"the query's; {_plural(len(same), 'query image', 'query images')} like it cannot be matched (the "
            "evaluation ignores same-camera matches and skips them)"
        )
    return out


def own_dataset(rows: list[Row], origin: str) -> OwnDataset:
    """Number the names of ``rows`` (read from ``origin``, a list file or a root folder) deterministically.

    Training identities get 0..C-1 in natural order (``p2`` before ``p10``); identities only in query/gallery
    get C.. in natural order; an identity in both keeps its training number. Cameras, over all roles, get
    0..N-1 in natural order. Warnings: query images that cannot be matched (:func:`_query_warnings`), and
    identities both in train and in query/gallery (the usual protocol keeps them apart)."""
    train = sorted({r.identity for r in rows if r.role == "train"}, key=natural_key)
    test = sorted({r.identity for r in rows if r.role != "train"} - set(train), key=natural_key)
    identities = {name: pid for pid, name in enumerate(train + test)}
    cameras = {name: cam for cam, name in enumerate(sorted({r.camera for r in rows}, key=natural_key))}
    records = [
        Record(r.path, r.source, key, identities[r.identity], cameras[r.camera], r.role)
        for r, key in zip(rows, _own_keys(rows))
    ]
    warnings = _query_warnings(rows)
    both = sorted({r.identity for r in rows if r.role != "train"} & set(train), key=natural_key)
    if both:
        warnings.append(
            f"{origin}: {_plural(len(both), 'identity is', 'identities are')} both in train and in query/gallery "
            f"(e.g. {both[0]!r}); each keeps one number, but the usual re-ID protocol keeps them apart"
        )
    return OwnDataset(records, identities, cameras, warnings, {r.path: r.where for r in rows})


def scan_own(layout: str, src: str) -> OwnDataset:
    """``list``: ``src`` is the list file (:func:`read_list`); ``folders``: the root folder (:func:`scan_folders`)."""
    if layout == "list":
        if not os.path.isfile(src):
            raise FileNotFoundError(f"--list {src}: no such file")
        return own_dataset(read_list(src), src)
    if layout == "folders":
        if not os.path.isdir(src):
            raise FileNotFoundError(f"--src {src}: no such folder")
        rows, warnings = scan_folders(src)
        own = own_dataset(rows, src)
        own.warnings[:0] = warnings
        return own
    raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(OWN_LAYOUTS)}")
