#!/usr/bin/env bash
# The paper's Table 2 grid: ResNet-50 with BN, GN and SN in nine batch settings, one cell
# after another on this machine. Each cell runs on the GPUs you have (NPROC per node,
# default: all; without GPUs, 1 process), the largest number of processes that divides
# the cell's #GPUs; its batch statistics are still those of (#GPUs, #samples per GPU)
# thanks to virtual GPUs. Run from the repository's root:
#   DATA=/data/imagenet scripts/paper_table2.sh                     # all 27 cells
#   DATA=/data/imagenet scripts/paper_table2.sh sn 8x2              # one
#   DATA=/data/imagenet scripts/paper_table2.sh "bn sn" "8x2 8x4" train.amp=bf16   # overrides for every cell
#   TABLE2_CONFIGS=configs/demo/table2 scripts/paper_table2.sh      # the small-scale grid (generated data)
# TABLE2_CONFIGS (default configs/imagenet/table2) is the folder of the cells' configs, one
# file per cell named *_NORM_GPUSxPERGPU.yaml. A failing cell does not stop the grid: every
# cell runs, then the failed ones are listed and the script exits 1.
set -euo pipefail
SCRIPT=paper_table2.sh
# shellcheck source=scripts/common.sh
source "$(dirname "$0")/common.sh"
in_repo_root
folder=${TABLE2_CONFIGS:-configs/imagenet/table2}
[[ -d $folder ]] || die "TABLE2_CONFIGS=$folder is not a folder"
data=()
if [[ -n ${DATA:-} ]]; then
    data=("data.root=$DATA")
elif [[ -z ${TABLE2_CONFIGS:-} ]]; then
    die "set DATA=/path/to/imagenet (the folder with train/ and val/)"
fi
norms=${1:-"bn gn sn"}
settings=${2:-"8x32 8x16 8x8 8x4 8x2 1x16 1x32 8x1 1x8"}
shift $(( $# < 2 ? $# : 2 ))
nproc=$(procs_per_node)
failed=()
cells=0
for norm in $norms; do
    for s in $settings; do
        cells=$(( cells + 1 ))
        configs=("$folder"/*_"${norm}_${s}".yaml)
        if [[ ${#configs[@]} -ne 1 || ! -f ${configs[0]} ]]; then
            note "cell $norm $s: no single config $folder/*_${norm}_${s}.yaml"
            failed+=("$norm $s (no config)")
            continue
        fi
        gpus=${s%x*}
        n=$(( nproc < gpus ? nproc : gpus ))
        while (( gpus % n )); do n=$(( n - 1 )); done   # a world size that divides #GPUs
        note "cell $norm $s: ${configs[0]} on $n process(es)"
        status=0
        torchrun --standalone --nproc_per_node="$n" train.py --config "${configs[0]}" \
            ${data[@]+"${data[@]}"} "$@" || status=$?
        (( status == 0 )) || failed+=("$norm $s (exit $status)")
    done
done
if (( ${#failed[@]} )); then
    list=$(printf '%s, ' "${failed[@]}")
    note "${#failed[@]} of $cells cells failed: ${list%, }"
    exit 1
fi
note "all $cells cells finished"
