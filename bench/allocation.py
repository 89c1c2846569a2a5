#!/usr/bin/env python3
"""Allocation efficiency of a pilot on a real Slurm: of the core-seconds a 4-node pilot holds
(from its batch script's start to its end), how many did tasks use?

Each repeat: a fresh server gets N jobs of ``sleep D`` (default 400 x 0.2 s; sleep uses no CPU,
so the 8 CPUs that 4 fake nodes x 2 CPUs have only on paper can all be "busy" at once) and,
with ``--mpi-jobs K``, K 2-node jobs of 2 ranks per node (``sleep D`` through the pilot's srun).
Then one pilot (``sbatch -N 4 --exclusive``, agents with ``--idle-timeout T``, default 2 s)
is submitted and runs them all; it ends by itself when its agents have been idle for T.

Clocks: the batch script prints ``date +%s.%N`` as its first line (allocation start) and again
after the pilot head has exited (allocation end); the benchmark also records when the job left
``squeue`` (polled every 50 ms; ``squeue_end_seconds``). Task times are the agents' own
(``Client.summary()``: busy core-seconds = sum over jobs of (ended - started) x cores).

Figures (8 allocated CPUs = 4 nodes x 2):

* ``allocation_efficiency``: busy core-seconds / (8 x (allocation end - start)). Baseline: the
  ideal makespan, total work / 8 CPUs (N x D / 8 for sleeps); ``ratio`` = ideal makespan /
  allocation wall time (1.0: the allocation lasted exactly as long as the work needs on 8
  CPUs, no ramp-up, no tail, no drain). Busy core-seconds are a little above the nominal work
  (each task's time includes its fork and exec).
* ``efficiency_excl_idle_timeout``: the same with T taken off the allocation's wall time.
* ``makespan_efficiency``: busy core-seconds / (8 x (first task start -> last task end));
  ``ratio`` = ideal makespan / measured makespan.
* ``rampup_seconds``: allocation start -> first task started (also -> all agents registered).
* ``drain_seconds``: last task end -> allocation end (dominated by T; ``drain_minus_idle``).

``--site-agent`` (what a user gets, issue 16 target 7): the pilots come from ``pilotfish site
agent --site benchslurm`` (the localslurm profile, defaults as shipped: 2-node pilots, at most 4
nodes, the agent's default poll of 10 s), started on an empty queue; the N jobs are added a
random 0..10 s after its first round (as a user's would come at any moment of its poll). Each
repeat runs, each on a fresh server: the hand-submitted 4-node pilot above (the baseline), the
site agent as it was before pilots left on the server's word (``--quick 0``, profile
``leave_when_no_work: never``: agents leave at the profile's 10 s idle timeout; "old"), and the
site agent as shipped ("new"). Allocation of a site agent's pilots: every batch job's
RUNNING -> gone in squeue (polled every 0.1 s) x its nodes x CPUs per node. Figures:
``site_agent_allocation_efficiency`` (value: new; baseline: the hand-submitted pilot's
efficiency measured the same way, squeue RUNNING -> gone; ``old`` alongside),
``site_agent_rampup_seconds`` (jobs added -> first task started), ``site_agent_drain_seconds``
(last task end -> the last pilot gone from squeue).

Fake nodes: 4 slurmd processes on one 2-core machine. The tasks sleep, so 8 can run at once,
but everything else (agents, server, srun, slurmctld) shares 2 physical cores.
"""
from __future__ import annotations

import random
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402

NODES = 4
#: ``pilotfish site agent``'s default --poll (s): the jobs of a --site-agent run come a random
#: 0..POLL s after its first round
POLL = 10.0


def run_once(a, nodes: list[str], r: int) -> dict:
    with C.Env("sqlite", a.heartbeat, a.tmp, a.keep, label="alloc") as env, \
            C.SlurmJobs() as jobs:
        c = env.client
        c.add_app({"name": "sleep", "executable": "/bin/sleep", "args": [repr(a.duration)]})
        specs = [{"name": f"s{i}", "application": "sleep"} for i in range(a.n)]
        specs += [{"name": f"m{i}", "application": "sleep", "num_nodes": 2,
                   "processes_per_node": 2} for i in range(a.mpi_jobs)]
        c.add_jobs(specs)
        out = env.home / "pilot-%j.out"
        body = C.pilot_body(env.home, env.address, f"--idle-timeout {a.idle_timeout}")
        jid, t_sub, _ = jobs.submit(C.batch_script(body, nodes=NODES, out=out,
                                                   name="pf-bench-alloc"))
        t_gone = jobs.wait_gone(jid, timeout=a.timeout)
        path = Path(str(out).replace("%j", jid))
        m = C.read_marks(path)
        counts = c.counts()
        s = c.summary()
        agents = [x for x in c.agents(all=True) if x["pilot"] == f"slurm-{jid}"]
        C.wait_nodes_idle(nodes)
        others = jobs.others.get(jid, 0)
    if "start" not in m or "end" not in m:
        raise RuntimeError(f"pilot {jid}: no start/end marks:\n{C._tail(path)}")
    if m["end"][1] != 0:
        C.log(f"WARNING: pilot {jid} exited with {m['end'][1]:.0f}:\n{C._tail(path)}")
    ok = counts.get("JOB_FINISHED", 0)
    if ok != len(specs):
        C.log(f"WARNING: {ok} of {len(specs)} jobs finished: {C.counts_line(counts)}")
    t0, t1 = m["start"][0], m["end"][0]
    return {"start": t0, "end": t1, "wall": t1 - t0, "squeue_wall": t_gone - t0,
            "submit_to_start": t0 - t_sub, "busy": s["core_seconds"],
            "first_started": s["first_started"], "last_ended": s["last_ended"],
            "agents_registered": max(x["started"] for x in agents) - t0 if agents else None,
            "agents": len(agents), "finished": ok, "job": jid, "other_slurm_jobs": others}


class SqueueWatch:
    """Every batch job's first RUNNING and first gone-after-running times, from squeue polls."""

    def __init__(self, every: float = 0.1) -> None:
        self.every = every
        self.running: dict[str, float] = {}
        self.nodes: dict[str, int] = {}
        self.gone: dict[str, float] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "SqueueWatch":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(5)

    def _run(self) -> None:
        while not self.stop.is_set():
            out = subprocess.run(["squeue", "-h", "-o", "%i %T %D"], capture_output=True,
                                 text=True, timeout=20).stdout
            now = time.time()
            seen = set()
            for line in out.splitlines():
                f = line.split()
                if len(f) == 3 and f[1] in ("RUNNING", "COMPLETING"):
                    seen.add(f[0])
                    self.running.setdefault(f[0], now)
                    self.nodes[f[0]] = int(f[2])
                elif len(f) == 3:
                    seen.add(f[0])
            for jid in self.running:
                if jid not in seen:
                    self.gone.setdefault(jid, now)
            self.stop.wait(self.every)

    def span(self, jid: str) -> tuple[float, float] | None:
        if jid in self.running and jid in self.gone:
            return self.running[jid], self.gone[jid]
        return None


def run_site_agent(a, nodes: list[str], old: bool) -> dict:
    """The site agent from an empty queue; the N jobs added once it runs."""
    with C.Env("sqlite", a.heartbeat, a.tmp, a.keep, label="alloc-site") as env, \
            SqueueWatch() as watch:
        c = env.client
        (env.home / "sites").mkdir(exist_ok=True)
        (env.home / "sites" / "benchslurm.yaml").write_text(
            "extends: localslurm\n" + ("pilot: {leave_when_no_work: never}\n" if old else ""))
        c.add_app({"name": "sleep", "executable": "/bin/sleep", "args": [repr(a.duration)]})
        log = open(env.home / "site-agent.log", "ab")
        argv = [sys.executable, "-m", "pilotfish", "--home", str(env.home), "--server",
                env.address, "site", "agent", "--site", "benchslurm", "-v"]
        if old:
            argv += ["--quick", "0"]
        agent = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        log.close()
        try:
            # from an empty queue: the site agent has done its first round and found nothing;
            # the jobs come at a random moment of its poll, as a user's would
            deadline = time.time() + 60
            while not any(x["name"] == "benchslurm" for x in c.sites()):
                if time.time() > deadline or agent.poll() is not None:
                    raise RuntimeError(f"the site agent did not report; see {env.home}")
                time.sleep(0.05)
            delay = random.uniform(0, POLL)
            time.sleep(delay)
            t0 = time.time()
            c.add_jobs([{"name": f"s{i}", "application": "sleep"} for i in range(a.n)])
            C.wait_final(c, a.n, timeout=a.timeout)
            deadline = time.time() + a.timeout
            while time.time() < deadline:
                pilots = [p for p in c.pilots(all=True, site="benchslurm") if p["batch_id"]]
                if pilots and all(p["batch_id"] in watch.gone or
                                  (p["state"] in ("CANCELLED",) and
                                   p["batch_id"] not in watch.running) for p in pilots):
                    break
                time.sleep(0.2)
            time.sleep(0.3)
        finally:
            agent.terminate()
            agent.wait(20)
        pilots = [p for p in c.pilots(all=True, site="benchslurm") if p["batch_id"]]
        s = c.summary()
        counts = c.counts()
        C.wait_nodes_idle(nodes)
    spans = {p["batch_id"]: watch.span(p["batch_id"]) for p in pilots}
    alloc = sum((sp[1] - sp[0]) * watch.nodes[j] * a.cpus for j, sp in spans.items() if sp)
    return {"busy": s["core_seconds"], "alloc": alloc, "eff": s["core_seconds"] / alloc,
            "t0": t0, "first_started": s["first_started"], "last_ended": s["last_ended"],
            "rampup": s["first_started"] - t0,
            "drain": max(sp[1] for sp in spans.values() if sp) - s["last_ended"],
            "delay": delay, "pilots": len(pilots),
            # other users' batch jobs that ran meanwhile (they may have held the nodes)
            "others": sorted(j for j in watch.running if j not in spans),
            "ran": sum(1 for sp in spans.values() if sp),
            "finished": counts.get("JOB_FINISHED", 0),
            "first_running": min(sp[0] for sp in spans.values() if sp) - t0}


def main() -> int:
    p = C.parser(__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--n", type=int, default=400,
                   help="Single-core tasks (default: %(default)s).")
    p.add_argument("--duration", type=float, default=0.2,
                   help="Seconds each task sleeps (default: %(default)s).")
    p.add_argument("--mpi-jobs", type=int, default=0,
                   help="Also K 2-node jobs of 2 ranks per node, each sleeping --duration "
                        "(started with srun by the agents; default: %(default)s).")
    p.add_argument("--idle-timeout", type=float, default=2.0,
                   help="Agents' --idle-timeout (default: %(default)s s).")
    p.add_argument("--cpus", type=int, default=2,
                   help="CPUs per node, for the allocated core-seconds (default: "
                        "%(default)s, the fake nodes').")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="Seconds to wait for a pilot to end (default: %(default)s).")
    p.add_argument("--site-agent", action="store_true",
                   help="Measure pilots provisioned by the site agent (old and new), the "
                        "hand-submitted pilot as the baseline (see below).")
    a = p.parse_args()
    nodes, ctx = C.start_slurm_bench("allocation", a, NODES)
    if a.site_agent:
        return main_site_agent(a, nodes, ctx)
    cpus = NODES * a.cpus
    work = a.n * a.duration + a.mpi_jobs * a.duration * 2 * 2
    ideal = work / cpus
    runs: list[dict] = []
    C.wait_nodes_idle(nodes)
    for r in range(a.repeat):
        x = run_once(a, nodes, r)
        x["span"] = x["last_ended"] - x["first_started"]
        x["eff"] = x["busy"] / (cpus * x["wall"])
        x["eff_excl"] = x["busy"] / (cpus * (x["wall"] - a.idle_timeout))
        x["eff_span"] = x["busy"] / (cpus * x["span"])
        x["rampup"] = x["first_started"] - x["start"]
        x["drain"] = x["end"] - x["last_ended"]
        runs.append(x)
        C.log(f"repeat {r + 1}/{a.repeat}: pilot {x['job']}: allocation {x['wall']:.2f} s "
              f"(ideal makespan {ideal:.2f} s), efficiency {x['eff']:.3f}, excl. idle timeout "
              f"{x['eff_excl']:.3f}, makespan {x['span']:.2f} s ({x['eff_span']:.3f}), "
              f"ramp-up {x['rampup']:.2f} s, drain {x['drain']:.2f} s")

    def col(k: str) -> list:
        return [x[k] for x in runs]

    common = dict(n=a.n, duration=a.duration, mpi_jobs=a.mpi_jobs, idle_timeout=a.idle_timeout,
                  allocated_cpus=cpus, nodes=NODES, work_core_seconds=work,
                  ideal_seconds=ideal, repeat=a.repeat, finished=col("finished"),
                  other_slurm_jobs=col("other_slurm_jobs"),
                  slurm_nodes="fake: slurmd processes on this one machine", **ctx)
    base = dict(baseline=f"ideal makespan: total work / {cpus} CPUs", baseline_value=ideal)
    v = col("eff")
    C.emit("allocation_efficiency", C.median(v), values=v,
           interval="batch script start (date +%s.%N, its first line) -> its last line, "
                    "printed after the pilot head exited",
           end_source="batch script's last line (date +%s.%N after the head exited)",
           allocation_seconds=col("wall"), squeue_end_seconds=col("squeue_wall"),
           busy_core_seconds=col("busy"),
           ratio=C.median([ideal / w for w in col("wall")]),
           submit_to_start_seconds=col("submit_to_start"), **base, **common)
    v = col("eff_excl")
    C.emit("efficiency_excl_idle_timeout", C.median(v), values=v,
           interval="as allocation_efficiency, with the agents' idle timeout taken off the "
                    "allocation's wall time", **base, **common)
    v = col("eff_span")
    med = C.median(col("span"))
    C.emit("makespan_efficiency", C.median(v), values=v,
           interval="first task start -> last task end (agents' timestamps, Client.summary)",
           makespan_seconds=col("span"), ratio=C.ratio(ideal, med), **base, **common)
    v = col("rampup")
    C.emit("rampup_seconds", C.median(v), unit="s", values=v,
           interval="batch script start -> first task started (agent's timestamp)",
           agents_registered_seconds=col("agents_registered"), **common)
    v = col("drain")
    C.emit("drain_seconds", C.median(v), unit="s", values=v,
           interval="last task end (agent's timestamp) -> batch script's last line (after "
                    "the pilot head exited)",
           drain_minus_idle=C.median([d - a.idle_timeout for d in v]),
           squeue_drain_seconds=[x["squeue_wall"] + x["start"] - x["last_ended"]
                                 for x in runs], **common)
    return 0



def main_site_agent(a, nodes: list[str], ctx: dict) -> int:
    cpus = NODES * a.cpus
    hand, old, new = [], [], []
    for r in range(a.repeat):
        C.wait_nodes_idle(nodes)
        x = run_once(a, nodes, r)
        busy, wall = x["busy"], x["squeue_wall"]
        hand.append(busy / (cpus * wall))
        C.log(f"repeat {r + 1}: hand-submitted pilot: {hand[-1]:.3f} (squeue RUNNING -> gone "
              f"{wall:.1f} s; script {x['wall']:.1f} s)")
        for label, out in (("old", old), ("new", new)):
            y = run_site_agent(a, nodes, old=label == "old")
            out.append(y)
            C.log(f"repeat {r + 1}: site agent ({label}): efficiency {y['eff']:.3f} "
                  f"({y['busy']:.0f} busy / {y['alloc']:.0f} allocated core-s; {y['pilots']} "
                  f"pilots, {y['ran']} ran), jobs added -> first pilot running "
                  f"{y['first_running']:.1f} s, -> first task {y['rampup']:.1f} s, drain "
                  f"{y['drain']:.1f} s, {y['finished']} of {a.n} finished"
                  + (f"; other Slurm jobs ran meanwhile: {y['others']}" if y["others"] else ""))
    common = dict(n=a.n, duration=a.duration, idle_timeout_hand=a.idle_timeout,
                  site="localslurm profile as shipped (2-node pilots, 4 nodes at most, idle "
                       "timeout 10 s)", repeat=a.repeat, slurm_nodes="fake: slurmd processes "
                  "on this one machine", **ctx)

    def col(rows: list[dict], k: str) -> list:
        return [y[k] for y in rows]

    C.emit("site_agent_allocation_efficiency", C.median(col(new, "eff")),
           values=col(new, "eff"), old=C.median(col(old, "eff")), old_values=col(old, "eff"),
           baseline="one hand-submitted 4-node pilot (idle timeout "
                    f"{a.idle_timeout:g} s), squeue RUNNING -> gone",
           baseline_value=C.median(hand), baseline_values=hand,
           ratio=C.ratio(C.median(col(new, "eff")), C.median(hand)),
           interval="each pilot's batch job RUNNING -> gone in squeue (0.1 s polls) x nodes x "
                    "CPUs; busy: the agents' task times (Client.summary)",
           busy_core_seconds=col(new, "busy"), allocated_core_seconds=col(new, "alloc"),
           pilots=col(new, "pilots"), finished=col(new, "finished"),
           other_slurm_jobs=[len(y["others"]) for y in new],
           old_other_slurm_jobs=[len(y["others"]) for y in old], **common)
    C.emit("site_agent_rampup_seconds", C.median(col(new, "rampup")), unit="s",
           values=col(new, "rampup"), old=C.median(col(old, "rampup")),
           first_pilot_running=col(new, "first_running"),
           old_values=col(old, "rampup"), jobs_added_after_first_round=col(new, "delay"),
           old_jobs_added_after_first_round=col(old, "delay"),
           interval="jobs added (site agent already running) -> first task started", **common)
    C.emit("site_agent_drain_seconds", C.median(col(new, "drain")), unit="s",
           values=col(new, "drain"), old=C.median(col(old, "drain")),
           old_values=col(old, "drain"),
           interval="last task end -> the last pilot gone from squeue", **common)
    return 0


if __name__ == "__main__":
    C.run(main)
