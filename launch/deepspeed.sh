#!/usr/bin/env bash
# The DeepSpeed launcher with a hostfile (pdsh over passwordless ssh; one line per node: "host slots=8"):
#   bash launch/deepspeed.sh launch/hostfile experiment=occluded_duke engine=zero2_bf16
# Without ssh: run on every node yourself with its rank (DS_NO_SSH=1 NODE_RANK=i MASTER_ADDR=<node 0>):
#   DS_NO_SSH=1 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash launch/deepspeed.sh launch/hostfile experiment=occluded_duke
# --no_local_rank: the entry point reads LOCAL_RANK from the environment (Hydra takes no --local_rank).
set -euo pipefail
HOSTFILE=${1:?usage: deepspeed.sh HOSTFILE [hydra overrides...]}
shift
cd "$(dirname "$0")/.."
DS=${DEEPSPEED:-.venv/bin/deepspeed}
extra=()
if [ -n "${DS_NO_SSH:-}" ]; then
    extra=(--no_ssh --node_rank "${NODE_RANK:?set NODE_RANK}" --master_addr "${MASTER_ADDR:?set MASTER_ADDR}" --master_port "${MASTER_PORT:-29500}")
fi
exec "$DS" --hostfile "$HOSTFILE" "${extra[@]}" --no_local_rank --module dpm_dist.cli.train "$@"
