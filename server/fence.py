"""The federation fence, a site server's side: forwarded jobs are stored held and run only
once their forwarder (the central server) says start.

Why: a site that stores a forwarded job and dies before its first status message reaches the
central looks, to the central, like a site that never got the job; the central routes it
elsewhere. Without a fence the site, restarted, would run it too (a double run). With it, the
site never starts a job the central has not confirmed, and the central confirms only the
attempt it still leases to that site, in the same turn in which it records that the site has
it (``jobs.remote_accepted``; an accepted job is never routed elsewhere). Both decisions are
made by the central's single-threaded server, so exactly one of "confirm" and "route
elsewhere" happens for an attempt. A held job the central gave up on gets a cancel instead.

A held job is READY in the site's database (its status messages say the site has it) with
``jobs.fenced`` set; it is kept out of the dispatch queue (the queue's hold hook) until
``forward_control`` starts it, across restarts (``jobs.fenced`` is read at load).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy import select

from . import states
from .db import jobs

if TYPE_CHECKING:
    from .core import JobServer

S = states.State


class Fence:
    def __init__(self, srv: "JobServer") -> None:
        self.srv = srv
        self.held: set[int] = set()

    def load(self, conn) -> None:
        final = [s.value for s in states.FINAL]
        self.held = {r.id for r in conn.execute(
            select(jobs.c.id).where(jobs.c.fenced.is_not(None) & jobs.c.state.not_in(final)))}

    def hold(self, job: int) -> bool:
        """Called for every job entering the dispatch queue: a held job stays out."""
        return job in self.held

    def release(self, job: int) -> bool:
        """Start a held job: into the queue when it is queued. False: it was not held."""
        if job not in self.held:
            return False
        self.held.discard(job)
        srv = self.srv
        srv.batch.update_job(job, fenced=None)
        from .core import _SHAPE_COLS
        srv.sync()
        r = srv.conn.execute(select(*_SHAPE_COLS, jobs.c.state).where(jobs.c.id == job)).first()
        if r is not None and S(r.state) in states.QUEUED and job not in srv.leases \
                and job not in srv.queue:
            srv.enqueue(job, r)
        return True

    def forget(self, job: int) -> None:
        """A user changed the job (kill, retry): it is no longer held."""
        if job in self.held:
            self.held.discard(job)
            self.srv.batch.update_job(job, fenced=None)
