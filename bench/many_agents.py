#!/usr/bin/env python3
"""A thousand nodes: one real server against many simulated agents held by a few processes.

The server is what a user starts (``pilotfish server start`` on SQLite, tcp with CurveZMQ, as by
default; ``--db postgres``: on a scratch PostgreSQL database). Each simulated agent is one real
DEALER socket with its own agent id, routing id and connection, under a CurveZMQ key with the
role ``agent``, speaking the real agent protocol (:mod:`pilotfish.protocol`): hello -> welcome
(an unanswered hello is re-sent after 2, 4, then every 8 heartbeats, and a welcome to an older
hello is ignored, as pilot/agent.py does), updates with demand and state paths, answered by task
batches, ZMTP link heartbeats as the real agent sets them, a heartbeat every half period while
it holds tasks (each up to 20 % early, drawn at random, as the real agent's), at most one update
in flight, progress reported after the executor's REPORT_DELAY and ends at once. FAKE EXECUTION:
no process is spawned; a task "runs" ``--task-seconds`` on its cores (the real agent's
``--fake-exec`` finishes at once). Not simulated: fencing and the guard, the link monitor, task
output.

Phases: the jobs are added first (the server holds them queued; ``--rate``: a second's worth,
then a feeder thread adds them at that rate, an open loop); then the worker processes
connect their agents, which take work as they are welcomed; the steady window starts
``--warmup`` seconds after the last agent joined and ends when the queue runs dry or after
``--seconds``; then the agents stay connected idle for ``--idle`` seconds (the idle heartbeat
baseline), and leave with a goodbye.

Figures (one JSON line each): dispatch_tasks_per_second (the server's ``dispatched`` counter
over the steady window) and finished_tasks_per_second (JOB_FINISHED persisted), with the cores
each part used over that window (the server's loop thread, its libzmq I/O threads, the harness's
processes, PostgreSQL's, the machine's idle: where a saturated run's time went), heartbeat_rtt
p99 (send of an update -- every update is a heartbeat -- to the task batch that acknowledges
it, seen by the simulated agent; connect, busy and idle phases; the harness's own loop delay is
reported beside it, as it is inside the figure), agents_lost (agents the server declared LOST
or told to say hello again: all were alive), server_rss_mb (idle before agents, peak).
"""
from __future__ import annotations

import heapq
import json
import os
import random
import resource
import secrets
import socket
import subprocess
import sys
import time
import uuid
from collections import deque
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402
import zmq  # noqa: E402

from pilotfish import keys  # noqa: E402
from pilotfish import protocol as P  # noqa: E402
from pilotfish import settings  # noqa: E402
from pilotfish.pilot.agent import (BEAT_JITTER, HELLO_BACKOFF, LINK_PING,  # noqa: E402
                                   LINK_TIMEOUT, PREFETCH_HORIZON, PREFETCH_MAX,
                                   REPORT_INTERVAL)
from pilotfish.pilot.executor import REPORT_DELAY, SUCCESS_PATH  # noqa: E402

START_STATES, END_STATES = SUCCESS_PATH[:3], SUCCESS_PATH[3:]
TARGETS = {"dispatch": 10_000, "heartbeat_p99_ms": 50.0, "lost": 0}
KEY_NAME = "sim-agents"


# -- the simulated agent (runs in a worker process) --------------------------------------------
class SimAgent:
    """One node agent's protocol side, with a fake executor of ``cores`` cores."""

    def __init__(self, w: "Worker", n: int) -> None:
        self.w, self.n = w, n
        self.id = uuid.uuid4().hex
        s = self.sock = w.ctx.socket(zmq.DEALER)
        # as pilot/agent.py sets its socket: a secret routing id, reconnects, ZMTP heartbeats
        s.setsockopt(zmq.ROUTING_ID, f"{self.id}.{secrets.token_hex(16)}".encode())
        s.setsockopt(zmq.LINGER, 500)
        s.setsockopt(zmq.RECONNECT_IVL, 100)
        s.setsockopt(zmq.RECONNECT_IVL_MAX, 500)
        s.setsockopt(zmq.HEARTBEAT_IVL, int(LINK_PING * 1000))
        s.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(LINK_TIMEOUT * 1000))
        keys.apply_client(s, w.curve)
        s.connect(w.address)
        self.cores = w.cores
        self.free = w.cores
        self.queue: deque = deque()          # (job, attempt, cores) received, not started
        self.queued_cores = 0
        self.pending: dict[int, list] = {}   # job -> see start_ready
        self.progress: deque = deque()       # (report due, job): running, start not reported
        self.ended: list[int] = []           # jobs ended, not reported
        self.useq = self.acked = self.ack = 0
        self.sent_at: dict[int, tuple[float, bool]] = {}  # useq -> (send time, heartbeat only)
        self.epoch = None
        self.welcomed = False
        self.heartbeat = w.heartbeat
        self.last_sent = 0.0
        self.beat_factor = 1.0
        self.hellos_unanswered = 0
        self.last_demand = None
        self.avg_run: float | None = None
        self.received = self.finished = self.hellos = self.say_hello = 0
        self.hello_useq = 0

    # -- the fake executor ------------------------------------------------------------------
    def start_ready(self, now: float) -> None:
        while self.queue and self.queue[0][2] <= self.free:
            job, attempt, cores = self.queue.popleft()
            self.queued_cores -= cores
            self.free -= cores
            # [attempt, states not yet reported, start, end, cores]
            self.pending[job] = [attempt, list(START_STATES), now, None, cores]
            self.progress.append((now + REPORT_DELAY, job))
            heapq.heappush(self.w.ends, (now + self.w.task_seconds, self.n, job))

    def end(self, job: int, now: float) -> None:
        p = self.pending.get(job)
        if p is None or p[3] is not None:
            return
        p[1].extend(END_STATES)
        p[3] = now
        self.ended.append(job)
        self.free += p[4]
        self.avg_run = self.w.task_seconds
        self.finished += 1
        self.start_ready(now)
        self.w.dirty.add(self.n)

    def due(self, now: float) -> bool:
        """A heartbeat, a hello or a progress report is due without any message."""
        if not self.welcomed:
            return now - self.last_sent > self.hello_every()
        return now - self.last_sent >= self.beat_every() or \
            bool(self.progress and self.progress[0][0] <= now and self.useq <= self.acked)

    def demand(self) -> dict:
        # pilot/agent.py prefetch_cores: PREFETCH_HORIZON seconds of work per core, capped
        avg = self.avg_run
        pf = self.cores if avg is None else \
            int(self.cores * min(PREFETCH_MAX, max(1.0, PREFETCH_HORIZON / max(avg, 1e-4))))
        # after the window the agents take no more work, as an agent at its --max-tasks
        want = 0 if self.w.phase in ("drain", "idle") else self.free + pf - self.queued_cores
        return {"cores": max(0, want), "gpus": 0,
                "max_cores": self.cores, "max_gpus": 0, "time_left": None}

    # -- messages ---------------------------------------------------------------------------
    def send(self, frame: bytes, heartbeat_only: bool, now: float) -> None:
        try:
            self.sock.send(frame, zmq.NOBLOCK)
        except zmq.Again:
            return
        self.last_sent = now
        self.beat_factor = random.uniform(1.0 - BEAT_JITTER, 1.0)
        self.sent_at[self.useq] = (time.perf_counter(), heartbeat_only)

    def hello(self, now: float) -> None:
        self.useq += 1
        self.hellos += 1
        self.hellos_unanswered += 1
        self.hello_useq = self.useq
        held = [{"job": j, "attempt": p[0]} for j, p in self.pending.items()] + \
            [{"job": j, "attempt": a} for j, a, _ in self.queue]
        self.send(P.encode(P.HELLO, agent=self.id, host=socket.gethostname(), pid=os.getpid(),
                           site=None, pilot=f"sim-{self.w.index}", cores=list(range(self.cores)),
                           gpus=[], memory=256 * 2**30, time_left=None, running=held,
                           ack=self.ack, node=f"sim{self.w.index}-{self.n}",
                           node_cores=self.cores, launcher=None, mpi=None, useq=self.useq),
                  False, now)
        self.last_demand = None

    def hello_every(self) -> float:  # pilot/agent.py's backoff (no reconnects here)
        return self.heartbeat * min(HELLO_BACKOFF, 2 ** self.hellos_unanswered) \
            * self.beat_factor

    def beat_every(self) -> float:  # with pilot/agent.py's jitter
        return (self.heartbeat / 2 if (self.queue or self.pending) else self.heartbeat) \
            * self.beat_factor

    def maybe_send(self, now: float) -> bool:
        """pilot/agent.py send_update: True when something was sent (or nothing is due)."""
        if not self.welcomed:
            if now - self.last_sent > self.hello_every():  # as pilot/agent.py
                self.hello(now)
            return True
        beat = now - self.last_sent >= self.beat_every()
        if self.useq > self.acked and not beat:
            return True   # the answer will make us dirty again
        starving = not self.queue and self.free
        if not beat and not starving and now - self.last_sent < REPORT_INTERVAL:
            return False  # try again in a moment
        d = self.demand()
        updates = []
        progress, pending = self.progress, self.pending
        while progress and progress[0][0] <= now:  # the executor's REPORT_DELAY
            job = progress.popleft()[1]
            p = pending.get(job)
            if p is not None and p[3] is None and p[1]:
                updates.append({"job": job, "attempt": p[0], "states": p[1], "exit": None,
                                "start": p[2], "end": None, "msg": None})
                p[1] = []
        for job in self.ended:
            p = pending.pop(job)
            updates.append({"job": job, "attempt": p[0], "states": p[1], "exit": 0,
                            "start": p[2], "end": p[3], "msg": None})
        self.ended = []
        if not updates and not beat and d["cores"] == self.last_demand:
            return True
        self.useq += 1
        self.last_demand = d["cores"]
        self.send(P.encode(P.UPDATE, agent=self.id, useq=self.useq, updates=updates, demand=d,
                          ack=self.ack, epoch=self.epoch), not updates, now)
        return True

    def on_message(self, frame: bytes, now: float) -> None:
        kind, m = P.decode(frame, (P.WELCOME, P.TASKS, P.CANCEL, P.ERROR, P.STOPPING))
        w = self.w
        if kind == P.TASKS:
            uack = m["uack"]
            sent = self.sent_at.pop(uack, None)
            if sent is not None:
                w.rtt(time.perf_counter() - sent[0], sent[1])
            for u in [u for u in self.sent_at if u < uack]:
                del self.sent_at[u]
            self.acked = max(self.acked, uack)
            if m["tasks"]:
                self.ack = max(self.ack, m["seq"])
                for t in m["tasks"]:
                    self.queue.append((t["job"], t["attempt"], t["cores"]))
                    self.queued_cores += t["cores"]
                self.received += len(m["tasks"])
                w.received += len(m["tasks"])
                self.start_ready(now)
        elif kind == P.WELCOME:
            sent = self.sent_at.pop(m.get("uack"), None)
            if sent is not None:
                w.hello_rtt.append(time.perf_counter() - sent[0])
            if m.get("uack") is not None and m["uack"] < self.hello_useq:
                w.stale_welcomes += 1  # as pilot/agent.py: the answer to our newest follows
                return
            self.epoch = m.get("epoch")
            self.welcomed = True
            self.hellos_unanswered = 0
            self.heartbeat = min(self.heartbeat, float(m["heartbeat"]))
            self.acked = self.useq
            for r in m["revoke"]:  # never in this harness: nothing is lost or restarted
                w.errors.append(f"revoked job {r['job']}")
            if self.hellos > 1:
                w.rewelcomed += 1
        elif kind == P.ERROR:
            if "say hello" in m["error"]:
                self.say_hello += 1
                self.welcomed = False
                self.acked = self.useq
                self.hello(now)
            else:
                w.errors.append(m["error"][:200])
        elif kind == P.CANCEL:
            w.errors.append(f"cancel {m['jobs'][:3]}")
        w.dirty.add(self.n)

    def bye(self) -> None:
        self.useq += 1
        released = [{"job": j, "attempt": p[0]} for j, p in self.pending.items()] + \
            [{"job": j, "attempt": a} for j, a, _ in self.queue]
        try:
            self.sock.send(P.encode(P.BYE, agent=self.id, useq=self.useq, updates=[],
                                    released=released, epoch=self.epoch), zmq.NOBLOCK)
        except zmq.ZMQError:
            pass


class Worker:
    """Holds ``count`` simulated agents in this process; one poll loop for all of them.

    Commands on standard input, one per line: ``phase NAME`` (RTT samples from now on are
    booked under NAME), ``stop`` (say goodbye, print the results as one JSON line, exit)."""

    def __init__(self, a) -> None:
        self.index, self.address, self.cores = a.index, a.address, a.cores
        self.heartbeat, self.task_seconds = a.heartbeat, a.task_seconds
        home = Path(a.home)
        self.curve = keys.client_curve(home, a.address, client_key=a.client_key)
        self.ctx = zmq.Context(io_threads=1)
        self.ctx.set(zmq.MAX_SOCKETS, a.count + 64)
        self.ends: list = []       # heap of (end time, agent, job)
        self.dirty: set[int] = set()
        self.received = 0
        self.rewelcomed = 0
        self.stale_welcomes = 0
        self.errors: list[str] = []
        self.hello_rtt: list[float] = []
        self.phase = "connect"
        self.samples: dict[str, dict[str, list[float]]] = {}
        self.loop_lag: dict[str, list[float]] = {}
        self.agents = [SimAgent(self, i) for i in range(a.count)]
        self.by_sock = {ag.sock: ag for ag in self.agents}

    def rtt(self, seconds: float, heartbeat_only: bool) -> None:
        d = self.samples.setdefault(self.phase, {"all": [], "heartbeat_only": []})
        d["all"].append(seconds)
        if heartbeat_only:
            d["heartbeat_only"].append(seconds)

    def run(self) -> None:
        poller = zmq.Poller()
        for ag in self.agents:
            poller.register(ag.sock, zmq.POLLIN)
        poller.register(sys.stdin.fileno(), zmq.POLLIN)
        now = time.time()
        # spread the hellos over a moment, as nodes of an allocation start
        for ag in self.agents:
            ag.hello(now)
        retry: set[int] = set()
        next_sweep = 0.0
        stdin = sys.stdin.fileno()
        buf = b""
        while True:
            timeout = 0.005 if (retry or self.dirty) else 0.05
            if self.ends:
                timeout = min(timeout, max(0.0, self.ends[0][0] - time.time()))
            events = poller.poll(timeout * 1000)
            t0 = time.perf_counter()
            now = time.time()
            for sock, _ in events:
                if sock == stdin:
                    chunk = os.read(stdin, 4096)
                    if not chunk:
                        return self.stop()
                    buf += chunk
                    while b"\n" in buf:
                        line, buf = buf.split(b"\n", 1)
                        cmd = line.decode().split()
                        if cmd and cmd[0] == "phase":
                            self.phase = cmd[1]
                            if self.phase != "idle":  # the demand is 0 since "drain": idle
                                # heartbeats come due on their own, not all in one burst
                                self.dirty.update(range(len(self.agents)))  # tell the demand
                        elif cmd and cmd[0] == "stop":
                            return self.stop()
                    continue
                ag = self.by_sock[sock]
                while True:
                    try:
                        frame = sock.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    ag.on_message(frame, now)
            ends, agents = self.ends, self.agents
            while ends and ends[0][0] <= now:
                _, n, job = heapq.heappop(ends)
                agents[n].end(job, now)
            todo = self.dirty | retry
            self.dirty = set()
            retry = set()
            if now >= next_sweep:  # heartbeats, hellos, progress come due with no message
                next_sweep = now + 0.02
                todo |= {ag.n for ag in agents if ag.due(now)}
            for n in todo:
                if not agents[n].maybe_send(now):
                    retry.add(n)
            if events or todo:
                self.loop_lag.setdefault(self.phase, []).append(time.perf_counter() - t0)

    def stop(self) -> None:
        for ag in self.agents:
            ag.bye()
        out = {"worker": self.index, "agents": len(self.agents),
               "received": self.received, "finished": sum(a.finished for a in self.agents),
               "hellos": sum(a.hellos for a in self.agents),
               "say_hello": sum(a.say_hello for a in self.agents),
               "rewelcomed": self.rewelcomed, "stale_welcomes": self.stale_welcomes,
               "unwelcomed": sum(1 for a in self.agents if not a.welcomed),
               "errors": self.errors[:20],
               "n_errors": len(self.errors), "hello_rtt": self.hello_rtt,
               "samples": self.samples, "loop_lag": self.loop_lag,
               "cpu_s": sum(resource.getrusage(resource.RUSAGE_SELF)[:2])}
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()
        for ag in self.agents:
            ag.sock.close(linger=200)
        self.ctx.term()


# -- the driver ----------------------------------------------------------------------------
def cpu_pressure() -> float | None:
    """The share of the last 60 s in which some runnable task waited for a CPU (Linux PSI):
    on this shared machine the server competes for its cores, which every figure shows."""
    try:
        with open("/proc/pressure/cpu") as f:
            return float(f.readline().split()[2].split("=")[1]) / 100
    except (OSError, IndexError, ValueError):
        return None


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def ms(x: float | None) -> float | None:
    return None if x is None else x * 1000


class Workers:
    """The worker processes, started and stopped together."""

    def __init__(self, env: C.Env, n_agents: int, procs: int, cores: int, task_seconds: float,
                 client_key: Path) -> None:
        self.procs: list[subprocess.Popen] = []
        per = [n_agents // procs + (1 if i < n_agents % procs else 0) for i in range(procs)]
        for i, count in enumerate(per):
            if not count:
                continue
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker",
                   "--index", str(i), "--count", str(count), "--address", env.address,
                   "--home", str(env.home), "--client-key", str(client_key),
                   "--cores", str(cores), "--task-seconds", str(task_seconds),
                   "--heartbeat", str(env.heartbeat)]
            log = open(env.home / f"worker-{i}.log", "ab")
            self.procs.append(subprocess.Popen(cmd, stdin=subprocess.PIPE,
                                               stdout=subprocess.PIPE, stderr=log))

    def tell(self, line: str) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.stdin.write(line.encode() + b"\n")
                p.stdin.flush()

    def check(self) -> None:
        for p in self.procs:
            if p.poll() is not None:
                raise RuntimeError(f"worker {p.pid} exited with code {p.returncode} (see "
                                   "worker-*.log in the home; --keep keeps it)")

    def stop(self, timeout: float = 60.0) -> list[dict]:
        self.tell("stop")
        out = []
        for p in self.procs:
            try:
                data, _ = p.communicate(timeout=timeout)
                if data.strip():
                    out.append(json.loads(data.splitlines()[-1]))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        return out

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


class Feeder:
    """Open loop (``--rate``): a thread with a client of its own adds jobs at a steady rate in
    small batches (a big add_jobs is one long server turn that every heartbeat waits for)."""

    EVERY = 0.05

    def __init__(self, env: C.Env, rate: float) -> None:
        import threading
        self.client = C.Client(env.address, env.home, timeout=600)
        self.rate, self.fed = rate, 0
        self.add_seconds: list[float] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        t0 = time.monotonic()
        job = {"name": "t", "application": "noop"}
        while not self.done.wait(self.EVERY):
            due = int(self.rate * (time.monotonic() - t0)) - self.fed
            if due > 0:
                due = min(due, 20_000)
                t = time.perf_counter()
                self.client.add_jobs([job] * due)
                self.add_seconds.append(time.perf_counter() - t)
                self.fed += due

    def stop(self) -> None:
        if not self.done.is_set():
            self.done.set()
            self.thread.join(30)
            self.client.close()


def run(a, repeat: int = 1) -> list[dict]:
    import psutil
    emitted = []
    ctx = C.machine(a.tmp)
    common = {"repeat": repeat, "agents": a.agents, "procs": a.procs, "cores_per_agent": a.cores,
              "task_seconds": a.task_seconds, "heartbeat": a.heartbeat, "db": a.db,
              "curve": True, "mode": "FAKE EXECUTION (simulated agents, no process spawned)",
              **ctx}
    # one socket per simulated agent in the workers, one connection each in the server
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 3 * a.agents + 1024
    if soft < need <= hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    with C.Env(a.db, a.heartbeat, a.tmp, a.keep, label="agents") as env:
        server = psutil.Process(env.server_pid)
        c = env.client
        c.add_app({"name": "noop", "executable": "/bin/true"})
        rss_idle = C.server_rss(server)[0]
        initial = a.jobs if not a.rate else int(a.rate)  # --rate: a second's worth first
        C.log(f"adding {initial:,} jobs")
        t = time.perf_counter()
        chunk = [{"name": "t", "application": "noop"}] * 50_000
        left = initial
        while left > 0:
            c.add_jobs(chunk[:left])
            left -= 50_000
        C.log(f"added in {time.perf_counter() - t:.1f} s")
        rss_jobs = C.server_rss(server)[0]
        _, sec, _ = keys.new_client(env.home, KEY_NAME, role="agent")
        workers = Workers(env, a.agents, a.procs, a.cores, a.task_seconds, sec)
        feeder = Feeder(env, a.rate) if a.rate else None
        try:
            t_start = time.time()
            samples = []  # (time, dispatched, finished, queued, alive, rss)
            joined_at = rss_joined = None
            peak_writer = 0
            joined_alive = a.agents
            pressure = None
            steady_from = steady_to = None
            idle_to = None
            phase = "connect"
            while True:
                workers.check()
                st = c.status()
                now = time.time()
                rss, writer_rss = C.server_rss(server)
                peak_writer = max(peak_writer, writer_rss)
                counts = st["counts"]
                samples.append((now, st["stats"]["dispatched"], counts.get("JOB_FINISHED", 0),
                                st["queued"], st["agents_alive"], rss))
                if joined_at is None and st["agents_alive"] >= a.agents:
                    joined_at, rss_joined = now, rss
                    C.log(f"{a.agents} agents joined in {now - t_start:.1f} s")
                    steady_from = now + a.warmup
                if joined_at is None and now - t_start > a.connect_timeout:
                    # where it breaks: report what joined, the hellos and the server's size
                    C.log(f"FAILED: only {st['agents_alive']} of {a.agents} agents joined "
                          f"within {a.connect_timeout:.0f} s")
                    joined_alive, pressure = st["agents_alive"], cpu_pressure()
                    break
                if phase == "connect" and steady_from is not None and now >= steady_from:
                    phase = "busy"
                    workers.tell("phase busy")
                    # the driver (status polls, the feeder's submissions) is harness too
                    meter = C.CpuMeter(env, {"harness_driver": os.getpid(),
                                             **{f"harness_worker{i}": w.pid
                                                for i, w in enumerate(workers.procs)}})
                    meter.__enter__()
                    spy = C.profile(a, "many_agents", {"server": env.server_pid})
                    steady_from = now
                elif phase == "busy" and ((st["queued"] == 0 and not feeder)
                                          or now - steady_from >= a.seconds):
                    steady_to = now
                    pressure = cpu_pressure()
                    if feeder:
                        feeder.stop()
                    meter.__exit__(None, None, None)
                    spy.__exit__()
                    phase = "drain"
                    workers.tell("phase drain")
                    C.log(f"steady window {steady_to - steady_from:.1f} s; queued "
                          f"{st['queued']:,}; waiting for the leases to drain")
                elif phase == "drain" and (st["leases"] == 0 or now - steady_to > 30):
                    phase = "idle"
                    workers.tell("phase idle")
                    idle_to = now + a.idle
                elif phase == "idle" and now >= idle_to:
                    break
                if phase in ("connect", "busy"):
                    C.log(f"{phase}: alive {st['agents_alive']}, dispatched "
                          f"{st['stats']['dispatched']:,}, finished "
                          f"{counts.get('JOB_FINISHED', 0):,}, queued {st['queued']:,}, "
                          f"server RSS {rss / 2**20:.0f} MB")
                time.sleep(a.poll)
            agents_ls = c.agents(all=True)
            results = workers.stop()
        except BaseException:
            workers.kill()
            raise
        finally:
            if feeder:
                feeder.stop()
        lost_events = sum(1 for x in agents_ls if x["state"] == "LOST")
    if feeder:
        feeder.stop()
    win = [s for s in samples if steady_to and steady_from <= s[0] <= steady_to]
    span = win[-1][0] - win[0][0] if len(win) > 1 else 0
    dispatch_tps = (win[-1][1] - win[0][1]) / span if span else None
    finished_tps = (win[-1][2] - win[0][2]) / span if span else None
    per_sec = [(b[1] - x[1]) / (b[0] - x[0]) for x, b in zip(win, win[1:])]
    # CPU by part over the steady window, in cores: where a saturated run's time went
    cpu = meter.summary() if steady_to else {}
    cpu_split = {k: cpu.get(k) for k in (
        "server_busy", "server_loop_busy", "server_zmq_io_busy", "server_other_busy",
        "server_writer_busy", "harness_busy", "postgres_busy", "machine_idle_cores",
        "machine_steal_cores")
        if k in cpu}
    say_hello = sum(r["say_hello"] for r in results)
    rows = dict(common, cpu_pressure_60s=pressure)
    if feeder:
        rows["offered_rate"] = a.rate
        rows["fed"] = feeder.fed
        rows["queued_at_window_end"] = win[-1][3] if win else None
        rows["feed_add_p99_ms"] = ms(pct(feeder.add_seconds, 0.99))
    emitted.append(C.emit("dispatch_tasks_per_second", dispatch_tps, unit="tasks/s",
                          target=TARGETS["dispatch"],
                          meets_target=bool(dispatch_tps and dispatch_tps >= TARGETS["dispatch"]),
                          finished_tasks_per_second=finished_tps,
                          per_poll=[round(x) for x in per_sec],
                          window_seconds=span, jobs=None if a.rate else a.jobs,
                          **cpu_split,
                          capacity_tasks_per_second=a.agents * a.cores / a.task_seconds,
                          interval="all agents joined + warmup -> queue empty or --seconds; "
                                   "the server's dispatched counter (status op, --poll s polls)",
                          **rows))

    def merged(phase: str, which: str) -> list[float]:
        return [x for r in results for x in r["samples"].get(phase, {}).get(which, [])]

    def lag(phase: str) -> list[float]:
        return [x for r in results for x in r["loop_lag"].get(phase, [])]

    for phase in ("connect", "busy", "idle"):
        xs = merged(phase, "all")
        hb = merged(phase, "heartbeat_only")
        p99 = ms(pct(xs, 0.99))
        emitted.append(C.emit(
            "heartbeat_rtt_p99_ms", p99, unit="ms", phase=phase,
            target=TARGETS["heartbeat_p99_ms"],
            meets_target=p99 is not None and p99 <= TARGETS["heartbeat_p99_ms"],
            p50_ms=ms(pct(xs, 0.5)), p999_ms=ms(pct(xs, 0.999)), max_ms=ms(max(xs, default=None)),
            samples=len(xs), heartbeat_only_samples=len(hb),
            heartbeat_only_p99_ms=ms(pct(hb, 0.99)),
            harness_loop_p99_ms=ms(pct(lag(phase), 0.99)),
            harness_loop_max_ms=ms(max(lag(phase), default=None)),
            measured="an update's send to the task batch acknowledging its useq, on the "
                     "simulated agent (every update is a heartbeat); includes the harness's "
                     "own loop delay (harness_loop_*)", **rows))
    hello = [x for r in results for x in r["hello_rtt"]]
    emitted.append(C.emit("agents_lost", lost_events + say_hello, unit="agents",
                          target=TARGETS["lost"], meets_target=lost_events + say_hello == 0,
                          declared_lost=lost_events, told_say_hello=say_hello,
                          rewelcomed=sum(r["rewelcomed"] for r in results),
                          stale_welcomes=sum(r["stale_welcomes"] for r in results),
                          unwelcomed_at_end=sum(r["unwelcomed"] for r in results),
                          hellos=sum(r["hellos"] for r in results),
                          protocol_errors=sum(r["n_errors"] for r in results),
                          error_examples=[e for r in results for e in r["errors"]][:5],
                          join_seconds=(joined_at - t_start) if joined_at else None,
                          joined=joined_alive, all_joined=joined_at is not None,
                          welcome_rtt_p99_ms=ms(pct(hello, 0.99)), **rows))
    emitted.append(C.emit("server_rss_mb", max(s[5] for s in samples) / 2**20, unit="MB",
                          measure="peak during the run (--poll s samples), the server "
                                  "process and its SQLite writer process together",
                          writer_peak_mb=peak_writer / 2**20,
                          idle_mb=rss_idle / 2**20, with_jobs_queued_mb=rss_jobs / 2**20,
                          at_end_mb=samples[-1][5] / 2**20,
                          all_joined_mb=rss_joined / 2**20 if rss_joined else None,
                          workers_cpu_s=sum(r["cpu_s"] for r in results),
                          received=sum(r["received"] for r in results),
                          finished=sum(r["finished"] for r in results), **rows))
    return emitted


def main() -> int:
    p = C.parser(__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    p.set_defaults(repeat=1)  # --repeat: runs, each printing its own lines
    p.add_argument("--agents", type=int, default=1000, help="Simulated agents "
                   "(default: %(default)s).")
    p.add_argument("--procs", type=int, default=4, help="Worker processes holding them "
                   "(default: %(default)s).")
    p.add_argument("--cores", type=int, default=64, help="Cores per agent (default: "
                   "%(default)s).")
    p.add_argument("--task-seconds", type=float, default=1.0, help="How long a fake task "
                   "runs (default: %(default)s).")
    p.add_argument("--jobs", type=int, default=300_000, help="Jobs queued before the agents "
                   "connect (default: %(default)s).")
    p.add_argument("--rate", type=float, default=0, help="Open loop: add jobs at this many "
                   "per second during the run instead of queueing --jobs first (0: closed loop, "
                   "the default: the agents' demand saturates the server).")
    p.add_argument("--db", choices=("sqlite", "postgres"), default="sqlite",
                   help="The server's database (default: %(default)s, as a user starts it).")
    p.add_argument("--seconds", type=float, default=30.0, help="Longest steady window "
                   "(default: %(default)s).")
    p.add_argument("--warmup", type=float, default=3.0, help="Seconds after the last agent "
                   "joined before the window starts (default: %(default)s).")
    p.add_argument("--idle", type=float, default=5.0, help="Seconds of idle heartbeats "
                   "measured after the work (default: %(default)s).")
    p.add_argument("--poll", type=float, default=1.0, help="Seconds between the driver's "
                   "status polls, which bound the window (default: %(default)s).")
    p.add_argument("--connect-timeout", type=float, default=120.0,
                   help="Seconds for all agents to join (default: %(default)s).")
    # worker mode (started by the driver)
    p.add_argument("--worker", action="store_true", help=argparse_hidden())
    p.add_argument("--index", type=int, default=0, help=argparse_hidden())
    p.add_argument("--count", type=int, default=0, help=argparse_hidden())
    p.add_argument("--address", help=argparse_hidden())
    p.add_argument("--home", help=argparse_hidden())
    p.add_argument("--client-key", dest="client_key", help=argparse_hidden())
    p.add_argument("--json", action="store_true", help="Results are JSON lines anyway.")
    a = p.parse_args()
    if a.worker:
        Worker(a).run()
        return 0
    for name in ("agents", "procs", "cores", "jobs"):
        if getattr(a, name) < 1:
            p.error(f"--{name} must be at least 1")
    if a.task_seconds <= 0 or a.seconds <= 0 or a.rate < 0:
        p.error("--task-seconds and --seconds must be positive, --rate at least 0")
    C.set_bench("many_agents")
    C.install_signal_handlers()
    for r in range(a.repeat):  # one line per figure and repeat: each run is a minute
        run(a, r + 1)
    return 0


def argparse_hidden() -> str:
    import argparse
    return argparse.SUPPRESS


if __name__ == "__main__":
    C.run(main)
