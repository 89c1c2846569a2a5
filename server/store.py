"""Batched writes: everything one server loop turn changes goes to the database in one transaction.

:meth:`Batch.transition` is the one function through which a job changes state: it checks the
change against the state machine and writes the ``job_events`` row beside the job's new state.
"""
from __future__ import annotations

import json
from operator import itemgetter
from typing import Any, Iterable

from sqlalchemy import JSON, bindparam, select
from sqlalchemy.engine import Connection

from . import states
from .db import agents, job_attempts, job_events, job_parents, jobs, server_events, workflows
from .states import State


#: Batch.stream sends nothing until this many rows wait: a statement costs the loop and the
#: database ~50 µs however few rows it carries (1,000 agents' messages carry a few each).
STREAM_MIN = 32
_EVENT_COLS = ("id", "job_id", "from_state", "to_state", "via", "time", "message")
SERVER_EVENT_COLS = ("id", "kind", "time", "job_id", "name", "grp", "agent", "host", "pilot",
                     "site", "from_state", "to_state", "message", "workflow_id")
#: job_attempts columns and the jobs columns that hold the latest attempt's value of each.
#: (The agent's host, node and pilot are copied from its agents row.)
ATTEMPT_FROM_JOB = (("job_id", "id"), ("attempt", "attempts"), ("agent", "run_agent"),
                    ("hosts", "run_hosts"), ("leased", "run_leased"), ("started", "started"),
                    ("ended", "ended"), ("state", "run_state"), ("exit_code", "exit_code"),
                    ("message", "run_message"))


#: The stored ``via`` of each state path seen (a handful: the agents' usual paths).
_VIA: dict[tuple, str | None] = {}


def via(path: list[State]) -> str | None:
    """The states a path passes before its last, as stored (a letter each, see
    states.VIA_CODE; None for a single step)."""
    key = tuple(path)
    v = _VIA.get(key)
    if v is None and key not in _VIA:
        code = states.VIA_CODE
        v = "".join([code[p] for p in key[:-1]]) or None
        if len(_VIA) < 1000:
            _VIA[key] = v
    return v


class Batch:
    """Rows waiting to be written, flushed in an order that keeps foreign facts consistent:
    new jobs, their parents, agent rows, job updates in the order they were made, events."""

    def __init__(self, counts: dict[str, int] | None = None) -> None:
        #: Jobs per state, kept in step with every insert and transition (the caller adjusts
        #: it for deletes), so status and unfiltered counts never scan the jobs table.
        self.counts: dict[str, int] = counts if counts is not None else {}
        self.job_inserts: list[dict] = []
        self.parent_inserts: list[dict] = []
        self.events: list[dict] = []
        self.agent_inserts: list[dict] = []
        self.archived: list[dict] = []   # {"_id": job}: move its latest attempt to job_attempts
        self.server_events: list[dict] = []     # SERVER_EVENT_COLS each
        #: The event stream's next id (set by the server's load): the server numbers events
        #: itself, in the order it makes them, so ids committed by one turn all follow those of
        #: the turns before and a deleted newest row never hands its id out again.
        self.next_event_id = 1
        #: Every event made since the stream's waiters last looked (see events.Waiters): the
        #: same dicts as in ``events``/``server_events``, kept past the intermediate writes.
        self.turn_events: list[dict] = []
        # ordered (columns, params) runs; consecutive updates with the same columns share a run
        self._updates: list[tuple[tuple[str, ...], list[dict]]] = []
        self._agent_updates: list[tuple[tuple[str, ...], list[dict]]] = []
        self._wf_updates: list[tuple[tuple[str, ...], list[dict]]] = []
        #: Subjobs of the workflows the server follows (job -> workflow id): their state
        #: changes are noted in ``wf_moves`` (workflow, job, path, message) and the workflows
        #: derived from them before the turn's commit (server/workflows.py).
        self.wf_jobs: dict[int, int] = {}
        self.wf_moves: list[tuple[int, int, list[State], str | None]] = []
        self._stmts: dict[tuple, Any] = {}
        #: On psycopg: the pipeline (its context manager and a cursor) that :meth:`stream`
        #: sent writes into, open until :meth:`settle` waits for them.
        self._pipe: tuple[Any, Any] | None = None
        #: Jobs inserted or changed since the last commit (the server clears it after each):
        #: their committed rows are not theirs yet (see :meth:`read_committed`). None: not
        #: kept (the server keeps it on PostgreSQL and with a SQLite writer process, where it
        #: reads committed rows).
        self.touched: set[int] | None = None
        #: Of those, the jobs inserted since the last commit and not changed since: their
        #: rows as inserted (a turn leases the jobs it adds from these, see :meth:`fresh_row`)
        self.fresh: dict[int, dict] = {}
        #: SQLite through a writer process (.sqlite_remote): :meth:`stream` sends the writes
        #: batched so far without waiting, as on PostgreSQL
        self.remote = False

    def __bool__(self) -> bool:
        return bool(self.job_inserts or self.parent_inserts or self.events or self._updates
                    or self.agent_inserts or self._agent_updates or self.archived
                    or self.server_events or self._wf_updates)

    # -- recording --------------------------------------------------------------------------
    def transition(self, job_id: int, frm: State | None, path: list[State], now: float,
                   message: str | None = None, **cols: Any) -> State:
        """Move a job from ``frm`` along ``path`` (last item = new state); check, update, log."""
        if frm is not None:
            states.check_path(frm, path)
        to = path[-1]._value_  # (an enum's .value is a property: 5x slower, on every task)
        counts = self.counts
        frm_v = None
        if frm is not None:
            frm_v = frm._value_
            counts[frm_v] -= 1
        counts[to] = counts.get(to, 0) + 1
        ev = {"id": self.next_event_id, "job_id": job_id, "from_state": frm_v, "to_state": to,
              "via": via(path), "time": now, "message": message}
        self.next_event_id += 1
        self.events.append(ev)
        self.turn_events.append(ev)
        cols["state"] = to
        cols["state_time"] = now
        cols["message"] = message
        self.update_job(job_id, **cols)
        if self.wf_jobs:
            w = self.wf_jobs.get(job_id)
            if w is not None:
                self.wf_moves.append((w, job_id, path, message))
        return path[-1]

    def insert_job(self, row: dict, path: list[State], message: str | None) -> None:
        """A new job (``row`` complete but for its state) entering at the end of ``path``."""
        to = path[-1].value
        row["state"] = to
        self.job_inserts.append(row)
        if self.touched is not None:
            self.touched.add(row["id"])
            self.fresh[row["id"]] = row
        self.counts[to] = self.counts.get(to, 0) + 1
        ev = {"id": self.next_event_id, "job_id": row["id"], "from_state": None,
              "to_state": to, "via": via(path),
              "time": row["state_time"], "message": message}
        self.next_event_id += 1
        self.events.append(ev)
        self.turn_events.append(ev)

    def server_event(self, kind: str, to: str, now: float, frm: str | None = None,
                     message: str | None = None, **cols: Any) -> None:
        """An event that is no job state change (``kind`` agent, pilot, or job for a removal);
        ``cols``: job_id, name, grp, agent, host, pilot, site."""
        ev = dict.fromkeys(SERVER_EVENT_COLS)
        ev.update(cols, id=self.next_event_id, kind=kind, time=now, from_state=frm,
                  to_state=to, message=message)
        self.next_event_id += 1
        self.server_events.append(ev)
        self.turn_events.append(ev)

    def update_job(self, job_id: int, **cols: Any) -> None:
        if self.touched is not None:
            self.touched.add(job_id)
            if self.fresh:
                self.fresh.pop(job_id, None)
        _append_run(self._updates, job_id, cols)

    def update_agent(self, agent_id: str, **cols: Any) -> None:
        _append_run(self._agent_updates, agent_id, cols)

    def update_workflow(self, wf_id: int, **cols: Any) -> None:
        _append_run(self._wf_updates, wf_id, cols)

    def lease_job(self, job_id: int, attempt: int, agent: str, hosts: str | None,
                  leased: float) -> None:
        """A job leased to an agent for ``attempt``: its row names the holder and starts this
        attempt's record, in one update (the agent's host, node and pilot are in its agents
        row); a job that ran before has that attempt moved to job_attempts first, from its
        row as written so far, and the row's record cleared. The first attempt writes only
        what it must: leasing is the hottest write there is."""
        if attempt == 1 and hosts is None:
            self.update_job(job_id, attempts=1, agent=agent, run_agent=agent, run_leased=leased)
            return
        if attempt > 1:
            self.archived.append({"_id": job_id})
        self.update_job(job_id, attempts=attempt, agent=agent, run_agent=agent,
                        run_hosts=hosts, run_leased=leased, started=None, ended=None,
                        exit_code=None, run_state=None, run_message=None)

    def end_attempt(self, job_id: int, state: str, ended: float,
                    message: str | None = None) -> None:
        """How a job's latest attempt ended, where no state change writes it (a lost or
        handed-back lease, a kill): one update of its row."""
        self.update_job(job_id, run_state=state, ended=ended, run_message=message)

    # -- writing ----------------------------------------------------------------------------
    def execute(self, conn: Connection, commit: bool = False) -> None:
        """Write everything recorded so far on ``conn`` (inside the caller's transaction).
        ``commit``: the caller commits right after, so on PostgreSQL the COMMIT rides in the
        same pipeline as the writes (one round trip for the turn); the caller's
        ``conn.commit()`` still ends SQLAlchemy's transaction (the driver has nothing left to
        send then). SQLite ignores it."""
        if _psycopg(conn):
            self._execute_pg(conn, commit)
            return
        if self.job_inserts:
            self._insert_jobs(conn, self.job_inserts)
            self.job_inserts = []
        if self.parent_inserts:
            conn.execute(job_parents.insert(), self.parent_inserts)
            self.parent_inserts = []
        if self.agent_inserts:
            conn.execute(agents.insert(), self.agent_inserts)
            self.agent_inserts = []
        for cols, params in self._agent_updates:
            if self.remote:  # (one row through SQLAlchemy is an execute: a round trip)
                self._run(conn, agents, cols, params)
            else:
                conn.execute(self._stmt(agents, cols), params)
        self._agent_updates = []
        if self.archived:  # before the updates that start the next attempt in the row
            if self.remote:
                self._many(conn, "archive", self._archive_stmt(), self.archived)
            else:
                conn.execute(self._archive_stmt(), self.archived)
            self.archived = []
        for cols, params in self._updates:
            self._run(conn, jobs, cols, params)
        self._updates = []
        for cols, params in self._wf_updates:
            conn.execute(self._stmt(workflows, cols), params)
        self._wf_updates = []
        if self.events:
            self._run(conn, job_events, _EVENT_COLS, self.events)
            self.events = []
        if self.server_events:
            self._run(conn, server_events, SERVER_EVENT_COLS, self.server_events)
            self.server_events = []

    def execute_and_read(self, conn: Connection, stmt, columns: tuple, ids: list[int]
                         ) -> dict[int, Any]:
        """Write what is batched (as :meth:`execute`), then read the jobs ``ids``: {id: row}.
        ``stmt`` selects ``columns`` (jobs columns, the id first) with an expanding bind
        parameter ``ids``. On psycopg the read is one ``= ANY(array)`` SELECT sent in the
        writes' pipeline (one round trip for both, rows as named tuples); elsewhere the
        statement runs in chunks after the writes."""
        if not _psycopg(conn):
            if self:
                self.execute(conn)
            rows = {}
            for part in chunks(ids, 900):
                for r in conn.execute(stmt, {"ids": part}):
                    rows[r.id] = r
            return rows
        out: list = []
        self._execute_pg(conn, read=(self._read_sql(conn.dialect, columns),
                                     ([int(i) for i in ids],), out))
        return {r.id: r for r in out}

    def read_committed(self, reader, dialect, columns: tuple, ids: list[int]
                       ) -> dict[int, Any]:
        """Read the jobs ``ids`` as committed, on ``reader`` (a psycopg connection of its own,
        in autocommit), as :meth:`execute_and_read` does: for jobs not in :attr:`touched`
        that row is the current one, and it comes back while PostgreSQL's other backend is
        still writing what the turn streamed, where a read behind those writes waited for
        them."""
        with reader.cursor(row_factory=namedtuple_row) as cur:
            cur.execute(self._read_sql(dialect, columns), ([int(i) for i in ids],))
            return {r.id: r for r in cur.fetchall()}

    def fresh_row(self, columns: tuple, job_id: int) -> Any:
        """Job ``job_id``'s row as this turn inserted it (:attr:`fresh`), as a read of
        ``columns`` (jobs columns, the id first) would give it, without reading; None if it
        is not fresh or lacks a column (the caller reads it then)."""
        row = self.fresh.get(job_id)
        if row is None:
            return None
        make, fill = self._row_type(columns)
        try:
            return make(*[f(row) for f in fill])
        except KeyError:
            return None

    def _row_type(self, columns: tuple) -> tuple:
        """(namedtuple class, one getter per column from an insert dict) for ``columns``: a
        column the dict lacks gives its default; a Float column's int a float, as the
        database gives it back."""
        key = ("row", tuple(c.name for c in columns))
        got = self._stmts.get(key)
        if got is None:
            from collections import namedtuple
            fill = []
            for c in columns:
                default = c.default.arg if c.default is not None and c.default.is_scalar \
                    else _MISSING
                float_ = not isinstance(c.type, JSON) and c.type.python_type is float
                fill.append(_getter(c.name, default, float_))
            got = (namedtuple("JobRow", [c.name for c in columns]), tuple(fill))
            self._stmts[key] = got
        return got

    def _read_sql(self, dialect, columns: tuple) -> str:
        key = ("read", tuple(c.name for c in columns))
        sql = self._stmts.get(key)
        if sql is None:
            q = dialect.identifier_preparer.quote
            sql = (f"SELECT {', '.join(q(c.name) for c in columns)} FROM jobs WHERE "
                   f"id = ANY(%b::{jobs.c.id.type.compile(dialect=dialect)}[])")
            self._stmts[key] = sql
        return sql

    def _execute_pg(self, conn: Connection, commit: bool = False,
                    read: tuple | None = None) -> None:
        """:meth:`execute` on PostgreSQL, in the same order, with a turn's changes in as few
        statements and round trips as it takes: each run of updates is ONE ``UPDATE ... FROM
        unnest(arrays)`` (not a statement per row), the events ONE ``INSERT ... SELECT FROM
        unnest``, the archived attempts one ``INSERT ... SELECT``, all sent in one psycopg
        pipeline, with the COMMIT when the caller commits next: one round trip. Rarer
        writes (new jobs, parents, agents, JSON columns) keep the Core path, in their place."""
        if self.job_inserts or self.parent_inserts or self.agent_inserts:
            self.settle()  # (COPY and SQLAlchemy's statements, outside the pipeline)
        if self.job_inserts:
            self._insert_jobs(conn, self.job_inserts)
            self.job_inserts = []
        if self.parent_inserts:
            conn.execute(job_parents.insert(), self.parent_inserts)
            self.parent_inserts = []
        if self.agent_inserts:
            conn.execute(agents.insert(), self.agent_inserts)
            self.agent_inserts = []
        ops = self._pg_ops(conn)
        if commit and ops:
            ops.append(("raw", "COMMIT", None))
        if read is not None:
            ops.append(("read",) + read)
        if ops:
            self._send_pg(conn, ops)
        self.settle()

    # -- streaming (PostgreSQL) -------------------------------------------------------------
    def stream(self, conn: Connection) -> None:
        """On PostgreSQL, send the job updates and events batched so far now, in the turn's
        transaction, without waiting for them: the database applies them while the loop
        handles the next message or leases the next agent's tasks, where it sat idle while
        the loop worked (and the loop idle while it wrote). The next use of the connection
        waits for them (:meth:`settle`; the server's ``conn`` does so), and an error among
        them fails the turn there as it would have at the commit. New jobs, parents and
        agents (COPY and SQLAlchemy's statements) wait for the turn's next write."""
        if not _psycopg(conn):
            if self.remote and (len(self.events) + len(self.job_inserts)
                                + sum(len(p) for _, p in self._updates) >= STREAM_MIN):
                self.execute(conn)  # (executemany: sent to the writer process, not waited for)
            return
        if (self.job_inserts or self.parent_inserts or self.agent_inserts
                or len(self.events) + sum(len(p) for _, p in self._updates) < STREAM_MIN):
            return
        self._send_pg(conn, self._pg_ops(conn))

    @property
    def streaming(self) -> bool:
        """Writes were sent by :meth:`stream` and not yet waited for."""
        return self._pipe is not None

    def settle(self) -> None:
        """Wait for what :meth:`stream` sent; raise the first error among it."""
        if self._pipe is None:
            return
        cm, cur = self._pipe
        self._pipe = None
        try:
            cm.__exit__(None, None, None)  # a sync: every result, and pipeline mode ends
        finally:
            cur.close()

    def _send_pg(self, conn: Connection, ops: list[tuple]) -> None:
        """Send ``ops`` in order into this turn's pipeline (opened if need be): raw statements
        without waiting; a read fetches its rows (psycopg waits for them and for everything
        before); a Core statement settles the pipeline first and runs through SQLAlchemy."""
        try:
            for op in ops:
                if op[0] == "core":
                    self.settle()
                    conn.execute(op[1], op[2])
                    continue
                if self._pipe is None:
                    if not conn.in_transaction():
                        conn.begin()  # so that conn.commit() commits what the driver writes
                    dbapi = conn.connection.dbapi_connection
                    cm = dbapi.pipeline()
                    cm.__enter__()
                    self._pipe = (cm, dbapi.cursor())
                if op[0] == "read":
                    _, sql, args, out = op
                    with conn.connection.dbapi_connection.cursor(
                            row_factory=namedtuple_row) as rc:
                        rc.execute(sql, args)
                        out.extend(rc.fetchall())
                else:
                    self._pipe[1].execute(op[1], op[2])
        except BaseException:
            # an error that came back early: leave pipeline mode (its other results are
            # collected) so the caller's rollback works, as after a failed settle
            try:
                self.settle()
            except Exception:
                pass
            raise

    def _pg_ops(self, conn: Connection) -> list[tuple]:
        """The batched updates and inserts after the new jobs, as statements in order (taken
        out of the batch)."""
        ops: list[tuple] = []   # ("raw", sql, args) or ("core", statement, params), in order
        for cols, params in self._agent_updates:
            ops.append(self._pg_update(conn, agents, cols, params))
        self._agent_updates = []
        if self.archived:  # before the updates that start the next attempt in the row
            ops.append(("raw", self._pg_archive_sql(conn),
                        ([p["_id"] for p in self.archived],)))
            self.archived = []
        for cols, params in self._updates:
            ops.append(self._pg_update(conn, jobs, cols, params))
        self._updates = []
        for cols, params in self._wf_updates:
            ops.append(self._pg_update(conn, workflows, cols, params))
        self._wf_updates = []
        if self.events:
            ops.append(self._pg_insert(conn, job_events, _EVENT_COLS, self.events))
            self.events = []
        if self.server_events:
            ops.append(self._pg_insert(conn, server_events, SERVER_EVENT_COLS,
                                       self.server_events))
            self.server_events = []
        return ops

    def _pg_sql(self, conn: Connection, table, cols: tuple[str, ...], kind: str):
        """(SQL, column converters) of an unnest statement, compiled once per table and
        columns; None if a column is JSON (those keep SQLAlchemy's serialization)."""
        key = (table.name, cols, kind)
        if key in self._stmts:
            return self._stmts[key]
        out = None
        if not any(isinstance(table.c[c].type, JSON) for c in cols):
            q = conn.dialect.identifier_preparer.quote
            name = q(table.name)
            keys = ("id",) + cols if kind == "update" else cols
            # binary arrays (%b): psycopg's text format quotes each item, 4x the client's CPU
            arrays = ", ".join(f"%b::{table.c[c].type.compile(dialect=conn.dialect)}[]"
                               for c in keys)
            alias = ", ".join(q(c) for c in keys)
            if kind == "update":
                sets = ", ".join(f"{q(c)} = v.{q(c)}" for c in cols)
                sql = (f"UPDATE {name} SET {sets} FROM unnest({arrays}) AS v({alias}) "
                       f"WHERE {name}.{q('id')} = v.{q('id')}")
            else:
                sql = f"INSERT INTO {name} ({alias}) SELECT * FROM unnest({arrays})"
            out = (sql, tuple(_converter(table.c[c].type) for c in keys))
        self._stmts[key] = out
        return out

    def _pg_update(self, conn: Connection, table, cols: tuple[str, ...],
                   params: list[dict]) -> tuple:
        """One run of updates (same columns, in order) as one statement. A row updated twice
        in a run keeps its last values, as the row-by-row updates left it (one UPDATE ...
        FROM updates a row once, from an unpredictable one of its matches: so one each)."""
        compiled = self._pg_sql(conn, table, cols, "update")
        if compiled is None:
            return ("core", self._stmt(table, cols), params)
        sql, conv = compiled
        last = {p["_id"]: p for p in params}
        rows = last.values() if len(last) != len(params) else params
        keys = ("_id",) + cols
        return ("raw", sql, tuple(f([p[k] for p in rows]) for f, k in zip(conv, keys)))

    def _pg_insert(self, conn: Connection, table, cols: tuple[str, ...],
                   rows: list[dict]) -> tuple:
        compiled = self._pg_sql(conn, table, cols, "insert")
        if compiled is None:
            return ("core", table.insert(), rows)
        sql, conv = compiled
        return ("raw", sql, tuple(f([r[k] for r in rows]) for f, k in zip(conv, cols)))

    def _pg_archive_sql(self, conn: Connection) -> str:
        """The archive statement (:meth:`_archive_stmt`) for a list of job ids at once."""
        sql = self._stmts.get("archive-pg")
        if sql is None:
            q = conn.dialect.identifier_preparer.quote
            into = ", ".join(q(a) for a, _ in ATTEMPT_FROM_JOB) + ", host, node, pilot"
            sel = ", ".join(f"j.{q(c)}" for _, c in ATTEMPT_FROM_JOB)
            sql = (f"INSERT INTO job_attempts ({into}) SELECT {sel}, a.host, a.node, a.pilot "
                   f"FROM unnest(%b::{jobs.c.id.type.compile(dialect=conn.dialect)}[]) "
                   "AS v(id) JOIN jobs j ON j.id = v.id "
                   "LEFT OUTER JOIN agents a ON a.id = j.run_agent "
                   "WHERE j.run_agent IS NOT NULL")
            self._stmts["archive-pg"] = sql
        return sql

    def _insert_jobs(self, conn: Connection, rows: list[dict]) -> None:
        """New jobs. On SQLite: one compiled INSERT and plain tuples to the driver, the JSON
        column serialized here as SQLAlchemy's SQLite JSON type does (``json.dumps``):
        SQLAlchemy's per-row parameter processing was about half the server's time in a
        100,000-job add. Other databases, or rows of different shapes, take the Core path."""
        cols = tuple(rows[0])
        if conn.dialect.name != "sqlite" or any(len(r) != len(cols) for r in rows):
            if not _psycopg(conn) or not self._copy_jobs(conn, cols, rows):
                conn.execute(jobs.insert(), rows)
            return
        key = ("jobs", cols, "insert")
        sql = self._stmts.get(key)
        if sql is None:
            compiled = jobs.insert().values({c: bindparam(c) for c in cols}).compile(
                dialect=conn.dialect)
            sql = (compiled.string, tuple(compiled.positiontup))
            self._stmts[key] = sql
        text, order = sql
        params = list(map(itemgetter(*order), rows))
        for k, c in enumerate(order):
            if isinstance(jobs.c[c].type, JSON):
                dumps = json.dumps
                params = [t[:k] + (dumps(t[k]),) + t[k + 1:] for t in params]
        if not conn.in_transaction():
            conn.begin()
        cur = conn.connection.dbapi_connection.cursor()
        try:
            cur.executemany(text, params)
        finally:
            cur.close()

    def _copy_jobs(self, conn: Connection, cols: tuple[str, ...], rows: list[dict]) -> bool:
        """New jobs on PostgreSQL: one ``COPY jobs FROM STDIN`` (psycopg formats the rows in
        C) instead of an INSERT per row. The JSON column is serialized as SQLAlchemy does
        (``json.dumps``, None as JSON null); a Float column's ints are made floats (text COPY
        would take them, but then the converters stay the one place for that rule). False
        (nothing written) if the rows have different columns or lack a column that has a
        default: the caller takes the Core path."""
        q = conn.dialect.identifier_preparer.quote
        convs = [_converter(jobs.c[c].type) for c in cols]
        if any(len(r) != len(cols) for r in rows):
            return False
        try:
            columns = [[r[c] for r in rows] for c in cols]
        except KeyError:
            return False
        # column defaults are SQLAlchemy's (Python side), which COPY would not apply
        if any(c.default is not None and c.name not in cols for c in jobs.columns):
            return False
        for k, c in enumerate(cols):
            if isinstance(jobs.c[c].type, JSON):
                columns[k] = list(map(json.dumps, columns[k]))
            else:
                columns[k] = convs[k](columns[k])
        if not conn.in_transaction():
            conn.begin()
        with conn.connection.dbapi_connection.cursor() as cur, cur.copy(
                f"COPY jobs ({', '.join(q(c) for c in cols)}) FROM STDIN") as copy:
            for row in zip(*columns):
                copy.write_row(row)
        return True

    def _run(self, conn: Connection, table, cols: tuple[str, ...], params: list[dict]) -> None:
        """An update (cols + ``_id``) or, for job_events, an insert: executemany on the
        driver.

        These two statements carry nearly every write of a busy server; compiling them once and
        handing plain tuples to the driver saves SQLAlchemy's per-execution work (measured: ~0.1 ms
        per statement, several statements per loop turn). JSON columns keep the full path.
        """
        key = (table.name, cols, "raw")
        raw = self._stmts.get(key)
        if raw is None:
            if any(isinstance(table.c[c].type, JSON) for c in cols):
                raw = False
            else:
                if table is job_events or table is server_events:
                    stmt = table.insert().values({c: bindparam(c) for c in cols})
                else:
                    stmt = self._stmt(table, cols)
                compiled = stmt.compile(dialect=conn.dialect)
                order = compiled.positiontup
                raw = (compiled.string, tuple(order) if order else None)
            self._stmts[key] = raw
        if raw is False:
            conn.execute(self._stmt(table, cols), params)
            return
        sql, order = raw
        _executemany(conn, sql, params if order is None else _positional(params, order))

    def _many(self, conn: Connection, key: str, stmt, params: list[dict]) -> None:
        """``stmt`` (named bind parameters) for every dict in ``params`` as one executemany
        on the driver, however few (see :attr:`remote`)."""
        raw = self._stmts.get(("many", key))
        if raw is None:
            compiled = stmt.compile(dialect=conn.dialect)
            raw = (compiled.string, tuple(compiled.positiontup))
            self._stmts[("many", key)] = raw
        sql, order = raw
        _executemany(conn, sql, _positional(params, order))

    def _archive_stmt(self):
        """INSERT INTO job_attempts SELECT the latest attempt FROM jobs WHERE id = :_id (rows
        written before attempts were recorded, with no run_agent, have nothing to move)."""
        stmt = self._stmts.get("archive")
        if stmt is None:
            stmt = job_attempts.insert().from_select(
                [a for a, _ in ATTEMPT_FROM_JOB] + ["host", "node", "pilot"],
                select(*(jobs.c[j] for _, j in ATTEMPT_FROM_JOB), agents.c.host, agents.c.node,
                       agents.c.pilot)
                .select_from(jobs.outerjoin(agents, agents.c.id == jobs.c.run_agent))
                .where(jobs.c.id == bindparam("_id"), jobs.c.run_agent.is_not(None)))
            self._stmts["archive"] = stmt
        return stmt

    def _stmt(self, table, cols: tuple[str, ...]):
        key = (table.name, cols)
        stmt = self._stmts.get(key)
        if stmt is None:
            stmt = (table.update().where(table.c.id == bindparam("_id"))
                    .values({c: bindparam(c) for c in cols}))
            self._stmts[key] = stmt
        return stmt


def _positional(params: list[dict], order: tuple[str, ...]) -> list[tuple]:
    """Each dict's values in the compiled statement's parameter order (itemgetter: a third of
    a generator's time, on every row)."""
    return (list(map(itemgetter(*order), params)) if len(order) > 1
            else [(p[order[0]],) for p in params])


def _executemany(conn: Connection, sql: str, rows: list) -> None:
    """``sql`` for every row, on the driver's own cursor, in the connection's transaction."""
    if not conn.in_transaction():
        conn.begin()  # so that conn.commit() commits what the driver cursor writes
    cur = conn.connection.dbapi_connection.cursor()
    try:
        cur.executemany(sql, rows)
    finally:
        cur.close()


_MISSING = object()


def _getter(name: str, default: Any, float_: bool):
    """A column's value from an insert dict (see Batch._row_type)."""
    def get(row: dict) -> Any:
        v = row.get(name, default)
        if v is _MISSING:
            raise KeyError(name)
        if float_ and v is not None and type(v) is not float:
            v = float(v)
        return v
    return get


def namedtuple_row(cursor):
    from psycopg.rows import namedtuple_row as factory  # psycopg only: imported when used
    return factory(cursor)


def _psycopg(conn: Connection) -> bool:
    """PostgreSQL through psycopg 3 (pipelines, binary arrays, COPY): the bulk path; any
    other driver keeps the row-by-row one."""
    return conn.dialect.name == "postgresql" and conn.dialect.driver == "psycopg"


def _same(vals: list) -> list:
    return vals


def _converter(sqltype):
    """A function making a column's values one Python type, as psycopg needs to send them as
    one array (it refuses a list of ints and floats): ints to float for a Float column, bools
    to int for an Integer one, anything else to str for a string one; None stays None."""
    py = sqltype.python_type if not isinstance(sqltype, JSON) else None
    if py not in (float, int, str):
        return _same
    ok = {py, type(None)}
    # a str subclass (a State) as the string it is, as psycopg sends it (str() may differ)
    make = (lambda v: str.__str__(v) if isinstance(v, str) else str(v)) if py is str else py

    def conv(vals: list) -> list:
        if set(map(type, vals)) <= ok:
            return vals
        return [v if v is None else make(v) for v in vals]
    return conv


def _append_run(runs: list, key_id: Any, cols: dict) -> None:
    key = tuple(cols)
    cols["_id"] = key_id
    if runs and runs[-1][0] == key:
        runs[-1][1].append(cols)
    else:
        runs.append((key, [cols]))


def chunks(seq: list, size: int) -> Iterable[list]:
    for i in range(0, len(seq), size):
        yield seq[i:i + size]
