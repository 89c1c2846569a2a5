#!/usr/bin/env python3
"""Bulk submission and listing at scale.

Part 1, ``job add`` of N jobs (default 100,000) into a fresh server and database, each repeat
in a fresh one:

* ``add_jobs_client``: one ``Client.add_jobs(jobs)`` call with all N; wall time of the call
  (the client encodes, the server validates, inserts and commits all N, then replies).
* ``add_jobs_cli``: ``pilotfish --home H job add -f jobs.json`` with the same N jobs in a JSON
  file; wall time of the whole command (interpreter start-up, reading and parsing the file,
  the call). The CLI's own reported rate (the call alone) is included as ``cli_reported``.

Part 2, listing on a big database (default 1,000,000 jobs, built with ``Client.add_jobs`` in
chunks of 100,000; the per-chunk rates show how adding scales as the table grows; a spread of
jobs is then killed so that a rare state exists too):

* ``job_ls_client``: ``Client.jobs({"state": [X]}, limit=50)``, median of ``--ls-repeat`` calls.
* ``job_ls_cli``: ``pilotfish --home H job ls --state X --limit 50``, whole-command wall time,
  median; baseline ``pilotfish --version`` (the CLI's start-up alone).
* ``job_counts_client``: ``Client.counts()`` over all jobs (what ``job wait`` polls).
* ``server_restart``: stop the server and start it again on the big database (it rebuilds its
  in-memory queue from the database) until it answers a ping.
"""
from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402
from pilotfish.server import daemon  # noqa: E402
from pilotfish.client import Client  # noqa: E402

TARGET_ADD = 20_000     # jobs/s
TARGET_LS = 0.5         # seconds
CHUNK = 100_000
APP = {"name": "work", "executable": "/bin/echo", "args": ["{i}"],
       "parameters": {"i": {"type": "int"}}}


def make_jobs(start: int, n: int, params: bool) -> list[dict]:
    if params:
        return [{"name": f"j{i}", "application": "work", "parameters": {"i": i}}
                for i in range(start, start + n)]
    return [{"name": f"j{i}", "application": "plain"} for i in range(start, start + n)]


def setup_apps(c: Client) -> None:
    c.add_app(APP)
    c.add_app({"name": "plain", "executable": "/bin/true"})


def add_client(a, label: str) -> float:
    with C.Env(a.db, a.heartbeat, a.tmp, a.keep, label="submit") as env:
        setup_apps(env.client)
        jobs = make_jobs(0, a.n, a.params)
        with C.profile(a, label, {"server": env.server_pid}):
            t0 = time.perf_counter()
            ids = env.client.add_jobs(jobs)
            dt = time.perf_counter() - t0
        assert len(ids) == a.n, len(ids)
    return dt


def add_cli(a, label: str) -> tuple[float, float | None]:
    with C.Env(a.db, a.heartbeat, a.tmp, a.keep, label="submit") as env:
        setup_apps(env.client)
        path = env.home / "jobs.json"
        path.write_text(json.dumps(make_jobs(0, a.n, a.params)))
        with C.profile(a, label, {"server": env.server_pid}):
            dt, out = C.timed_cli([*C.pilotfish_cmd(), "--home", str(env.home), "job", "add",
                                   "-f", str(path)])
        m = re.search(r"([\d,]+) jobs/s", out)
        reported = float(m.group(1).replace(",", "")) if m else None
        n = env.client.counts().get("READY", 0)
        if n != a.n:
            raise RuntimeError(f"the CLI added {n} jobs, not {a.n}: {out}")
    return dt, reported


def big_db(a, ctx: dict) -> None:
    with C.Env(a.db, a.heartbeat, a.tmp, a.keep, label="submit-big") as env:
        c = env.client
        setup_apps(c)
        rates = []
        t0 = time.perf_counter()
        for start in range(0, a.total, CHUNK):
            n = min(CHUNK, a.total - start)
            jobs = make_jobs(start, n, a.params)
            t = time.perf_counter()
            c.add_jobs(jobs)
            rates.append(n / (time.perf_counter() - t))
            C.log(f"{start + n:,} jobs in the database ({rates[-1]:,.0f} jobs/s for this chunk)")
        build = time.perf_counter() - t0
        C.emit("add_jobs_growing_db", C.median(rates), unit="jobs/s", values=rates,
               interval=f"one Client.add_jobs call of {CHUNK:,} jobs, as the table grows to "
                        f"{a.total:,} (values in order)",
               total_seconds=build, n=a.total, db=a.db, params=a.params, **ctx)
        # a rare state: kill every k-th job, spread over the whole table
        step = max(1, a.total // a.kill) if a.kill else 0
        if step:
            ids = list(range(step, a.total + 1, step))[:a.kill]
            for i in range(0, len(ids), 50_000):
                c.kill_jobs({"ids": ids[i:i + 50_000]})
        C.log(f"database ready: {C.counts_line(c.counts())}")
        ls_figures(a, env, ctx)
        if not a.no_restart:
            env.client.close()
            daemon.stop(env.home, wait=60)
            t = time.perf_counter()
            env.info = daemon.start_background(env.home, env.db.url, "tcp://127.0.0.1:*",
                                               a.heartbeat, wait=600)
            dt = time.perf_counter() - t
            env.client = Client(env.address, env.home, timeout=600)
            C.emit("server_restart", dt, unit="s",
                   interval="daemon.start_background on the big database until it answers "
                            "a ping (rebuilds the in-memory queue)",
                   n=a.total, db=a.db, **ctx)


def ls_figures(a, env: C.Env, ctx: dict) -> None:
    c = env.client
    home = str(env.home)
    cli = C.pilotfish_cmd()
    floor = [C.timed_cli([*cli, "--version"])[0] for _ in range(a.ls_repeat)]
    fmed = C.median(floor)
    counts = c.counts()
    for state in C.str_list(a.states):
        client_t, cli_t, rows = [], [], None
        for _ in range(a.ls_repeat):
            t = time.perf_counter()
            rows = c.jobs({"state": [state]}, limit=50)
            client_t.append(time.perf_counter() - t)
            cli_t.append(C.timed_cli([*cli, "--home", home, "job", "ls", "--state", state,
                                      "--limit", "50"])[0])
        common = dict(unit="s", state=state, matching=counts.get(state, 0), rows=len(rows),
                      n=a.total, db=a.db, target=TARGET_LS, repeat=a.ls_repeat)
        med = C.median(client_t)
        C.emit("job_ls_client", med, values=client_t, meets_target=med < TARGET_LS,
               interval="Client.jobs(filter={'state': [X]}, limit=50) call", **common, **ctx)
        med = C.median(cli_t)
        C.emit("job_ls_cli", med, values=cli_t, meets_target=med < TARGET_LS,
               interval=f"`pilotfish --home H job ls --state {state} --limit 50`, whole "
                        "command", baseline="pilotfish --version (CLI start-up alone)",
               baseline_value=fmed, baseline_values=floor, ratio=C.ratio(med, fmed),
               **common, **ctx)
    times = []
    for _ in range(a.ls_repeat):
        t = time.perf_counter()
        c.counts()
        times.append(time.perf_counter() - t)
    C.emit("job_counts_client", C.median(times), unit="s", values=times,
           interval="Client.counts() over all jobs (GROUP BY state)", n=a.total, db=a.db, **ctx)


def main() -> int:
    p = C.parser(__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--n", type=int, default=100_000,
                   help="Jobs per submission in part 1 (at most 100,000, the server's limit "
                        "per request) (default: %(default)s).")
    p.add_argument("--total", type=int, default=1_000_000,
                   help="Jobs in the database for part 2 (default: %(default)s).")
    p.add_argument("--db", choices=("sqlite", "postgres"), default="sqlite")
    p.add_argument("--params", action=__import__("argparse").BooleanOptionalAction,
                   default=True, help="Jobs carry one int parameter (app /bin/echo {i}); "
                                      "--no-params: no parameters (default: with).")
    p.add_argument("--ls-repeat", type=int, default=7,
                   help="Repeats of each listing (default: %(default)s).")
    p.add_argument("--states", default="READY,USER_KILLED,FAILED",
                   help="States to list in part 2 (default: %(default)s).")
    p.add_argument("--kill", type=int, default=1000,
                   help="Jobs to kill in part 2 so that USER_KILLED is a rare state "
                        "(default: %(default)s).")
    p.add_argument("--skip-add", action="store_true", help="Skip part 1.")
    p.add_argument("--skip-ls", action="store_true", help="Skip part 2.")
    p.add_argument("--no-restart", action="store_true",
                   help="Skip the server restart on the big database.")
    a = p.parse_args()
    C.set_bench("submit")
    C.install_signal_handlers()
    if a.n > CHUNK:
        p.error(f"--n at most {CHUNK} (one request)")
    ctx = C.machine(a.tmp)
    if not a.skip_add:
        client_t, cli_t, reported = [], [], []
        for r in range(a.repeat):
            client_t.append(add_client(a, f"submit-client-r{r + 1}"))
            dt, rep = add_cli(a, f"submit-cli-r{r + 1}")
            cli_t.append(dt)
            reported.append(rep)
            C.log(f"repeat {r + 1}/{a.repeat}: Client.add_jobs {a.n / client_t[-1]:,.0f} jobs/s; "
                  f"CLI {a.n / dt:,.0f} jobs/s whole command ({rep or 0:,.0f} reported by it)")
        vals = [a.n / t for t in client_t]
        med = C.median(vals)
        C.emit("add_jobs_client", med, unit="jobs/s", values=vals, seconds=client_t,
               target=TARGET_ADD, meets_target=med >= TARGET_ADD,
               interval="one Client.add_jobs call with all N jobs (into an empty database)",
               n=a.n, repeat=a.repeat, db=a.db, params=a.params, **ctx)
        vals = [a.n / t for t in cli_t]
        med = C.median(vals)
        C.emit("add_jobs_cli", med, unit="jobs/s", values=vals, seconds=cli_t,
               target=TARGET_ADD, meets_target=med >= TARGET_ADD,
               interval="`pilotfish job add -f jobs.json` whole command (start-up, JSON parse, "
                        "call) into an empty database",
               cli_reported=C.median(reported), cli_reported_values=reported,
               n=a.n, repeat=a.repeat, db=a.db, params=a.params, **ctx)
    if not a.skip_ls:
        big_db(a, ctx)
    return 0


if __name__ == "__main__":
    C.run(main)
