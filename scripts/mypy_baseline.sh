#!/usr/bin/env bash
# Rewrite tests/mypy_baseline.txt with the errors mypy finds today ([tool.mypy] in pyproject.toml), after
# fixing some or after a refactor moved them (CONTRIBUTING.md). `--check` prints the difference instead
# (+ new, - fixed) and fails when there is one; tests/test_types.py runs the same check in the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--check" ]; then
    exec .venv/bin/python tests/test_types.py
fi
exec .venv/bin/python tests/test_types.py --write
