#!/usr/bin/env bash
# One machine: torchrun starts one process per GPU (NCCL), or one process on a machine
# without GPUs (gloo; it computes with all the cores). Run from the repository's root:
#   scripts/train_single_node.sh configs/imagenet/table2/resnet50_sn_8x32.yaml data.root=/data/imagenet
#   NPROC=2 scripts/train_single_node.sh configs/demo/resnet_sn.yaml     # 2 processes, GPUs or not
# With fewer processes than the setting's #GPUs, each process holds several virtual GPUs:
# the number of processes must divide batch.gpus, which is checked before torchrun starts.
# Exits with torchrun's status (0 when every process finished; docs/cluster.md).
set -euo pipefail
SCRIPT=train_single_node.sh
# shellcheck source=scripts/common.sh
source "$(dirname "$0")/common.sh"
(( $# >= 1 )) || die "usage: $0 CONFIG [key=value ...]"
config=$1
shift
in_repo_root
gpus=$(batch_gpus "$config" "$@")
nproc=$(procs_per_node)
(( gpus % nproc == 0 )) ||
    die "batch.gpus=$gpus is not divisible by $nproc processes: set NPROC to one of $(divisors "$gpus")"
exec torchrun --standalone --nproc_per_node="$nproc" train.py --config "$config" "$@"
