"""The federation ops, for the forwarder (``pilotfish federate``) and ``site ls --remote``.

``forward_take`` leases jobs of remote sites to the forwarder, ``forward_report`` mirrors a
site's status of them, ``site_beat`` records a site's heartbeat (see :mod:`.remote_sites`).
The forwarder's key has the role admin: it changes jobs' states as agents do.
"""
from __future__ import annotations

from typing import Any

from pilotfish.errors import ValidationError
from sqlalchemy import select

from pilotfish.keys import ADMIN, READER, SUBMITTER
from pilotfish.validate import echo

from . import states
from .core import JobServer
from .db import jobs
from .jobs import check_token
from .ops import LOCAL_ADMIN, Caller, _arg, _set_state, check_owner, op
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
    """Jobs to publish to their remote sites, ``forwards: [{job, attempt, site, message}]``,
    and fence messages, ``controls: [{action, job, attempt, site}]`` (start, cancel)."""
    sites = _arg(args, "sites", list, required=True)
    if len(sites) > MAX_SITES:
        raise ValidationError(f"at most {MAX_SITES} remote sites")
    sites = [check_site_name(s) for s in sites]
    limit = _arg(args, "limit", int, 100)
    if not 0 <= limit <= MAX_TAKE:
        raise ValidationError(f"limit must be 0..{MAX_TAKE}")
    return srv.remotes.take(sites, limit, _seconds(args, "silent_after", SILENT_AFTER),
                            _seconds(args, "resend_after", RESEND_AFTER), now)


@op(ADMIN, args=("site", "updates"))
def forward_report(srv: JobServer, args: dict, now: float) -> dict:
    """A remote site's status of jobs forwarded to it: ``updates`` are ``{job, attempt, to,
    time, msg}`` (``refused: true``: its intake refused the forward), or ``{job, attempt,
    control, result}`` (its bridge did a start or cancel); those of jobs not forwarded to that
    site are refused (and logged)."""
    site = check_site_name(_arg(args, "site", str, required=True))
    items = _arg(args, "updates", list, required=True)
    if len(items) > MAX_ITEMS or not all(isinstance(i, dict) for i in items):
        raise ValidationError(f"updates must be a list of at most {MAX_ITEMS} maps")
    for i in items:
        if i.get("control") not in (None, "start", "cancel"):
            raise ValidationError(f"control must be start or cancel, got {echo(i['control'])}")
        if isinstance(i.get("result"), str):
            i["result"] = echo(i["result"], 100)
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


#: What a forwarder may ask of a site about a job it forwarded there (see .fence).
CONTROLS = ("start", "cancel")


@op(SUBMITTER, args=("action", "intake_key"), caller=True)
def forward_control(srv: JobServer, args: dict, now: float,
                    caller: Caller = LOCAL_ADMIN) -> dict:
    """At a site: its forwarder's ``start`` (run a held job) or ``cancel`` (kill it, held or
    running) of the job added with ``intake_key`` (the forward's message id). Idempotent; a
    job this site does not hold is no error (``result: "unknown"``). The caller must own the
    job (the bridge's key added it)."""
    action = _arg(args, "action", str, required=True)
    if action not in CONTROLS:
        raise ValidationError(f"action must be one of {', '.join(CONTROLS)}, got {echo(action)}")
    key = check_token(_arg(args, "intake_key", str, required=True), "intake_key")
    srv.sync()
    r = srv.conn.execute(select(jobs).where(jobs.c.intake_key == key)).first()
    if r is None:
        return {"result": "unknown", "job": None, "state": None}
    check_owner([r], caller)
    lease = srv.leases.get(r.id)
    state = lease.state if lease is not None else states.State(r.state)
    if action == "start":
        result = "started" if srv.fence.release(r.id) else "not held"
        return {"result": result, "job": r.id, "state": state.value}
    if state in states.FINAL:
        srv.fence.forget(r.id)
        return {"result": "final", "job": r.id, "state": state.value}
    _set_state(srv, r, S_KILLED, now, "cancelled by the server that forwarded it")
    return {"result": "killed", "job": r.id, "state": S_KILLED.value}


S_KILLED = states.State.USER_KILLED
