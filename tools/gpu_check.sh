#!/usr/bin/env bash
# Everything that needs a GPU, in one call (about 8 minutes on one H100/H200):
# the CUDA tests, the per-layer benchmark (fp32/bf16, NCHW/channels_last, eager and
# compiled) and the ResNet-50 training step (bf16 autocast + channels_last, eager and
# compiled), with the GPU model and versions first. Output: gpu_check/ (logs, JSON).
#
#     bash tools/gpu_check.sh            # then copy the tables into docs/performance.md
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_check}
mkdir -p "$out"
python - <<'EOF' | tee "$out/versions.txt"
import torch, triton
print(f"torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}, "
      f"{torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory >> 30} GiB)")
EOF
timeout 240 python -m pytest -q -m gpu -p no:cacheprovider 2>&1 | tail -25 | tee "$out/pytest_gpu.txt"
timeout 150 python tools/benchmark_norm.py --device cuda --norms bn,gn,sn,sn-native,ssn,sn-ref \
    --compiled --repeats 5 --json "$out/norm.json" 2>&1 | tee "$out/norm.txt"
timeout 200 python tools/benchmark_train.py --device cuda --batch 128 --norms bn,gn,sn,ssn,sn-ref \
    --compiled --steps 5 --inner 3 --json "$out/train.json" 2>&1 | tee "$out/train.txt"
