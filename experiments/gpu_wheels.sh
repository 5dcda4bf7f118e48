#!/usr/bin/env bash
# Put every wheel experiments/gpu_check.sh installs into .whl/ (ignored by git), so that the check can
# run on a GPU machine without a network: run this where the package index is reachable, with the
# Python version and platform of the GPU machine, then copy the repository (with .whl/) there.
#
#   bash experiments/gpu_wheels.sh [PYTHON]
#
# The CUDA wheels of torch are large (several GB with their nvidia-* dependencies).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-python3}
mkdir -p .whl
"$PY" -m pip download -d .whl torch==2.14.1 torchvision==0.29.1 avalanche-lib==0.6.0 pytest pytest-timeout setuptools wheel
echo "gpu_wheels: $(ls .whl | wc -l) files in .whl/ ($(du -sh .whl | cut -f1))"
