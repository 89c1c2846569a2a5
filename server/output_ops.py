"""The ``job_log`` request op: a job's stored output (the server's half of ``job log``).

A read, like ``job_show``: any key with the role reader or above may read any job's output.
"""
from __future__ import annotations

from sqlalchemy import func, select

from pilotfish import protocol as P
from pilotfish.errors import NotFound, ValidationError
from pilotfish.keys import READER

from . import states
from .core import JobServer
from .db import job_attempts, job_output, jobs
from .ops import MAX_ID, _arg, op

_FINAL = frozenset(s.value for s in states.FINAL)


@op(READER, args=("id", "stream", "after", "tail"))
def job_log(srv: JobServer, args: dict, now: float) -> dict:
    """Stored output of job ``id``'s newest attempt that shipped any: ``stream`` "out" (job.out,
    the default) or "err"; the bytes from offset ``after`` on (default 0), or with ``tail`` the
    last that many lines. Returns the pieces ([offset, bytes], in order; a hole between two is
    output that was never stored), ``next`` (the offset to ask from next time), what is known of
    the file (``size``, ``path``, ``node``), ``capped`` (the file is longer than what is stored:
    the rest stays there), ``eof`` (the agent sent its last piece: the task ended and all of it,
    up to the cap, is here) and ``complete`` (nothing more will come)."""
    job_id = _arg(args, "id", int, required=True)
    stream = _arg(args, "stream", str, "out")
    if stream not in P.OUTPUT_STREAMS:
        raise ValidationError("argument 'stream' must be 'out' (job.out) or 'err' (job.err)")
    after = _arg(args, "after", int, 0)
    tail = _arg(args, "tail", int, None)
    if not 0 <= after <= MAX_ID:
        raise ValidationError("argument 'after' must be a byte offset (0 or more)")
    if tail is not None and not 0 <= tail <= MAX_ID:
        raise ValidationError("argument 'tail' must be a number of lines (0 or more)")
    srv.sync()
    c = srv.conn
    j = c.execute(select(jobs.c.state, jobs.c.attempts, jobs.c.run_agent)
                  .where(jobs.c.id == job_id)).first()
    if j is None:
        raise NotFound(f"no job {job_id}")
    lease = srv.leases.get(job_id)
    state = lease.state.value if lease is not None else j.state
    o = job_output.c
    meta = c.execute(
        select(o.attempt, func.max(o.pos + o.nbytes).label("end"),
               func.sum(o.nbytes).label("stored"), func.max(o.size).label("size"),
               func.max(o.eof).label("eof"), func.max(o.path).label("path"))
        .where(o.job_id == job_id, o.stream == stream)
        .group_by(o.attempt).order_by(o.attempt.desc()).limit(1)).first()
    out = {"job": job_id, "state": state, "final": state in _FINAL, "attempts": j.attempts,
           "stream": stream, "attempt": None, "pieces": [], "next": after, "stored": 0,
           "size": None, "path": None, "capped": False, "cap": srv.output.cap,
           "node": None, "host": None, "agent": None, "eof": None}
    attempt = meta.attempt if meta is not None else (j.attempts or None)
    if attempt is not None and attempt == j.attempts:  # the latest: in the job's row
        if j.run_agent is not None:
            where = srv.agent_where(j.run_agent)
            out.update(agent=j.run_agent, host=where["host"],
                       node=where["node"] or where["host"])
    elif attempt is not None:  # an earlier one
        a = c.execute(select(job_attempts.c.agent, job_attempts.c.host, job_attempts.c.node)
                      .where(job_attempts.c.job_id == job_id,
                             job_attempts.c.attempt == attempt)).first()
        if a is not None:
            out.update(agent=a.agent, host=a.host, node=a.node or a.host)
    if meta is None:
        # nothing stored: nothing printed, or not shipped yet; a final job is done with it
        out["complete"] = out["final"]
        return out
    end = int(meta.end)
    out.update(attempt=meta.attempt, stored=int(meta.stored), size=int(meta.size),
               path=meta.path, capped=int(meta.size) > end, eof=bool(meta.eof),
               # an older attempt's output, when the newest shipped none: nothing more comes
               complete=bool(meta.eof) or meta.attempt < j.attempts and out["final"]
               or out["final"] and lease is None and meta.attempt == j.attempts and
               _gone(srv, job_id, meta.attempt, now))
    q = select(o.pos, o.data).where(o.job_id == job_id, o.stream == stream,
                                    o.attempt == meta.attempt)
    if tail is None:
        q = q.where(o.pos + o.nbytes > after)
    pieces: list[list] = []
    for r in c.execute(q.order_by(o.pos)):
        pos, data = int(r.pos), bytes(r.data)
        if tail is None and pos < after:
            data, pos = data[after - pos:], after
        if not data:
            continue
        if pieces and pieces[-1][0] + len(pieces[-1][1]) == pos:
            pieces[-1][1] += data
        else:
            pieces.append([pos, bytearray(data)])
    if tail is not None:
        pieces = _tail(pieces, tail)
    out["pieces"] = [[p, bytes(d)] for p, d in pieces]
    out["next"] = max(after, end) if tail is None else end
    return out


def _tail(pieces: list[list], n: int) -> list[list]:
    """The last ``n`` lines of the stored pieces (a hole counts as a line break)."""
    if n == 0 or not pieces:
        return []
    kept: list[list] = []
    for pos, data in reversed(pieces):
        lines = bytes(data).splitlines(keepends=True)
        take = lines[-n:]
        size = sum(map(len, take))
        kept.append([pos + len(data) - size, bytearray(b"".join(take))])
        n -= len(take)
        if n <= 0:
            break
    return kept[::-1]


def _gone(srv: JobServer, job_id: int, attempt: int, now: float) -> bool:
    """True when no more of a final job's output can come: its agent's grace to ship the
    rest after the end has passed (the task was killed or its agent lost: no last piece)."""
    e = srv.output.ended.get(job_id)
    from .output import AFTER_END
    return e is None or e[1] != attempt or now - e[2] >= AFTER_END
