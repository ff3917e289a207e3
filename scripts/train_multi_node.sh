#!/usr/bin/env bash
# Several machines with torchrun's c10d rendezvous. Run the same command on every node:
#   NNODES=2 MASTER=node0.example.com scripts/train_multi_node.sh CONFIG data.root=/data/imagenet
# NPROC (GPUs per node, default: all), PORT (default 29500) and RUN_ID (default: the
# config's name) are optional. Every node must see the same data.root and output_dir
# (a shared file system), or set output_dir to a node-local path and copy from rank 0.
set -euo pipefail
config=${1:?usage: $0 CONFIG [key=value ...]}; shift
: "${NNODES:?set NNODES (number of machines)}"
: "${MASTER:?set MASTER (host name of one of the machines)}"
nproc=${NPROC:-$(nvidia-smi -L 2>/dev/null | wc -l)}
exec torchrun --nnodes="$NNODES" --nproc_per_node="${nproc:-1}" \
    --rdzv_backend=c10d --rdzv_endpoint="$MASTER:${PORT:-29500}" \
    --rdzv_id="${RUN_ID:-$(basename "$config" .yaml)}" \
    train.py --config "$config" "$@"
