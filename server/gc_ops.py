"""The ``gc`` request op: the server's half of ``pilotfish gc`` (housekeeping).

The server owns the database, so it selects the final jobs and ended pilots older than a cutoff
and prunes old event rows, one bounded chunk per request (the loop stays responsive whatever
the size of the history). The files (job workdirs, pilot folders) are removed by the CLI's
process, which sees the agents' work root; the server may not.
"""
from __future__ import annotations

import math

from sqlalchemy import delete, func, select

from pilotfish.errors import ValidationError
from pilotfish.keys import ADMIN
from pilotfish.pilotstate import PilotState

from .core import JobServer
from .db import job_events, job_output, jobs
from .events import set_pruned
from .db import pilots as pilots_t
from .ops import _arg, op
from .states import FINAL

#: Most jobs one request handles; their event rows go in the same transaction.
MAX_CHUNK = 2000
DEFAULT_CHUNK = 500
MAX_PILOTS = 10_000
_FINAL = sorted(s.value for s in FINAL)
_ENDED_PILOTS = sorted(s.value for s in PilotState if s.final)


@op(ADMIN, args=("before", "after", "limit", "prune", "ids", "output"))
def gc(srv: JobServer, args: dict, now: float) -> dict:
    """Final jobs (and, on the first chunk, ended pilots) whose last change is before
    ``before``, after job id ``after``, at most ``limit``; with ``prune``, delete those jobs'
    event rows but each one's last (how it ended), in this turn's transaction.

    Args: before (epoch seconds, required), after (job id, default 0), limit (1..2000,
    default 500), prune (bool, default false), output (bool, default false: remove those jobs'
    stored output, which `job log` shows, as their workdirs go). Returns {"jobs": [[id, workdir, state], ...],
    "next": the id to pass as ``after`` for the next chunk or None, "outputs": stored output
    rows removed (or, without output, that would be), "events": rows pruned
    (or, without prune, that would be), "pilots": [[id, state], ...] on the first chunk}.

    With ``ids`` (at most 2000 job ids) it only answers {"final": [...]}: those of the ids that
    are still final and older than ``before``. The CLI asks just before it removes workdirs, so
    a job retried since its chunk was selected keeps its workdir.
    """
    before = _arg(args, "before", (int, float), required=True)
    if not math.isfinite(before):
        raise ValidationError("argument 'before' must be a time (epoch seconds)")
    before = min(before, now)  # nothing changes state in the future
    if "ids" in args:
        ids = args["ids"]
        if not isinstance(ids, list) or len(ids) > MAX_CHUNK or not all(
                type(i) is int and 0 < i <= 2**63 - 1 for i in ids):
            raise ValidationError(f"argument 'ids' must be a list of at most {MAX_CHUNK} job "
                                  "ids")
        srv.sync()
        return {"final": [r.id for r in srv.conn.execute(
            select(jobs.c.id).where(jobs.c.id.in_(ids), jobs.c.state.in_(_FINAL),
                                    jobs.c.state_time < before).order_by(jobs.c.id))]}
    after = _arg(args, "after", int, 0)
    limit = _arg(args, "limit", int, DEFAULT_CHUNK)
    if not 1 <= limit <= MAX_CHUNK:
        raise ValidationError(f"argument 'limit' must be 1..{MAX_CHUNK}")
    prune = _arg(args, "prune", bool, False)
    output = _arg(args, "output", bool, False)
    srv.sync()  # state changes batched this turn are visible to the selection
    rows = list(srv.conn.execute(
        select(jobs.c.id, jobs.c.workdir, jobs.c.state)
        .where(jobs.c.id > after, jobs.c.state.in_(_FINAL), jobs.c.state_time < before)
        .order_by(jobs.c.id).limit(limit)))
    ids = [r.id for r in rows]
    events = 0
    if ids:
        last = select(func.max(job_events.c.id)).where(
            job_events.c.job_id.in_(ids)).group_by(job_events.c.job_id)
        old = (job_events.c.job_id.in_(ids), job_events.c.id.not_in(last))
        if prune:
            # the event stream refuses cursors older than the newest row pruned (no gap
            # passes unseen): find it before the rows go
            top = srv.conn.execute(select(func.max(job_events.c.id)).where(*old)).scalar()
            events = srv.conn.execute(delete(job_events).where(*old)).rowcount or 0
            if top is not None:
                set_pruned(srv, top)
        else:
            events = srv.conn.execute(select(func.count()).select_from(job_events)
                                      .where(*old)).scalar_one()
    outputs = 0
    if ids and output:
        outputs = srv.output.remove(srv.conn, ids)
    elif ids:
        outputs = srv.conn.execute(select(func.count()).select_from(job_output)
                                   .where(job_output.c.job_id.in_(ids))).scalar_one()
    out = {"jobs": [[r.id, r.workdir, r.state] for r in rows],
           "next": ids[-1] if len(ids) == limit else None, "events": events,
           "outputs": outputs}
    if after == 0:
        out["pilots"] = [[r.id, r.state] for r in srv.conn.execute(
            select(pilots_t.c.id, pilots_t.c.state)
            .where(pilots_t.c.state.in_(_ENDED_PILOTS), pilots_t.c.state_time < before)
            .order_by(pilots_t.c.state_time).limit(MAX_PILOTS))]
    return out
