#!/usr/bin/env bash
# Run every pilotfish benchmark in sequence with modest sizes (a few minutes in all).
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

EXTRA=("$@")
if [ "${FULL:-0}" = 1 ]; then
    run w2_true.py --agents 1,per-core --prefetch default,8
    run w3_sleep.py --agents 1,per-core
    run dispatch.py --db both
    run submit.py
else
    run w2_true.py --n 5000 --repeat 3 --agents 1,per-core --prefetch default,8
    run w3_sleep.py --n 200 --repeat 3
    run dispatch.py --n 20000 --repeat 2 --db both
    run submit.py --n 50000 --repeat 2 --total 300000 --ls-repeat 5
fi
echo "results: $out" >&2
