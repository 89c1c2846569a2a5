#!/usr/bin/env python3
"""What job_tags (schema 15) costs a submit: ``Client.add_jobs`` of jobs with one tag (a
job_tags row each) against the same jobs without a tag, alternately (ABAB..., ``--rounds``),
into one server and database, on top of ``--base`` jobs already there. One JSON line: wall
and server CPU per job of each, and their ratio. The dispatch path writes no tag.

Usage: bench/tag_write_cost.py [--jobs 20000] [--rounds 4] [--base 200000] [--tmp DIR]
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

import psutil  # noqa: E402


def main() -> int:
    p = C.parser(__doc__.split("\n")[0])
    p.add_argument("--jobs", type=int, default=20_000)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--base", type=int, default=200_000)
    a = p.parse_args()
    C.set_bench("tag_write_cost")
    with C.Env("sqlite", a.heartbeat, a.tmp, a.keep, label="tags") as env:
        c = env.client
        proc = psutil.Process(env.info["pid"])
        c.add_app({"name": "sleep", "executable": "/bin/sleep", "args": ["1"]})
        for s in range(0, a.base, 100_000):
            c.add_jobs([{"name": f"b{i}", "application": "sleep", "tags": ["base"]}
                        for i in range(s, min(a.base, s + 100_000))])
        wall: dict[bool, list] = {True: [], False: []}
        cpu: dict[bool, list] = {True: [], False: []}
        for r in range(a.rounds):
            for tagged in ((True, False) if r % 2 == 0 else (False, True)):
                jobs = [{"name": f"r{r}j{i}", "application": "sleep",
                         **({"tags": ["bench"]} if tagged else {})} for i in range(a.jobs)]
                c0 = sum(proc.cpu_times()[:2])
                t = time.perf_counter()
                c.add_jobs(jobs)
                wall[tagged].append((time.perf_counter() - t) / a.jobs * 1000)
                cpu[tagged].append((sum(proc.cpu_times()[:2]) - c0) / a.jobs * 1000)
        w, wo = statistics.median(wall[True]), statistics.median(wall[False])
        C.emit("add_jobs_ms_per_job_tagged", w, unit="ms", values=wall[True],
               server_cpu_ms=cpu[True], baseline_untagged_ms=wo, baseline_values=wall[False],
               baseline_server_cpu_ms=cpu[False], ratio_untagged_over_tagged=wo / w,
               jobs=a.jobs, rounds=a.rounds, base=a.base, db="sqlite",
               interval="one Client.add_jobs call of --jobs jobs, per job",
               machine=C.machine(a.tmp))
    return 0


if __name__ == "__main__":
    C.run(main)
