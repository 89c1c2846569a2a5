#!/usr/bin/env python3
"""Utilization and usage on PostgreSQL: 1M jobs that ran over 30 days, bounded scan against
the whole scan (``scan_all``, the path before schema 13), same run, ABBA.

The jobs are written by one INSERT ... SELECT generate_series (a job a ``30 days / total``
apart, 300 s each, on one agent of site s1), the table ANALYZEd (as autovacuum would), then
a server started on it. One JSON line per query: the median of two calls each way, the
requests, and whether both answers agree.

Usage: bench/usage_queries_pg.py [--total 1000000]
"""
from __future__ import annotations

import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

DAY = 86400.0


def fill(url: str, total: int, now: float) -> None:
    import psycopg
    from sqlalchemy.engine import make_url
    from pilotfish.server.db import make_engine
    make_engine(url).dispose()
    u = make_url(url).set(drivername="postgresql")
    with psycopg.connect(u.render_as_string(hide_password=False), autocommit=True) as c:
        c.execute("INSERT INTO apps (id, name, description, executable, args, parameters, "
                  "environment, resources, created) VALUES (1, 'sim', '', '/bin/true', '[]', "
                  "'{}', '{}', '{}', %s)", (now,))
        c.execute("INSERT INTO agents (id, host, pid, site, pilot, cores, gpus, memory, "
                  "started, last_seen, state, tasks_done) VALUES ('a1', 'h1', 1, 's1', 'p1', "
                  "64, 0, 1, %s, %s, 'EXITED', 0)", (now - 31 * DAY, now))
        c.execute("""INSERT INTO jobs (id, name, description, app_id, num_nodes,
            processes_per_node, cpus_per_process, gpus_per_process, parameters, tags, priority,
            max_retries, retries, attempts, state, state_time, created, started, ended,
            exit_code, workdir, run_agent, run_leased, run_state, group_identifier)
            SELECT i, 'job' || i, '', 1, 1, 1, 1, 0, '{}', '', 0, 3, 0, 1, 'JOB_FINISHED',
                   e, e - 400, e - 300, e, 0, 'w/' || i, 'a1', e - 301, 'JOB_FINISHED',
                   'g' || (i %% 50)
            FROM (SELECT i, %s - (%s - i) * (30 * 86400.0 / %s) AS e
                  FROM generate_series(1, %s) i) s""", (now, total, total, total))
        c.execute("ANALYZE jobs")



def refill(env, total: int, now: float, heartbeat: float):
    """Stop ``env``'s server, fill its database with ``total`` jobs (see :func:`fill`), start it
    again and give ``env`` a client to it (10-minute timeouts: a million rows); the client."""
    from pilotfish.client import Client
    from pilotfish.server import daemon
    env.client.close()
    daemon.stop(env.home, wait=60)
    t = time.perf_counter()
    fill(env.db.url, total, now)
    C.log(f"{total:,} jobs written and analyzed in {time.perf_counter() - t:.0f} s")
    env.info = daemon.start_background(env.home, env.db.url, "tcp://127.0.0.1:*", heartbeat,
                                       wait=600)
    env.client = Client(env.address, env.home, timeout=600)
    return env.client

def main() -> int:
    p = C.parser(__doc__.split("\n")[0])
    p.add_argument("--total", type=int, default=1_000_000)
    a = p.parse_args()
    C.set_bench("usage_queries_pg")
    ctx = {"n": a.total, "db": "postgresql", "machine": C.machine(a.tmp)}
    with C.Env("postgres", a.heartbeat, a.tmp, a.keep, label="usagepg") as env:
        now = time.time()
        c = refill(env, a.total, now, a.heartbeat)
        todo = [("utilization", "last hour", dict(since=now - 3600, until=now)),
                ("utilization", "last day", dict(since=now - DAY, until=now)),
                ("utilization", "30 days", dict(since=now - 30 * DAY, until=now)),
                ("usage", "by site,day, last day", dict(by="site,day", since=now - DAY,
                                                        until=now)),
                ("usage", "by site,day, 7 days", dict(by="site,day", since=now - 7 * DAY,
                                                      until=now)),
                ("usage", "by site,day, 30 days", dict(by="site,day", since=now - 31 * DAY,
                                                       until=now))]
        for kind, what, kw in todo:
            runs: dict[bool, list] = {True: [], False: []}
            for sa in (True, False, False, True):
                t = time.perf_counter()
                r = getattr(c, kind)(scan_all=sa, **kw)
                runs[sa].append((time.perf_counter() - t, r))
            rb, r = runs[True][0][1], runs[False][0][1]
            same = (r["busy"] == rb["busy"] and math.isclose(
                r["core_seconds"], rb["core_seconds"], rel_tol=1e-9)) \
                if kind == "utilization" else len(r["rows"]) == len(rb["rows"]) and all(
                    math.isclose(x["core_hours"], y["core_hours"], rel_tol=1e-9)
                    and x["jobs"] == y["jobs"] for x, y in zip(r["rows"], rb["rows"]))
            C.emit(f"{kind}_s", statistics.median(dt for dt, _ in runs[False]), unit="s",
                   query=what, requests=r["requests"],
                   baseline_scan_all_s=statistics.median(dt for dt, _ in runs[True]),
                   baseline_requests=rb["requests"], same_answer=same,
                   baseline="scan_all (every job from the first), same run, ABBA",
                   interval=f"one Client.{kind} call", **ctx)
    return 0


if __name__ == "__main__":
    C.run(main)
