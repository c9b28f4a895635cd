#!/usr/bin/env bash
# The DeepSpeed launcher with a hostfile (pdsh over passwordless ssh; one line per node: "host slots=8"):
#   cp launch/hostfile.example hostfile    # then edit it
#   bash launch/deepspeed.sh experiment=occluded_duke engine=zero2_bf16              # ./hostfile
#   bash launch/deepspeed.sh /etc/dpm/hostfile experiment=occluded_duke              # or name it first (or HOSTFILE=...)
# Without ssh: run on every node yourself with its rank (DS_NO_SSH=1 NODE_RANK=i MASTER_ADDR=<node 0>):
#   DS_NO_SSH=1 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash launch/deepspeed.sh experiment=occluded_duke
# A hostfile DeepSpeed would refuse (bad line, duplicate, no host, a host ssh cannot reach) is one line, exit 2.
# Runs in the folder you start it from (pdsh starts the remote ranks in the same path), with $DEEPSPEED, else
# the deepspeed on PATH, else this checkout's .venv/bin/deepspeed.
# --no_local_rank: the entry point reads LOCAL_RANK from the environment (Hydra takes no --local_rank).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HOSTFILE=${HOSTFILE:-hostfile}
if [ $# -gt 0 ] && [[ "$1" != *=* && "$1" != -* ]]; then  # a first argument that is no override: the hostfile
    HOSTFILE=$1
    shift
fi
if [ ! -f "$HOSTFILE" ]; then
    echo "deepspeed.sh: error: hostfile $HOSTFILE not found (one line per node, \"host slots=N\"): copy $REPO/launch/hostfile.example to ./hostfile and edit it, or pass its path first" >&2
    exit 2
fi
fail() { echo "deepspeed.sh: error: hostfile $HOSTFILE: $*" >&2; exit 2; }
hosts=()  # what DeepSpeed's runner would refuse with a traceback, said in one line first
while IFS= read -r line || [ -n "$line" ]; do
    line=${line%%#*}
    [ -z "${line//[[:space:]]/}" ] && continue
    [[ $line =~ ^[[:space:]]*([^[:space:]]+)[[:space:]]+slots=([0-9]+)[[:space:]]*$ ]] ||
        fail "line \"$line\" is not \"host slots=N\""
    [[ " ${hosts[*]} " == *" ${BASH_REMATCH[1]} "* ]] && fail "host ${BASH_REMATCH[1]} is named twice"
    hosts+=("${BASH_REMATCH[1]}")
done <"$HOSTFILE"
[ ${#hosts[@]} -gt 0 ] || fail "names no host (one line per node, \"host slots=N\")"
if [ ${#hosts[@]} -gt 1 ] && [ -z "${DS_NO_SSH:-}" ]; then  # pdsh starts the other nodes' ranks over ssh
    for host in "${hosts[@]}"; do
        example=""
        awk -v h="$host" '$1 == h {found = 1} END {exit !found}' "$REPO/launch/hostfile.example" && example=" (a placeholder of hostfile.example: put your nodes' names)"
        command -v ssh >/dev/null 2>&1 || fail "no ssh command to reach $host$example; or start each node yourself: DS_NO_SSH=1 NODE_RANK=i MASTER_ADDR=<node 0>"
        ssh -o PasswordAuthentication=no -o BatchMode=yes -o ConnectTimeout=10 "$host" true </dev/null >/dev/null 2>&1 ||
            fail "host $host is not reachable by passwordless ssh$example; or start each node yourself: DS_NO_SSH=1 NODE_RANK=i MASTER_ADDR=<node 0>"
    done
fi
if [ -n "${DEEPSPEED:-}" ]; then
    DS=$DEEPSPEED
elif command -v deepspeed >/dev/null 2>&1; then
    DS=deepspeed
elif [ -x "$REPO/.venv/bin/deepspeed" ]; then
    DS=$REPO/.venv/bin/deepspeed
else
    echo "deepspeed.sh: error: no deepspeed command on PATH or in $REPO/.venv/bin; set DEEPSPEED=/path/to/deepspeed" >&2
    exit 2
fi
extra=()
if [ -n "${DS_NO_SSH:-}" ]; then
    extra=(--no_ssh --node_rank "${NODE_RANK:?set NODE_RANK}" --master_addr "${MASTER_ADDR:?set MASTER_ADDR}" --master_port "${MASTER_PORT:-29500}")
fi
exec "$DS" --hostfile "$HOSTFILE" "${extra[@]}" --no_local_rank --module dpm_dist.cli.train "$@"
