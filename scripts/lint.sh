#!/usr/bin/env bash
# The linters CI runs before the tests (CONTRIBUTING.md): ruff's lint rules and its formatter, as configured in
# pyproject.toml. Fast (a second or two) and fails on any finding. `bash scripts/lint.sh --fix` applies ruff's
# safe fixes and formats the tree instead of only checking it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
if [ "${1:-}" = "--fix" ]; then
    .venv/bin/ruff check --fix .
    .venv/bin/ruff format .
else
    .venv/bin/ruff check .
    .venv/bin/ruff format --check .
fi
