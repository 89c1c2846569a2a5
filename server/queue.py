"""The server's in-memory ready queue: one priority heap per (site, resource shape).

Rebuilt from the database at start; the database stays the source of truth. Removal is lazy: a
heap entry whose job is no longer a member is skipped when it reaches the top.
"""
from __future__ import annotations

import heapq
from typing import NamedTuple


class Shape(NamedTuple):
    site: str | None
    nodes: int
    cores: int
    gpus: int
    wall_seconds: float | None
    #: MPI ranks per node; more than one needs a launcher (srun, aprun, mpiexec, ...).
    ranks: int = 1


class ReadyQueue:
    def __init__(self) -> None:
        self._heaps: dict[Shape, list[tuple[int, int]]] = {}
        self._member: dict[int, Shape] = {}
        #: ``hold(job, priority, shape) -> bool``: a job it keeps (its input is to be staged
        #: by a site stager first, see .staging) does not enter the queue.
        self.hold = None

    def __len__(self) -> int:
        return len(self._member)

    def __contains__(self, job_id: int) -> bool:
        return job_id in self._member

    def push(self, job_id: int, priority: int, shape: Shape) -> None:
        hold = self.hold
        if hold is not None and hold(job_id, priority, shape):
            return
        self._member[job_id] = shape
        heap = self._heaps.get(shape)
        if heap is None:
            heap = self._heaps[shape] = []
        heapq.heappush(heap, (-priority, job_id))

    def remove(self, job_id: int) -> bool:
        return self._member.pop(job_id, None) is not None

    def items(self) -> list[tuple[int, Shape]]:
        return list(self._member.items())

    def shape_of(self, job_id: int) -> Shape | None:
        return self._member.get(job_id)

    def multi_node_shapes(self) -> list[Shape]:
        """Shapes of queued multi-node jobs (they are scheduled by reserving whole nodes)."""
        return [s for s in list(self._heaps) if s.nodes > 1 and self._head(s) is not None]

    def live_shapes(self) -> list[Shape]:
        """The shapes with a queued job (one look per shape, not per job: for server/drain.py)."""
        return [s for s in list(self._heaps) if self._head(s) is not None]

    def best(self, shape: Shape, skip: set[int]) -> tuple[int, int] | None:
        """The best queued (-priority, job) of ``shape`` not in ``skip``, without popping it."""
        heap = self._heaps.get(shape)
        if not heap:
            return None
        member = self._member
        k = len(skip) + 1
        while True:  # stale entries (removed jobs) may fill the first k: look deeper then
            for top in heapq.nsmallest(k, heap):
                if member.get(top[1]) == shape and top[1] not in skip:
                    return top
            if k >= len(heap):
                return None
            k *= 4

    def shapes(self, outside: tuple[int, int] | None = None) -> dict[Shape, int]:
        """Queued job counts per shape (for status and the provisioner); ``outside=(lo, hi)``:
        only of the jobs whose id is not in lo < id <= hi."""
        counts: dict[Shape, int] = {}
        if outside is None:
            for shape in self._member.values():
                counts[shape] = counts.get(shape, 0) + 1
            return counts
        lo, hi = outside
        for job, shape in self._member.items():
            if not lo < job <= hi:
                counts[shape] = counts.get(shape, 0) + 1
        return counts

    def _head(self, shape: Shape) -> tuple[int, int] | None:
        heap = self._heaps[shape]
        member = self._member
        while heap:
            top = heap[0]
            if member.get(top[1]) == shape:
                return top
            heapq.heappop(heap)
        del self._heaps[shape]
        return None

    def pick(self, site: str | None, max_cores: int, max_gpus: int, time_left: float | None,
             cores: int, gpus: int, limit: int, ranks_ok: bool = False
             ) -> list[tuple[int, Shape]]:
        """Pop the best jobs an agent can run within a budget of ``cores``/``gpus``.

        A job fits when its shape fits the agent (single node, site, the agent's largest
        task, the agent's time left, several ranks only where the agent has a launcher) and
        its cores/GPUs fit what is left of the budget.
        """
        fits = [s for s in self._heaps
                if s.nodes == 1 and (s.ranks == 1 or ranks_ok)
                and (s.site is None or s.site == site)
                and s.cores <= max_cores and s.gpus <= max_gpus
                and (time_left is None or s.wall_seconds is None or s.wall_seconds <= time_left)]
        out: list[tuple[int, Shape]] = []
        member = self._member
        while fits and len(out) < limit:
            best = None
            best_shape = None
            for s in list(fits):
                if s.cores > cores or s.gpus > gpus:
                    fits.remove(s)
                    continue
                head = self._head(s)
                if head is None:
                    fits.remove(s)
                    continue
                if best is None or head < best:
                    best, best_shape = head, s
            if best is None:
                break
            heapq.heappop(self._heaps[best_shape])
            del member[best[1]]
            out.append((best[1], best_shape))
            cores -= best_shape.cores
            gpus -= best_shape.gpus
        return out

    def take_sites(self, sites: set[str], limit: int) -> list[tuple[int, Shape]]:
        """Pop up to ``limit`` of the best queued jobs whose site is one of ``sites`` (jobs for
        remote sites, handed to the forwarder rather than to agents)."""
        out: list[tuple[int, Shape]] = []
        shapes = [s for s in list(self._heaps) if s.site in sites]
        while shapes and len(out) < limit:
            best, best_shape = None, None
            for s in list(shapes):
                head = self._head(s) if s in self._heaps else None
                if head is None:
                    shapes.remove(s)
                elif best is None or head < best:
                    best, best_shape = head, s
            if best is None:
                break
            heapq.heappop(self._heaps[best_shape])
            del self._member[best[1]]
            out.append((best[1], best_shape))
        return out
