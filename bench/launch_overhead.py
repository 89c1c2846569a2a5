#!/usr/bin/env python3
"""Per-task launch overhead on a real Slurm: N single-core ``/bin/true`` tasks started by a
pilot's agents (which fork them locally) vs one ``srun`` job step per task vs ``xargs``.

Each repeat runs three methods, one after the other, on an idle Slurm with 4 (fake) nodes:

* ``pilot``: a 4-node pilot (``sbatch -N 4 --exclusive``; one agent per node, 2 CPUs each) is
  submitted and its agents register and wait, idle; then N jobs of an app ``/bin/true`` are
  added. Interval: ``Client.add_jobs`` returned -> a ``Client.counts()`` poll shows all N jobs
  final (JOB_FINISHED persisted). Also ``agent_span_seconds``: the agents' first task start ->
  last task end (``Client.summary()``).
* ``srun_per_task``: what frameworks that launch every task with srun pay. A batch job of the
  same shape runs ``seq N | xargs -P P -I{} srun --overlap -N1 -n1 -c1 /bin/true`` (P = the
  allocation's CPUs, 8, as many tasks in flight as the pilot has cores); interval: the batch
  script's ``date +%s.%N`` just before -> just after (every step is a job step of slurmctld).
* ``xargs``: ``xargs -P <our cores> -n 1 /bin/true`` on the login node (this machine): the floor.

Figures: one ``tasks_per_second`` line per method (median of the repeats; ``seconds_per_task``
= interval / N). The pilot's line has ``baseline`` = srun per task and ``ratio`` = pilot /
srun (how many times faster), and ``ratio_to_xargs``. The srun line has the CPU seconds per
task of slurmctld and the slurmd daemons (``slurm_cpu_per_task``; the short-lived slurmstepd
processes are not counted) and of the srun clients (``srun_client_cpu_per_task``, bash's
``time``), and the machine's idle cores during the job (near 0: the machine is saturated).

Fake nodes: the 4 nodes are slurmd processes on this 2-core machine, so the pilot's 8 task
slots and the 8 concurrent srun steps all share 2 physical cores, as does slurmctld; on a
real machine slurmctld is elsewhere and each node has its own cores. Each pilot task also gets
a workdir with job.out/job.err (srun and xargs create nothing).
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402

NODES = 4


def run_pilot(a, jobs: C.SlurmJobs, nodes: list[str], r: int) -> dict:
    with C.Env("sqlite", a.heartbeat, a.tmp, a.keep, label="launch") as env, jobs:
        c = env.client
        c.add_app({"name": "true", "executable": "/bin/true"})
        out = env.home / "pilot-%j.out"
        body = C.pilot_body(env.home, env.address, f"--idle-timeout {a.idle_timeout}")
        jid, _, _ = jobs.submit(C.batch_script(body, nodes=NODES, out=out,
                                               name="pf-bench-pilot"))
        pilot = f"slurm-{jid}"
        deadline = time.monotonic() + 120
        while len([x for x in c.agents() if x["pilot"] == pilot]) < NODES:
            if time.monotonic() > deadline or jobs.state(jid) is None:
                raise RuntimeError(f"the 4 agents of {pilot} did not register:\n"
                                   f"{C._tail(Path(str(out).replace('%j', jid)))}")
            time.sleep(0.02)
        time.sleep(0.05)  # the welcome, then each agent's demand: one round trip
        t0 = time.perf_counter()
        c.add_jobs([{"name": f"t{i}", "application": "true"} for i in range(a.n)])
        t1 = time.perf_counter()
        t2, counts = C.wait_final(c, a.n, timeout=600, check=_alive(jobs, jid))
        s = c.summary()
        jobs.wait_gone(jid)  # the agents leave at their idle timeout, then the head
        C.wait_nodes_idle(nodes)
    ok = counts.get("JOB_FINISHED", 0)
    if ok != a.n:
        C.log(f"WARNING: only {ok} of {a.n} jobs finished: {C.counts_line(counts)}")
    return {"seconds": t2 - t1, "incl_submit": t2 - t0, "finished": ok,
            "span": s["last_ended"] - s["first_started"], "job": jid,
            "other_slurm_jobs": jobs.others.get(jid, 0)}


def _alive(jobs: C.SlurmJobs, jid: str):
    """A check for wait_final: raise if the pilot has left. Runs squeue at most every 2 s, so
    the check costs the measured interval (and the 2 cores) next to nothing."""
    last = [time.monotonic()]

    def check() -> None:
        if time.monotonic() - last[0] < 2.0:
            return
        last[0] = time.monotonic()
        if jobs.state(jid) is None:
            raise RuntimeError(f"pilot {jid} ended before its tasks were done")
    return check


def slurm_cpu() -> float:
    """CPU seconds used so far by slurmctld and the slurmd daemons (all on this machine)."""
    import psutil
    total = 0.0
    for p in psutil.process_iter(["name", "cpu_times"]):
        if p.info["name"] in ("slurmctld", "slurmd") and p.info["cpu_times"]:
            total += p.info["cpu_times"].user + p.info["cpu_times"].system
    return total


def run_srun(a, jobs: C.SlurmJobs, nodes: list[str], home: Path) -> dict:
    import psutil
    out = home / "srun-%j.out"
    # bash's `time` also gives the CPU seconds of xargs and the srun clients it waited for
    body = (f'TIMEFORMAT="{C.MARK} cpu %R %U %S"\nt0=$(date +%s.%N)\n'
            f'time (seq {a.n} | xargs -P {a.srun_concurrency} -I{{}} srun --overlap -N1 -n1 '
            f'-c1 /bin/true)\nxrc=$?\n'
            f'echo "{C.MARK} steps $t0 $(date +%s.%N) $xrc"\n(exit $xrc)')
    cpu0, sys0 = slurm_cpu(), psutil.cpu_times()
    w0 = time.perf_counter()
    with jobs:
        jid, _, _ = jobs.submit(C.batch_script(body, nodes=NODES, out=out, name="pf-bench-srun"))
        jobs.wait_gone(jid, timeout=600)
    wall = time.perf_counter() - w0
    cpu1, sys1 = slurm_cpu(), psutil.cpu_times()
    path = Path(str(out).replace("%j", jid))
    m = C.read_marks(path)
    if "steps" not in m or m["steps"][2] != 0:
        raise RuntimeError(f"srun job {jid} failed:\n{C._tail(path)}")
    C.wait_nodes_idle(nodes)
    cpu = m.get("cpu", [None, 0.0, 0.0])
    return {"seconds": m["steps"][1] - m["steps"][0], "slurm_cpu": cpu1 - cpu0,
            "srun_cpu": cpu[1] + cpu[2], "other_slurm_jobs": jobs.others.get(jid, 0),
            "machine_idle_cores": (sys1.idle - sys0.idle) / wall, "job": jid}


def main() -> int:
    p = C.parser(__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--n", type=int, default=200, help="Tasks per method (default: %(default)s).")
    p.add_argument("--srun-concurrency", type=int, default=8,
                   help="srun steps in flight (xargs -P inside the batch job; default: "
                        "%(default)s, the allocation's CPUs).")
    p.add_argument("--idle-timeout", type=float, default=3.0,
                   help="Agents' --idle-timeout: the pilot leaves this long after its tasks "
                        "(default: %(default)s s).")
    a = p.parse_args()
    nodes, ctx = C.start_slurm_bench("launch_overhead", a, NODES)
    cores = len(C.cores_arg(None))
    res: dict[str, list[dict]] = {"pilot": [], "srun_per_task": [], "xargs": []}
    tmp = Path(tempfile.mkdtemp(prefix="pilotfish-bench-launch-", dir=a.tmp))
    if not a.keep:
        C._DEFERRED_RM.append(tmp)
    with C.SlurmJobs() as jobs:
        C.wait_nodes_idle(nodes)
        for r in range(a.repeat):
            dt = C.run_xargs(["/bin/true"], ["x"] * a.n, cores)
            res["xargs"].append({"seconds": dt})
            x = run_pilot(a, jobs, nodes, r)
            res["pilot"].append(x)
            s = run_srun(a, jobs, nodes, tmp)
            res["srun_per_task"].append(s)
            C.log(f"repeat {r + 1}/{a.repeat}: xargs -P{cores} {a.n / dt:.0f} tasks/s; pilot "
                  f"{x['job']} {a.n / x['seconds']:.0f} tasks/s; srun per task (job "
                  f"{s['job']}, -P{a.srun_concurrency}) {a.n / s['seconds']:.1f} tasks/s")
    tps = {k: [a.n / x["seconds"] for x in v] for k, v in res.items()}
    med = {k: C.median(v) for k, v in tps.items()}
    common = dict(n=a.n, nodes=NODES, repeat=a.repeat,
                  slurm_nodes="fake: slurmd processes on this one machine", **ctx)
    C.emit("tasks_per_second", med["pilot"], unit="tasks/s", method="pilot",
           values=tps["pilot"], seconds_per_task=1 / med["pilot"],
           interval="add_jobs returned (4 agents of a 4-node pilot registered and idle) -> "
                    "all N JOB_FINISHED seen in the DB via Client.counts",
           baseline=f"one srun --overlap -N1 -n1 -c1 /bin/true step per task, "
                    f"{a.srun_concurrency} in flight, in a 4-node allocation",
           baseline_value=med["srun_per_task"], ratio=C.ratio(med["pilot"], med["srun_per_task"]),
           ratio_to_xargs=C.ratio(med["pilot"], med["xargs"]),
           seconds=[x["seconds"] for x in res["pilot"]],
           incl_submit_tasks_per_second=C.median([a.n / x["incl_submit"]
                                                  for x in res["pilot"]]),
           agent_span_seconds=[x["span"] for x in res["pilot"]],
           finished=[x["finished"] for x in res["pilot"]], task_slots=NODES * 2,
           other_slurm_jobs=[x["other_slurm_jobs"] for x in res["pilot"]],
           idle_timeout=a.idle_timeout, **common)
    srun = res["srun_per_task"]
    C.emit("tasks_per_second", med["srun_per_task"], unit="tasks/s", method="srun_per_task",
           values=tps["srun_per_task"], seconds_per_task=1 / med["srun_per_task"],
           interval="batch script: date +%s.%N before -> after `seq N | xargs -P P -I{} srun "
                    "--overlap -N1 -n1 -c1 /bin/true`",
           concurrency=a.srun_concurrency, seconds=[x["seconds"] for x in srun],
           slurm_cpu_per_task=C.median([x["slurm_cpu"] / a.n for x in srun]),
           srun_client_cpu_per_task=C.median([x["srun_cpu"] / a.n for x in srun]),
           other_slurm_jobs=[x["other_slurm_jobs"] for x in srun],
           machine_idle_cores=C.median([x["machine_idle_cores"] for x in srun]), **common)
    C.emit("tasks_per_second", med["xargs"], unit="tasks/s", method="xargs",
           values=tps["xargs"], seconds_per_task=1 / med["xargs"],
           interval=f"wall time of xargs -P{cores} -n 1 /bin/true over N lines, login node",
           concurrency=cores, seconds=[x["seconds"] for x in res["xargs"]], **common)
    return 0


if __name__ == "__main__":
    C.run(main)
