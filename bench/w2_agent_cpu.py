#!/usr/bin/env python3
"""W2 (N x /bin/true, one default agent on every core, CurveZMQ, SQLite) with the CPU each part
costs per task: the agent's loop (its main thread), its other threads (the preparer, which makes
workdirs and output files; libzmq's I/O thread apart), its guard process, and the server --
for the agent code of this checkout and, with ``--base REV``, of an earlier revision, against
the same server code, interleaved (ABBA) with ``xargs -P <cores>`` before each pair.

CPU-seconds per task are much less sensitive than the rate to the other work on a shared
machine; both are given, per run and as medians. The per-thread figures come from
``/proc/<pid>/task/<tid>/stat`` (user + system), read just before ``add_jobs`` and once all N
jobs are final.

``--base REV``: the installed package with ``pilot/`` (the agent) replaced by its files at REV
(``git show``), on the agents' PYTHONPATH only.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TICK = os.sysconf("SC_CLK_TCK")


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of a process's threads: the main thread, libzmq's, the others."""
    out = {"main": 0.0, "zmq": 0.0, "other": 0.0}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            comm = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
            f = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        kind = "main" if int(tid) == pid else "zmq" if comm.startswith("ZMQ") else "other"
        out[kind] += (int(f[11]) + int(f[12])) / TICK
    return out


def proc_cpu(pid: int | None) -> float:
    if pid is None:
        return 0.0
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(f[11]) + int(f[12])) / TICK


def guard_pid(agent_pid: int) -> int | None:
    import psutil
    for c in psutil.Process(agent_pid).children():
        try:
            if "-I" in c.cmdline():
                return c.pid
        except psutil.Error:
            pass
    return None


def base_tree(rev: str, where: Path) -> Path:
    """The installed pilotfish (this venv's, not the checkout's source tree) with pilot/ as
    it was at ``rev``."""
    import sysconfig
    tree = where / "base"
    shutil.copytree(Path(sysconfig.get_paths()["purelib"]) / "pilotfish", tree / "pilotfish",
                    ignore=shutil.ignore_patterns("__pycache__"))
    pilot = tree / "pilotfish" / "pilot"
    names = subprocess.run(["git", "ls-tree", "--name-only", rev, "pilot/"], cwd=ROOT,
                           check=True, capture_output=True, text=True).stdout.split()
    for f in pilot.glob("*.py"):
        f.unlink()
    for name in names:
        if name.endswith(".py"):
            data = subprocess.run(["git", "show", f"{rev}:{name}"], cwd=ROOT, check=True,
                                  capture_output=True).stdout
            (pilot / Path(name).name).write_bytes(data)
    return tree


def run_once(a, pythonpath: str | None, label: str) -> dict:
    saved = os.environ.get("PYTHONPATH")
    if pythonpath:
        os.environ["PYTHONPATH"] = pythonpath
    else:
        os.environ.pop("PYTHONPATH", None)
    try:
        with C.Env("sqlite", a.heartbeat, a.tmp, a.keep, label=label) as env:
            c = env.client
            c.add_app({"name": "true", "executable": "/bin/true"})
            jobs = [{"name": f"t{i}", "application": "true"} for i in range(a.n)]
            env.start_agents([None])
            env.wait_agents(1)
            apid = env.agents[0].pid
            gpid = guard_pid(apid)
            C.settle_disk()
            with C.profile(a, label, C.env_pids(env)):
                a0, g0, s0 = thread_cpu(apid), proc_cpu(gpid), proc_cpu(env.server_pid)
                t0 = time.perf_counter()
                c.add_jobs(jobs)
                t1, counts = C.wait_final(c, a.n, check=env.check_agents)
                a1, g1, s1 = thread_cpu(apid), proc_cpu(gpid), proc_cpu(env.server_pid)
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved
    us = lambda x: round(1e6 * x / a.n, 1)  # noqa: E731
    return {"tps": a.n / (t1 - t0), "agent_loop_us": us(a1["main"] - a0["main"]),
            "agent_threads_us": us(a1["other"] - a0["other"]),
            "agent_zmq_us": us(a1["zmq"] - a0["zmq"]), "guard_us": us(g1 - g0),
            "server_us": us(s1 - s0), "finished": counts.get("JOB_FINISHED", 0)}


def main() -> int:
    p = C.parser(__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--n", type=int, default=10_000, help="Tasks (default: %(default)s).")
    p.add_argument("--base", metavar="REV", help="Also run the agent code of this revision.")
    p.add_argument("--no-baseline", action="store_true", help="Skip xargs.")
    a = p.parse_args()
    C.set_bench("w2_agent_cpu")
    C.install_signal_handlers()
    cores = len(os.sched_getaffinity(0))
    ctx = C.machine(a.tmp, workdirs=True)
    scratch = Path(tempfile.mkdtemp(prefix="pilotfish-bench-base-"))
    try:
        variants = [("head", None)]
        if a.base:
            variants.append((a.base, str(base_tree(a.base, scratch))))
        xargs: list[float] = []
        runs: dict[str, list[dict]] = {name: [] for name, _ in variants}
        for r in range(a.repeat):
            if not a.no_baseline:
                C.settle_disk()
                xargs.append(a.n / C.run_xargs(["/bin/true"], ["x"] * a.n, cores))
                C.log(f"repeat {r + 1}/{a.repeat}: xargs -P{cores}: {xargs[-1]:,.0f} tasks/s")
            for name, path in (variants if r % 2 == 0 else variants[::-1]):
                out = run_once(a, path, f"w2cpu-{name}-r{r + 1}")
                runs[name].append(out)
                C.log(f"repeat {r + 1}/{a.repeat}: {name}: {out['tps']:,.0f} tasks/s; per task: "
                      f"loop {out['agent_loop_us']} us, threads {out['agent_threads_us']} us, "
                      f"guard {out['guard_us']} us, server {out['server_us']} us")
        xmed = C.median(xargs)
        for name, _ in variants:
            rs = runs[name]
            vals = [x["tps"] for x in rs]
            med = C.median(vals)
            fields = {k: C.median([x[k] for x in rs]) for k in rs[0] if k.endswith("_us")}
            C.emit("tasks_per_second", med, unit="tasks/s", values=vals,
                   spread=[min(vals), max(vals)], code=name,
                   baseline=f"xargs -P{cores} -n 1 /bin/true" if xargs else None,
                   baseline_value=xmed, baseline_values=xargs, ratio=C.ratio(med, xmed),
                   paired_ratios=[x["tps"] / b for x, b in zip(rs, xargs)],
                   cpu_us_per_task=fields,
                   cpu_us_per_task_values={k: [x[k] for x in rs] for k in fields},
                   interval="add_jobs called (agent connected and idle) -> all N JOB_FINISHED "
                            "seen in the DB via Client.counts",
                   n=a.n, repeat=a.repeat, db="sqlite", agents=1, **ctx)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    C.run(main)
