"""Adding up the server's chunked utilization and usage replies (pure; used by the Client).

The server answers each request from one chunk of jobs (see server/usage_ops.py); what the
chunks say adds up: busy-core changes per step, core-seconds, and per-group sums.
"""
from __future__ import annotations

import time
from datetime import datetime, timezone

from pilotfish.errors import ValidationError

#: Groups a usage report may have (site × app × group × period): more is not a report.
MAX_GROUPS = 100_000
BY_KEYS = ("site", "app", "group")
PERIODS = ("day", "month")
MEASURES = ("jobs", "finished", "attempts", "core_hours")


def parse_by(text: str | list | tuple) -> list[str]:
    """``site,day`` -> ["site", "day"], checked here too for a one-line error before asking."""
    items = [k.strip() for k in text.split(",")] if isinstance(text, str) else list(text)
    items = [k for k in items if k]
    bad = [k for k in items if k not in BY_KEYS + PERIODS]
    if bad:
        raise ValidationError(f"unknown usage key {bad[0]!r}; expected any of "
                              f"{', '.join(BY_KEYS + PERIODS)} (e.g. site,day)")
    if len(set(items)) != len(items):
        raise ValidationError("a usage key is named twice")
    if "day" in items and "month" in items:
        raise ValidationError("usage is per day or per month, not both")
    return items


def add_deltas(into: dict[int, int], deltas: list) -> None:
    for k, d in deltas:
        into[k] = into.get(k, 0) + d


def steps(deltas: dict[int, int], since: float, until: float, step: float) -> list[list]:
    """The step function of summed changes: [[time, value], ...], value holding from its
    time to the next point's; it starts at ``since`` (0 unless something starts there) and
    ends with a point at ``until``."""
    out = [[since, 0]]
    level = 0
    for k in sorted(deltas):
        if not deltas[k]:
            continue
        level += deltas[k]
        t = min(since + k * step, until)
        if t == out[-1][0]:
            out[-1][1] = level
        else:
            out.append([t, level])
    if out[-1][0] < until:
        out.append([until, level])
    return out


def integral(points: list[list]) -> float:
    """Value × seconds under a step function from :func:`steps`."""
    return sum(v * (points[i + 1][0] - t) for i, (t, v) in enumerate(points[:-1]))


def day_label(day: int) -> str:
    return datetime.fromtimestamp(day * 86400, timezone.utc).strftime("%Y-%m-%d")


def month_label(day: int) -> str:
    return datetime.fromtimestamp(day * 86400, timezone.utc).strftime("%Y-%m")


class UsageSums:
    """Per-group sums over the chunks of a usage request: rows of [key..., jobs, finished,
    attempts, core_seconds] with keys in ``by`` order (day numbers for day and month)."""

    def __init__(self, by: list[str]) -> None:
        self.by = by
        self.sums: dict[tuple, list] = {}
        self._label = ({"day": day_label, "month": month_label}.get(k) for k in by)
        self._label = list(self._label)

    def add(self, rows: list) -> None:
        n = len(self.by)
        for r in rows:
            key = tuple(f(v) if f and v is not None else v
                        for f, v in zip(self._label, r[:n]))
            acc = self.sums.get(key)
            if acc is None:
                if len(self.sums) >= MAX_GROUPS:
                    raise ValidationError(f"more than {MAX_GROUPS} groups: ask for fewer keys "
                                          "or a shorter range")
                acc = self.sums[key] = [0, 0, 0, 0.0]
            for i, v in enumerate(r[n:]):
                acc[i] += v

    def rows(self) -> list[dict]:
        """One dict per group: its keys (site, app, group: a name or None; day:
        ``YYYY-MM-DD``; month: ``YYYY-MM``, UTC) and jobs, finished, attempts, core_hours;
        sorted by period, then keys."""
        out = []
        for key, (jobs, finished, attempts, secs) in self.sums.items():
            d = dict(zip(self.by, key))
            d.update(jobs=jobs, finished=finished, attempts=attempts,
                     core_hours=secs / 3600.0)
            out.append(d)
        order = [k for k in self.by if k in PERIODS] + [k for k in self.by if k not in PERIODS]
        out.sort(key=lambda d: tuple((d[k] is not None, d[k] or "") for k in order))
        return out


def totals(rows: list[dict]) -> dict:
    return {m: sum(r[m] for r in rows) for m in MEASURES}


def utc(t: float) -> str:
    """A time for people and files: ``2026-12-06 07:12:32Z``."""
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(t))
