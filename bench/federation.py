#!/usr/bin/env python3
"""Federation overhead: a central server forwards the subjobs of N Argo jobs (2 subjobs each,
site A then site B, with input and output URLs) to two site servers over the real RabbitMQ
(tests/fed_world.py: each site its own home, SQLite database, agent and AMQP bridge).

Figures (seconds, from the three databases' own timestamps after every workflow reached
HISTORY; ``value`` is the p50, ``p99`` beside it; one line each):

* ``forward_to_remote_ready``: the central leased the step to the site (``jobs.run_leased``)
  -> the site server had it READY (its first job event).
* ``remote_ready_to_status_back``: the site had it READY -> its status message was applied at
  the central (``jobs.remote_accepted``).
* ``forwarded_step_round_trip``: the sum of both (forward -> remote READY -> status back).
* ``finish_status_lag``: the site's JOB_FINISHED event -> the central's mirrored JOB_FINISHED.
* ``fence_start_wait``: the site had it READY (held) -> its agent had it STAGED_IN: the
  central's start (the fence's second round trip) plus the site's own dispatch.
* ``forward_to_site_start``: the central leased the step -> the site's agent had it STAGED_IN
  (all that forwarding costs before a step starts).
* ``local_dispatch_baseline``: in the same run, after the workflows: jobs added straight to
  site A (not forwarded, not held), READY -> STAGED_IN on its own agent.
* ``serial_forward_to_site_start``: then ``--serial`` jobs forwarded to an idle site B one at
  a time (the next once the last finished): the central leased it -> B's agent had it
  STAGED_IN: forward, B's READY status back, the central's start, B's dispatch, without
  queueing (the 50 workflows' figures above include waiting for B's cores);
  ``serial_local_baseline``: as many jobs added straight to B one at a time, READY ->
  STAGED_IN. Their difference is what forwarding with the fence costs a step.

``--slurm-b``: site B's agents are a pilot of the local Slurm (4 fake nodes), as in the paper's
Figure 1 (scripts/slurm_up).
"""
from __future__ import annotations

import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import common as C  # noqa: E402
from pilotfish.server.states import via_names  # noqa: E402


def pct(xs: list[float], p: float) -> float | None:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] if xs else None


def events(db: Path) -> dict[int, dict[str, float]]:
    con = sqlite3.connect(db)
    out: dict[int, dict[str, float]] = {}
    for job, via, to, t in con.execute("SELECT job_id, via, to_state, time FROM job_events "
                                       "ORDER BY id"):
        for state in [*via_names(via), to]:  # passed through at that time
            out.setdefault(job, {}).setdefault(state, t)
    con.close()
    return out


def main() -> int:
    p = C.parser(__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--workflows", type=int, default=50)
    p.add_argument("--slurm-b", action="store_true", help="site B's agents: a Slurm pilot")
    p.add_argument("--local-jobs", type=int, default=50, help="jobs of the local baseline")
    p.add_argument("--serial", type=int, default=10, help="jobs forwarded one at a time")
    a = p.parse_args()
    C.set_bench("federation")
    from fed_world import Federation, until
    with tempfile.TemporaryDirectory(dir=a.tmp) as tmp:
        f = Federation(Path(tmp), silent_after=30, slurm_b=a.slurm_b)
        try:
            if a.slurm_b:
                with f.sites["B"]["server"].client() as sc:
                    until(lambda: len(sc.agents()) >= f.slurm_nodes, 300,
                          "the Slurm pilot's agents at site B")
            f.wait_healthy(["A", "B"])
            c = f.central.client()
            t0 = time.time()
            ids = []
            for i in range(a.workflows):
                (f.data / f"in{i}").mkdir(parents=True, exist_ok=True)
                (f.data / f"in{i}" / "input.dat").write_text(f"input {i}\n")
                ids.append(c.add_workflow({
                    "name": f"argo-{i}", "input_url": str(f.data / f"in{i}"),
                    "output_url": str(f.data / f"out{i}"),
                    "subjobs": [{"name": f"step{k}", "application": "stamp",
                                 "parameters": {"msg": f"w{i}s{k}"}, "site": s}
                                for k, s in enumerate("AB")]})["id"])
            C.log(f"{len(ids)} workflows added; waiting for HISTORY")
            until(lambda: sum(w["state"] == "HISTORY" for w in c.workflows(limit=10_000))
                  == len(ids), 1800, "every workflow in HISTORY")
            wall = time.time() - t0
            c.close()
            with f.sites["A"]["server"].client() as sa:
                local = sa.add_jobs([{"name": f"local{i}", "application": "stamp",
                                      "parameters": {"msg": f"l{i}"}}
                                     for i in range(a.local_jobs)])
                until(lambda: sa.counts({"ids": local}).get("JOB_FINISHED") == len(local),
                      300, "the local jobs finished")
            c = f.central.client()
            serial = []
            for i in range(a.serial):
                serial.append(c.add_job(name=f"serial{i}", application="stamp",
                                        parameters={"msg": f"s{i}"}, site="B"))
                until(lambda: c.job(serial[-1])["state"] == "JOB_FINISHED", 60,
                      "a serial forwarded job finished")
            c.close()
            with f.sites["B"]["server"].client() as sb:
                for i in range(a.serial):
                    j = sb.add_job(name=f"slocal{i}", application="stamp",
                                   parameters={"msg": f"sl{i}"})
                    until(lambda: sb.job(j)["state"] == "JOB_FINISHED", 60,
                          "a serial local job finished")
        finally:
            f.close()
        central = sqlite3.connect(f.central_home / "pilotfish.db")
        leased = {j: (t, acc) for j, t, acc in central.execute(
            "SELECT id, run_leased, remote_accepted FROM jobs")}
        central.close()
        cev = events(f.central_home / "pilotfish.db")
        fwd, back, rt, lag, base, fence, start = [], [], [], [], [], [], []
        s_fwd, s_base = [], []
        for site in ("A", "B"):
            db = f.sites[site]["home"] / "pilotfish.db"
            sev = events(db)
            con = sqlite3.connect(db)
            for rid, argo, name in con.execute("SELECT id, argo_job_id, name FROM jobs"):
                if argo is None:  # the local baselines'
                    (s_base if name.startswith("slocal") else base).append(
                        sev[rid]["STAGED_IN"] - sev[rid]["READY"])
                    continue
                job = int(argo.split(":")[2])
                if name.startswith("serial"):
                    s_fwd.append(sev[rid]["STAGED_IN"] - leased[job][0])
                    continue
                t_lease, t_acc = leased[job]
                ready = sev[rid].get("READY")
                fwd.append(ready - t_lease)
                back.append(t_acc - ready)
                rt.append(t_acc - t_lease)
                lag.append(cev[job]["JOB_FINISHED"] - sev[rid]["JOB_FINISHED"])
                fence.append(sev[rid]["STAGED_IN"] - ready)
                start.append(sev[rid]["STAGED_IN"] - t_lease)
            con.close()
    ctx = {"workflows": a.workflows, "steps": len(rt), "wall_seconds": wall,
           "site_b": "slurm" if a.slurm_b else "local agent"}
    for name, xs in (("forward_to_remote_ready", fwd), ("remote_ready_to_status_back", back),
                     ("forwarded_step_round_trip", rt), ("finish_status_lag", lag),
                     ("fence_start_wait", fence), ("forward_to_site_start", start),
                     ("local_dispatch_baseline", base),
                     ("serial_forward_to_site_start", s_fwd),
                     ("serial_local_baseline", s_base)):
        C.emit(name, pct(xs, 50), p99=pct(xs, 99), unit="seconds", **ctx)
    return 0


if __name__ == "__main__":
    C.run(main)
