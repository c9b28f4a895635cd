#!/usr/bin/env bash
# One node, N processes (GPUs, or CPU processes with gloo):
#   bash launch/torchrun.sh 8 experiment=occluded_duke engine=zero1_fp16 model.pretrained=/weights/jx_vit_base_p16_224-80ecf9dd.pth
# Several nodes, static rendezvous (run on every node with its NODE_RANK):
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 bash launch/torchrun.sh 8 experiment=occluded_duke
# Several nodes, c10d rendezvous (elastic membership; same command on every node):
#   NNODES=2 RDZV_ENDPOINT=10.0.0.1:29400 RDZV_ID=dpm42 bash launch/torchrun.sh 8 experiment=occluded_duke
# Elastic: a range of nodes (c10d only). A node lost mid-run makes the survivors fail their next collective
# (engine.collective_timeout_s), re-rendezvous without it (once the rendezvous gave up on it) and restart from the
# newest checkpoint that verifies, on the smaller world; with log.checkpoint_every_steps=N at most N steps are lost:
#   NNODES=1:4 RDZV_ENDPOINT=10.0.0.1:29400 RDZV_ID=dpm42 bash launch/torchrun.sh 8 experiment=... log.checkpoint_every_steps=200
# (RDZV_LAST_CALL_TIMEOUT: seconds the rendezvous waits for more nodes once the minimum is there, default 30;
# LOCAL_ADDR: this node's address for the rendezvous, when its hostname does not resolve to it; RDZV_IS_HOST=true
# on the node that hosts the rendezvous store, false elsewhere, when torchrun cannot tell from the addresses.
# A node joining a job that already runs, a replacement or one more up to MAX, starts with PREFLIGHT=0: the one-process
# check would find the run folder held by that job and refuse.)
# Restarts: a failed or killed rank makes torchrun restart every rank of the node, up to MAX_RESTARTS times
# (default 3; 0 turns it off); each restart resumes from the newest checkpoint that verifies. The arguments are
# checked once before torchrun starts (DPM_PREFLIGHT), so a configuration error is reported once, not restarted.
# With c10d, a restart waits up to RDZV_JOIN_TIMEOUT seconds (default 600) for every node to rejoin.
# Runs in the folder you start it from (relative data.root / log.output_dir mean what they say there), with
# $PYTHON, else the first python3/python on PATH that has dpm_dist installed, else this checkout's .venv.
# data.num_ids is per rank: the global batch is num_ids × num_instances × world size (paper: 16×4 on 1 GPU).
# Signals (docs/training.md, "Signals and pre-emption"): Ctrl-C, SIGTERM and SIGUSR1 sent to this script reach the
# ranks only (torchrun runs in a process group of its own); they stop at the next step boundary, rank 0 says in
# one line what is saved, and the script exits 128 + the signal's number: 130 (Ctrl-C), 143 (SIGTERM), 138
# (SIGUSR1). 143 and 138 mean "pre-empted: requeue / re-run the same command to resume".
set -euo pipefail
NPROC=${1:?usage: torchrun.sh NPROC_PER_NODE [hydra overrides...]}
shift
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
pick_python() {
    if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; return; fi
    for py in python3 python "$REPO/.venv/bin/python"; do
        if command -v "$py" >/dev/null 2>&1 && "$py" -c "import dpm_dist" >/dev/null 2>&1; then echo "$py"; return; fi
    done
    echo "$(basename "$0"): error: no python with dpm_dist installed (tried python3, python, $REPO/.venv/bin/python); set PYTHON=/path/to/python" >&2
    return 2
}
PY=$(pick_python)
NNODES=${NNODES:-1}
RESTARTS=${MAX_RESTARTS:-3}
if [[ "$NNODES" == *:* ]]; then
    if ! [[ "$NNODES" =~ ^[1-9][0-9]*:[1-9][0-9]*$ ]] || [ "${NNODES%%:*}" -gt "${NNODES##*:}" ]; then
        echo "$(basename "$0"): error: NNODES=$NNODES: expected a node count (2) or a range MIN:MAX with MIN <= MAX (1:4)" >&2
        exit 2
    fi
    if [ -z "${RDZV_ENDPOINT:-}" ]; then
        echo "$(basename "$0"): error: NNODES=$NNODES is a range of nodes: it needs the c10d rendezvous (set RDZV_ENDPOINT=host:port, the same on every node)" >&2
        exit 2
    fi
elif ! [[ "$NNODES" =~ ^[1-9][0-9]*$ ]]; then
    echo "$(basename "$0"): error: NNODES=$NNODES: expected a node count (2) or a range MIN:MAX (1:4)" >&2
    exit 2
fi
if [ "$RESTARTS" -gt 0 ] && [ "${PREFLIGHT:-1}" != 0 ] && [[ " $* " != *" -"* ]]; then  # not for --help / --cfg job
    DPM_PREFLIGHT=1 "$PY" -m dpm_dist.cli.train "$@"
fi
if [ -n "${RDZV_ENDPOINT:-}" ]; then
    CONF="join_timeout=${RDZV_JOIN_TIMEOUT:-600}${RDZV_LAST_CALL_TIMEOUT:+,last_call_timeout=$RDZV_LAST_CALL_TIMEOUT}"
    CONF+="${RDZV_IS_HOST:+,is_host=$RDZV_IS_HOST}"
    RUN=(--nnodes "$NNODES" --rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "${RDZV_ID:-dpm}"
         --rdzv-conf "$CONF")
    if [ -n "${LOCAL_ADDR:-}" ]; then RUN+=(--local-addr "$LOCAL_ADDR"); fi
elif [ "$NNODES" -gt 1 ]; then
    RUN=(--nnodes "$NNODES" --node-rank "${NODE_RANK:?set NODE_RANK}" --master-addr "${MASTER_ADDR:?set MASTER_ADDR}"
         --master-port "${MASTER_PORT:-29500}")
else
    RUN=(--standalone)
fi
# A rank stopped by a signal writes its exit status here and exits 0 (torchrun would restart a failed one).
DPM_STOP_STATUS_FILE=$(mktemp "${TMPDIR:-/tmp}/dpm-stop.XXXXXX")
export DPM_STOP_STATUS_FILE
set -m  # torchrun in a process group of its own: a terminal's Ctrl-C reaches this script, not torchrun
"$PY" -m torch.distributed.run "${RUN[@]}" --nproc-per-node "$NPROC" --max-restarts "$RESTARTS" \
    -m dpm_dist.cli.train "$@" &
TORCHRUN=$!
set +m
# To the ranks (torchrun's children): each records it and stops at the next step boundary. SIGTERM goes as
# SIGUSR1 (torchrun stops its ranks with SIGTERM, at once, when it restarts them), named in <file>.signal.
forward() {
    local ranks
    if [ ! -s "$DPM_STOP_STATUS_FILE.signal" ]; then echo "SIG$1" > "$DPM_STOP_STATUS_FILE.signal"; fi
    ranks=$(pgrep -P "$TORCHRUN" || true)
    if [ -n "$ranks" ]; then kill -s "$2" $ranks 2>/dev/null || true; fi
}
trap 'forward INT INT' INT
trap 'forward TERM USR1' TERM
trap 'forward USR1 USR1' USR1
while kill -0 "$TORCHRUN" 2>/dev/null; do wait "$TORCHRUN" || true; done  # a trapped signal ends a wait early
STATUS=0
wait "$TORCHRUN" || STATUS=$?
STOPPED=$(cat "$DPM_STOP_STATUS_FILE" 2>/dev/null || true)
rm -f "$DPM_STOP_STATUS_FILE" "$DPM_STOP_STATUS_FILE.signal"
exit "${STOPPED:-$STATUS}"
