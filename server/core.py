"""The job server's state and rules, without the socket: queue, leases, agents, dispatch.

The ZMQ loop (:mod:`.service`) feeds messages in and sends :attr:`JobServer.outbox` out after
:meth:`JobServer.commit`, so nothing an agent or client is told is ever ahead of the database.
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import bindparam, case, func, select
from sqlalchemy.engine import Connection, Engine

from pilotfish import dataroots, settings
from pilotfish import protocol as P
from pilotfish.dataroots import DataRoots
from pilotfish.errors import Forbidden, IllegalTransition, NotFound, ProtocolError
from pilotfish.validate import echo

from . import replay, states
from .apps import App, app_from_row
from .db import agent_keys
from .db import agents as agents_t
from .db import apps as apps_t
from .db import SQLITE_CACHE_KIB, SQLITE_LOAD_CACHE_KIB
from .db import event_ids, job_parents, jobs, max_job_id, next_epoch
from .drain import Drain
from .fence import Fence
from .gangs import Gangs
from .output import OutputStore
from .queue import ReadyQueue, Shape
from .remote_sites import PREFIX, Remotes
from .staging import StagingBook, remote
from .states import State
from .store import Batch, _psycopg, chunks
from .workflows import Tracker

#: The text fields of an agent's hello and the most characters each may have (as in db.agents).
HELLO_TEXT_LIMITS = (("agent", 64), ("host", 255), ("site", 128), ("pilot", 128),
                     ("node", 255), ("launcher", 32), ("mpi", 32))
log = logging.getLogger("pilotfish.server")
S = State
BY_NAME = {s.value: s for s in State}  # faster than State(name) on the update path
#: At most this many tasks in one message to an agent.
MAX_TASKS_PER_MESSAGE = 1000
#: On PostgreSQL, a turn's writes are sent every this many task updates or leases
#: (Batch.stream): the database writes them while the loop works on the next ones.
STREAM_EVERY = 64
#: Queued jobs are read at start a range of ids at a time: the first range before the server
#: serves, the rest between turns (see JobServer.load_more), so a restart with a million queued
#: jobs answers requests within a second. Dispatch waits until the last range is read.
LOAD_FIRST_IDS = 20_000
LOAD_PAGE_IDS = 20_000

_DISPATCH_COLS = (jobs.c.id, jobs.c.name, jobs.c.app_id, jobs.c.parameters, jobs.c.workdir,
                  jobs.c.wall_time_minutes, jobs.c.attempts, jobs.c.retries, jobs.c.max_retries,
                  jobs.c.state, jobs.c.input_url, jobs.c.output_url, jobs.c.priority,
                  jobs.c.image)
_DISPATCH_SELECT = select(*_DISPATCH_COLS).where(
    jobs.c.id.in_(bindparam("ids", expanding=True)))
_SHAPE_COLS = (jobs.c.id, jobs.c.priority, jobs.c.site, jobs.c.num_nodes,
               jobs.c.processes_per_node, jobs.c.cpus_per_process, jobs.c.gpus_per_process,
               jobs.c.wall_time_minutes)
#: The queued jobs of a range of ids (JobServer.load_more): an index range (state, id).
_LOAD_SELECT = select(*_SHAPE_COLS).where(
    jobs.c.state.in_([s.value for s in states.QUEUED]), jobs.c.agent.is_(None),
    jobs.c.id > bindparam("lo"), jobs.c.id <= bindparam("top"))


def _writer_engine(engine: Engine) -> Engine | None:
    """The engine of the writer process's connections for a SQLite file (see .sqlite_remote),
    unless PILOTFISH_SQLITE_WRITER=off keeps the connection in this process."""
    if engine.dialect.name != "sqlite" or os.environ.get("PILOTFISH_SQLITE_WRITER") == "off":
        return None
    db = engine.url.database
    if not db or db == ":memory:" or db.startswith("file:"):
        return None
    from . import sqlite_remote
    return sqlite_remote.engine(engine.url.render_as_string(hide_password=False))


def _text(msg: str | None) -> str | None:
    """An agent's message as stored: a task's stderr may hold NUL bytes, which PostgreSQL
    refuses in text (the failed write took the whole turn down, again at every resend)."""
    return msg.replace("\x00", "\\0") if msg and "\x00" in msg else msg


def shape_of(row: Any) -> Shape:
    """A job's queue shape from a row or dict with the resource columns."""
    get = row.__getitem__ if isinstance(row, dict) else row._mapping.__getitem__
    return make_shape(get("site"), get("num_nodes"), get("processes_per_node"),
                      get("cpus_per_process"), get("gpus_per_process"),
                      get("wall_time_minutes"))


#: Shapes made so far, by their columns: a million queued jobs have a handful of shapes, and
#: one shared (immutable) Shape each instead of a tuple per job saves ~100 bytes a job.
_SHAPES: dict[tuple, Shape] = {}


def make_shape(site: str | None, nodes: int, ppn: int, cpus: int, gpus: int,
               wall_minutes: float | None) -> Shape:
    """The queue shape of a job's resource columns (one object per distinct shape)."""
    key = (site, nodes, ppn, cpus, gpus, wall_minutes)
    shape = _SHAPES.get(key)
    if shape is None:
        if len(_SHAPES) >= 10_000:  # many distinct shapes: bound the cache, stay correct
            _SHAPES.clear()
        shape = _SHAPES[key] = Shape(site, nodes, ppn * cpus, ppn * gpus,
                                     None if wall_minutes is None else wall_minutes * 60.0,
                                     ppn)
    return shape


@dataclass(slots=True)
class Lease:
    """A job handed to an agent for one attempt; the agent's heartbeats keep it alive."""
    job: int
    agent: str
    attempt: int
    state: State
    retries: int
    max_retries: int
    priority: int
    shape: Shape
    #: when the agent said this attempt started (jobs.started)
    started: float | None = None


@dataclass
class AgentRec:
    id: str
    host: str
    pid: int
    site: str | None
    pilot: str | None
    cores: int
    gpus: int
    memory: int
    started: float
    last_seen: float
    node: str | None = None
    node_cores: int | None = None
    launcher: str | None = None
    mpi: str | None = None
    state: str = "ALIVE"
    identity: bytes | None = None
    demand: dict | None = None
    demand_time: float = 0.0
    seq: int = 0
    uack: int = 0
    inflight: deque = field(default_factory=deque)   # (seq, cores, gpus) sent, not yet seen
    leases: set = field(default_factory=set)
    tasks_done: int = 0
    db_touched: float = 0.0
    refused: list = field(default_factory=list)      # refused updates not yet told
    key: str | None = None     # the CurveZMQ public key (Z85) this agent id belongs to
    hello_useq: int | None = None  # the useq of the last hello we answered (this start)
    #: time.monotonic() of its last hello or update: leases are counted out on this clock, so a
    #: step of the wall clock never expires them early (agents fence on their own monotonic one)
    seen: float = field(default_factory=time.monotonic)
    #: its hello asked to be told when no work fits it (server/drain.py), and when we told it
    #: last: our task batch seq then, and the time
    leave_idle: bool = False
    nowork_seq: int = -1
    nowork_at: float = 0.0

    def budget(self) -> tuple[int, int]:
        cores = self.demand["cores"] - sum(c for _, c, _ in self.inflight)
        gpus = self.demand["gpus"] - sum(g for _, _, g in self.inflight)
        return cores, gpus

    def to_dict(self, now: float) -> dict:
        return {"id": self.id, "host": self.host, "pid": self.pid, "site": self.site,
                "pilot": self.pilot, "cores": self.cores, "gpus": self.gpus,
                "memory": self.memory, "started": self.started, "last_seen": self.last_seen,
                "state": self.state, "leases": len(self.leases),
                "tasks_done": self.tasks_done, "silent_seconds": round(now - self.last_seen, 1),
                "node": self.node, "node_cores": self.node_cores, "launcher": self.launcher,
                "affinity_ok": self.node_cores is None or self.cores >= self.node_cores}


class JobServer:
    def __init__(self, engine: Engine, heartbeat: float, lease_timeout: float,
                 data_roots: DataRoots | None = None) -> None:
        self.engine = engine
        #: Where jobs' input_url/output_url may point (None: only the home's data directory
        #: of the current home, for servers built without a Service, as in tests).
        self.data_roots = data_roots or dataroots.make(settings.home())
        #: SQLite: the read-write connection lives in a writer process of its own (see
        #: .sqlite_remote), this process reads committed rows on ``_local``
        self._wengine = _writer_engine(engine)
        self._conn = (self._wengine or engine).connect()
        self._local: Connection | None = None
        #: PostgreSQL: a second connection (autocommit) for the dispatch read of jobs this
        #: turn has not touched (see _dispatch_rows); made when first used
        self._reader: Any = None
        self.heartbeat = heartbeat
        self.lease_timeout = lease_timeout
        self.batch = Batch()
        if self._wengine is not None or _psycopg(self._conn):
            self.batch.touched = set()  # untouched jobs are read as committed (_dispatch_rows)
        self.batch.remote = self._wengine is not None
        self.queue = ReadyQueue()
        #: site stagers' books: jobs held for them, their leases (see .staging)
        self.staging = StagingBook(self)
        #: forwarded jobs held until their forwarder's start (federation, see .fence)
        self.fence = Fence(self)
        self.queue.hold = self._hold
        self.gangs = Gangs(self)
        self.apps: dict[int, App] = {}
        self.app_names: dict[str, App] = {}
        self.leases: dict[int, Lease] = {}
        self.agents: dict[str, AgentRec] = {}
        self._gone_agents: dict[str, dict] = {}  # agent_where of agents not in self.agents
        self.routes: dict[bytes, str] = {}  # routing id -> the agent that said hello on it
        self.hungry: set[str] = set()
        self.ack_due: set[str] = set()   # agents whose update this turn is not yet answered
        self.waited_on: set[int] = set()  # jobs that some AWAITING_PARENTS job waits for
        self.outbox: list[tuple[bytes, bytes]] = []
        self.finished: list[int] = []     # jobs that reached JOB_FINISHED this turn
        self.failed: list[int] = []       # jobs whose failure fails their children
        self.next_id = 1
        #: This start of the server (see :func:`.db.next_epoch`); set by :meth:`load`.
        self.epoch = 0
        #: The newest event id pruned: cursors older than it are refused (see .events).
        self.events_pruned = 0
        self.stopping = False
        #: [ids read up to, last id to read, time.monotonic() of the start] while the queued
        #: jobs are still being read (see load_more); None once all are in the queue
        self.loading: list | None = None
        self.started = time.time()
        self.stats = {"dispatched": 0, "updates": 0, "refused": 0, "bad_messages": 0}
        #: tasks' output shipped by agents (job log): its limits, caches and checks
        self.output = OutputStore()
        #: workflows not yet done, derived from their subjobs before each commit
        self.workflows = Tracker(self.batch)
        #: sites served by other servers (pseudo-agents ``site:NAME``; see .remote_sites)
        self.remotes = Remotes(self)
        #: telling idle agents that no work fits them, so their pilots leave (see .drain)
        self.drain = Drain(self)

    # -- start and turn boundaries ----------------------------------------------------------
    def load(self, epoch: int | None = None) -> None:
        """Rebuild the in-memory indexes from the database; ``epoch``: keep this start's epoch
        (a rebuild after an internal error is no new start: agents keep their welcome)."""
        c = self.conn
        self._cache_size(SQLITE_LOAD_CACHE_KIB)  # until the queue is read (see .db)
        self.epoch = next_epoch(c) if epoch is None else epoch
        for row in c.execute(select(apps_t)):
            app = app_from_row(row)
            self.apps[app.id] = app
            self.app_names[app.name] = app
        self.next_id = max_job_id(c) + 1
        self.batch.next_event_id, self.events_pruned = event_ids(c)
        self.batch.counts.update(
            {r[0]: r[1] for r in c.execute(select(jobs.c.state, func.count())
                                          .group_by(jobs.c.state))})
        now = time.time()
        for row in c.execute(select(agents_t).where(agents_t.c.state == "ALIVE")):
            # Known agents get one lease period to reconnect and report what they still run,
            # counted from now: an agent that cannot reach us stops its tasks within one lease
            # of its last renewal, which was before this start, so none of these jobs is
            # handed to another agent before its tasks could have been fenced.
            self.agents[row.id] = AgentRec(
                id=row.id, host=row.host, pid=row.pid, site=row.site, pilot=row.pilot,
                cores=row.cores, gpus=row.gpus, memory=row.memory, started=row.started,
                last_seen=now, tasks_done=row.tasks_done, node=row.node,
                node_cores=row.node_cores, launcher=row.launcher)
        for part in chunks(sorted(self.agents), 900):
            for row in c.execute(select(agent_keys.c.agent_id, agent_keys.c.public_key)
                                 .where(agent_keys.c.agent_id.in_(part))):
                self.agents[row.agent_id].key = row.public_key
        waiting = (select(job_parents.c.parent_id).distinct()
                   .join(jobs, jobs.c.id == job_parents.c.job_id)
                   .where(jobs.c.state.in_([S.AWAITING_PARENTS.value, S.CREATED.value])))
        self.waited_on = {r[0] for r in c.execute(waiting)}
        self.workflows.load(c)
        self.remotes.load(c)
        self.fence.load(c)
        queued = [s.value for s in states.QUEUED]
        # first the jobs an agent holds (few, whatever the queue's length), then the queue
        for row in c.execute(select(*_SHAPE_COLS, jobs.c.state, jobs.c.agent, jobs.c.attempts,
                                    jobs.c.retries, jobs.c.max_retries, jobs.c.started)
                             .where(jobs.c.agent.is_not(None))):
            shape = shape_of(row)
            agent = self.agents.get(row.agent) if row.agent else None
            # jobs.started is this attempt's start once it ran (it is set from the update that
            # says so); a job still queued on its agent has the last attempt's, or none
            started = None if row.state in queued else row.started
            if agent is not None:
                self.leases[row.id] = Lease(row.id, agent.id, row.attempts, S(row.state),
                                            row.retries, row.max_retries, row.priority, shape,
                                            started)
                agent.leases.add(row.id)
            elif row.agent is not None and row.state not in queued:
                # held by an agent that is gone for good: handled like a lost lease
                lease = Lease(row.id, row.agent, row.attempts, S(row.state), row.retries,
                              row.max_retries, row.priority, shape, started)
                self.leases[row.id] = lease
                self.drop_lease(lease, now, f"agent {row.agent} was gone at server start")
            else:
                if row.agent is not None:
                    self.batch.update_job(row.id, agent=None)
                    self.batch.end_attempt(row.id, "LOST", now,
                                           f"agent {row.agent} was gone at server start")
                self.queue.push(row.id, row.priority, shape)
        self.loading = [0, self.next_id - 1, time.monotonic()]
        self.load_more(LOAD_FIRST_IDS)
        self.staging.load(c)
        self.commit()
        log.info("epoch %d: loaded %d apps, %d queued jobs%s, %d leases, %d agents; next job id "
                 "%d", self.epoch, len(self.apps), len(self.queue),
                 " so far (the rest between turns)" if self.loading else "", len(self.leases),
                 len(self.agents), self.next_id)

    def load_more(self, span: int | None = None) -> None:
        """Read the next ``span`` ids of the queued jobs that were in the database at start
        into the queue (what dispatch needs: id, priority, shape), until none are left.

        Called between turns, after a commit, so the rows read say what every change made
        since the start did to them: a job killed or altered before its range was read is read
        as it is now, and one already queued again (a retry, a lease given back), leased or
        held by a stager is skipped."""
        lo, hi, t0 = self.loading
        top = min(hi, lo + (LOAD_PAGE_IDS if span is None else span))
        queue, leases, held = self.queue, self.leases, self.staging.held
        push = queue.push
        self.sync()  # (nothing should be pending between turns; if it were, read it too)
        # rows unpacked as tuples: a row's ._mapping (shape_of) cost more than reading it;
        # with a writer process, read here as committed when the turn holds nothing
        conn = self.local() if self._wengine is not None and not self.batch.touched \
            else self.conn
        rows = conn.execute(_LOAD_SELECT, {"lo": lo, "top": top})
        for jid, priority, site, nodes, ppn, cpus, gpus, wall in rows:
            if jid in queue or jid in leases or jid in held:
                continue
            push(jid, priority, make_shape(site, nodes, ppn, cpus, gpus, wall))
        if top < hi:
            self.loading[0] = top
            return
        self.loading = None
        self._cache_size(SQLITE_CACHE_KIB)
        if lo > 0:  # done between turns: say so (a short queue is read before serving)
            log.info("epoch %d: queue loaded in %.1f s: %d queued jobs", self.epoch,
                     time.monotonic() - t0, len(self.queue))

    def _cache_size(self, kib: int) -> None:
        if self.engine.dialect.name == "sqlite":
            self.conn.exec_driver_sql(f"PRAGMA cache_size=-{int(kib)}")

    def queued_shapes(self) -> dict[Shape, int]:
        """Queued job counts per shape, also while the queue is still being read at start
        (the ids not yet read are counted in the database, where they are as they are now)."""
        if self.loading is None:
            return self.queue.shapes()
        lo, hi, _ = self.loading
        self.sync()  # this turn's changes so far, seen by the count
        counts = self.queue.shapes(outside=(lo, hi))
        cols = (jobs.c.site, jobs.c.num_nodes, jobs.c.processes_per_node,
                jobs.c.cpus_per_process, jobs.c.gpus_per_process, jobs.c.wall_time_minutes)
        q = (select(*cols, func.count())
             .where(jobs.c.state.in_([s.value for s in states.QUEUED]),
                    jobs.c.agent.is_(None), jobs.c.id > lo, jobs.c.id <= hi)
             .group_by(*cols))
        for *key, n in self.conn.execute(q):
            shape = make_shape(*key)
            counts[shape] = counts.get(shape, 0) + n
        return counts

    def agent_where(self, aid: str) -> dict:
        """Host, node and pilot of an agent, alive or long gone: where an attempt ran (they
        never change after its hello; gone agents' are remembered once read)."""
        a = self.agents.get(aid)
        if a is not None:
            return {"host": a.host, "node": a.node, "pilot": a.pilot}
        where = self._gone_agents.get(aid)
        if where is None:
            row = self.conn.execute(select(agents_t.c.host, agents_t.c.node, agents_t.c.pilot)
                                    .where(agents_t.c.id == aid)).first()
            where = dict(row._mapping) if row else {"host": None, "node": None, "pilot": None}
            if len(self._gone_agents) >= 10_000:
                self._gone_agents.clear()
            self._gone_agents[aid] = where
        return where

    def agent_node(self, aid: str | None) -> str | None:
        """The node (else host) an agent runs on; None for none."""
        if aid is None:
            return None
        where = self.agent_where(aid)
        return where["node"] or where["host"]

    @property
    def conn(self) -> Connection:
        """The database connection, once the writes this turn streamed are in
        (Batch.stream): whatever uses it sees them, and an error among them fails here."""
        if self.batch.streaming:
            self.batch.settle()
        return self._conn

    def close(self) -> None:
        """Close the connection (what was not committed is dropped with it)."""
        try:
            self.batch.settle()
        except Exception:  # a streamed write that failed: rolled back with the connection
            pass
        for c in (self._reader, self._conn, self._local):
            try:
                if c is not None:
                    c.close()
            except Exception:
                log.exception("closing a database connection failed")
        self._reader = self._local = None
        if self._wengine is not None:
            self._wengine.dispose()

    def local(self) -> Connection:
        """A connection of this process that reads what is committed (the writer process
        holds the read-write one); with a small page cache: it reads the queue once at start
        and a turn's few rows after."""
        if self._local is None:
            self._local = self.engine.connect()
            self._local.exec_driver_sql(f"PRAGMA cache_size=-{SQLITE_LOAD_CACHE_KIB}")
        return self._local

    def sync(self) -> None:
        """Write what is batched so far, inside the open transaction (reads then see it)."""
        if self.batch:
            self.batch.execute(self._conn)

    def commit(self) -> None:
        now = time.time()
        self.resolve_children(now)
        if self.batch.wf_moves:
            self.workflows.derive(now)
        self.flush_acks()
        if self.batch:  # the writes and, on PostgreSQL, the COMMIT: one round trip
            self.batch.execute(self._conn, commit=True)
        self.conn.commit()
        if self.batch.touched:
            self.batch.touched.clear()
            self.batch.fresh.clear()

    def send(self, identity: bytes, frame: bytes) -> None:
        self.outbox.append((identity, frame))

    # -- agents -----------------------------------------------------------------------------
    def bind_key(self, identity: bytes, aid: str, a: AgentRec | None, key: str,
                 key_name: str | None, now: float) -> None:
        """An agent id belongs to the key of its first hello (kept in agent_keys, so a server
        restart keeps it): refuse a hello for it from any other key, and a hello whose routing
        id an ALIVE agent of another key uses (ROUTER_HANDOVER would give that agent's
        messages to this connection)."""
        bound = a.key if a is not None else None
        if bound is None:
            row = self.conn.execute(select(agent_keys.c.public_key, agent_keys.c.key_name)
                                    .where(agent_keys.c.agent_id == aid)).first()
            if row is not None:
                bound = row.public_key
        if bound is not None and bound != key:
            raise Forbidden(f"agent id {aid} belongs to another key; key {key_name!r} may not "
                            "say hello as it")
        other = self.agents.get(self.routes.get(identity))
        if other is not None and other.identity == identity and other.id != aid \
                and other.state == "ALIVE" and other.key != key:
            raise Forbidden(f"agent {other.id} of another key uses this routing id; key "
                            f"{key_name!r} may not take it over")
        if bound is None:
            self.conn.execute(agent_keys.insert().values(agent_id=aid, public_key=key,
                                                         key_name=key_name, bound=now))
        if a is not None:
            a.key = key

    def on_hello(self, identity: bytes, m: dict, now: float, key: str | None = None,
                 key_name: str | None = None) -> None:
        """``key``: the caller's CurveZMQ public key (None without CURVE: no binding)."""
        for k, n in HELLO_TEXT_LIMITS:  # their columns' sizes; they are logged too
            if m.get(k) is not None and len(m[k]) > n:
                raise ProtocolError(f"hello: field {k!r} is longer than {n} characters "
                                    f"({len(m[k])})")
        running = P.check_items(P.JOB_ATTEMPT, m["running"], "running")
        aid = m["agent"]
        if Remotes.is_site_agent(aid):
            raise ProtocolError(f"hello: agent ids starting {PREFIX!r} are remote sites'")
        a = self.agents.get(aid)
        if key is not None:
            self.bind_key(identity, aid, a, key, key_name, now)
        cores, gpus = len(m["cores"]), len(m["gpus"])
        if a is None:
            a = AgentRec(id=aid, host=m["host"], pid=m["pid"], site=m.get("site"),
                         pilot=m.get("pilot"), cores=cores, gpus=gpus, memory=m["memory"],
                         started=now, last_seen=now, node=m.get("node"),
                         node_cores=m.get("node_cores"), launcher=m.get("launcher"),
                         mpi=m.get("mpi"), key=key)
            self.agents[aid] = a
            self.batch.agent_inserts.append(
                {"id": aid, "host": a.host, "pid": a.pid, "site": a.site, "pilot": a.pilot,
                 "cores": cores, "gpus": gpus, "memory": a.memory, "started": now,
                 "last_seen": now, "state": "ALIVE", "tasks_done": 0, "node": a.node,
                 "node_cores": a.node_cores, "launcher": a.launcher})
            self.agent_event(a, None, "ALIVE", now, f"joined from {a.host} ({cores} cores, "
                             f"{gpus} GPUs)")
            log.info("agent %s joined from %s (node %s, pid %d, %d cores, %d GPUs, site %s, "
                     "pilot %s, launcher %s)", aid, a.host, a.node, a.pid, cores, gpus, a.site,
                     a.pilot, a.launcher)
            if a.node_cores is not None and cores < a.node_cores:
                log.warning("AFFINITY: agent %s on %s may use only %d of the node's %d CPUs: "
                            "its launcher pinned it; its tasks share those CPUs", aid, a.node,
                            cores, a.node_cores)
        else:
            if a.state != "ALIVE":
                self.agent_event(a, a.state, "ALIVE", now, "came back")
            a.state = "ALIVE"
            a.last_seen = now
            a.seen = time.monotonic()
            self.batch.update_agent(aid, state="ALIVE", last_seen=now)
            # One line per reconnect: a hello that crossed our welcome to an earlier one on the
            # same connection (queued while we were down; the agent acted on no welcome since,
            # nothing of it reached us in between) is the same reconnect.
            crossed = (a.identity == identity and a.hello_useq is not None
                       and a.uack < a.hello_useq < (m.get("useq") or 0))
            (log.debug if crossed else log.info)(
                "agent %s said hello again (%d tasks held)", aid, len(m["running"]))
        a.hello_useq = m.get("useq")
        a.leave_idle, a.nowork_seq = bool(m.get("leave_idle")), -1
        a.identity = identity
        self.routes[identity] = aid
        a.demand = None
        a.inflight.clear()
        a.seq = m["ack"]
        held = set()
        revoke = []
        for item in running:
            lease = self.leases.get(item["job"])
            if lease is not None and lease.agent == aid and lease.attempt == item["attempt"]:
                held.add(lease.job)
            else:
                revoke.append(item)
        for job in list(a.leases - held):
            self.drop_lease(self.leases[job], now, f"agent {aid} no longer holds it")
        # uack: the hello answered, so the agent knows from when its leases run (fencing)
        self.send(identity, P.encode(P.WELCOME, agent=aid, heartbeat=self.heartbeat,
                                     revoke=revoke, lease=self.lease_timeout,
                                     epoch=self.epoch, uack=m.get("useq"),
                                     output_cap=self.output.cap,
                                     output_rate=self.output.rate))

    def agent_event(self, a: AgentRec, frm: str | None, to: str, now: float,
                    message: str) -> None:
        """An agent's lifecycle on the event stream: joined (None -> ALIVE), came back (LOST or
        EXITED -> ALIVE), lost (-> LOST), left (-> EXITED)."""
        self.batch.server_event("agent", to, now, frm, message, agent=a.id, host=a.host,
                                pilot=a.pilot, site=a.site)

    def tell_stopping(self, grace: float) -> int:
        """We stop on purpose: tell every connected agent, so it leaves after ``grace`` seconds
        unless a server welcomes it again (a restart); a crash tells nothing and is ridden out.
        Returns how many agents were told."""
        told = 0
        for a in self.agents.values():
            if a.state == "ALIVE" and a.identity is not None:
                self.send(a.identity, P.encode(P.STOPPING, epoch=self.epoch, grace=grace))
                told += 1
        return told

    def agent_for(self, identity: bytes, aid: str, epoch: int | None = None) -> AgentRec | None:
        """The agent of a message, or None (it must say hello again): unknown, lost, on
        another connection, or welcomed by another start of the server (``epoch``)."""
        a = self.agents.get(aid)
        if a is None or a.identity != identity or a.state != "ALIVE":
            return None
        if epoch is not None and epoch != self.epoch:
            return None
        return a

    def on_update(self, a: AgentRec, m: dict, now: float) -> None:
        items = P.check_items(P.TASK_UPDATE, m["updates"], "updates")
        demand = P.check_fields(P.DEMAND, m["demand"], "demand")
        a.last_seen = now
        a.seen = time.monotonic()
        output = m.get("output")
        if output:  # before the updates: a task's last output rides with its end (its lease)
            self.output.on_chunks(self, a, output, now)
        refused = self.apply_updates(a, items, now)
        if refused:
            refused = replay.still_refused(self.conn, items, refused)
        a.uack = m["useq"]
        a.demand = demand
        a.demand_time = now
        ack = m["ack"]
        while a.inflight and a.inflight[0][0] <= ack:
            a.inflight.popleft()
        if demand["cores"] > 0:
            self.hungry.add(a.id)
        if now - a.db_touched > self.heartbeat:
            a.db_touched = now
            self.batch.update_agent(a.id, last_seen=now, tasks_done=a.tasks_done)
        # Every update is answered (so the agent can forget what we have seen), by the next
        # task batch when there is one this turn, else by a bare acknowledgement.
        a.refused.extend(refused)
        self.ack_due.add(a.id)
        self.batch.stream(self._conn)  # written while the next message is handled

    def on_bye(self, a: AgentRec, m: dict, now: float) -> None:
        items = P.check_items(P.TASK_UPDATE, m["updates"], "updates")
        released = P.check_items(P.JOB_ATTEMPT, m["released"], "released")
        refused = replay.still_refused(self.conn, items, self.apply_updates(a, items, now))
        a.uack = m["useq"]
        for item in released:
            lease = self.leases.get(item["job"])
            if lease is not None and lease.agent == a.id and lease.attempt == item["attempt"]:
                self.drop_lease(lease, now, f"agent {a.id} stopped", counts=False)
        # leases of task batches the agent never saw (sent as it left, e.g. after we said no
        # work was left for it) go back without counting an attempt
        unseen = m.get("ack") is not None and a.seq > m["ack"]
        for job in list(a.leases):
            self.drop_lease(self.leases[job], now, f"agent {a.id} left without it"
                            + (" (sent as it left)" if unseen else ""), counts=not unseen)
        self.agent_event(a, a.state, "EXITED", now, f"left after {a.tasks_done} tasks")
        a.state = "EXITED"
        a.demand = None
        self.hungry.discard(a.id)
        self.batch.update_agent(a.id, state="EXITED", last_seen=now, tasks_done=a.tasks_done)
        log.info("agent %s left after %d tasks", a.id, a.tasks_done)
        a.refused.extend(refused)
        self.ack_due.add(a.id)

    def apply_updates(self, a: AgentRec, items: list[dict], now: float) -> list[dict]:
        """Apply an agent's task updates; return those refused (stale lease, illegal change)."""
        refused = []
        leases = self.leases
        self.stats["updates"] += len(items)
        for n, it in enumerate(items, 1):
            if not n % STREAM_EVERY:
                self.batch.stream(self._conn)  # written while the next ones are applied
            job = it["job"]
            lease = leases.get(job)
            if lease is None or lease.agent != a.id or lease.attempt != it["attempt"]:
                refused.append({"job": job, "attempt": it["attempt"]})
                continue
            try:
                path = [BY_NAME[s] for s in it["states"]]
            except (KeyError, TypeError):
                refused.append({"job": job, "attempt": it["attempt"]})
                continue
            if lease.state in path:  # a resend: skip what was applied already
                path = path[path.index(lease.state) + 1:]
            if it.get("handed"):  # outputs handed to the site stager: the attempt ends here
                if self._handed(a, lease, it, path, now):
                    continue
                refused.append({"job": job, "attempt": it["attempt"]})
                continue
            if not path:
                continue
            last = path[-1]
            cols: dict[str, Any] = {}
            if it.get("start") is not None:
                cols["started"] = lease.started = it["start"]
            done = True
            # an ended attempt: how, in the same update of the job's row as its new state
            if last is S.JOB_FINISHED:
                cols.update(ended=it.get("end") or now, exit_code=it.get("exit"), agent=None,
                            run_state=last._value_, run_message=_text(it.get("msg")))
            elif last in states.FAILURES:
                nxt = states.after_failure(lease.retries, lease.max_retries)
                path.append(nxt)
                cols.update(ended=it.get("end") or now, exit_code=it.get("exit"), agent=None,
                            retries=lease.retries + (nxt is S.RESTART_READY),
                            run_state=last._value_, run_message=_text(it.get("msg")))
            else:
                done = False
            try:
                self.batch.transition(job, lease.state, path, now, _text(it.get("msg")), **cols)
            except IllegalTransition as exc:
                log.warning("agent %s: job %d: %s", a.id, job, exc)
                refused.append({"job": job, "attempt": it["attempt"]})
                continue
            if not done:
                lease.state = last
                continue
            self._end_lease(lease, now, None)  # (its end is in the row's update above)
            self.output.task_ended(job, a.id, lease.attempt, now)
            if last is S.JOB_FINISHED:
                a.tasks_done += 1
                self.finished.append(job)
            elif path[-1] is S.RESTART_READY:
                self.queue.push(job, lease.priority, lease.shape)
            else:
                self.failed.append(job)
        self.stats["refused"] += len(refused)
        return refused

    def _handed(self, a: AgentRec, lease: Lease, it: dict, path: list, now: float) -> bool:
        """An agent ended its attempt in POSTPROCESSED, its outputs in its site's staging
        directory: hold the job for a stager's stage-out (see .staging)."""
        if (path[-1] if path else lease.state) is not S.POSTPROCESSED or a.site is None:
            return False
        msg = f"outputs handed to the site stager of {a.site}"
        cols = {"ended": it.get("end") or now, "exit_code": it.get("exit"), "agent": None,
                "run_state": S.POSTPROCESSED.value, "run_message": msg,
                "staged": json.dumps({"out": a.site})}
        if it.get("start") is not None:
            cols["started"] = it["start"]
        try:
            if path:
                self.batch.transition(lease.job, lease.state, path, now, msg, **cols)
            else:
                self.batch.update_job(lease.job, **cols)
        except IllegalTransition as exc:
            log.warning("agent %s: job %d: %s", a.id, lease.job, exc)
            return False
        self._end_lease(lease, now, None)
        self.output.task_ended(lease.job, a.id, lease.attempt, now)
        a.tasks_done += 1
        self.staging.hand_off(lease.job, lease.priority, lease.shape, a.site)
        return True

    def _end_lease(self, lease: Lease, now: float, state: str | None,
                   message: str | None = None) -> None:
        """Forget a lease; ``state``: how its attempt ended, written to the job's row (None:
        written already, or the job is being removed)."""
        if state is not None:
            self.batch.end_attempt(lease.job, state, now, message)
        del self.leases[lease.job]
        if lease.job in self.gangs.by_job:
            self.gangs.release(lease.job)
        a = self.agents.get(lease.agent)
        if a is not None:
            a.leases.discard(lease.job)

    def drop_lease(self, lease: Lease, now: float, why: str, counts: bool = True) -> None:
        """Take a job back from its agent: to the queue, or FAILED when out of retries.

        ``counts``: the loss counts as a failed attempt (an agent that died may have been
        killed by the job); an agent that hands work back on SIGTERM does not count.
        """
        self._end_lease(lease, now, "LOST" if counts else "HANDED_BACK", message=why)
        if lease.state in states.QUEUED:  # never started: back to the queue untouched
            self.batch.update_job(lease.job, agent=None)
            self.queue.push(lease.job, lease.priority, lease.shape)
            return
        nxt = states.after_failure(lease.retries, lease.max_retries) if counts \
            else S.RESTART_READY
        self.batch.transition(lease.job, lease.state, [nxt], now, why, agent=None,
                              retries=lease.retries + (counts and nxt is S.RESTART_READY))
        if nxt is S.RESTART_READY:
            self.queue.push(lease.job, lease.priority, lease.shape)
        else:
            self.failed.append(lease.job)

    def expire(self, now: float) -> None:
        """Agents silent for a lease period lose their leases (and stagers theirs)."""
        self.staging.expire(now)
        limit = time.monotonic() - self.lease_timeout
        for a in self.agents.values():
            if a.state == "ALIVE" and a.seen < limit and not a.id.startswith(PREFIX):
                log.warning("agent %s on %s silent for %.1f s: lost; requeueing %d jobs",
                            a.id, a.host, now - a.last_seen, len(a.leases))
                self.agent_event(a, "ALIVE", "LOST", now, f"silent {now - a.last_seen:.1f} s; "
                                 f"{len(a.leases)} jobs taken back")
                a.state = "LOST"
                a.demand = None
                self.hungry.discard(a.id)
                for job in list(a.leases):
                    self.drop_lease(self.leases[job], now, f"agent {a.id} lost (silent "
                                    f"{now - a.last_seen:.1f} s)")
                self.batch.update_agent(a.id, state="LOST")
        self.remotes.expire(now)

    # -- dispatch ---------------------------------------------------------------------------
    def dispatch(self, now: float) -> int:
        """Hand queued jobs to hungry agents as leases; returns the number of tasks sent."""
        if self.loading is not None:
            return 0  # a job not yet read may come first: dispatch in order once all are in
        sent = self.dispatch_gangs(now)
        if not self.hungry or not self.queue:
            return sent
        picks = []
        held = self.gangs.by_agent
        for aid in list(self.hungry):
            a = self.agents[aid]
            if a.demand is None:
                self.hungry.discard(aid)
                continue
            if aid in held:
                continue  # draining for a multi-node job
            cores, gpus = a.budget()
            if cores <= 0:
                self.hungry.discard(aid)
                continue
            d = a.demand
            left = d["time_left"]
            if left is not None:
                left -= now - a.demand_time
            got = self.queue.pick(a.site, d["max_cores"], d["max_gpus"], left, cores, gpus,
                                  MAX_TASKS_PER_MESSAGE,
                                  ranks_ok=a.launcher not in (None, "local"))
            if got:
                picks.append((a, got))
        if not picks:
            return sent
        rows = self._dispatch_rows([job for _, got in picks for job, _ in got])
        stream, conn = self.batch.stream, self._conn
        for a, got in picks:
            tasks = []
            for job, shape in got:
                r = rows.get(job)
                if r is not None and (t := self._lease_or_fail(r, shape, a, now)) is not None:
                    tasks.append(t)
                    if not len(tasks) % STREAM_EVERY:
                        stream(conn)  # written while the next ones are leased
            self._send_tasks(a, tasks)
            stream(conn)
            sent += len(tasks)
        self.stats["dispatched"] += sent
        return sent

    def dispatch_gangs(self, now: float) -> int:
        """Launch the multi-node jobs whose reserved nodes have drained."""
        ready = self.gangs.schedule(now) if (self.gangs.by_job or self.queue) else []
        if not ready:
            return 0
        rows = self._dispatch_rows([r.job for r in ready])
        sent = 0
        for r in ready:
            row = rows.get(r.job)
            self.queue.remove(r.job)
            if row is None:
                self.gangs.release(r.job)
                continue
            leader = self.agents[r.agents[0]]
            r.hosts = [self.agents[aid].node or self.agents[aid].host for aid in r.agents]
            self._send_tasks(leader, [self._lease_task(row, r.shape, leader, r.hosts)])
            self.gangs.launched(r)
            log.info("job %d: launching on %d nodes of pilot %s (%s)", r.job, len(r.agents),
                     r.pilot, ",".join(r.hosts))
            sent += 1
        self.stats["dispatched"] += sent
        return sent

    def _dispatch_rows(self, ids: list[int]) -> dict[int, Any]:
        """The rows of jobs to lease. On PostgreSQL and with a SQLite writer process, jobs this
        turn did not touch are read on a second connection as committed, without waiting for
        the turn's writes, which PostgreSQL's first backend or the writer is still making (the
        turn streams them, Batch.stream), and jobs it added come as it inserted them; the rest
        (all, otherwise) after the turn's writes so far (on PostgreSQL one round trip for
        both)."""
        b = self.batch
        touched = b.touched  # (kept on PostgreSQL and with a SQLite writer process)
        if touched is None:
            return b.execute_and_read(self._conn, _DISPATCH_SELECT, _DISPATCH_COLS, ids)
        rows: dict[int, Any] = {}
        clean, rest = [], []
        for i in ids:
            if i not in touched:
                clean.append(i)
            elif (r := b.fresh_row(_DISPATCH_COLS, i)) is not None:
                rows[i] = r  # a job this turn added, as it inserted it: no wait, no read
            else:
                rest.append(i)
        if clean and self._wengine is not None:
            local = self.local()
            for part in chunks(clean, 900):
                for r in local.execute(_DISPATCH_SELECT, {"ids": part}):
                    rows[r.id] = r
        elif clean:
            if self._reader is None:
                raw = self.engine.raw_connection()
                reader = raw.driver_connection
                raw.detach()  # its own for good: autocommit must not go back to the pool
                reader.autocommit = True
                self._reader = reader
            rows.update(b.read_committed(self._reader, self._conn.dialect, _DISPATCH_COLS,
                                         clean))
        if rest:
            rows.update(b.execute_and_read(self._conn, _DISPATCH_SELECT, _DISPATCH_COLS, rest))
        return rows

    def _lease_or_fail(self, r: Any, shape: Shape, a: AgentRec, now: float) -> dict | None:
        """Lease a job, or fail it alone when its task cannot be built (a row an older version
        stored, whose parameters no longer fit its app): one odd job must not stop dispatching
        for everyone, turn after turn."""
        try:
            return self._lease_task(r, shape, a)
        except Exception as exc:  # before the lease is made: nothing to undo
            why = f"cannot build its task: {type(exc).__name__}: {echo(str(exc))}"
            log.error("job %d: %s", r.id, why)
            self.batch.transition(r.id, S(r.state), [S.STAGE_IN_FAILED, S.FAILED], now, why)
            self.failed.append(r.id)
            return None

    def _lease_task(self, r: Any, shape: Shape, a: AgentRec,
                    hosts: list[str] | None = None) -> dict:
        """Lease job row ``r`` to agent ``a``; the task message for it."""
        app = self.apps[r.app_id]
        attempt = r.attempts + 1
        wall = r.wall_time_minutes
        task = {"job": r.id, "attempt": attempt, "name": r.name,
                "argv": app.argv(r.parameters), "env": app.environment,
                "workdir": r.workdir, "cores": shape.cores, "gpus": shape.gpus,
                "timeout": None if wall is None else wall * 60.0,
                "pre": app.preprocess, "post": app.postprocess,
                "input_url": r.input_url, "output_url": r.output_url}
        staged = self.staging.taken(r.id) if self.staging.staged else None
        if staged is not None:  # a site stager fetched it: the agent places it, no stage-in
            task["staged"] = staged
        if r.output_url and remote(r.output_url) and self.staging.stages_out(a.site):
            task["site_out"] = True  # hand the outputs to the site stager
        if app.container is not None:
            task["container"] = {"runtime": app.container["runtime"],
                                 "image": r.image or app.container["image"]}
        if shape.ranks > 1 or shape.nodes > 1:
            task["launch"] = {"nodes": shape.nodes, "ranks_per_node": shape.ranks,
                              "cpus_per_rank": shape.cores // shape.ranks,
                              "gpus_per_rank": shape.gpus // shape.ranks,
                              "hosts": hosts or []}
        self.leases[r.id] = Lease(r.id, a.id, attempt, BY_NAME[r.state], r.retries,
                                  r.max_retries, r.priority, shape)
        a.leases.add(r.id)
        self.batch.lease_job(r.id, attempt, a.id, json.dumps(hosts) if hosts else None,
                             time.time())
        return task

    def _send_tasks(self, a: AgentRec, tasks: list[dict]) -> None:
        if not tasks:
            return
        a.seq += 1
        a.inflight.append((a.seq, sum(t["cores"] for t in tasks),
                           sum(t["gpus"] for t in tasks)))
        self.send(a.identity, P.encode(P.TASKS, seq=a.seq, tasks=tasks, refused=a.refused,
                                       uack=a.uack, epoch=self.epoch))
        a.refused = []
        self.ack_due.discard(a.id)

    def flush_acks(self) -> None:
        """Answer the updates that no task batch answered this turn."""
        for aid in self.ack_due:
            a = self.agents[aid]
            self.send(a.identity, P.encode(P.TASKS, seq=a.seq, tasks=[], refused=a.refused,
                                           uack=a.uack, epoch=self.epoch))
            a.refused = []
        self.ack_due.clear()

    def _hold(self, job: int, priority: int, shape: Shape) -> bool:
        """The queue's hook: jobs held by the fence, or for a site stager, stay out of it."""
        return self.fence.hold(job) or self.staging.hold(job, priority, shape)

    def cancel_on_agent(self, lease: Lease) -> None:
        if lease.agent.startswith(PREFIX):  # a remote site: a cancel on its queue
            self.remotes.cancel(lease, time.time())
            return
        a = self.agents.get(lease.agent)
        if a is not None and a.identity is not None and a.state == "ALIVE":
            self.send(a.identity, P.encode(P.CANCEL, jobs=[{"job": lease.job,
                                                            "attempt": lease.attempt}]))

    # -- job lifecycle beyond agents ------------------------------------------------------
    def enqueue(self, job_id: int, row: Any) -> None:
        self.queue.push(job_id, row["priority"] if isinstance(row, dict) else row.priority,
                        shape_of(row))

    def resolve_children(self, now: float) -> None:
        """Ready the children whose parents all finished; fail those of failed parents."""
        while self.finished or self.failed:
            waited = self.waited_on
            done = [j for j in self.finished if j in waited]
            failed = [j for j in self.failed if j in waited]
            self.finished, self.failed = [], []
            waited.difference_update(done)
            waited.difference_update(failed)
            if not done and not failed:
                break
            self.sync()
            c = self.conn
            for part in chunks(failed, 900):
                q = (select(jobs.c.id, jobs.c.state, job_parents.c.parent_id)
                     .join(job_parents, job_parents.c.job_id == jobs.c.id)
                     .where(job_parents.c.parent_id.in_(part),
                            jobs.c.state.in_([S.AWAITING_PARENTS.value, S.CREATED.value])))
                seen = set()
                for r in c.execute(q):
                    if r.id in seen:
                        continue
                    seen.add(r.id)
                    self.batch.transition(r.id, S(r.state), [S.FAILED], now,
                                          f"parent job {r.parent_id} failed")
                    self.failed.append(r.id)
            for part in chunks(done, 900):
                kids = select(job_parents.c.job_id).where(job_parents.c.parent_id.in_(part))
                parent = jobs.alias("parent")
                q = (select(*_SHAPE_COLS,
                            func.count().label("n"),
                            func.sum(case((parent.c.state == S.JOB_FINISHED.value, 1),
                                          else_=0)).label("ok"))
                     .join(job_parents, job_parents.c.job_id == jobs.c.id)
                     .join(parent, parent.c.id == job_parents.c.parent_id)
                     .where(jobs.c.id.in_(kids), jobs.c.state == S.AWAITING_PARENTS.value)
                     .group_by(*_SHAPE_COLS))
                for r in c.execute(q):
                    if r.n == r.ok:
                        self.batch.transition(r.id, S.AWAITING_PARENTS, [S.READY], now,
                                              "all parents finished")
                        self.enqueue(r.id, r)

    def app(self, name: str) -> App:
        app = self.app_names.get(name)
        if app is None:
            raise NotFound(f"no app named {echo(name)}; registered: "
                           f"{', '.join(sorted(self.app_names)) or 'none'} "
                           "(see `pilotfish app ls`)")
        return app

    def counts(self) -> dict[str, int]:
        """Jobs per state, from memory (kept by the batch on every change)."""
        return {k: v for k, v in self.batch.counts.items() if v}
