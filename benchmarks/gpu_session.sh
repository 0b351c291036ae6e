#!/usr/bin/env bash
# One GPU session in one command: build this tree (and, optionally, other trees packed as .tar.gz, e.g. a
# baseline commit made with `git archive`), then run a plan of commands, each under its own time limit,
# logging each to LOGDIR. A command that fails or runs out of time is logged and the plan goes on, so one
# stuck test never costs the rest of the session.
#
#   bash benchmarks/gpu_session.sh LOGDIR PLAN [NAME=TREE.tar.gz ...]
#
# PLAN lines: "SECONDS|TREE|COMMAND" (TREE: "." for this tree or a NAME given above; '#' starts a comment).
# Each command runs in its tree with that tree's extension; the summary (one line per command: exit code,
# seconds) goes to LOGDIR/summary.txt and to stdout. With DEADLINE_S set, no command runs past that many
# seconds from the start (limits shrink, later commands are skipped), so what the caller does after the
# script (packing LOGDIR) still fits its own time limit.
set -uo pipefail
LOGDIR=$1
PLAN=$2
shift 2
mkdir -p "$LOGDIR"
export NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
ROOT=$(pwd)
declare -A TREES=(["."]="$ROOT")

build() {  # build TREE_DIR LOG: the extension in place, as the README installs it (no downloads)
    local start=$SECONDS
    (cd "$1" && MAX_JOBS=${MAX_JOBS:-16} python3 setup.py build_ext --inplace) >"$2" 2>&1
    local rc=$?
    echo "build $1: rc=$rc in $((SECONDS - start)) s" | tee -a "$LOGDIR/summary.txt"
    return $rc
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$LOGDIR/summary.txt"
pids=()
build "$ROOT" "$LOGDIR/build_main.log" &
pids+=($!)
for spec in "$@"; do
    name=${spec%%=*}
    dir=/tmp/trees/$name
    mkdir -p "$dir" && tar -xzf "${spec#*=}" -C "$dir"
    TREES[$name]=$dir
    build "$dir" "$LOGDIR/build_$name.log" &
    pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done

n=0
while IFS= read -r line || [ -n "$line" ]; do
    [[ -z "$line" || "$line" == \#* ]] && continue
    limit=${line%%|*}
    rest=${line#*|}
    tree=${rest%%|*}
    cmd=${rest#*|}
    n=$((n + 1))
    log="$LOGDIR/step$(printf %02d $n).log"
    if [ -n "${DEADLINE_S:-}" ]; then
        left=$((DEADLINE_S - SECONDS))
        if [ "$left" -lt 10 ]; then
            echo "step $n skipped (deadline) [$tree] $cmd" | tee -a "$LOGDIR/summary.txt"
            continue
        fi
        [ "$limit" -gt "$left" ] && limit=$left
    fi
    start=$SECONDS
    echo "== $cmd (tree $tree, limit $limit s)" >"$log"
    (cd "${TREES[$tree]}" && timeout --kill-after=10 "$limit" bash -c "$cmd") >>"$log" 2>&1
    rc=$?
    echo "step $n rc=$rc $((SECONDS - start))s [$tree] $cmd" | tee -a "$LOGDIR/summary.txt"
done <"$PLAN"
