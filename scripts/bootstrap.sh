#!/usr/bin/env bash
# Idempotent environment set-up: creates .venv and installs dpm-dist with the pinned, verified
# dependency set (constraints.txt). Re-running is a no-op unless pyproject.toml or constraints.txt
# changed.  Usage: bash scripts/bootstrap.sh
# Python 3.11 (the suite's and CI's) by default; PYTHON=python3.12 or python3.13 for a .venv on another version
# pyproject's requires-python admits (README, "Two commands"). An existing .venv keeps its version.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
stamp=.venv/.bootstrap-stamp
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && .venv/bin/python -c "import dpm_dist" 2>/dev/null; then
    exit 0
fi
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[test,deploy]"
echo "$want" > "$stamp"
echo "bootstrap: environment ready in .venv"
