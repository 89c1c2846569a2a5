"""Staging work for site stagers: which jobs wait for one, who holds what, the look-ahead window.

A site agent's stager (:mod:`pilotfish.pilot.site_stager`) moves remote inputs (``scp://``,
``https://``, ...) into its site's shared staging directory before a job is queued, so node
agents never wait on a wide-area transfer. The server only keeps the books, in its loop, with
database work only; every transfer runs in the stager.

* A queued job (READY, RESTART_READY) whose ``input_url`` is remote and not yet staged, of a
  site that a live stager serves (or of no site, while any stager lives), is *held* here
  instead of entering the dispatch queue (:meth:`StagingBook.hold`, called by
  :meth:`ReadyQueue.push`). Where no stager lives, it is dispatched as before and the node
  agent stages it itself.
* A stager's ``stage_poll`` takes held jobs as **stage leases** (job, stager, token), like task
  leases: every poll renews all of the stager's leases; a stager silent for a lease period loses
  them and its jobs are held again (or dispatched, when no stager is left for their site). A job
  has at most one stage lease: never two stagers on one job.
* A stage-in that succeeded moves the job READY → STAGED_IN (the event says from where, how many
  bytes, how long), writes ``jobs.staged`` (site, file name, bytes) and queues the job for its
  site's agents (pinned to the stager's site: the file is there). The agent that takes it gets
  ``staged: NAME`` in its task, places ``<staging_dir>/<job>/NAME`` into the workdir and skips
  stage-in. A failure moves it to STAGE_IN_FAILED with the scheme's one-line error, then
  RESTART_READY (held again, not before a backoff of 2^n s, at most 60 s) or FAILED.
* **Look-ahead**: a site gets new stage-in leases only while its staged-but-not-yet-taken jobs
  plus its stage leases are fewer than its window: the cores of its live agents plus their idle
  cores (one round for what is free now, one for what runs now), at least the stager's
  ``lookahead`` (the profile's ``transfers.lookahead``, default its ``max_concurrent``). So
  inputs are fetched while other jobs compute, and no more than the agents can start soon
  are piled up in scratch.
"""
from __future__ import annotations

import heapq
import json
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import bindparam, select

from pilotfish.validate import cap, echo

from .db import jobs
from .queue import Shape
from .states import FINAL, QUEUED, State
from .store import chunks

if TYPE_CHECKING:
    from .core import JobServer

log = logging.getLogger("pilotfish.server")
S = State
LOCAL_SCHEMES = ("file", "local")
#: Most jobs one poll may take, and most held entries one poll looks at.
MAX_GRANT = 500
MAX_SCAN = 5000
#: Longest backoff (s) before a job whose stage-in failed is handed out again.
MAX_BACKOFF = 60.0
_ROWS = select(jobs.c.id, jobs.c.state, jobs.c.input_url, jobs.c.retries, jobs.c.max_retries
               ).where(jobs.c.id.in_(bindparam("ids", expanding=True)))


def remote(url: Any) -> bool:
    """A URL the site stager (or the node agent's transfer code) must fetch: ``scheme://`` of
    a scheme other than file/local. (The door, job add, checks the URL itself.)"""
    return isinstance(url, str) and "://" in url and \
        url.split("://", 1)[0].lower() not in LOCAL_SCHEMES


def file_name(value: Any) -> str | None:
    """A staged file's name as a stager reports it: one plain path part, else None."""
    if not isinstance(value, str) or not 0 < len(value) <= 255 or value in (".", "..") \
            or "/" in value or "\x00" in value or value.startswith((".", "-")):
        return None
    return value


@dataclass(slots=True)
class StageLease:
    job: int
    stager: str
    token: int
    site: str
    state: State          # the job's state when leased (READY or RESTART_READY)
    retries: int
    max_retries: int
    priority: int
    shape: Shape
    url: str
    since: float          # time.time() when leased


@dataclass
class StagerRec:
    id: str
    site: str
    started: float
    seen: float = field(default_factory=time.monotonic)  # leases count out on this clock
    last_seen: float = field(default_factory=time.time)
    state: str = "ALIVE"
    report: dict = field(default_factory=dict)
    leases: set = field(default_factory=set)
    lookahead: int = 1  # the window's floor (the stager's)


class StagingBook:
    def __init__(self, srv: JobServer) -> None:
        self.srv = srv
        self.remote_in: set[int] = set()       # jobs whose input_url is remote
        self.staged: dict[int, dict] = {}      # job -> jobs.staged, until an agent takes it
        self.held: dict[int, tuple[int, Shape]] = {}  # job -> (priority, shape), waiting
        self._heap: list[tuple[int, int]] = []  # (-priority, job) of held (lazy removal)
        self.not_before: dict[int, float] = {}  # job -> time.time() of its next try (backoff)
        self.fails: dict[int, int] = {}         # job -> stage-in failures (for the backoff)
        self.leases: dict[int, StageLease] = {}
        self.stagers: dict[str, StagerRec] = {}
        self.next_token = 1
        self.stats = {"staged_in": 0, "stage_in_failed": 0, "leases_lost": 0}

    # -- start ------------------------------------------------------------------------------
    def load(self, conn) -> None:
        """After the queue's rebuild: remote inputs of unfinished jobs, and the staged jobs
        that wait for an agent (queued for their stager's site)."""
        final = [s.value for s in FINAL]
        q = select(jobs.c.id, jobs.c.input_url).where(
            jobs.c.input_url.like("%://%"), jobs.c.state.not_in(final))
        self.remote_in = {r.id for r in conn.execute(q) if remote(r.input_url)}
        from .core import _SHAPE_COLS, shape_of
        q = select(*_SHAPE_COLS, jobs.c.staged).where(
            jobs.c.staged.is_not(None), jobs.c.agent.is_(None),
            jobs.c.state == S.STAGED_IN.value)
        for r in conn.execute(q):
            try:
                info = json.loads(r.staged)
                site = info["site"]
            except (ValueError, KeyError, TypeError):
                continue
            self.staged[r.id] = info
            self.srv.queue.push(r.id, r.priority, shape_of(r)._replace(site=site))

    # -- the queue's side -------------------------------------------------------------------
    def note_job(self, job: int, input_url: Any) -> None:
        """job add / job alter: remember whether its input is remote."""
        if remote(input_url):
            self.remote_in.add(job)
        else:
            self.remote_in.discard(job)

    def serves(self, site: str | None) -> bool:
        return any(r.state == "ALIVE" and (site is None or r.site == site)
                   for r in self.stagers.values())

    def hold(self, job: int, priority: int, shape: Shape) -> bool:
        """Called for every job entering the dispatch queue: keep it here instead when a
        stager should fetch its input first."""
        if job not in self.remote_in or job in self.staged or job in self.leases \
                or not self.stagers or not self.serves(shape.site):
            return False
        self.held[job] = (priority, shape)
        heapq.heappush(self._heap, (-priority, job))
        return True

    def forget(self, job: int, removed: bool = False) -> None:
        """A user changed the job (kill, retry, alter, rm): drop what is held or leased; its
        stager's result will be refused."""
        self.held.pop(job, None)
        lease = self.leases.pop(job, None)
        if lease is not None:
            rec = self.stagers.get(lease.stager)
            if rec is not None:
                rec.leases.discard(job)
        self.staged.pop(job, None)
        if removed:
            self.remote_in.discard(job)
            self.fails.pop(job, None)
            self.not_before.pop(job, None)

    def taken(self, job: int) -> str | None:
        """An agent is leased the job: the staged file's name for its task (None: not staged
        by a stager); the row's ``staged`` is cleared in the same turn."""
        info = self.staged.pop(job, None)
        if info is None:
            return None
        self.srv.batch.update_job(job, staged=None)
        self.fails.pop(job, None)
        return info.get("name")

    # -- stagers ----------------------------------------------------------------------------
    def stager(self, sid: str, site: str, now: float, lookahead: int) -> StagerRec:
        rec = self.stagers.get(sid)
        if rec is None or rec.state != "ALIVE" or rec.site != site:
            if rec is not None:
                self._lose(rec, now, "came back")
            rec = self.stagers[sid] = StagerRec(sid, site, now)
            log.info("stager %s for site %s joined", sid, site)
            self._claim(site)
        rec.seen, rec.last_seen = time.monotonic(), now
        rec.lookahead = lookahead
        return rec

    def _claim(self, site: str) -> None:
        """A stager for ``site`` appeared: take back its site's jobs that were queued for node
        agents (no stager lived when they were queued)."""
        q = self.srv.queue
        mine = [job for job, shape in q.items() if job in self.remote_in and
                job not in self.staged and (shape.site is None or shape.site == site)]
        if not mine:
            return
        self.srv.sync()
        for part in chunks(mine, 900):
            for r in self.srv.conn.execute(select(jobs.c.id, jobs.c.priority)
                                           .where(jobs.c.id.in_(part))):
                shape = q.shape_of(r.id)
                if shape is not None:
                    q.remove(r.id)
                    self.hold(r.id, r.priority, shape)

    def expire(self, now: float) -> None:
        limit = time.monotonic() - self.srv.lease_timeout
        for rec in list(self.stagers.values()):
            if rec.state == "ALIVE" and rec.seen < limit:
                self._lose(rec, now, f"silent {now - rec.last_seen:.1f} s")
            elif rec.state != "ALIVE" and rec.last_seen < now - 3600:
                del self.stagers[rec.id]  # long gone: forget its report

    def _lose(self, rec: StagerRec, now: float, why: str) -> None:
        """A stager is gone: its stage leases end and their jobs are held again -- or, when no
        stager is left for their site, queued for agents that stage for themselves."""
        rec.state = "LOST"
        jobs_ = sorted(rec.leases)
        if jobs_:
            log.warning("stager %s for site %s lost (%s): %d stage leases taken back", rec.id,
                        rec.site, why, len(jobs_))
        self.stats["leases_lost"] += len(jobs_)
        for job in jobs_:
            lease = self.leases.pop(job)
            self.srv.queue.push(job, lease.priority, lease.shape)
        rec.leases.clear()
        if not self.serves(rec.site):  # none left for this site: agents stage themselves
            for job, (prio, shape) in list(self.held.items()):
                if shape.site == rec.site or (shape.site is None and not self.serves(None)):
                    del self.held[job]
                    self.srv.queue.push(job, prio, shape)

    # -- one poll ---------------------------------------------------------------------------
    def window(self, site: str, floor: int) -> tuple[int, int]:
        """(window, ahead) of ``site``: how many jobs may be staged ahead of its agents, and
        how many are (staged and queued, or being staged)."""
        srv = self.srv
        alive = [a for a in srv.agents.values() if a.state == "ALIVE" and a.site == site]
        cores = sum(a.cores for a in alive)
        idle = sum(max(0, a.cores - sum(srv.leases[j].shape.cores for j in a.leases
                                        if j in srv.leases)) for a in alive)
        queued = 0
        for job, info in list(self.staged.items()):
            if info.get("site") == site:
                if job in srv.queue:
                    queued += 1
        inflight = sum(1 for lease in self.leases.values() if lease.site == site)
        return max(floor, cores + idle), queued + inflight

    def results(self, rec: StagerRec, done: list[dict], now: float) -> list[dict]:
        """Apply a stager's finished work; the items refused (not its lease any more)."""
        refused, mine = [], []
        for d in done:
            lease = self.leases.get(d["job"])
            if lease is None or lease.stager != rec.id or lease.token != d["token"]:
                refused.append({"job": d["job"], "token": d["token"]})
            else:
                mine.append((lease, d))
        if not mine:
            return refused
        srv = self.srv
        srv.sync()
        current = {}
        for part in chunks([lease.job for lease, _ in mine], 900):
            for r in srv.conn.execute(_ROWS, {"ids": part}):
                current[r.id] = r.state
        for lease, d in mine:
            del self.leases[lease.job]
            rec.leases.discard(lease.job)
            if current.get(lease.job) != lease.state.value:  # killed, retried or removed
                refused.append({"job": lease.job, "token": lease.token})
                continue
            took = f"{d['seconds']:.1f} s" if d.get("seconds") is not None else "?"
            if d["ok"]:
                info = {"site": rec.site, "name": d["name"], "bytes": d.get("bytes")}
                if d.get("sha256"):
                    info["sha256"] = d["sha256"]
                size = d.get("bytes")
                msg = (f"staged in by {rec.id}: {lease.url[:300]}"
                       + (f" ({size:,} bytes" if size is not None else " (") + f", {took})")
                srv.batch.transition(lease.job, lease.state, [S.STAGED_IN], now, msg,
                                     staged=json.dumps(info))
                self.staged[lease.job] = info
                self.stats["staged_in"] += 1
                # its data is on this site now: only this site's agents may take it
                srv.queue.push(lease.job, lease.priority, lease.shape._replace(site=rec.site))
                continue
            self.stats["stage_in_failed"] += 1
            why = f"stage-in failed (stager {rec.id}, {took}): {cap(d.get('msg') or '?', 1500)}"
            nxt = S.RESTART_READY if lease.retries < lease.max_retries else S.FAILED
            srv.batch.transition(lease.job, lease.state, [S.STAGE_IN_FAILED, nxt], now, why,
                                 retries=lease.retries + (nxt is S.RESTART_READY),
                                 run_state=S.STAGE_IN_FAILED.value, run_message=why)
            if nxt is S.RESTART_READY:
                n = self.fails[lease.job] = self.fails.get(lease.job, 0) + 1
                self.not_before[lease.job] = now + min(MAX_BACKOFF, 2.0 ** (n - 1))
                srv.queue.push(lease.job, lease.priority, lease.shape)
            else:
                srv.failed.append(lease.job)
        return refused

    def adopt(self, rec: StagerRec, holding: list[dict], now: float) -> None:
        """Work a stager still holds that this server does not know of (it restarted): its
        lease again, when the job is still held here (no transfer is done twice)."""
        for h in holding:
            job = h["job"]
            if job in self.held and job not in self.leases:
                self._lease(rec, [job], now, token=h["token"])

    def grant(self, rec: StagerRec, want: int, now: float) -> list[dict]:
        """Up to ``want`` held jobs of the stager's site, best first, within its window."""
        window, ahead = self.window(rec.site, rec.lookahead)
        n = min(want, window - ahead, MAX_GRANT)
        if n <= 0 or not self.held:
            return []
        picked, later, scanned = [], [], 0
        heap = self._heap
        while heap and len(picked) < n and scanned < MAX_SCAN:
            entry = heapq.heappop(heap)
            job = entry[1]
            held = self.held.get(job)
            if held is None or -entry[0] != held[0] or job in self.leases:
                continue  # a stale entry
            scanned += 1
            site = held[1].site
            if (site is not None and site != rec.site) or \
                    self.not_before.get(job, 0.0) > now:
                later.append(entry)
                continue
            picked.append(job)
        for entry in later:
            heapq.heappush(heap, entry)
        if len(heap) > 4 * len(self.held) + 1000:  # too many stale entries: rebuild
            self._heap = [(-p, j) for j, (p, _s) in self.held.items()]
            heapq.heapify(self._heap)
        return self._lease(rec, picked, now)

    def _lease(self, rec: StagerRec, picked: list[int], now: float,
               token: int | None = None) -> list[dict]:
        srv = self.srv
        srv.sync()
        rows = {}
        for part in chunks(picked, 900):
            for r in srv.conn.execute(_ROWS, {"ids": part}):
                rows[r.id] = r
        work = []
        for job in picked:
            prio, shape = self.held.pop(job)
            r = rows.get(job)
            if r is None or r.state not in {s.value for s in QUEUED} or not remote(r.input_url):
                continue  # removed, or changed by a user meanwhile
            tok = token if token is not None else self.next_token
            self.next_token = max(self.next_token, tok) + 1
            self.leases[job] = StageLease(job, rec.id, tok, rec.site, S(r.state), r.retries,
                                          r.max_retries, prio, shape, r.input_url, now)
            rec.leases.add(job)
            work.append({"job": job, "token": tok, "kind": "in", "url": r.input_url})
        return work

    # -- what transfer ls shows -------------------------------------------------------------
    def view(self, now: float) -> dict:
        sites: dict[str, dict] = {}
        for prio_shape in self.held.values():
            s = sites.setdefault(prio_shape[1].site or "*", {"held": 0, "leased": 0,
                                                             "staged_waiting": 0})
            s["held"] += 1
        for lease in self.leases.values():
            sites.setdefault(lease.site, {"held": 0, "leased": 0, "staged_waiting": 0})
            sites[lease.site]["leased"] += 1
        for job, info in self.staged.items():
            s = sites.setdefault(info.get("site") or "*", {"held": 0, "leased": 0,
                                                           "staged_waiting": 0})
            s["staged_waiting"] += 1
        stagers = [{"id": r.id, "site": r.site, "state": r.state, "started": r.started,
                    "silent_seconds": round(now - r.last_seen, 1), "leases": len(r.leases),
                    "report": r.report} for r in self.stagers.values()]
        return {"sites": sites, "stagers": stagers, "stats": dict(self.stats)}

    def lease_of(self, job: int) -> dict | None:
        lease = self.leases.get(job)
        if lease is None:
            return None
        return {"stager": lease.stager, "since": lease.since, "url": lease.url,
                "kind": "in"}


__all__ = ["StagingBook", "StageLease", "StagerRec", "file_name", "remote"]
