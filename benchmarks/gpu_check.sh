#!/usr/bin/env bash
# GPU validation kit: correctness tests on CUDA, training/eval/loader throughput, the prototype head at
# C = 10^6 (replicated vs Partial FC), machine summary.
#
#     bash benchmarks/gpu_wheels.sh                    # here first: .whl/ with this project's wheel and the packages the GPU lacks
#     bash benchmarks/gpu_check.sh $OUT                # on the GPU machine (run tool: carry [".whl"], timeout ~540 s)
#     bash benchmarks/gpu_check.sh /tmp/out --dry-run  # on CPU: the same steps at tiny sizes (this .venv)
#
# Writes OUTDIR/gpu_check.md (one table), OUTDIR/gpu_check.json (every number) and OUTDIR/gpu_check.log.
# Each step runs under its own timeout, so a slow one cannot take the others' time (8 min in all at most).
#
# The product runs as installed, not from the source tree: the project's wheel (dpm_dist-*-py3-none-any.whl,
# configs inside) is installed with `pip install --no-index --find-links` into a scratch --target folder put on
# PYTHONPATH, with --no-deps (the GPU machine's own torch stays; .whl/ brings what it lacks), and every step runs
# from a working folder outside the checkout, so `import dpm_dist` resolves to the install (the summary and the
# log show dpm_dist.__file__). On the GPU that wheel comes from .whl/; the dry run builds it here first
# (`gpu_wheels.sh --project`) and installs it the same way over this .venv (its editable dpm_dist comes after).
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

SITE="$PARTS/site"
WORK="$PARTS/work"  # the steps' working folder: outside the checkout, so nothing imports the source tree
mkdir -p "$WORK"
if [ "$DRY" = 1 ]; then
    PY=${PYTHON:-$ROOT/.venv/bin/python}
    WHEELS="$PARTS/whl"
    export DS_ACCELERATOR=cpu
    # DeepSpeed's CPU backend JIT-builds its shm comm op; in the shared cache, processes with other build
    # settings rebuild it over each other (minutes on a loaded box). A cache of our own is built once.
    export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/dpm-dist-gpu-check/torch_extensions}
    touch "$PARTS/dry_run"
    echo "gpu_check: dry run on CPU with $PY (the project's wheel built here; dependencies from that environment)" | tee -a "$LOG"
    PYTHON="$PY" bash "$ROOT/benchmarks/gpu_wheels.sh" --project "$WHEELS" >>"$LOG" 2>&1 \
        || { echo "gpu_check: building the project's wheel failed (see $LOG)" >&2; tail -5 "$LOG" >&2; exit 1; }
    DEPS=()
else
    PY=${PYTHON:-python3}
    WHEELS="$ROOT/.whl"
    ls "$WHEELS"/dpm_dist-*.whl >/dev/null 2>&1 || { echo "gpu_check: no dpm_dist wheel in $WHEELS: run benchmarks/gpu_wheels.sh here and carry .whl" >&2; exit 2; }
    DEPS=()
    for whl in "$WHEELS"/*.whl; do case "$(basename "$whl")" in dpm_dist-*) ;; *) DEPS+=("$whl") ;; esac; done
fi
# --no-deps: dpm-dist's own pins (torch==2.14.1, ray...) are not what the GPU machine has; .whl/ holds what it lacks
(cd "$WORK" && "$PY" -m pip install -q --no-index --find-links "$WHEELS" --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" dpm-dist "${DEPS[@]}") >>"$LOG" 2>&1 \
    || { echo "gpu_check: wheel install failed (see $LOG)" >&2; tail -5 "$LOG" >&2; exit 1; }
export PYTHONPATH="$SITE" PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export TORCHINDUCTOR_CACHE_DIR="$PARTS/inductor" TOKENIZERS_PARALLELISM=false
read -r PYVER FOUND < <(cd "$WORK" && "$PY" -c "import dpm_dist, platform; print(platform.python_version(), dpm_dist.__file__)" 2>>"$LOG")
echo "gpu_check: Python ${PYVER:-?} imports dpm_dist from ${FOUND:-nowhere}" | tee -a "$LOG"
case "${FOUND:-}" in
    "$SITE"/dpm_dist/*) ;;
    *) echo "gpu_check: dpm_dist does not import from the installed wheel in $SITE" >&2; exit 1 ;;
esac

# The limits fit one H200 in 8 minutes; the dry run gets SCALE times as long (a shared 2-core CPU box).
SCALE=${GPU_CHECK_TIME_SCALE:-$([ "$DRY" = 1 ] && echo 3 || echo 1)}

step() {  # step NAME SECONDS COMMAND...: run under timeout, log, record "exit-code seconds" for the report
    local name=$1 limit=$(($2 * SCALE)) start rc
    shift 2
    start=$SECONDS
    echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
    (cd "$WORK" && timeout -k 10 "$limit" "$@") >>"$LOG" 2>&1
    rc=$?
    echo "$rc $((SECONDS - start))" > "$PARTS/$name.status"
    echo "=== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$LOG"
}

DRYFLAG=()
[ "$DRY" = 1 ] && DRYFLAG=(--dry-run)
CHECK=("$PY" "$ROOT/benchmarks/gpu_check.py")
# The prototype head alone at C = 10^6 on one GPU, bf16 products: replicated vs Partial FC at 10 % (one rank, the
# sharded head's code; docs/benchmarks.md, "Prototype head at scale"). The dry run: C = 2,000 in one CPU process.
HEAD=("$PY" "$ROOT/benchmarks/head_scale.py" --precision bf16 --kinds replicated sampled --sample-rate 0.1 --json "$PARTS/head.json")
if [ "$DRY" = 1 ]; then HEAD+=(--device cpu --inline --classes 2000 --steps 3); else HEAD+=(--device cuda --classes 1000000 --steps 10); fi
step summary 45 "${CHECK[@]}" summary "$PARTS" "${DRYFLAG[@]}"
step tests 110 "$PY" -m pytest -q -m gpu "$ROOT/tests/test_gpu.py" -p no:cacheprovider --junitxml="$PARTS/tests.xml"
step train_eager 90 "${CHECK[@]}" train "$PARTS" "${DRYFLAG[@]}"
step eval 30 "${CHECK[@]}" eval "$PARTS" "${DRYFLAG[@]}"
step loader 50 "${CHECK[@]}" loader "$PARTS" "${DRYFLAG[@]}"
step head 30 "${HEAD[@]}"
step train_compile 125 "${CHECK[@]}" train "$PARTS" --compile "${DRYFLAG[@]}"
(cd "$WORK" && "$PY" "$ROOT/benchmarks/gpu_check.py" report "$PARTS" "$OUTDIR") 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
[ -f "$OUTDIR/gpu_check.md" ] && [ -f "$OUTDIR/gpu_check.json" ] || { echo "gpu_check: no report written" >&2; exit 1; }
exit "$rc"
