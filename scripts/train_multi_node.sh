#!/usr/bin/env bash
# Several machines with torchrun's c10d rendezvous. Run the same command on every node, from
# the repository's root:
#   NNODES=2 MASTER=node0.example.com scripts/train_multi_node.sh CONFIG data.root=/data/imagenet
# MASTER is the host name (or address) of one of the machines; it hosts the rendezvous at
# PORT (default 29500). Optional: NPROC, processes per node (default: the GPUs nvidia-smi
# lists; without GPUs, 1 process, which computes with all the cores); RUN_ID (default: the
# config's name; give each concurrent run its own); MAX_RESTARTS (default 0: torchrun
# restarts every node's processes that many times after a failure; each restart resumes
# from checkpoint_last.pth). NNODES x NPROC must divide batch.gpus: checked before torchrun
# starts. Every node must see the same data.root and output_dir (a shared file system).
# Exits with torchrun's status. Two "nodes" on one machine (as the tests run it):
#   NNODES=2 NPROC=1 MASTER=127.0.0.1 scripts/train_multi_node.sh CONFIG &  # and again
set -euo pipefail
SCRIPT=train_multi_node.sh
# shellcheck source=scripts/common.sh
source "$(dirname "$0")/common.sh"
(( $# >= 1 )) || die "usage: NNODES=N MASTER=HOST $0 CONFIG [key=value ...]"
config=$1
shift
[[ -n ${NNODES:-} ]] || die "set NNODES (the number of machines that run this command)"
[[ $NNODES =~ ^[1-9][0-9]*$ ]] || die "NNODES=$NNODES is not a positive whole number"
[[ -n ${MASTER:-} ]] || die "set MASTER (the host name of one of the $NNODES machines)"
in_repo_root
gpus=$(batch_gpus "$config" "$@")
nproc=$(procs_per_node)
world=$(( NNODES * nproc ))
(( gpus % world == 0 )) ||
    die "batch.gpus=$gpus is not divisible by the world size $world ($NNODES nodes x $nproc" \
        "processes): choose NNODES x NPROC among $(divisors "$gpus")"
exec torchrun --nnodes="$NNODES" --nproc_per_node="$nproc" --max-restarts="${MAX_RESTARTS:-0}" \
    --rdzv_backend=c10d --rdzv_endpoint="$MASTER:${PORT:-29500}" \
    --rdzv_id="${RUN_ID:-$(basename "$config" .yaml)}" \
    train.py --config "$config" "$@"
