"""Multi-node jobs: reserve whole nodes of one pilot, let them drain, launch across them.

A job with ``num_nodes > 1`` never goes through the per-agent pick. Each dispatch turn looks at
the queued multi-node jobs by priority: a job gets ``num_nodes`` idle-able agents of ONE pilot
(agents the pilot head started with a multi-node launcher), which then take no new work; once
their leased tasks have ended, the job goes to the first of them as one task whose ``launch``
names every reserved node, and that agent starts it with its pilot's launcher (srun -N -w ...).
The other nodes of the pilot keep running single-node tasks meanwhile. When the job's lease
ends (finished, failed, lost, killed), the nodes return to the pool.

A job no pilot can hold (more nodes than any connected pilot has, depth larger than the nodes)
stays queued with the reason, shown by ``job show``, instead of hanging a pilot.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .queue import Shape

if TYPE_CHECKING:
    from .core import AgentRec, JobServer

#: Seconds between scheduling passes when nothing changed (reservations wait on task ends).
PASS_INTERVAL = 0.05


@dataclass
class Reservation:
    job: int
    priority: int
    shape: Shape
    agents: list[str]
    pilot: str
    since: float
    launched: bool = False
    hosts: list[str] = field(default_factory=list)


class Gangs:
    def __init__(self, srv: JobServer) -> None:
        self.srv = srv
        self.by_job: dict[int, Reservation] = {}
        self.by_agent: dict[str, int] = {}
        self.reasons: dict[Shape, str] = {}
        self.next_pass = 0.0

    # -- queries ----------------------------------------------------------------------------
    def holds(self, aid: str) -> bool:
        return aid in self.by_agent

    def launchable(self, a: AgentRec) -> bool:
        return (a.state == "ALIVE" and a.pilot is not None
                and a.launcher not in (None, "local") and a.identity is not None)

    def waiting_reason(self, job: int, now: float) -> str | None:
        """Why a queued job has not started, when the server can tell."""
        r = self.by_job.get(job)
        if r is not None:
            busy = sum(1 for a in r.agents if self.srv.agents[a].leases)
            return (f"reserved {len(r.agents)} nodes of pilot {r.pilot} "
                    f"({', '.join(self.srv.agents[a].node or a for a in r.agents)}); "
                    f"waiting for {busy} of them to finish their tasks")
        shape = self.srv.queue.shape_of(job)
        if shape is None:
            return None
        if shape.nodes > 1:
            return self.reasons.get(shape)
        fits = [a for a in self.srv.agents.values() if a.state == "ALIVE" and self._fits(a, shape, now)
                and (shape.ranks == 1 or a.launcher not in (None, "local"))]
        if not fits and any(a.state == "ALIVE" for a in self.srv.agents.values()):
            return f"no connected agent can run it: {_needs(shape)}"
        return None

    # -- scheduling -------------------------------------------------------------------------
    def schedule(self, now: float, force: bool = False) -> list[Reservation]:
        """Update reservations; return those whose nodes are all free (ready to launch)."""
        if not self.by_job and not force and now < self.next_pass:
            return []
        self.next_pass = now + PASS_INTERVAL
        srv = self.srv
        for r in list(self.by_job.values()):
            if r.launched:
                continue
            if srv.queue.shape_of(r.job) != r.shape or any(
                    srv.agents[a].state != "ALIVE" for a in r.agents):
                self.release(r.job)  # the job was killed/altered/removed, or a node was lost
        self._reserve(now)
        return [r for r in self.by_job.values()
                if not r.launched and all(not srv.agents[a].leases for a in r.agents)]

    def _reserve(self, now: float) -> None:
        srv = self.srv
        shapes = srv.queue.multi_node_shapes()
        if not shapes:
            self.reasons.clear()
            return
        pilots: dict[str, list[AgentRec]] = {}
        for a in srv.agents.values():
            if self.launchable(a):
                pilots.setdefault(a.pilot, []).append(a)
        reserved_jobs = set(self.by_job)
        heads = []
        for s in shapes:
            best = srv.queue.best(s, reserved_jobs)
            if best is not None:
                heads.append((best, s))
        heads.sort()
        reasons: dict[Shape, str] = {}
        for (negprio, job), shape in heads:
            while True:
                got = self._pick_nodes(pilots, shape, now)
                if got is None:
                    reasons[shape] = self._why_not(pilots, shape, now)
                    break
                pilot, agents = got
                r = Reservation(job, -negprio, shape, [a.id for a in agents], pilot, now)
                self.by_job[job] = r
                for a in agents:
                    self.by_agent[a.id] = job
                reserved_jobs.add(job)
                nxt = srv.queue.best(shape, reserved_jobs)
                if nxt is None:
                    break
                negprio, job = nxt
        self.reasons = reasons

    def _fits(self, a: AgentRec, shape: Shape, now: float) -> bool:
        if shape.site is not None and a.site != shape.site:
            return False
        if a.cores < shape.cores or a.gpus < shape.gpus:
            return False
        if shape.wall_seconds is not None and a.demand is not None \
                and a.demand["time_left"] is not None \
                and a.demand["time_left"] - (now - a.demand_time) < shape.wall_seconds:
            return False
        return True

    def _pick_nodes(self, pilots: dict[str, list[AgentRec]], shape: Shape,
                    now: float) -> tuple[str, list[AgentRec]] | None:
        best = None
        for pilot, agents in pilots.items():
            free = [a for a in agents if a.id not in self.by_agent and self._fits(a, shape, now)]
            if len(free) < shape.nodes:
                continue
            free.sort(key=lambda a: (len(a.leases), a.node or ""))  # the least busy drain first
            load = sum(len(a.leases) for a in free[:shape.nodes])
            if best is None or load < best[0]:
                best = (load, pilot, free[:shape.nodes])
        return None if best is None else (best[1], best[2])

    def _why_not(self, pilots: dict[str, list[AgentRec]], shape: Shape, now: float) -> str:
        if not pilots:
            return ("no pilot with a multi-node launcher is connected (start one with "
                    "`pilotfish pilot run`); it stays queued")
        size = max(sum(1 for a in agents if self._fits(a, shape, now))
                   for agents in pilots.values())
        if size < shape.nodes:
            return (f"needs {_needs(shape)}; the largest connected pilot has {size} such "
                    "nodes; it stays queued for a bigger pilot")
        return "waiting for nodes: they are reserved for other multi-node jobs"

    # -- launch and release -----------------------------------------------------------------
    def launched(self, r: Reservation) -> None:
        r.launched = True

    def release(self, job: int) -> None:
        r = self.by_job.pop(job, None)
        if r is None:
            return
        for aid in r.agents:
            if self.by_agent.get(aid) == job:
                del self.by_agent[aid]
                a = self.srv.agents.get(aid)
                if a is not None and a.demand is not None and a.demand["cores"] > 0:
                    self.srv.hungry.add(aid)
        self.next_pass = 0.0


def _needs(shape: Shape) -> str:
    per_node = f"{shape.cores} cores" + (f" and {shape.gpus} GPUs" if shape.gpus else "")
    where = f" at site {shape.site}" if shape.site else ""
    if shape.nodes > 1:
        return f"{shape.nodes} nodes of {per_node}{where}"
    return f"{per_node} on one node{where}"
