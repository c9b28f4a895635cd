"""Where a test run's time went, worker by worker, from the lines ``DPM_TEST_TIMELINE=FILE`` makes the suite write:

    DPM_TEST_TIMELINE=/tmp/timeline.tsv bash scripts/test.sh
    .venv/bin/python scripts/test_timeline.py /tmp/timeline.tsv [--top 15]

For each pytest-xdist worker: when it started its first test and ended its last, the seconds inside tests (fixtures
included) and between them, and its test files in the order it ran them with their seconds; then the slowest test
files overall. A worker that ends long before the others shows the run's tail: files to split or to start earlier.
"""

from __future__ import annotations

import argparse
import collections


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("timeline", help="the file DPM_TEST_TIMELINE named")
    parser.add_argument("--top", type=int, default=15, help="how many of the slowest files to list")
    args = parser.parse_args()
    started: dict[tuple[str, str], float] = {}
    spans: dict[str, list[tuple[float, float, str]]] = collections.defaultdict(list)
    with open(args.timeline) as lines:
        for line in lines:
            when, worker, event, nodeid = line.rstrip("\n").split("\t", 3)
            if event == "start":
                started[worker, nodeid] = float(when)
            elif (worker, nodeid) in started:
                spans[worker].append((started.pop((worker, nodeid)), float(when), nodeid))
    if not spans:
        raise SystemExit(f"{args.timeline}: no finished test in it")
    t0 = min(s for runs in spans.values() for s, _, _ in runs)
    end = max(e for runs in spans.values() for _, e, _ in runs)
    per_file: collections.Counter[str] = collections.Counter()
    unfinished = f"; {len(started)} test(s) started and never ended" if started else ""
    print(f"run: {end - t0:.0f} s from the first test's start to the last one's end{unfinished}")
    for worker in sorted(spans):
        runs = sorted(spans[worker])
        busy = sum(e - s for s, e, _ in runs)
        first, last = runs[0][0] - t0, runs[-1][1] - t0
        print(f"{worker}: {first:.0f} s -> {last:.0f} s, {busy:.0f} s in tests, {last - first - busy:.0f} s between")
        order: list[tuple[str, float]] = []
        for s, e, nodeid in runs:
            name = nodeid.split("::", 1)[0]
            per_file[name] += e - s
            if order and order[-1][0] == name:
                order[-1] = (name, order[-1][1] + e - s)
            else:
                order.append((name, e - s))
        print("   " + ", ".join(f"{name.removeprefix('tests/')} {secs:.0f}" for name, secs in order))
    print("slowest files (seconds in tests, all workers):")
    for name, secs in per_file.most_common(args.top):
        print(f"  {secs:7.1f}  {name}")


if __name__ == "__main__":
    main()
