#!/usr/bin/env bash
# Everything in cl_cm that needs a CUDA GPU, in one unattended script (at most 8 minutes on one GPU):
#   1. the CUDA tests (GPU matches CPU for every optimizer, at most one host sync per step, sharpness on CUDA);
#   2. bench_step --device cuda: AdamCM eager and compiled against Adam foreach and fused (ResNet-18 shapes);
#   3. a short Permuted-MNIST and Split-CIFAR-10 run (`cpu` presets) of Adam and Adam+CM on the GPU;
# then one summary (gpu_check/summary.txt). Every step has its own time limit; a failed step is reported
# and the script goes on. It stops cleanly, with exit status 2 and one line, when no CUDA GPU is visible
# or torch cannot be installed.
#
#   bash experiments/gpu_check.sh [DATA_ROOT] [OUT]
#
# Python: .venv/bin/python if present, else python3 (PYTHON=... to choose). Missing packages are
# installed from .whl/ (wheels put there beforehand by experiments/gpu_wheels.sh, for machines without
# a network) or else from the package index. DATA_ROOT holds MNIST and CIFAR-10 as for --data-root;
# without it, data of the real sizes with learnable patterns is written (timings are then valid,
# accuracies are not those of the real data sets, and the summary says so).
# GPU_CHECK_SMOKE=1 runs every step on the CPU at smoke size (tiny data, `smoke` presets, 2 timed steps),
# to check the script itself on a machine without a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
DATA_ROOT=${1:-}
OUT=${2:-gpu_check}
mkdir -p "$OUT" || { echo "gpu_check: cannot create $OUT" >&2; exit 2; }
OUT=$(cd "$OUT" && pwd)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
note() { echo "$*" | tee -a "$SUMMARY"; }
stop() { note "gpu_check: stopped: $*"; exit 2; }

PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
command -v "$PY" >/dev/null 2>&1 || stop "no Python ($PY); set PYTHON=/path/to/python3.11"

# ------------------------------------------------------------------ packages
PIP_FROM=()
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then PIP_FROM=(--find-links .whl); fi
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    note "installing torch (${PIP_FROM[*]:-package index})"
    timeout 600 "$PY" -m pip install -q "${PIP_FROM[@]}" torch==2.14.1 torchvision==0.29.1 >>"$OUT/install.log" 2>&1 \
        || stop "torch could not be installed (see $OUT/install.log); put its wheels in .whl/ with experiments/gpu_wheels.sh"
fi
SMOKE=${GPU_CHECK_SMOKE:-0}
if [ "$SMOKE" = 1 ]; then
    DEVICE=cpu PRESET=smoke STEPS=2 RUN_LIMIT=300 THREADS=(--threads 1) ONLY=(--only "default: fused" --warmup 1) N_MNIST="n_train=600, n_test=200" N_CIFAR="n_train=600, n_test=200"
    GPU="the CPU (GPU_CHECK_SMOKE=1: a check of this script, not of a GPU)"
else
    DEVICE=cuda PRESET=cpu STEPS=50 RUN_LIMIT=45 THREADS=() ONLY=() N_MNIST="n_train=60000, n_test=10000" N_CIFAR="n_train=50000, n_test=10000"
    GPU=$("$PY" -c "import torch; assert torch.cuda.is_available(); print(torch.cuda.get_device_name(0))" 2>/dev/null) \
    || stop "no CUDA GPU visible to torch ($("$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)' 2>&1 | tail -1))"
fi
if ! "$PY" -c "import avalanche, pytest, cl_cm, experiments" >/dev/null 2>&1; then
    note "installing cl_cm and its test dependencies"
    timeout 600 "$PY" -m pip install -q "${PIP_FROM[@]}" -e . avalanche-lib==0.6.0 pytest pytest-timeout >>"$OUT/install.log" 2>&1 \
        || stop "cl_cm's dependencies could not be installed (see $OUT/install.log)"
fi
note "gpu_check on $GPU; $("$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)')"
export HOME=${GPU_CHECK_HOME:-$OUT/home}  # Avalanche writes ~/.avalanche
mkdir -p "$HOME"

FAILED=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to OUT/NAME.log, record status and time
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    local what="ok"
    [ $rc -eq 124 ] && what="TIMED OUT after ${limit} s"
    [ $rc -ne 0 ] && [ $rc -ne 124 ] && what="FAILED (exit $rc; last line: $(tail -n 1 "$OUT/$name.log"))"
    [ $rc -ne 0 ] && FAILED=$((FAILED + 1))
    note "$(printf '%-28s %5d s  %s' "$name" $((SECONDS - t0)) "$what")"
    return $rc
}

# ------------------------------------------------------------------ 1. CUDA tests
step cuda-tests 90 "$PY" -m pytest -q -p no:cacheprovider -k "cuda" \
    tests/test_adam_cm.py tests/test_optim_conformance.py tests/test_sharpness.py
grep -E "passed|failed|skipped" "$OUT/cuda-tests.log" | tail -n 1 | sed 's/^/    /' | tee -a "$SUMMARY"

# ------------------------------------------------------------------ 2. the optimizer step
step bench-step 150 "$PY" -m experiments.bench_step --device "$DEVICE" --steps "$STEPS" "${ONLY[@]}" --json "$OUT/bench_step.json"

# ------------------------------------------------------------------ 3. short continual-learning runs
if [ -z "$DATA_ROOT" ]; then
    DATA_ROOT="$OUT/data"
    SYNTHETIC=1
    step write-data 60 "$PY" -c "
import sys; sys.path.insert(0, 'tests')
from fakedata import write_mnist, write_cifar10
write_mnist('$DATA_ROOT', $N_MNIST)
write_cifar10('$DATA_ROOT', $N_CIFAR)"
else
    SYNTHETIC=0
fi
for bench in permuted_mnist split_cifar10; do
    for opt in adam adam_cm; do
        step "run-$bench-$opt" "$RUN_LIMIT" "$PY" -m experiments.cli run --benchmark "$bench" --preset "$PRESET" --optimizer "$opt" \
            --device "$DEVICE" "${THREADS[@]}" --seed 0 --data-root "$DATA_ROOT" --out "$OUT/runs/$bench/$opt"
    done
done

# ------------------------------------------------------------------ summary
"$PY" - "$OUT" "$SYNTHETIC" "$DEVICE" "$PRESET" <<'EOF' | tee -a "$SUMMARY"
import json, sys
from pathlib import Path
out, synthetic, device, preset = Path(sys.argv[1]), sys.argv[2] == "1", sys.argv[3], sys.argv[4]
bench = out / "bench_step.json"
if bench.exists():
    results = json.loads(bench.read_text())["results"]
    print(f"\nbench_step --device {device} (ResNet-18 shapes, median step):")
    print(f"  {'optimizer':40s} {'ms':>8s} {'/foreach':>9s} {'/fused':>7s} {'state MB':>9s}")
    for name, r in results.items():
        print(f"  {name:40s} {r['median_ms']:8.2f} {r['vs_adam_foreach']:9.2f} {r['vs_adam_fused']:7.2f} "
              f"{r['state_MB']:9.1f}")
runs = sorted((out / "runs").glob("*/*/metrics.json"))
if runs:
    print(f"\nruns (`{preset}` presets, {device}, seed 0" + (", SYNTHETIC data: accuracies are not the real data sets'" if synthetic else "") + "):")
    for path in runs:
        m = json.loads(path.read_text())
        print(f"  {m['benchmark']:16s} {m['optimizer']:8s} ACC {100 * m['acc']:6.2f}  BWT {100 * m['bwt']:7.2f}  "
              f"train {m['train_seconds']:6.1f} s")
EOF
note "gpu_check: $FAILED step(s) failed; logs in $OUT"
[ "$FAILED" -eq 0 ]
