"""Results beside the paper's: the numbers of the paper's ablations and the table ``dpm-report`` writes.

:data:`PAPER_ROWS` holds every row of the paper's Tables 3, 4 and 5 and the points of Fig. 5 that its text
quotes (Occluded-Duke, percent), keyed by the ``paper_row`` a preset records (``configs/experiment/
occluded_duke_table*.yaml``, ``configs/tune/occluded_duke_fig5_*.yaml``); docs/method.md §4.7 quotes the same
numbers and tests/test_report.py checks that the two agree.

:func:`collect` reads finished runs: a ``dpm-train`` run folder (``results.json``, ``config.yaml``, the world
size from its latest checkpoint) or a ``dpm-tune`` results table (``results.csv``, or the folder holding it);
:func:`write_report` writes the Markdown table, the CSV and, for the α / β sweeps of Fig. 5, a PNG plot of
each metric against the swept value with the paper's points beside ours. Plain Python; matplotlib is
imported only to draw.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, cast

METRICS = ("rank1", "rank5", "rank10", "mAP")
METRIC_NAMES = {"rank1": "R-1", "rank5": "R-5", "rank10": "R-10", "mAP": "mAP"}
# Fields that say where or how a run was logged, not what it trained: never "what distinguishes the rows".
BOOKKEEPING = ("name", "paper_row", "log", "search", "data.root", "data.roots", "data.eval_root", "data.num_workers")


@dataclass(frozen=True)
class PaperRow:
    """One row of a table of the paper (percent), or one of Fig. 5's sweeps (``sweep``: the swept field and the
    points the text quotes, value -> (R-1, mAP))."""

    table: str  # "Table 3"
    label: str  # the row as the paper names it
    preset: str  # the preset that runs it (experiment=... or tune=...)
    settings: dict[str, Any]  # the config fields that make the row, against experiment=occluded_duke
    rank1: float | None = None
    rank5: float | None = None
    rank10: float | None = None
    mAP: float | None = None
    sweep: str = ""  # Fig. 5: the swept config field
    points: dict[float, tuple[float, float]] = field(default_factory=dict)  # Fig. 5: value -> (R-1, mAP)

    def metric(self, name: str) -> float | None:
        return cast(float | None, getattr(self, name))


def _row(table: str, label: str, settings: dict[str, Any], numbers: tuple[float, float, float, float]) -> PaperRow:
    key = label.lower().replace("+", "_").replace(" ", "_").strip("_")
    preset = f"occluded_duke_table{table[-1]}_{key}"
    return PaperRow(table, label, preset, settings, *numbers)


_NO_MASK = {"loss.masked_branch": "off", "loss.beta": 0.0, "eval.distance": "cosine"}
_LAST_BLOCK = {"model.tap_blocks": [12], "loss.beta": 0.0}  # Table 3's "+DPM": the HMG reads block 12 only
PAPER_ROWS: dict[str, PaperRow] = {
    # Table 3: the components (HR: the HMG reads blocks 2, 4, 10, 12; HEM: β = 0.1).
    "table3/baseline": _row("Table 3", "baseline", _NO_MASK, (64.8, 80.8, 85.8, 57.8)),
    "table3/dpm": _row("Table 3", "+DPM", _LAST_BLOCK, (70.1, 82.8, 86.9, 59.9)),
    "table3/dpm_hr": _row("Table 3", "+DPM+HR", {"loss.beta": 0.0}, (71.0, 82.9, 87.2, 61.0)),
    "table3/dpm_hr_hem": _row("Table 3", "+DPM+HR+HEM", {}, (71.4, 83.7, 87.4, 61.8)),
    # Table 4: the loss of each branch (Cls + Mask-Cls; S softmax, A angular margin), in Table 3's +DPM setting.
    "table4/baseline_s": _row("Table 4", "baseline S", _NO_MASK, (64.8, 80.8, 85.8, 57.8)),
    "table4/baseline_a": _row(
        "Table 4", "baseline A", {**_NO_MASK, "loss.plain_branch": "arcface"}, (68.6, 81.2, 85.9, 58.5)
    ),
    "table4/dpm_s_s": _row(
        "Table 4", "DPM S+S", {**_LAST_BLOCK, "loss.masked_branch": "softmax"}, (64.6, 80.6, 85.5, 57.3)
    ),
    "table4/dpm_a_a": _row(
        "Table 4", "DPM A+A", {**_LAST_BLOCK, "loss.plain_branch": "arcface"}, (68.3, 80.0, 84.2, 57.7)
    ),
    "table4/dpm_s_a": _row("Table 4", "DPM S+A", _LAST_BLOCK, (70.1, 82.8, 86.9, 59.9)),
    # Table 5: where the mask acts, on the complete DPM.
    "table5/p_n": _row("Table 5", "P_n", {}, (71.4, 83.7, 87.4, 61.8)),
    "table5/p_n_f_n": _row("Table 5", "P_n+F_n", {"loss.mask_placement": "P_n+F_n"}, (69.5, 82.3, 86.8, 58.5)),
    "table5/p": _row("Table 5", "P", {"loss.mask_placement": "P"}, (70.2, 84.0, 87.4, 60.8)),
    "table5/p_f": _row("Table 5", "P+F", {"loss.mask_placement": "P+F"}, (69.7, 81.6, 85.1, 58.3)),
    # Fig. 5: the text quotes the peak of the α curve (on DPM+HR, β = 0); Table 3 gives β = 0 and β = 0.1.
    "fig5/alpha": PaperRow(
        "Fig. 5",
        "α sweep",
        "occluded_duke_fig5_alpha",
        {"loss.beta": 0.0},
        sweep="loss.alpha",
        points={0.5: (71.0, 61.0)},
    ),
    "fig5/beta": PaperRow(
        "Fig. 5",
        "β sweep",
        "occluded_duke_fig5_beta",
        {},
        sweep="loss.beta",
        points={0.0: (71.0, 61.0), 0.1: (71.4, 61.8)},
    ),
}
SWEEPS = {row.sweep: key for key, row in PAPER_ROWS.items() if row.sweep}  # swept field -> its paper row


CAPTION = (
    "R-k and mAP in percent. Ours: each run's last evaluation (a dpm-tune trial: its best epoch); paper: Tan et al., "
    "Dynamic Prototype Mask, ACM MM 2022, on Occluded-Duke; Δ = ours − paper, in points. Fields that differ: the "
    "config fields whose values differ between these runs."
)


class ReportError(ValueError):
    """A run the report cannot read; the message names its path."""


@dataclass
class Run:
    """One row of the report: a finished run (or a dpm-tune trial) and what it is."""

    path: str
    paper_row: str  # "" when the run records none
    metrics: dict[str, float | None]  # percent
    config: dict[str, Any]  # flattened dotted keys -> values
    world_size: int | None = None
    seed: int | None = None
    source: str = "dpm-train"  # or "dpm-tune <trial>"

    @property
    def paper(self) -> PaperRow | None:
        return PAPER_ROWS.get(self.paper_row)

    def sweep_value(self) -> float | None:
        row = self.paper
        if row is None or not row.sweep or self.config.get(row.sweep) is None:
            return None
        return float(self.config[row.sweep])


# ---- reading runs ----------------------------------------------------------------------------------------------


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _percent(value: Any) -> float | None:
    if value is None or value == "":
        return None
    number = float(value)
    return None if math.isnan(number) else 100.0 * number


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            data = json.load(f)
    except ValueError as err:
        raise ReportError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ReportError(f"{path}: expected a JSON object")
    return data


def read_run(folder: str) -> Run:
    """A finished ``dpm-train`` run folder: metrics of its last evaluation, its config, world size and seed."""
    from omegaconf import OmegaConf

    results_path, config_path = os.path.join(folder, "results.json"), os.path.join(folder, "config.yaml")
    if not os.path.isfile(results_path):
        raise ReportError(f"{folder}: no results.json (not a finished dpm-train run, nor a dpm-tune results.csv)")
    if not os.path.isfile(config_path):
        raise ReportError(f"{folder}: no config.yaml beside results.json (not a dpm-train run folder)")
    summary = _read_json(results_path)
    results = summary.get("results") or {}
    if "rank1" not in results or "mAP" not in results:
        raise ReportError(f"{results_path}: no evaluation in it (results.rank1 / results.mAP missing)")
    try:
        config = OmegaConf.to_container(OmegaConf.load(config_path), resolve=False)
    except Exception as err:  # a YAML error
        raise ReportError(f"{config_path}: not a readable config ({str(err).splitlines()[0]})") from None
    if not isinstance(config, dict):
        raise ReportError(f"{config_path}: expected a mapping")
    flat = flatten({str(k): v for k, v in config.items()})
    return Run(
        path=folder,
        paper_row=str(flat.get("paper_row") or ""),
        metrics={m: _percent(results.get(m)) for m in METRICS},
        config=flat,
        world_size=_world_size(folder),
        seed=flat.get("engine.seed"),
    )


def _world_size(folder: str) -> int | None:
    """The world size of the run's latest checkpoint (the one its final evaluation followed), or None."""
    root = os.path.join(folder, "checkpoints")
    try:
        with open(os.path.join(root, "latest")) as f:
            tag = f.read().strip()
        with open(os.path.join(root, tag, "meta.json")) as f:
            return int(json.load(f)["world_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def read_tune_table(path: str) -> list[Run]:
    """The trials of a ``dpm-tune`` results table (``results.csv``): metrics of each trial's best epoch.

    The swept field (a column named like a config field: ``loss.alpha``) names the paper row (Fig. 5's α or
    β sweep, :data:`SWEEPS`); the table records neither the world size nor the seed.
    """
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except UnicodeDecodeError:
        raise ReportError(f"{path}: not a text CSV file") from None
    if not rows or "trial" not in rows[0] or "rank1" not in rows[0]:
        raise ReportError(f"{path}: not a dpm-tune results table (no trial and rank1 columns)")
    swept = [c for c in rows[0] if "." in c]
    paper_row = next((SWEEPS[c] for c in swept if c in SWEEPS), "")
    runs = []
    for row in rows:
        config: dict[str, Any] = {}
        for column in swept:
            try:
                config[column] = float(row[column])
            except (TypeError, ValueError):
                config[column] = row[column]
        metrics = {m: _percent(row.get(m)) for m in METRICS}
        runs.append(Run(path, paper_row, metrics, config, source=f"dpm-tune trial {row['trial']}"))
    return runs


def collect(paths: list[str]) -> list[Run]:
    """The runs behind ``paths``: run folders, dpm-tune results.csv files, or folders holding one."""
    runs: list[Run] = []
    for path in paths:
        if os.path.isfile(path):
            if not path.endswith(".csv"):
                raise ReportError(f"{path}: expected a run folder or a dpm-tune results.csv")
            runs += read_tune_table(path)
        elif os.path.isdir(path):
            table = os.path.join(path, "results.csv")
            if not os.path.isfile(os.path.join(path, "results.json")) and os.path.isfile(table):
                runs += read_tune_table(table)
            else:
                runs.append(read_run(path))
        else:
            raise ReportError(f"{path}: no such file or folder")
    if not runs:
        raise ReportError("no runs to report")
    return runs


# ---- the table -------------------------------------------------------------------------------------------------


def distinguishing_fields(runs: list[Run]) -> list[str]:
    """The config fields whose values differ between the runs (bookkeeping fields left out), in name order."""
    keys = sorted({k for r in runs for k in r.config})
    out = []
    for key in keys:
        if any(key == b or key.startswith(b + ".") for b in BOOKKEEPING):
            continue
        if len({json.dumps(r.config.get(key), sort_keys=True, default=str) for r in runs}) > 1:
            out.append(key)
    return out


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def _value(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def table_rows(runs: list[Run]) -> list[dict[str, Any]]:
    """One dict per run, in the given order: run, paper row, ours, paper, difference (points), distinguishing
    fields, world size, seed."""
    fields = distinguishing_fields(runs)
    rows = []
    for run in runs:
        paper = run.paper
        row: dict[str, Any] = {
            "run": run.path if run.source == "dpm-train" else f"{run.path} ({run.source})",
            "paper_row": run.paper_row,
            "paper_label": f"{paper.table}: {paper.label}" if paper else "",
        }
        if paper and paper.sweep:
            row["paper_label"] += f" ({paper.sweep}={_value(run.config.get(paper.sweep))})"
        for m in METRICS:
            ours = run.metrics.get(m)
            theirs = _paper_metric(paper, run, m)
            row[m] = ours
            row[f"paper_{m}"] = theirs
            row[f"diff_{m}"] = ours - theirs if ours is not None and theirs is not None else None
        row["fields"] = " ".join(f"{k}={_value(run.config[k])}" for k in fields if k in run.config)
        row["world_size"] = run.world_size
        row["seed"] = run.seed
        rows.append(row)
    return rows


def _paper_metric(paper: PaperRow | None, run: Run, metric: str) -> float | None:
    if paper is None:
        return None
    if not paper.sweep:
        return paper.metric(metric)
    value = run.sweep_value()
    point = next((p for x, p in paper.points.items() if value is not None and math.isclose(x, value)), None)
    if point is None:
        return None
    return {"rank1": point[0], "mAP": point[1]}.get(metric)


def markdown(rows: list[dict[str, Any]]) -> str:
    """The report as a Markdown table: per metric, ours / paper / difference."""
    head = ["run", "paper row"]
    for m in METRICS:
        name = METRIC_NAMES[m]
        head += [name, f"paper {name}", f"Δ {name}"]
    head += ["fields that differ", "world size", "seed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [f"`{row['run']}`", row["paper_label"] or "(none)"]
        for m in METRICS:
            diff = row[f"diff_{m}"]
            cells += [_fmt(row[m]), _fmt(row[f"paper_{m}"]), "" if diff is None else f"{diff:+.1f}"]
        cells += [row["fields"].replace("|", "\\|"), _fmt(row["world_size"]), _fmt(row["seed"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join([*lines, "", CAPTION]) + "\n"


def write_csv(rows: list[dict[str, Any]], path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {k: ("" if v is None else round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}
            )


def plot_sweep(runs: list[Run], key: str, path: str) -> None:
    """R-1 and mAP against the swept value of ``PAPER_ROWS[key]``: ours as lines, the paper's quoted points as
    markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paper = PAPER_ROWS[key]
    ours = sorted((r.sweep_value(), r.metrics) for r in runs if r.paper_row == key and r.sweep_value() is not None)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, metric, index in zip(axes, ("rank1", "mAP"), (0, 1)):
        xs = [x for x, m in ours if m.get(metric) is not None]
        ys = [m[metric] for x, m in ours if m.get(metric) is not None]
        ax.plot(xs, ys, "o-", label="ours")
        if paper.points:
            px = sorted(paper.points)
            ax.plot(px, [paper.points[x][index] for x in px], "s", color="black", label="paper (values in its text)")
        ax.set_xlabel(paper.sweep)
        ax.set_ylabel(f"{METRIC_NAMES[metric]} (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{paper.table}: {paper.label} (ours: {len(ours)} runs; paper: Occluded-Duke)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_table(runs: list[Run], table: str, path: str) -> None:
    """R-1 and mAP of the runs labelled with rows of ``table`` ("Table 3"), ours beside the paper's, as bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mine = [r for r in runs if r.paper and r.paper.table == table]
    labels = [r.paper.label if r.paper else "" for r in mine]
    fig, axes = plt.subplots(1, 2, figsize=(max(6.0, 1.6 * len(mine) + 2), 3.5))
    xs = list(range(len(mine)))
    for ax, metric in zip(axes, ("rank1", "mAP")):
        ours = [r.metrics.get(metric) or 0.0 for r in mine]
        paper = [(r.paper.metric(metric) if r.paper else None) or 0.0 for r in mine]
        ax.bar([x - 0.2 for x in xs], ours, width=0.4, label="ours")
        ax.bar([x + 0.2 for x in xs], paper, width=0.4, label="paper", color="gray")
        ax.set_xticks(xs, labels, rotation=20, fontsize=8)
        ax.set_ylabel(f"{METRIC_NAMES[metric]} (%)")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{table} (ours: {len(mine)} runs; paper: Occluded-Duke)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(runs: list[Run], out_dir: str) -> list[str]:
    """In ``out_dir``: ``report.md`` and ``report.csv``; per table of the paper among the runs a bar chart
    (``table3.png``), per Fig. 5 sweep a curve (``fig5_alpha.png``). Returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    rows = table_rows(runs)
    written = [os.path.join(out_dir, "report.md"), os.path.join(out_dir, "report.csv")]
    with open(written[0], "w") as f:
        f.write(markdown(rows))
    write_csv(rows, written[1])
    tables = sorted({r.paper.table for r in runs if r.paper and not r.paper.sweep})
    for table in tables:
        path = os.path.join(out_dir, table.lower().replace(" ", "") + ".png")
        plot_table(runs, table, path)
        written.append(path)
    for key in sorted({r.paper_row for r in runs if r.paper and r.paper.sweep and r.sweep_value() is not None}):
        path = os.path.join(out_dir, key.replace("/", "_") + ".png")
        plot_sweep(runs, key, path)
        written.append(path)
    return written
