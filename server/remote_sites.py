"""Sites served by other pilotfish servers: the server's side of federation (no I/O here).

A remote site is held as a pseudo-agent ``site:<name>`` (never a real agent's id: those are
refused at hello). A job for a remote site is leased to that pseudo-agent exactly as a job is
leased to an agent -- the same Lease, the same ``jobs.agent`` column, the same reload at server
start -- but it is handed to the forwarder (``forward_take``), an edge process that publishes
it to the site's queue, instead of to a node. The forwarder's mirror reports the remote
states (``forward_report``); they are applied by ``JobServer.apply_updates``, the one
validated-transition path agents use, so every mirrored state is an event row and workflows
follow. A status for a job that is not leased to the reporting site (or for another attempt)
is refused like an agent's stale update.

Routing (:mod:`.routing`) happens when a job is taken: among its sites, the healthy one with
the shortest expected wait. A job goes elsewhere only when its site has been silent (no
heartbeat for ``silent_after`` seconds) while the job was still queued there and the site had
not said it has the job (``jobs.remote_accepted``, set by its first status message); once
accepted or started, it stays with its site, however long it is silent (no double runs).

The fence (see :mod:`.fence`): a forwarded job is stored held at its site; the site's first
status message makes it accepted here, and in that same turn the job is queued for a
``start`` control message to the site (``forward_take`` hands controls to the forwarder with
the forwards, again every ``resend_after`` until the site's bridge confirms). A kill here of a
forwarded job, or the re-routing of an unaccepted one, queues a ``cancel`` of that attempt
instead (kept in ``jobs.remote_cancel`` until confirmed, so a restart sends it again). A site
that refuses a forward at its intake (dead-lettered: an app it lacks, a bad value) says so in
a status message with ``refused``: the job goes to its other alternatives that have not
refused it (a refusal is usually the site's: an app it does not have), and fails here with
the sites' reasons, not retried, when none is left (the same forward would be refused again).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from pilotfish.errors import NotFound, ValidationError
from pilotfish.validate import check_name, echo

from . import routing, states
from .db import agents as agents_t
from .db import jobs
from .states import State

if TYPE_CHECKING:
    from .core import AgentRec, JobServer

log = logging.getLogger("pilotfish.server")
S = State
PREFIX = "site:"
#: Seconds without a heartbeat after which a site counts as silent (until the forwarder says).
SILENT_AFTER = 60.0
#: A forwarded job the site has not acknowledged is handed to the forwarder again after this
#: many seconds (the same message id: the site's intake key drops the copy).
RESEND_AFTER = 30.0
#: The forwarder counts as alive for this long after its last call (re-routing needs it: the
#: site's last status messages must have been read before it is declared silent).
FORWARDER_ALIVE = 30.0
MAX_TAKE = 1000

#: The failure a job in each state ends in when its site reports it failed without saying where.
_FAIL_FROM = {S.READY: S.STAGE_IN_FAILED, S.RESTART_READY: S.STAGE_IN_FAILED,
              S.STAGED_IN: S.PREPROCESS_FAILED, S.PREPROCESSED: S.RUN_FAILED,
              S.RUNNING: S.RUN_FAILED, S.EXECUTION_FINISHED: S.POSTPROCESS_FAILED,
              S.POSTPROCESSED: S.STAGE_OUT_FAILED}
_STEP_OF_FAILURE = {f: s for s, f in states.FAILURE_OF.items()}
_STEP_OF_FAILURE[S.RUN_TIMEOUT] = S.RUNNING
#: Remote states that only say the site has the job.
_ACCEPTED = frozenset({S.CREATED, S.AWAITING_PARENTS, S.READY, S.RESTART_READY})


def mirror_path(cur: State, to: State) -> list[State] | None:
    """The local path from ``cur`` to the remote's ``to`` along the pipeline (the steps a lost
    or reordered message skipped are passed through); None: nothing to do (a repeat or an
    older state). Pure."""
    pipe = states.PIPELINE
    at = -1 if cur in states.QUEUED else (pipe.index(cur) if cur in pipe else None)
    if at is None:
        return None  # the local job is past the pipeline (failed, killed): nothing to mirror
    if to in pipe:
        i = pipe.index(to)
        return list(pipe[at + 1:i + 1]) if i > at else None
    if to in _STEP_OF_FAILURE:
        i = pipe.index(_STEP_OF_FAILURE[to])
        return list(pipe[at + 1:i]) + [to] if i >= at else None
    if to in (S.FAILED, S.USER_KILLED):
        return [_FAIL_FROM[cur]] if cur in _FAIL_FROM else [S.FAILED]
    return None


@dataclass
class RemoteSite:
    name: str
    last_beat: float | None = None   # time.time() at this server when its last beat came
    backlog: int = 0
    capacity: int = 0
    silent_since: float | None = None  # when it was declared silent (None: it is not)

    def health(self) -> routing.Health:
        return routing.Health(self.last_beat, self.backlog, self.capacity)


class Remotes:
    def __init__(self, srv: "JobServer") -> None:
        self.srv = srv
        self.sites: dict[str, RemoteSite] = {}
        self.handed: dict[int, float] = {}    # job -> when last given to the forwarder
        self.accepted: set[int] = set()       # leased jobs their site said it has
        self.starting: dict[int, float] = {}  # accepted jobs -> when a start was last handed
        #: jobs -> the sites that refused them, with why (not routed there again; in memory
        #: only: after a restart a site may refuse a job once more)
        self.refused_by: dict[int, dict[str, str]] = {}
        #: (job, attempt) -> [site, when last handed]: cancels the site has not confirmed
        self.cancels: dict[tuple[int, int], list] = {}
        self.silent_after = SILENT_AFTER
        self.forwarder_seen: float | None = None

    @staticmethod
    def is_site_agent(aid: str) -> bool:
        return aid.startswith(PREFIX)

    # -- start ------------------------------------------------------------------------------
    def load(self, conn) -> None:
        """Known remote sites (their pseudo-agents' rows) and the accepted leased jobs."""
        for r in conn.execute(select(agents_t.c.id, agents_t.c.last_seen, agents_t.c.cores)
                              .where(agents_t.c.id.like(PREFIX + "%"))):
            name = r.id[len(PREFIX):]
            # the last beat as stored; the backlog is unknown until the next one
            self.sites[name] = RemoteSite(name, r.last_seen, 0, r.cores)
        queued = {s.value for s in states.QUEUED}
        for r in conn.execute(select(jobs.c.id, jobs.c.remote_accepted, jobs.c.state)
                              .where(jobs.c.agent.like(PREFIX + "%"))):
            if r.remote_accepted is not None:
                self.accepted.add(r.id)
                if r.state in queued:
                    self.starting[r.id] = 0.0  # its start may not have left: again
            else:
                self.handed[r.id] = 0.0  # published before this start, perhaps not: again
        for r in conn.execute(select(jobs.c.id, jobs.c.remote_cancel)
                              .where(jobs.c.remote_cancel.is_not(None))):
            try:
                for site, attempt in json.loads(r.remote_cancel):
                    self.cancels[(r.id, attempt)] = [site, 0.0]
            except (ValueError, TypeError):
                log.warning("job %d: unreadable remote_cancel %r: dropped", r.id,
                            r.remote_cancel)

    # -- sites ------------------------------------------------------------------------------
    def register(self, name: str, now: float) -> "AgentRec":
        """The pseudo-agent of a remote site, made at first mention."""
        from .core import AgentRec
        check_name(name, "site")
        srv = self.srv
        aid = PREFIX + name
        a = srv.agents.get(aid)
        if name not in self.sites:
            self.sites[name] = RemoteSite(name)
        if a is None:
            a = AgentRec(id=aid, host="remote", pid=0, site=name, pilot=None, cores=0, gpus=0,
                         memory=0, started=now, last_seen=now, launcher="remote")
            srv.agents[aid] = a
            if aid in srv._gone_agents or self._stored(aid):
                srv.batch.update_agent(aid, state="ALIVE", last_seen=now)
            else:
                srv.batch.agent_inserts.append(
                    {"id": aid, "host": "remote", "pid": 0, "site": name, "pilot": None,
                     "cores": 0, "gpus": 0, "memory": 0, "started": now, "last_seen": now,
                     "state": "ALIVE", "tasks_done": 0, "node": None, "node_cores": None,
                     "launcher": "remote"})
                srv.agent_event(a, None, "ALIVE", now, f"remote site {name} known")
        return a

    def _stored(self, aid: str) -> bool:
        self.srv.sync()
        return self.srv.conn.execute(select(agents_t.c.id).where(agents_t.c.id == aid)
                                     ).first() is not None

    def beat(self, name: str, backlog: int, capacity: int, now: float) -> None:
        a = self.register(name, now)
        s = self.sites[name]
        if s.silent_since is not None:
            self.srv.agent_event(a, "LOST", "ALIVE", now,
                                 f"remote site {name} heard again after "
                                 f"{now - s.silent_since:.0f} s of silence")
            log.info("remote site %s heard again", name)
            s.silent_since = None
        s.last_beat, s.backlog, s.capacity = now, backlog, capacity
        a.last_seen, a.seen, a.cores = now, time.monotonic(), capacity
        self.srv.batch.update_agent(a.id, last_seen=now, cores=capacity, state="ALIVE")

    def health(self) -> dict[str, routing.Health]:
        return {n: s.health() for n, s in self.sites.items()}

    def listing(self, now: float) -> list[dict]:
        out = []
        for n, s in sorted(self.sites.items()):
            a = self.srv.agents.get(PREFIX + n)
            out.append({"site": n, "healthy": routing.healthy(s.health(), now,
                                                              self.silent_after),
                        "last_heartbeat": s.last_beat,
                        "silent_seconds": None if s.last_beat is None
                        else round(now - s.last_beat, 1),
                        "backlog": s.backlog, "capacity": s.capacity,
                        "forwarded": len(a.leases) if a else 0})
        return out

    # -- forwarding -------------------------------------------------------------------------
    def take(self, sites: list[str], limit: int, silent_after: float, resend_after: float,
             now: float) -> dict[str, list[dict]]:
        """Jobs for the forwarder to publish: new ones routed now, and unacknowledged ones
        to publish again (same site, same attempt, so the same message id)."""
        srv = self.srv
        self.silent_after = silent_after
        self.forwarder_seen = time.monotonic()
        for n in sites:
            self.register(n, now)
        out: list[dict] = []
        resend = [j for j, t in self.handed.items() if now - t >= resend_after]
        for job in resend[:limit]:
            lease = srv.leases.get(job)
            if lease is None or not self.is_site_agent(lease.agent) \
                    or lease.state not in states.QUEUED or job in self.accepted:
                self.handed.pop(job, None)
                continue
            out.append((job, lease))
        # (none while the queue is still being read at start: a job not yet read may come first)
        taken = [] if srv.loading is not None else \
            srv.queue.take_sites(set(self.sites), max(0, limit - len(out)))
        rows = self._rows([j for j, _ in taken] + [j for j, _ in out])
        specs = [self._spec(rows[j], lease) for j, lease in out if j in rows]
        health = self.health()
        back = []
        for job, shape in taken:
            r = rows.get(job)
            if r is None:
                continue
            choices = json.loads(r.site_choices) if r.site_choices else [r.site]
            refused = self.refused_by.get(job, {})
            site = routing.choose([c for c in choices if c in self.sites and c not in refused],
                                  health, now, silent_after)
            if site is None:
                back.append((job, r.priority, shape))  # no healthy site: it waits
                continue
            a = srv.agents[PREFIX + site]
            attempt = r.attempts + 1
            from .core import Lease
            lease = Lease(job, a.id, attempt, S(r.state), r.retries, r.max_retries,
                          r.priority, shape)
            srv.leases[job] = lease
            a.leases.add(job)
            srv.batch.lease_job(job, attempt, a.id, None, now)
            if site != r.site:
                srv.batch.update_job(job, site=site)
            specs.append(self._spec(r, lease))
        for job, prio, shape in back:
            srv.queue.push(job, prio, shape)
        for s in specs:
            self.handed[s["job"]] = now
        return {"forwards": specs, "controls": self._controls(limit, resend_after, now)}

    def _controls(self, limit: int, resend_after: float, now: float) -> list[dict]:
        """Start and cancel messages due: new ones, and those not confirmed after
        ``resend_after`` (the site does each at most once: they are idempotent there)."""
        srv = self.srv
        out: list[dict] = []
        for job, t in list(self.starting.items()):
            if len(out) >= limit:
                break
            lease = srv.leases.get(job)
            if lease is None or not self.is_site_agent(lease.agent) \
                    or lease.state not in states.QUEUED:
                self.starting.pop(job, None)
                continue
            site = lease.agent[len(PREFIX):]
            if now - t >= resend_after and (t == 0.0 or self._heard(site, now)):
                out.append({"action": "start", "job": job, "attempt": lease.attempt,
                            "site": site})
                self.starting[job] = now
        for (job, attempt), entry in self.cancels.items():
            if len(out) >= limit:
                break
            # sent once, again only while the site beats (a silent site's queue keeps the
            # first; copies would pile up there)
            if now - entry[1] >= resend_after and (entry[1] == 0.0
                                                   or self._heard(entry[0], now)):
                out.append({"action": "cancel", "job": job, "attempt": attempt,
                            "site": entry[0]})
                entry[1] = now
        return out

    def _heard(self, site: str, now: float) -> bool:
        s = self.sites.get(site)
        return s is not None and s.last_beat is not None \
            and now - s.last_beat <= self.silent_after

    def cancel(self, lease, now: float) -> None:
        """A forwarded attempt is taken back (killed here, or routed elsewhere): its site is
        told to cancel it; until it confirms, the cancel is sent again (and kept in the job's
        row across restarts)."""
        job = lease.job
        self.handed.pop(job, None)
        self.starting.pop(job, None)
        self.accepted.discard(job)
        self.cancels[(job, lease.attempt)] = [lease.agent[len(PREFIX):], 0.0]
        self._store_cancels(job)

    def _store_cancels(self, job: int) -> None:
        mine = [[e[0], a] for (j, a), e in self.cancels.items() if j == job]
        self.srv.batch.update_job(job, remote_cancel=json.dumps(mine) if mine else None)

    def _rows(self, ids: list[int]) -> dict[int, Any]:
        from .store import chunks
        srv = self.srv
        srv.sync()
        rows = {}
        cols = (jobs.c.id, jobs.c.name, jobs.c.app_id, jobs.c.parameters, jobs.c.site,
                jobs.c.site_choices, jobs.c.wall_time_minutes, jobs.c.num_nodes,
                jobs.c.processes_per_node, jobs.c.cpus_per_process, jobs.c.gpus_per_process,
                jobs.c.input_url, jobs.c.output_url, jobs.c.group_identifier, jobs.c.priority,
                jobs.c.attempts, jobs.c.retries, jobs.c.max_retries, jobs.c.state)
        for part in chunks(ids, 900):
            for r in srv.conn.execute(select(*cols).where(jobs.c.id.in_(part))):
                rows[r.id] = r
        return rows

    def _spec(self, r: Any, lease) -> dict:
        """What the forwarder publishes: the job as a job message for the site's receiver (the
        site runs it once, with no retries of its own: retries are this server's)."""
        app = self.srv.apps[r.app_id]
        msg = {"name": r.name, "application": app.name, "parameters": r.parameters,
               "num_nodes": r.num_nodes, "processes_per_node": r.processes_per_node,
               "cpus_per_process": r.cpus_per_process, "gpus_per_process": r.gpus_per_process,
               "wall_time_minutes": r.wall_time_minutes, "input_url": r.input_url,
               "output_url": r.output_url, "group_identifier": r.group_identifier,
               "max_retries": 0}
        return {"job": r.id, "attempt": lease.attempt, "site": lease.agent[len(PREFIX):],
                "message": {k: v for k, v in msg.items() if v is not None}}

    # -- mirroring --------------------------------------------------------------------------
    def report(self, site: str, items: list[dict], now: float) -> dict:
        """Apply a site's status of jobs forwarded to it; refuse the others (logged)."""
        srv = self.srv
        a = srv.agents.get(PREFIX + site) if site in self.sites else None
        if a is None:
            raise NotFound(f"no remote site {echo(site)} is known here")
        applied, refused = 0, []
        for it in items:
            job, attempt, to = it.get("job"), it.get("attempt"), it.get("to")
            lease = srv.leases.get(job) if type(job) is int else None
            if type(job) is int and type(attempt) is int and it.get("control") is not None:
                applied += self._control_done(site, lease, job, attempt, it)
                continue
            entry = self.cancels.get((job, attempt)) if type(job) is int \
                and type(attempt) is int else None
            if entry is not None and entry[0] == site:
                applied += 1  # the status of an attempt taken back: its cancel is on its way
                continue
            if lease is None or lease.agent != a.id or lease.attempt != attempt:
                why = (f"job {echo(job)} attempt {echo(attempt)} is not forwarded to site "
                       f"{site}")
                log.warning("remote site %s: status refused: %s", site, why)
                refused.append({"job": job, "attempt": attempt, "why": why})
                continue
            try:
                target = S(to)
            except (ValueError, TypeError):  # not a state name (a list, a map: unhashable)
                refused.append({"job": job, "attempt": attempt,
                                "why": f"unknown state {echo(to)}"})
                continue
            if it.get("refused") is True and lease.state in states.QUEUED \
                    and job not in self.accepted:  # (a site that has the job refuses none)
                # the site's intake refused the forward: its other sites, else it fails here
                # with the sites' reasons (no retry: the same forward would be refused again)
                why = f"refused by site {site}" + (f": {it['msg']}" if it.get("msg") else "")
                log.warning("job %s: %s", job, why)
                self.handed.pop(job, None)
                self._refused(lease, site, why, now)
                applied += 1
                continue
            if target in _ACCEPTED:
                self.refused_by.pop(job, None)
                if job not in self.accepted:
                    # the fence: accepted and confirmed in this one turn; from now on it is
                    # never routed elsewhere, and its site may start it
                    self.accepted.add(job)
                    self.handed.pop(job, None)
                    self.starting[job] = 0.0
                    srv.batch.update_job(job, remote_accepted=now)
                applied += 1
                continue
            path = mirror_path(lease.state, target)
            if not path:
                continue
            self.accepted.discard(job)
            self.handed.pop(job, None)
            self.starting.pop(job, None)
            t = it.get("time") if isinstance(it.get("time"), (int, float)) else now
            upd = {"job": job, "attempt": attempt, "states": [p.value for p in path],
                   "msg": f"at site {site}" + (f": {it['msg']}" if it.get("msg") else "")}
            if S.RUNNING in path:
                upd["start"] = t
            if path[-1] is S.JOB_FINISHED or path[-1] in states.FAILURES \
                    or path[-1] is S.FAILED:
                upd["end"] = t
            if path[-1] is S.FAILED:  # not a pipeline failure: ends the lease by hand
                self._fail(lease, upd, now)
                applied += 1
                continue
            bad = srv.apply_updates(a, [upd], now)
            if bad:
                refused.append({"job": job, "attempt": attempt,
                                "why": f"illegal change to {target.value}"})
            else:
                applied += 1
        return {"applied": applied, "refused": refused}

    def _refused(self, lease, site: str, why: str, now: float) -> None:
        """A site refused the job: to its other alternatives, else FAILED."""
        srv = self.srv
        job = lease.job
        refused = self.refused_by.setdefault(job, {})
        refused[site] = why
        srv.sync()
        r = srv.conn.execute(select(jobs.c.site_choices).where(jobs.c.id == job)).first()
        choices = json.loads(r.site_choices) if r is not None and r.site_choices else []
        left = [c for c in choices if c not in refused]
        if left:
            srv.drop_lease(lease, now, f"{why}; routed to its other sites ({', '.join(left)})",
                           counts=False)
            return
        self.refused_by.pop(job, None)
        self._fail(lease, {"msg": "; ".join(refused.values()), "end": now}, now,
                   [S.STAGE_IN_FAILED, S.FAILED])

    def _control_done(self, site: str, lease, job: int, attempt: int, it: dict) -> int:
        """A site's bridge confirms a start or a cancel: it is not sent again."""
        if it["control"] == "start":
            if lease is not None and lease.agent == PREFIX + site and lease.attempt == attempt:
                self.starting.pop(job, None)
            return 1
        if it["control"] == "cancel":
            entry = self.cancels.get((job, attempt))
            if entry is not None and entry[0] == site:
                del self.cancels[(job, attempt)]
                self._store_cancels(job)
                log.info("job %d attempt %d: cancel confirmed by site %s (%s)", job, attempt,
                         site, it.get("result"))
            return 1
        return 0

    def _fail(self, lease, upd: dict, now: float, path=(S.FAILED,)) -> None:
        srv = self.srv
        srv.batch.transition(lease.job, lease.state, list(path), now, upd["msg"], agent=None,
                             ended=upd.get("end"), run_state="FAILED",
                             run_message=upd["msg"])
        srv._end_lease(lease, now, None)
        srv.failed.append(lease.job)

    # -- silence ----------------------------------------------------------------------------
    def expire(self, now: float) -> None:
        """Sites silent for ``silent_after``: their queued, unacknowledged jobs go back to the
        queue (routed again at the next take); accepted or started ones stay. Only while the
        forwarder is alive (it reads the sites' status: a stale status queue is no silence)."""
        alive = (self.forwarder_seen is not None
                 and time.monotonic() - self.forwarder_seen < FORWARDER_ALIVE)
        for name, s in self.sites.items():
            if not alive or s.last_beat is None or now - s.last_beat <= self.silent_after:
                continue
            a = self.srv.agents.get(PREFIX + name)
            if a is None:
                continue
            if s.silent_since is None:
                s.silent_since = now
                self.srv.agent_event(a, "ALIVE", "LOST", now,
                                     f"remote site {name} silent {now - s.last_beat:.0f} s")
                log.warning("remote site %s silent %.0f s: its unacknowledged jobs are "
                            "routed again", name, now - s.last_beat)
            for job in list(a.leases):
                lease = self.srv.leases[job]
                if lease.state in states.QUEUED and job not in self.accepted:
                    # the site may still hold it, stored and never confirmed: held there
                    # until this cancel reaches it (the fence: it never runs it)
                    self.cancel(lease, now)
                    self.srv.drop_lease(lease, now, f"site {name} silent "
                                        f"{now - s.last_beat:.0f} s before it had the job",
                                        counts=False)

    def waiting(self, job: int, site: str | None, leased: float | None, queued: float,
                now: float) -> dict | None:
        """Where a queued job of a remote site waits, for `workflow show`: its site (forwarded
        there, or waiting for it to be healthy), since when, the site's silence."""
        lease = self.srv.leases.get(job)
        if lease is not None and self.is_site_agent(lease.agent):
            name, since, forwarded = lease.agent[len(PREFIX):], leased, True
        elif lease is None and site in self.sites:
            name, since, forwarded = site, queued, False
        else:
            return None
        s = self.sites.get(name)
        return {"site": name, "forwarded": forwarded, "since": since,
                "accepted": job in self.accepted,
                "silent_seconds": None if s is None or s.last_beat is None
                else round(now - s.last_beat, 1),
                "healthy": s is not None and routing.healthy(s.health(), now,
                                                             self.silent_after)}


def check_site_name(value: Any) -> str:
    if not isinstance(value, str):
        raise ValidationError(f"site must be a name, got {echo(value)}")
    return check_name(value, "site")
