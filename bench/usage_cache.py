#!/usr/bin/env python3
"""Usage over a range that covers every job: from the cache of closed days (schema 15)
against reading the jobs, same run, same database.

The database is bench/usage_queries.py's (``--total`` jobs that ran over 30 days, 10 sites,
50 groups, 5 % with a second attempt), built once into ``--db-file`` and copied for each run
(``--build`` makes it again). A real server on the copy; each figure one JSON line, wall time
of a whole Client.usage() call (all its requests) and the server's CPU seconds (psutil):

- ``usage_nocache_s``: cache=False, the jobs read in chunks (the path before schema 15; the
  baseline, same run);
- ``usage_cold_s``: the first call with the cache: it sums the 30 days into it (requests of
  at most 50,000 job rows each; ``max_request_ms``: the longest a request held the loop);
- ``usage_warm_s``: again, per grouping (site,day; app,month; group; site,app,group,day), each
  checked equal to the uncached answer;
- ``usage_after_rm_s``: after ``job rm`` of one job per day (its days dropped and summed again).

Usage: bench/usage_cache.py [--total 1000000] [--db-file /dev/shm/usage_1m.db] [--tmp /dev/shm]
"""
from __future__ import annotations

import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

import psutil  # noqa: E402

from pilotfish.client import Client  # noqa: E402
from pilotfish.server import daemon  # noqa: E402

DAY = 86400.0
NOW = 1765000000.0  # the database's "now" (fixed: a built file is reused): all days closed


def _key(r: dict) -> list:
    return sorted([[str(x.get(k)) for k in r["by"]] + [x["jobs"], x["finished"],
                   x["attempts"], round(x["core_hours"], 6)] for x in r["rows"]])


def measure(c, proc, a, ctx: dict) -> None:
    rng = {"since": NOW - 30 * DAY, "until": NOW}

    def timed(**kw) -> tuple[float, float, dict]:
        cpu = sum(proc.cpu_times()[:2])
        t = time.perf_counter()
        r = c.usage(**rng, **kw)
        return time.perf_counter() - t, sum(proc.cpu_times()[:2]) - cpu, r

    base = [timed(by="site,day", cache=False) for _ in range(a.repeat)]
    C.emit("usage_nocache_s", statistics.median(x[0] for x in base), unit="s",
           values=[x[0] for x in base], server_cpu_s=[x[1] for x in base],
           requests=base[0][2]["requests"], by="site,day", n=a.total, days=30,
           baseline="the same call with cache=False: the jobs read in 5,000-id chunks "
           "(the path before schema 15)", **ctx)
    cold = timed(by="site,day")
    C.emit("usage_cold_s", cold[0], unit="s", server_cpu_s=cold[1],
           requests=cold[2]["requests"], by="site,day", n=a.total, days=30,
           equal_to_nocache=_key(cold[2]) == _key(base[0][2]),
           baseline_nocache_p50=statistics.median(x[0] for x in base), **ctx)
    for by in ("site,day", "app,month", "group", "site,app,group,day"):
        ref = c.usage(**rng, by=by, cache=False)
        warm = [timed(by=by) for _ in range(max(5, a.repeat))]
        C.emit("usage_warm_s", statistics.median(x[0] for x in warm), unit="s",
               values=[x[0] for x in warm], server_cpu_s=[x[1] for x in warm],
               requests=warm[0][2]["requests"], by=by, n=a.total, days=30,
               rows=len(warm[0][2]["rows"]),
               equal_to_nocache=all(_key(x[2]) == _key(ref) for x in warm),
               baseline_nocache_p50=statistics.median(x[0] for x in base), **ctx)
    # one job removed per day: its day dropped and summed again at the next report
    ids = [int(1 + (d + 0.5) * a.total / 30) for d in range(30)]
    c.remove_jobs({"ids": ids})
    after = timed(by="site,day")
    ref = c.usage(**rng, by="site,day", cache=False)
    C.emit("usage_after_rm_s", after[0], unit="s", server_cpu_s=after[1],
           requests=after[2]["requests"], removed=len(ids), n=a.total,
           equal_to_nocache=_key(after[2]) == _key(ref), **ctx)
    # the longest single request of a cold build (one build request's work)
    c.remove_jobs({"ids": [ids[15] + 1]})  # (a day in the middle: cached)
    times = []
    args = {**rng, "by": ["site", "day"]}
    more = True
    while more:
        t = time.perf_counter()
        r = c.call("usage_days", **args)
        times.append(time.perf_counter() - t)
        more = r["more"]
    C.emit("usage_days_request_max_ms", max(times) * 1000, unit="ms", n=a.total,
           requests_ms=[x * 1000 for x in times],
           interval="the longest usage_days request (one day summed again after an rm, "
           "then the answer)", **ctx)


def main() -> int:
    ap = C.parser(__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--total", type=int, default=1_000_000)
    ap.add_argument("--db-file", default="/dev/shm/pilotfish_usage_1m.db")
    ap.add_argument("--build", action="store_true")
    ap.add_argument("--db", choices=("sqlite", "postgres"), default="sqlite", help="postgres: "
                    "usage_queries_pg's jobs (one agent, one site; generate_series) in a fresh "
                    "database")
    a = ap.parse_args()
    C.set_bench("usage_cache")
    ctx = C.machine(a.tmp)
    if a.db == "postgres":
        from usage_queries_pg import refill
        with C.Env("postgres", a.heartbeat, a.tmp, a.keep, label="usagecache") as env:
            c = refill(env, a.total, NOW, a.heartbeat)
            measure(c, psutil.Process(env.info["pid"]), a, {**ctx, "db": "postgresql"})
        return 0
    src = Path(a.db_file)
    if a.build or not src.exists():
        from usage_queries import build
        t = time.perf_counter()
        build(f"sqlite:///{src}", src, a.total, NOW)
        C.log(f"built {a.total:,} jobs in {time.perf_counter() - t:.0f} s")
    home = Path(tempfile.mkdtemp(prefix="usage_cache_", dir=a.tmp))
    try:
        shutil.copy(src, home / "pilotfish.db")
        url = f"sqlite:///{home / 'pilotfish.db'}"
        info = daemon.start_background(home, url, "tcp://127.0.0.1:*", a.heartbeat, wait=600)
        c = Client(info["address"], home, timeout=600)
        measure(c, psutil.Process(info["pid"]), a, {**ctx, "db": "sqlite"})
        c.close()
        daemon.stop(home, wait=60)
    finally:
        if not a.keep:
            shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    C.run(main)
