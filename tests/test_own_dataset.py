"""A dataset of one's own: ``dpm-shards write --layout list --list FILE`` (CSV/TSV of path, identity, camera, role)
and ``--layout folders`` (``<root>/<role>/<identity>/<camera>_*.jpg``), string names numbered deterministically and
recorded in index.json, one line per bad row, and (slow) write -> verify -> train -> evaluate from a folder outside
the repository with relative paths."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from dpm_dist.cli.shards import main as shards_main
from dpm_dist.data.layouts import natural_key, read_list, scan_folders, scan_own
from tests.conftest import RUN_TIMEOUT_S, TINY_TRAIN, VENV_BIN, train_env

HEADER = "path,identity,camera,role"


def _jpeg(path: Path, shade: int = 128) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 16), (shade, 255 - shade, 40)).save(path, format="JPEG")


def _list(folder: Path, rows: list[str], name: str = "people.csv", header: str = HEADER, sep: str = ",") -> Path:
    """Write ``rows`` (``path,identity,camera,role``, comma-separated here) and create every image they name
    under ``folder`` (a path starting with ``missing/`` is left absent)."""
    for row in rows:
        rel = row.split(",")[0]
        if rel and not rel.startswith("missing/") and not rel.startswith("#"):
            _jpeg(folder / rel)
    text = "\n".join([header.replace(",", sep), *(r.replace(",", sep) for r in rows)]) + "\n"
    path = folder / name
    path.write_text(text)
    return path


GOOD = [
    "img/alice/1.jpg,alice,cam10,train",
    "img/alice/2.jpg,alice,cam2,train",
    "img/bob_2/1.jpg,bob_2,cam2,train",
    "img/p10/1.jpg,p10,cam1,train",
    "img/p9/1.jpg,p9,cam1,train",
    "test/zoe/q.jpg,zoe,cam1,query",
    "test/zoe/g1.jpg,zoe,cam2,gallery",
    "test/yan/q.jpg,yan,cam2,query",
    "test/yan/g.jpg,yan,cam10,gallery",
    "test/xia/g.jpg,xia,cam1,gallery",
]


# ---- the list file: parsing and numbering ----------------------------------------------------------------------


def test_names_are_numbered_in_natural_order_train_first_and_paths_are_relative_to_the_list(tmp_path: Path) -> None:
    own = scan_own("list", str(_list(tmp_path, GOOD)))
    # training identities 0..C-1, then the test-only ones; natural order: p9 before p10, cam2 before cam10
    assert own.identities == {"alice": 0, "bob_2": 1, "p9": 2, "p10": 3, "xia": 4, "yan": 5, "zoe": 6}
    assert own.cameras == {"cam1": 0, "cam2": 1, "cam10": 2}
    assert own.warnings == []
    first = own.records[0]
    assert (first.path, first.source, first.key) == (
        str(tmp_path / "img/alice/1.jpg"),
        "img/alice/1.jpg",
        "train_img_alice_1",
    )
    assert (first.pid, first.camid, first.role) == (0, 2, "train")
    assert [(r.pid, r.camid, r.role) for r in own.records[5:7]] == [(6, 0, "query"), (6, 1, "gallery")]
    assert own.where[first.path] == f"{tmp_path / 'people.csv'} line 2"
    assert len({r.key for r in own.records}) == len(GOOD)
    assert sorted(["cam10", "cam2", "c", "cam02"], key=natural_key) == ["c", "cam02", "cam2", "cam10"]


def test_absolute_paths_tsv_by_extension_or_tab_header_any_column_order_blank_and_comment_rows(tmp_path: Path) -> None:
    _jpeg(tmp_path / "abs" / "a.jpg")
    rows = [
        "# a comment,,,",
        "",
        f"train,alice,{tmp_path / 'abs' / 'a.jpg'},camA,note",
        "train,bob,img/b.jpg,camB,",
    ]
    _jpeg(tmp_path / "img" / "b.jpg")
    text = "\ufeffRole,Identity,PATH,camera,comment\n" + "\n".join(rows) + "\n"
    seps = (("l.tsv", "\t"), ("l.tab", "\t"), ("l.txt", "\t"), ("l.txt", ","), ("l.csv", ","), ("l.csv", ";"))
    for name, sep in seps:
        (tmp_path / name).write_text(text.replace(",", sep))
        own = scan_own("list", str(tmp_path / name))
        assert [(r.path, r.pid, r.camid) for r in own.records] == [
            (str(tmp_path / "abs" / "a.jpg"), 0, 0),
            (str(tmp_path / "img" / "b.jpg"), 1, 1),
        ], name
        assert own.records[0].source == str(tmp_path / "abs" / "a.jpg")


def test_the_same_ids_whatever_the_row_order(tmp_path: Path) -> None:
    a = scan_own("list", str(_list(tmp_path, GOOD)))
    b = scan_own("list", str(_list(tmp_path, GOOD[::-1], name="rev.csv")))
    assert a.identities == b.identities and a.cameras == b.cameras
    assert sorted((r.key, r.pid, r.camid) for r in a.records) == sorted((r.key, r.pid, r.camid) for r in b.records)


def test_colliding_keys_get_a_hash_of_their_source(tmp_path: Path) -> None:
    own = scan_own("list", str(_list(tmp_path, ["a/b_c.jpg,x,c1,train", "a_b/c.jpg,y,c1,train", "d.jpg,y,c1,train"])))
    keys = [r.key for r in own.records]
    assert keys[0].startswith("train_a_b_c_") and keys[1].startswith("train_a_b_c_") and keys[0] != keys[1]
    assert keys[2] == "train_d" and all(len(k) == len("train_a_b_c_") + 8 for k in keys[:2])


# ---- bad rows: one line naming the file and the line ----------------------------------------------------------

BAD_ROWS = {
    "missing file": ("missing/x.jpg,alice,cam1,train", "file 'missing/x.jpg' not found ({folder}/missing/x.jpg)"),
    "unknown role": ("img/x.jpg,alice,cam1,test", "unknown role 'test' (expected train, query or gallery)"),
    "empty camera": ("img/x.jpg,alice, ,train", "empty camera column"),
    "empty identity": ("img/x.jpg,,cam1,train", "empty identity column"),
    "column count": ("img/x.jpg,alice,cam1", "3 columns, the header has 4"),
    "listed twice": (
        "img/alice/1.jpg,alice,cam1,train",
        "file 'img/alice/1.jpg' is listed for train on line 2 already",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_a_bad_row_is_one_line_naming_the_file_and_line(tmp_path: Path, case: str) -> None:
    row, problem = BAD_ROWS[case]
    path = _list(tmp_path, [*GOOD[:3], row, *GOOD[3:]])
    with pytest.raises(ValueError) as err:
        read_list(str(path))
    assert str(err.value) == f"{path} line 5: {problem.format(folder=tmp_path)}"


def test_several_bad_rows_are_two_lines_the_first_in_full_then_the_others_by_line(tmp_path: Path) -> None:
    rows = [GOOD[0], "missing/a.jpg,a,c,train", "img/x.jpg,a,,query", *[f"missing/{i}.jpg,a,c,train" for i in range(9)]]
    path = _list(tmp_path, [*rows, "img/y.jpg,a,c,Train"])
    with pytest.raises(ValueError) as err:
        read_list(str(path))
    first, second = str(err.value).split("\n")
    assert first == f"{path} line 3: file 'missing/a.jpg' not found ({tmp_path}/missing/a.jpg)"
    assert second == (
        "and 10 more bad row(s): line 4 (empty camera), line 5 (missing file), line 6 (missing file), line 7 (missing "
        "file), line 8 (missing file), line 9 (missing file), line 10 (missing file), line 11 (missing file), ... 2 more"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "{path}: empty; expected a header row path,identity,camera,role and one row per image"),
        (HEADER + "\n", "{path}: a header row but no image rows"),
        (
            "img/a.jpg,alice,cam1,train\n",
            "{path} line 1: the header row must name the columns path, identity, camera, role (missing path, "
            "identity, camera, role; got 'img/a.jpg', 'alice', 'cam1', 'train')",
        ),
        (
            "path,identity,cam,role\n",
            "{path} line 1: the header row must name the columns path, identity, camera, role (missing camera; "
            "got 'path', 'identity', 'cam', 'role')",
        ),
        (
            "path,identity,camera,role,path,x,x\n",
            "{path} line 1: the header row must name the columns path, identity, camera, role (path twice; got "
            "'path', 'identity', 'camera', 'role', 'path', 'x', 'x')",
        ),
    ],
)
def test_a_bad_header_or_an_empty_list_is_named(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "l.csv"
    path.write_text(text)
    with pytest.raises(ValueError) as err:
        read_list(str(path))
    assert str(err.value) == message.format(path=path)


def test_a_list_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    path = tmp_path / "l.csv"
    path.write_bytes(b"path,identity,camera,role\nimg/\xe9.jpg,a,c,train\n")
    with pytest.raises(
        ValueError, match=rf"^{path} line 2: not UTF-8 text \(invalid continuation byte; save the list as UTF-8\)$"
    ):
        read_list(str(path))


# ---- warnings: query images that can never be matched; identities in train and test ---------------------------


def test_query_identities_without_gallery_images_are_a_warning_with_the_count(tmp_path: Path) -> None:
    rows = [
        *GOOD,
        "test/vic/q1.jpg,vic,cam1,query",
        "test/vic/q2.jpg,vic,cam2,query",
        "test/uma/q.jpg,uma,cam1,query",
        "test/xia/q.jpg,xia,cam1,query",  # xia's only gallery image is from cam1 too
        "img/p9/g.jpg,p9,cam2,gallery",
    ]
    path = _list(tmp_path, rows)
    own = scan_own("list", str(path))
    assert own.warnings == [
        f"{path} line 12: identity 'vic' has query images but none in the gallery (in all 2 identities, 3 query "
        "images; the evaluation skips them: they cannot be matched)",
        f"{path} line 15: identity 'xia' has gallery images only from camera 'cam1', the query's; 1 query image like "
        "it cannot be matched (the evaluation ignores same-camera matches and skips them)",
        f"{path}: 1 identity is both in train and in query/gallery (e.g. 'p9'); each keeps one number, but the usual "
        "re-ID protocol keeps them apart",
    ]
    assert own.identities["p9"] == 2 and [r.pid for r in own.records if r.source == "img/p9/g.jpg"] == [2]
    assert own.identities["uma"] == 4  # the test-only identities follow the 4 training ones: uma vic xia yan zoe


# ---- the folders layout --------------------------------------------------------------------------------------


def _tree(root: Path, files: list[str]) -> Path:
    for rel in files:
        if rel.lower().endswith((".jpg", ".png")):
            _jpeg(root / rel)
        else:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text("not an image")
    return root


TREE = [
    "train/alice/camA_0001.jpg",
    "train/alice/camB_0002.JPG",
    "train/Bob Smith/camA_x_y.jpg",
    "train/Bob Smith/notes.txt",  # not an image: ignored
    "train/Bob Smith/._camA_x_y.jpg",  # hidden: ignored
    "query/carol/camB_q.jpg",
    "gallery/carol/camA_g.png",
    "gallery/dave/cam10_g.jpg",
]


def test_folders_role_identity_camera_prefix(tmp_path: Path) -> None:
    root = _tree(tmp_path / "people", TREE)
    rows, warnings = scan_folders(str(root))
    assert warnings == []
    assert [(r.source, r.identity, r.camera, r.role) for r in rows] == [
        ("train/Bob Smith/camA_x_y.jpg", "Bob Smith", "camA", "train"),
        ("train/alice/camA_0001.jpg", "alice", "camA", "train"),
        ("train/alice/camB_0002.JPG", "alice", "camB", "train"),
        ("query/carol/camB_q.jpg", "carol", "camB", "query"),
        ("gallery/carol/camA_g.png", "carol", "camA", "gallery"),
        ("gallery/dave/cam10_g.jpg", "dave", "cam10", "gallery"),
    ]
    own = scan_own("folders", str(root))
    assert own.identities == {"Bob Smith": 0, "alice": 1, "carol": 2, "dave": 3}
    assert own.cameras == {"cam10": 0, "camA": 1, "camB": 2}
    assert [r.key for r in own.records][:2] == ["train_Bob_Smith_camA_x_y", "train_alice_camA_0001"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            "train/camA_1.jpg",
            "file {root}/train/camA_1.jpg: an image directly in train/ (it belongs in train/<identity>/)",
        ),
        (
            "query/carol/sub/camA_1.jpg",
            "folder {root}/query/carol/sub: the folders layout has no level below <role>/<identity>/",
        ),
        ("gallery/dave/g1.jpg", "file {root}/gallery/dave/g1.jpg: name has no `<camera>_` prefix"),
        ("gallery/dave/_g1.jpg", "file {root}/gallery/dave/_g1.jpg: empty camera (the name starts with `_`)"),
    ],
)
def test_folders_errors_name_the_file(tmp_path: Path, extra: str, message: str) -> None:
    root = _tree(tmp_path / "people", [*TREE, extra])
    with pytest.raises(ValueError) as err:
        scan_folders(str(root))
    assert str(err.value) == message.format(root=root)


def test_folders_without_a_role_folder_or_with_others(tmp_path: Path) -> None:
    root = _tree(tmp_path / "people", ["Train/alice/camA_1.jpg", "test/bob/camA_1.jpg"])
    with pytest.raises(ValueError) as err:
        scan_folders(str(root))
    assert str(err.value) == (
        f"folder {str(root)!r}: no train/, query/ or gallery/ folder "
        "(layout folders: <root>/<role>/<identity>/<camera>_<anything>.jpg)"
    )
    _tree(root, TREE)
    assert scan_folders(str(root))[1] == [
        f"{root}: ignored folder(s) that are not a role (train, query, gallery): Train, test"
    ]


# ---- dpm-shards write, in process -----------------------------------------------------------------------------


def test_write_list_records_the_names_in_index_json(tmp_path: Path, monkeypatch, capsys) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    _list(folder, GOOD)
    monkeypatch.chdir(tmp_path)
    assert shards_main(["write", "--layout", "list", "--list", "data/people.csv", "--max-count", "3"]) == 0
    out = tmp_path / "shards" / "people"
    assert capsys.readouterr().out == (
        f"wrote {out}: train: 5 images / 4 ids / 2 shards; query: 2 images / 2 ids / 1 shards; "
        "gallery: 3 images / 3 ids / 1 shards; C=4 cams=3\n"
    )
    manifest = json.loads((out / "index.json").read_text())
    assert (manifest["dataset"], manifest["layout"]) == ("generic", "list")
    assert manifest["identities"] == {"alice": 0, "bob_2": 1, "p9": 2, "p10": 3, "xia": 4, "yan": 5, "zoe": 6}
    assert manifest["cameras"] == {"cam1": 0, "cam2": 1, "cam10": 2}
    assert manifest["relabel"] == {str(i): i for i in range(4)} and manifest["num_cams"] == 3
    from dpm_dist.data.shards import iter_shard, verify

    assert verify(str(out)) == []
    metas = {s["key"]: s["meta"] for s in iter_shard("q", (out / "query-00000.tar").read_bytes())}
    assert metas["query_test_zoe_q"] == {
        "camid": 0,
        "label": -1,
        "pid": 6,
        "role": "query",
        "source": "test/zoe/q.jpg",
        "split": "test",
    }


def test_write_folders_defaults_to_the_root_folder_name(tmp_path: Path, monkeypatch, capsys) -> None:
    _tree(tmp_path / "people", [*TREE, "val/x/camA_1.jpg"])
    monkeypatch.chdir(tmp_path)
    assert shards_main(["write", "--layout", "folders", "--src", "people"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(f"wrote {tmp_path / 'shards' / 'people'}: train: 3 images / 2 ids / 1 shards;")
    assert captured.err == (
        f"dpm-shards: warning: {tmp_path / 'people'}: ignored folder(s) that are not a role (train, query, gallery): "
        "val\n"
    )
    manifest = json.loads((tmp_path / "shards" / "people" / "index.json").read_text())
    assert (manifest["layout"], manifest["identities"], manifest["cameras"]) == (
        "folders",
        {"Bob Smith": 0, "alice": 1, "carol": 2, "dave": 3},
        {"cam10": 0, "camA": 1, "camB": 2},
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--layout", "list", "--list", "data/people.csv", "--src", "data"],
            "--layout list takes --list FILE (paths in it are relative to its folder), not --src",
        ),
        (["--layout", "list"], "--layout list needs --list FILE (a CSV/TSV with columns path,identity,camera,role)"),
        (
            ["--layout", "folders", "--list", "data/people.csv"],
            "--list is for --layout list only (--layout folders reads --src DIR)",
        ),
        (["--layout", "generic"], "--layout generic needs --src DIR (the dataset folder)"),
        (["--layout", "list", "--list", "nope.csv"], "--list {tmp}/nope.csv: no such file"),
        (["--layout", "folders", "--src", "nope"], "--src {tmp}/nope: no such folder"),
        (
            ["--layout", "list", "--list", "data/bad.csv"],
            "{tmp}/data/bad.csv line 3: unknown role 'tset' (expected train, query or gallery)",
        ),
        (
            ["--layout", "list", "--list", "data/broken.csv"],
            "file '{tmp}/data/img/broken.jpg': cannot decode image (cannot identify image file <any>) "
            "(listed on {tmp}/data/broken.csv line 2); nothing was written (--skip-corrupt leaves such files out, "
            "listed in index.json)",
        ),
    ],
)
def test_write_errors_are_one_line_exit_2(tmp_path: Path, monkeypatch, capsys, argv: list[str], message: str) -> None:
    folder = tmp_path / "data"
    _list(folder, GOOD)
    _list(folder, [GOOD[0], GOOD[1].replace("train", "tset")], name="bad.csv")
    (folder / "img" / "broken.jpg").write_bytes(b"not a jpeg")
    (folder / "broken.csv").write_text(f"{HEADER}\nimg/broken.jpg,a,c,train\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        shards_main(["write", *argv])
    assert exit_.value.code == 2
    expected = "dpm-shards: error: " + message.format(tmp=tmp_path) + "\n"
    pattern = ".*".join(re.escape(part) for part in expected.split("<any>"))  # PIL's message names an object id
    assert re.fullmatch(pattern, capsys.readouterr().err)
    assert not (tmp_path / "shards").exists()


# ---- the whole path, as a user runs it ------------------------------------------------------------------------


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, env=train_env(), cwd=cwd, timeout=RUN_TIMEOUT_S)


@pytest.mark.slow
def test_write_verify_train_evaluate_from_a_list_with_string_identities(tmp_path: Path) -> None:
    """Synthetic people saved as JPEG files under string names (``alice``, ``bob_2``, cameras ``camA``...), a CSV
    list with paths relative to it, then the four commands from a folder outside the repository."""
    from dpm_dist.data.synth import SynthSpec, synth_samples

    work = tmp_path / "work"
    names = ["alice", "bob_2", "carol", "dave", "eve", "fay", "gus", "hal", "ivy", "jo", "kai"]
    rows = []
    spec = SynthSpec(
        seed=5,
        num_ids=6,
        num_test_ids=5,
        images_per_id=4,
        query_per_id=1,
        gallery_per_id=3,
        num_cams=3,
        height=32,
        width=16,
    )
    for s in synth_samples(spec):
        who, cam = names[s.pid - 1], f"cam{'ABC'[s.camid]}"
        rel = f"photos/{who}/{cam}_{s.key}.jpg"
        (work / "people" / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / "people" / rel).write_bytes(s.jpg)
        rows.append(f"{rel},{who},{cam},{s.role}")
    (work / "people" / "list.csv").write_text("\n".join([HEADER, *rows]) + "\n")

    write = _run([str(VENV_BIN / "dpm-shards"), "write", "--layout", "list", "--list", "people/list.csv"], work)
    assert write.returncode == 0 and write.stderr == "", write.stderr
    assert write.stdout == (
        f"wrote {work / 'shards' / 'list'}: train: 24 images / 6 ids / 1 shards; query: 5 images / 5 ids / 1 shards; "
        "gallery: 15 images / 5 ids / 1 shards; C=6 cams=3\n"
    )
    manifest = json.loads((work / "shards" / "list" / "index.json").read_text())
    assert manifest["identities"] == {n: i for i, n in enumerate(names)} and list(manifest["cameras"]) == [
        "camA",
        "camB",
        "camC",
    ]

    verify = _run([str(VENV_BIN / "dpm-shards"), "verify", "shards/list"], work)
    assert (verify.returncode, verify.stdout) == (0, f"{work / 'shards' / 'list'}: OK\n"), verify.stderr

    # index.json says dataset generic: the default preset's data.dataset=synthetic would be refused
    args = [*TINY_TRAIN, "optim.epochs=1", "eval.period=1", "data.root=shards/list", "data.dataset=generic"]
    train = _run([str(VENV_BIN / "dpm-train"), *args, "log.output_dir=run"], work)
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    assert f"  data      generic: {work / 'shards' / 'list'} (24 images, 6 identities, 3 cameras;" in train.stdout
    assert "(5 queries, 15 gallery images)" in train.stdout

    ev = _run([str(VENV_BIN / "dpm-eval"), "--checkpoint", "run/model_final.pt", "--output-dir", "ev"], work)
    assert ev.returncode == 0, ev.stderr[-3000:]
    result = json.loads((work / "ev" / "results.json").read_text())
    trained = json.loads((work / "run" / "results.json").read_text())["results"]
    assert result["metrics"]["num_query"] == 5 and result["metrics"]["mAP"] == pytest.approx(trained["mAP"])
