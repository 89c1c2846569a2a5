#!/usr/bin/env python3
"""Pilot ramp-up on a real Slurm: how long a 4-node pilot takes from its batch script's start to
all 4 node agents registered with the server, against what Slurm's own launcher costs.

Each repeat submits, to an idle Slurm, (1) a baseline batch job and (2) a pilot, both
``sbatch -N 4 --exclusive``, one after the other (each waits for the nodes to be idle again).
Both scripts print ``date +%s.%N`` as their first line; the clock starts there.

Figures:

* ``rampup_seconds``: pilot script start -> the last of the 4 agents registered, from the
  ``started`` time the server records when it handles an agent's hello (``Client.agents``).
  Baseline: ``srun -N 4 --ntasks-per-node=1 -c C --cpu-bind=none /bin/true`` in the baseline
  allocation (the same options as the head's srun): the launcher's own cost. ``ratio`` =
  pilot / baseline. Extra fields: every agent's registration time by node, the ramp-up seen
  by polling ``Client.agents()`` every 10 ms (``polled_seconds``), and where the time goes
  (``breakdown``, from the head's and agents' log lines, millisecond resolution):
  ``head_start`` (script start -> the head runs srun: interpreter, imports, plan),
  ``agent_start_first`` / ``_last`` (the head runs srun -> the first / last agent process logs
  its start: srun, interpreter, imports), ``hello_max`` (an agent's start line -> the server
  records its hello; the largest of the 4). The baseline job also
  times ``srun ... python -c pass`` (``srun_python_seconds``), ``srun ... python -c 'import
  <what an agent imports>'`` (``srun_imports_seconds``) and the head's plan alone
  (``pilot run --dry-run``, ``head_dry_run_seconds``).
* ``submit_to_start_seconds``: ``sbatch`` called -> pilot script start (Slurm's scheduling and
  job launch; the same for any batch job); baseline: the same for the baseline jobs. slurmctld
  starts batch jobs on a periodic scheduling pass (every 3 s on this Slurm, on a fixed grid:
  see "sched: Allocate" in its log), so submit -> start is mostly the wait for the next pass,
  0 to 3 s depending on when sbatch ran. A benchmark loop of fixed rhythm locks onto that grid
  (without jitter we saw 0.45 s for every baseline job and 2.4 s for every pilot), so each
  sbatch comes after a random 0..``--jitter`` s sleep: the median is then the expected wait
  of a job submitted at a random time (about half the period, plus the batch launch), the same
  for pilot and baseline jobs. It says nothing about pilotfish.

Fake nodes: node1..node4 are slurmd processes on this one machine, so 4 agents start Python
on the same 2 cores at once; on real nodes each has its own cores (and often a slower shared
file system to import from).
"""
from __future__ import annotations

import random
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402

NODES = 4
_LOGTIME = r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3})"
_HEAD_LAUNCH = re.compile(_LOGTIME + r" INFO pilotfish\.pilot: pilot \S+: starting agents: (.*)")
_AGENT_START = re.compile(_LOGTIME + r" INFO pilotfish\.agent: agent ([0-9a-f]+): \d+ cores")
IMPORTS = "import pilotfish.cli, pilotfish.pilot.cli, pilotfish.pilot.agent, zmq"


def log_time(date: str, ms: str) -> float:
    """A logging asctime (local time, millisecond resolution) as epoch seconds."""
    return time.mktime(time.strptime(date, "%Y-%m-%d %H:%M:%S")) + int(ms) / 1000


def baseline_body(cpus: int) -> str:
    srun = f"srun -N {NODES} --ntasks-per-node=1 -c {cpus} --cpu-bind=none"
    py = sys.executable
    steps = [("srun_true", f"{srun} /bin/true"),
             ("srun_python", f"{srun} {py} -c pass"),
             ("srun_imports", f"{srun} {py} -c '{IMPORTS}'"),
             ("head_dry_run", f"{py} -m pilotfish pilot run --server tcp://127.0.0.1:1 "
                              f"--mpi pmi2 --dry-run --json > /dev/null")]
    lines = []
    for name, cmd in steps:
        lines += [f't0=$(date +%s.%N); {cmd} || exit $?',
                  f'echo "{C.MARK} {name} $t0 $(date +%s.%N)"']
    return "\n".join(lines)


def run_baseline(a, jobs: C.SlurmJobs, home: Path, nodes: list[str], r: int) -> dict:
    out = home / f"baseline-{r}-%j.out"
    time.sleep(random.uniform(0, a.jitter))
    jid, t_sub, dt_sub = jobs.submit(C.batch_script(baseline_body(a.cpus), nodes=NODES, out=out,
                                                    name="pf-bench-baseline"))
    jobs.wait_gone(jid)
    path = Path(str(out).replace("%j", jid))
    m = C.read_marks(path)
    if "end" not in m or m["end"][1] != 0:
        raise RuntimeError(f"baseline job {jid} failed:\n{C._tail(path)}")
    C.wait_nodes_idle(nodes)
    res = {k: v[1] - v[0] for k, v in m.items() if len(v) == 2 and k != "end"}
    res["submit_to_start"] = m["start"][0] - t_sub
    res["other_slurm_jobs"] = jobs.others.get(jid, 0)
    return res


def run_pilot(a, env: C.Env, jobs: C.SlurmJobs, nodes: list[str], r: int) -> dict:
    c = env.client
    out = env.home / f"pilot-{r}-%j.out"
    body = C.pilot_body(env.home, env.address, f"--idle-timeout {a.idle_timeout}")
    time.sleep(random.uniform(0, a.jitter))
    jid, t_sub, dt_sub = jobs.submit(C.batch_script(body, nodes=NODES, out=out,
                                                    name="pf-bench-pilot"))
    pilot = f"slurm-{jid}"
    polled = None
    deadline = time.monotonic() + a.timeout
    while time.monotonic() < deadline:
        mine = [x for x in c.agents(all=True) if x["pilot"] == pilot]
        if len(mine) >= NODES:
            polled = time.time()
            break
        time.sleep(0.01)
    if polled is None:
        raise RuntimeError(f"only {len(mine)} of {NODES} agents of {pilot} registered within "
                           f"{a.timeout:.0f} s")
    jobs.wait_gone(jid)  # the agents leave at their idle timeout, then the head
    path = Path(str(out).replace("%j", jid))
    text = path.read_text(errors="replace")
    m = C.read_marks(path)
    if "start" not in m:
        raise RuntimeError(f"pilot {jid}: no start mark:\n{C._tail(path)}")
    if "end" in m and m["end"][1] != 0:
        C.log(f"WARNING: pilot {jid} exited with {m['end'][1]:.0f}:\n{C._tail(path)}")
    C.wait_nodes_idle(nodes)
    t_start = m["start"][0]
    agents = sorted(mine, key=lambda x: x["started"])
    reg = {x["node"]: x["started"] - t_start for x in agents}
    res = {"rampup": agents[-1]["started"] - t_start, "first_agent": agents[0]["started"] - t_start,
           "polled": polled - t_start, "submit_to_start": t_start - t_sub, "sbatch": dt_sub,
           "registered": reg, "job": jid, "other_slurm_jobs": jobs.others.get(jid, 0)}
    launch = _HEAD_LAUNCH.search(text)
    starts = {g[2]: log_time(g[0], g[1]) for g in _AGENT_START.findall(text)}
    if launch:
        t_launch = log_time(launch.group(1), launch.group(2))
        res["launcher_argv"] = launch.group(3).split(f" {sys.executable}")[0]
        bd = {"head_start": t_launch - t_start}
        ready = [starts[x["id"]] for x in agents if x["id"] in starts]
        if ready:
            bd["agent_start_first"] = min(ready) - t_launch
            bd["agent_start_last"] = max(ready) - t_launch
            bd["hello_max"] = max(x["started"] - starts[x["id"]] for x in agents
                                  if x["id"] in starts)
        res["breakdown"] = bd
    return res


def main() -> int:
    p = C.parser(__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--cpus", type=int, default=2,
                   help="CPUs per node, for the baseline's srun -c (the head uses the node's "
                        "CPU count; default: %(default)s, the fake nodes').")
    p.add_argument("--idle-timeout", type=float, default=1.0,
                   help="Agents' --idle-timeout: how soon each pilot leaves after ramping up "
                        "(default: %(default)s s).")
    p.add_argument("--timeout", type=float, default=120.0,
                   help="Seconds to wait for the agents to register (default: %(default)s).")
    p.add_argument("--jitter", type=float, default=3.0,
                   help="Sleep a random 0..JITTER seconds before each sbatch (default: "
                        "%(default)s, slurmctld's scheduling period here; see "
                        "submit_to_start_seconds below).")
    p.add_argument("--no-baseline", action="store_true", help="Skip the srun baseline jobs.")
    a = p.parse_args()
    nodes, ctx = C.start_slurm_bench("pilot_rampup", a, NODES)
    base: list[dict] = []
    runs: list[dict] = []
    with C.Env("sqlite", a.heartbeat, a.tmp, a.keep, label="rampup") as env, \
            C.SlurmJobs() as jobs:
        C.wait_nodes_idle(nodes)
        for r in range(a.repeat):
            if not a.no_baseline:
                b = run_baseline(a, jobs, env.home, nodes, r)
                base.append(b)
                C.log(f"repeat {r + 1}/{a.repeat}: baseline: submit->start "
                      f"{b['submit_to_start']:.3f} s, srun /bin/true {b['srun_true']:.3f} s, "
                      f"srun python -c pass {b['srun_python']:.3f} s, srun imports "
                      f"{b['srun_imports']:.3f} s, head dry run {b['head_dry_run']:.3f} s")
            x = run_pilot(a, env, jobs, nodes, r)
            runs.append(x)
            C.log(f"repeat {r + 1}/{a.repeat}: pilot {x['job']}: submit->start "
                  f"{x['submit_to_start']:.3f} s, ramp-up {x['rampup']:.3f} s (polled "
                  f"{x['polled']:.3f} s), breakdown {C._round(x.get('breakdown'))}")
    common = dict(nodes=NODES, cpus_per_node=a.cpus, repeat=a.repeat,
                  slurm_nodes="fake: slurmd processes on this one machine", **ctx)
    vals = [x["rampup"] for x in runs]
    bvals = [b["srun_true"] for b in base]
    med, bmed = C.median(vals), C.median(bvals)
    bd_keys = sorted({k for x in runs for k in x.get("breakdown", {})})
    C.emit("rampup_seconds", med, unit="s", values=vals,
           interval="pilot batch script start (date +%s.%N, its first line) -> last of the 4 "
                    "agents registered (server's 'started' time of the agent's hello)",
           baseline=f"srun -N {NODES} --ntasks-per-node=1 -c {a.cpus} --cpu-bind=none "
                    "/bin/true in an equivalent allocation" if base else None,
           baseline_value=bmed, baseline_values=bvals, ratio=C.ratio(med, bmed),
           pilotfish_adds_seconds=med - bmed if base else None,
           first_agent_seconds=[x["first_agent"] for x in runs],
           polled_seconds=[x["polled"] for x in runs],
           registered=[x["registered"] for x in runs],
           breakdown={k: C.median([x.get("breakdown", {}).get(k) for x in runs])
                      for k in bd_keys},
           breakdown_values=[x.get("breakdown") for x in runs],
           srun_python_seconds=C.median([b["srun_python"] for b in base]),
           srun_imports_seconds=C.median([b["srun_imports"] for b in base]),
           srun_imports=IMPORTS,
           head_dry_run_seconds=C.median([b["head_dry_run"] for b in base]),
           launcher_argv=runs[-1].get("launcher_argv"), idle_timeout=a.idle_timeout,
           **common)
    vals = [x["submit_to_start"] for x in runs]
    bvals = [b["submit_to_start"] for b in base]
    med, bmed = C.median(vals), C.median(bvals)
    C.emit("submit_to_start_seconds", med, unit="s", values=vals,
           interval="just before sbatch (submitting the pilot) -> pilot batch script start "
                    "(nodes idle at submission)",
           baseline="the same for the baseline batch jobs (same shape, no pilot)"
           if base else None, baseline_value=bmed, baseline_values=bvals,
           note="Slurm's scheduling pass and batch launch, not pilotfish (see -h)",
           jitter_seconds=a.jitter,
           sbatch_seconds=[x["sbatch"] for x in runs],
           other_slurm_jobs=[x["other_slurm_jobs"] for x in runs],
           baseline_other_slurm_jobs=[b["other_slurm_jobs"] for b in base], **common)
    return 0


if __name__ == "__main__":
    C.run(main)
