#!/usr/bin/env python3
"""Start to first task done, and idle memory: a server and an agent started as the README's
tour starts them (the ``pilotfish`` command, SQLite, CurveZMQ on, workdirs on ``--tmp``).

Per repeat, in a fresh home:

* ``server_start_seconds``: ``pilotfish server start`` run -> it returned (the daemon answers).
* ``first_task_seconds``: one job of ``/bin/true`` is added, then ``pilotfish pilot agent``
  is spawned; clock: the spawn -> the job's JOB_FINISHED seen by ``Client.wait`` (the agent's
  interpreter start, imports, keys, hello, lease, workdir, the task, the report, the commit).
* ``next_task_seconds``: with that agent connected and idle: ``Client.add_jobs`` of one job ->
  its JOB_FINISHED seen (median of 5).
* ``server_rss_mb`` / ``agent_rss_mb``: each process's resident memory, idle, after the above.

Baselines in the same run: ``/bin/true`` spawned and reaped by this Python
(``subprocess.run``; what xargs pays per task), and a bare ``python -c pass`` start (the floor
of any Python command).
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402

TARGET_FIRST = 0.3
TARGET_SERVER_RSS, TARGET_AGENT_RSS = 80.0, 40.0


def rss_mb(pid: int) -> float:
    """A process's resident memory; a server's with its SQLite writer process's."""
    total = float("nan")
    for p in [pid] + [w.pid for w in C.server_writers(pid)]:
        with open(f"/proc/{p}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    total = (0.0 if total != total else total) + int(line.split()[1]) / 1024
    return total


def one(tmp: str | None) -> dict:
    from pilotfish.client import Client
    home = Path(tempfile.mkdtemp(prefix="pilotfish-first-", dir=tmp))
    env = {**os.environ, "PILOTFISH_HOME": str(home)}
    pf = C.pilotfish_cmd()
    agent = None
    try:
        t0 = time.perf_counter()
        subprocess.run(pf + ["server", "start"], env=env, check=True, capture_output=True)
        server_start = time.perf_counter() - t0
        subprocess.run(pf + ["app", "add", "t", "--exec", "/bin/true"], env=env, check=True,
                       capture_output=True)
        c = Client(home=home)
        [job] = c.add_jobs([{"name": "first", "application": "t"}])
        C.settle_disk()
        t0 = time.perf_counter()
        agent = subprocess.Popen(pf + ["pilot", "agent"], env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        c.wait({"ids": [job]})
        first = time.perf_counter() - t0
        nexts = []
        for i in range(5):
            time.sleep(0.3)
            t0 = time.perf_counter()
            [j] = c.add_jobs([{"name": f"next{i}", "application": "t"}])
            c.wait({"ids": [j]})
            nexts.append(time.perf_counter() - t0)
        time.sleep(1.0)
        server_pid = _server_pid(home)
        out = {"server_start": server_start, "first": first, "next": C.median(nexts),
               "server_rss": rss_mb(server_pid), "agent_rss": rss_mb(agent.pid)}
        c.close()
        return out
    finally:
        subprocess.run(pf + ["server", "stop"], env=env, capture_output=True)
        if agent is not None:
            try:
                agent.wait(30)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait()
        C._DEFERRED_RM.append(home)


def _server_pid(home: Path) -> int:
    import json
    return int(json.loads((home / "server.json").read_text())["pid"])


def baselines(n: int = 20) -> tuple[float, float]:
    t = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run(["/bin/true"])
        t.append(time.perf_counter() - t0)
    p = []
    for _ in range(5):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"])
        p.append(time.perf_counter() - t0)
    return C.median(t), C.median(p)


def main() -> int:
    p = C.parser(__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    a = p.parse_args()
    C.set_bench("first_task")
    C.install_signal_handlers()
    ctx = C.machine(a.tmp)
    runs, true_s, py_s = [], [], []
    for r in range(a.repeat):
        t, py = baselines()
        true_s.append(t)
        py_s.append(py)
        runs.append(one(a.tmp))
        C.log(f"repeat {r + 1}/{a.repeat}: server start {runs[-1]['server_start']:.3f} s, "
              f"first task {runs[-1]['first']:.3f} s, next {runs[-1]['next'] * 1000:.1f} ms, "
              f"RSS server {runs[-1]['server_rss']:.0f} MB agent {runs[-1]['agent_rss']:.0f} MB")
    first = [x["first"] for x in runs]
    C.emit("first_task_seconds", C.median(first), unit="s", values=first,
           interval="`pilotfish pilot agent` spawned (one job queued, server running) -> the "
           "job's JOB_FINISHED seen by Client.wait", target=TARGET_FIRST,
           meets_target=C.median(first) <= TARGET_FIRST,
           baseline="python -c pass (interpreter start)", baseline_value=C.median(py_s),
           repeat=a.repeat, **ctx)
    nxt = [x["next"] for x in runs]
    C.emit("next_task_seconds", C.median(nxt), unit="s", values=nxt,
           interval="Client.add_jobs of one job (agent connected, idle) -> its JOB_FINISHED "
           "seen by Client.wait (median of 5 per repeat)",
           baseline="subprocess.run(['/bin/true'])", baseline_value=C.median(true_s), **ctx)
    st = [x["server_start"] for x in runs]
    C.emit("server_start_seconds", C.median(st), unit="s", values=st,
           interval="`pilotfish server start` run -> returned", **ctx)
    for who, target in (("server", TARGET_SERVER_RSS), ("agent", TARGET_AGENT_RSS)):
        v = [x[f"{who}_rss"] for x in runs]
        C.emit(f"{who}_rss_mb", C.median(v), unit="MB", values=v, target=target,
               meets_target=C.median(v) <= target, when="idle, after 6 jobs", **ctx)
    return 0


if __name__ == "__main__":
    C.run(main)
