"""Health-aware routing of a job among the sites it names: a pure function, golden-tested.

A job (or subjob) names one site or several alternatives (``site: [mira, edison]``). Among the
remote sites it names, it goes to the healthy one with the shortest expected wait: its
``backlog`` (jobs queued there, as its last heartbeat said) over its ``capacity`` (cores or job
slots free or in use there). A site is healthy when its last heartbeat is at most
``silent_after`` seconds old and it has some capacity. Ties go to the earlier alternative (the
order the user gave is their preference).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Health:
    """What a remote site's last heartbeat said; ``last_beat`` on the server's clock (time.time)."""
    last_beat: float | None
    backlog: int
    capacity: int


def healthy(h: Health | None, now: float, silent_after: float) -> bool:
    return (h is not None and h.last_beat is not None and now - h.last_beat <= silent_after
            and h.capacity > 0)


def expected_wait(h: Health) -> float:
    """Jobs ahead per slot: 0 when the site has room now."""
    return h.backlog / h.capacity if h.capacity > 0 else float("inf")


def choose(choices: list[str], health: dict[str, Health], now: float,
           silent_after: float) -> str | None:
    """The site to send a job to, or None when none of its sites is healthy (it waits)."""
    best, best_wait = None, None
    for site in choices:
        h = health.get(site)
        if not healthy(h, now, silent_after):
            continue
        wait = expected_wait(h)
        if best_wait is None or wait < best_wait:
            best, best_wait = site, wait
    return best
