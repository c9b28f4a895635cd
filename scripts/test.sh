#!/usr/bin/env bash
# The README's test command: bootstrap the environment, then run the whole suite on CPU.
# Extra arguments go to pytest (e.g. bash scripts/test.sh -k losses).
# Two pytest-xdist workers by default (DPM_TEST_WORKERS=N for another count, 0 for one process), each test file
# on one worker (--dist loadfile: a file's module fixtures, e.g. a trained run, are built once).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
workers=${DPM_TEST_WORKERS:-2}
# One torch thread per xdist worker (two on one process): two workers of two threads each oversubscribe the two
# cores, and OpenMP's spinning threads then take each other's time (the fast tier: 65-69 s with 2 threads a
# worker, 37-63 s with 1). The commands the tests start set their own (tests/conftest.py, train_env: 1).
if [ "$workers" = "0" ]; then threads=2; else threads=1; fi
export DS_ACCELERATOR=cpu PYTHONHASHSEED=0 OMP_NUM_THREADS=${OMP_NUM_THREADS:-$threads}
# The environment's commands first, ninja included: DeepSpeed JIT-builds its CPU comm op with the ninja on PATH,
# and two ninja versions (this one, 1.13, and a system 1.11) hash the build commands differently, so each
# rebuilds what the other built (a minute or more, every time a test process of the other kind starts).
export PATH="$PWD/.venv/bin:$PATH"
set +e
if [ "$workers" = "0" ]; then
    .venv/bin/python -m pytest "$@"
else
    .venv/bin/python -m pytest -n "$workers" --dist loadfile "$@"
fi
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "test.sh: pytest collected no tests; failing" >&2
    exit 1
fi
exit "$rc"
