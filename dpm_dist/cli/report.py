"""``dpm-report``: finished runs in one table beside the paper's numbers (docs/paper.md).

    dpm-report runs/occluded_duke_table3_*                  # report.md, report.csv in report/
    dpm-report runs/tune/occluded_duke_fig5_alpha --out fig5   # a dpm-tune results table: + fig5_alpha.png

Each RUN is a dpm-train run folder (results.json, config.yaml) or a dpm-tune results.csv (or its folder). A run
is labelled with the paper's row its config records (``paper_row``, set by the presets); the table gives its
rank-1/5/10 and mAP (percent, the last evaluation; a dpm-tune trial's best epoch), the paper's, the difference,
the config fields that differ between the runs, the world size and the seed.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from dpm_dist.cli.common import absolute_path, run_guarded

PROG = "dpm-report"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folder, dpm-tune results.csv or its folder")
    parser.add_argument(
        "--out", default="report", help="folder for report.md, report.csv, plots (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    return run_guarded(PROG, lambda: run(args))


def run(args: argparse.Namespace) -> int:
    from dpm_dist.report import collect, markdown, table_rows, write_report

    runs = collect(list(args.runs))
    written = write_report(runs, absolute_path(args.out))
    print(markdown(table_rows(runs)), end="", flush=True)
    unlabelled = sum(1 for r in runs if not r.paper_row)
    note = f"; {unlabelled} run{'s' if unlabelled != 1 else ''} without a paper_row" if unlabelled else ""
    print(f"{PROG}: {len(runs)} run{'s' if len(runs) != 1 else ''}{note} -> {', '.join(written)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
