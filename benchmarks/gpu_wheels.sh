#!/usr/bin/env bash
# Fill .whl/ with the wheels the GPU machine lacks (it has no network), for benchmarks/gpu_check.sh: the
# project's own wheel (dpm_dist-*-py3-none-any.whl, configs inside) and its dependencies' the machine lacks.
#
#     bash benchmarks/gpu_wheels.sh                    # here, in the repository root, before a GPU session
#     bash benchmarks/gpu_wheels.sh --project DEST     # only the project's wheel, into DEST (the dry run's)
#
# The project's wheel is built from a copy of what it is made of (dpm_dist/, configs/, pyproject.toml,
# README.md), as tests/test_install.py builds it, so no stale build/ folder of the checkout leaks into it.
# The GPU machine runs Python 3.12 (cp312, manylinux x86_64) with torch, torchvision, numpy, pillow,
# tensorboard, pyyaml, packaging, psutil, msgpack, ninja, py-cpuinfo, einops, tqdm, fsspec present.
# Missing there: deepspeed, webdataset, hydra-core, omegaconf, antlr4-python3-runtime, braceexpand, hjson,
# pydantic (+ pydantic-core, annotated-types, typing-inspection). typing_extensions and timm travel too, at
# this project's pins, so the check runs the versions the CPU suite ran (pydantic needs typing_extensions
# >= 4.16; the model is built by timm). Not carried: s3fs and ray (the check reads no S3 and runs no Tune).
# Versions are those of constraints.txt. .whl/ is ignored through .git/info/exclude; the run tool carries
# it when the call names it: carry [".whl"] (64 MiB in all with the working tree).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-.venv/bin/python}
DEST=.whl

project_wheel() {  # DEST: build dpm_dist's wheel into DEST (no dependencies, no build isolation: this venv's setuptools)
    local src
    src=$(mktemp -d)
    mkdir -p "$1"
    cp -r dpm_dist configs pyproject.toml README.md "$src"/
    find "$src" \( -name __pycache__ -o -name '*.egg-info' \) -prune -exec rm -rf {} +
    "$PY" -m pip wheel -q --no-deps --no-build-isolation --no-cache-dir -w "$1" "$src" || { rm -rf "$src"; return 1; }
    rm -rf "$src"
}

if [ "${1:-}" = "--project" ]; then
    [ $# -eq 2 ] || { echo "usage: bash benchmarks/gpu_wheels.sh [--project DEST]" >&2; exit 2; }
    project_wheel "$2"
    exit
fi
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo '/.whl/' >> .git/info/exclude; }

pin() {  # NAME -> NAME==VERSION from constraints.txt (names compared case- and -/_-insensitively)
    local want line
    want=$(echo "$1" | tr 'A-Z_' 'a-z-')
    line=$(tr 'A-Z_' 'a-z-' < constraints.txt | grep -m1 "^${want}==") || { echo "gpu_wheels: $1 is not pinned in constraints.txt" >&2; exit 2; }
    echo "$line"
}

WHEELS=(webdataset hydra-core omegaconf braceexpand hjson pydantic pydantic-core annotated-types typing-inspection
        typing-extensions timm)
SDISTS=(deepspeed antlr4-python3-runtime)  # no wheel on PyPI: built here as pure-python wheels

rm -rf "$DEST" && mkdir -p "$DEST"
specs=()
for name in "${WHEELS[@]}"; do specs+=("$(pin "$name")"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DEST" "${specs[@]}"

# DS_BUILD_OPS=0: no C++/CUDA op is compiled (the check uses torch optimisers, no DeepSpeed kernels);
# no build isolation, so setup.py sees this venv's torch instead of downloading one.
for name in "${SDISTS[@]}"; do
    DS_BUILD_OPS=0 DS_ACCELERATOR=cuda "$PY" -m pip wheel -q --no-deps --no-build-isolation --no-cache-dir -w "$DEST" "$(pin "$name")"
done

# The project's own wheel: gpu_check.sh installs it (not the source tree) on the GPU machine's Python 3.12.
project_wheel "$DEST"

# Every wheel must install where it goes (cp312 / py3) and there must be one version of each.
for whl in "$DEST"/*.whl; do
    case "$(basename "$whl")" in *-py3-none-any.whl|*-py2.py3-none-any.whl|*-cp312-*manylinux*x86_64*.whl) ;;
        *) echo "gpu_wheels: $(basename "$whl") does not install on cp312 x86_64" >&2; exit 1 ;; esac
done
dupes=$(ls "$DEST" | sed 's/-[0-9].*//' | tr 'A-Z_' 'a-z-' | sort | uniq -d)
[ -z "$dupes" ] || { echo "gpu_wheels: two versions of: $dupes" >&2; exit 1; }

# Install check into a scratch --target, the way gpu_check.sh installs them. This venv is Python 3.11, so
# only the pure-python wheels install here; the cp312 one (pydantic-core) is checked by its file list.
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$scratch" $(ls "$DEST"/*-none-any.whl)
"$PY" -m zipfile -l "$DEST"/pydantic_core-*-cp312-*.whl | grep -c "_pydantic_core.cpython-312-x86_64-linux-gnu.so" >/dev/null \
    || { echo "gpu_wheels: the pydantic-core wheel holds no cp312 x86_64 extension" >&2; exit 1; }
for mod in deepspeed webdataset hydra omegaconf antlr4 braceexpand hjson timm dpm_dist; do
    [ -d "$scratch/$mod" ] || [ -f "$scratch/$mod.py" ] || { echo "gpu_wheels: $mod missing after install" >&2; exit 1; }
done
[ -f "$scratch/dpm_dist/configs/train.yaml" ] || { echo "gpu_wheels: the dpm_dist wheel holds no configs" >&2; exit 1; }
# its Requires-Python must admit the GPU machine's 3.12 (pip there refuses the wheel otherwise)
"$PY" - "$scratch" <<'PY' || exit 1
import glob, sys
from email.parser import Parser
from packaging.specifiers import SpecifierSet
meta = Parser().parse(open(glob.glob(f"{sys.argv[1]}/dpm_dist-*.dist-info/METADATA")[0]))
spec = SpecifierSet(meta["Requires-Python"] or "")
if "3.12" not in spec:
    sys.exit(f"gpu_wheels: dpm_dist's Requires-Python {spec} excludes the GPU machine's Python 3.12")
PY
[ -f "$scratch/deepspeed/git_version_info_installed.py" ] && grep -q "accelerator_name='cuda'" "$scratch/deepspeed/git_version_info_installed.py" \
    || echo "gpu_wheels: note: the deepspeed wheel records no cuda accelerator (harmless: no prebuilt ops)" >&2

size=$(du -sm "$DEST" | cut -f1)
ls -l "$DEST" | awk 'NR > 1 {printf "%8.1f MiB  %s\n", $5 / 1048576, $9}'
echo "gpu_wheels: $(ls "$DEST"/*.whl | wc -l) wheels, ${size} MiB in $DEST (the run tool carries at most 64 MiB with the tree)"
[ "$size" -lt 48 ] || { echo "gpu_wheels: $DEST is ${size} MiB: too close to the 64 MiB carry limit" >&2; exit 1; }
