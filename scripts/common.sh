# shellcheck shell=bash
# What the launch scripts share (sourced from the repository's root, not run): one-line
# errors, the rule that chooses the processes per node, and the batch-setting check that
# runs before torchrun starts. docs/cluster.md describes the rules.

# The interpreter of your environment (the one that has torch): PYTHON, else python, else python3.
PYTHON=${PYTHON:-$(command -v python || command -v python3 || echo python)}

# torchrun keeps one store for all the restarts of a run (torch 2.14): processes restarted
# after a failure (MAX_RESTARTS) can read the addresses that the processes before them
# published under the same keys, and fail ("Gloo connectFullMesh failed ... Connection
# refused"). This makes torchrun start a new store for each rendezvous round.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1

# die MESSAGE: "SCRIPT: MESSAGE" on stderr, exit status 2.
die() {
    echo "${SCRIPT:-${0##*/}}: $*" >&2
    exit 2
}

# note MESSAGE: one line on stderr that says what the script chose.
note() {
    echo "${SCRIPT:-${0##*/}}: $*" >&2
}

# in_repo_root: the scripts run train.py from the current folder.
in_repo_root() {
    [[ -f train.py && -d configs ]] ||
        die "run it from the repository's root (there is no train.py in $PWD)"
}

# procs_per_node: NPROC if set; else the GPUs that nvidia-smi lists; else 1, the CPU rule
# (one process per machine computes with all its cores: see docs/cluster.md). Prints the
# number; says on stderr why when no GPU was found.
procs_per_node() {
    if [[ -n ${NPROC:-} ]]; then
        [[ $NPROC =~ ^[1-9][0-9]*$ ]] || die "NPROC=$NPROC is not a positive whole number"
        echo "$NPROC"
        return
    fi
    local gpus=0
    if command -v nvidia-smi >/dev/null 2>&1; then
        gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ') || gpus=0
    fi
    if (( gpus == 0 )); then
        local why="nvidia-smi lists none"
        command -v nvidia-smi >/dev/null 2>&1 || why="no nvidia-smi"
        note "no GPU found ($why): 1 process per node on the CPU; set NPROC=N for N"
        gpus=1
    fi
    echo "$gpus"
}

# batch_gpus CONFIG [key=value ...]: batch.gpus of the resolved config. train.py checks the
# config and the overrides first and refuses a bad one in one line (then: exit 2).
batch_gpus() {
    local resolved
    resolved=$(WORLD_SIZE=1 "$PYTHON" train.py --config "$@" --print-config) || exit 2
    awk '/^batch:/ {b = 1; next} /^[^ ]/ {b = 0} b && $1 == "gpus:" {print $2}' <<<"$resolved"
}

# divisors N: the world sizes that can share batch.gpus=N, largest first ("8, 4, 2, 1").
divisors() {
    local n=$1 d list=""
    for (( d = n; d >= 1; d-- )); do
        (( n % d == 0 )) && list+="$d, "
    done
    echo "${list%, }"
}
