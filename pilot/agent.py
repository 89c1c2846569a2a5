"""The node agent: one per node, a DEALER that asks the server for work that fits.

It says hello with its resources, keeps a small prefetch of leased tasks so its cores never wait
for a round trip, reports progress in batches (also its heartbeat), keeps every update until the
server acknowledges it, and resends after a reconnect. It exits after an idle timeout, or (with
``leave_when_no_work``) as soon as the server says no queued or pending job fits it, and on
SIGTERM stops its tasks and hands them back so they are retried elsewhere.

**Fencing.** Each acknowledgement (``uack`` of a task batch or of a welcome) names the newest
message of ours the server received while it held our leases; the server counts a lease out a
lease period after that receipt, which came after our send. So at the send time of that message
plus ``settings.fence_timing`` (our monotonic clock only), with no newer renewal, this agent --
cut off from the server, or behind a server that is down -- stops its tasks and forgets its
queued ones (its guard does the same should the agent itself be stopped), says hello again and
takes no work until welcomed. It cannot tell a cut from a server restart; a restart shorter than
that bound is re-adopted as before (the restarted server gives known agents a full lease from
its start).

A busy server is no cut. The connection runs ZMTP heartbeats, which libzmq's I/O threads answer
whatever the server's main thread is doing, so a dead link -- a cut, a stopped or dead server --
drops within ``LINK_TIMEOUT``. A message sent over a link that has stayed up since, to a server
that has refused nothing since, is in the server's queue and will be read, in order, before the
server counts any lease out (it expires leases only once it has read everything waiting): its
send time renews our leases as an acknowledgement would (``credit``). So a server busy for
seconds (adding 100,000 jobs) stops no task, and a drop or a refusal takes the credit back at
once, leaving only acknowledged renewals (the guard's deadline moves back too).
"""
from __future__ import annotations

import logging
import math
import os
import random
import secrets
import select
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
from .output import OutputShipper
from .resources import Resources

log = logging.getLogger("pilotfish.agent")
#: Seconds of work per core the automatic prefetch aims to hold, and its cap in tasks per core.
#: The queue must outlast REPORT_INTERVAL plus a round trip: with 20 ms (and 16) it drained
#: between two updates in W2 and both cores waited a round trip each time (41 % of the machine
#: idle); 0.1 s and 128 gave 1.10x (5 interleaved rounds on tmpfs). Tasks of 0.1 s or more
#: still get one per core, so a run's tail stays balanced.
PREFETCH_HORIZON = 0.1
PREFETCH_MAX = 128
#: Minimum seconds between updates while the agent has queued work: what ends meanwhile waits
#: and goes in one update (an agent with free cores and nothing queued asks at once). Each
#: update is a server turn with its own commit: in W2 (10k x /bin/true, 2 cores) the server
#: spent 230 us of CPU a task at 5 ms, 164 us at 20 ms and 136 us at 50 ms.
REPORT_INTERVAL = 0.05
#: When the agent leaves on the server's word that no work fits it (``nowork``): never (only the
#: idle timeout), only once it has run some task (a pilot started before its jobs were added
#: waits for them), or always (a pilot the site agent submitted for a backlog).
LEAVE_WHEN_NO_WORK = ("never", "after-work", "always")


#: Each heartbeat comes a random 0-20 % early (never late: the fencing bounds stay as they
#: are). Agents that start together (one srun for a whole allocation) or are welcomed
#: together (a server restart) would otherwise beat in step, and a thousand of them make one
#: burst each period that the last in line waits through (measured: p50 60 ms at 1,000 idle
#: agents in step, bench/many_agents.py).
BEAT_JITTER = 0.2
#: An unanswered hello is sent again after 2, 4, then every 8 heartbeats while the connection
#: stays up, and at once on a new connection (the one way a hello is lost). The server answers
#: every hello it reads and the agent waits for the answer to its newest, so a hello every
#: heartbeat to a server slow to welcome only added to its backlog (1,000 agents joining at
#: once: 2,300-3,300 hellos before, 1,000-1,400 now; bench/many_agents.py).
HELLO_BACKOFF = 8
#: ZMTP heartbeats of the agent's connection: a ping every LINK_PING seconds, and the link is
#: dropped (and the agent's credit with it) after LINK_TIMEOUT seconds without traffic. Both
#: are well inside the smallest lease (1.5 s at 0.5 s heartbeats) less the kill grace.
LINK_PING = 0.25
LINK_TIMEOUT = 0.6
_LINK_EVENTS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
                | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)


class Agent:
    def __init__(self, server: str, resources: Resources, work_root: Path,
                 site: str | None = None, pilot: str | None = None,
                 prefetch: int | None = None, idle_timeout: float = 300.0,
                 heartbeat: float = settings.HEARTBEAT_SECONDS, fake_exec: bool = False,
                 max_tasks: int | None = None, node: str | None = None,
                 node_cores: int | None = None, launcher: TaskLauncher | None = None,
                 container=None, curve: keys.Curve | None = None,
                 staging: Staging | None = None, leave_when_no_work: str = "never") -> None:
        if leave_when_no_work not in LEAVE_WHEN_NO_WORK:
            raise ValueError(f"leave_when_no_work: expected one of {LEAVE_WHEN_NO_WORK}")
        self.leave_when_no_work = leave_when_no_work
        #: why the main loop should end now (the server said no work is left for us)
        self.no_work: str | None = None
        #: only when asked for: a server without the field refuses a hello that has it
        self._hello_extra = {"leave_idle": True} if leave_when_no_work != "never" else {}
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
        # at most half a second between reconnection attempts: a restarted server must hear
        # from us well within the fencing bound, or we stop the tasks it would re-adopt
        self.sock.setsockopt(zmq.RECONNECT_IVL_MAX, 500)
        # ZMTP heartbeats: libzmq's I/O threads ping and answer, also while the server's main
        # thread is busy, so a dead link (a cut, a stopped or dead server) is seen within
        # LINK_PING + LINK_TIMEOUT, and a live link tells a busy server from a lost one
        self.sock.setsockopt(zmq.HEARTBEAT_IVL, int(LINK_PING * 1000))
        self.sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(LINK_TIMEOUT * 1000))
        keys.apply_client(self.sock, curve)  # CurveZMQ to a tcp:// server (None: plain ipc)
        self.curve = curve is not None
        self.link = keys.monitor_socket(self.sock, _LINK_EVENTS)
        self.link_up = False
        self.link_errors = 0
        self.link_error_logged = 0.0
        self.sock.connect(server)
        self.poller = zmq.Poller()
        self.poller.register(self.sock, zmq.POLLIN)
        self.poller.register(self.link, zmq.POLLIN)
        self.fd_tasks: dict[int, Task | None] = {}  # None: the spawner's (see Executor.on_fd)
        self.ex = Executor(resources.cores, resources.gpus, work_root, self._watch, self._unwatch,
                           fake=fake_exec, launch=launcher, contain=container, staging=staging,
                           gpu_env=resources.gpu_kind.task_env if resources.gpu_kind.vendor
                           else None)
        self.useq = 0
        self.unacked: list[tuple[int, list[dict]]] = []   # (useq, updates) not yet acknowledged
        self.ack = 0                 # last task batch seq seen
        self.acked = 0               # last update useq the server acknowledged
        self.welcomed = False
        #: Fencing (see the module doc): the server start that welcomed us, the send time
        #: (time.monotonic) of our messages not yet acknowledged, of the newest acknowledged one
        #: (our leases' renewal) and of the first hello not answered yet; bound and grace from
        #: the welcome (0: not told yet); how often we fenced.
        self.epoch: int | None = None
        self.sent_at: dict[int, float] = {}
        self.renewed = 0.0
        self.hello_at: float | None = None
        self.hello_useq = 0     # the useq of our newest hello: a welcome to an older one is stale
        self.hellos_unanswered = 0  # since the last welcome or reconnect (HELLO_BACKOFF)
        self.link_was_up = False
        #: time.monotonic() at which we connect again after the server refused our key
        #: (libzmq does not redial after a refused handshake; the key may be authorized later)
        self.redial_at: float | None = None
        #: time.monotonic() at which we leave because our server said it stops on purpose and no
        #: server has welcomed us since (None: not told)
        self.leave_at: float | None = None
        self.fence_bound = self.fence_grace = self.fence_lag = 0.0
        self.fenced_for = 0.0   # the renewal whose bound ran out (fenced once for it)
        #: Send time of our newest message sent over a link that has stayed up since, to a
        #: server that has refused nothing since (0: none): it will be read, in order, and
        #: renew our leases, however busy the server is (see the module doc).
        self.credit = 0.0
        self.fences = 0
        self.last_sent = 0.0
        self.beat_factor = 1.0  # BEAT_JITTER: drawn again at every send
        self.last_demand: tuple | None = None
        self.idle_since = time.time()
        self.stopping = False
        self.received = 0
        self.finished = 0
        self.ex.spawn_deadline = self.spawn_deadline
        #: pieces of tasks' job.out/job.err for `job log`, on updates (see pilot/output.py)
        self.out = OutputShipper()

    def _watch(self, fd: int, task: Task) -> None:
        self.fd_tasks[fd] = task
        self.poller.register(fd, zmq.POLLIN)

    def _unwatch(self, fd: int) -> None:
        self.fd_tasks.pop(fd, None)
        self.poller.unregister(fd)

    # -- messages ---------------------------------------------------------------------------
    def _send(self, frame: bytes, useq: int | None = None) -> None:
        if self.welcomed:
            self.sock.send(frame)
        else:
            # Not welcomed: a hello (sent again after a backoff) or a goodbye. With no
            # connection to queue it on -- the server refused our key, so libzmq dropped the
            # pipe -- a blocking send would wait forever, deaf to SIGTERM.
            try:
                self.sock.send(frame, zmq.NOBLOCK)
            except zmq.Again:
                self.last_sent = time.time()
                return
        self.last_sent = time.time()
        self.beat_factor = random.uniform(1.0 - BEAT_JITTER, 1.0)
        if self.link_up and self.welcomed:
            base = self.lease_base()
            self.credit = time.monotonic()
            if self.fence_bound and self.credit - base >= self.heartbeat / 8:
                self.guard_from(self.credit)
        if useq is not None:
            if len(self.sent_at) >= 100_000:  # a very long cut: forget the oldest
                del self.sent_at[min(self.sent_at)]
            self.sent_at.setdefault(useq, time.monotonic())

    def _renew(self, uack: int | None, fallback: float | None = None) -> None:
        """The server received our message ``uack`` while it held our leases: they run until at
        least its send time plus a lease; move the fencing deadline there."""
        sent = self.sent_at.get(uack) if uack is not None else fallback
        if uack is not None:
            for u in [u for u in self.sent_at if u <= uack]:
                del self.sent_at[u]
        if sent is None or sent <= self.renewed:
            return  # an older acknowledgement (a resend, a late message): nothing new
        self.renewed = sent
        if self.fence_bound and self.welcomed:
            self.guard_from(self.lease_base())

    def guard_from(self, base: float) -> None:
        """Tell the guard to stop our tasks ``lag`` after our own deadline from ``base`` (see
        ``settings.fence_timing``); when our deadline has passed (the link just dropped), lag
        from now: we fence at once, the guard only if we cannot. Refused when the guard's
        deadline has passed already: then we fence now, first."""
        self.ex.set_fence(max(base + self.fence_bound, time.monotonic()) + self.fence_lag,
                          self.fence_grace)

    def lease_base(self) -> float:
        """From when our leases surely run a lease period: the newest renewal, or the newest
        message on a link that stayed up (the server reads it before it counts leases out)."""
        return max(self.renewed, self.credit)

    def revoke_credit(self, why: str) -> None:
        """The link dropped, or the server refused a message: what we sent may never renew
        anything; only acknowledged renewals count (and the guard's deadline moves back)."""
        if not self.credit:
            return
        self.credit = 0.0
        log.info("agent %s: %s: leases count from the last acknowledged renewal (%.2f s ago)",
                 self.id, why, time.monotonic() - self.renewed if self.renewed else -1)
        if self.fence_bound and self.renewed and self.welcomed:
            self.guard_from(self.renewed)

    def on_link(self) -> None:
        """Events of our connection (libzmq's monitor): up, down, handshake refused."""
        while True:
            try:
                frames = self.link.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            from zmq.utils.monitor import parse_monitor_message
            ev = parse_monitor_message(frames)
            if ev["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.link_up = True
                self.redial_at = None  # connected: a refusal before this needs no redial
                if self.link_was_up and not self.welcomed and self.hellos_unanswered:
                    # a new connection: what was queued on the old one may be gone
                    self.hellos_unanswered = 0
                    self.hello()
                self.link_was_up = True
            elif ev["event"] == zmq.EVENT_DISCONNECTED:
                self.link_up = False
                self.revoke_credit("the connection to the server dropped")
            elif ev["event"] in (zmq.EVENT_HANDSHAKE_FAILED_AUTH,
                                 zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL):
                if self.redial_at is None:
                    self.redial_at = time.monotonic() + self.heartbeat
                # a refused key is the agent's to tell: its server says no more (once a minute)
                self.link_errors += 1
                if time.monotonic() - self.link_error_logged >= 60:
                    log.error("agent %s: cannot connect to %s: %s%s", self.id,
                              ev["endpoint"].decode(errors="replace"),
                              keys.handshake_hint(ev["event"], ev["value"]),
                              f" ({self.link_errors - 1} more failures since)"
                              if self.link_errors > 1 else "")
                    self.link_error_logged, self.link_errors = time.monotonic(), 0

    def fence_due(self, mono: float) -> bool:
        """True when our leases may run out before a renewal could reach us (once per
        renewal)."""
        base = self.lease_base()
        return bool(self.fence_bound and base and self.fenced_for != base
                    and mono >= self.fence_deadline(base))

    def spawn_deadline(self) -> float | None:
        """Our fencing deadline now (None: none yet): the executor starts nothing past it."""
        base = self.lease_base()
        return self.fence_deadline(base) if self.fence_bound and base else None

    def fence_deadline(self, base: float) -> float:
        """When we stop our tasks: the bound after ``base``, or the guard's deadline if that is
        earlier (the guard is not told of every small step forward), so that we, not the
        guard, stop them -- and know why."""
        mine = base + self.fence_bound
        return min(mine, self.ex.fence_at - self.fence_lag) if self.ex.fence_at else mine

    def fence(self, mono: float) -> None:
        """No renewal for the fencing bound: stop every task and forget the queued ones before
        the server may hand their jobs to another agent; take no work until welcomed again.
        What we report afterwards is harmless: updates for those jobs are refused or count the
        attempt once, and the hello no longer claims them."""
        self.fenced_for = self.lease_base()
        self.credit = 0.0
        now = time.time()
        for t in list(self.ex.active.values()):  # ended by themselves: report, not forget
            if t.pidfd is not None and select.select([t.pidfd], [], [], 0)[0]:
                self.ex.on_exit(t, now)
        held = self.ex.held()
        if held:
            self.fences += 1
            log.warning("agent %s: no lease renewal for %.2f s (cut off from the server, or it "
                        "is down): stopping %d tasks before it may give their jobs to another "
                        "agent: %s", self.id, mono - self.fenced_for, len(held),
                        ", ".join(f"job {h['job']} attempt {h['attempt']}" for h in held[:10]))
            self.ex.stop_all(self.fence_grace)
            # unacknowledged progress of the stopped tasks must not make our hello claim them
            # (the server would keep leases nobody runs); ended tasks' updates are kept
            ended = ({u["job"] for _, ups in self.unacked for u in ups if u["end"] is not None}
                     | {t.job for t in self.ex.reportable})
            self.unacked = [(s, kept) for s, ups in self.unacked
                            if (kept := [u for u in ups if u["job"] in ended])]
            log.warning("agent %s: fenced: tasks stopped %.2f s after the last renewal",
                        self.id, time.monotonic() - self.fenced_for)
        else:
            log.info("agent %s: no lease renewal for %.2f s: waiting for a welcome", self.id,
                     mono - self.fenced_for)
            self.ex.set_fence(0, 0)  # nothing to guard; the next welcome sets a deadline again
        self.welcomed = False
        self.hello()

    def _beat_every(self) -> float:
        """Seconds between heartbeats: half the period while we hold tasks, so that a renewal
        is never more than half a heartbeat old when the server stalls or restarts."""
        if self.fence_bound and (self.ex.queue or self.ex.active):
            return self.heartbeat / 2 * self.beat_factor
        return self.heartbeat * self.beat_factor

    def redial(self) -> None:
        """The server refused our handshake (our key, say) and libzmq gave the connection up:
        connect again, once a heartbeat, with a hello on the new connection, so a key that is
        authorized later is taken without restarting the agent."""
        self.redial_at = None
        try:
            self.sock.disconnect(self.server)
        except zmq.ZMQError:  # libzmq had dropped the endpoint already
            pass
        self.sock.connect(self.server)
        self.hellos_unanswered = 0
        self.hello()

    def _hello_every(self) -> float:
        """Seconds before an unanswered hello is sent again: two heartbeats, doubled for each
        one unanswered, up to HELLO_BACKOFF heartbeats (a new connection sends one at once)."""
        return self.heartbeat * min(HELLO_BACKOFF, 2 ** self.hellos_unanswered) \
            * self.beat_factor

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
        frame = P.encode(P.HELLO, agent=self.id, host=socket.gethostname(), pid=os.getpid(),
                         site=self.site, pilot=self.pilot, cores=self.res.cores,
                         gpus=self.res.gpus, memory=self.res.memory,
                         time_left=self.res.time_left(), running=held, ack=self.ack,
                         node=self.node, node_cores=self.node_cores,
                         launcher=self.launcher.launcher if self.launcher else None,
                         mpi=self.launcher.mpi if self.launcher else None,
                         useq=self.useq + 1, **self._hello_extra)
        self._send(frame, self.useq + 1)
        self.useq += 1
        self.hello_useq = self.useq
        self.hellos_unanswered += 1
        if self.hello_at is None:
            self.hello_at = time.monotonic()
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
        beat = now - self.last_sent >= self._beat_every()
        if self.useq > self.acked and not beat and not force:
            return
        mono = time.monotonic()
        # a look at running tasks' output files is due (every output.TICK seconds)
        look = self.out.due(mono, bool(self.ex.active))
        starving = not self.ex.queue and self.ex.free_cores
        if not beat and not force and not starving and not look and \
                now - self.last_sent < REPORT_INTERVAL:
            return  # batch a little: the prefetch keeps the cores busy meanwhile
        d = self.demand()
        key = (d["cores"], d["gpus"])
        if not self.ex.reportable and not force and not beat and not look and \
                key == self.last_demand:
            return
        ended: list = []
        updates = self.ex.take_updates(now, ended=ended)
        # the last output of a task goes with its end (see pilot/output.py)
        output = self.out.collect(self.ex.active, ended, mono)
        if not updates and not output and not force and not beat and key == self.last_demand:
            return
        self.useq += 1
        if updates:
            self.unacked.append((self.useq, updates))
            self.finished += sum(1 for u in updates if u["end"] is not None)
        self.last_demand = key
        if output:
            self.out.sent(self.useq, output)
            frame = P.encode(P.UPDATE, agent=self.id, useq=self.useq, updates=updates, demand=d,
                             ack=self.ack, epoch=self.epoch, output=output)
        else:
            frame = P.encode(P.UPDATE, agent=self.id, useq=self.useq, updates=updates, demand=d,
                             ack=self.ack, epoch=self.epoch)
        self._send(frame, self.useq)

    def resend_unacked(self) -> None:
        """After a new hello: send again what the server may not have seen."""
        items = [u for _, ups in self.unacked for u in ups]
        self.unacked = []
        self.useq += 1
        if items:
            self.unacked.append((self.useq, items))
        # the output of ended tasks goes again with their ends (rewound at the welcome): a job
        # seen final has all its output stored, also across a server restart
        output = self.out.collect(self.ex.active, [], time.monotonic(), ended_only=True)
        if output:
            self.out.sent(self.useq, output)
            frame = P.encode(P.UPDATE, agent=self.id, useq=self.useq, updates=items,
                             demand=self.demand(), ack=self.ack, epoch=self.epoch, output=output)
        else:
            frame = P.encode(P.UPDATE, agent=self.id, useq=self.useq, updates=items,
                             demand=self.demand(), ack=self.ack, epoch=self.epoch)
        self._send(frame, self.useq)

    def on_message(self, frame: bytes, now: float) -> None:
        try:
            kind, m = P.decode(frame, (P.WELCOME, P.TASKS, P.CANCEL, P.ERROR, P.STOPPING,
                                       P.NOWORK))
            if kind == P.TASKS:
                P.check_items(P.TASK, m["tasks"], "tasks")
                P.check_items(P.JOB_ATTEMPT, m["refused"], "refused")
            elif kind in (P.CANCEL, P.WELCOME):
                P.check_items(P.JOB_ATTEMPT, m["jobs" if kind == P.CANCEL else "revoke"], kind)
        except ProtocolError as exc:
            log.error("bad message from the server: %s", exc)
            return
        if kind == P.TASKS:
            if m.get("epoch") is not None and m["epoch"] != self.epoch:
                log.warning("ignored a task batch of server epoch %s (welcomed by epoch %s)",
                            m["epoch"], self.epoch)
                return  # from an earlier start of the server, left in a socket buffer
            self.acked = max(self.acked, m["uack"])
            self.unacked = [(s, u) for s, u in self.unacked if s > m["uack"]]
            if self.out.streams:
                self.out.acked(m["uack"])
            for r in m["refused"]:
                log.warning("server refused an update for job %d attempt %d (lease gone)",
                            r["job"], r["attempt"])
                self.ex.cancel(r["job"], r["attempt"])
            if not self.welcomed:
                if m["tasks"]:  # sent before we fenced (a late message): their leases are gone
                    log.warning("ignored %d tasks sent before this agent fenced its tasks",
                                len(m["tasks"]))
                return
            self._renew(m["uack"])
            if m["tasks"]:
                self.ack = max(self.ack, m["seq"])
                for spec in m["tasks"]:
                    self.ex.add(spec)
                self.received += len(m["tasks"])
        elif kind == P.CANCEL:
            for item in m["jobs"]:
                if self.ex.cancel(item["job"], item["attempt"]):
                    log.info("job %d cancelled by the server", item["job"])
        elif kind == P.WELCOME:
            beat, lease = float(m["heartbeat"]), m.get("lease")
            if m["agent"] != self.id or not 0 < beat < 1e6 or \
                    (lease is not None and not 0 < lease < 1e7):
                log.error("ignored a bad welcome (agent %r, heartbeat %r, lease %r)",
                          m["agent"], m["heartbeat"], lease)
                return
            if m.get("uack") is not None and m["uack"] < self.hello_useq:
                # it answers an older hello (queued while the server was down); the answer to
                # our newest one follows on the same connection: one welcome per reconnect
                log.debug("ignored a welcome to an older hello (useq %d < %d)", m["uack"],
                          self.hello_useq)
                return
            if self.leave_at is not None:
                log.info("a server is back after it said it was stopping: staying")
                self.leave_at = None
            # one line per (re)connect, this one
            restart = (f"the server restarted (epoch {self.epoch} -> {m['epoch']}): "
                       if self.epoch is not None and m.get("epoch") not in (None, self.epoch)
                       else "")
            self.epoch = m.get("epoch")
            self.welcomed = True
            self.hellos_unanswered = 0
            self.heartbeat = min(self.heartbeat, beat)
            lease = lease or beat * settings.LEASE_HEARTBEATS
            self.fence_bound, self.fence_grace, self.fence_lag = settings.fence_timing(
                self.heartbeat, float(lease))
            # a server that does not say which hello it answers: the first one unanswered
            self._renew(m.get("uack"), self.hello_at)
            self.hello_at = None
            self.fenced_for = 0.0  # held tasks from now on are fenced at this renewal's bound
            if self.renewed:
                self.guard_from(self.lease_base())
            for item in m["revoke"]:
                self.ex.cancel(item["job"], item["attempt"])
            # output: this server's limits; what was not acknowledged is read again
            self.out.configure(m.get("output_cap"), m.get("output_rate"))
            self.out.rewind()
            log.info("%sserver %s (epoch %s) welcomed agent %s (%d tasks held)", restart,
                     self.server, self.epoch, self.id, len(self.ex.held()))
            self.resend_unacked()
        elif kind == P.ERROR:
            self.revoke_credit("the server refused a message")
            if "say hello" not in m["error"]:
                log.warning("server says: %s", m["error"])
            elif not self.welcomed and self.hello_at is not None:
                # the answer to a message we sent before our hello (the server restarted with
                # several of ours queued): that hello is on its way, its welcome follows; if it
                # was lost, the main loop says hello again after its backoff
                log.debug("server says: %s (a hello is on its way)", m["error"])
            else:
                # "unknown agent": the server restarted or lost us; the welcome says which
                (log.debug if m["error"].startswith("unknown agent") else log.warning)(
                    "server says: %s: saying hello again", m["error"])
                self.welcomed = False
                self.acked = self.useq  # that server will never answer what we sent it
                self.hello()
        elif kind == P.NOWORK:
            self.on_no_work(m)
        elif kind == P.STOPPING:
            if m.get("epoch") is not None and self.epoch is not None and m["epoch"] < self.epoch:
                return  # an earlier start of the server, left in a socket buffer
            grace = m.get("grace")
            grace = float(grace) if grace is not None and 0 < grace < 1e6 \
                else settings.AGENT_STOP_GRACE
            self.leave_at = time.monotonic() + grace
            log.info("the server is stopping on purpose: leaving in %.0f s unless a server "
                     "welcomes us again (running tasks keep running until then)", grace)

    def on_no_work(self, m: dict) -> None:
        """The server says no queued or pending job fits us: leave, if we are idle and saw every
        task batch it sent before saying so (a later batch, if any, it takes back unseen)."""
        if self.leave_when_no_work == "never" or not self.welcomed or self.stopping:
            return
        if m.get("epoch") is not None and m["epoch"] != self.epoch:
            return
        if self.leave_when_no_work == "after-work" and not self.received:
            return
        if m["seq"] != self.ack or not self.ex.idle():
            return
        self.no_work = f"the server has no work that fits it ({self.finished} tasks finished)"

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
        while not self.stopping:
            now = time.time()
            wake = [self.last_sent + (self._beat_every() if self.welcomed
                                      else self._hello_every())]
            base = self.lease_base()
            if self.fence_bound and base and self.fenced_for != base:
                wake.append(now + self.fence_deadline(base) - time.monotonic())
            due = ex.next_report()
            if due is not None and self.useq <= self.acked:  # else: wait for the ack
                wake.append(max(due, self.last_sent + REPORT_INTERVAL))
            if self.welcomed and self.useq <= self.acked and self.out.cap and \
                    (ex.active or self.out.streams):
                wake.append(now + self.out.next_tick - time.monotonic())  # an output look
            nd = ex.next_deadline()
            if nd is not None:
                wake.append(nd)
            if self.leave_at is not None:
                wake.append(now + self.leave_at - time.monotonic())
            if self.redial_at is not None and not self.welcomed:
                wake.append(now + self.redial_at - time.monotonic())
            timeout = max(0, min(wake) - now)
            events = poll(timeout * 1000)
            now = time.time()
            # before reaping: at the same deadline the guard may have stopped the tasks already
            if self.fence_due(time.monotonic()):
                self.fence(time.monotonic())
            for what, _ in events:
                if what is self.link:
                    self.on_link()
                    if self.fence_due(time.monotonic()):  # the link dropped: credit is gone
                        self.fence(time.monotonic())
                elif what is sock:
                    while True:
                        try:
                            frame = sock.recv(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self.on_message(frame, now)
                elif what in self.fd_tasks:  # a task's pidfd, or the spawner's eventfd
                    ex.on_fd(what, self.fd_tasks[what], now)
            if self.fence_due(time.monotonic()):  # tasks just received on an old renewal
                self.fence(time.monotonic())
            ex.check_timeouts(now)
            ex.start_ready(now)
            if self.welcomed:
                self.send_update(now)
            elif self.redial_at is not None and time.monotonic() >= self.redial_at:
                self.redial()
            elif now - self.last_sent > self._hello_every():
                self.hello()
            if self.no_work is not None:
                if ex.idle():
                    log.info("agent %s: %s: leaving", self.id, self.no_work)
                    break
                self.no_work = None  # work came in the same read: stay
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
            if self.leave_at is not None and time.monotonic() >= self.leave_at:
                log.info("agent %s: the server stopped on purpose and none welcomed us since: "
                         "leaving", self.id)
                break
        return self.leave()

    def leave(self) -> int:
        """Stop tasks, hand back what we hold, and say goodbye (waiting briefly for the ack)."""
        now = time.time()
        # progress not yet due (a start moments ago) goes too: stop_all forgets it, and the
        # server would take a task it never saw start for one that never ran
        pending = self.ex.take_updates(now, True)
        released = self.ex.stop_all()
        updates = [u for _, ups in self.unacked for u in ups] + pending \
            + self.ex.take_updates(now, True)
        self.useq += 1
        self._send(P.encode(P.BYE, agent=self.id, useq=self.useq, updates=updates,
                            released=released, epoch=self.epoch,
                            # (only to a server we asked for nowork: an older one refuses it)
                            **({"ack": self.ack} if self._hello_extra else {})))
        # no server to wait for when ours stopped on purpose and none came back, nor when none
        # welcomed us and we hold nothing (a refused key: nobody would answer)
        idle_stranger = not self.welcomed and not released and not updates
        deadline = time.time() + (0 if idle_stranger else 0.5 if self.leave_at is not None
                                  else 5)
        acked = False
        while time.time() < deadline and self.sock.poll(int((deadline - time.time()) * 1000)):
            try:
                kind, m = P.decode(self.sock.recv(), (P.WELCOME, P.TASKS, P.CANCEL, P.ERROR,
                                                      P.STOPPING))
            except Exception:
                continue
            if kind == P.TASKS and m["uack"] >= self.useq:
                acked = True
                break
        if not acked and self.leave_at is not None:
            log.info("the server is stopped: the %d tasks we held are taken back when it "
                     "starts again", len(released))
        elif not acked and not idle_stranger:
            log.warning("server did not acknowledge our goodbye; its lease timeout will "
                        "requeue %d held tasks", len(released))
        log.info("agent %s: %d tasks received, %d finished, handed back %d", self.id,
                 self.received, self.finished, len(released))
        self.close(linger=1000)
        return 0

    def close(self, linger: int = 0) -> None:
        """Close the sockets (the link monitor's too: a context with an open socket never
        terminates) and the context."""
        try:
            self.sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self.link.close(linger=0)
        self.sock.close(linger=linger)
        self.ctx.term()
