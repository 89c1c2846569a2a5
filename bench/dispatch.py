#!/usr/bin/env python3
"""Dispatch capacity: how many tasks per second the server can hand out and record, with agents
started with ``--fake-exec`` (FAKE EXECUTION: the agents run no process at all and report every
task finished at once), so only the server, the protocol and the database are measured.

Interval: the fake agents are started first and wait, connected and idle; the clock starts when
``Client.add_jobs`` has returned for all N jobs (the server sends the first tasks in the same
turn that commits them) and stops when a ``Client.counts()`` poll shows all N jobs final
(JOB_FINISHED persisted). Every task still goes the full way: lease in the database, task
message, the agent's update with the whole state path, the job's state and event rows.

Configurations: database (SQLite, PostgreSQL), number of fake agents, agent ``--prefetch``
(a fake agent finishes tasks the moment they arrive, so its prefetch -- the tasks it may hold
beyond its free cores -- bounds the tasks in flight per round trip; try a deep one, e.g. 256).
Also reported: server and agent CPU seconds during the interval (``server_busy`` near 1.0 means
the single-threaded server is the bottleneck).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402

TARGETS = {"sqlite": 10_000, "postgres": 5_000}
CHUNK = 100_000


def run(a, db: str, n_agents: int, prefetch: int | None, label: str) -> dict:
    n = a.n
    with C.Env(db, a.heartbeat, a.tmp, a.keep, label="dispatch") as env:
        c = env.client
        c.add_app({"name": "noop", "executable": "/bin/true"})
        jobs = [{"name": f"f{i}", "application": "noop"} for i in range(n)]
        for _ in range(n_agents):
            env.start_agent(C.cores_arg(a.agent_cores), prefetch, fake=True)
        env.wait_agents(n_agents)
        # the profile and CPU meter start once the jobs are in: they cover the timed interval
        # (starting py-spy pauses this script for a moment, so --py-spy blurs t1 a little)
        t0 = time.perf_counter()
        for i in range(0, n, CHUNK):
            c.add_jobs(jobs[i:i + CHUNK])
        t1 = time.perf_counter()
        with C.CpuMeter(env) as cpu, C.profile(a, label, C.env_pids(env)):
            t2, counts = C.wait_final(c, n, check=env.check_agents)
        st = c.status()
    ok = counts.get("JOB_FINISHED", 0)
    if ok != n:
        C.log(f"WARNING: only {ok} of {n} jobs finished: {C.counts_line(counts)}")
    return {"tps": n / (t2 - t1), "tps_incl_submit": n / (t2 - t0), "seconds": t2 - t1,
            "submit_seconds": t1 - t0, "finished": ok, "stats": st["stats"], **cpu.summary()}


def main() -> int:
    p = C.parser(__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--n", type=int, default=50_000, help="Tasks (default: %(default)s).")
    p.add_argument("--db", choices=("sqlite", "postgres", "both"), default="both")
    p.add_argument("--agents", default="1,2",
                   help="Comma list of fake-agent counts to try (default: %(default)s).")
    p.add_argument("--prefetch", default="default,256",
                   help="Comma list of agent --prefetch values to try; 'default' = no "
                        "--prefetch flag, the agent's own choice (default: %(default)s).")
    p.add_argument("--agent-cores", help="--cores for each fake agent (its free cores add to "
                                         "its demand): a count or list (default: all ours).")
    a = p.parse_args()
    C.set_bench("dispatch")
    C.install_signal_handlers()
    dbs = ["sqlite", "postgres"] if a.db == "both" else [a.db]
    configs = [(db, k, pf) for db in dbs for k in C.int_list(a.agents)
               for pf in C.prefetch_list(a.prefetch)]
    ctx = C.machine(a.tmp)
    res: dict[int, list[dict]] = {i: [] for i in range(len(configs))}
    for r in range(a.repeat):
        for i, (db, k, pf) in enumerate(configs):
            label = f"dispatch-{db}-a{k}-pf{pf if pf is not None else 'default'}-r{r + 1}"
            out = run(a, db, k, pf, label)
            res[i].append(out)
            C.log(f"repeat {r + 1}/{a.repeat}: {db}, {k} fake agent(s), prefetch {pf}: "
                  f"{out['tps']:,.0f} tasks/s ({out['seconds']:.2f} s; submit "
                  f"{out['submit_seconds']:.2f} s; server busy {out['server_busy'] or 0:.2f}, "
                  f"agents busy {out['agents_busy'] or 0:.2f})")
    for i, (db, k, pf) in enumerate(configs):
        runs = res[i]
        vals = [x["tps"] for x in runs]
        med = C.median(vals)
        C.emit("tasks_per_second", med, unit="tasks/s", values=vals,
               mode="FAKE EXECUTION (agents --fake-exec: no process is spawned; tasks are "
                    "reported finished at once): server + protocol + database only",
               baseline=None, target=TARGETS[db], meets_target=med >= TARGETS[db],
               interval="add_jobs returned (fake agents connected and idle) -> all N "
                        "JOB_FINISHED seen in the DB via Client.counts",
               n=a.n, repeat=a.repeat, db=db, fake_agents=k,
               prefetch=pf if pf is not None else "default",
               **C.run_fields(runs), **ctx)
    return 0


if __name__ == "__main__":
    C.run(main)
