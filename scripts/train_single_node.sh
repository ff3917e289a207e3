#!/usr/bin/env bash
# One machine, all its GPUs: torchrun starts one process per GPU (NCCL).
#   scripts/train_single_node.sh configs/imagenet/table2/resnet50_sn_8x32.yaml data.root=/data/imagenet
# With fewer GPUs than the setting's #GPUs, each process holds several virtual GPUs
# (batch.gpus must be divisible by the number of processes).
set -euo pipefail
config=${1:?usage: $0 CONFIG [key=value ...]}; shift
gpus=${NPROC:-$(nvidia-smi -L 2>/dev/null | wc -l)}
gpus=$(( gpus > 0 ? gpus : 1 ))
exec torchrun --standalone --nproc_per_node="$gpus" train.py --config "$config" "$@"
