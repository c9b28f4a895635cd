#!/usr/bin/env bash
# The README's main command: bootstrap the environment, generate the built-in synthetic shards on the
# first run, train the tiny DPM on CPU for a few minutes, evaluate, print rank-1/mAP and where the
# TensorBoard logs are. Extra arguments are Hydra overrides (e.g. bash scripts/demo.sh optim.epochs=4).
# Re-running resumes/finishes the same run in runs/tiny_synthetic (delete it to start over).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
export PATH="$PWD/.venv/bin:$PATH"  # its ninja too, as scripts/test.sh (one build of DeepSpeed's CPU op for both)
if [ ! -f shards/synthetic/index.json ]; then
    .venv/bin/dpm-shards synth --out shards/synthetic
fi
exec .venv/bin/dpm-train experiment=tiny "$@"
