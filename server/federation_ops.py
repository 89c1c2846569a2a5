"""The federation ops, for the forwarder (``pilotfish federate``) and ``site ls --remote``.

``forward_take`` leases jobs of remote sites to the forwarder, ``forward_report`` mirrors a
site's status of them, ``site_beat`` records a site's heartbeat (see :mod:`.remote_sites`).
The forwarder's key has the role admin: it changes jobs' states as agents do.
"""
from __future__ import annotations

from typing import Any

from pilotfish.errors import ValidationError
from pilotfish.keys import ADMIN, READER
from pilotfish.validate import echo

from .core import JobServer
from .ops import _arg, op
from .remote_sites import MAX_TAKE, RESEND_AFTER, SILENT_AFTER, check_site_name

#: Status items in one report, sites in one take.
MAX_ITEMS = 10_000
MAX_SITES = 100
#: Backlog and capacity a heartbeat may claim.
MAX_COUNT = 10**9


def _seconds(args: dict, key: str, default: float) -> float:
    v = _arg(args, key, (int, float), default)
    if not 0 < v <= 86_400:
        raise ValidationError(f"{key} must be 0..86400 seconds, got {echo(v)}")
    return float(v)


def _count(args: dict, key: str) -> int:
    v = _arg(args, key, int, required=True)
    if not 0 <= v <= MAX_COUNT:
        raise ValidationError(f"{key} must be an integer 0..{MAX_COUNT}, got {echo(v)}")
    return v


@op(ADMIN, args=("sites", "limit", "silent_after", "resend_after"))
def forward_take(srv: JobServer, args: dict, now: float) -> dict:
    """Jobs to publish to their remote sites: ``[{job, attempt, site, message}]``."""
    sites = _arg(args, "sites", list, required=True)
    if len(sites) > MAX_SITES:
        raise ValidationError(f"at most {MAX_SITES} remote sites")
    sites = [check_site_name(s) for s in sites]
    limit = _arg(args, "limit", int, 100)
    if not 0 <= limit <= MAX_TAKE:
        raise ValidationError(f"limit must be 0..{MAX_TAKE}")
    return {"forwards": srv.remotes.take(sites, limit, _seconds(args, "silent_after",
                                                               SILENT_AFTER),
                                         _seconds(args, "resend_after", RESEND_AFTER), now)}


@op(ADMIN, args=("site", "updates"))
def forward_report(srv: JobServer, args: dict, now: float) -> dict:
    """A remote site's status of jobs forwarded to it: ``updates`` are ``{job, attempt, to,
    time, msg}``; those of jobs not forwarded to that site are refused (and logged)."""
    site = check_site_name(_arg(args, "site", str, required=True))
    items = _arg(args, "updates", list, required=True)
    if len(items) > MAX_ITEMS or not all(isinstance(i, dict) for i in items):
        raise ValidationError(f"updates must be a list of at most {MAX_ITEMS} maps")
    for i in items:
        if isinstance(i.get("msg"), str):
            i["msg"] = echo(i["msg"], 500)
        elif i.get("msg") is not None:
            i["msg"] = None
    return srv.remotes.report(site, items, now)


@op(ADMIN, args=("site", "backlog", "capacity"))
def site_beat(srv: JobServer, args: dict, now: float) -> dict:
    """A remote site's heartbeat (received now): jobs waiting there and its capacity."""
    site = check_site_name(_arg(args, "site", str, required=True))
    srv.remotes.beat(site, _count(args, "backlog"), _count(args, "capacity"), now)
    return {"site": site}


@op(READER)
def remote_sites(srv: JobServer, args: dict, now: float) -> Any:
    """The remote sites with their health (last heartbeat, backlog, capacity)."""
    return {"sites": srv.remotes.listing(now), "silent_after": srv.remotes.silent_after}
