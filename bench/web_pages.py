"""Web dashboard and REST API response times on a big job database (1M jobs by default).

A fresh server and database get --total jobs (spread over 1,000 groups, g17 of 2 % of them:
20,000 of 1M; 50 sites; tag "bench" on all, "rare" on one in 10,000; --kill of them killed
so USER_KILLED is a rare state), then a real `pilotfish web` process (open, on loopback) is
asked each page and REST call --repeat-each times over HTTP (urllib, one connection per
request); the time is from sending the request to the last byte of the answer. Baseline, in
the same run: the server op the page needs most (job_ls with the same filter, 50 rows) called
directly with pilotfish.Client, so the web's own share shows.

Targets (issue 14): the jobs page p50 <= 100 ms; GET /api/jobs?state=...&limit=50 <= 50 ms.

The utilization and usage pages (--repeat-reports times each; no target): the jobs here never
ran (unless --ran), so each answer is the server's whole chunked scan (1M jobs: 200 requests of 5,000) with
nothing to add up — the cost of reading the table, the worst case for a range the jobs were
made in. Baseline, same run: Client.utilization() / Client.usage() direct. The plot routes are
timed cold (a range of its own each time) and warm (the same range again: kept a minute).
--reports-only skips the jobs pages. --ran (SQLite): instead, the database of jobs that ran
that bench/usage_queries.py builds (30 days, 10 sites, 200 agents, 5 % retried), so the
pages add up real attempts; e.g. ``--ran --reports-only --repeat-reports 1``.
"""
from __future__ import annotations

import socket
import statistics
import subprocess
import sys
import time
import urllib.request

import common as C

CHUNK = 100_000
TARGET_PAGE = 0.100
TARGET_REST = 0.050


def fill(c, total: int, kill: int) -> None:
    c.add_app({"name": "sleep", "executable": "/bin/sleep", "args": ["{t}"],
               "parameters": {"t": {"type": "int", "default": 1}}})
    for start in range(0, total, CHUNK):
        n = min(CHUNK, total - start)
        # g17: 20,000 jobs (every 50th), spread over the table; the other groups ~1,000
        c.add_jobs([{"name": f"j{i}", "application": "sleep",
                     "group_identifier": "g17" if i % 50 == 17 else f"g{i % 1000}",
                     "tags": ["bench"] + (["rare"] if i % 10_000 == 5 else []),
                     "site": f"s{i % 50}"} for i in range(start, start + n)])
        C.log(f"{start + n:,} jobs")
    step = max(1, total // kill) if kill else 0
    if step:
        ids = list(range(step, total + 1, step))[:kill]
        c.kill_jobs({"ids": ids})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed_get(url: str) -> float:
    t = time.perf_counter()
    with urllib.request.urlopen(url, timeout=600) as r:
        r.read()
        assert r.status == 200
    return time.perf_counter() - t


def p(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def ran(env, a) -> None:
    """The server stopped, usage_queries' database of jobs that ran, the server again."""
    from pilotfish.client import Client
    from pilotfish.server import daemon
    from usage_queries import build
    if a.db != "sqlite":
        raise SystemExit("--ran builds a SQLite database only")
    env.client.close()
    daemon.stop(env.home, wait=60)
    t = time.perf_counter()
    build(env.db.url, env.home / "pilotfish.db", a.total, time.time())
    C.log(f"database of {a.total:,} jobs that ran built in {time.perf_counter() - t:.0f} s")
    env.info = daemon.start_background(env.home, env.db.url, "tcp://127.0.0.1:*",
                                       a.heartbeat, wait=600)
    env.client = Client(env.address, env.home, timeout=600)


def reports(c, base: str, a, ctx: dict) -> None:
    """The utilization and usage pages, REST and plots, against the Client's own calls."""
    import os
    from urllib.parse import urlencode
    n = a.repeat_reports
    end = time.time()
    direct = {"utilization": [], "usage": [], "utilization_scan_all": [],
              "usage_scan_all": []}
    for _ in range(n):
        for scan_all in (True, False):  # before schema 13: every job read from the first
            tail = "_scan_all" if scan_all else ""
            t = time.perf_counter()
            c.utilization(scan_all=scan_all)
            direct["utilization" + tail].append(time.perf_counter() - t)
            t = time.perf_counter()
            c.usage(by="site,day", scan_all=scan_all)
            direct["usage" + tail].append(time.perf_counter() - t)
    for k in ("utilization", "usage"):
        C.emit(f"client_{k}", statistics.median(direct[k]), unit="s", values=direct[k],
               baseline_scan_all_p50=statistics.median(direct[k + "_scan_all"]),
               baseline_values=direct[k + "_scan_all"],
               baseline="the same call reading every job from the first (scan_all: the path "
               "before schema 13), same run", n=a.total, db=a.db,
               jobs_ran=a.total if a.ran else 0, interval=f"one Client.{k}() call, default "
               "range (utilization: the last day; usage: 30 days)", **ctx)

    def fixed(i: int) -> str:  # a range of its own for each i (0: the warm case's)
        return urlencode({"since": repr(end - 86400), "until": repr(end - i * 1e-3)})
    cases = [  # (figure, path of the i-th request, baseline)
        ("utilization_page", lambda i: "/utilization", "utilization"),
        ("usage_page", lambda i: "/usage?by=site,day", "usage"),
        ("rest_utilization", lambda i: "/api/utilization", "utilization"),
        ("rest_usage", lambda i: "/api/usage?by=site,day", "usage"),
        ("plot_utilization_png_cold", lambda i: f"/api/plots/utilization.png?{fixed(i)}",
         "utilization"),
        ("plot_utilization_png_warm", lambda i: f"/api/plots/utilization.png?{fixed(0)}",
         None),
        ("plot_usage_svg_cold", lambda i: f"/api/plots/usage.svg?by=site,day&{fixed(i)}",
         "usage"),
    ]
    timed_get(base + f"/api/plots/utilization.png?{fixed(0)}")  # (the warm case's answer)
    # a whole view: the page, then its <img> (the page's answer is kept: drawing only)
    import html
    import re
    for page, fig in (("/utilization", "utilization_view_image"),
                      ("/usage?by=site,day", "usage_view_image")):
        img_times = []
        for _ in range(n):
            with urllib.request.urlopen(base + page, timeout=600) as r:
                src = re.search(r'id="plot" src="([^"]+)"', r.read().decode()).group(1)
            img_times.append(timed_get(base + html.unescape(src)))
        C.emit(fig, statistics.median(img_times), unit="s", values=img_times, path=page,
               n=a.total, db=a.db, jobs_ran=a.total if a.ran else 0,
               interval="the page's <img> GET after the page: request sent to the last byte",
               loadavg_1m_now=round(os.getloadavg()[0], 2), **ctx)
    for figure, path, baseline in cases:
        times = [timed_get(base + path(i + 1)) for i in range(n)]
        fields = {}
        if baseline:
            fields = {f"baseline_client_{baseline}_p50": statistics.median(direct[baseline]),
                      "baseline": f"Client.{baseline}() direct, same run",
                      "before_scan_all_client_p50": statistics.median(
                          direct[baseline + "_scan_all"])}
        C.emit(figure, statistics.median(times), unit="s", p95=p(times, 0.95), values=times,
               path=path(1), n=a.total, db=a.db, jobs_ran=a.total if a.ran else 0,
               interval="urllib GET: request sent to the last byte read",
               loadavg_1m_now=round(os.getloadavg()[0], 2), **fields, **ctx)


def filter_counts(c, a, ctx: dict) -> None:
    """The job table's counts by state of each filter: exact (job_counts; the page before
    schema 15, 261-473 ms for the group of 20,000) against bounded to the newest 1,000
    (the page's COUNT_LIMIT)
    (job_counts with limit; the page now), same run, Client direct."""
    for key, value in (("group", "g17"), ("app", "sleep"), ("tag", "bench"), ("tag", "rare"),
                       ("site", "s7"), ("name", "j17")):
        flt = {key: value}
        old, new = [], []
        for _ in range(max(3, a.repeat_each // 3)):
            t = time.perf_counter()
            exact = c.counts(flt)
            old.append(time.perf_counter() - t)
            t = time.perf_counter()
            got = c.counts_bounded(flt, 1_000)
            new.append(time.perf_counter() - t)
        C.emit(f"job_counts_{key}_{value}", statistics.median(new), unit="s", values=new,
               baseline_exact_p50=statistics.median(old), baseline_values=old,
               baseline="job_counts exact (every matching row read), same run",
               matching=sum(exact.values()), more=got["more"], n=a.total, db=a.db,
               interval="one Client call: bounded to the newest 1,000 matching", **ctx)


def plans(url: str, a, ctx: dict) -> None:
    """The database's plan of the group's counts, exact (before) and bounded (now): EXPLAIN
    QUERY PLAN on SQLite, EXPLAIN ANALYZE on PostgreSQL (its time too)."""
    from sqlalchemy import create_engine, text
    exact = "SELECT state, count(*) FROM jobs WHERE group_identifier = 'g17' GROUP BY state"
    bounded = ("SELECT state FROM jobs WHERE group_identifier = 'g17' ORDER BY id DESC "
               "LIMIT 1001")
    eng = create_engine(url)
    with eng.connect() as conn:
        for name, sql in (("exact", exact), ("bounded", bounded)):
            pre = "EXPLAIN QUERY PLAN " if a.db == "sqlite" else "EXPLAIN ANALYZE "
            rows = [str(r[-1]) for r in conn.execute(text(pre + sql))]
            C.emit(f"plan_group_counts_{name}", len(rows), unit="plan lines", sql=sql,
                   plan=rows, n=a.total, db=a.db, **ctx)
    eng.dispose()


def sort_cases(c, middle: int, ran: bool) -> list[tuple]:
    """The job table and /api/jobs sorted by each column (schema 13's indexes), first pages
    and a page from the middle row's cursor, and a big state sorted by time (job_ls walks the
    time index): (figure, path, filter, target, sort, cursor)."""
    from urllib.parse import urlencode

    from pilotfish.job_sort import cursor_of
    row = c.jobs({"ids": [middle]}, limit=1)[0]
    big = "JOB_FINISHED" if ran else "READY"
    out = []
    for sort in ("name", "-updated", "-ended", "state", "app"):
        out.append((f"jobs_page_sort_{sort}", "/jobs?" + urlencode({"sort": sort}), {},
                    TARGET_PAGE, sort, None))
        if sort == "-ended" and row["ended"] is None:
            continue  # (jobs that never ran: no end to start from)
        cur = cursor_of(row, sort)
        q = {"sort": sort, "after": cur[1], "at": cur[0]}
        out.append((f"jobs_page_sort_{sort}_deep", "/jobs?" + urlencode(q), {}, TARGET_PAGE,
                    sort, cur))
    for sort in ("-updated", "name"):
        out.append((f"jobs_page_state_{big}_sort_{sort}", "/jobs?" + urlencode(
            {"state": big, "sort": sort}), {"state": big}, TARGET_PAGE, sort, None))
        out.append((f"rest_jobs_state_{big}_sort_{sort}", "/api/jobs?" + urlencode(
            {"state": big, "sort": sort, "limit": 50}), {"state": big}, TARGET_REST, sort, None))
    return out


def main() -> int:
    ap = C.parser(__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--total", type=int, default=1_000_000, help="Jobs in the database "
                    "(default: %(default)s).")
    ap.add_argument("--kill", type=int, default=1000, help="Jobs killed, spread over the "
                    "table (default: %(default)s).")
    ap.add_argument("--db", choices=("sqlite", "postgres"), default="sqlite")
    ap.add_argument("--repeat-each", type=int, default=30, help="Requests per page "
                    "(default: %(default)s).")
    ap.add_argument("--repeat-reports", type=int, default=3, help="Requests per utilization/"
                    "usage figure (each a whole scan; default: %(default)s).")
    ap.add_argument("--reports-only", action="store_true", help="Only the utilization and "
                    "usage figures.")
    ap.add_argument("--no-reports", action="store_true", help="Only the jobs pages (no "
                    "utilization/usage figures).")
    ap.add_argument("--ran", action="store_true", help="SQLite: jobs that ran (usage_queries' "
                    "database) instead of READY ones.")
    a = ap.parse_args()
    C.set_bench("web_pages")
    C.install_signal_handlers()
    ctx = C.machine(a.tmp)
    with C.Env(a.db, a.heartbeat, a.tmp, a.keep, label="web") as env:
        if a.ran:
            ran(env, a)
        else:
            fill(env.client, a.total, a.kill)
            if a.db == "postgres":
                # what autovacuum does within a minute of a bulk load: without statistics
                # PostgreSQL's first plans for a sorted page read half the table (~1 s)
                from sqlalchemy import create_engine, text
                eng = create_engine(env.db.url)
                with eng.begin() as conn:
                    conn.execute(text("ANALYZE jobs"))
                eng.dispose()
        port = free_port()
        log = open(env.home / "web.log", "ab")
        web = subprocess.Popen([*C.pilotfish_cmd(), "--home", str(env.home), "--server",
                                env.address, "web", "--bind", f"127.0.0.1:{port}"],
                               stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    timed_get(base + "/api/openapi.json")
                    break
                except OSError:
                    if time.monotonic() > deadline or web.poll() is not None:
                        raise SystemExit("the web did not start; see web.log")
                    time.sleep(0.1)
            middle = a.total // 2
            cases = [
                ("jobs_page", "/jobs", {}, TARGET_PAGE),
                ("jobs_page_state_READY", "/jobs?state=READY", {"state": "READY"}, TARGET_PAGE),
                ("jobs_page_state_USER_KILLED", "/jobs?state=USER_KILLED",
                 {"state": "USER_KILLED"}, TARGET_PAGE),
                ("jobs_page_group", "/jobs?group=g17", {"group": "g17"}, TARGET_PAGE),
                ("jobs_page_deep", f"/jobs?after={middle}", {}, TARGET_PAGE),
                ("job_page", f"/jobs/{middle}", None, TARGET_PAGE),
                ("groups_page", "/groups?after=g500", None, TARGET_PAGE),
                ("rest_jobs_state_READY", "/api/jobs?state=READY&limit=50", {"state": "READY"},
                 TARGET_REST),
                ("rest_jobs_state_USER_KILLED", "/api/jobs?state=USER_KILLED&limit=50",
                 {"state": "USER_KILLED"}, TARGET_REST),
            ]
            # the other filters (schema 15: site has an index; tag never can: a LIKE)
            for key, value in (("group", "g17"), ("app", "sleep"), ("tag", "bench"),
                               ("tag", "rare"), ("name", f"j{middle}"), ("site", "s7")):
                tail = "" if (key, value) == ("group", "g17") else f"_{key}_{value}"
                if tail:
                    cases.append((f"jobs_page{tail}", f"/jobs?{key}={value}", {key: value},
                                  TARGET_PAGE))
                cases.append((f"rest_jobs_{key}_{value}", f"/api/jobs?{key}={value}&limit=50",
                              {key: value}, TARGET_REST))
            cases = [(f, p, fl, t, None, None) for f, p, fl, t in cases]
            cases += sort_cases(env.client, middle, a.db == "sqlite" and a.ran)
            for figure, path, flt, target, sort, cursor in ([] if a.reports_only else cases):
                timed_get(base + path)  # warm
                times = [timed_get(base + path) for _ in range(a.repeat_each)]
                fields = {}
                if flt is not None:  # baseline: the op itself, from a Client
                    newest = "/api/" not in path and sort is None
                    after = middle if "after=" in path and sort is None else cursor
                    bt = []
                    for _ in range(a.repeat_each):
                        t = time.perf_counter()
                        env.client.jobs(flt, limit=50, newest=newest, after=after, sort=sort)
                        bt.append(time.perf_counter() - t)
                    fields = {"baseline_job_ls_p50": statistics.median(bt),
                              "baseline": "Client.jobs(same filter, limit=50) direct"}
                med = statistics.median(times)
                C.emit(figure, med, unit="s", p95=p(times, 0.95), values=times, path=path,
                       target=target, meets_target=med <= target, n=a.total, db=a.db,
                       interval="urllib GET: request sent to the last byte read",
                       loadavg_1m_now=round(__import__("os").getloadavg()[0], 2),
                       **({"sort": sort} if sort else {}), **fields, **ctx)
            if not a.reports_only:
                filter_counts(env.client, a, ctx)
                plans(env.db.url, a, ctx)
            if not a.no_reports:
                reports(env.client, base, a, ctx)
        finally:
            web.terminate()
            try:
                web.wait(10)
            except subprocess.TimeoutExpired:
                web.kill()
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(C.REPO / "bench"))
    C.run(main)
