"""Updates an agent sends again after a server restart, for attempts the server had already
recorded before it went down.

An agent keeps an update until the server acknowledges it; a server killed (or stopped) between
committing an attempt's end and sending the acknowledgement gets that update again from the
restarted agent connection. Its lease is gone -- the attempt ended -- so the update path would
refuse it, and the agent would warn "server refused an update ... (lease gone)" for a job that
finished correctly. Such an update is no news: answer it as applied (acknowledged, not refused)
when the stored job shows that very attempt already ended the way the update says. Anything else
stays refused (another attempt since, a user's kill, another end)."""
from __future__ import annotations

from sqlalchemy import select

from .db import jobs
from .states import FAILURES, State, after_failure
from .store import chunks

_AFTER_FAILURE = {after_failure(0, 1), after_failure(1, 1)}  # RESTART_READY, FAILED


def still_refused(conn, items: list[dict], refused: list[dict]) -> list[dict]:
    """Of ``refused`` (job, attempt) pairs, those that are genuinely stale. An update counts as
    already applied only if it ends its attempt and the stored job shows that attempt ended
    (no agent holds it, same attempt number) in a state this end leads to, at the very end time
    the agent reported (the server stores the agent's own timestamp): a lease the server took
    back (agent lost, job killed) or an attempt ended otherwise never matches."""
    if not refused:
        return refused
    wanted = {(r["job"], r["attempt"]) for r in refused}
    rows = {}
    for part in chunks(sorted({j for j, _ in wanted}), 900):
        for row in conn.execute(select(jobs.c.id, jobs.c.state, jobs.c.attempts, jobs.c.agent,
                                       jobs.c.ended).where(jobs.c.id.in_(part))):
            rows[row.id] = row
    # a pair is answered as applied when the message carries its matching final update; its
    # earlier progress reports in the same message (several unacknowledged batches resent as
    # one) go with it
    applied = {(it["job"], it["attempt"]) for it in items
               if (it["job"], it["attempt"]) in wanted and _applied(it, rows.get(it["job"]))}
    return [r for r in refused if (r["job"], r["attempt"]) not in applied]


def _applied(it: dict | None, row) -> bool:
    if it is None or row is None or it.get("end") is None:
        return False
    states = it.get("states") or []
    try:
        last = State(states[-1]) if states else None
    except (ValueError, TypeError):
        return False
    if last is State.JOB_FINISHED:
        ends = {State.JOB_FINISHED.value}
    elif last in FAILURES:
        ends = {s.value for s in _AFTER_FAILURE}
    else:
        return False
    return (row.attempts == it["attempt"] and row.agent is None and row.state in ends
            and row.ended == it["end"])
