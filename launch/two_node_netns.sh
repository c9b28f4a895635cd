#!/usr/bin/env bash
# Two "nodes" on one machine: two network namespaces joined by a veth pair, one torchrun node in each,
# c10d rendezvous over that link, hosted by node 0 (gloo pinned to the veth interfaces). Needs root (ip netns).
#   sudo bash launch/two_node_netns.sh 1 -m dpm_dist.cli.train experiment=tiny optim.epochs=1 log.output_dir=runs/two_node
# Arguments after NPROC_PER_NODE are what torchrun runs (a script path or -m module, then its args).
# Each node's output goes to $LOG_DIR/node<i>.log (default runs/two_node_logs). Runs in the folder you start
# it from, with $PYTHON, else the first python3/python on PATH that has dpm_dist, else this checkout's .venv.
set -euo pipefail
NPROC=${1:?usage: two_node_netns.sh NPROC_PER_NODE (-m module | script) [args...]}
shift
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
pick_python() {
    if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; return; fi
    for py in python3 python "$REPO/.venv/bin/python"; do
        if command -v "$py" >/dev/null 2>&1 && "$py" -c "import dpm_dist" >/dev/null 2>&1; then command -v "$py"; return; fi
    done
    echo "two_node_netns.sh: error: no python with dpm_dist installed; set PYTHON=/path/to/python" >&2
    return 2
}
PY=$(pick_python)
TAG=${NETNS_TAG:-dpm$$}
NET=${NETNS_SUBNET:-10.201.$((RANDOM % 200 + 20))}
LOG_DIR=${LOG_DIR:-runs/two_node_logs}
PORT=${RDZV_PORT:-29400}
mkdir -p "$LOG_DIR"
cleanup() {
    ip netns del "${TAG}n0" 2>/dev/null || true
    ip netns del "${TAG}n1" 2>/dev/null || true
}
trap cleanup EXIT
ip netns add "${TAG}n0"
ip netns add "${TAG}n1"
ip link add "${TAG}v0" type veth peer name "${TAG}v1"
for i in 0 1; do
    ip link set "${TAG}v$i" netns "${TAG}n$i"
    ip -n "${TAG}n$i" addr add "$NET.$((i + 1))/24" dev "${TAG}v$i"
    ip -n "${TAG}n$i" link set "${TAG}v$i" up
    ip -n "${TAG}n$i" link set lo up
done
pids=()
for i in 0 1; do
    ip netns exec "${TAG}n$i" env GLOO_SOCKET_IFNAME="${TAG}v$i" MASTER_ADDR="$NET.1" \
        "$PY" -m torch.distributed.run --nnodes 2 --nproc-per-node "$NPROC" \
        --rdzv-backend c10d --rdzv-endpoint "$NET.1:$PORT" --rdzv-id "$TAG" --rdzv-conf "is_host=$([ $i = 0 ] && echo true || echo false)" \
        --local-addr "$NET.$((i + 1))" "$@" >"$LOG_DIR/node$i.log" 2>&1 &
    pids+=($!)
done
rc=0
for p in "${pids[@]}"; do
    wait "$p" || rc=$?
done
exit "$rc"
