#!/usr/bin/env bash
# The paper's Table 2 grid: ResNet-50 with BN, GN and SN in nine batch settings.
# Each setting runs on the GPUs you have (NPROC per node, default all); the batch
# statistics are still those of (#GPUs, #samples per GPU) thanks to virtual GPUs.
#   DATA=/data/imagenet scripts/paper_table2.sh            # all 27 runs, one after another
#   DATA=/data/imagenet scripts/paper_table2.sh sn 8x2     # one
set -euo pipefail
: "${DATA:?set DATA=/path/to/imagenet}"
norms=${1:-"bn gn sn"}
settings=${2:-"8x32 8x16 8x8 8x4 8x2 1x16 1x32 8x1 1x8"}
nproc=${NPROC:-$(nvidia-smi -L 2>/dev/null | wc -l)}
for norm in $norms; do
  for s in $settings; do
    gpus=${s%x*}
    n=$(( nproc < gpus ? nproc : gpus ))
    while (( gpus % n )); do n=$(( n - 1 )); done   # a world size that divides #GPUs
    torchrun --standalone --nproc_per_node="$n" train.py \
      --config "configs/imagenet/table2/resnet50_${norm}_${s}.yaml" data.root="$DATA"
  done
done
