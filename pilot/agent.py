"""The node agent: one per node, a DEALER that asks the server for work that fits.

It says hello with its resources, keeps a small prefetch of leased tasks so its cores never wait
for a round trip, reports progress in batches (also its heartbeat), keeps every update until the
server acknowledges it, and resends after a reconnect. It exits after an idle timeout, and on
SIGTERM stops its tasks and hands them back so they are retried elsewhere.
"""
from __future__ import annotations

import logging
import math
import os
import secrets
import signal
import socket
import time
import uuid
from pathlib import Path

import zmq

from pilotfish import keys
from pilotfish import protocol as P
from pilotfish import settings
from pilotfish.errors import ProtocolError

from .executor import Executor, Staging, Task
from .launch import TaskLauncher
from .resources import Resources

log = logging.getLogger("pilotfish.agent")
#: Seconds of work per core the automatic prefetch aims to hold, and its cap in tasks per core.
PREFETCH_HORIZON = 0.02
PREFETCH_MAX = 16
#: Minimum seconds between updates while the agent has queued work (batches updates under load).
REPORT_INTERVAL = 0.005


class Agent:
    def __init__(self, server: str, resources: Resources, work_root: Path,
                 site: str | None = None, pilot: str | None = None,
                 prefetch: int | None = None, idle_timeout: float = 300.0,
                 heartbeat: float = settings.HEARTBEAT_SECONDS, fake_exec: bool = False,
                 max_tasks: int | None = None, node: str | None = None,
                 node_cores: int | None = None, launcher: TaskLauncher | None = None,
                 container=None, curve: keys.Curve | None = None,
                 staging: Staging | None = None) -> None:
        self.id = uuid.uuid4().hex
        #: The node as the pilot's launcher names it (srun -w), its CPU count (for the
        #: affinity self-check on the server's side) and how multi-rank tasks start here.
        self.node = node or socket.gethostname()
        self.node_cores = node_cores
        self.launcher = launcher
        self.server = server
        self.res = resources
        self.site, self.pilot = site, pilot
        #: Extra cores' worth of tasks to hold beyond the free cores, so a finished task's
        #: successor is already here; None: sized from the tasks' observed run times.
        self.prefetch = prefetch
        self.idle_timeout = idle_timeout
        self.heartbeat = heartbeat
        self.max_tasks = max_tasks
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        # The routing id is not the agent id (which `agent ls` shows): with ROUTER_HANDOVER a
        # peer that knows an agent's routing id takes its connection over, so it is secret.
        self.sock.setsockopt(zmq.ROUTING_ID, f"{self.id}.{secrets.token_hex(16)}".encode())
        self.sock.setsockopt(zmq.LINGER, 2000)
        self.sock.setsockopt(zmq.RECONNECT_IVL, 100)
        self.sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        keys.apply_client(self.sock, curve)  # CurveZMQ to a tcp:// server (None: plain ipc)
        if curve is not None:  # a refused key is the agent's to tell: its server says no more
            keys.watch_handshakes(self.sock, log, f"agent {self.id}")
        self.sock.connect(server)
        self.poller = zmq.Poller()
        self.poller.register(self.sock, zmq.POLLIN)
        self.fd_tasks: dict[int, Task] = {}
        self.ex = Executor(resources.cores, resources.gpus, work_root, self._watch, self._unwatch,
                           fake=fake_exec, launch=launcher, contain=container, staging=staging,
                           gpu_env=resources.gpu_kind.task_env if resources.gpu_kind.vendor
                           else None)
        self.useq = 0
        self.unacked: list[tuple[int, list[dict]]] = []   # (useq, updates) not yet acknowledged
        self.ack = 0                 # last task batch seq seen
        self.acked = 0               # last update useq the server acknowledged
        self.welcomed = False
        self.last_sent = 0.0
        self.last_demand: tuple | None = None
        self.idle_since = time.time()
        self.stopping = False
        self.received = 0
        self.finished = 0

    def _watch(self, fd: int, task: Task) -> None:
        self.fd_tasks[fd] = task
        self.poller.register(fd, zmq.POLLIN)

    def _unwatch(self, fd: int) -> None:
        self.fd_tasks.pop(fd, None)
        self.poller.unregister(fd)

    # -- messages ---------------------------------------------------------------------------
    def _send(self, frame: bytes) -> None:
        self.sock.send(frame)
        self.last_sent = time.time()

    def hello(self) -> None:
        # Every job the server must not take back: queued and running tasks, and ended ones
        # whose final update it has not acknowledged -- sent (unacked) or not even sent yet
        # (reportable: at most one update is in flight, so a task that ends meanwhile waits).
        held = self.ex.held()
        seen = {h["job"] for h in held}
        for job, attempt in ([(u["job"], u["attempt"]) for _, ups in self.unacked for u in ups]
                             + [(t.job, t.attempt) for t in self.ex.reportable]):
            if job not in seen:
                seen.add(job)
                held.append({"job": job, "attempt": attempt})
        self._send(P.encode(P.HELLO, agent=self.id, host=socket.gethostname(), pid=os.getpid(),
                            site=self.site, pilot=self.pilot, cores=self.res.cores,
                            gpus=self.res.gpus, memory=self.res.memory,
                            time_left=self.res.time_left(), running=held, ack=self.ack,
                            node=self.node, node_cores=self.node_cores,
                            launcher=self.launcher.launcher if self.launcher else None,
                            mpi=self.launcher.mpi if self.launcher else None))
        self.last_demand = None

    def prefetch_cores(self) -> int:
        """How many cores' worth of tasks to keep queued here beyond the free cores.

        Enough to cover ``PREFETCH_HORIZON`` seconds of work per core (round trips and report
        batching), at least one task per core and at most ``PREFETCH_MAX`` per core: short
        tasks get a deep queue, long ones a shallow one so the tail of a run stays balanced.
        """
        if self.prefetch is not None:
            return self.prefetch
        n = len(self.ex.all_cores)
        avg = self.ex.avg_run
        if avg is None:
            return n
        return math.ceil(n * min(PREFETCH_MAX, max(1.0, PREFETCH_HORIZON / max(avg, 1e-4))))

    def demand(self) -> dict:
        ex = self.ex
        want = 0 if self.stopping or self._quota_reached() else \
            len(ex.free_cores) + self.prefetch_cores() - ex.queued_cores()
        return {"cores": max(0, want),
                "gpus": max(0, len(ex.free_gpus) + len(ex.all_gpus) - ex.queued_gpus()),
                "max_cores": len(ex.all_cores), "max_gpus": len(ex.all_gpus),
                "time_left": self.res.time_left()}

    def _quota_reached(self) -> bool:
        return self.max_tasks is not None and self.received >= self.max_tasks

    def send_update(self, now: float, force: bool = False) -> None:
        """Report progress and demand. At most one update is in flight: what ends meanwhile
        waits for the server's answer and goes in the next one, so under load updates batch
        themselves at the rate the server keeps up with."""
        beat = now - self.last_sent >= self.heartbeat
        if self.useq > self.acked and not beat and not force:
            return
        starving = not self.ex.queue and self.ex.free_cores
        if not beat and not force and not starving and now - self.last_sent < REPORT_INTERVAL:
            return  # batch a little: the prefetch keeps the cores busy meanwhile
        d = self.demand()
        key = (d["cores"], d["gpus"])
        if not self.ex.reportable and not force and not beat and key == self.last_demand:
            return
        updates = self.ex.take_updates(now)
        if not updates and not force and not beat and key == self.last_demand:
            return
        self.useq += 1
        if updates:
            self.unacked.append((self.useq, updates))
            self.finished += sum(1 for u in updates if u["end"] is not None)
        self.last_demand = key
        self._send(P.encode(P.UPDATE, agent=self.id, useq=self.useq, updates=updates, demand=d,
                            ack=self.ack))

    def resend_unacked(self) -> None:
        """After a new hello: send again what the server may not have seen."""
        items = [u for _, ups in self.unacked for u in ups]
        self.unacked = []
        if items:
            self.useq += 1
            self.unacked.append((self.useq, items))
        self._send(P.encode(P.UPDATE, agent=self.id, useq=self.useq, updates=items,
                            demand=self.demand(), ack=self.ack))

    def on_message(self, frame: bytes, now: float) -> None:
        try:
            kind, m = P.decode(frame, (P.WELCOME, P.TASKS, P.CANCEL, P.ERROR))
            if kind == P.TASKS:
                P.check_items(P.TASK, m["tasks"], "tasks")
                P.check_items(P.JOB_ATTEMPT, m["refused"], "refused")
            elif kind in (P.CANCEL, P.WELCOME):
                P.check_items(P.JOB_ATTEMPT, m["jobs" if kind == P.CANCEL else "revoke"], kind)
        except ProtocolError as exc:
            log.error("bad message from the server: %s", exc)
            return
        if kind == P.TASKS:
            self.acked = max(self.acked, m["uack"])
            self.unacked = [(s, u) for s, u in self.unacked if s > m["uack"]]
            if m["tasks"]:
                self.ack = max(self.ack, m["seq"])
                for spec in m["tasks"]:
                    self.ex.add(spec)
                self.received += len(m["tasks"])
            for r in m["refused"]:
                log.warning("server refused an update for job %d attempt %d (lease gone)",
                            r["job"], r["attempt"])
                self.ex.cancel(r["job"], r["attempt"])
        elif kind == P.CANCEL:
            for item in m["jobs"]:
                if self.ex.cancel(item["job"], item["attempt"]):
                    log.info("job %d cancelled by the server", item["job"])
        elif kind == P.WELCOME:
            self.welcomed = True
            self.heartbeat = min(self.heartbeat, float(m["heartbeat"]))
            lease = m.get("lease") or float(m["heartbeat"]) * settings.LEASE_HEARTBEATS
            self.ex.set_fence(*settings.fence_timing(self.heartbeat, float(lease)))
            for item in m["revoke"]:
                self.ex.cancel(item["job"], item["attempt"])
            log.info("server %s welcomed agent %s", self.server, self.id)
            self.resend_unacked()
        elif kind == P.ERROR:
            log.warning("server says: %s", m["error"])
            if "say hello" in m["error"]:
                self.welcomed = False
                self.acked = self.useq  # that server will never answer what we sent it
                self.hello()

    # -- main loop --------------------------------------------------------------------------
    def _on_signal(self, signum, _frame) -> None:
        self.stopping = True
        self.ex.stopping = True

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        log.info("agent %s: %d cores %s, %d GPUs, time left %s, server %s", self.id,
                 len(self.res.cores), self.res.cores, len(self.res.gpus),
                 self.res.time_left(), self.server)
        self.hello()
        sock, ex, poll = self.sock, self.ex, self.poller.poll
        turned = time.time()
        while not self.stopping:
            now = time.time()
            wake = [self.last_sent + self.heartbeat]
            if ex.fence:  # tick the guard well within its silence limit
                wake.append(now + ex.fence / 4)
            due = ex.next_report()
            if due is not None and self.useq <= self.acked:  # else: wait for the ack
                wake.append(max(due, self.last_sent + REPORT_INTERVAL))
            nd = ex.next_deadline()
            if nd is not None:
                wake.append(nd)
            timeout = max(0, min(wake) - now)
            events = poll(timeout * 1000)
            now = time.time()
            if ex.fence and now - turned > ex.fence:
                log.warning("agent %s was silent for %.1f s (stopped or stuck): its guard has "
                            "stopped its tasks, whose jobs the server gives to other agents",
                            self.id, now - turned)
                ex.fenced = (now, now - turned)
            turned = now
            ex.tick(now)
            for what, _ in events:
                if what is sock:
                    while True:
                        try:
                            frame = sock.recv(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self.on_message(frame, now)
                else:
                    t = self.fd_tasks.get(what)
                    if t is not None:
                        ex.on_exit(t, now)
            ex.check_timeouts(now)
            ex.start_ready(now)
            if self.welcomed:
                self.send_update(now)
            elif now - self.last_sent > self.heartbeat:
                self.hello()
            if not ex.idle():
                self.idle_since = now
            elif self._quota_reached() and not ex.reportable and not self.unacked:
                log.info("agent %s ran its %d tasks: leaving", self.id, self.received)
                break
            elif self.idle_timeout and now - self.idle_since > self.idle_timeout:
                log.info("agent %s idle for %.0f s: leaving", self.id, now - self.idle_since)
                break
            if self.res.end_time is not None and now >= self.res.end_time:
                log.info("agent %s: allocation time is up: leaving", self.id)
                break
        return self.leave()

    def leave(self) -> int:
        """Stop tasks, hand back what we hold, and say goodbye (waiting briefly for the ack)."""
        now = time.time()
        released = self.ex.stop_all()
        updates = [u for _, ups in self.unacked for u in ups] + self.ex.take_updates(now, True)
        self.useq += 1
        self._send(P.encode(P.BYE, agent=self.id, useq=self.useq, updates=updates,
                            released=released))
        deadline = time.time() + 5
        acked = False
        while time.time() < deadline and self.sock.poll(int((deadline - time.time()) * 1000)):
            try:
                kind, m = P.decode(self.sock.recv(), (P.WELCOME, P.TASKS, P.CANCEL, P.ERROR))
            except Exception:
                continue
            if kind == P.TASKS and m["uack"] >= self.useq:
                acked = True
                break
        if not acked:
            log.warning("server did not acknowledge our goodbye; its lease timeout will "
                        "requeue %d held tasks", len(released))
        log.info("agent %s: %d tasks received, %d finished, handed back %d", self.id,
                 self.received, self.finished, len(released))
        self.sock.close(linger=1000)
        self.ctx.term()
        return 0
