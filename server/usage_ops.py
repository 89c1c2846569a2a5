"""Utilization and usage: the read ops behind ``pilotfish plot``/``report`` and the web pages.

Both read the **attempt records** — the latest attempt in the job's row (``started``,
``ended``, ``run_agent``), earlier ones in ``job_attempts`` — not the ``job_events`` rows:
``gc`` prunes events down to each job's last, while every attempt keeps its start and end. A
job's cores are what the queue counts: ``num_nodes × processes_per_node × cpus_per_process``.
Where an attempt ran is its agent's site and pilot (agents row; ``job_attempts.pilot`` for
earlier attempts), else the site the job asked for.

Bounded work per request: the server's loop answers everyone, so a request reads one chunk
of at most ``CHUNK`` jobs (by id, on the primary key) and their earlier attempts, and returns
partial sums with the cursor to ask from next (``after``); the client adds the chunks up
(``pilotfish.usage``). A chunk is a range of the primary key; the first starts at the first
job that can have run in the range (:func:`_first`, on the (ended, id) index of schema 13), so
a recent window does not scan a million old jobs. Time ranges
are capped, and utilization is binned to at most ``MAX_BINS`` steps, so no reply and no
client's sum grows with the number of jobs.
"""
from __future__ import annotations

import math

from sqlalchemy import BigInteger, Float, case, cast, func, literal, or_, select

from pilotfish.errors import NotFound, ValidationError
from pilotfish.keys import READER
from pilotfish.validate import echo

from . import states, usage_cache
from .core import JobServer
from .db import agents as agents_t
from .db import job_attempts as att_t
from .db import jobs
from .db import pilots as pilots_t
from .db import sites as sites_t
from .ops import _arg, op

#: Jobs read per request: a few tens of ms of SQLite at most (bench/usage_queries.py).
CHUNK = 5_000
DAY = 86400.0
#: How far back the server's clock may have been set while it made jobs (see _cursor).
CLOCK_SLACK = 3600.0
#: The longest utilization range and the most steps it is cut into.
MAX_UTIL_DAYS = 400
MAX_BINS = 100_000
DEFAULT_BINS = 20_000
#: The longest usage range (years of monthly reports) and the most groups one reply carries.
MAX_USAGE_DAYS = 20 * 366
#: Agents read for the allocated cores, at most (the rest is reported as cut off).
MAX_AGENTS = 50_000
BY_KEYS = ("site", "app", "group")
PERIODS = ("day", "month")
FINAL = tuple(s.value for s in states.FINAL)

CORES = jobs.c.num_nodes * jobs.c.processes_per_node * jobs.c.cpus_per_process


def _time(args: dict, key: str, default: float) -> float:
    v = _arg(args, key, (int, float), default)
    if not math.isfinite(v) or not 0 <= v <= 253402300799:
        raise ValidationError(f"{key} must be epoch seconds between 1970 and 9999, "
                              f"got {echo(v)}")
    return float(v)


def time_range(args: dict, now: float, default_days: float, max_days: int) -> tuple[float, float]:
    """(since, until) of a request: until defaults to now, since to ``default_days`` before;
    since must be before until and the range at most ``max_days``."""
    until = _time(args, "until", now)
    since = _time(args, "since", max(0.0, until - default_days * DAY))
    if since >= until:
        raise ValidationError(f"since ({since:.0f}) must be before until ({until:.0f})")
    if until - since > max_days * DAY:
        raise ValidationError(f"the range is {(until - since) / DAY:.0f} days; at most "
                              f"{max_days} days may be asked at once (narrow --since/--until)")
    return since, until


def _first(srv: JobServer, since: float) -> int:
    """The id before the first job that can have an attempt ending at or after ``since`` (or
    not ended): where a scan of the range may start. A job's earlier attempts ended before
    its latest was leased, and its row's ``ended`` is cleared when it is leased again and
    written whenever an attempt ends (a state change, a lost or handed-back lease, a kill),
    so such a job has ``ended >= since`` (the (ended, id) index, a range of recent ends) or
    ``ended`` null; of the latter only those not in a final state can hold a running attempt:
    a READY one only while leased (a lease lost or handed back ends the attempt and makes
    the job RESTART_READY), so the leases in memory, and a probe of the (state, id) index per
    other state. Old jobs queued and never run do not hold the scan back."""
    # a wide range: often one of the oldest jobs is in it (a look at the first 500 ids); else
    # the ended index's range [since, ...) (min(id + 0): not SQLite's walk of the primary key
    # in id order, which for a recent range reads nearly every row before the first match)
    # Values are written into the SQL (literal_execute): PostgreSQL's driver prepares a
    # statement run five times, and a generic plan of "state = $1" or "ended >= $1" cannot
    # see that the value is rare and walks the primary key (seconds on a million jobs)
    since_ = literal(since, Float, literal_execute=True)
    low = srv.conn.execute(select(func.min(jobs.c.id))).scalar() or 0
    first = srv.conn.execute(select(func.min(jobs.c.id)).where(
        jobs.c.id <= low + 500, jobs.c.ended >= since_)).scalar()
    if first is None:
        first = srv.conn.execute(select(func.min(jobs.c.id + 0))
                                 .where(jobs.c.ended >= since_)).scalar()
    firsts = [first, min(srv.leases, default=None)]  # leased now (READY until the agent says)
    for st in states.ALL - states.FINAL - {states.S.READY}:
        firsts.append(srv.conn.execute(  # (ORDER BY the (state, id) index's own order)
            select(jobs.c.id).where(jobs.c.state == literal(st.value, literal_execute=True))
            .order_by(jobs.c.state, jobs.c.id).limit(1)).scalar())
    firsts = [f for f in firsts if f is not None]
    return min(firsts) - 1 if firsts else srv.conn.execute(
        select(func.coalesce(func.max(jobs.c.id), 0))).scalar()


def _cursor(srv: JobServer, args: dict, until: float,
            since: float) -> tuple[int, int | None, int | None]:
    """(after, last, next): this request reads the jobs with after < id <= last (None: to the
    end) and the next one goes on after ``next`` (None: done). ``chunk``: fewer ids than
    ``CHUNK`` per request (tests; a server to spare further).

    The server gives ids in the order it creates jobs, and no attempt starts before its job
    exists: once the next job was created after ``until`` (an hour's slack for a clock set
    back), no later job ran in the range, and an old range does not scan the newer jobs. The
    first request (after 0) starts at :func:`_first` unless ``scan_all`` (the path before
    schema 13: every job from the first; benchmarks and tests compare the two)."""
    after = _arg(args, "after", int, 0)
    if after == 0 and not _arg(args, "scan_all", bool, False):
        after = _first(srv, since)
    chunk = _arg(args, "chunk", int, CHUNK)
    if not 1 <= chunk <= CHUNK:
        raise ValidationError(f"chunk must be 1..{CHUNK} jobs")
    # a chunk is a range of ``chunk`` ids (fewer jobs where some were removed): counting
    # ``chunk`` rows off the primary key instead (OFFSET) walked every row's page, a third
    # of a request's time
    last = after + chunk
    if last >= srv.next_id - 1:
        return after, None, None
    created = srv.conn.execute(select(jobs.c.created).where(jobs.c.id > last)
                               .order_by(jobs.c.id).limit(1)).scalar()
    return after, last, None if created is None or created > until + CLOCK_SLACK else last


def _in_chunk(col, after: int, last: int | None) -> list:
    return [col > after] + ([col <= last] if last is not None else [])


def _check_where(srv: JobServer, site: str | None, pilot: str | None) -> None:
    """A site or pilot nobody ever heard of is a typo: say so rather than plot nothing."""
    for value, what in ((site, "site"), (pilot, "pilot")):
        if value is not None and (not isinstance(value, str) or not value or "\x00" in value
                                  or len(value) > 128):
            raise ValidationError(f"{what} must be a name of 1..128 characters")
    if pilot is not None and srv.conn.execute(select(pilots_t.c.id).where(
            pilots_t.c.id == pilot)).first() is None and srv.conn.execute(
            select(agents_t.c.id).where(agents_t.c.pilot == pilot).limit(1)).first() is None:
        raise NotFound(f"no pilot {echo(pilot)}: no pilot record and no agent of it")
    if site is not None and srv.conn.execute(select(sites_t.c.name).where(
            sites_t.c.name == site)).first() is None and srv.conn.execute(
            select(agents_t.c.id).where(agents_t.c.site == site).limit(1)).first() is None \
            and srv.conn.execute(select(pilots_t.c.id).where(pilots_t.c.site == site)
                                 .limit(1)).first() is None:
        raise NotFound(f"no site {echo(site)}: no site agent, pilot or agent of it")


def _floor(srv: JobServer, x):
    """floor(x) for x >= 0 as an integer, in SQL (SQLite's cast truncates, PostgreSQL's
    rounds)."""
    if srv.engine.dialect.name == "sqlite":
        return cast(x, BigInteger)
    return cast(func.floor(x), BigInteger)


def _busy(srv: JobServer, src, start, end, conds: list, since: float, until: float,
          end_now: float, step: float, deltas: dict[int, int]) -> tuple[float, int]:
    """Add one source's attempts (``start``/``end`` columns; end null: running now) to the
    step changes, in SQL: a GROUP BY per step, so the loop's Python work is per step, not
    per job. Returns (core-seconds, attempts) of the source, clipped to [since, until]."""
    s = case((start < since, since), else_=start)
    e = case((end.is_(None), end_now), (end > until, until), else_=end)
    conds = conds + [e > s]
    secs, n = 0.0, 0
    k = _floor(srv, (s - since) / step + 0.5)  # the nearest step
    for kk, cores, busy, count in srv.conn.execute(
            select(k, func.sum(CORES), func.sum((e - s) * cast(CORES, Float)), func.count())
            .select_from(src).where(*conds).group_by(k)):
        deltas[kk] = deltas.get(kk, 0) + cores
        secs += busy
        n += count
    k = _floor(srv, (e - since) / step + 0.5)
    for kk, cores in srv.conn.execute(select(k, func.sum(CORES)).select_from(src)
                                      .where(*conds).group_by(k)):
        deltas[kk] = deltas.get(kk, 0) - cores
    return secs, n


@op(READER, args=("site", "pilot", "since", "until", "step", "after", "chunk", "scan_all"))
def utilization(srv: JobServer, args: dict, now: float) -> dict:
    """Busy cores against time, one chunk of jobs per request: ``deltas`` [[bin, change]]
    (time = since + bin × step, each attempt's start and end at its nearest step; a start
    adds the job's cores, an end takes them away), ``core_seconds`` (exact, clipped to the
    range), ``attempts``; on the first request (after = 0) also ``allocated``: the same for
    the cores of the agents alive in the range. ``after``: the cursor to ask from next,
    None when done."""
    site, pilot = args.get("site"), args.get("pilot")
    since, until = time_range(args, now, 1, MAX_UTIL_DAYS)
    step = _arg(args, "step", (int, float), (until - since) / DEFAULT_BINS)
    if not math.isfinite(step) or step <= 0 or (until - since) / step > MAX_BINS:
        raise ValidationError(f"step must be a positive number of seconds with at most "
                              f"{MAX_BINS} steps in the range")
    step = float(step)
    srv.sync()
    _check_where(srv, site, pilot)
    first = _arg(args, "after", int, 0) == 0
    after, last, nxt = _cursor(srv, args, until, since)
    end_now = min(now, until)
    deltas: dict[int, int] = {}
    # the latest attempts, in the jobs' rows (ended null: it runs now)
    src = jobs
    conds = _in_chunk(jobs.c.id, after, last) + [
        jobs.c.started.is_not(None), jobs.c.started < until,
        or_(jobs.c.ended.is_(None), jobs.c.ended > since)]
    if site is not None or pilot is not None:
        src = jobs.outerjoin(agents_t, agents_t.c.id == jobs.c.run_agent)
        if site is not None:
            conds.append(func.coalesce(agents_t.c.site, jobs.c.site) == site)
        if pilot is not None:
            conds.append(agents_t.c.pilot == pilot)
    busy, n = _busy(srv, src, jobs.c.started, jobs.c.ended, conds, since, until, end_now,
                    step, deltas)
    # earlier attempts (ended: they were moved here when the job was leased again)
    src = att_t.join(jobs, jobs.c.id == att_t.c.job_id)
    conds = _in_chunk(att_t.c.job_id, after, last) + [
        att_t.c.started.is_not(None), att_t.c.started < until,
        att_t.c.ended.is_not(None), att_t.c.ended > since]
    if site is not None:
        src = src.outerjoin(agents_t, agents_t.c.id == att_t.c.agent)
        conds.append(func.coalesce(agents_t.c.site, jobs.c.site) == site)
    if pilot is not None:
        conds.append(att_t.c.pilot == pilot)
    b, m = _busy(srv, src, att_t.c.started, att_t.c.ended, conds, since, until, end_now,
                 step, deltas)
    busy, n = busy + b, n + m
    out = {"since": since, "until": until, "step": step, "now": now,
           "deltas": sorted([k, d] for k, d in deltas.items() if d),
           "core_seconds": busy, "attempts": n, "after": nxt}
    if first:
        out.update(_allocated(srv, site, pilot, since, until, step, now))
    return out


def _allocated(srv: JobServer, site: str | None, pilot: str | None, since: float,
               until: float, step: float, now: float) -> dict:
    """The cores of the agents alive in the range (from their rows: started to last seen, or
    to now while alive), binned like the busy cores."""
    a = agents_t
    conds = [a.c.started < until, or_(a.c.state == "ALIVE", a.c.last_seen > since)]
    if site is not None:
        conds.append(a.c.site == site)
    if pilot is not None:
        conds.append(a.c.pilot == pilot)
    rows = srv.conn.execute(select(a.c.cores, a.c.started, a.c.last_seen, a.c.state)
                            .where(*conds).limit(MAX_AGENTS + 1)).all()
    deltas: dict[int, int] = {}
    for cores, start, seen, state in rows[:MAX_AGENTS]:
        s = max(start, since)
        e = min(max(now, seen) if state == "ALIVE" else seen, until)
        if e <= s:
            continue
        k0, k1 = round((s - since) / step), round((e - since) / step)
        if k0 != k1:
            deltas[k0] = deltas.get(k0, 0) + cores
            deltas[k1] = deltas.get(k1, 0) - cores
    return {"allocated": sorted([k, d] for k, d in deltas.items() if d),
            "agents": min(len(rows), MAX_AGENTS), "agents_cut": len(rows) > MAX_AGENTS}


def parse_by(by) -> list[str]:
    """The grouping of a usage request: any of site, app, group and at most one of day,
    month, each once."""
    if not isinstance(by, list) or not all(isinstance(k, str) for k in by) or len(by) > 4:
        raise ValidationError("by must be a list of: " + ", ".join(BY_KEYS + PERIODS))
    bad = [k for k in by if k not in BY_KEYS + PERIODS]
    if bad:
        raise ValidationError(f"unknown usage key {echo(bad[0])}; expected any of "
                              f"{', '.join(BY_KEYS + PERIODS)} (e.g. site,day)")
    if len(set(by)) != len(by):
        raise ValidationError("a usage key is named twice")
    if "day" in by and "month" in by:
        raise ValidationError("usage is per day or per month, not both")
    return by


def _day(srv: JobServer, col):
    """Days since 1970 (UTC) of an epoch-seconds column (non-negative)."""
    return _floor(srv, col / DAY)


@op(READER, args=("by", "since", "until", "after", "chunk", "scan_all"))
def usage(srv: JobServer, args: dict, now: float) -> dict:
    """Jobs and core-seconds grouped by ``by`` (site, app, group; day: its UTC day number
    since 1970 — a month is made of days by the client) for one chunk of jobs: ``rows``
    [[key..., jobs, finished, attempts, core_seconds]]. An attempt counts where and when it
    ended (in [since, until)); ``jobs``: jobs whose latest attempt ended there in a final
    state (``finished``: JOB_FINISHED). ``after``: the cursor to ask from next, or None."""
    by = parse_by(_arg(args, "by", list, []))
    since, until = time_range(args, now, 30, MAX_USAGE_DAYS)
    srv.sync()
    after, last, nxt = _cursor(srv, args, until, since)
    keys = [k if k != "month" else "day" for k in by]
    sums: dict[tuple, list] = {}

    def run(src, id_col, ended, started, run_agent_site, latest: bool) -> None:
        cols = []
        for k in keys:
            cols.append({"site": run_agent_site, "app": jobs.c.app_id,
                         "group": jobs.c.group_identifier, "day": _day(srv, ended)}[k])
        secs = func.sum(func.coalesce((ended - started) * cast(CORES, Float), 0.0))
        if latest:
            measures = [func.sum(case((jobs.c.state.in_(FINAL), 1), else_=0)),
                        func.sum(case((jobs.c.state == "JOB_FINISHED", 1), else_=0)),
                        func.sum(case((jobs.c.run_agent.is_not(None), 1), else_=0)), secs]
        else:
            measures = [func.count(), secs]
        q = select(*cols, *measures).select_from(src).where(
            *_in_chunk(id_col, after, last), ended.is_not(None), ended >= since, ended < until)
        if cols:
            q = q.group_by(*cols)
        for r in srv.conn.execute(q):
            key = tuple(r[:len(cols)])
            vals = list(r[len(cols):])
            if not latest:
                vals = [0, 0] + vals
            acc = sums.setdefault(key, [0, 0, 0, 0.0])
            for i, v in enumerate(vals):
                acc[i] += v or 0

    need_site = "site" in by
    src = jobs.outerjoin(agents_t, agents_t.c.id == jobs.c.run_agent) if need_site else jobs
    run(src, jobs.c.id, jobs.c.ended, jobs.c.started,
        func.coalesce(agents_t.c.site, jobs.c.site), True)
    src = att_t.join(jobs, jobs.c.id == att_t.c.job_id)
    if need_site:
        src = src.outerjoin(agents_t, agents_t.c.id == att_t.c.agent)
    run(src, att_t.c.job_id, att_t.c.ended, att_t.c.started,
        func.coalesce(agents_t.c.site, jobs.c.site), False)
    rows = []
    for key, vals in sums.items():
        key = list(key)
        if "app" in keys:  # names, not ids: the registry is in memory
            i = keys.index("app")
            app = srv.apps.get(key[i])
            key[i] = app.name if app else f"#{key[i]}"
        rows.append(key + vals)
    return {"by": by, "since": since, "until": until, "rows": rows, "after": nxt}


@op(READER, args=("by", "since", "until"))
def usage_days(srv: JobServer, args: dict, now: float) -> dict:
    """The usage of the closed whole days in [since, until) from the cache (see
    :mod:`.usage_cache`): ``span`` [c0, c1] (days c0 <= day < c1) or None when the range
    holds no closed whole day, and ``rows`` as :func:`usage`'s. ``more``: days had to be
    summed first (a bounded number per request): ask again. The rest of the range (its
    partial first and last days, the days not closed yet) is :func:`usage`'s, asked with
    the range cut to it (pilotfish.Client.usage does both)."""
    by = parse_by(_arg(args, "by", list, []))
    since, until = time_range(args, now, 30, MAX_USAGE_DAYS)
    out = {"by": by, "since": since, "until": until, "span": None, "rows": [], "more": False}
    span = usage_cache.closed_span(since, until, now)
    if span is None:
        return out
    srv.sync()
    c0, c1 = span
    todo = usage_cache.missing(srv, c0, c1, now)
    if todo:
        usage_cache.build_some(srv, todo, now)
        out["more"] = True
        return out
    keys = [k if k != "month" else "day" for k in by]
    rows, pending = usage_cache.cached(srv, c0, c1, keys)
    live: dict[tuple, list] = {}
    for d in [d for d, ids in pending.items() if ids is None]:  # too unsettled to keep
        live.update(usage_cache.grain_sums(srv, d, d + 1, [], []))
    for k, v in usage_cache.pending_sums(
            srv, {d: ids for d, ids in pending.items() if ids}).items():
        acc = live.setdefault(k, [0, 0, 0, 0.0])
        for i, x in enumerate(v):
            acc[i] += x
    at = {"day": 0, "site": 1, "app": 2, "group": 3}
    for k, v in live.items():
        rows.append([k[at[c]] for c in keys] + v)
    for r in rows:
        if "app" in keys:  # names, not ids: the registry is in memory
            i = keys.index("app")
            app = srv.apps.get(r[i])
            r[i] = app.name if app else f"#{r[i]}"
    out.update(span=[c0, c1], rows=rows)
    return out
