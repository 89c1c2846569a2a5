"""job_ls's sorted queries: ORDER BY (column, id) with a keyset cursor, on an index each.

Every sortable column has an index ending in the id (schema 13: state, name, state_time,
ended, app_id), so a page is one or two index seeks whatever its depth. By ``app`` jobs are listed by
the app's *name*: one query per app, apps in name order (the registry is in memory), each a
range of (app_id, id). By ``ended``: only jobs that have ended (NULL has no place in a keyset).
"""
from __future__ import annotations

import math
from typing import Any, Callable

from pilotfish.errors import ValidationError
from pilotfish.job_sort import parse

from .db import jobs

COLUMNS = {"state": jobs.c.state, "name": jobs.c.name, "updated": jobs.c.state_time,
           "ended": jobs.c.ended}
MAX_ID = 2**63 - 1  # (ops.MAX_ID: ops imports this module)


def _value(name: str, v: Any) -> Any:
    """A cursor value of the sort's type (it is compared in SQL, never shown)."""
    if name in ("updated", "ended"):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValidationError(f"the cursor of sort {name!r} is [time, id]")
        return float(v)
    if not isinstance(v, str) or len(v) > 128 or "\x00" in v:
        raise ValidationError(f"the cursor of sort {name!r} is [text, id]")
    return v


def cursor(sort: str, after: Any) -> tuple[Any, int] | int | None:
    name, _ = parse(sort)
    if after is None:
        return None
    if name == "id":
        if type(after) is not int or not 0 <= after <= MAX_ID:
            raise ValidationError("after must be a job id when sorting by id")
        return after
    if not isinstance(after, list) or len(after) != 2 or type(after[1]) is not int \
            or not 0 <= after[1] <= MAX_ID:
        raise ValidationError(f"after must be [value, id] when sorting by {name}")
    return _value(name, after[0]), after[1]


def by_column(run: Callable, q, sort: str, after: Any, limit: int, offset: int = 0) -> list:
    """Rows of ``q`` in a sort other than app, past the cursor: ``run(query)`` once or twice.
    Past [v, i] is the rest of v's rows (col = v, id past i) and then the rows past v: two
    seeks on the (col, id) index. (One row-value comparison (col, id) > (v, i) reads the
    same rows, but SQLite seeks on col alone and walks all of v's rows up to i.)"""
    name, desc = parse(sort)
    cur = cursor(sort, after)
    if name == "id":
        if cur is not None:
            q = q.where(jobs.c.id < cur if desc else jobs.c.id > cur)
        return run(_page(q.order_by(jobs.c.id.desc() if desc else jobs.c.id), limit, offset))
    col = COLUMNS[name]
    if name == "ended":
        q = q.where(col.is_not(None))
    order = (col.desc(), jobs.c.id.desc()) if desc else (col, jobs.c.id)
    if cur is None:
        return run(_page(q.order_by(*order), limit, offset))
    if offset:
        raise ValidationError("give after or offset, not both")
    value, i = cur
    rows = run(_page(q.where(col == value, jobs.c.id < i if desc else jobs.c.id > i)
                     .order_by(*order), limit, 0))
    if limit <= 0 or len(rows) < limit:
        rows += run(_page(q.where(col < value if desc else col > value).order_by(*order),
                          limit - len(rows) if limit > 0 else 0, 0))
    return rows


def _page(q, limit: int, offset: int):
    q = q.offset(offset) if offset else q
    return q.limit(limit) if limit > 0 else q


def by_app(run: Callable, q, apps: dict, sort: str, after: Any, limit: int) -> list:
    """Rows sorted by app name then id: ``run(query)`` per app in name order until ``limit``
    rows are found (``limit`` 0: all)."""
    _, desc = parse(sort)
    cur = cursor(sort, after)
    order = sorted(apps.values(), key=lambda a: (a.name, a.id), reverse=desc)
    rows: list = []
    for app in order:
        if cur is not None and ((app.name < cur[0]) if not desc else (app.name > cur[0])):
            continue
        qa = q.where(jobs.c.app_id == app.id)
        if cur is not None and app.name == cur[0]:
            qa = qa.where(jobs.c.id < cur[1] if desc else jobs.c.id > cur[1])
        qa = qa.order_by(jobs.c.id.desc() if desc else jobs.c.id)
        if limit > 0:
            qa = qa.limit(limit - len(rows))
        rows += run(qa)
        if limit > 0 and len(rows) >= limit:
            break
    return rows
