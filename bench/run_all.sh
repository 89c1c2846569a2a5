#!/usr/bin/env bash
# Run every pilotfish benchmark in sequence with modest sizes (a few minutes in all).
# The Slurm benchmarks (pilot_rampup, launch_overhead, allocation) run only where a Slurm with
# 4 nodes is up (scripts/slurm_up); elsewhere they are skipped with a message.
#
#   bench/run_all.sh            # modest sizes
#   FULL=1 bench/run_all.sh     # the default (full) size of every benchmark
#   PYTHON=/path/to/python bench/run_all.sh
#
# JSON result lines go to standard output and to bench/results/<time>.jsonl; progress goes
# to standard error. Extra arguments are passed to every benchmark (e.g. --tmp /scratch).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
py="${PYTHON:-$repo/.venv/bin/python}"
[ -x "$py" ] || py="$(command -v python3)"
mkdir -p "$here/results"
out="$here/results/$(date +%Y%m%d-%H%M%S).jsonl"

run() {
    echo "== $*" >&2
    "$py" "$here/$1" "${@:2}" "${EXTRA[@]}" | tee -a "$out"
}

# A Slurm benchmark exits 2 when it finds no Slurm with enough nodes: a skip, not a failure.
run_slurm() {
    echo "== $*" >&2
    local rc=0
    "$py" "$here/$1" "${@:2}" "${EXTRA[@]}" | tee -a "$out" || rc=${PIPESTATUS[0]}
    if [ "$rc" != 0 ] && [ "$rc" != 2 ]; then exit "$rc"; fi
}

have_slurm() {
    command -v sbatch >/dev/null 2>&1 && command -v sinfo >/dev/null 2>&1 \
        && [ -n "$(sinfo -h -o %N 2>/dev/null)" ]
}

EXTRA=("$@")
if [ "${FULL:-0}" = 1 ]; then
    run w2_true.py --agents 1,per-core --prefetch default,8
    run w3_sleep.py --agents 1,per-core
    run dispatch.py --db both
    run submit.py
    run array.py
    run events.py
    run amqp.py
    run many_agents.py
    if have_slurm; then
        run_slurm pilot_rampup.py
        run_slurm launch_overhead.py
        run_slurm allocation.py
    else
        echo "== Slurm benchmarks skipped: no Slurm here (scripts/slurm_up starts one)" >&2
    fi
else
    run w2_true.py --n 5000 --repeat 3 --agents 1,per-core --prefetch default,8
    run w3_sleep.py --n 200 --repeat 3
    run dispatch.py --n 20000 --repeat 2 --db both
    run submit.py --n 50000 --repeat 2 --total 300000 --ls-repeat 5
    run array.py --n 50000 --big 0 --repeat 2
    run events.py --repeat 2 --rounds 6 --cli-rounds 2 --seconds 3
    run amqp.py --n 20000 --repeat 2 --seconds 5
    run many_agents.py --agents 200 --jobs 50000 --seconds 10
    if have_slurm; then
        run_slurm pilot_rampup.py --repeat 3
        run_slurm launch_overhead.py --n 200 --repeat 3
        run_slurm allocation.py --n 200 --repeat 2
    else
        echo "== Slurm benchmarks skipped: no Slurm here (scripts/slurm_up starts one)" >&2
    fi
fi
echo "results: $out" >&2
