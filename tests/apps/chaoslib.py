"""Chaos and fuzz machinery shared by tests/test_chaos.py, tests/test_fuzz.py and bench/chaos.py.

Everything here is real: a server process (``daemon.start_background``), agent processes
(``python -m pilotfish pilot agent``), tasks that are real processes (``attempt_log.py``), raw
ZeroMQ sockets. Each scenario returns a dict of facts and figures; the tests assert on them and
the benchmark prints them.

A :class:`World` owns one temporary root::

    ROOT/home    the server's home (SQLite file, server.log, agent logs)
    ROOT/work    the work root every agent shares, as on a cluster file system: a retried job
                 reuses its workdir, so all attempts of one job append to one attempts.log
    ROOT/canary  where injected commands would create files (it must stay empty)

:meth:`World.close` stops agents (SIGCONT first, then SIGTERM, then SIGKILL), stops the server
and kills, by pid, any process still running with its working directory under ROOT/work (the
tasks an agent killed with -9 may leave behind) or with ROOT/home in its command line.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import msgpack
import zmq

from pilotfish import protocol as P
from pilotfish import settings
from pilotfish.client import FINAL_STATES, Client
from pilotfish.errors import PilotfishError, ServerUnavailable
from pilotfish.server import daemon

try:  # CurveZMQ (pilotfish.keys) is on every tcp:// connection since it exists
    from pilotfish.keys import apply_client, client_curve
except ImportError:  # pragma: no cover - an older pilotfish: plain sockets
    def client_curve(home, address):
        return None

    def apply_client(sock, curve):
        return sock

HERE = Path(__file__).resolve().parent
ATTEMPT_LOG = HERE / "attempt_log.py"
ENV_PROBE = HERE / "env_probe.py"
PY = sys.executable


# -- a server, its agents and their work root ------------------------------------------------
class World:
    def __init__(self, root: Path, db_url: str | None = None, heartbeat: float = 1.0) -> None:
        self.root = Path(root).resolve()
        self.home = self.root / "home"
        self.work = self.root / "work"
        self.canary = self.root / "canary"
        for d in (self.home, self.work, self.canary):
            d.mkdir(parents=True, exist_ok=True)
        self.db_url = db_url or f"sqlite:///{self.home / 'pilotfish.db'}"
        self.heartbeat = heartbeat
        self.info: dict = {}
        self.agents: list[subprocess.Popen] = []
        self.restarts = 0
        self._engine = None

    # -- server -----------------------------------------------------------------------------
    @property
    def lease_timeout(self) -> float:
        return self.heartbeat * settings.LEASE_HEARTBEATS

    @property
    def address(self) -> str:
        return self.info["address"]

    @property
    def server_pid(self) -> int:
        return self.info["pid"]

    def start_server(self) -> "World":
        old = self.info.get("address")
        self.info = daemon.start_background(self.home, self.db_url, "tcp://127.0.0.1:*",
                                            self.heartbeat)
        if old and self.info["address"] != old:
            raise AssertionError(f"restarted server moved from {old} to {self.info['address']}")
        return self

    def restart_server(self) -> float:
        """Start the server again on the same port; the seconds it took to answer a ping."""
        t0 = time.time()
        self.start_server()
        self.restarts += 1
        return time.time() - t0

    def kill9_server(self) -> float:
        t = time.time()
        os.kill(self.server_pid, signal.SIGKILL)
        while daemon.alive(self.server_pid):
            time.sleep(0.01)
        return t

    def client(self, timeout: float = 30) -> Client:
        return Client(self.address, self.home, timeout=timeout)

    def engine(self):
        """A SQLAlchemy engine on the server's database, for checks the API cannot make."""
        if self._engine is None:
            from sqlalchemy import create_engine
            self._engine = create_engine(self.db_url)
        return self._engine

    def sql(self, query: str, **params) -> list[tuple]:
        from sqlalchemy import text
        with self.engine().connect() as conn:
            return [tuple(r) for r in conn.execute(text(query), params)]

    # -- agents -----------------------------------------------------------------------------
    def start_agent(self, cores: str | None = "0,1", extra: tuple[str, ...] = (),
                    server: str | None = None) -> subprocess.Popen:
        cmd = [PY, "-m", "pilotfish", "--home", str(self.home), "pilot", "agent", "--server",
               server or self.address, "--idle-timeout", "0", "--work-root", str(self.work),
               *extra]
        if cores:
            cmd += ["--cores", cores]
        log = open(self.home / f"agent-{len(self.agents)}.log", "ab")
        p = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                             cwd=self.root)
        log.close()
        self.agents.append(p)
        return p

    def agent_ids(self, c: Client) -> dict[int, str]:
        """pid -> agent id of every agent the server knows (alive or not)."""
        return {a["pid"]: a["id"] for a in c.agents(all=True)}

    def wait_agents(self, c: Client, n: int, timeout: float = 30) -> None:
        wait_for(lambda: len(c.agents()) >= n, timeout, what=f"{n} agents")

    # -- teardown ---------------------------------------------------------------------------
    def close(self) -> None:
        for p in self.agents:
            if p.poll() is None:
                try:
                    p.send_signal(signal.SIGCONT)
                    p.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for p in self.agents:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        try:
            daemon.stop(self.home, wait=15)
        except Exception:
            pid = self.info.get("pid")
            if pid and daemon.alive(pid):
                os.kill(pid, signal.SIGKILL)
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None
        kill_strays(self.root)

    def __enter__(self) -> "World":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def kill_strays(root: Path) -> list[int]:
    """Kill (by pid) processes working under ``root/work`` or started with ``root/home``."""
    import psutil
    work, home = str(root / "work"), str(root / "home")
    killed = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        if p.pid == os.getpid():
            continue
        try:
            cwd = p.cwd()
            cmd = " ".join(p.info["cmdline"] or [])
        except (psutil.Error, OSError):
            continue
        if cwd == work or cwd.startswith(work + "/") or f"--home {home}" in cmd:
            try:
                p.kill()
                killed.append(p.pid)
            except psutil.Error:
                pass
    return killed


def tasks_running(work: Path) -> list[int]:
    """Pids of tasks (orphans too) working under ``work``. Agents are left out: an agent's own
    working directory is the workdir of the last task it spawned."""
    import psutil
    w = str(work)
    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            cwd = p.cwd()
        except (psutil.Error, OSError):
            continue
        if (cwd == w or cwd.startswith(w + "/")) and "pilotfish" not in " ".join(
                p.info["cmdline"] or []):
            out.append(p.pid)
    return out


def wait_for(pred: Callable[[], Any], timeout: float = 30, interval: float = 0.05,
             what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def wait_final(c: Client, n: int, timeout: float, filter: dict | None = None) -> dict:
    def done():
        counts = c.counts(filter)
        return counts if sum(v for k, v in counts.items() if k in FINAL_STATES) >= n else None
    return wait_for(done, timeout, 0.2, f"{n} jobs final")


def add_attempt_app(c: Client, name: str = "attempt") -> None:
    """The app whose tasks log their attempts: ``python -S -I attempt_log.py {d}``."""
    c.add_app({"name": name, "executable": PY, "args": ["-S", "-I", str(ATTEMPT_LOG), "{d}"],
               "parameters": {"d": {"type": "float", "min": 0, "max": 600}}})


# -- attempt logs ----------------------------------------------------------------------------
@dataclass
class Attempt:
    job: int
    attempt: int
    start: float
    end: float | None      # None: killed with SIGKILL (no line after 'start')
    how: str | None        # 'end' (ran to the end), 'term' (signalled), None
    pid: int
    ppid: int              # the agent that started it


def read_attempts(work: Path) -> dict[int, list[Attempt]]:
    """job -> its attempts, from every attempts.log under the work root."""
    out: dict[int, list[Attempt]] = defaultdict(list)
    for f in work.rglob("attempts.log"):
        started: dict[tuple[int, int], Attempt] = {}
        for line in f.read_text().splitlines():
            w = line.split()
            if not w:
                continue
            job, att = int(w[1]), int(w[2])
            if w[0] == "start":
                a = Attempt(job, att, float(w[3]), None, None, int(w[4]), int(w[5]))
                started[(job, att, a.pid)] = a
                out[job].append(a)
            else:
                a = started.get((job, att, int(w[5])))
                if a is None:  # an end without a start cannot happen with O_APPEND lines
                    raise AssertionError(f"{f}: '{line}' has no start line")
                a.end, a.how = float(w[4]), w[0]
    for atts in out.values():
        atts.sort(key=lambda a: a.start)
    return out


def overlaps(attempts: dict[int, list[Attempt]]) -> list[tuple[Attempt, Attempt]]:
    """Pairs of attempts of one job that ran at the same time. An attempt without an end
    (SIGKILLed, time unknown) is counted by :func:`unended`, not here."""
    found = []
    for atts in attempts.values():
        for i, a in enumerate(atts):
            for b in atts[i + 1:]:
                if a.end is not None and b.start < a.end:
                    found.append((a, b))
    return found


def unended(attempts: dict[int, list[Attempt]]) -> list[Attempt]:
    return [a for atts in attempts.values() for a in atts if a.end is None]


def events_by_job(world: World, ids: list[int] | None = None) -> dict[int, list[tuple]]:
    """job -> [(to_state, via, time, message)] in order, read from the database."""
    out: dict[int, list[tuple]] = defaultdict(list)
    for job, to, via, t, msg in world.sql(
            "SELECT job_id, to_state, via, time, message FROM job_events ORDER BY id"):
        out[job].append((to, via, t, msg))
    if ids is not None:
        return {j: out.get(j, []) for j in ids}
    return out


def jobs_table(world: World) -> dict[int, dict]:
    rows = world.sql("SELECT id, state, attempts, retries, agent FROM jobs")
    return {r[0]: {"state": r[1], "attempts": r[2], "retries": r[3], "agent": r[4]}
            for r in rows}


def stats(xs: list[float]) -> dict:
    return {"n": len(xs), "mean": sum(xs) / len(xs) if xs else None,
            "worst": max(xs) if xs else None, "best": min(xs) if xs else None}


# -- scenario 1: kill -9 agents while they run short jobs ---------------------------------------
def kill_agents_chaos(world: World, n_jobs: int, n_agents: int = 4, min_kills: int = 10,
                      n_long: int = 4, long_seconds: float | None = None,
                      short: tuple[float, float] = (0.01, 0.06), seed: int = 1,
                      targeted: int = 2, pause: tuple[float, float] = (0.3, 1.2),
                      log: Callable[[str], None] = lambda m: None) -> dict:
    """N short jobs (and a few long ones) on ``n_agents`` agents; kill -9 a random agent at
    random times (the first ``targeted`` kills hit an agent running a long job, so that its
    orphaned task outlives the lease), start a replacement each time, until ``min_kills``."""
    rng = random.Random(seed)
    long_seconds = long_seconds or world.lease_timeout * 2.7
    c = world.client(timeout=60)
    add_attempt_app(c)
    longs = c.add_jobs([{"name": f"long{i}", "application": "attempt", "tags": ["long"],
                         "parameters": {"d": long_seconds}, "priority": 10,
                         "max_retries": 100} for i in range(n_long)])
    shorts: list[int] = []
    for lo in range(0, n_jobs, 5000):
        shorts += c.add_jobs([{"name": f"s{i}", "application": "attempt",
                               "parameters": {"d": round(rng.uniform(*short), 4)},
                               "max_retries": 100}
                              for i in range(lo, min(n_jobs, lo + 5000))])
    ids = longs + shorts
    t0 = time.time()
    live = [world.start_agent() for _ in range(n_agents)]
    world.wait_agents(c, n_agents)
    kills: list[dict] = []
    while len(kills) < min_kills:
        time.sleep(rng.uniform(*pause))
        victim = None
        if len(kills) < targeted:
            try:
                running = wait_for(lambda: c.jobs({"tag": "long", "state": "RUNNING"}), 10,
                                   what="a long job running")
                pids = {v: k for k, v in world.agent_ids(c).items()}
                pid = pids.get(running[0]["agent"])
                victim = next((p for p in live if p.pid == pid), None)
            except AssertionError:
                victim = None
        if victim is None:
            # one the server knows: a replacement still starting (slow on a loaded machine) has
            # no lease to lose and would never be declared lost
            known = wait_for(lambda: [p for p in live if p.pid in world.agent_ids(c)], 30,
                             what="a live agent the server knows")
            victim = rng.choice(known)
        aid = world.agent_ids(c).get(victim.pid)
        done = sum(v for k, v in c.counts({"ids": ids}).items() if k in FINAL_STATES)
        t = time.time()
        victim.kill()
        victim.wait()
        live.remove(victim)
        kills.append({"t": t, "pid": victim.pid, "agent": aid, "done_before": done,
                      "targeted": len(kills) < targeted})
        log(f"kill {len(kills)}: agent pid {victim.pid} ({done}/{len(ids)} jobs final)")
        if done >= len(ids):
            break
        live.append(world.start_agent())
    final = wait_final(c, len(ids), timeout=120 + len(ids) / 20, filter={"ids": ids})
    elapsed = time.time() - t0
    # orphaned tasks of killed agents may still run (if nothing stopped them): let them end
    # before reading the logs, so that each logged its end
    wait_for(lambda: not tasks_running(world.work), long_seconds + 5, 0.1,
             "the tasks under the work root to end")
    out = analyse_attempts(world, ids, kills)
    out.update(n_jobs=len(ids), n_short=len(shorts), n_long=n_long,
               long_seconds=long_seconds, states=final,
               finished=final.get("JOB_FINISHED", 0), lost=len(ids) - final.get("JOB_FINISHED", 0),
               kills=len(kills), kill_log=kills, elapsed=elapsed, agents_started=len(world.agents),
               lease_timeout=world.lease_timeout, heartbeat=world.heartbeat)
    c.close()
    return out


def analyse_attempts(world: World, ids: list[int], kills: list[dict]) -> dict:
    """What the attempt logs, the job rows and the events say about killed agents."""
    atts = read_attempts(world.work)
    rows = jobs_table(world)
    events = events_by_job(world, ids)
    killed = {k["pid"]: k for k in kills}
    dup = overlaps(atts)
    hit, orphans, requeue, rerun = [], [], [], []
    problems: list[str] = []
    for j, al in atts.items():
        for a in al:
            k = killed.get(a.ppid)
            if k is None or a.start > k["t"] or (a.end is not None and a.end <= k["t"]):
                continue
            # this attempt was running when its agent was killed
            orphans.append(a)
            hit.append(j)
            if rows[j]["attempts"] <= a.attempt:
                problems.append(f"job {j}: attempt {a.attempt} was on killed agent {a.ppid} "
                                f"but the job's attempts are {rows[j]['attempts']}")
            later = [b for b in al if b.attempt > a.attempt]
            if later:
                rerun.append(later[0].start - k["t"])
    lost_events = {}
    for j, evs in events.items():
        for to, via, t, msg in evs:
            if msg and " lost (silent" in msg:
                lost_events.setdefault(j, []).append((t, msg))
    by_agent = {k["agent"]: k for k in kills if k["agent"]}
    for j, evs in lost_events.items():
        for t, msg in evs:
            aid = msg.split()[1]
            k = by_agent.get(aid)
            if k is not None:
                requeue.append(t - k["t"])
    finishes = {j: sum(1 for e in events[j] if e[0] == "JOB_FINISHED") for j in ids}
    # per kill: the server's "agent ... lost" log line (written whether it held jobs or not)
    lost_at = lost_times(world.home / "server.log")
    per_kill = [lost_at[k["agent"]] - k["t"] for k in kills if k["agent"] in lost_at]
    hit_set = set(hit)
    return {
        "attempts_logged": sum(len(v) for v in atts.values()),
        "jobs_with_retries": sum(1 for j in ids if rows[j]["attempts"] > 1),
        "max_attempts": max(rows[j]["attempts"] for j in ids),
        "leases_never_started": sum(rows[j]["attempts"] - len({a.attempt for a in atts.get(j, [])})
                                    for j in ids),
        "jobs_hit_by_kills": len(hit_set),
        "hit_jobs_attempts_gt1": sum(1 for j in hit_set if rows[j]["attempts"] > 1),
        "hit_jobs_with_lost_event": sum(1 for j in hit_set if j in lost_events),
        "orphans": len(orphans),
        "orphans_ran_to_end_after_kill": sum(1 for a in orphans if a.how == "end"),
        "orphans_terminated": sum(1 for a in orphans if a.how == "term"),
        # how long tasks of a killed agent went on after the kill (the guard stops them at once;
        # a short task may end by itself in the meantime)
        "orphan_survival": stats([a.end - killed[a.ppid]["t"] for a in orphans
                                  if a.end is not None]),
        "orphans_alive_1s_after_kill": sum(1 for a in orphans
                                           if a.end is None or a.end - killed[a.ppid]["t"] > 1.0),
        "concurrent_duplicates": len(dup),
        "duplicates": [(a.job, a.attempt, b.attempt, round(a.end - b.start, 3))
                       for a, b in dup][:20],
        "unended_attempts": len(unended(atts)),
        "jobs_not_finished_once": [j for j, n in finishes.items() if n != 1][:20],
        "jobs_without_log": [j for j in ids if j not in atts][:20],
        "requeue_delay": stats(requeue),
        "lost_after_kill": stats(per_kill),
        "kills_never_declared_lost": sum(1 for k in kills if k["agent"] not in lost_at),
        "rerun_delay": stats(rerun),
        "problems": problems[:20],
    }


def lost_times(server_log: Path) -> dict[str, float]:
    """agent id -> when the server declared it lost, from its log (millisecond stamps)."""
    out = {}
    try:
        text = server_log.read_text(errors="replace")
    except OSError:
        return out
    for line in text.splitlines():
        if ": lost; requeueing" not in line or " agent " not in line:
            continue
        stamp, _, rest = line.partition(" WARNING ")
        try:
            t = time.mktime(time.strptime(stamp[:19], "%Y-%m-%d %H:%M:%S"))
            t += int(stamp[20:23]) / 1000
        except ValueError:
            continue
        aid = rest.split(" agent ", 1)[1].split()[0]
        out.setdefault(aid, t)
    return out


# -- scenario 2: SIGSTOP an agent past its lease, then SIGCONT --------------------------------
def sigstop_agent(world: World, task_seconds: float, until_overlap: bool = False) -> dict:
    """One job on agent A; A is stopped (SIGSTOP) once the job is RUNNING; agent B takes the
    requeued job; A is continued after B finished it and reports its own, stale, finish.
    ``until_overlap``: only find out whether attempt 1 still ran when attempt 2 started."""
    c = world.client()
    if not any(a["name"] == "attempt" for a in c.apps()):
        add_attempt_app(c)
    a = world.start_agent(cores="0")
    world.wait_agents(c, 1)
    aid = world.agent_ids(c)[a.pid]
    [job] = c.add_jobs([{"name": "stopme", "application": "attempt",
                         "parameters": {"d": task_seconds}, "max_retries": 5}])
    wait_for(lambda: c.job(job)["state"] == "RUNNING", 30, what="RUNNING on agent A")
    refused0 = c.status()["stats"]["refused"]
    a.send_signal(signal.SIGSTOP)
    t_stop = time.time()
    b = world.start_agent(cores="1" if len(os.sched_getaffinity(0)) > 1 else "0")
    # while A sleeps: the lease expires, B runs attempt 2. Was attempt 1 still alive then?
    wait_for(lambda: c.job(job)["attempts"] >= 2 and c.job(job)["state"] in
             ("RUNNING", "JOB_FINISHED"), world.lease_timeout + 30, what="attempt 2 under way")
    atts = read_attempts(world.work).get(job, [])
    first = [x for x in atts if x.attempt == 1]
    alive_at_attempt2 = bool(first) and first[0].end is None and _alive(first[0].pid)
    if until_overlap:
        a.send_signal(signal.SIGCONT)
        c.close()
        return {"task_seconds": task_seconds, "lease_timeout": world.lease_timeout,
                "attempt1_alive_when_attempt2_ran": alive_at_attempt2,
                "stopped_seconds": time.time() - t_stop}
    wait_for(lambda: c.job(job)["state"] == "JOB_FINISHED", 60, what="B finishing the job")
    t_finished = time.time()
    a.send_signal(signal.SIGCONT)
    t_cont = time.time()
    # A wakes up, finds its lease gone (it is LOST: 'say hello'), says hello and resends
    got_refused = True
    try:
        wait_for(lambda: c.status()["stats"]["refused"] > refused0, 15,
                 what="A's late update refused")
    except AssertionError:
        got_refused = False
    a_alive_again = bool(wait_for(lambda: any(x["id"] == aid for x in c.agents()), 15,
                                  what="A back")) if a.poll() is None else False
    time.sleep(1.0)
    d = c.job(job)
    atts = read_attempts(world.work).get(job, [])
    evs = [(e["to_state"], e["message"]) for e in d["events"]]
    out = {"task_seconds": task_seconds, "lease_timeout": world.lease_timeout,
           "state": d["state"], "attempts": d["attempts"],
           "finish_events": sum(1 for to, _ in evs if to == "JOB_FINISHED"),
           "lost_events": sum(1 for _, m in evs if m and "lost" in m),
           "late_update_refused": got_refused,
           "refused_delta": c.status()["stats"]["refused"] - refused0,
           "agent_a_alive_again": a_alive_again,
           "attempt_log": [(x.attempt, x.how, round(x.start - t_stop, 2),
                            None if x.end is None else round(x.end - t_stop, 2)) for x in atts],
           "attempt1_alive_when_attempt2_ran": alive_at_attempt2,
           "overlaps": len(overlaps({job: atts})),
           "stopped_seconds": t_cont - t_stop, "finished_while_stopped": t_finished < t_cont,
           "events": evs}
    c.close()
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"attempt_log.py" in f.read()
    except OSError:
        return False


# -- scenario 3: kill -9 the server while jobs are submitted and run ---------------------------
class Submitter(threading.Thread):
    """Adds batches of jobs in a loop through its own client; keeps every acknowledged id."""

    def __init__(self, world: World, make_jobs: Callable[[int], list[dict]],
                 timeout: float = 2.0, pause: float = 0.0) -> None:
        super().__init__(daemon=True)
        self.world, self.make_jobs, self.timeout, self.pause = world, make_jobs, timeout, pause
        self.acked: list[int] = []
        self.sent_jobs = 0
        self.failed_calls = 0
        self.unacked_jobs = 0
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        c = None
        i = 0
        try:
            while not self.stop.is_set():
                if c is None:
                    c = Client(self.world.address, self.world.home, timeout=self.timeout)
                jobs = self.make_jobs(i)
                i += 1
                self.sent_jobs += len(jobs)
                try:
                    self.acked += c.add_jobs(jobs)
                except (ServerUnavailable, PilotfishError, zmq.ZMQError):
                    self.failed_calls += 1
                    self.unacked_jobs += len(jobs)
                    c.close()
                    c = None
                    time.sleep(0.05)
                if self.pause:
                    time.sleep(self.pause)
        except BaseException as exc:  # reported by the scenario, never swallowed
            self.error = exc
        finally:
            if c is not None:
                c.close()


def existing_ids(world: World, ids: list[int]) -> set[int]:
    have = {r[0] for r in world.sql("SELECT id FROM jobs")}
    return have & set(ids)


def server_restarts(world: World, restarts: int = 3, n_agents: int = 2, n_long: int = 4,
                    long_seconds: tuple[float, ...] = (1.0, 1.5, 3.0, 4.0), batch: int = 10,
                    pause: float = 0.1, seed: int = 2, down: tuple[float, float] = (0.8, 2.0),
                    submit_timeout: float = 0.7,
                    log: Callable[[str], None] = lambda m: None) -> dict:
    """kill -9 the server ``restarts`` times while a thread submits jobs in a loop (giving up on
    a call after ``submit_timeout``) and agents run them; each time ``n_long`` longer tasks
    (``long_seconds``, cycled: some end while the server is down, so their agents must keep the
    update and resend it) are running. Restart it on the same port after ``down`` seconds."""
    rng = random.Random(seed)
    c = world.client(timeout=10)
    add_attempt_app(c)
    agents = [world.start_agent() for _ in range(n_agents)]
    world.wait_agents(c, n_agents)
    agent_ids = dict(world.agent_ids(c))
    long_ids: list[int] = []

    def add_longs():
        cc = world.client(timeout=10)
        ids = cc.add_jobs([{"name": f"long{len(long_ids) + i}", "application": "attempt",
                            "tags": ["long"],
                            "parameters": {"d": long_seconds[i % len(long_seconds)]},
                            "priority": 10, "max_retries": 100} for i in range(n_long)])
        long_ids.extend(ids)
        # all started (the agents' slots may not hold all of them at once)
        wait_for(lambda: not {"READY", "RESTART_READY"} & set(cc.counts({"ids": ids})), 20,
                 what="the long jobs started")
        cc.close()

    sub = Submitter(world, lambda i: [{"name": f"q{i}-{k}", "application": "attempt",
                                       "parameters": {"d": 0.005}, "max_retries": 100}
                                      for k in range(batch)], timeout=submit_timeout,
                    pause=pause)
    sub.start()
    kills = []
    for k in range(restarts):
        add_longs()
        time.sleep(rng.uniform(0.1, 0.5))
        t_kill = world.kill9_server()
        time.sleep(rng.uniform(*down))
        took = world.restart_server()
        t_up = time.time()
        kills.append({"t_kill": t_kill, "t_up": t_up, "restart_seconds": took})
        log(f"server kill {k + 1}: down {t_up - t_kill:.2f} s, {len(sub.acked)} jobs acked")
    time.sleep(1.0)
    sub.stop.set()
    sub.join(30)
    if sub.error:
        raise sub.error
    c = world.client(timeout=30)
    total = c.counts()
    n_all = sum(total.values())
    final = wait_final(c, n_all, timeout=120 + n_all / 20)
    have = existing_ids(world, sub.acked + long_ids)
    missing = sorted(set(sub.acked + long_ids) - have)
    rows = jobs_table(world)
    events = events_by_job(world)
    atts = read_attempts(world.work)
    across, across_bad, buffered = [], [], []
    for j, al in atts.items():
        for a in al:
            for k in kills:
                if a.start < k["t_kill"] and (a.end is None or a.end > k["t_kill"]):
                    across.append(j)
                    ok = (rows[j]["attempts"] == a.attempt == 1 and len(al) == 1
                          and not any(m and "lost" in m for _, _, _, m in events[j]))
                    if not ok:
                        across_bad.append({"job": j, "attempts": rows[j]["attempts"],
                                           "log": [(x.attempt, x.how) for x in al],
                                           "events": [(e[0], e[3]) for e in events[j]]})
                    if a.end is not None and a.end < k["t_up"]:
                        buffered.append(j)
    agents_alive = [p.poll() is None for p in agents]
    still = {a["id"] for a in c.agents()}
    out = {"restarts": len(kills), "kill_log": kills, "acked": len(sub.acked) + len(long_ids),
           "missing_acked": len(missing), "missing_examples": missing[:20],
           "submit_calls_failed": sub.failed_calls, "unacked_jobs_sent": sub.unacked_jobs,
           "jobs_in_db": n_all, "unacked_but_stored": n_all - len(sub.acked) - len(long_ids),
           "states": final, "finished": final.get("JOB_FINISHED", 0),
           "tasks_running_across_restart": len(set(across)),
           "readopted_ok": len(set(across)) - len({b["job"] for b in across_bad}),
           "not_readopted": across_bad[:10],
           "updates_buffered_across_restart": len(set(buffered)),
           "agents_survived": sum(agents_alive), "agents": len(agents),
           "agents_still_registered": sum(1 for aid in agent_ids.values() if aid in still),
           "restart_seconds": stats([k["restart_seconds"] for k in kills]),
           "jobs_not_finished_once": [j for j in rows
                                      if rows[j]["state"] == "JOB_FINISHED" and
                                      sum(1 for e in events[j] if e[0] == "JOB_FINISHED") != 1][:20],
           "concurrent_duplicates": len(overlaps(atts))}
    c.close()
    return out


# -- scenario 4: kill -9 the server during heavy writes; check the database -------------------
def sqlite_integrity(path: Path) -> str:
    import sqlite3
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        return ";".join(r[0] for r in con.execute("PRAGMA integrity_check"))
    finally:
        con.close()


def consistency(world: World) -> dict:
    """Job rows against their events and the server's own counts."""
    sql = world.sql
    state_vs_last_event = sql(
        "SELECT count(*) FROM jobs j JOIN job_events e ON e.id = "
        "(SELECT max(id) FROM job_events x WHERE x.job_id = j.id) WHERE e.to_state <> j.state")[0][0]
    jobs_without_events = sql("SELECT count(*) FROM jobs j WHERE NOT EXISTS "
                              "(SELECT 1 FROM job_events e WHERE e.job_id = j.id)")[0][0]
    events_without_job = sql("SELECT count(*) FROM job_events e WHERE NOT EXISTS "
                             "(SELECT 1 FROM jobs j WHERE j.id = e.job_id)")[0][0]
    multi_finish = sql("SELECT count(*) FROM (SELECT job_id FROM job_events WHERE "
                       "to_state = 'JOB_FINISHED' GROUP BY job_id HAVING count(*) > 1) x")[0][0]
    finished_rows = sql("SELECT count(*) FROM jobs WHERE state = 'JOB_FINISHED'")[0][0]
    finish_events = sql("SELECT count(DISTINCT job_id) FROM job_events "
                        "WHERE to_state = 'JOB_FINISHED'")[0][0]
    held_final = sql("SELECT count(*) FROM jobs WHERE agent IS NOT NULL AND state IN "
                     "('JOB_FINISHED', 'FAILED', 'USER_KILLED')")[0][0]
    sql_counts = dict(sql("SELECT state, count(*) FROM jobs GROUP BY state"))
    with world.client() as c:
        server_counts = c.counts()
    return {"state_vs_last_event_mismatches": state_vs_last_event,
            "jobs_without_events": jobs_without_events,
            "events_without_job": events_without_job, "jobs_finished_twice": multi_finish,
            "finished_rows": finished_rows, "jobs_with_finish_event": finish_events,
            "final_jobs_still_leased": held_final,
            "server_counts_match_sql": server_counts == sql_counts,
            "sql_counts": sql_counts, "server_counts": server_counts}


def crash_during_writes(world: World, kills: int = 4, batch: int = 500, n_agents: int = 2,
                        seed: int = 3, up: tuple[float, float] = (0.5, 1.5),
                        log: Callable[[str], None] = lambda m: None) -> dict:
    """Fake-exec agents finish jobs as fast as the server hands them out while a thread adds
    batches of jobs: the server writes all the time. kill -9 it at random moments; on SQLite
    run PRAGMA integrity_check on the crashed file before each restart."""
    rng = random.Random(seed)
    c = world.client(timeout=30)
    c.add_app({"name": "ok", "executable": "/bin/true"})
    for _ in range(n_agents):
        world.start_agent(cores="0", extra=("--fake-exec", "--prefetch", "256"))
    world.wait_agents(c, n_agents)
    sub = Submitter(world, lambda i: [{"name": f"w{i}-{k}", "application": "ok"}
                                      for k in range(batch)], timeout=5)
    sub.start()
    checks = []
    sqlite_file = Path(world.db_url.split("sqlite:///", 1)[1]) if world.db_url.startswith(
        "sqlite:///") else None
    for k in range(kills):
        time.sleep(rng.uniform(*up))
        with world.client(timeout=10) as cc:
            before = cc.status()["stats"]
        world.kill9_server()
        ic = sqlite_integrity(sqlite_file) if sqlite_file else None
        checks.append(ic)
        world.restart_server()
        log(f"crash {k + 1}: integrity {ic}; dispatched {before['dispatched']} before it; "
            f"{len(sub.acked)} jobs acked")
    time.sleep(0.5)
    sub.stop.set()
    sub.join(60)
    if sub.error:
        raise sub.error
    c = world.client(timeout=30)
    n_all = sum(c.counts().values())
    final = wait_final(c, n_all, timeout=120 + n_all / 500)
    missing = sorted(set(sub.acked) - existing_ids(world, sub.acked))
    out = {"crashes": kills, "integrity_checks": checks,
           "integrity_ok": all(x in (None, "ok") for x in checks), "acked": len(sub.acked),
           "missing_acked": len(missing), "unacked_but_stored": n_all - len(sub.acked),
           "jobs_in_db": n_all, "states": final, "db": world.engine().dialect.name}
    out.update(consistency(world))
    c.close()
    world.close()
    if sqlite_file:
        out["integrity_after_stop"] = sqlite_integrity(sqlite_file)
    return out


# -- protocol fuzz -------------------------------------------------------------------------------
CANARY_TOKEN = "pfcanary"


def hostile_scalars(canary: Path) -> list:
    touch = f"{canary}/{CANARY_TOKEN}"
    return [None, True, False, 0, -1, 1, 7, 2**31 - 1, 2**31, 2**32, 2**63 - 1, -2**63,
            2**64 - 1, 0.0, -0.0, 0.5, 1e308, -1e308, float("nan"), float("inf"),
            float("-inf"), "", "x", "\x00", "a\x00b", "ü" * 50, "\u202e\u0000\ufeff",
            f"$(touch {touch}-1)", f"; touch {touch}-2", f"`touch {touch}-3`",
            f"a\ntouch {touch}-4", f"| touch {touch}-5 &", "../../../../etc/passwd",
            "/etc/passwd", "..", ".", "-rf", "--help", "LD_PRELOAD=/tmp/evil.so",
            "PATH=/tmp/evil", "%s%s%s%n", "{0.__class__}", "{job}", "x" * 5000, b"",
            b"\x00\xff\xfe", msgpack.ExtType(5, b"ext"), msgpack.Timestamp(1, 0),
            "READY", "JOB_FINISHED", "RUNNING", "echo", "nap", "fuzz-0"]


#: Ops the fuzz may call (``shutdown`` would stop the server on purpose; it is not fuzzed).
FUZZ_OPS = ["ping", "status", "agent_ls", "app_add", "app_ls", "app_show", "app_alter",
            "app_rm", "job_add", "job_ls", "job_show", "job_counts", "job_summary",
            "job_alter", "job_kill", "job_retry", "job_rm", "pilot_add", "pilot_update",
            "pilot_ls", "site_backlog", "site_report", "site_status", "nonexistent",
            "_delete_jobs", "__class__", "OPS", ""]
ARG_KEYS = ["filter", "ids", "id", "limit", "offset", "newest", "jobs", "spec", "name",
            "changes", "all", "site", "state", "nodes", "walltime_minutes", "reason",
            "batch_id", "application", "parameters", "pid", "host", "paused", "error",
            "scheduler", "queue", "project", "workdir", "x" * 300]
#: Filters that never match a real job (so a fuzzed kill/rm/alter cannot touch the workload)
SAFE_FILTERS = [{}, {"ids": []}, {"ids": "1"}, {"ids": [2**62]}, {"ids": [True]},
                {"ids": [-1]}, {"state": "DONE"}, {"state": ["BOGUS"]}, {"name": "../x"},
                {"name": "no-such-job"}, {"app": "no-such-app"}, {"tag": "$(id)"},
                {"group": {"$ne": ""}}, {"owner": "root"}, {"ids": [2**64 - 1]}, [1], "all", None]


class Fuzzer:
    """Builds hostile frames from a seeded generator. ``next()`` -> (kind, frames)."""

    KINDS = [("random", 10), ("header", 8), ("truncated", 10), ("huge", 8), ("deep", 3),
             ("badutf8", 3), ("envelope", 8), ("wrongtype", 14), ("request", 16),
             ("agent", 10), ("multiframe", 6), ("empty", 4)]

    def __init__(self, seed: int, canary: Path, agent_names: list[str]) -> None:
        self.rng = random.Random(seed)
        self.scalars = hostile_scalars(canary)
        self.agent_names = agent_names
        self.kinds = [k for k, w in self.KINDS for _ in range(w)]

    def value(self, depth: int = 0) -> Any:
        r = self.rng
        x = r.random()
        if depth < 3 and x < 0.12:
            return [self.value(depth + 1) for _ in range(r.choice([0, 1, 2, 5]))]
        if depth < 3 and x < 0.24:
            return {r.choice(ARG_KEYS + list(P.TASK_UPDATE) + ["v", "k"]): self.value(depth + 1)
                    for _ in range(r.choice([0, 1, 2, 4]))}
        return r.choice(self.scalars)

    def pack(self, obj: Any) -> bytes:
        return msgpack.packb(obj, use_bin_type=True)

    def valid(self) -> bytes:
        """A well-formed message of a random kind (the raw material for truncation)."""
        r = self.rng
        name = r.choice(self.agent_names)
        k = r.choice([P.HELLO, P.UPDATE, P.BYE, P.REQUEST])
        if k == P.HELLO:
            return P.encode(P.HELLO, agent=name, host="fuzz", pid=1, site=None, pilot=None,
                            cores=[], gpus=[], memory=1, time_left=None, running=[], ack=0)
        if k == P.UPDATE:
            return P.encode(P.UPDATE, agent=name, useq=r.randrange(1, 100),
                            updates=[{"job": r.randrange(1, 50), "attempt": 1,
                                      "states": ["STAGED_IN", "PREPROCESSED", "RUNNING",
                                                 "EXECUTION_FINISHED", "POSTPROCESSED",
                                                 "STAGED_OUT", "JOB_FINISHED"]}],
                            demand={"cores": 0, "gpus": 0, "max_cores": 1, "max_gpus": 0},
                            ack=0)
        if k == P.BYE:
            return P.encode(P.BYE, agent=name, useq=1, updates=[], released=[])
        return P.encode(P.REQUEST, rid=r.randrange(1, 2**31), op=r.choice(FUZZ_OPS[:6]),
                        args={})

    def args(self) -> dict:
        r = self.rng
        args = {r.choice(ARG_KEYS): self.value() for _ in range(r.choice([0, 1, 2, 3]))}
        if r.random() < 0.6:
            args["filter"] = r.choice(SAFE_FILTERS)
        elif "filter" in args and isinstance(args["filter"], dict):
            args["filter"] = r.choice(SAFE_FILTERS)
        if isinstance(args.get("ids"), list):
            args["ids"] = [2**62]
        if "name" in args and args["name"] in ("nap", "echo", "attempt"):
            args["name"] = "no-such-app"
        if r.random() < 0.3:
            args["jobs"] = [self.hostile_job() for _ in range(r.choice([1, 2, 3]))]
        if r.random() < 0.15:
            args["spec"] = self.hostile_app()
        return args

    def hostile_job(self) -> Any:
        r = self.rng
        j = {"name": r.choice(["ok", self.value()]), "application": r.choice(
            ["nap", "/bin/sh", "nap ", "NAP", "../nap", self.value()]),
             "parameters": r.choice([{"s": self.value()}, self.value(), {"s": 0.01,
                                                                          "evil": "$(id)"}])}
        for _ in range(r.choice([0, 1, 2])):
            j[r.choice(["executable", "argv", "env", "workdir", "state", "id", "attempts",
                        "agent", "app_id", "tags", "group_identifier", "input_url",
                        "output_url", "priority", "parents", "description"])] = self.value()
        if "state" not in j and "executable" not in j and isinstance(j["parameters"], dict) \
                and "s" in j["parameters"] and "evil" not in j["parameters"]:
            j["parameters"]["evil"] = "x"  # keep every fuzzed job invalid
        return j

    def hostile_app(self) -> Any:
        r = self.rng
        return {"name": r.choice(["nap", "fuzzapp", self.value()]),
                "executable": r.choice(["/bin/sh", "sh", "../bin/sh", "/bin/echo\x00",
                                        self.value()]),
                "args": r.choice([["-c", "touch x"], "{s}", [self.value()], self.value()]),
                r.choice(["environment", "shell", "command", "parameters"]): self.value()}

    def next(self) -> tuple[str, list[bytes]]:
        r = self.rng
        kind = r.choice(self.kinds)
        if kind == "random":
            return kind, [r.randbytes(r.choice([1, 2, 3, 5, 8, 16, 64, 256, 1024, 4096]))]
        if kind == "header":
            head = r.choice([0xc0, 0xc1, 0xc2, 0xc4, 0xc5, 0xc6, 0xc7, 0xc8, 0xc9, 0xca, 0xcb,
                             0xcc, 0xcd, 0xce, 0xcf, 0xd0, 0xd4, 0xd8, 0xd9, 0xda, 0xdb, 0xdc,
                             0xdd, 0xde, 0xdf, 0x80, 0x8f, 0x90, 0x9f, 0xa0, 0xbf])
            return kind, [bytes([head]) + r.randbytes(r.choice([0, 1, 4, 9, 33]))]
        if kind == "truncated":
            m = self.valid()
            return kind, [m[:r.randrange(0, len(m))]]
        if kind == "huge":
            big = r.choice([b"\xdb\xff\xff\xff\xff", b"\xdb\x7f\xff\xff\xff", b"\xc6\xff\xff\xff\xff",
                            b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff", b"\xc9\xff\xff\xff\xff\x01",
                            b"\xdc\xff\xff", b"\xde\xff\xff", b"\xda\xff\xff", b"\xc5\xff\xff"])
            tail = r.randbytes(r.choice([0, 3, 100]))
            if r.random() < 0.5:  # inside a valid envelope, as the value of a field
                pre = (b"\x84" + self.pack("v") + self.pack(P.VERSION) + self.pack("k")
                       + self.pack(P.REQUEST) + self.pack("rid") + self.pack(1)
                       + self.pack(r.choice(["op", "args"])))
                return kind, [pre + big + tail]
            return kind, [big + tail]
        if kind == "deep":
            depth = r.choice([100, 1000, 5000, 100_000])
            opener = r.choice([b"\x91", b"\x81\xa1a"])
            return kind, [opener * depth + b"\xc0"]
        if kind == "badutf8":
            bad = r.choice([b"\xff\xfe", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"])
            body = (b"\x83" + self.pack("v") + self.pack(P.VERSION) + self.pack("k")
                    + bytes([0xa0 | len(bad)]) + bad + self.pack("x") + self.pack(1))
            return kind, [body]
        if kind == "envelope":
            env = {"v": r.choice([1, 1, 1, 0, 2, "1", None, 1.0, True, -1, 2**64 - 1]),
                   "k": r.choice([P.REQUEST, P.HELLO, P.UPDATE, P.BYE, P.WELCOME, P.TASKS,
                                  P.REPLY, P.ERROR, P.CANCEL, "", "REQUEST", None, 1, ["request"]])}
            env.update({r.choice(ARG_KEYS + ["rid", "op", "args"]): self.value()
                        for _ in range(r.choice([0, 1, 3]))})
            return kind, [self.pack(env)]
        if kind == "wrongtype":
            k = r.choice([P.HELLO, P.UPDATE, P.BYE, P.REQUEST])
            schema = P.SCHEMAS[k]
            fields = {f: self.value() for f in schema if r.random() < 0.9}
            fields.update(v=P.VERSION, k=k)
            return kind, [self.pack(fields)]
        if kind == "request":
            return kind, [P.encode(P.REQUEST, rid=r.randrange(0, 2**40),
                                   op=r.choice(FUZZ_OPS), args=self.args())]
        if kind == "agent":
            name = r.choice(self.agent_names)
            k = r.choice([P.HELLO, P.UPDATE, P.UPDATE, P.BYE])
            if k == P.HELLO:
                return kind, [P.encode(
                    P.HELLO, agent=name, host=r.choice(["h", self.value()]),
                    pid=r.choice([1, self.value()]), site=r.choice([None, self.value()]),
                    pilot=None, cores=r.choice([[], [0], self.value()]), gpus=[],
                    memory=r.choice([1, self.value()]), time_left=self.value(),
                    running=r.choice([[], [{"job": 1, "attempt": 1}], [self.value()],
                                      self.value()]), ack=r.choice([0, self.value()]))]
            if k == P.UPDATE:
                item = {"job": r.choice([1, 2, self.value()]),
                        "attempt": r.choice([1, self.value()]),
                        "states": r.choice([["JOB_FINISHED"], ["RUNNING", "STAGED_IN"],
                                            [self.value()], self.value()]),
                        r.choice(["exit", "start", "end", "msg", "shell"]): self.value()}
                # demand never asks for cores: the fuzz agents must not take real work
                demand = r.choice([{"cores": 0, "gpus": 0, "max_cores": 1, "max_gpus": 0},
                                   {"cores": self.value(), "gpus": 0, "max_cores": 1},
                                   self.value()])
                if isinstance(demand, dict) and isinstance(demand.get("cores"), int) \
                        and not isinstance(demand.get("cores"), bool) and demand["cores"] > 0:
                    demand["cores"] = 0
                return kind, [P.encode(P.UPDATE, agent=name, useq=r.choice([1, self.value()]),
                                       updates=r.choice([[item], self.value()]),
                                       demand=demand, ack=r.choice([0, self.value()]))]
            return kind, [P.encode(P.BYE, agent=name, useq=r.choice([1, self.value()]),
                                   updates=r.choice([[], self.value()]),
                                   released=r.choice([[{"job": 1, "attempt": 1}],
                                                      self.value()]))]
        if kind == "multiframe":
            n = r.choice([2, 3, 5])
            return kind, [r.choice([self.valid(), b"", r.randbytes(8)]) for _ in range(n)]
        return kind, [b""] * r.choice([1, 2, 3])  # empty frames


def fuzz_server(address: str, n: int, seed: int, canary: Path, home: Path | None = None,
                sockets: int = 12, rss_pid: int | None = None, chunk: int = 2000,
                sync_timeout: float = 10.0) -> dict:
    """Send ``n`` fuzzed messages from ``sockets`` DEALERs (several identities) without waiting
    for answers, draining what comes back as it comes. After every ``chunk`` messages each
    socket sends a ping and the fuzz waits for those answers (the server handles one
    connection's messages in order, so then it has handled everything sent before): that
    bounds the backlog, and ``rss_pid`` (the server) is sampled there. With ``home``, the
    sockets use that home's CurveZMQ client keys: the fuzz is an authenticated insider."""
    curve = client_curve(home, address) if home is not None else None
    ctx = zmq.Context()
    socks, names = [], []
    for i in range(sockets):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, 100_000)
        s.setsockopt(zmq.RCVHWM, 100_000)
        if i % 3 != 2:  # a third keep the identity libzmq picks
            name = f"fuzz-{seed}-{i}"
            s.setsockopt(zmq.ROUTING_ID, name.encode())
            names.append(name)
        if curve is not None:
            apply_client(s, curve)
        s.connect(address)
        socks.append(s)
    names = names or ["fuzz"]
    fz = Fuzzer(seed, canary, names)
    kinds: dict[str, int] = defaultdict(int)
    answers: dict[str, int] = defaultdict(int)
    internal: list[str] = []
    sentinel_rid = 2**40 + seed
    pending: set[int] = set()
    poller = zmq.Poller()
    for s in socks:
        poller.register(s, zmq.POLLIN)

    def drain(timeout_ms: int = 0) -> None:
        for s, _ in poller.poll(timeout_ms):
            while True:
                try:
                    frames = s.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                try:
                    kind, m = P.decode(frames[-1])
                except Exception:
                    answers["undecodable"] += 1
                    continue
                if kind == P.REPLY and m.get("rid") == sentinel_rid:
                    pending.discard(id(s))
                    continue
                answers[kind] += 1
                err = m.get("error") or ""
                if "internal server error" in err:
                    internal.append(err)

    def sync() -> float:
        t = time.time()
        for s in socks:
            s.send(P.encode(P.REQUEST, rid=sentinel_rid, op="ping", args={}))
            pending.add(id(s))
        deadline = time.monotonic() + sync_timeout
        while pending and time.monotonic() < deadline:
            drain(100)
        lost_pings.append(len(pending))  # a ping never answered: its reply was dropped
        pending.clear()
        return time.time() - t

    lost_pings: list[int] = []
    rss_samples = [rss(rss_pid)] if rss_pid else []
    sync_waits = []
    t0 = time.time()
    for i in range(n):
        kind, frames = fz.next()
        kinds[kind] += 1
        socks[i % len(socks)].send_multipart(frames, copy=False)
        if i % 250 == 249:
            drain(0)
        if i % chunk == chunk - 1 or i == n - 1:
            sync_waits.append(sync())
            if rss_pid:
                rss_samples.append(rss(rss_pid))
    seconds = time.time() - t0
    for s in socks:
        s.close(linger=0)
    ctx.term()
    return {"sent": n, "seed": seed, "kinds": dict(kinds), "answers": dict(answers),
            "answered": sum(answers.values()), "internal_errors": len(internal),
            "internal_error_examples": internal[:5], "seconds": round(seconds, 3),
            "messages_per_second": round(n / seconds), "sockets": sockets,
            "max_sync_wait": round(max(sync_waits), 3), "unanswered_pings": sum(lost_pings),
            "rss_mb": [round(x / 2**20, 1) for x in rss_samples]}


# -- a stand-in server that hands hostile tasks to a real agent --------------------------------
class FakeServer:
    """A ROUTER on ipc:// (plain, as the protocol allows on one machine) that speaks just enough
    of the protocol to one real agent: welcome its hello, acknowledge its updates, send it
    whatever tasks (or raw frames) a test wants. Every update item is kept in ``updates``."""

    def __init__(self, where: Path) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.address = f"ipc://{where}/fake-server"
        self.sock.bind(self.address)
        self.identity: bytes | None = None
        self.agent: str | None = None
        self.seq = 0
        self.useq = 0
        self.updates: list[dict] = []
        self.errors = 0

    def pump(self, timeout: float = 0.1) -> None:
        """Answer what the agent sent: hello -> welcome, update/bye -> an empty task batch."""
        while self.sock.poll(int(timeout * 1000)):
            timeout = 0
            frames = self.sock.recv_multipart()
            try:
                kind, m = P.decode(frames[-1])
            except Exception:
                self.errors += 1
                continue
            self.identity = frames[0]
            if kind == P.HELLO:
                self.agent = m["agent"]
                self.send(P.encode(P.WELCOME, agent=m["agent"], heartbeat=1.0, revoke=[]))
            elif kind in (P.UPDATE, P.BYE):
                self.useq = m["useq"]
                self.updates += m["updates"]
                self.send(P.encode(P.TASKS, seq=self.seq, tasks=[], refused=[],
                                   uack=self.useq))

    def send(self, *frames: bytes) -> None:
        self.sock.send_multipart([self.identity, *frames])

    def send_tasks(self, tasks: list[dict]) -> None:
        self.seq += 1
        self.send(P.encode(P.TASKS, seq=self.seq, tasks=tasks, refused=[], uack=self.useq))

    def wait_updates(self, pred: Callable[[list[dict]], bool], timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not pred(self.updates):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out; updates so far: {self.updates}")
            self.pump(0.1)

    def final_states(self) -> dict[int, dict]:
        """job -> its last update item with a final state (a failure or JOB_FINISHED)."""
        out = {}
        for u in self.updates:
            if u["states"] and (u["states"][-1].endswith("FAILED") or
                                u["states"][-1] in ("JOB_FINISHED", "RUN_TIMEOUT")):
                out[u["job"]] = u
        return out

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()


def task_spec(job: int, workdir: str, argv: list | None = None, **over) -> dict:
    spec = {"job": job, "attempt": 1, "name": f"t{job}", "argv": argv or ["/bin/true"],
            "env": {}, "workdir": workdir, "cores": 1, "gpus": 0}
    spec.update(over)
    return spec


# -- injection ----------------------------------------------------------------------------------
def injection_values(canary: Path) -> list[str]:
    """Strings a shell would act on; each must reach the task as one literal argv item."""
    c = f"{canary}/{CANARY_TOKEN}"
    return [f"$(touch {c}-v1)", f"`touch {c}-v2`", f"; touch {c}-v3", f"| touch {c}-v4",
            f"&& touch {c}-v5", f"x\ntouch {c}-v6", f"${{IFS}}touch${{IFS}}{c}-v7",
            f"$(touch${{IFS}}{c}-v8)", f"'; touch {c}-v9; '", f'"; touch {c}-v10; "',
            f"> {c}-v11", f"< /etc/passwd > {c}-v12", f"a & touch {c}-v13 &",
            f"$((1+1)) $HOME ~root *", "LD_PRELOAD=/nonexistent/evil.so", "PATH=/tmp/evil:$PATH",
            "../../../../etc/passwd", "/etc/passwd", "--help", "-c", "\x41\n", "%s%n%x",
            "{0.__class__}", "\u202e\ufeff"]


def _refused(call: Callable[[], Any]) -> str | None:
    """The one-line error ``call`` was refused with, or None when it was accepted."""
    try:
        call()
    except PilotfishError as exc:
        text = str(exc)
        return text if text and "\n" not in text and "internal" not in text else None
    return None


def injection_battery(world: World, agent_side: bool = True, timeout: float = 90) -> dict:
    """Hostile values where users (and a hostile server) can put them; each attempt is either
    refused with a clear one-line error that changes nothing, or proven inert: it reached the
    task as literal data, nothing was executed (no canary file) and nothing was written outside
    the work root. Needs a running server and no agent yet; starts one agent."""
    canary = world.canary
    evilbin = world.root / "evilbin"
    evilbin.mkdir(exist_ok=True)
    # programs a PATH lookup would find first: they would leave a canary if ever run
    for name in {"python3", "python", Path(PY).name, "echo", "true", "sh", "env"}:
        f = evilbin / name
        f.write_text(f"#!/bin/sh\n: > {canary}/{CANARY_TOKEN}-evilbin-{name}\n")
        f.chmod(0o755)
    c = f"{canary}/{CANARY_TOKEN}"
    env_literal = f"$(touch {c}-e1) `touch {c}-e2`; touch {c}-e3\n$HOME"
    # (LD_PRELOAD and BASH_ENV are refused by name now: see the environment checks below)
    app_env = {"PATH": f"{evilbin}:/usr/bin:/bin", "PROBE_LITERAL": env_literal}
    cl = world.client()
    cl.add_app({"name": "probe", "executable": PY,
                "args": ["-S", "-I", str(ENV_PROBE), "{v}", "--in={p}"],
                "parameters": {"v": {"type": "str", "pattern": "(?s).*"},
                               "p": {"type": "path", "default": "in.dat"}},
                "environment": app_env,
                "preprocess": ["/bin/echo", f"$(touch {c}-pre1)", f"`touch {c}-pre2`"],
                "postprocess": ["/bin/echo", f"; touch {c}-post1", f"| touch {c}-post2"]})
    cl.add_app({"name": "safe", "executable": "/bin/echo", "args": ["{v}"],
                "parameters": {"v": {"type": "str"}}})
    outside_before = files_outside(world.root, (world.work, world.home))
    attempts, blocked, failures = 0, 0, []

    def count(ok: bool, what: str) -> None:
        nonlocal attempts, blocked
        attempts += 1
        blocked += ok
        if not ok:
            failures.append(what)

    # 1. refused at the door; the database must not change
    snap = (cl.counts(), cl.jobs(limit=0), cl.apps())
    values = injection_values(canary)
    import re
    from pilotfish.server.apps import SAFE_STRING
    for v in values:  # a str parameter without its own pattern takes no shell syntax
        if not re.fullmatch(SAFE_STRING, v):
            err = _refused(lambda: cl.add_jobs([{"name": "s", "application": "safe",
                                                 "parameters": {"v": v}}]))
            count(err is not None and "pattern" in err, f"safe str {v!r}: {err}")
    for p in ["/etc/passwd", "../x", "a/../../b", "x\ny", "$(id)", "~root", "a b", "x\x00",
              f"{canary}/x", ".", "a//b"]:
        err = _refused(lambda: cl.add_jobs([{"name": "p", "application": "probe",
                                             "parameters": {"v": "x", "p": p}}]))
        count(err is not None, f"path parameter {p!r}: {err}")
    for key, val in [("executable", "/bin/sh"), ("args", ["-c", f"touch {c}-k"]),
                     ("environment", {"LD_PRELOAD": "/tmp/evil.so"}), ("env", {"PATH": "/tmp"}),
                     ("workdir", "/etc"), ("state", "JOB_FINISHED"), ("id", 1), ("attempts", 99),
                     ("agent", "me"), ("app_id", 1), ("preprocess", ["/bin/sh"]),
                     ("postprocess", ["/bin/sh"]), ("exit_code", 0), ("retries", -5),
                     ("created", 0), ("argv", ["/bin/sh", "-c", "id"])]:
        err = _refused(lambda: cl.add_jobs([{"name": "k", "application": "probe",
                                             "parameters": {"v": "x"}, key: val}]))
        count(err is not None and "unknown job key" in err, f"job key {key}: {err}")
    for app in ["/bin/sh", PY, "probe/../sh", "probe ", " probe", "PROBE", "probe;id", "$(id)",
                "probe\x00", "", "../probe"]:
        err = _refused(lambda: cl.add_jobs([{"name": "a", "application": app,
                                             "parameters": {"v": "x"}}]))
        count(err is not None, f"application {app!r}: {err}")
    for k, v in [("BASH_FUNC_x%%", "() { id; }"), ("A=B", "x"), ("", "x"), ("A B", "x"),
                 ("1X", "x"), ("X", "a\x00b"), ("X\n", "x"),
                 # loader and shell variables (pilotfish.envpolicy): refused by name
                 ("LD_PRELOAD", f"$(touch {c}-ld)"), ("BASH_ENV", f"{evilbin}/sh"),
                 ("LD_AUDIT", "/tmp/evil.so"), ("PILOTFISH_JOB_ID", "1")]:
        err = _refused(lambda: cl.add_app({"name": "envapp", "executable": "/bin/true",
                                           "environment": {k: v}}))
        count(err is not None, f"app environment {k!r}={v!r}: {err}")
    for op in ["_delete_jobs", "_set_state", "where_of", "op", "__class__", "__init__", "OPS",
               "ping\x00", "ping ", "../ping", "job_add;job_rm", "shutdown\n"]:
        err = _refused(lambda: cl.call(op, filter={"ids": [1]}))
        count(err is not None, f"op {op!r}: {err}")
    count((cl.counts(), cl.jobs(limit=0), cl.apps()) == snap, "a refused request changed the DB")

    # 2. accepted, must be inert: literal argv item, literal environment, no shell anywhere
    ids = cl.add_jobs([{"name": f"inj{i}", "application": "probe", "parameters": {"v": v}}
                       for i, v in enumerate(values)])
    agent = world.start_agent(cores="0")
    final = wait_final(cl, len(ids), timeout, {"ids": ids})
    for i, (jid, v) in enumerate(zip(ids, values)):
        job = cl.job(jid)
        wd = world.work / job["workdir"]
        try:
            probe = __import__("json").loads((wd / "probe.json").read_text())
        except (OSError, ValueError) as exc:
            count(False, f"value {v!r}: no probe ({exc}; state {job['state']})")
            continue
        e = probe["env"]
        ok = (job["state"] == "JOB_FINISHED" and probe["argv"] == [v, "--in=in.dat"]
              and e.get("PROBE_LITERAL") == env_literal and e.get("PATH") == app_env["PATH"]
              and "LD_PRELOAD" not in e and "BASH_ENV" not in e
              and probe["cwd"] == str(wd)
              and (wd / "preprocess.out").read_text() ==
              f"$(touch {c}-pre1) `touch {c}-pre2`\n")
        count(ok, f"value {v!r}: {probe['argv']} in {probe['cwd']}, state {job['state']}")
    # 3. a hostile server: task workdirs that leave the work root are refused by the agent
    agent_results = {}
    if agent_side:
        agent_results = hostile_workdirs(world)
        for wd, ok in agent_results.items():
            count(ok, f"agent took workdir {wd!r}")
    found = canaries(world.root)
    new_files = sorted(files_outside(world.root, (world.work, world.home)) - outside_before)
    count(not found, f"canaries: {found}")
    count(not new_files, f"files outside the work root: {new_files[:10]}")
    # option-like values pass both the default str pattern and path checks (argv injection
    # into the app's own options): reported, not counted as blocked
    option_like = [v for v in ("-rf", "--help", "--output=x") if _refused(
        lambda: cl.add_jobs([{"name": "o", "application": "safe", "parameters": {"v": v}}]))
        is None]
    option_like += [p for p in ("-rf", "--version") if _refused(
        lambda: cl.add_jobs([{"name": "o", "application": "probe",
                              "parameters": {"v": "x", "p": p}}])) is None]
    cl.kill_jobs({"app": "safe"})
    cl.kill_jobs({"name": "o"})
    cl.close()
    return {"attempts": attempts, "blocked": blocked, "failures": failures[:20],
            "canaries": found, "new_files_outside_work_root": new_files[:20],
            "final": final, "option_like_values_accepted": option_like,
            "agent_alive": agent.poll() is None}


HOSTILE_WORKDIRS = ["../escape", "/tmp/pfcanary-abs", "a/../../b", "", ".", "a//b",
                    "$(touch pfcanary-wd)", "..", "~root", "a/b/../../../c", "a/./b", "a b",
                    "x;touch pfcanary-wd2", "\nx"]


def hostile_workdirs(world: World, timeout: float = 30) -> dict[str, bool]:
    """A stand-in server leases tasks with hostile workdirs to a real agent (one task per
    message); each must end STAGE_IN_FAILED with nothing made outside the work root."""
    fs = FakeServer(world.home)
    agent = world.start_agent(cores="0", server=fs.address)
    try:
        deadline = time.monotonic() + timeout
        while fs.agent is None and time.monotonic() < deadline:
            fs.pump(0.1)
        base = 100_000
        for i, wd in enumerate(HOSTILE_WORKDIRS):
            fs.send_tasks([task_spec(base + i, wd, argv=["/bin/sh", "-c", "touch pfcanary-ran"])])
        fs.wait_updates(lambda u: len(fs.final_states()) >= len(HOSTILE_WORKDIRS), timeout)
        done = fs.final_states()
        return {wd: done[base + i]["states"][-1] == "STAGE_IN_FAILED"
                and "workdir" in (done[base + i]["msg"] or "")
                for i, wd in enumerate(HOSTILE_WORKDIRS)}
    finally:
        agent.terminate()
        deadline = time.monotonic() + 10
        while agent.poll() is None and time.monotonic() < deadline:
            fs.pump(0.1)  # answer its goodbye
        if agent.poll() is None:
            agent.kill()
        agent.wait()
        fs.close()


def rss(pid: int) -> int:
    import psutil
    return psutil.Process(pid).memory_info().rss


def files_outside(root: Path, skip: tuple[Path, ...]) -> set[str]:
    """Every file and directory under ``root`` except the ``skip`` subtrees."""
    out = set()
    skip_s = tuple(str(s) for s in skip)
    for dirpath, dirnames, filenames in os.walk(root):
        if dirpath.startswith(skip_s):
            dirnames[:] = []
            continue
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            if not p.startswith(skip_s):
                out.add(p)
    return out


def canaries(*roots: Path) -> list[str]:
    """Files named like our canaries under ``roots`` (and /tmp, where a relative path or a
    misdirected touch might land)."""
    found = []
    for root in (*roots, Path("/tmp")):
        try:
            it: Iterator = (root.rglob(f"*{CANARY_TOKEN}*") if root != Path("/tmp")
                            else root.glob(f"*{CANARY_TOKEN}*"))
            found += [str(p) for p in it]
        except OSError:
            pass
    return found


def new_token() -> str:
    return uuid.uuid4().hex[:8]
