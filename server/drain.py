"""Dismissing idle agents: "no more work for you", so a pilot leaves the moment no job can use it
rather than at its idle timeout (the drain the LIGO runs plotted: nodes held, doing nothing).

Only agents whose hello asked for it (``leave_idle``; pilots the site agent submits do) are told,
with a ``nowork`` message naming the last task batch sent to them; the agent leaves if it saw
that batch and holds nothing. An agent is told when it holds no lease, no task batch of ours is
unseen by it, it is not reserved for a multi-node job, and no job that could fit it is

* queued (the ready queue, by shape: site, cores, GPUs, wall time, ranks; a multi-node shape
  fits when the agent's pilot has that many agents and a launcher),
* held for a site stager (its input is being fetched, or waits out a stage-in backoff), or
* waiting for its parents (AWAITING_PARENTS: a workflow's subjob that becomes ready when its
  parents finish, perhaps on this very pilot).

Nobody is told while the server is still reading its queue at start, nor while forwarded jobs
wait for their central server's start (see .fence).

Jobs running elsewhere do not keep an agent: one that fails goes back to the queue and, if no
agent is left for it, the site agent provisions again. Checked a few times a second on the
server's timer, never on the dispatch path; an agent is told again only after it was sent new
tasks, or ``RETELL`` seconds later (a lost message, a race with an update).
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Iterable

from sqlalchemy import select

from pilotfish import protocol as P

from .queue import Shape
from .states import S

if TYPE_CHECKING:
    from .core import AgentRec, JobServer

#: Seconds between the checks (the server's timer calls ``check`` at most this often).
EVERY = 0.2
#: Seconds after which an agent told already, and still here, is told again.
RETELL = 5.0
#: Seconds a cached set of AWAITING_PARENTS shapes is trusted while their count is unchanged.
PARENTS_TTL = 10.0


class Drain:
    def __init__(self, srv: "JobServer") -> None:
        self.srv = srv
        self.last = 0.0
        self._parents: tuple[int, float, list[Shape]] = (-1, 0.0, [])
        self.told = 0

    def check(self, now: float) -> int:
        """Tell the idle agents no work fits; returns how many were told."""
        if now - self.last < EVERY:
            return 0
        self.last = now
        srv = self.srv
        if srv.loading is not None or srv.fence.held:
            # the queue is still being read at start, or forwarded jobs wait for their
            # central's start (federation): work may be there that the shapes do not show yet
            return 0
        idle = [a for a in srv.agents.values() if self._idle(a, now)]
        if not idle:
            return 0
        pending = self.pending_shapes()
        staging_busy = bool(srv.staging.leases)   # inputs being fetched: shapes not at hand
        nodes: dict[str, int] = {}
        for a in srv.agents.values():
            if a.state == "ALIVE" and a.pilot:
                nodes[a.pilot] = nodes.get(a.pilot, 0) + 1
        told = 0
        for a in idle:
            if staging_busy and srv.staging.serves(a.site):
                continue
            if any(fits(s, a, nodes, now) for s in pending):
                continue
            a.nowork_seq, a.nowork_at = a.seq, now
            srv.send(a.identity, P.encode(P.NOWORK, seq=a.seq, epoch=srv.epoch))
            told += 1
        self.told += told
        return told

    def _idle(self, a: "AgentRec", now: float) -> bool:
        if not a.leave_idle or a.state != "ALIVE" or a.identity is None or a.demand is None:
            return False
        if a.leases or a.inflight or a.id in self.srv.gangs.by_agent:
            return False
        return a.nowork_seq != a.seq or now - a.nowork_at >= RETELL

    def pending_shapes(self) -> list[Shape]:
        """Shapes of the jobs queued, held for a stager, or waiting for their parents."""
        srv = self.srv
        shapes = set(srv.queue.live_shapes())
        shapes.update(shape for _, shape in srv.staging.held.values())
        shapes.update(self._parents_shapes())
        return list(shapes)

    def _parents_shapes(self) -> Iterable[Shape]:
        srv = self.srv
        n = srv.batch.counts.get(S.AWAITING_PARENTS.value, 0)
        if not n:
            return []
        count, at, shapes = self._parents
        mono = time.monotonic()
        if count == n and mono - at < PARENTS_TTL:
            return shapes
        from .core import shape_of
        from .db import jobs
        srv.sync()
        cols = (jobs.c.site, jobs.c.num_nodes, jobs.c.processes_per_node,
                jobs.c.cpus_per_process, jobs.c.gpus_per_process, jobs.c.wall_time_minutes)
        rows = srv.conn.execute(select(*cols).where(jobs.c.state == S.AWAITING_PARENTS.value)
                                .group_by(*cols))
        shapes = [shape_of(r) for r in rows]
        self._parents = (n, mono, shapes)
        return shapes


def fits(s: Shape, a: "AgentRec", pilot_nodes: dict[str, int], now: float) -> bool:
    """Could agent ``a`` (or its pilot, for a multi-node job) ever run a job of shape ``s``?"""
    d: dict[str, Any] = a.demand or {}
    if s.site is not None and s.site != a.site:
        return False
    if s.cores > d.get("max_cores", a.cores) or s.gpus > d.get("max_gpus", 0):
        return False
    left = d.get("time_left")
    if left is not None and s.wall_seconds is not None and \
            s.wall_seconds > left - (now - a.demand_time):
        return False
    launcher = a.launcher not in (None, "local")
    if s.nodes > 1:
        return launcher and a.pilot is not None and pilot_nodes.get(a.pilot, 0) >= s.nodes
    return s.ranks == 1 or launcher
