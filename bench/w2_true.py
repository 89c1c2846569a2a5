#!/usr/bin/env python3
"""W2: N x /bin/true through pilotfish (server -> agent -> process -> JOB_FINISHED in the
database) against ``xargs -P <cores>`` running the same N /bin/true, measured in the same run.

Interval measured for pilotfish (``--start agents-first``, the default): the agents are
started first and wait, connected and idle; the clock starts when ``Client.add_jobs`` returns
(the server has committed the N jobs and sends the first tasks in the same turn) and stops when
a ``Client.counts()`` poll shows all N jobs final (JOB_FINISHED persisted in the database).
With ``--start jobs-first`` the jobs are submitted first and the clock starts just before the
agent processes are spawned, so the agents' Python start-up and hello are included.
Also reported: the rate including the submission; the agents' own span (first task start to
last task end, from ``Client.summary()``), which leaves out the final report to the server; and
the CPU the server and the agent processes used, as a fraction of the interval (``server_busy``
near 1.0: the single-threaded server is the bottleneck; the tasks' own CPU is not included).

xargs: ``xargs -P <cores> -n 1 /bin/true`` over N input lines, wall time of the whole command.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402

TARGET_RATIO = 0.8


def add_jobs(client, jobs: list[dict], chunk: int = 100_000) -> None:
    for i in range(0, len(jobs), chunk):
        client.add_jobs(jobs[i:i + chunk])


def run_pilotfish(a, layout: list[list[int]], prefetch: int | None, label: str) -> dict:
    n = a.n
    with C.Env(a.db, a.heartbeat, a.tmp, a.keep, label="w2") as env:
        c = env.client
        c.add_app({"name": "true", "executable": "/bin/true"})
        jobs = [{"name": f"t{i}", "application": "true"} for i in range(n)]
        if a.start == "agents-first":
            env.start_agents(layout, prefetch)
            env.wait_agents(len(layout))
            C.settle_disk()
            with C.profile(a, label, C.env_pids(env)), C.CpuMeter(env) as cpu:
                t0 = time.perf_counter()
                add_jobs(c, jobs)
                t1 = time.perf_counter()
                t2, counts = C.wait_final(c, n, check=env.check_agents)
        else:
            C.settle_disk()
            t0 = time.perf_counter()
            add_jobs(c, jobs)
            with C.profile(a, label, {"server": env.server_pid}), C.CpuMeter(env) as cpu:
                t1 = time.perf_counter()
                env.start_agents(layout, prefetch)
                t2, counts = C.wait_final(c, n, check=env.check_agents)
        s = c.summary()
        status = c.status()
    ok = counts.get("JOB_FINISHED", 0)
    if ok != n:
        C.log(f"WARNING: only {ok} of {n} jobs finished: {C.counts_line(counts)}")
    span = (s["last_ended"] or 0) - (s["first_started"] or 0)
    return {"tps": n / (t2 - t1), "tps_incl_submit": n / (t2 - t0), "seconds": t2 - t1,
            "submit_seconds": t1 - t0 if a.start == "agents-first" else None,
            "agent_span_tps": n / span if span > 0 else None, "finished": ok,
            "dispatched": status["stats"]["dispatched"], **cpu.summary()}


def main() -> int:
    p = C.parser(__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--n", type=int, default=10_000, help="Tasks (default: %(default)s).")
    C.add_sweep_args(p)
    p.add_argument("--start", choices=("agents-first", "jobs-first"), default="agents-first",
                   help="What is already there when the clock starts (default: %(default)s).")
    p.add_argument("--db", choices=("sqlite", "postgres"), default="sqlite")
    p.add_argument("--no-baseline", action="store_true", help="Skip xargs.")
    a = p.parse_args()
    C.set_bench("w2")
    C.install_signal_handlers()
    cores, configs = C.sweep(a)
    ctx = C.machine(a.tmp, workdirs=True)
    base: list[float] = []
    res: dict[int, list[dict]] = {i: [] for i in range(len(configs))}
    for r in range(a.repeat):
        if not a.no_baseline:
            C.settle_disk()
            dt = C.run_xargs(["/bin/true"], ["x"] * a.n, len(cores))
            base.append(a.n / dt)
            C.log(f"repeat {r + 1}/{a.repeat}: xargs -P{len(cores)}: {a.n / dt:,.0f} tasks/s")
        for i, (mode, layout, pf) in enumerate(configs):
            label = f"w2-{mode}-pf{pf if pf is not None else 'default'}-r{r + 1}"
            out = run_pilotfish(a, layout, pf, label)
            res[i].append(out)
            C.log(f"repeat {r + 1}/{a.repeat}: pilotfish agents={mode} prefetch={pf}: "
                  f"{out['tps']:,.0f} tasks/s ({out['seconds']:.2f} s; incl. submit "
                  f"{out['tps_incl_submit']:,.0f}/s; "
                  f"agent span {out['agent_span_tps'] or 0:,.0f}/s)")
    bmed = C.median(base)
    interval = ("add_jobs returned (agents already connected and idle) -> all N JOB_FINISHED "
                "seen in the DB via Client.counts" if a.start == "agents-first" else
                "agent processes spawned (jobs already submitted) -> all N JOB_FINISHED seen in "
                "the DB via Client.counts")
    for i, (mode, layout, pf) in enumerate(configs):
        runs = res[i]
        vals = [x["tps"] for x in runs]
        med = C.median(vals)
        paired = [x["tps"] / b for x, b in zip(runs, base)] if base else []
        C.emit("tasks_per_second", med, unit="tasks/s", values=vals,
               baseline=f"xargs -P{len(cores)} -n 1 /bin/true" if base else None,
               baseline_value=bmed, baseline_values=base, ratio=C.ratio(med, bmed),
               paired_ratios=paired, target_ratio=TARGET_RATIO,
               meets_target=(C.ratio(med, bmed) or 0) >= TARGET_RATIO if base else None,
               interval=interval, start=a.start, n=a.n, repeat=a.repeat, db=a.db,
               cores=len(cores), agents=mode, n_agents=len(layout),
               prefetch=pf if pf is not None else "default",
               agent_span_tasks_per_second=C.median([x["agent_span_tps"] for x in runs]),
               **C.run_fields(runs), **ctx)
    return 0


if __name__ == "__main__":
    C.run(main)
