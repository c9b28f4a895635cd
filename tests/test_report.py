"""``dpm-report`` and the paper presets: the paper's numbers in the code are the ones docs/method.md quotes, every
preset is the row it names, the report reads run folders and dpm-tune tables into one labelled table and plot,
and (slow) one command trains every row of Table 3 at tiny size and ``dpm-report`` reports them."""

from __future__ import annotations

import csv
import json
import re
import subprocess
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from dpm_dist.cli.common import CONFIG_MODULE
from dpm_dist.config import register_configs, to_config
from dpm_dist.report import CAPTION, PAPER_ROWS, ReportError, collect, table_rows, write_report
from tests.conftest import ROOT, VENV_BIN, relative_workdir, train_env

METHOD = ROOT / "docs" / "method.md"


def _doc_rows(first: str) -> list[list[str]]:
    """The rows of docs/method.md's tables whose first cell starts with ``first`` (cells stripped of backticks)."""
    rows = []
    for line in METHOD.read_text().splitlines():
        if line.startswith(f"| `{first}"):
            rows.append([c.strip().strip("`") for c in line.strip().strip("|").split("|")])
    return rows


def _num(cell: str) -> float:
    return float(cell)


def test_the_paper_numbers_are_the_ones_docs_method_quotes():
    rows = _doc_rows("table")
    assert [r[0] for r in rows] == [k for k in PAPER_ROWS if k.startswith("table")]
    for key, table, label, preset, _settings, r1, r5, r10, m in rows:
        row = PAPER_ROWS[key]
        assert (row.table, row.label, row.preset) == (f"Table {table}", label, preset), key
        assert (row.rank1, row.rank5, row.rank10, row.mAP) == (_num(r1), _num(r5), _num(r10), _num(m)), key
    points: dict[str, dict[float, tuple[float, float]]] = {}
    for key, swept, value, r1, m, _source in _doc_rows("fig5"):
        assert PAPER_ROWS[key].sweep == swept
        points.setdefault(key, {})[_num(value)] = (_num(r1), _num(m))
    assert points == {k: r.points for k, r in PAPER_ROWS.items() if r.sweep}
    short = re.search(r"Paper ablations on Occluded-Duke.*?\n\n", METHOD.read_text(), re.S)
    assert short and "baseline 64.8/57.8" in short.group(0) and "P+F 69.7/58.3" in short.group(0)


def _compose(overrides: list[str]) -> dict:
    register_configs()
    with initialize_config_module(config_module=CONFIG_MODULE, version_base=None):
        cfg = compose("train", overrides=overrides)
    to_config(cfg)  # validates
    return OmegaConf.to_container(cfg, resolve=True)


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_every_preset_is_the_row_it_names():
    paper = _flat(_compose(["experiment=occluded_duke"]))
    for key, row in PAPER_ROWS.items():
        if row.sweep:
            cfg = _flat(_compose(["experiment=occluded_duke", f"+tune={row.preset}"]))
            assert cfg["search.searcher"] == "grid" and f"search.space.{row.sweep}.values" in cfg, key
        else:
            cfg = _flat(_compose([f"experiment={row.preset}"]))
            assert (cfg["name"], cfg["log.output_dir"]) == (row.preset, f"runs/{row.preset}")
        assert cfg["paper_row"] == key
        differs = {
            k: cfg[k]
            for k in cfg
            if cfg[k] != paper.get(k) and not k.startswith(("search.", "log.")) and k not in ("name", "paper_row")
        }
        assert differs == row.settings, key
    experiments = sorted(p.stem for p in (ROOT / "configs" / "experiment").glob("occluded_duke_table*.yaml"))
    assert experiments == sorted(r.preset for r in PAPER_ROWS.values() if not r.sweep)


# ---- the report over run folders and dpm-tune tables -----------------------------------------------------------


def _run_folder(root: Path, name: str, paper_row: str, results: dict, world_size: int | None = 1, **loss) -> Path:
    """A finished run's files as dpm-train writes them: results.json, config.yaml, checkpoints/latest + meta."""
    from dpm_dist.config import DPMConfig

    folder = root / name
    (folder / "checkpoints" / "epoch_0001").mkdir(parents=True)
    config = OmegaConf.to_container(OmegaConf.structured(DPMConfig(name=name, paper_row=paper_row)))
    config["loss"].update(loss)
    config["log"]["output_dir"] = str(folder)
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(config)))
    (folder / "results.json").write_text(json.dumps({"results": results, "epochs": 1}))
    if world_size is not None:
        (folder / "checkpoints" / "latest").write_text("epoch_0001")
        meta = {"epoch": 1, "world_size": world_size}
        (folder / "checkpoints" / "epoch_0001" / "meta.json").write_text(json.dumps(meta))
    return folder


METRICS = {"rank1": 0.7, "rank5": 0.8, "rank10": 0.9, "mAP": 0.6, "mINP": 0.3}


def test_the_report_puts_each_run_beside_its_paper_row(tmp_path):
    runs_dir = tmp_path / "runs"
    base = _run_folder(runs_dir, "base", "table3/baseline", METRICS, world_size=2, masked_branch="off", beta=0.0)
    full = _run_folder(runs_dir, "full", "table3/dpm_hr_hem", dict(METRICS, rank1=0.72), world_size=None)
    other = _run_folder(runs_dir, "other", "", METRICS)
    runs = collect([str(base), str(full), str(other)])
    rows = table_rows(runs)
    assert [r["paper_label"] for r in rows] == ["Table 3: baseline", "Table 3: +DPM+HR+HEM", ""]
    assert rows[0]["rank1"] == pytest.approx(70.0) and rows[0]["paper_rank1"] == 64.8
    assert rows[0]["diff_rank1"] == pytest.approx(70.0 - 64.8) and rows[1]["diff_mAP"] == pytest.approx(60.0 - 61.8)
    assert rows[2]["paper_rank1"] is None and rows[2]["diff_rank1"] is None
    assert rows[0]["fields"] == "loss.beta=0.0 loss.masked_branch=off"  # what distinguishes the rows, nothing else
    assert rows[1]["fields"] == "loss.beta=0.1 loss.masked_branch=arcface"
    assert [(r["world_size"], r["seed"]) for r in rows] == [(2, 1234), (None, 1234), (1, 1234)]

    written = write_report(runs, str(tmp_path / "out"))
    assert [Path(p).name for p in written] == ["report.md", "report.csv", "table3.png"]
    md = (tmp_path / "out" / "report.md").read_text().splitlines()
    assert md[0].startswith("| run | paper row | R-1 | paper R-1 | Δ R-1 |") and md[5:] == ["", CAPTION]
    assert "| Table 3: baseline | 70.0 | 64.8 | +5.2 |" in md[2]
    with open(tmp_path / "out" / "report.csv") as f:
        table = list(csv.DictReader(f))
    assert [t["paper_row"] for t in table] == ["table3/baseline", "table3/dpm_hr_hem", ""]
    assert float(table[0]["diff_mAP"]) == pytest.approx(60.0 - 57.8) and table[0]["world_size"] == "2"
    assert (tmp_path / "out" / "table3.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_sweep_from_run_folders_or_a_dpm_tune_table_is_plotted(tmp_path):
    from dpm_dist.tune.results import write_csv

    runs = [
        _run_folder(tmp_path / "runs", f"b{beta}", "fig5/beta", dict(METRICS, mAP=0.5 + beta), beta=beta)
        for beta in (0.0, 0.1, 0.2)
    ]
    rows = table_rows(collect([str(r) for r in runs]))
    assert [r["paper_label"] for r in rows][1] == "Fig. 5: β sweep (loss.beta=0.1)"
    assert [r["paper_mAP"] for r in rows] == [61.0, 61.8, None]  # the points the paper quotes
    written = write_report(collect([str(r) for r in runs]), str(tmp_path / "beta"))
    assert [Path(p).name for p in written][2:] == ["fig5_beta.png"]

    search = tmp_path / "tune" / "occluded_duke_fig5_alpha"
    search.mkdir(parents=True)
    trials = [
        {"trial": f"0000{i}", "loss.alpha": a, "status": "done", "epochs": 3, "best_epoch": 3, "mAP": 0.4 + a / 10}
        for i, a in enumerate((0.1, 0.5, 0.9))
    ]
    for t in trials:
        t.update(rank1=t["mAP"] + 0.1, mINP=0.2, restored_from=0)
    write_csv(trials, str(search / "results.csv"))  # dpm-tune's own writer and columns
    runs_t = collect([str(search)])  # the folder holding results.csv
    assert [r.paper_row for r in runs_t] == ["fig5/alpha"] * 3 and runs_t[1].sweep_value() == 0.5
    rows = table_rows(runs_t)
    assert rows[1]["paper_rank1"] == 71.0 and rows[1]["rank5"] is None and rows[1]["fields"] == "loss.alpha=0.5"
    assert rows[0]["run"].endswith("results.csv (dpm-tune trial 00000)")
    written = write_report(runs_t, str(tmp_path / "alpha"))
    assert (tmp_path / "alpha" / "fig5_alpha.png").is_file() and len(written) == 3


def test_what_the_report_cannot_read_is_one_error_naming_the_path(tmp_path, capsys):
    from dpm_dist.cli.report import main

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ReportError, match=f"^{re.escape(str(empty))}: no results.json"):
        collect([str(empty)])
    half = _run_folder(tmp_path, "half", "", METRICS)
    (half / "config.yaml").unlink()
    with pytest.raises(ReportError, match="half: no config.yaml"):
        collect([str(half)])
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(ReportError, match="bad.csv: not a dpm-tune results table"):
        collect([str(bad)])
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path / "missing"), "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"dpm-report: error: {tmp_path / 'missing'}: no such file or folder"]
    assert not (tmp_path / "out").exists()


# ---- the CPU proof: every row of Table 3, one command, then dpm-report ------------------------------------------

# The Table 3 presets keep their model (12 blocks, taps 2/4/10/12 or the last block) at 64 wide and 64×32 px,
# one step each, on the tiny synthetic shards.
TINY_TABLE = [
    "model.embed_dim=64",
    "model.depth=12",
    "model.num_heads=4",
    "model.img_size=[64,32]",
    "model.stride=[6,6]",
    "model.patch_size=8",
    "data.dataset=synthetic",
    "data.root=shards",
    "data.img_size=[64,32]",
    "data.global_num_ids=0",  # the presets' 16 identities per global batch: 4 per rank here (data.num_ids)
    "data.num_ids=4",
    "data.num_instances=2",
    "data.num_workers=0",
    "data.eval_batch_size=16",
    "optim.epochs=1",
    "optim.warmup_epochs=0",
    "optim.steps_per_epoch=1",
    "log.progress=false",
    "log.tensorboard=false",
]


@pytest.mark.slow
def test_one_command_runs_every_row_of_table3_and_dpm_report_puts_them_beside_the_paper(tiny_shards, tmp_path):
    work = relative_workdir(tmp_path / "work", tiny_shards)
    train = subprocess.run(
        [str(VENV_BIN / "dpm-train"), "-m", "experiment=glob(occluded_duke_table3_*)", *TINY_TABLE],
        capture_output=True,
        text=True,
        env=train_env(),
        cwd=work,
        timeout=600,
    )
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    names = sorted(r.preset for r in PAPER_ROWS.values() if r.table == "Table 3")
    assert sorted(p.name for p in (work / "runs").iterdir() if p.name != "multirun") == names
    runs = [f"runs/{name}" for name in names]
    report = subprocess.run(
        [str(VENV_BIN / "dpm-report"), *runs, "--out", "report"],
        capture_output=True,
        text=True,
        env=train_env(),
        cwd=work,
        timeout=120,
    )
    assert report.returncode == 0 and report.stderr == "", report.stderr
    table = (work / "report" / "report.md").read_text()
    assert report.stdout.startswith(table)
    for name in names:
        row = PAPER_ROWS[f"table3/{name.removeprefix('occluded_duke_table3_')}"]
        line = next(ln for ln in table.splitlines() if f"`runs/{name}`" in ln)
        assert f"| Table 3: {row.label} |" in line and f"| {row.rank1} |" in line and f"| {row.mAP} |" in line
    with open(work / "report" / "report.csv") as f:
        assert [r["paper_row"] for r in csv.DictReader(f)] == [f"table3/{n.split('table3_')[1]}" for n in names]
    assert (work / "report" / "table3.png").stat().st_size > 0
    assert report.stdout.splitlines()[-1].startswith("dpm-report: 4 runs -> ")
