#!/usr/bin/env python3
"""Utilization and usage queries on a big database, and the server's other clients meanwhile.

Builds a database of ``--total`` jobs that ran (default 1,000,000: 30 days, 10 sites, 200
agents of 8-64 cores, 50 groups, 1-4 cores each, 5 % with a second attempt in job_attempts),
written straight into the tables (the server stopped), then starts the server on it and
measures, each one JSON line:

- ``utilization_s``, ``usage_s``: one Client.utilization / Client.usage call, all its chunked
  requests, for several ranges and groupings (with the requests count), and beside it the
  baseline, same run: the same call with ``scan_all`` (every job read from the first, the
  path before schema 13 bounded a scan by the (ended, id) index), and whether both agree;
- ``chunk_request_ms``: the slowest single request (one chunk of jobs): how long the server's
  loop is held at most;
- ``ping_ms``: p50/p99/max latency of a second client's pings, alone (the baseline, same run)
  and while usage and utilization queries run back to back;

each with the server's chunk (5,000 jobs per request), or others: ``--chunks 5000,1000``.

Usage: bench/usage_queries.py [--total 1000000] [--tmp /dev/shm]
"""
from __future__ import annotations

import json
import math
import random
import sqlite3
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

from pilotfish.client import Client  # noqa: E402
from pilotfish.server import daemon  # noqa: E402

DAY = 86400.0


def build(url: str, path: Path, total: int, now: float) -> None:
    """Rows of jobs that ran, straight into SQLite (what the server would have written)."""
    from pilotfish.server.db import make_engine
    make_engine(url).dispose()  # the schema
    rnd = random.Random(14)
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=OFF")
    t0 = now - 30 * DAY
    agents = []
    for i in range(200):
        site = f"site{i % 10}"
        agents.append((f"agent{i:04d}", f"host{i}", 1000 + i, site, f"pilot{i // 4}",
                       rnd.choice((8, 16, 32, 64)), 0, 2**34, t0, now, "EXITED", 0, f"n{i}",
                       None, None))
    conn.executemany("INSERT INTO agents (id, host, pid, site, pilot, cores, gpus, memory, "
                     "started, last_seen, state, tasks_done, node, node_cores, launcher) "
                     "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", agents)
    conn.execute("INSERT INTO apps (id, name, description, executable, args, parameters, "
                 "environment, resources, created) VALUES (1, 'sim', '', '/bin/true', '[]', "
                 "'{}', '{}', '{}', ?)", (t0,))
    batch, att = [], []
    for j in range(1, total + 1):
        start = t0 + (j / total) * 30 * DAY + rnd.uniform(-600, 600)
        end = start + rnd.uniform(60, 600)
        a = agents[rnd.randrange(200)]
        attempts = 2 if j % 20 == 0 else 1
        if attempts == 2:
            att.append((j, 1, a[0], a[1], a[12], a[4], None, start - 700, start - 650,
                        start - 10, "RUN_FAILED", 1, "exit code 1"))
        batch.append((j, f"job{j}", "", 1, None, 1, 1, rnd.choice((1, 1, 2, 4)), 0, "{}",
                      f"g{j % 50}", "", 0, 3, attempts - 1, attempts, "JOB_FINISHED", end,
                      start - 30, start, end, 0, f"w/{j}", a[0], start - 1, "JOB_FINISHED"))
        if len(batch) == 50_000:
            _flush(conn, batch, att)
            C.log(f"{j:,} jobs written")
    _flush(conn, batch, att)
    conn.execute("UPDATE pilotfish_meta SET value = value WHERE key = 'schema_version'")
    conn.commit()
    conn.close()


def _flush(conn, batch: list, att: list) -> None:
    conn.executemany(
        "INSERT INTO jobs (id, name, description, app_id, site, num_nodes, processes_per_node, "
        "cpus_per_process, gpus_per_process, parameters, group_identifier, tags, priority, "
        "max_retries, retries, attempts, state, state_time, created, started, ended, "
        "exit_code, workdir, run_agent, run_leased, run_state) "
        "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", batch)
    conn.executemany("INSERT INTO job_attempts (job_id, attempt, agent, host, node, pilot, "
                     "hosts, leased, started, ended, state, exit_code, message) "
                     "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", att)
    conn.commit()
    batch.clear()
    att.clear()


class Pinger(threading.Thread):
    """Pings with its own client as fast as answers come, recording each latency."""

    def __init__(self, address: str, home: Path) -> None:
        super().__init__(daemon=True)
        self.c = Client(address, home, timeout=60)
        self.lat: list[float] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            t = time.perf_counter()
            self.c.ping()
            self.lat.append(time.perf_counter() - t)
            time.sleep(0.002)


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))] * 1000


def _rows(r: dict) -> list[list]:
    """A usage answer's rows as lists, the core-hours last, in a stable order."""
    return sorted([[str(x.get(k)) for k in r["by"]] + [x["jobs"], x["finished"],
                                                       x["attempts"], x["core_hours"]]
                   for x in r["rows"]])


def queries(c: Client, pinger: Pinger, now: float, chunk: int, base: list, ctx: dict) -> None:
    """Every query with ``chunk`` jobs per request, a second client pinging meanwhile."""
    mark = len(pinger.lat)
    # every range has both ends, so the two paths are asked the same question
    todo = [
        ("utilization", "last hour", dict(since=now - 3600, until=now)),
        ("utilization", "last day", dict(since=now - DAY, until=now)),
        ("utilization", "7 days, one site", dict(site="site3", since=now - 7 * DAY,
                                                 until=now)),
        ("utilization", "30 days", dict(since=now - 30 * DAY, until=now)),
        ("usage", "by site,day, last day", dict(by="site,day", since=now - DAY, until=now)),
        ("usage", "by site,day, 7 days", dict(by="site,day", since=now - 7 * DAY, until=now)),
        ("usage", "by site,day, 30 days", dict(by="site,day", since=now - 31 * DAY,
                                               until=now)),
        ("usage", "by app,group,month, 30 days", dict(by="app,group,month",
                                                      since=now - 31 * DAY, until=now)),
    ]
    for kind, what, kw in todo:
        fn = getattr(c, kind)
        # baseline, same run: every job read from the first (scan_all, the path before
        # schema 13); the two alternate (ABBA) so a neighbour's load falls on both alike
        runs: dict[bool, list] = {True: [], False: []}
        for sa in (True, False, False, True):
            t = time.perf_counter()
            r = fn(chunk=chunk, scan_all=sa, **kw)
            runs[sa].append((time.perf_counter() - t, r))
        rb, r = runs[True][0][1], runs[False][0][1]
        if kind == "utilization":
            same = r["busy"] == rb["busy"] and r["attempts"] == rb["attempts"] and \
                math.isclose(r["core_seconds"], rb["core_seconds"], rel_tol=1e-9)
        else:  # (sums over other chunk boundaries: the last bits of a float may differ)
            same = [x[:-1] for x in _rows(r)] == [x[:-1] for x in _rows(rb)] and all(
                math.isclose(x[-1], y[-1], rel_tol=1e-9) for x, y in zip(_rows(r), _rows(rb)))
        extra = ({"attempts": r["attempts"], "max_busy": r["max_busy"],
                  "points": len(r["busy"])} if kind == "utilization"
                 else {"groups": len(r["rows"]), "jobs": r["totals"]["jobs"]})
        new_t = [dt for dt, _ in runs[False]]
        base_t = [dt for dt, _ in runs[True]]
        C.emit(f"{kind}_s", statistics.median(new_t), unit="s", query=what,
               requests=r["requests"], chunk=chunk, values=new_t,
               baseline_scan_all_s=statistics.median(base_t), baseline_values=base_t,
               baseline_requests=rb["requests"],
               baseline="the same call reading every job from the first (scan_all: the "
               "path before schema 13), same run, ABBA", same_answer=same,
               interval=f"one Client.{kind} call: every chunk request and the sums", **extra,
               **ctx)
    during = pinger.lat[mark:]
    # the longest single request: one chunk, as the server's loop sees it
    for op, args in (("utilization", {"since": now - 30 * DAY, "until": now}),
                     ("usage", {"by": ["site", "app", "group", "day"],
                                "since": now - 31 * DAY, "until": now})):
        after, times = 0, []
        while after is not None:
            t = time.perf_counter()
            after = c.call(op, after=after, chunk=chunk, **args)["after"]
            times.append(time.perf_counter() - t)
        C.emit("chunk_request_ms", max(times) * 1000, unit="ms", op=op, chunk=chunk,
               median=statistics.median(times) * 1000, requests=len(times),
               interval="one request (one chunk of jobs), client round trip", **ctx)
    C.emit("ping_ms_during_queries", pct(during, 0.5), unit="ms", p99=pct(during, 0.99),
           max=max(during) * 1000, pings=len(during), baseline_p99=pct(base, 0.99), chunk=chunk,
           interval="a second client's ping round trips while the queries above ran back "
                    "to back", **ctx)


def main() -> int:
    p = C.parser(__doc__.split("\n")[0])
    p.add_argument("--total", type=int, default=1_000_000)
    p.add_argument("--chunks", type=C.int_list, default=[5000],
                   help="Jobs per request to measure, comma-separated (the server's largest "
                        "is 5000; default: %(default)s).")
    a = p.parse_args()
    C.set_bench("usage_queries")
    ctx = {"n": a.total, "db": "sqlite", "machine": C.machine(a.tmp)}
    with C.Env("sqlite", a.heartbeat, a.tmp, a.keep, label="usage") as env:
        env.client.close()
        daemon.stop(env.home, wait=60)
        now = time.time()
        t = time.perf_counter()
        build(env.db.url, env.home / "pilotfish.db", a.total, now)
        C.log(f"database built in {time.perf_counter() - t:.0f} s")
        env.info = daemon.start_background(env.home, env.db.url, "tcp://127.0.0.1:*",
                                           a.heartbeat, wait=600)
        c = env.client = Client(env.address, env.home, timeout=600)
        pinger = Pinger(env.address, env.home)
        pinger.start()
        time.sleep(3)
        base = list(pinger.lat)
        C.emit("ping_ms_idle", pct(base, 0.5), unit="ms", p99=pct(base, 0.99),
               max=max(base) * 1000, pings=len(base),
               interval="a second client's ping round trips, nothing else running", **ctx)
        for chunk in a.chunks:
            queries(c, pinger, now, chunk, base, ctx)
        pinger.stop.set()
        pinger.join()
    return 0


if __name__ == "__main__":
    C.run(main)
