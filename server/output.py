"""Tasks' output shipped by agents (``pilotfish job log``): checked, bounded and stored.

Pieces ride on agents' updates (protocol ``OUTPUT_CHUNK``) and are stored in ``job_output`` in
the turn's transaction, before the update is acknowledged. An agent may ship output only for a
job it holds the lease on, for that lease's attempt -- or, for a short while after the task
ended by the agent's own update, the rest of that attempt's output. Anything else (another
agent's job, a stale attempt) is dropped and counted, never an error: the update it rode on is
still applied, so a confused agent loses nothing but the piece.

Bounds, whatever an agent sends: at most ``cap`` bytes of each stream per attempt (the rest
stays in the task's workdir: the pieces say where), at most ``MAX_PIECES`` rows per stream, and
per agent a byte budget refilled at four times the rate the agents are told (so an honest agent
never meets it). Only a job's newest attempt is kept: its first piece removes older attempts' output.
The server keeps a small cache per stream (next offset, bytes stored), rebuilt from the table
when missing (after a restart), so a resent piece is stored once.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from sqlalchemy import delete, func, select

from pilotfish import protocol as P
from pilotfish import settings
from pilotfish.errors import ProtocolError

from .db import job_output
from .store import chunks as parts

log = logging.getLogger("pilotfish.server")
#: Most rows one stream of one attempt may have (pieces are 64 KiB at most; a slow trickle of
#: small ones must not grow the table without bound either).
MAX_PIECES = 4096
#: Most bytes in one piece, and pieces in one update.
MAX_PIECE_BYTES = 1 * 2**20
MAX_PIECES_PER_MESSAGE = 1000
#: Seconds after its end during which a task's agent may still ship the rest of its output.
AFTER_END = 300.0
#: Most cached streams and ended grants (caches: what is dropped is read again from the table).
MAX_CACHED = 100_000
#: Most ended tasks remembered for the rest of their output (at 1,000 tasks a second, the
#: last 10 to 20 seconds' worth: the rest of a long output follows its end within seconds).
MAX_ENDED = 20_000
MAX_PATH = 4096


@dataclass(slots=True)
class _Stream:
    attempt: int
    end: int       # offset after the last stored byte
    stored: int    # bytes stored
    rows: int
    eof: bool


class OutputStore:
    def __init__(self, cap: int | None = None, rate: int | None = None) -> None:
        if cap is None or rate is None:
            try:
                cap, rate = settings.output_limits()
            except ValueError as exc:  # the Service checks it at start; a rebuild goes on
                log.error("%s: using the defaults", exc)
                cap, rate = settings.OUTPUT_CAP, settings.OUTPUT_RATE
        self.cap, self.rate = cap, rate
        #: an agent's byte budget here: refilled at 4x the rate it is told, up to this (its
        #: tasks' short last pieces may go past its rate; see pilot/output.py END_ALLOWANCE)
        self.burst = max(8.0 * rate, 4.0 * 2**20)
        self.streams: dict[tuple[int, str], _Stream] = {}
        self.ended: dict[int, tuple[str, int, float]] = {}   # job -> (agent, attempt, when)
        self.budget: dict[str, list[float]] = {}             # agent -> [bytes, monotonic time]
        self.dropped = 0
        self._warned = 0.0

    # -- from agents ----------------------------------------------------------------------
    def task_ended(self, job: int, agent: str, attempt: int, now: float) -> None:
        """The task of ``attempt`` ended by its agent's update: the rest of its output may
        still come from that agent (after the end, when its budget ran out)."""
        ended = self.ended
        ended.pop(job, None)
        ended[job] = (agent, attempt, now)
        if len(ended) > MAX_ENDED:  # the oldest half (insertion order)
            for j in list(ended)[:MAX_ENDED // 2]:
                del ended[j]

    def on_chunks(self, srv, a, items: list, now: float) -> None:
        """Store the pieces of one update from agent ``a`` (in the turn's transaction)."""
        if len(items) > MAX_PIECES_PER_MESSAGE:
            raise ProtocolError(f"output: more than {MAX_PIECES_PER_MESSAGE} pieces")
        P.check_items(P.OUTPUT_CHUNK, items, "output")
        for c in items:  # check all before storing any: a bad message changes nothing
            if c["stream"] not in P.OUTPUT_STREAMS or c["offset"] < 0 or c["size"] < 0 \
                    or len(c["data"]) > MAX_PIECE_BYTES or len(c["path"]) > MAX_PATH:
                raise ProtocolError("output: a piece with a bad stream, offset, size, data or "
                                    "path")
        mine = [c for c in items if self._may(srv, a, c, now)]
        self._load(srv.conn, mine)
        rows = []
        for c in mine:
            row = self._accept(srv, a.id, c, now)
            if row is not None:
                rows.append(row)
        if rows:
            srv.conn.execute(job_output.insert(), rows)

    def _may(self, srv, a, c: dict, now: float) -> bool:
        job, attempt = c["job"], c["attempt"]
        lease = srv.leases.get(job)
        if lease is not None and lease.agent == a.id and lease.attempt == attempt:
            return True
        e = self.ended.get(job)
        if e is not None and e[0] == a.id and e[1] == attempt and now - e[2] < AFTER_END and \
                (lease is None or lease.attempt == attempt):
            return True
        self.dropped += 1
        if time.monotonic() - self._warned > 60:
            # another agent's job is worth a warning; no lease at all is mostly a race (a
            # piece on its way while the job was killed, removed or lost)
            self._warned = time.monotonic()
            other = lease is not None and lease.agent != a.id
            log.log(logging.WARNING if other else logging.INFO,
                    "dropped output from agent %s for job %d attempt %d: %s (%d pieces dropped "
                    "so far; logged at most once a minute)", a.id, job, attempt,
                    f"agent {lease.agent} holds it" if other else "it holds no lease on it",
                    self.dropped)
        return False

    def _load(self, conn, items: list) -> None:
        """The stored state of every stream of ``items`` not cached yet, in one query (not
        one per piece: the first pieces of each task would cost a query each)."""
        want = {}
        for c in items:
            st = self.streams.get((c["job"], c["stream"]))
            if st is None or st.attempt < c["attempt"]:
                want[(c["job"], c["stream"])] = c["attempt"]
        if not want:
            return
        jobs_ = sorted({j for j, _s in want})
        found: dict[tuple[int, str], dict] = {}
        for part in parts(jobs_, 900):
            for r in conn.execute(
                    select(job_output.c.job_id, job_output.c.stream, job_output.c.attempt,
                           func.max(job_output.c.pos + job_output.c.nbytes).label("end"),
                           func.sum(job_output.c.nbytes).label("stored"),
                           func.count().label("rows"), func.max(job_output.c.eof).label("eof"))
                    .where(job_output.c.job_id.in_(part))
                    .group_by(job_output.c.job_id, job_output.c.stream, job_output.c.attempt)):
                found.setdefault((r.job_id, r.stream), {})[r.attempt] = r
        for key, attempt in want.items():
            self._settle(conn, key, attempt, found.get(key, {}))

    def _settle(self, conn, key: tuple[int, str], attempt: int, found: dict) -> _Stream | None:
        """Cache the state of ``attempt``'s stream from its stored rows (``found``: attempt ->
        aggregate row); None when a newer attempt's is stored. Removes older attempts' output."""
        job, stream = key
        if any(n > attempt for n in found):
            return None
        if any(n < attempt for n in found):
            conn.execute(delete(job_output).where(job_output.c.job_id == job,
                                                  job_output.c.stream == stream,
                                                  job_output.c.attempt < attempt))
        r = found.get(attempt)
        st = _Stream(attempt, 0, 0, 0, False) if r is None else \
            _Stream(attempt, int(r.end), int(r.stored), int(r.rows), bool(r.eof))
        if len(self.streams) >= MAX_CACHED:
            self.streams.clear()
        self.streams[key] = st
        return st

    def _state(self, conn, job: int, stream: str, attempt: int) -> _Stream | None:
        """The stored state of ``attempt``'s stream; None when a newer attempt's is stored.
        Loading it removes the output of older attempts."""
        key = (job, stream)
        st = self.streams.get(key)
        if st is not None and st.attempt == attempt:
            return st
        if st is not None and st.attempt > attempt:
            return None
        found = {r.attempt: r for r in conn.execute(
            select(job_output.c.attempt, func.max(job_output.c.pos + job_output.c.nbytes)
                   .label("end"), func.sum(job_output.c.nbytes).label("stored"),
                   func.count().label("rows"), func.max(job_output.c.eof).label("eof"))
            .where(job_output.c.job_id == job, job_output.c.stream == stream)
            .group_by(job_output.c.attempt))}
        return self._settle(conn, key, attempt, found)

    def _accept(self, srv, agent: str, c: dict, now: float) -> dict | None:
        key = (c["job"], c["stream"])
        st = self._state(srv.conn, c["job"], c["stream"], c["attempt"])
        if st is None or st.eof:
            return None  # a stale attempt, or all of it is stored already
        pos, data = c["offset"], c["data"]
        if pos < st.end:  # a resend after a reconnect: keep what is new
            data = data[st.end - pos:]
            pos = st.end
        data = data[:max(0, self.cap - st.stored)]
        if data:
            b = self.budget.get(agent)
            mono = time.monotonic()
            if b is None:
                if len(self.budget) >= MAX_CACHED:
                    self.budget.clear()
                b = self.budget[agent] = [self.burst, mono]
            b[0] = min(self.burst, b[0] + (mono - b[1]) * 4 * self.rate)
            b[1] = mono
            if len(data) > b[0]:
                data = data[:int(b[0])]
            b[0] -= len(data)
        if not data and not c["eof"]:
            return None
        if st.rows >= MAX_PIECES - 1 and not c["eof"]:
            return None  # (the last row is kept for the eof)
        st.end, st.stored, st.rows = pos + len(data), st.stored + len(data), st.rows + 1
        st.eof = c["eof"]
        if st.eof:
            self.streams.pop(key, None)  # complete: a resend finds eof in the table
        return {"job_id": c["job"], "attempt": c["attempt"], "stream": c["stream"],
                "pos": pos, "nbytes": len(data), "data": data, "size": c["size"],
                "eof": int(c["eof"]), "path": c["path"], "time": now}

    # -- removal ---------------------------------------------------------------------------
    def remove(self, conn, ids: list[int]) -> int:
        """Remove the stored output of jobs (job rm, gc); the rows removed."""
        n = 0
        for part in parts(ids, 900):
            n += conn.execute(delete(job_output).where(job_output.c.job_id.in_(part))).rowcount \
                or 0
        for job in ids:
            self.ended.pop(job, None)
            for s in P.OUTPUT_STREAMS:
                self.streams.pop((job, s), None)
        return n
