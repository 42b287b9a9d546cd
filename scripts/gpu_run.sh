#!/usr/bin/env bash
# The GPU issue's device run, from the repository root on the GPU machine:
#   bash scripts/gpu_run.sh [benchmarks/gpu_check.py options]
# Before it: ../shared/tools/gpu-wheels.sh here cuts onnxruntime-gpu into .gpuwheels/part-NN, and one
# device call per part (back to back: an idle machine is given back) carries `.gpuwheels` and copies
# that part to /tmp/gw/. This installs the wheel from the parts, puts ortseq on the path, and runs
# every phase of gpu_check.py; its JSON lands in $OUT (the device tool brings it back).
set -euo pipefail
bash .gpuwheels/install.sh
mkdir -p /tmp/pkg && ln -sfn "$PWD" /tmp/pkg/ortseq  # the repository root is the `ortseq` package
export PYTHONPATH=/tmp/site:/tmp/pkg PYTHONUNBUFFERED=1
python3 benchmarks/gpu_check.py --out "${OUT:-/tmp/gpu-out}" --work /tmp/gpu-work "$@"
