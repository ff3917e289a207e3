#!/usr/bin/env bash
# Everything that needs a GPU, in one call (about 8 minutes on one H100/H200):
# the CUDA tests, the per-layer benchmark (fp32/bf16, NCHW/channels_last, eager and
# compiled) and the ResNet-50 training step (bf16 autocast + channels_last, eager and
# compiled), with the GPU model and versions first. Output: gpu_check/ (or $OUT): each
# step's whole log, and the benchmarks' JSON.
#
#     bash tools/gpu_check.sh            # then copy the tables into docs/performance.md
#
# Every step runs, even after one failed; then the failed steps are listed and the script
# exits 1 (0 when all passed). GPU_TESTS (default: tests) are the pytest paths of the
# CUDA-tests step; PYTHON (default: python) the interpreter.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
out=${OUT:-gpu_check}
py=${PYTHON:-python}
mkdir -p "$out" || exit 2
failed=()

# step NAME LOG SECONDS all|tail COMMAND...: run COMMAND with a time limit, its output on the
# console (all of it, or its last 25 lines) and in LOG; a non-zero status fails the step.
step() {
    local name=$1 log=$2 limit=$3 show=$4 status
    shift 4
    echo "== $name"
    if [[ $show == tail ]]; then
        timeout "$limit" "$@" > "$log" 2>&1
        status=$?
        tail -n 25 "$log"
    else
        timeout "$limit" "$@" 2>&1 | tee "$log"
        status=${PIPESTATUS[0]}
    fi
    if (( status != 0 )); then
        local why="exit $status"
        (( status == 124 )) && why="over its $limit s"
        failed+=("$name ($why)")
        echo "gpu_check.sh: $name failed ($why); log: $log" >&2
    fi
}

step "versions" "$out/versions.txt" 120 all "$py" -c '
import sys, torch, triton
if not torch.cuda.is_available():
    sys.exit(f"no CUDA device (torch {torch.__version__}: torch.cuda.is_available() is False)")
print(f"torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}, "
      f"{torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory >> 30} GiB)")'
# shellcheck disable=SC2086  # GPU_TESTS: several paths
step "CUDA tests" "$out/pytest_gpu.txt" 240 tail \
    "$py" -m pytest -q -m gpu -p no:cacheprovider ${GPU_TESTS:-tests}
step "norm benchmark" "$out/norm.txt" 150 all \
    "$py" tools/benchmark_norm.py --device cuda --norms bn,gn,sn,sn-native,ssn,sn-ref \
    --compiled --repeats 5 --json "$out/norm.json"
step "train benchmark" "$out/train.txt" 200 all \
    "$py" tools/benchmark_train.py --device cuda --batch 128 --norms bn,gn,sn,ssn,sn-ref \
    --compiled --steps 5 --inner 3 --json "$out/train.json"

if (( ${#failed[@]} )); then
    list=$(printf '%s, ' "${failed[@]}")
    echo "gpu_check.sh: ${#failed[@]} of 4 steps failed: ${list%, }" >&2
    exit 1
fi
echo "gpu_check.sh: all 4 steps passed; logs and JSON in $out/"
