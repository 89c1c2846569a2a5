"""``pilotfish source pg``: a PostgreSQL NOTIFY channel as a job source (the DIII-D case: the
experiment database makes an analysis job the moment a plasma pulse ends).

A client of the server (a submitter key), never part of its loop. Two modes:

* **with a catch-up table** (for production): the table is the truth. A NOTIFY wakes the source
  (its payload is checked, and refused when bad); the source then reads the rows whose id is
  above its cursor, in id order, and makes one job per row. On start, after every reconnect and
  every ``sweep`` seconds it reads them too, so pulses notified while it was down, or whose
  NOTIFY was lost, are not lost. A NOTIFY cannot move the cursor (anyone who may connect may
  NOTIFY; only rows, guarded by the table's privileges, make jobs).
* **without one**: each NOTIFY payload is the pulse. Pulses notified while no source listens
  are gone (PostgreSQL keeps no NOTIFY for later).

**Never twice.** Each job carries the tag ``pg.<source>.<id>`` (its idempotency key). The pulse
in flight is written to the state file before its job is sent; after a crash, or after a send
whose answer never came, the source asks the server whether a job with that tag exists before
it sends again. We check on the client rather than have the server refuse duplicates: it needs
no change to the job store, and the check costs one tag query per crash or lost answer, never
one per pulse. The one window a client check leaves, a lost send still queued in a live but
stalled server, is narrowed by checking twice on one connection (see :meth:`Source._settle`).
"""
from __future__ import annotations

import json
import logging
import os
import signal
import time
from typing import Any, Callable

from pilotfish.client import Client
from pilotfish.errors import (Forbidden, IllegalTransition, NotFound, ProtocolError,
                              ServerUnavailable, ValidationError)
from pilotfish.validate import cap

from . import pg_payload
from .pg_state import State
from .pg_template import Template

log = logging.getLogger("pilotfish.source")
#: Rows read per catch-up query.
PAGE = 500
#: Backoff while the server or the database is away: from MIN to MAX seconds, doubling.
BACKOFF_MIN, BACKOFF_MAX = 0.5, 30.0
#: Integer column types an id column may have (int2, int4, int8).
INT_TYPES = {21, 23, 20}
#: Test-only fault point: ``kill-after-submit`` kills the source (SIGKILL) right after the
#: server has added a job and before the cursor is saved, the worst moment to die.
FAULT_ENV = "PILOTFISH_PG_SOURCE_FAULT"


class Stopped(Exception):
    """The source was asked to stop (SIGTERM, SIGINT)."""


class Source:
    def __init__(self, tmpl: Template, dsn: str, channel: str, state: State,
                 client: Callable[[], Client], *, table: str | None = None,
                 sweep: float = 60.0, from_id: int | None = None,
                 emit: Callable[[dict], None] | None = None,
                 address: Callable[[], str | None] | None = None) -> None:
        self.tmpl = tmpl
        self.dsn = dsn
        self.channel = channel
        self.state = state
        self._new_client = client
        self._client: Client | None = None
        #: where the server is now (server.json), checked before each use of the client
        self._address = address
        self.table = table
        self.sweep = sweep
        self.from_id = from_id
        self.emit = emit or (lambda d: None)
        self.stopping = False
        self.fault = os.environ.get(FAULT_ENV)
        self.columns = list(tmpl.fields)  # the table's columns: one per field

    # -- stopping and waiting ---------------------------------------------------------------
    def stop(self, *_: Any) -> None:
        self.stopping = True

    def install_signals(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)

    def _sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < end:
            time.sleep(min(0.2, end - time.monotonic()))
        if self.stopping:
            raise Stopped()

    def client(self) -> Client:
        if self._client is not None and self._address is not None and \
                self._address() != self._client.address:
            self._drop_client()  # the server stopped or moved: do not wait for the old one
        if self._client is None:  # a new client reads the home's server.json again
            self._client = self._new_client()
        return self._client

    def _drop_client(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    # -- the start check --------------------------------------------------------------------
    def check_with_server(self, wait: bool = True) -> None:
        """The template against the server's rules: its app exists and declares every filled
        parameter, and the job made from ``example`` passes the server's own job checks
        (``job_check``, which adds nothing). Waits for a server that is away."""
        t = self.tmpl
        app_name = t.job["application"]
        delay = BACKOFF_MIN
        while True:
            try:
                c = self.client()
                try:
                    app = c.app(app_name)
                except NotFound as exc:
                    raise ValidationError(f"template: job.application: {exc}") from None
                declared = app.get("parameters") or {}
                for field, target in t.fields.items():
                    if target and target[0] == "parameter" and target[1] not in declared:
                        raise ValidationError(
                            f"template: fields.{field}: fills parameter {target[1]!r}, which "
                            f"app {app_name!r} does not declare (it declares: "
                            f"{', '.join(declared) or 'none'})")
                try:
                    _, fields = pg_payload.parse(json.dumps(t.example), t)
                except pg_payload.Refused as exc:
                    raise ValidationError(f"template: example: {exc}") from None
                except (TypeError, ValueError) as exc:
                    raise ValidationError(f"template: example: not plain data: {exc}") from None
                try:
                    c.call("job_check", jobs=[t.job_for(fields)])
                except (ValidationError, NotFound) as exc:
                    raise ValidationError(f"template: the job made from its example is "
                                          f"refused by the server: {exc}") from None
                return
            except (ServerUnavailable, Forbidden) as exc:
                self._drop_client()
                if not wait:
                    raise
                log.warning("waiting for the server (start check): %s; again in %.1f s",
                            exc, delay)
                self._sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)

    # -- the database -----------------------------------------------------------------------
    def connect(self):
        import psycopg
        return psycopg.connect(self.dsn, autocommit=True, connect_timeout=10,
                               application_name=f"pilotfish-source-{self.tmpl.source}"[:63],
                               keepalives=1, keepalives_idle=10, keepalives_interval=5,
                               keepalives_count=3)

    def _ident(self, name: str):
        from psycopg import sql
        return sql.Identifier(*name.split("."))

    def check_table(self, conn) -> None:
        """The table has a column per field and an integer id column; errors say which."""
        import psycopg
        from psycopg import sql
        q = sql.SQL("SELECT {} FROM {} LIMIT 0").format(
            sql.SQL(", ").join(map(sql.Identifier, self.columns)), self._ident(self.table))
        try:
            cur = conn.execute(q)
        except (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn,
                psycopg.errors.InsufficientPrivilege, psycopg.errors.InvalidSchemaName) as exc:
            raise ValidationError(f"catch-up table {self.table!r}: "
                                  f"{str(exc).splitlines()[0]} (the template's fields are its "
                                  f"columns: {', '.join(self.columns)})") from None
        types = {d.name: d.type_code for d in cur.description}
        if types.get(self.tmpl.id_field) not in INT_TYPES:
            raise ValidationError(f"catch-up table {self.table!r}: the id column "
                                  f"{self.tmpl.id_field!r} must be an integer column "
                                  "(smallint, integer or bigint) that grows")

    def _first_cursor(self, conn) -> None:
        """A new source starts at the table's newest row (no flood of old pulses), or after
        ``--from-id``."""
        from psycopg import sql
        if not self.state.fresh:
            if self.from_id is not None:
                log.warning("--from-id %d ignored: the state file %s already has cursor %s "
                            "(move it away to start anew)", self.from_id, self.state.path,
                            self.state.cursor)
                self.from_id = None
            return
        if self.from_id is not None:
            self.state.cursor = self.from_id
        else:
            q = sql.SQL("SELECT max({}) FROM {}").format(sql.Identifier(self.tmpl.id_field),
                                                         self._ident(self.table))
            self.state.cursor = conn.execute(q).fetchone()[0]
        self.state.save()
        log.info("new source %r: starting after id %s", self.tmpl.source,
                 "(none: every row)" if self.state.cursor is None else self.state.cursor)

    def catch_up(self, conn) -> int:
        """Make a job of every row above the cursor, in id order; returns how many rows."""
        from psycopg import sql
        idc = sql.Identifier(self.tmpl.id_field)
        q = sql.SQL("SELECT {id}, row_to_json(x)::text FROM (SELECT {cols} FROM {t} "
                    "WHERE {id} > %s ORDER BY {id} LIMIT {n}) x ORDER BY {id}").format(
            id=idc, cols=sql.SQL(", ").join(map(sql.Identifier, self.columns)),
            t=self._ident(self.table), n=sql.Literal(PAGE))
        seen = 0
        while not self.stopping:
            after = -1 if self.state.cursor is None else self.state.cursor
            rows = conn.execute(q, (after,)).fetchall()
            for row_id, text in rows:
                self.pulse(text, "catch-up", row_id=row_id)
                seen += 1
                if self.stopping:
                    break
            if len(rows) < PAGE:
                break
        if seen:
            log.info("caught up %d row(s) of %s; cursor %s", seen, self.table,
                     self.state.cursor)
        return seen

    # -- pulses -----------------------------------------------------------------------------
    def pulse(self, text: str, origin: str, row_id: int | None = None) -> None:
        """One payload (a row's JSON with ``row_id``, or a NOTIFY payload without a table)."""
        try:
            pulse_id, fields = pg_payload.parse(text, self.tmpl)
        except pg_payload.Refused as exc:
            self._refuse(row_id if row_id is not None else exc.pulse_id, origin, str(exc),
                         text, move=row_id is not None)
            return
        self.state.begin(pulse_id, text)
        self._submit(pulse_id, fields, text, origin, unsure=False)

    def on_notify(self, conn, payload: str) -> None:
        if self.table is None:
            self.pulse(payload, "notify")
            return
        # with a table a NOTIFY only wakes us: the rows make the jobs. A bare NOTIFY (no
        # payload) reads the table; a payload must at least name a pulse id (other fields
        # are read from the row, so a row_to_json(NEW) payload with more columns is fine).
        if not payload.strip():
            self.catch_up(conn)
            return
        try:
            pulse_id, _ = pg_payload.parse_id(payload, self.tmpl)
        except pg_payload.Refused as exc:
            self._refuse(exc.pulse_id, "notify", str(exc), payload, move=False)
            return
        if self.state.cursor is not None and pulse_id <= self.state.cursor:
            log.debug("pulse %d: already handled (cursor %s)", pulse_id, self.state.cursor)
            return
        self.catch_up(conn)
        if not self.stopping and (self.state.cursor is None or pulse_id > self.state.cursor):
            self._refuse(pulse_id, "notify", f"pulse {pulse_id} was notified but has no row "
                         f"in {self.table} (notified by someone else, or rolled back?)",
                         payload, move=False)

    def _refuse(self, pulse_id: int | None, origin: str, error: str, text: str,
                move: bool) -> None:
        """Record a refused pulse (``refused.jsonl`` beside the state file) and log it; ``move``:
        the pulse is a row, so the cursor passes it."""
        what = f"pulse {pulse_id}" if pulse_id is not None else "a pulse"
        log.error("%s (%s) refused: %s", what, origin, cap(error, 500))
        self.state.record_refused(pulse_id, origin, error, text)
        if move and pulse_id is not None:
            self.state.done(pulse_id, refused=True)
        else:
            self.state.refused += 1
            self.state.save()
        self.emit({"id": pulse_id, "origin": origin, "refused": error})

    def settle_pending(self) -> None:
        """A pulse that was in flight when the last run ended: done if its job exists."""
        p = self.state.pending
        if p is None:
            return
        log.info("pulse %d was in flight when the source stopped: checking the server",
                 p["id"])
        try:
            pulse_id, fields = pg_payload.parse(p["payload"], self.tmpl)
        except pg_payload.Refused as exc:
            self._refuse(p["id"], "pending", str(exc), p["payload"], move=True)
            return
        self._submit(pulse_id, fields, p["payload"], "pending", unsure=True)

    def _settle(self, c: Client, tag: str) -> int | None:
        """The id of the job tagged ``tag``, if the server has it. Asked twice on one
        connection: a send whose answer was lost may still wait in the server's queue; the
        server's ROUTER reads its peers in turn, so a send that had reached it is read before
        the second question on our connection (one still in the network is not covered)."""
        found = None
        for _ in range(2):
            jobs = c.jobs({"tag": tag}, limit=1)
            if jobs:
                found = jobs[0]["id"]
                break
        return found

    def _submit(self, pulse_id: int, fields: dict, text: str, origin: str,
                unsure: bool) -> None:
        """Add the pulse's job; wait out a server that is away (nothing lost); record a
        refusal. ``unsure``: a job may already exist (settle before sending)."""
        tag = self.tmpl.tag(pulse_id)
        job = self.tmpl.job_for(fields)
        delay = BACKOFF_MIN
        while True:
            sent = False
            try:
                c = self.client()
                if unsure:
                    existing = self._settle(c, tag)
                    if existing is not None:
                        log.info("pulse %d (%s): job %d was already added; not again",
                                 pulse_id, origin, existing)
                        self.state.done(pulse_id)
                        self.emit({"id": pulse_id, "origin": origin, "job": existing,
                                   "already": True})
                        return
                sent = True
                job_id = c.add_jobs([job])[0]
            except (ServerUnavailable, Forbidden) as exc:
                unsure = unsure or (sent and not isinstance(exc, Forbidden))
                self._drop_client()
                (log.error if isinstance(exc, Forbidden) else log.warning)(
                    "pulse %d (%s): not added yet: %s; trying again in %.1f s", pulse_id,
                    origin, exc, delay)
                self._sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            except (ValidationError, NotFound, IllegalTransition, ProtocolError) as exc:
                if not sent:  # the tag query itself was refused: not this pulse's fault
                    raise
                self._refuse(pulse_id, origin, f"the server refused its job: {exc}", text,
                             move=True)
                return
            if self.fault == "kill-after-submit":
                os.kill(os.getpid(), signal.SIGKILL)
            self.state.done(pulse_id)
            log.info("pulse %d (%s): job %d added (%s)", pulse_id, origin, job_id, tag)
            self.emit({"id": pulse_id, "origin": origin, "job": job_id})
            return

    # -- the loop ---------------------------------------------------------------------------
    def run(self, check_only: bool = False) -> None:
        """Settle, then LISTEN and catch up on every (re)connect, then follow the channel."""
        import psycopg
        from psycopg import sql
        try:
            self.check_with_server(wait=not check_only)
            delay = BACKOFF_MIN
            first = True
            while not self.stopping:
                try:
                    with self.connect() as conn:
                        if self.table is not None:
                            self.check_table(conn)  # config errors end the source
                        if check_only:
                            return
                        if self.table is not None:
                            self._first_cursor(conn)
                        if first:
                            self.settle_pending()
                            first = False
                        # LISTEN before reading the table: a row committed in between is
                        # then both read and notified, never neither
                        conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
                        log.info("listening on channel %s%s", self.channel,
                                 f", catching up from {self.table}" if self.table else "")
                        delay = BACKOFF_MIN
                        if self.table is not None:
                            self.catch_up(conn)
                        self.follow(conn)
                except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                    if self.stopping:
                        break
                    log.warning("database: %s; reconnecting in %.1f s",
                                " ".join(str(exc).split())[:300], delay)
                    self._sleep(delay)
                    delay = min(delay * 2, BACKOFF_MAX)
        except Stopped:
            pass
        finally:
            self._drop_client()
        if not check_only:
            log.info("stopped; cursor %s, %d job(s) added, %d pulse(s) refused so far",
                     self.state.cursor, self.state.submitted, self.state.refused)

    def follow(self, conn) -> None:
        last_sweep = time.monotonic()
        while not self.stopping:
            # collected first, handled after: the generator holds the connection, and a
            # catch-up needs it (later notifies wait in psycopg's backlog)
            got = list(conn.notifies(timeout=1.0, stop_after=1))
            for n in got:
                if n.channel == self.channel:
                    self.on_notify(conn, n.payload)
                if self.stopping:
                    return
            if self.table is not None and self.sweep and \
                    time.monotonic() - last_sweep >= self.sweep:
                self.catch_up(conn)
                last_sweep = time.monotonic()


def describe_dsn(dsn: str) -> str:
    """``user@host:port/dbname`` for logs: never a password."""
    try:
        from psycopg.conninfo import conninfo_to_dict
        d = conninfo_to_dict(dsn)
    except Exception:
        return "(a DSN)"
    return (f"{d.get('user') or os.environ.get('PGUSER') or ''}@"
            f"{d.get('host') or os.environ.get('PGHOST') or 'localhost'}:"
            f"{d.get('port') or os.environ.get('PGPORT') or 5432}/"
            f"{d.get('dbname') or os.environ.get('PGDATABASE') or ''}")


def dsn_has_password(dsn: str) -> bool:
    from psycopg.conninfo import conninfo_to_dict
    try:
        return bool(conninfo_to_dict(dsn).get("password"))
    except Exception:
        raise ValidationError("the DSN is not a PostgreSQL connection string (a URL "
                              "postgresql://user@host/db or key=value pairs)") from None
