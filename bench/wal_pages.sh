#!/bin/bash
# What a busy SQLite server writes: the WAL frames (whole pages) of one fake-exec dispatch run
# (bench/dispatch.py, 1 agent, default prefetch), counted per table and index. strace records
# the server's WAL frame headers (their first 4 bytes: the page number) from 1.5 s after its
# start to the run's end; the kept database's dbstat maps page numbers to tables and indexes.
# One JSON line per table or index, and one for the total (frames, MB written by pwrite).
#   bench/wal_pages.sh [N]        (N tasks, default 50000; needs strace, run as root)
set -euo pipefail
n=${1:-50000}
root=$(cd "$(dirname "$0")/.." && pwd)
py=$root/.venv/bin/python
tmp=$(mktemp -d /tmp/wal-pages-XXXX)
trap 'rm -rf "$tmp"' EXIT
"$py" "$root/bench/dispatch.py" --n "$n" --db sqlite --repeat 1 --agents 1 --prefetch default \
  --tmp "$tmp" --keep > "$tmp/out.json" 2>/dev/null &
bench=$!
pid=
for _ in $(seq 200); do
  pid=$(pgrep -f "pilotfish --home $tmp.* server start" | head -1 || true)
  [ -n "$pid" ] && break
  sleep 0.1
done
[ -n "$pid" ] || { echo "no server started" >&2; exit 1; }
sleep 1.5
strace -f -e trace=pwrite64 -s 4 -xx -o "$tmp/trace" -p "$pid" 2>/dev/null &
tracer=$!
wait $bench
kill $tracer 2>/dev/null || true
sleep 0.5
db=$(find "$tmp" -name pilotfish.db | head -1)
"$py" - "$db" "$tmp/trace" "$n" <<'PY'
import collections, json, re, sqlite3, sys
db, trace, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
names = dict(sqlite3.connect(db).execute("SELECT pageno, name FROM dbstat"))
count, written = collections.Counter(), 0
for line in open(trace):
    done = re.search(r"\) = (\d+)$", line.strip())
    if done and "pwrite64" in line:
        written += int(done.group(1))
    m = re.search(r'pwrite64\(\d+, "((?:\\x[0-9a-f]{2}){4})"\.*, 24,', line)
    if m:  # a WAL frame header: its page number
        page = int.from_bytes(bytes(int(h, 16) for h in m.group(1).split("\\x")[1:]), "big")
        count[names.get(page, "(free or new)")] += 1
total = sum(count.values())
for name, k in count.most_common():
    print(json.dumps({"bench": "wal_pages", "figure": "wal_frames", "table": name, "value": k,
                      "share": round(k / total, 3), "tasks": n}))
print(json.dumps({"bench": "wal_pages", "figure": "wal_frames_total", "value": total,
                  "pwrite_mb": round(written / 1e6, 1), "tasks": n}))
PY
