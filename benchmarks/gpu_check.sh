#!/usr/bin/env bash
# GPU validation kit: correctness tests on CUDA, training/eval/loader throughput, machine summary.
#
#     bash benchmarks/gpu_wheels.sh                    # here first: .whl/ with the packages the GPU lacks
#     bash benchmarks/gpu_check.sh $OUT                # on the GPU machine (run tool: carry [".whl"], timeout ~540 s)
#     bash benchmarks/gpu_check.sh /tmp/out --dry-run  # on CPU: the same steps at tiny sizes (this .venv)
#
# Writes OUTDIR/gpu_check.md (one table), OUTDIR/gpu_check.json (every number) and OUTDIR/gpu_check.log.
# Each step runs under its own timeout, so a slow one cannot take the others' time (about 8 min in all).
#
# The package runs from a staged copy of the source, not an install (pyproject's requires-python <3.12
# stops pip on the GPU's Python 3.12): dpm_dist/ is copied with the top-level configs/ placed inside it as
# dpm_dist/configs/ -- what pyproject's package-dir mapping does in a wheel -- so `pkg://dpm_dist.configs`
# composes there as anywhere. PYTHONSAFEPATH keeps the checkout's own dpm_dist/ (no configs inside) off
# sys.path.
set -uo pipefail

[ $# -ge 1 ] || { echo "usage: bash benchmarks/gpu_check.sh OUTDIR [--dry-run]" >&2; exit 2; }
OUTDIR=$(mkdir -p "$1" && cd "$1" && pwd) || { echo "gpu_check: cannot create $1" >&2; exit 2; }
DRY=0
[ "${2:-}" = "--dry-run" ] && DRY=1
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LOG="$OUTDIR/gpu_check.log"
PARTS=$(mktemp -d -t gpu-check-XXXXXX)
trap 'rm -rf "$PARTS"' EXIT
: > "$LOG"

if [ "$DRY" = 1 ]; then
    PY=${PYTHON:-$ROOT/.venv/bin/python}
    SITE=""
    export DS_ACCELERATOR=cpu
    # DeepSpeed's CPU backend JIT-builds its shm comm op; in the shared cache, processes with other build
    # settings rebuild it over each other (minutes on a loaded box). A cache of our own is built once.
    export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/dpm-dist-gpu-check/torch_extensions}
    touch "$PARTS/dry_run"
    echo "gpu_check: dry run on CPU with $PY (no wheel install)" | tee -a "$LOG"
else
    PY=${PYTHON:-python3}
    SITE=/tmp/site
    ls "$ROOT"/.whl/*.whl >/dev/null 2>&1 || { echo "gpu_check: no wheels in $ROOT/.whl: run benchmarks/gpu_wheels.sh here and carry .whl" >&2; exit 2; }
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$ROOT"/.whl/*.whl \
        >>"$LOG" 2>&1 || { echo "gpu_check: wheel install failed (see $LOG)" >&2; tail -5 "$LOG" >&2; exit 1; }
fi

SRC="$PARTS/src"
mkdir -p "$SRC"
cp -r "$ROOT/dpm_dist" "$SRC/dpm_dist"
rm -rf "$SRC/dpm_dist/configs" && cp -r "$ROOT/configs" "$SRC/dpm_dist/configs"
find "$SRC" -name __pycache__ -prune -exec rm -rf {} +
export PYTHONPATH="${SITE:+$SITE:}$SRC" PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export TORCHINDUCTOR_CACHE_DIR="$PARTS/inductor" TOKENIZERS_PARALLELISM=false

# The limits fit one H200 in 8 minutes; the dry run gets SCALE times as long (a shared 2-core CPU box).
SCALE=${GPU_CHECK_TIME_SCALE:-$([ "$DRY" = 1 ] && echo 3 || echo 1)}

step() {  # step NAME SECONDS COMMAND...: run under timeout, log, record "exit-code seconds" for the report
    local name=$1 limit=$(($2 * SCALE)) start rc
    shift 2
    start=$SECONDS
    echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
    (cd "$ROOT" && timeout -k 10 "$limit" "$@") >>"$LOG" 2>&1
    rc=$?
    echo "$rc $((SECONDS - start))" > "$PARTS/$name.status"
    echo "=== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$LOG"
}

DRYFLAG=()
[ "$DRY" = 1 ] && DRYFLAG=(--dry-run)
CHECK=("$PY" benchmarks/gpu_check.py)
step summary 45 "${CHECK[@]}" summary "$PARTS" "${DRYFLAG[@]}"
step tests 110 "$PY" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider --junitxml="$PARTS/tests.xml"
step train_eager 90 "${CHECK[@]}" train "$PARTS" "${DRYFLAG[@]}"
step eval 30 "${CHECK[@]}" eval "$PARTS" "${DRYFLAG[@]}"
step loader 50 "${CHECK[@]}" loader "$PARTS" "${DRYFLAG[@]}"
step train_compile 140 "${CHECK[@]}" train "$PARTS" --compile "${DRYFLAG[@]}"
(cd "$ROOT" && "$PY" benchmarks/gpu_check.py report "$PARTS" "$OUTDIR") 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
[ -f "$OUTDIR/gpu_check.md" ] && [ -f "$OUTDIR/gpu_check.json" ] || { echo "gpu_check: no report written" >&2; exit 1; }
exit "$rc"
