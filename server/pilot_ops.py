"""Request ops for pilots and sites: what site agents and `pilot submit` record, what
`pilot ls` shows, and the backlog a site agent provisions for.

The server never calls a scheduler (it may not run on the site's login node); site agents and
`pilot submit` do, and tell the server here.
"""
from __future__ import annotations

from typing import Any

from sqlalchemy import or_, select

from pilotfish.errors import NotFound, ValidationError
from pilotfish.keys import READER, SUBMITTER
from pilotfish.pilotstate import PilotState, derive
from pilotfish.validate import check_float, check_name, echo

from .core import JobServer
from .db import agents as agents_t
from .db import pilots as pilots_t
from .db import sites as sites_t
from .ops import _arg, op

_PILOT_COLS = ("site", "scheduler", "batch_id", "nodes", "walltime_minutes", "queue",
               "project", "state", "reason", "workdir")


def _state(value: Any) -> str:
    try:
        return PilotState(value).value
    except ValueError:
        raise ValidationError(f"pilot state {echo(value)} is not one of "
                              f"{', '.join(s.value for s in PilotState)}") from None


def _text(args: dict, key: str, limit: int = 4000) -> str | None:
    v = _arg(args, key, str)
    if v is not None and (len(v) > limit or "\0" in v):
        raise ValidationError(f"{key} is too long or holds a NUL byte")
    return v


@op(SUBMITTER, args=("id", "site", "nodes", "walltime_minutes", "scheduler", "batch_id",
                     "queue", "project", "state", "reason", "workdir"))
def pilot_add(srv: JobServer, args: dict, now: float) -> dict:
    pid = check_name(_arg(args, "id", str, required=True), "pilot id")
    site = _arg(args, "site", str)
    if site is not None:
        check_name(site, "site")
    nodes = _arg(args, "nodes", int, required=True)
    if not 1 <= nodes <= 1_000_000:  # an INTEGER column: PostgreSQL refused more than 2**31
        raise ValidationError("nodes must be 1..1,000,000")
    wall = _arg(args, "walltime_minutes", (int, float))
    if wall is not None and not (check_float(wall, "walltime_minutes") > 0):
        raise ValidationError(f"walltime_minutes must be above 0, got {wall}")
    row = {"id": pid, "site": site, "nodes": nodes, "walltime_minutes": wall,
           "scheduler": _text(args, "scheduler", 32), "batch_id": _text(args, "batch_id", 128),
           "queue": _text(args, "queue", 128), "project": _text(args, "project", 128),
           "state": _state(_arg(args, "state", str, "QUEUED")),
           "reason": _text(args, "reason"), "workdir": _text(args, "workdir"),
           "submitted": now, "state_time": now}
    srv.sync()
    if srv.conn.execute(select(pilots_t.c.id).where(pilots_t.c.id == pid)).first():
        raise ValidationError(f"a pilot {pid!r} is recorded already")
    srv.conn.execute(pilots_t.insert().values(**row))
    srv.batch.server_event("pilot", row["state"], now, None, row["reason"] or (
        f"recorded: {nodes} nodes" + (f" on site {site}" if site else "")), pilot=pid, site=site)
    return row


@op(SUBMITTER, args=("id", "state", "reason", "batch_id"))
def pilot_update(srv: JobServer, args: dict, now: float) -> dict:
    pid = _arg(args, "id", str, required=True)
    changes: dict[str, Any] = {}
    if "state" in args:
        changes["state"] = _state(args["state"])
        changes["state_time"] = now
    for key in ("reason", "batch_id"):
        if key in args:
            changes[key] = _text(args, key)
    srv.sync()
    r = srv.conn.execute(select(pilots_t).where(pilots_t.c.id == pid)).first()
    if r is None:
        raise NotFound(f"no pilot {pid!r}")
    if changes:
        srv.conn.execute(pilots_t.update().where(pilots_t.c.id == pid).values(**changes))
    if changes.get("state", r.state) != r.state:
        srv.batch.server_event("pilot", changes["state"], now, r.state,
                               changes.get("reason", r.reason), pilot=pid, site=r.site)
    return {**dict(r._mapping), **changes}


@op(READER, args=("all", "site"))
def pilot_ls(srv: JobServer, args: dict, now: float) -> list:
    """Pilots (recorded ones, and those only known from their agents) with their agents.

    ``state`` is what the pilot is now (:func:`pilotfish.pilotstate.derive`: agents that said
    hello make it RUNNING at once, agents all gone end it); ``batch_state`` is the batch
    system's last word as recorded by the site agent, ``pilot submit`` or ``pilot ls``.
    Agents come from memory while alive and from the database once gone (also those that left
    before a server restart), so a pilot's DONE count stays what it was.
    """
    show_all = _arg(args, "all", bool, False)
    site = _arg(args, "site", str)
    srv.sync()
    q = select(pilots_t).order_by(pilots_t.c.submitted)
    if site is not None:
        q = q.where(pilots_t.c.site == site)
    out: dict[str, dict] = {}
    for r in srv.conn.execute(q):
        out[r.id] = {**dict(r._mapping), "agents": 0, "agents_alive": 0, "agents_lost": 0,
                     "tasks": 0, "tasks_done": 0, "pinned": 0, "last_seen": None}
    agents = {a.id: a for a in srv.agents.values() if a.pilot is not None}
    gone = select(agents_t).where(agents_t.c.pilot.is_not(None), agents_t.c.state != "ALIVE")
    if site is not None:
        gone = gone.where(or_(agents_t.c.site == site, agents_t.c.pilot.in_(list(out))))
    for row in srv.conn.execute(gone):
        agents.setdefault(row.id, row)
    for a in agents.values():
        if site is not None and a.site != site and a.pilot not in out:
            continue
        p = out.get(a.pilot)
        if p is None:  # a head started by hand (sbatch of one's own script)
            p = out[a.pilot] = {"id": a.pilot, "site": a.site, "scheduler": None,
                                "batch_id": None, "nodes": 0, "walltime_minutes": None,
                                "queue": None, "project": None, "state": None, "reason": None,
                                "workdir": None, "submitted": a.started, "state_time": None,
                                "agents": 0, "agents_alive": 0, "agents_lost": 0, "tasks": 0,
                                "tasks_done": 0, "pinned": 0, "last_seen": None}
        p["agents"] += 1
        p["tasks_done"] += a.tasks_done
        if a.state == "ALIVE":
            p["agents_alive"] += 1
            p["tasks"] += len(a.leases)
            p["last_seen"] = max(p["last_seen"] or 0, a.last_seen)
        elif a.state == "LOST":
            p["agents_lost"] += 1
        if a.node_cores is not None and a.cores < a.node_cores:
            p["pinned"] += 1
    for p in out.values():
        p["batch_state"] = p["state"]
        if p["scheduler"] is None and not p["nodes"]:  # known only from agents
            p["nodes"] = p["agents"]
        p["state"], p["reason"] = derive(p["state"], p["reason"], p["agents"],
                                         p["agents_alive"], p["agents_lost"], p["nodes"])
    pilots = sorted(out.values(), key=lambda p: p["submitted"] or 0)
    if not show_all:
        pilots = [p for p in pilots if not PilotState(p["state"]).final]
    return pilots


@op(SUBMITTER, args=("site",))
def site_backlog(srv: JobServer, args: dict, now: float) -> dict:
    """What a site agent provisions for: queued jobs this site may run, by shape."""
    site = check_name(_arg(args, "site", str, required=True), "site")
    shapes = []
    for s, n in srv.queued_shapes().items():
        if s.site is None or s.site == site:
            shapes.append({"nodes": s.nodes, "cores": s.cores, "gpus": s.gpus,
                           "wall_seconds": s.wall_seconds, "ranks": s.ranks, "count": n,
                           "site_only": s.site is not None})
    alive = [a for a in srv.agents.values() if a.state == "ALIVE" and a.site == site]
    return {"site": site, "shapes": shapes, "queued": sum(x["count"] for x in shapes),
            "agents_alive": len(alive), "cores_alive": sum(a.cores for a in alive),
            "tasks_running": sum(len(a.leases) for a in alive),
            "cores_idle": sum(max(0, a.cores - sum(srv.leases[j].shape.cores
                                                   for j in a.leases if j in srv.leases))
                              for a in alive)}


@op(SUBMITTER, args=("site", "pid", "host", "paused", "error"))
def site_report(srv: JobServer, args: dict, now: float) -> dict:
    """A site agent says it is alive, and whether its provisioning is paused and why."""
    name = check_name(_arg(args, "site", str, required=True), "site")
    pid = _arg(args, "pid", int)
    if pid is not None and pid >= 2**31:  # an INTEGER column: PostgreSQL refused it
        raise ValidationError("pid is out of range")
    row = {"host": _text(args, "host", 255), "pid": pid,
           "paused": int(bool(_arg(args, "paused", bool, False))),
           "error": _text(args, "error"), "updated": now}
    srv.sync()
    if srv.conn.execute(select(sites_t.c.name).where(sites_t.c.name == name)).first():
        srv.conn.execute(sites_t.update().where(sites_t.c.name == name).values(**row))
    else:
        srv.conn.execute(sites_t.insert().values(name=name, **row))
    return {"site": name, **row}


@op(READER)
def site_status(srv: JobServer, args: dict, now: float) -> list:
    srv.sync()
    return [{**dict(r._mapping), "paused": bool(r.paused),
             "silent_seconds": round(now - r.updated, 1)}
            for r in srv.conn.execute(select(sites_t).order_by(sites_t.c.name))]

