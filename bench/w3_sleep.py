#!/usr/bin/env python3
"""W3: N x ``sleep D`` (default 200 x 0.1 s) on the machine's cores: how close pilotfish gets
to the ideal makespan N*D/cores, against ``xargs -P <cores>`` doing the same in the same run.

Figures (efficiency = ideal makespan / measured interval; 1.0 is perfect):

* ``efficiency_makespan``: the agents' span, first task start -> last task end, both as the
  agents recorded them (``Client.summary()``: min(started), max(ended)). Leaves out getting the
  first task to the agent and reporting the last one back.
* ``efficiency_end_to_end``: ``Client.add_jobs`` returned (agents already connected and idle)
  -> a ``Client.counts()`` poll shows all N jobs JOB_FINISHED in the database.
* ``busy_fraction`` (in the makespan line): core-seconds spent in tasks / (cores x makespan).

The baseline is the wall time of ``xargs -P <cores> -n 1 /bin/sleep`` over N lines "D"; its
efficiency is ideal / that wall time. ``ratio`` = pilotfish efficiency / xargs efficiency.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402

TARGET = 0.97


def run_pilotfish(a, layout: list[list[int]], prefetch: int | None, label: str) -> dict:
    n, d = a.n, a.duration
    with C.Env(a.db, a.heartbeat, a.tmp, a.keep, label="w3") as env:
        c = env.client
        c.add_app({"name": "sleep", "executable": "/bin/sleep", "args": [repr(d)]})
        jobs = [{"name": f"s{i}", "application": "sleep"} for i in range(n)]
        env.start_agents(layout, prefetch)
        env.wait_agents(len(layout))
        with C.profile(a, label, C.env_pids(env)):
            t0 = time.perf_counter()
            c.add_jobs(jobs)
            t1 = time.perf_counter()
            t2, counts = C.wait_final(c, n, check=env.check_agents)
        s = c.summary()
    ok = counts.get("JOB_FINISHED", 0)
    if ok != n:
        C.log(f"WARNING: only {ok} of {n} jobs finished: {C.counts_line(counts)}")
    span = s["last_ended"] - s["first_started"]
    ncores = sum(len(x) for x in layout)
    return {"makespan": span, "e2e": t2 - t1, "e2e_incl_submit": t2 - t0,
            "busy_fraction": s["core_seconds"] / (ncores * span) if span > 0 else None,
            "first_task_latency": s["first_started"] - s["first_created"], "finished": ok}


def main() -> int:
    p = C.parser(__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--n", type=int, default=200, help="Tasks (default: %(default)s).")
    p.add_argument("--duration", type=float, default=0.1,
                   help="Seconds each task sleeps (default: %(default)s).")
    C.add_sweep_args(p)
    p.add_argument("--db", choices=("sqlite", "postgres"), default="sqlite")
    p.add_argument("--no-baseline", action="store_true", help="Skip xargs.")
    a = p.parse_args()
    C.set_bench("w3")
    C.install_signal_handlers()
    cores, configs = C.sweep(a)
    ideal = a.n * a.duration / len(cores)
    ctx = C.machine(a.tmp)
    base: list[float] = []
    res: dict[int, list[dict]] = {i: [] for i in range(len(configs))}
    for r in range(a.repeat):
        if not a.no_baseline:
            dt = C.run_xargs(["/bin/sleep"], [repr(a.duration)] * a.n, len(cores))
            base.append(ideal / dt)
            C.log(f"repeat {r + 1}/{a.repeat}: xargs -P{len(cores)}: {dt:.3f} s, efficiency "
                  f"{ideal / dt:.4f}")
        for i, (mode, layout, pf) in enumerate(configs):
            label = f"w3-{mode}-pf{pf if pf is not None else 'default'}-r{r + 1}"
            out = run_pilotfish(a, layout, pf, label)
            res[i].append(out)
            C.log(f"repeat {r + 1}/{a.repeat}: pilotfish agents={mode} prefetch={pf}: makespan "
                  f"{out['makespan']:.3f} s (eff {ideal / out['makespan']:.4f}), end-to-end "
                  f"{out['e2e']:.3f} s (eff {ideal / out['e2e']:.4f})")
    bmed = C.median(base)
    common = dict(baseline=f"xargs -P{len(cores)} -n 1 /bin/sleep {a.duration!r} (wall time)"
                  if base else None, baseline_value=bmed, baseline_values=base,
                  target=TARGET, ideal_seconds=ideal, n=a.n, duration=a.duration,
                  repeat=a.repeat, db=a.db, cores=len(cores))
    for i, (mode, layout, pf) in enumerate(configs):
        runs = res[i]
        conf = dict(agents=mode, n_agents=len(layout),
                    prefetch=pf if pf is not None else "default")
        vals = [ideal / x["makespan"] for x in runs]
        med = C.median(vals)
        C.emit("efficiency_makespan", med, values=vals, ratio=C.ratio(med, bmed),
               meets_target=med >= TARGET,
               interval="first task start -> last task end, agent timestamps "
                        "(Client.summary first_started, last_ended)",
               seconds=[x["makespan"] for x in runs],
               busy_fraction=C.median([x["busy_fraction"] for x in runs]),
               first_task_latency=[x["first_task_latency"] for x in runs],
               finished=[x["finished"] for x in runs], **conf, **common, **ctx)
        vals = [ideal / x["e2e"] for x in runs]
        med = C.median(vals)
        C.emit("efficiency_end_to_end", med, values=vals, ratio=C.ratio(med, bmed),
               meets_target=med >= TARGET,
               interval="add_jobs returned (agents connected and idle) -> all N JOB_FINISHED "
                        "seen in the DB via Client.counts",
               seconds=[x["e2e"] for x in runs],
               incl_submit_efficiency=C.median([ideal / x["e2e_incl_submit"] for x in runs]),
               **conf, **common, **ctx)
    return 0


if __name__ == "__main__":
    C.run(main)
