#!/usr/bin/env python3
"""Adding workflows: the time the server's loop spends on one ``workflow_add`` of N subjobs
(a fan: one first subjob and N-1 children, then a chain of 100, the deepest allowed), beside
``job_add`` of N plain jobs (the baseline), measured in the same run.

Figures (seconds; ``value`` is the median of ``--repeat`` rounds, each in a fresh server):

* ``workflow_add_seconds`` (``subjobs`` N, ``shape`` fan or chain): ``Client.add_workflow``
  round trip, this process.
* ``job_add_seconds`` (``jobs`` N): ``Client.add_jobs`` of N independent jobs, same server.

Before the subjobs were inserted in one call (parents known from the same request), a
workflow of 1,000 subjobs held the loop 4.7 s (one flush and one parent SELECT per subjob).
"""
from __future__ import annotations

import time

import common as C


def main() -> int:
    p = C.parser(__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--sizes", default="10,100,1000", help="Subjobs per workflow (default: "
                   "%(default)s; at most 1,000, the cap).")
    p.add_argument("--db", choices=("sqlite", "postgres"), default="sqlite")
    a = p.parse_args()
    C.set_bench("workflow_add")
    C.install_signal_handlers()
    ctx = C.machine(a.tmp)
    for n in C.int_list(a.sizes):
        wf, jobs = [], []
        for r in range(a.repeat):
            with C.Env(a.db, a.heartbeat, a.tmp, a.keep, label=f"wf{n}-r{r + 1}") as env:
                c = env.client
                c.add_app({"name": "t", "executable": "/bin/true"})
                t = time.perf_counter()
                c.add_workflow({"name": "w", "subjobs": [
                    {"name": f"s{i}", "application": "t", "parents": [0] if i else []}
                    for i in range(n)]})
                wf.append(time.perf_counter() - t)
                t = time.perf_counter()
                c.add_jobs([{"name": f"j{i}", "application": "t"} for i in range(n)])
                jobs.append(time.perf_counter() - t)
        C.emit("workflow_add_seconds", C.median(wf), subjobs=n, shape="fan", runs=wf,
               db=a.db, **ctx)
        C.emit("job_add_seconds", C.median(jobs), jobs=n, runs=jobs, db=a.db, **ctx)
    chain = []
    for r in range(a.repeat):
        with C.Env(a.db, a.heartbeat, a.tmp, a.keep, label=f"chain-r{r + 1}") as env:
            env.client.add_app({"name": "t", "executable": "/bin/true"})
            t = time.perf_counter()
            env.client.add_workflow({"name": "w", "subjobs": [
                {"name": f"s{i}", "application": "t"} for i in range(100)]})
            chain.append(time.perf_counter() - t)
    C.emit("workflow_add_seconds", C.median(chain), subjobs=100, shape="chain", runs=chain,
           db=a.db, **ctx)
    return 0


if __name__ == "__main__":
    C.run(main)
