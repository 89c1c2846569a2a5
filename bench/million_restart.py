#!/usr/bin/env python3
"""A million queued jobs: server restart to serving, to the first dispatched task, and its RSS.

The database: ``--seed`` jobs (default 100,000) added through the public API
(``Client.add_jobs``, app ``/bin/echo {i}`` with one int parameter, as bench/submit.py), the
server stopped, then the ``jobs`` and ``job_events`` rows copied in SQLite with their ids
shifted until there are ``--total`` (default 1,000,000): the same rows the API writes, only
much faster to build (``--api-only`` adds all of them through the API instead). Every run gets
its own copy of that home (keys and database).

Per run: ``pilotfish --home H server start -f --bind tcp://127.0.0.1:PORT`` (the version's own
console script) is started at t0, a ``Client.counts()`` is sent at once and one fake-exec agent
(``pilot agent --fake-exec``) is started beside it. Figures, one JSON line each, for this
checkout and, with ``--base-dir DIR`` (a checkout with its own .venv, e.g. made by
bench/before_after.py or ``git worktree add``), for that one too, runs interleaved (ABAB...):

* ``restart_to_first_answer``: t0 -> the counts() answer arrives (the server is serving).
* ``restart_to_job_ls``: t0 -> the first answered ``Client.jobs({"state": ["READY"]}, limit=50)``.
* ``restart_to_first_dispatch``: t0 -> the first job seen out of READY (counts polled).
* ``loaded_at``: t0 -> ``server status`` no longer says ``loading`` (older versions: at once)
  and its ``queued`` holds every job not yet run.
* ``cpu_to_first_answer`` / ``cpu_to_loaded``: the server's CPU seconds (user + system) at
  those two moments: what the start costs, much less sensitive to a busy machine.
* ``rss_after_start_mb``: the server's RSS right after its first answer, and again once the
  queue is fully loaded (``rss_loaded_mb``) and after ``--dispatch`` tasks ran
  (``rss_after_dispatch_mb``); ``rss_peak_mb`` is VmHWM at the end.
* ``job_ls_seconds`` / ``counts_seconds``: a READY ``job ls`` (limit 50) and ``counts()`` on
  the loaded server, medians of 5.
"""
from __future__ import annotations

import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402
from pilotfish.client import Client  # noqa: E402
from pilotfish.server import daemon  # noqa: E402

APP = {"name": "work", "executable": "/bin/echo", "args": ["{i}"],
       "parameters": {"i": {"type": "int"}}}
CHUNK = 100_000
TARGET_SERVING = 2.0   # seconds
TARGET_RSS = 300.0     # MB


def build(home: Path, seed: int, total: int, api_only: bool) -> None:
    """A home whose SQLite database holds ``total`` READY jobs (see the module doc)."""
    url = f"sqlite:///{home / 'pilotfish.db'}"
    daemon.start_background(home, url, "tcp://127.0.0.1:*", 2.0, wait=600)
    try:
        from pilotfish import settings
        addr = settings.read_server_info(home)["address"]
        with Client(addr, home, timeout=600) as c:
            c.add_app(APP)
            n_api = total if api_only else seed
            for start in range(0, n_api, CHUNK):
                n = min(CHUNK, n_api - start)
                c.add_jobs([{"name": f"j{i}", "application": "work", "parameters": {"i": i}}
                            for i in range(start, start + n)])
                C.log(f"{start + n:,} jobs added through the API")
    finally:
        daemon.stop(home, wait=60)
    if api_only:
        return
    db = sqlite3.connect(home / "pilotfish.db")
    try:
        def cols(table: str) -> list[str]:
            return [r[1] for r in db.execute(f"PRAGMA table_info({table})")]
        jc, ec = cols("jobs"), cols("job_events")
        top_event = db.execute("SELECT max(id) FROM job_events").fetchone()[0]
        have = seed
        while have < total:
            k = min(seed, total - have)
            sel = ", ".join(f"id + {have}" if c == "id" else
                            f"'j' || (id + {have} - 1)" if c == "name" else c for c in jc)
            db.execute(f"INSERT INTO jobs ({', '.join(jc)}) SELECT {sel} FROM jobs "
                       f"WHERE id <= {k}")
            sel = ", ".join(f"id + {top_event * (have // seed)}" if c == "id" else
                            f"job_id + {have}" if c == "job_id" else c for c in ec)
            db.execute(f"INSERT INTO job_events ({', '.join(ec)}) SELECT {sel} FROM job_events "
                       f"WHERE id <= {top_event} AND job_id <= {k}")
            have += k
            db.commit()
            C.log(f"{have:,} jobs in the database (copied rows)")
    finally:
        db.close()


def rss_mb(pid: int, field: str = "VmRSS") -> float | None:
    """The server's, with its SQLite writer process's (VmHWM: the sum of both peaks)."""
    total = None
    for p in [pid] + [w.pid for w in C.server_writers(pid)]:
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        total = (total or 0.0) + int(line.split()[1]) / 1024
        except OSError:
            pass
    return total


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process so far (less noisy than wall time on a shared
    machine); a server's with its SQLite writer process's."""
    total = None
    for p in [pid] + [w.pid for w in C.server_writers(pid)]:
        try:
            with open(f"/proc/{p}/stat", "rb") as f:
                stat = f.read()
            fields = stat[stat.rfind(b")") + 2:].split()
            total = (total or 0.0) + (int(fields[11]) + int(fields[12])) / os.sysconf(
                "SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            pass
    return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_run(tree: Path, world: Path, a) -> dict:
    """Start the version in ``tree`` on a copy of ``world``; its figures."""
    total, dispatch = a.total, a.dispatch
    home = Path(tempfile.mkdtemp(prefix="pilotfish-bench-million-", dir=a.tmp))
    server = agent = None
    try:
        shutil.copytree(world, home, dirs_exist_ok=True, symlinks=True)
        for f in ("server.json", "server.pid"):
            (home / f).unlink(missing_ok=True)
        os.sync()
        exe = tree / ".venv/bin/pilotfish"
        addr = f"tcp://127.0.0.1:{free_port()}"
        log = open(home / "bench-server.out", "wb")
        t0 = time.perf_counter()
        server = subprocess.Popen([str(exe), "--home", str(home), "server", "start", "-f",
                                   "--bind", addr, "--heartbeat", str(a.heartbeat)],
                                  stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        with Client(addr, home, timeout=120) as c:
            c.counts()
            t_answer = time.perf_counter() - t0
            rss_start = rss_mb(server.pid)
            cpu_answer = cpu_seconds(server.pid)
            c.jobs({"state": ["READY"]}, limit=50)
            t_ls = time.perf_counter() - t0
            alog = open(home / "bench-agent.out", "wb")
            agent = subprocess.Popen([str(tree / ".venv/bin/python"), "-m", "pilotfish",
                                      "--home", str(home), "pilot", "agent", "--server", addr,
                                      "--idle-timeout", "0", "--fake-exec"],
                                     stdout=alog, stderr=alog, stdin=subprocess.DEVNULL)
            t_agent = time.perf_counter() - t0
            t_first = None
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                if c.counts().get("READY", total) < total:
                    t_first = time.perf_counter() - t0
                    break
                if agent.poll() is not None:
                    raise RuntimeError(f"agent exited {agent.returncode}")
                time.sleep(0.005)
            # fully loaded: what `server status` says the queue holds
            loaded = None
            while time.monotonic() < deadline:
                st = c.status()
                q = st.get("queued", st.get("queue"))
                if isinstance(q, dict):
                    q = sum(q.values()) if all(isinstance(v, int) for v in q.values()) else None
                fin = c.counts().get("JOB_FINISHED", 0)
                if not st.get("loading") and (q is None or q + fin + 2000 >= total):
                    loaded = time.perf_counter() - t0
                    break
                time.sleep(0.05)
            rss_loaded = rss_mb(server.pid)
            cpu_loaded = cpu_seconds(server.pid)
            while time.monotonic() < deadline:
                if c.counts().get("JOB_FINISHED", 0) >= dispatch:
                    break
                time.sleep(0.05)
            rss_disp = rss_mb(server.pid)
            ls, cnt = [], []
            for _ in range(5):
                t = time.perf_counter()
                c.jobs({"state": ["READY"]}, limit=50)
                ls.append(time.perf_counter() - t)
                t = time.perf_counter()
                c.counts()
                cnt.append(time.perf_counter() - t)
            peak = rss_mb(server.pid, "VmHWM")
        return {"restart_to_first_answer": t_answer, "restart_to_job_ls": t_ls,
                "restart_to_first_dispatch": t_first, "agent_started_at": t_agent,
                "loaded_at": loaded, "cpu_to_first_answer": cpu_answer,
                "cpu_to_loaded": cpu_loaded, "rss_after_start_mb": rss_start,
                "rss_loaded_mb": rss_loaded, "rss_after_dispatch_mb": rss_disp,
                "rss_peak_mb": peak, "job_ls_seconds": C.median(ls),
                "counts_seconds": C.median(cnt)}
    finally:
        for p in (agent, server):
            if p is not None and p.poll() is None:
                p.terminate()
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        if a.keep:
            C.log(f"kept {home}")
        else:
            shutil.rmtree(home, ignore_errors=True)


FIGURES = {"restart_to_first_answer": ("s", TARGET_SERVING),
           "restart_to_job_ls": ("s", TARGET_SERVING),
           "restart_to_first_dispatch": ("s", None), "loaded_at": ("s", None),
           "cpu_to_first_answer": ("cpu-s", None), "cpu_to_loaded": ("cpu-s", None),
           "rss_after_start_mb": ("MB", TARGET_RSS), "rss_loaded_mb": ("MB", TARGET_RSS),
           "rss_after_dispatch_mb": ("MB", TARGET_RSS), "rss_peak_mb": ("MB", TARGET_RSS),
           "job_ls_seconds": ("s", None), "counts_seconds": ("s", None)}


def main() -> int:
    p = C.parser(__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--total", type=int, default=1_000_000, help="Queued jobs (default: "
                   "%(default)s).")
    p.add_argument("--seed", type=int, default=100_000, help="Jobs added through the API; the "
                   "rest are copies of their rows (default: %(default)s).")
    p.add_argument("--api-only", action="store_true", help="Add all jobs through the API.")
    p.add_argument("--dispatch", type=int, default=5000, help="Tasks to run (fake exec) before "
                   "the RSS after dispatch (default: %(default)s).")
    p.add_argument("--base-dir", help="A checkout with its own .venv to compare with.")
    p.add_argument("--world", help="Keep the built home (keys and database) in this directory "
                   "and use it as it is when it already holds a database (default: build one "
                   "in a temporary directory, removed at the end).")
    a = p.parse_args()
    C.set_bench("million_restart")
    C.install_signal_handlers()
    if not 0 < a.seed <= a.total or a.total > 10_000_000:
        p.error("need 0 < --seed <= --total <= 10,000,000")
    if a.py_spy:
        p.error("--py-spy is not supported here (profile a start with py-spy record -- "
                "pilotfish server start -f on a copy of --world)")
    ctx = C.machine(a.tmp)
    if a.world:
        world = Path(a.world).resolve()
        world.mkdir(parents=True, exist_ok=True)
    else:
        world = Path(tempfile.mkdtemp(prefix="pilotfish-bench-million-world-", dir=a.tmp))
    try:
        if not (world / "pilotfish.db").exists():
            t = time.perf_counter()
            build(world, a.seed, a.total, a.api_only)
            C.log(f"database built in {time.perf_counter() - t:.1f} s")
        trees = {"head": C.REPO}
        if a.base_dir:
            trees["base"] = Path(a.base_dir).resolve()
        runs: dict[str, list[dict]] = {k: [] for k in trees}
        for r in range(a.repeat):
            order = list(trees) if r % 2 == 0 else list(reversed(trees))
            for k in order:
                runs[k].append(one_run(trees[k], world, a))
                C.log(f"{k} run {r + 1}: " + ", ".join(
                    f"{f}={v:.2f}" for f, v in runs[k][-1].items() if v is not None))
        for fig, (unit, target) in FIGURES.items():
            vals = [x[fig] for x in runs["head"]]
            med = C.median(vals)
            extra = {}
            if "base" in runs:
                bvals = [x[fig] for x in runs["base"]]
                extra = {"baseline": f"the checkout in {a.base_dir}",
                         "baseline_value": C.median(bvals), "baseline_values": bvals,
                         "ratio": C.ratio(med, C.median(bvals))}
            if target is not None and med is not None:
                extra.update(target=target, meets_target=med <= target)
            C.emit(fig, med, unit=unit, values=vals, n=a.total, db="sqlite",
                   interval="`pilotfish server start -f` launched -> " + fig, repeat=a.repeat,
                   **extra, **ctx)
    finally:
        if not a.world:
            shutil.rmtree(world, ignore_errors=True)
    return 0


if __name__ == "__main__":
    C.run(main)
