"""mypy over the package (``[tool.mypy]`` in pyproject.toml) against a baseline of known errors.

``tests/mypy_baseline.txt`` holds the errors the tree had when type checking was introduced, one per line as
``file: message [code]`` (no line numbers, so an edit elsewhere in a file does not invalidate it; a message
that occurs twice in a file is listed twice). The test fails on any error not in the baseline, and on baseline
entries that no longer occur (fixed: shrink the baseline). After fixing errors, or when a refactor moves them
to other files, regenerate it with one command::

    bash scripts/mypy_baseline.sh        # = python tests/test_types.py --write

A new error is fixed, not added to the baseline (CONTRIBUTING.md).
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BASELINE = ROOT / "tests" / "mypy_baseline.txt"
HEADER = "# mypy errors known when type checking started; only ever shrinks (tests/test_types.py says how)\n"
_ERROR = re.compile(r"^(?P<file>[^:\s]+\.py):\d+(?::\d+)?: error: (?P<message>.*)$")


def run_mypy() -> tuple[list[str], str]:
    """mypy as configured in pyproject.toml: (normalised error lines, mypy's full output)."""
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-pretty", "--no-error-summary", "--hide-error-context"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if proc.returncode not in (0, 1):  # 2: mypy itself failed (a crash, a bad config)
        raise RuntimeError(f"mypy exited {proc.returncode}:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return normalise(proc.stdout), proc.stdout


def normalise(output: str) -> list[str]:
    """``path:line[:col]: error: message  [code]`` -> ``path: message [code]``, sorted; line numbers inside
    messages (``defined on line 42``) dropped too."""
    found = []
    for line in output.splitlines():
        match = _ERROR.match(line.strip())
        if match:
            message = re.sub(r"\bline \d+\b", "line N", " ".join(match["message"].split()))
            found.append(f"{match['file']}: {message}")
    return sorted(found)


def read_baseline() -> list[str]:
    lines = BASELINE.read_text().splitlines() if BASELINE.exists() else []
    return [line for line in lines if line.strip() and not line.startswith("#")]


def write_baseline(errors: list[str]) -> None:
    from dpm_dist.fsio import write_text_atomic

    write_text_atomic(str(BASELINE), HEADER + "".join(f"{e}\n" for e in errors))


@pytest.mark.slow  # mypy over the package: tens of seconds, in a subprocess
def test_no_type_error_beyond_the_baseline():
    got, output = run_mypy()
    new = Counter(got) - Counter(read_baseline())
    fixed = Counter(read_baseline()) - Counter(got)
    assert not new, (
        f"{sum(new.values())} mypy error(s) not in tests/mypy_baseline.txt; fix them (mypy's output):\n"
        + "\n".join(line for line in output.splitlines() if any(_matches(line, e) for e in new))
    )
    assert not fixed, (
        f"{sum(fixed.values())} baseline entr(ies) no longer occur: shrink the baseline with "
        "`bash scripts/mypy_baseline.sh`:\n" + "\n".join(sorted(fixed))
    )


def _matches(raw: str, normalised: str) -> bool:
    return normalise(raw) == [normalised]


def test_normalise_drops_line_numbers_and_keeps_duplicates():
    out = (
        'dpm_dist/a.py:3: error: Name "x" already defined on line 1  [no-redef]\n'
        "dpm_dist/a.py:9:5: error: Incompatible types  [assignment]\n"
        "dpm_dist/a.py:12: error: Incompatible types  [assignment]\n"
        "dpm_dist/a.py:12: note: see https://mypy.readthedocs.io\n"
    )
    assert normalise(out) == [
        "dpm_dist/a.py: Incompatible types [assignment]",
        "dpm_dist/a.py: Incompatible types [assignment]",
        'dpm_dist/a.py: Name "x" already defined on line N [no-redef]',
    ]


def main(argv: list[str]) -> int:
    """``--write``: run mypy and rewrite the baseline with today's errors; else print the difference."""
    got, _ = run_mypy()
    if "--write" in argv:
        before = len(read_baseline())
        write_baseline(got)
        files = len({e.split(":", 1)[0] for e in got})
        print(f"tests/mypy_baseline.txt: {len(got)} errors in {files} files (was {before})")
        return 0
    new, fixed = Counter(got) - Counter(read_baseline()), Counter(read_baseline()) - Counter(got)
    print("\n".join([*(f"+ {e}" for e in sorted(new.elements())), *(f"- {e}" for e in sorted(fixed.elements()))]))
    return 1 if new or fixed else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main(sys.argv[1:]))
