"""The event stream: every job state change (``job_events``) and every other event a subscriber
follows (``server_events``: agents, pilots, removed jobs) in one sequence of ids, read from a
cursor with the ``events`` op.

Ids. The server numbers events itself (``Batch.next_event_id``) in the order it makes them. It
is the only writer and commits once per turn, and this op runs in its loop, so the ids of a turn
all follow those of the turns before and a reader never sees id N+1 without id N. Rows go away
only by pruning (``events prune``, ``gc``; the newest id pruned is kept in ``pilotfish_meta`` as
``events_pruned_through``) and by ``job rm`` (which writes a newer removal event): a restart
starts after the highest of both, so an id is never handed out twice, and a cursor older than
what was pruned gets an error, never a silent gap.

Waiting. A request with ``wait`` that finds nothing is parked (:class:`Waiters`) and answered
after the commit of the turn that made a matching event, or at its deadline; the loop never
blocks on it and nothing polls.
"""
from __future__ import annotations

import heapq
import math
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, delete, exists, or_, select

from pilotfish import protocol as P
from pilotfish.errors import PilotfishError, Pruned, ValidationError
from pilotfish.keys import ADMIN, READER
from pilotfish.pilotstate import PilotState
from pilotfish.validate import cap, echo

from . import states
from .core import JobServer
from .db import PRUNED_KEY, job_events, jobs, meta, server_events
from .ops import MAX_ID, _arg, op
from .states import REMOVED
from .store import chunks

KINDS = ("job", "agent", "pilot", "workflow")
MAX_LIMIT = 10_000
DEFAULT_LIMIT = 1000
MAX_WAIT = 60.0
#: A filtered request (state, group, kind) looks at this many ids at most, then answers with
#: what it found and a cursor to go on from: a rare state over a long history costs many short
#: requests, never one long stall of the loop.
SCAN_IDS = 20_000
MAX_JOB_IDS = 1000
MAX_STATES = 64
#: Requests parked at once; past this a waiting request is refused (try again).
MAX_WAITERS = 10_000
#: Rows one ``events_prune`` request looks at (the CLI repeats until done).
PRUNE_CHUNK = 20_000
AGENT_STATES = ("ALIVE", "LOST", "EXITED")
OTHER_STATES = frozenset(AGENT_STATES) | {p.value for p in PilotState} | {REMOVED} | \
    {w.value for w in states.WorkflowState}


# -- ids ---------------------------------------------------------------------------------------
def set_pruned(srv: JobServer, through: int) -> None:
    """Move the pruned mark (in the turn's transaction; a rollback rebuilds it from there)."""
    if through <= srv.events_pruned:
        return
    c = srv.conn
    if c.execute(select(meta.c.value).where(meta.c.key == PRUNED_KEY)).first() is None:
        c.execute(meta.insert().values(key=PRUNED_KEY, value=str(through)))
    else:
        c.execute(meta.update().where(meta.c.key == PRUNED_KEY).values(value=str(through)))
    srv.events_pruned = through


# -- filters -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Filter:
    kinds: frozenset | None = None
    jobs: tuple | None = None
    group: str | None = None
    states: tuple | None = None
    workflows: tuple | None = None  # a workflow's own events and its subjobs'

    @property
    def empty(self) -> bool:
        return not (self.kinds or self.jobs or self.group or self.states or self.workflows)

    @property
    def scans(self) -> bool:
        """Does it select by a column without an index (so a bounded window of ids is read)?"""
        return bool(self.kinds or self.group or self.states or self.workflows)


def _one_or_list(v: Any, what: str, most: int) -> list:
    items = v if isinstance(v, list) else [v]
    if not items or len(items) > most:
        raise ValidationError(f"argument {what!r} must be one value or a list of 1..{most}")
    return items


def _state(v: Any) -> str:
    if isinstance(v, str) and v.strip().upper() in OTHER_STATES:
        return v.strip().upper()
    try:
        return states.parse(v).value
    except PilotfishError:
        raise ValidationError(
            f"state {echo(v)} is no job, agent or pilot state; job states: "
            f"{', '.join(s.value for s in states.State)}; agent: {', '.join(AGENT_STATES)}; "
            f"pilot: {', '.join(p.value for p in PilotState)}; workflow: "
            f"{', '.join(w.value for w in states.WorkflowState)}; and {REMOVED}") from None


def parse_filter(args: dict) -> Filter:
    kinds = jobs_ = group = sts = wfs = None
    if args.get("workflow") is not None:
        wfs = _one_or_list(args["workflow"], "workflow", MAX_JOB_IDS)
        if not all(type(w) is int and 0 < w <= MAX_ID for w in wfs):
            raise ValidationError(f"argument 'workflow' must be a workflow id (1..{MAX_ID}) or "
                                  f"a list of at most {MAX_JOB_IDS}")
        wfs = tuple(sorted(set(wfs)))
    if args.get("kind") is not None:
        kinds = _one_or_list(args["kind"], "kind", len(KINDS))
        bad = [k for k in kinds if k not in KINDS]
        if bad:
            raise ValidationError(f"kind {echo(bad[0])} is none of {', '.join(KINDS)}")
        kinds = frozenset(kinds)
    if args.get("job") is not None:
        jobs_ = _one_or_list(args["job"], "job", MAX_JOB_IDS)
        if not all(type(j) is int and 0 < j <= MAX_ID for j in jobs_):
            raise ValidationError(f"argument 'job' must be a job id (1..{MAX_ID}) or a list "
                                  f"of at most {MAX_JOB_IDS}")
        jobs_ = tuple(sorted(set(jobs_)))
    if args.get("group") is not None:
        group = args["group"]
        if not isinstance(group, str) or not group or len(group) > 128 or "\x00" in group:
            raise ValidationError("argument 'group' must be a group name (1..128 characters)")
    if args.get("state") is not None:
        sts = tuple(sorted({_state(s) for s in _one_or_list(args["state"], "state",
                                                            MAX_STATES)}))
    return Filter(kinds, jobs_, group, sts, wfs)


# -- reading -----------------------------------------------------------------------------------
#: The columns a job event is read with, in the order _job_event takes them.
_JOB_COLS = (job_events.c.id, job_events.c.time, job_events.c.job_id, jobs.c.name,
             jobs.c.group_identifier, job_events.c.from_state, job_events.c.to_state,
             job_events.c.via, job_events.c.message, jobs.c.workflow_id, jobs.c.argo_job_id,
             jobs.c.job_status_routing_key)
#: The columns a server event is read with, in the order _server_event takes them.
_SERVER_COLS = (server_events.c.id, server_events.c.time, server_events.c.kind,
                server_events.c.job_id, server_events.c.name, server_events.c.grp,
                server_events.c.from_state, server_events.c.to_state, server_events.c.message,
                server_events.c.agent, server_events.c.host, server_events.c.pilot,
                server_events.c.site, server_events.c.workflow_id)


def _job_event(r) -> dict:
    """One job event as the op gives it, from a row in _JOB_COLS order."""
    return {"id": r[0], "time": r[1], "kind": "job", "job": r[2], "name": r[3], "group": r[4],
            "from": r[5], "to": r[6], "via": _via(r[7]), "message": r[8], "agent": None,
            "host": None, "pilot": None, "site": None, "workflow": r[9],
            # what a status publisher needs (it asked job_ls for them, a request a page)
            "argo_job_id": r[10], "routing_key": r[11]}


def _server_event(r) -> dict:
    """One server event as the op gives it, from a row in _SERVER_COLS order."""
    return {"id": r[0], "time": r[1], "kind": r[2], "job": r[3], "name": r[4], "group": r[5],
            "from": r[6], "to": r[7], "via": [], "message": r[8], "agent": r[9],
            "host": r[10], "pilot": r[11], "site": r[12], "workflow": r[13],
            "argo_job_id": None, "routing_key": None}


_VIA: dict[str | None, tuple[str, ...]] = {}


def _via(stored: str | None) -> list[str]:
    """states.via_names, remembered: a stream holds a handful of distinct paths."""
    names = _VIA.get(stored)
    if names is None:
        names = tuple(states.via_names(stored))
        if len(_VIA) < 1000:
            _VIA[stored] = names
    return list(names)


def _job_rows(conn, since: int, end: int, limit: int, f: Filter) -> list[dict]:
    e = job_events
    q = (select(*_JOB_COLS)
         .select_from(e.outerjoin(jobs, jobs.c.id == e.c.job_id))
         .where(e.c.id > since, e.c.id <= end))
    if f.jobs:
        q = q.where(e.c.job_id.in_(f.jobs))
    if f.workflows:
        q = q.where(jobs.c.workflow_id.in_(f.workflows))
    if f.group:
        q = q.where(jobs.c.group_identifier == f.group)
    if f.states:
        # a job state passed through is a letter of via (states.VIA_CODE)
        code = states.VIA_LETTER
        q = q.where(or_(e.c.to_state.in_(f.states),
                        *(e.c.via.contains(code[s]) for s in f.states if s in code)))
    return [_job_event(r) for r in conn.execute(q.order_by(e.c.id).limit(limit))]


def _server_rows(conn, since: int, end: int, limit: int, f: Filter) -> list[dict]:
    s = server_events
    q = select(*_SERVER_COLS).where(s.c.id > since, s.c.id <= end)
    if f.kinds:
        q = q.where(s.c.kind.in_(sorted(f.kinds)))
    if f.jobs:
        q = q.where(s.c.job_id.in_(f.jobs))
    if f.workflows:
        q = q.where(s.c.workflow_id.in_(f.workflows))
    if f.group:
        q = q.where(s.c.grp == f.group)
    if f.states:
        q = q.where(s.c.to_state.in_(f.states))
    return [_server_event(r) for r in conn.execute(q.order_by(s.c.id).limit(limit))]


_PLAIN: dict[str, tuple[str, str]] = {}


def _plain_sql(conn) -> tuple[str, str]:
    """The unfiltered reads (a status publisher's) as the driver's SQL, run on its cursor. Through SQLAlchemy each read rebuilt its statement's cache key and each row
    went through a Row: with a publisher following W2, reading was a third of the server's
    CPU."""
    mark = "?" if conn.dialect.paramstyle == "qmark" else "%s"
    got = _PLAIN.get(mark)
    if got is None:
        cols = ", ".join(f"{c.table.name}.{c.name}" for c in _JOB_COLS)
        scols = ", ".join(c.name for c in _SERVER_COLS)  # (one table: no prefix)
        got = _PLAIN[mark] = (
            f"SELECT {cols} FROM job_events LEFT OUTER JOIN jobs ON jobs.id = job_events.job_id"
            f" WHERE job_events.id > {mark} AND job_events.id <= {mark}"
            f" ORDER BY job_events.id LIMIT {mark}",
            f"SELECT {scols} FROM server_events WHERE id > {mark} AND id <= {mark}"
            f" ORDER BY id LIMIT {mark}")
    return got


def _plain_rows(conn, since: int, end: int, limit: int) -> tuple[list[dict], list[dict]]:
    """Job events and server events with since < id <= end, at most ``limit`` of each."""
    sql_jobs, sql_server = _plain_sql(conn)
    if not conn.in_transaction():
        conn.begin()  # in the turn's transaction, as SQLAlchemy's reads are
    cur = conn.connection.dbapi_connection.cursor()
    try:
        cur.execute(sql_jobs, (since, end, limit))
        rows = [_job_event(r) for r in cur.fetchall()]
        cur.execute(sql_server, (since, end, limit))
        return rows, [_server_event(r) for r in cur.fetchall()]
    finally:
        cur.close()


def read(srv: JobServer, since: int, limit: int, f: Filter) -> dict:
    """Events with id > ``since`` matching ``f``, oldest first, at most ``limit``; the cursor to
    ask from next (past what was looked at, matched or not) and the oldest id kept."""
    pruned = srv.events_pruned
    if since < pruned:
        raise Pruned(f"events before {pruned + 1} were pruned (events prune or gc); cursor "
                     f"{since} is older: what happened in between is gone. Ask again with "
                     f"since={pruned} to go on from the oldest event kept")
    high = srv.batch.next_event_id - 1
    if since > high:
        raise ValidationError(f"cursor {since} is past the newest event ({high}): a cursor of "
                              "another server's database?")
    end = min(high, since + SCAN_IDS) if f.scans else high
    srv.sync()
    rows: list[dict] = []
    if f.empty:
        rows, more = _plain_rows(srv.conn, since, end, limit)
    else:
        if f.kinds is None or "job" in f.kinds:
            rows = _job_rows(srv.conn, since, end, limit, f)
        more = _server_rows(srv.conn, since, end, limit, f)
    if more:
        rows = sorted(rows + more, key=lambda r: r["id"])[:limit]
    cursor = rows[-1]["id"] if len(rows) == limit else end
    return {"events": rows, "cursor": cursor, "oldest": pruned + 1}


@dataclass
class Park:
    """What the ``events`` op returns when it should wait: the service parks it."""
    since: int
    limit: int
    filter: Filter
    wait: float


@op(READER, args=("since", "limit", "wait", "job", "group", "state", "kind", "workflow"))
def events(srv: JobServer, args: dict, now: float) -> dict | Park:
    """Events after the cursor ``since`` (id > since), oldest first.

    Args: since (int >= 0, default 0), limit (1..10,000, default 1,000), wait (seconds 0..60,
    default 0: when nothing matches yet, answer when something does, or empty at the timeout),
    job (a job id or a list of up to 1,000), group, state (job, agent, pilot or workflow
    state, or a list; a job event matches its new state or a state it passed through), kind
    (job, agent, pilot, workflow, or a list), workflow (a workflow id or a list of up to 1,000:
    its events and its subjobs'). Returns {"events": [...], "cursor": id to ask from next, "oldest": the first id
    the stream holds in full}. A cursor older than what was pruned is refused (code "pruned").
    """
    since = _arg(args, "since", int, 0)
    limit = _arg(args, "limit", int, DEFAULT_LIMIT)
    if not 1 <= limit <= MAX_LIMIT:
        raise ValidationError(f"argument 'limit' must be 1..{MAX_LIMIT:,}, got {echo(limit)}")
    wait = _arg(args, "wait", (int, float), 0)
    if isinstance(wait, bool) or not math.isfinite(wait) or not 0 <= wait <= MAX_WAIT:
        raise ValidationError(f"argument 'wait' must be seconds 0..{MAX_WAIT:g}, got "
                              f"{echo(wait)}")
    f = parse_filter(args)
    r = read(srv, since, limit, f)
    if r["events"] or not wait or r["cursor"] < srv.batch.next_event_id - 1:
        return r
    return Park(r["cursor"], limit, f, float(wait))


# -- parked requests ---------------------------------------------------------------------------
@dataclass(eq=False)
class Waiter:
    identity: bytes
    rid: int
    since: int  # moves on while parked when nothing matched up to a newer id
    limit: int
    filter: Filter
    deadline: float  # time.monotonic()


class _TurnIndex:
    """The newest id of this turn's events per kind, job, state and (when a waiter asks)
    group: a parked request is read again only when its filter may match one of them."""

    def __init__(self, evs: list[dict]) -> None:
        self.evs = evs
        self.kind: dict[str, int] = {}
        self.job: dict[int, int] = {}
        self.state: dict[str, int] = {}
        self._groups: dict[str, int] | None = None
        self.workflow: dict[int, int] = {}
        self.any_job = 0  # the newest job event (which may be a subjob's)
        for e in evs:  # in id order: the last write per key is the newest
            i = e["id"]
            self.kind[e.get("kind", "job")] = i
            if e.get("workflow_id") is not None:
                self.workflow[e["workflow_id"]] = i
            if "kind" not in e:
                self.any_job = i
            if e["job_id"] is not None:
                self.job[e["job_id"]] = i
            self.state[e["to_state"]] = i
            if e.get("via"):
                for s in states.via_names(e["via"]):
                    self.state[s] = i

    def groups(self, conn) -> dict[str, int]:
        if self._groups is None:
            g: dict[str, int] = {}
            of_job: dict[int, str] = {}
            ids = [j for j in self.job]
            for part in chunks(ids, 900):
                for r in conn.execute(select(jobs.c.id, jobs.c.group_identifier)
                                      .where(jobs.c.id.in_(part))):
                    if r.group_identifier is not None:
                        of_job[r.id] = r.group_identifier
            for e in self.evs:
                grp = e.get("grp") if "kind" in e else of_job.get(e["job_id"])
                if grp is not None:
                    g[grp] = e["id"]
            self._groups = g
        return self._groups

    def may_match(self, w: Waiter, conn) -> bool:
        f, since = w.filter, w.since
        if f.kinds and max(self.kind.get(k, 0) for k in f.kinds) <= since:
            return False
        if f.jobs and max(self.job.get(j, 0) for j in f.jobs) <= since:
            return False
        if f.states and max(self.state.get(s, 0) for s in f.states) <= since:
            return False
        if f.group and self.groups(conn).get(f.group, 0) <= since:
            return False
        if f.workflows and self.any_job <= since and \
                max(self.workflow.get(w, 0) for w in f.workflows) <= since:
            return False
        return True


class Waiters:
    """Parked ``events`` requests. Parked during a turn, they count from its commit (a turn
    rolled back and handled again parks them again); after each commit :meth:`release` answers
    those a new event may match, and those whose time is up."""

    def __init__(self) -> None:
        self.parked: dict[tuple[bytes, int], Waiter] = {}
        self.pending: list[Waiter] = []
        self._deadlines: list[tuple[float, bytes, int]] = []

    def __len__(self) -> int:
        return len(self.parked) + len(self.pending)

    def park(self, identity: bytes, rid: int, p: Park) -> None:
        if len(self) >= MAX_WAITERS:
            raise PilotfishError(f"{MAX_WAITERS:,} requests are waiting for events already; "
                                 "ask again later (or without wait)")
        self.pending.append(Waiter(identity, rid, p.since, p.limit, p.filter,
                                   time.monotonic() + p.wait))

    def drop_pending(self) -> None:
        """The turn was rolled back: its parked requests are parked again when handled again."""
        self.pending.clear()

    def next_deadline(self) -> float | None:
        while self._deadlines and (self._deadlines[0][1], self._deadlines[0][2]) \
                not in self.parked:
            heapq.heappop(self._deadlines)
        return self._deadlines[0][0] if self._deadlines else None

    def due(self) -> bool:
        d = self.next_deadline()
        return bool(self.pending) or (d is not None and d <= time.monotonic())

    def release(self, srv: JobServer) -> None:
        """After a commit: answer (into ``srv.outbox``) the parked requests that the events
        committed since the last call may match, and those past their deadline."""
        evs, srv.batch.turn_events = srv.batch.turn_events, []
        for w in self.pending:
            self.parked[(w.identity, w.rid)] = w
            heapq.heappush(self._deadlines, (w.deadline, w.identity, w.rid))
        self.pending = []
        if not self.parked:
            return
        try:
            self._answer(srv, evs)
        finally:
            srv.conn.commit()  # end the read transaction (nothing was written)

    def _answer(self, srv: JobServer, evs: list[dict]) -> None:
        due: list[Waiter] = []
        if evs:
            top = evs[-1]["id"]
            index = None
            for w in self.parked.values():
                if w.since >= top:
                    continue
                if w.filter.empty:
                    due.append(w)
                    continue
                if index is None:
                    index = _TurnIndex(evs)
                if index.may_match(w, srv.conn):
                    due.append(w)
        now = time.monotonic()
        timed_out = set()
        chosen = {id(w) for w in due}
        while self._deadlines and self._deadlines[0][0] <= now:
            _, ident, rid = heapq.heappop(self._deadlines)
            w = self.parked.get((ident, rid))
            # (an entry of a request parked again since, after a rolled-back turn, is stale)
            if w is not None and w.deadline <= now:
                timed_out.add((ident, rid))
                if id(w) not in chosen:
                    chosen.add(id(w))
                    due.append(w)
        answers: dict[tuple, Any] = {}  # followers at one cursor share one read
        high = srv.batch.next_event_id - 1
        for w in due:
            key = (w.since, w.limit, w.filter)
            r = answers.get(key)
            if r is None:
                try:
                    r = answers[key] = read(srv, w.since, w.limit, w.filter)
                except PilotfishError as exc:
                    r = answers[key] = exc
            wkey = (w.identity, w.rid)
            if isinstance(r, PilotfishError):
                srv.send(w.identity, P.encode(P.REPLY, rid=w.rid, ok=False, result=None,
                                              error=cap(str(r)), code=r.code))
            elif r["events"] or r["cursor"] < high or wkey in timed_out:
                srv.send(w.identity, P.encode(P.REPLY, rid=w.rid, ok=True, result=r,
                                              error=None, code=None))
            else:  # nothing of its own: stay parked, from the newest id seen
                w.since = r["cursor"]
                continue
            del self.parked[wkey]


# -- pruning -----------------------------------------------------------------------------------
@op(ADMIN, args=("before",))
def events_prune(srv: JobServer, args: dict, now: float) -> dict:
    """Delete events older than ``before`` (epoch seconds), one bounded chunk per request:
    each job keeps its last event (``job show`` still says how it ended), the rest of the
    chunk goes, and the pruned mark moves to its end. Returns {"pruned": rows deleted,
    "through": the newest id pruned, "oldest": the first id kept in full, "more": whether to
    ask again}."""
    before = _arg(args, "before", (int, float), required=True)
    if isinstance(before, bool) or not math.isfinite(before):
        raise ValidationError("argument 'before' must be a time (epoch seconds)")
    srv.sync()
    c = srv.conn
    mark = srv.events_pruned
    seen = sorted(
        [tuple(r) for t in (job_events, server_events) for r in c.execute(
            select(t.c.id, t.c.time).where(t.c.id > mark).order_by(t.c.id).limit(PRUNE_CHUNK))])
    seen = seen[:PRUNE_CHUNK]
    newer = next((i for i, (_, t) in enumerate(seen) if t >= before), None)
    old = seen if newer is None else seen[:newer]
    if not old:
        return {"pruned": 0, "through": mark, "oldest": mark + 1, "more": False}
    through = old[-1][0]
    e2 = job_events.alias("later")
    n = c.execute(delete(job_events).where(
        job_events.c.id > mark, job_events.c.id <= through,
        exists(select(e2.c.id).where(and_(e2.c.job_id == job_events.c.job_id,
                                          e2.c.id > job_events.c.id))))).rowcount or 0
    n += c.execute(delete(server_events).where(server_events.c.id > mark,
                                               server_events.c.id <= through)).rowcount or 0
    set_pruned(srv, through)
    more = newer is None and len(seen) == PRUNE_CHUNK
    return {"pruned": n, "through": through, "oldest": through + 1, "more": more}

