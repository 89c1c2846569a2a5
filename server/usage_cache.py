"""The usage of closed days, kept (schema 15): a report over months reads a row per day and
(site, app, group) instead of every job that ran.

A UTC day is *closed* once it ended ``SETTLE`` ago: an attempt's end is the agent's clock,
reported with its next update, and a lease unheard of for its timeout is dropped, so no new
attempt end lands in it after that. The usage query (``usage_days``) sums a closed day the
first time a range covers it — the jobs whose latest attempt ended that day (the (ended, id)
index) and the earlier attempts that ended that day — into ``usage_sums``, at the finest
grain (day, site, app, group), so every grouping of a report is a sum of those rows.

What can still change about a closed day, and how it stays exact:

- a job then not in a final state (RESTART_READY waiting for another try, POSTPROCESSED
  waiting for a site stager): its latest attempt counts as a job only once it is final, and
  its row's attempt moves to ``job_attempts`` when it is leased again. Such jobs are left out
  of the sums and their ids kept (``usage_days.pending``); each query sums them from their
  rows, as before. A day with more than ``MAX_PENDING`` of them is summed at each query
  (``pending`` null) and tried again an hour later.
- a user's kill, retry, alter or rm of jobs: :func:`forget_jobs` (server/ops.py) drops the
  days their attempts ended on, which are summed again when next asked for. ``gc`` removes no
  job row and no attempt (events and stored output only): it changes no usage.

Nothing here runs on the job server's dispatch or task-update path: the cache is written by
the usage request and cleared by the user's change requests.
"""
from __future__ import annotations

import json
import math

from sqlalchemy import (BigInteger, Float, and_, case, cast, delete, func, literal, or_, select)

from . import states
from .core import JobServer
from .db import agents as agents_t
from .db import job_attempts as att_t
from .db import jobs, usage_days, usage_sums

DAY = 86400.0
#: A day is closed (its sums kept) this long after its end (UTC midnight).
SETTLE = 2 * 3600.0
#: Jobs not final at summing time a day keeps the ids of, at most (more: summed each time).
MAX_PENDING = 1000
#: Job rows one request sums into the cache, at most (but at least one day's).
BUILD_ROWS = 50_000
#: Days ahead whose sizes a request looks at to fill BUILD_ROWS.
LOOK_DAYS = 4
#: A day with too many jobs not final is tried again this long after.
RETRY_LIVE = 3600.0
FINAL = tuple(s.value for s in states.FINAL)
CORES = jobs.c.num_nodes * jobs.c.processes_per_node * jobs.c.cpus_per_process
#: The grain of the cache: usage_sums' key columns, in this order.
GRAIN = ("site", "app", "group")
Key = tuple  # (day, site, app_id, group)


def closed_span(since: float, until: float, now: float) -> tuple[int, int] | None:
    """The whole closed days in [since, until): days [c0, c1), or None."""
    c0 = math.ceil(since / DAY)
    c1 = min(math.floor(until / DAY), math.floor((now - SETTLE) / DAY))
    return (c0, c1) if c1 > c0 else None


def _floor(srv: JobServer, x):
    if srv.engine.dialect.name == "sqlite":
        return cast(x, BigInteger)
    return cast(func.floor(x), BigInteger)


def _t(x: float):
    # written into the SQL: a prepared PostgreSQL statement's generic plan of "ended >= $1"
    # cannot see the range is narrow (see usage_ops._first)
    return literal(x, Float, literal_execute=True)


def _add(out: dict, key: Key, vals: list) -> None:
    acc = out.setdefault(key, [0, 0, 0, 0.0])
    for i, v in enumerate(vals):
        acc[i] += v or 0


def latest_sums(srv: JobServer, d0: int, d1: int, conds: list, split: bool,
                out: dict[Key, list]) -> dict[int, list[int]]:
    """Add the latest attempts (the jobs' rows) that ended in days [d0, d1) to ``out`` at the
    cache's grain, by the same rules as usage_ops.usage. ``split``: only those of final jobs;
    the others' ids are returned by day (the day's pending), in the same pass (each is a group
    of its own: ``id`` in the GROUP BY for them, NULL for the final ones)."""
    ended, started = jobs.c.ended, jobs.c.started
    day = _floor(srv, ended / DAY)
    site = func.coalesce(agents_t.c.site, jobs.c.site)
    secs = func.sum(func.coalesce((ended - started) * cast(CORES, Float), 0.0))
    final = jobs.c.state.in_(FINAL)
    keys = [day, site, jobs.c.app_id, jobs.c.group_identifier]
    if split:
        keys.append(case((final, None), else_=jobs.c.id))
    pending: dict[int, list[int]] = {}
    for r in srv.conn.execute(
            select(*keys, func.sum(case((final, 1), else_=0)),
                   func.sum(case((jobs.c.state == "JOB_FINISHED", 1), else_=0)),
                   func.sum(case((jobs.c.run_agent.is_not(None), 1), else_=0)), secs)
            .select_from(jobs.outerjoin(agents_t, agents_t.c.id == jobs.c.run_agent))
            .where(ended >= _t(d0 * DAY), ended < _t(d1 * DAY), *conds).group_by(*keys)):
        if split and r[4] is not None:
            pending.setdefault(int(r[0]), []).append(r[4])
            continue
        _add(out, (int(r[0]), r[1], r[2], r[3]), list(r[len(keys):]))
    return pending


def earlier_sums(srv: JobServer, d0: int, d1: int, conds: list, out: dict[Key, list]) -> None:
    """Add the earlier attempts (job_attempts) that ended in days [d0, d1) to ``out``."""
    ended, started = att_t.c.ended, att_t.c.started
    day = _floor(srv, ended / DAY)
    site = func.coalesce(agents_t.c.site, jobs.c.site)
    secs = func.sum(func.coalesce((ended - started) * cast(CORES, Float), 0.0))
    for r in srv.conn.execute(
            select(day, site, jobs.c.app_id, jobs.c.group_identifier, func.count(), secs)
            .select_from(att_t.join(jobs, jobs.c.id == att_t.c.job_id)
                         .outerjoin(agents_t, agents_t.c.id == att_t.c.agent))
            .where(ended >= _t(d0 * DAY), ended < _t(d1 * DAY), *conds)
            .group_by(day, site, jobs.c.app_id, jobs.c.group_identifier)):
        _add(out, (int(r[0]), r[1], r[2], r[3]), [0, 0] + list(r[4:]))


def grain_sums(srv: JobServer, d0: int, d1: int, job_conds: list,
               att_conds: list) -> dict[Key, list]:
    """Usage of days [d0, d1) at the cache's grain: {(day, site, app_id, group): [jobs,
    finished, attempts, core_seconds]}."""
    out: dict[Key, list] = {}
    latest_sums(srv, d0, d1, job_conds, False, out)
    earlier_sums(srv, d0, d1, att_conds, out)
    return out


def _of_pending(srv: JobServer, pending: dict[int, list[int]], col_id, col_ended):
    """The rows of each day's pending jobs that ended that day."""
    day = _floor(srv, col_ended / DAY)
    return or_(*[and_(day == d, col_id.in_(ids)) for d, ids in pending.items() if ids])


def pending_sums(srv: JobServer, pending: dict[int, list[int]]) -> dict[Key, list]:
    """The live usage of the days' pending jobs (each on its own day only)."""
    pending = {d: ids for d, ids in pending.items() if ids}
    if not pending:
        return {}
    d0, d1 = min(pending), max(pending) + 1
    return grain_sums(srv, d0, d1, [_of_pending(srv, pending, jobs.c.id, jobs.c.ended)],
                      [_of_pending(srv, pending, att_t.c.job_id, att_t.c.ended)])


def build(srv: JobServer, days: list[int], now: float) -> None:
    """Sum ``days`` (consecutive, not cached) into the cache."""
    d0, d1 = days[0], days[-1] + 1
    sums: dict[Key, list] = {}
    pending = latest_sums(srv, d0, d1, [], True, sums)
    live = {d for d, ids in pending.items() if len(ids) > MAX_PENDING}
    keep = {d: pending.get(d, []) for d in days if d not in live}
    att_conds = []
    if any(keep.values()):
        att_conds.append(~_of_pending(srv, keep, att_t.c.job_id, att_t.c.ended))
    earlier_sums(srv, d0, d1, att_conds, sums)
    rows = [{"day": k[0], "site": k[1], "app_id": k[2], "group_identifier": k[3],
             "jobs": v[0], "finished": v[1], "attempts": v[2], "core_seconds": v[3]}
            for k, v in sums.items() if k[0] not in live]
    srv.conn.execute(delete(usage_sums).where(usage_sums.c.day >= d0, usage_sums.c.day < d1))
    srv.conn.execute(delete(usage_days).where(usage_days.c.day >= d0, usage_days.c.day < d1))
    if rows:
        srv.conn.execute(usage_sums.insert(), rows)
    srv.conn.execute(usage_days.insert(), [
        {"day": d, "built": now, "pending": "null" if d in live else json.dumps(keep[d])}
        for d in days])


def missing(srv: JobServer, c0: int, c1: int, now: float) -> list[int]:
    """The days of [c0, c1) not in the cache (or summed at each query for an hour now)."""
    have = {r.day for r in srv.conn.execute(
        select(usage_days.c.day).where(usage_days.c.day >= c0, usage_days.c.day < c1,
                                       or_(usage_days.c.pending != "null",
                                           usage_days.c.built > now - RETRY_LIVE)))}
    return [d for d in range(c0, c1) if d not in have]


def build_some(srv: JobServer, todo: list[int], now: float) -> None:
    """Sum the first of ``todo``'s days (ascending) that fit in BUILD_ROWS job rows (one day
    at least; sizes from the (ended, id) index, of the next LOOK_DAYS days: counting further
    read a million index entries per request), in runs of consecutive days."""
    day = _floor(srv, jobs.c.ended / DAY)
    head = [d for d in todo if d < todo[0] + LOOK_DAYS]
    sizes = dict(srv.conn.execute(select(day, func.count()).where(
        jobs.c.ended >= _t(head[0] * DAY), jobs.c.ended < _t((head[-1] + 1) * DAY))
        .group_by(day)).all())
    chosen, rows = [], 0
    for d in head:
        n = sizes.get(d, 0)
        if chosen and rows + n > BUILD_ROWS:
            break
        chosen.append(d)
        rows += n
    run = [chosen[0]]
    for d in chosen[1:]:
        if d != run[-1] + 1:
            build(srv, run, now)
            run = []
        run.append(d)
    build(srv, run, now)


def cached(srv: JobServer, c0: int, c1: int, by_cols: list[str]) -> tuple[list, dict]:
    """Rows of the cache over [c0, c1) grouped by ``by_cols`` (of day, site, app, group):
    [[key..., jobs, finished, attempts, core_seconds]], and the pending ids of those days
    (live days: None)."""
    col = {"day": usage_sums.c.day, "site": usage_sums.c.site, "app": usage_sums.c.app_id,
           "group": usage_sums.c.group_identifier}
    cols = [col[k] for k in by_cols]
    q = select(*cols, func.sum(usage_sums.c.jobs), func.sum(usage_sums.c.finished),
               func.sum(usage_sums.c.attempts), func.sum(usage_sums.c.core_seconds)).where(
        usage_sums.c.day >= c0, usage_sums.c.day < c1)
    if cols:
        q = q.group_by(*cols)
    rows = [list(r) for r in srv.conn.execute(q)]
    pending = {r.day: json.loads(r.pending) for r in srv.conn.execute(
        select(usage_days.c.day, usage_days.c.pending).where(
            usage_days.c.day >= c0, usage_days.c.day < c1, usage_days.c.pending != "[]"))}
    return rows, pending


def forget_days(srv: JobServer, days: set[int]) -> None:
    days = sorted(days)
    for i in range(0, len(days), 900):
        part = days[i:i + 900]
        srv.conn.execute(delete(usage_sums).where(usage_sums.c.day.in_(part)))
        srv.conn.execute(delete(usage_days).where(usage_days.c.day.in_(part)))


def forget_jobs(srv: JobServer, ids: list[int]) -> None:
    """Drop the cached days these jobs' attempts ended on (before a user's change to them:
    their kill, retry, alter or removal may change those days' usage)."""
    if not ids or srv.conn.execute(select(usage_days.c.day).limit(1)).first() is None:
        return
    days: set[int] = set()
    for i in range(0, len(ids), 900):
        part = ids[i:i + 900]
        for col_id, col_ended in ((jobs.c.id, jobs.c.ended), (att_t.c.job_id, att_t.c.ended)):
            days.update(int(r[0]) for r in srv.conn.execute(
                select(_floor(srv, col_ended / DAY)).where(col_id.in_(part),
                                                           col_ended.is_not(None)).distinct()))
    if days:
        forget_days(srv, days)
