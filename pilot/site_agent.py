"""The site agent: elastic provisioning on a site's login node, a client of the server.

Every round it (1) asks the scheduler about this site's pilots and tells the server what changed,
(2) asks the server for the site's backlog, (3) decides with :mod:`.provision` what to submit or
cancel, and (4) does it. Between those rounds (``poll`` seconds apart: the scheduler is asked no
more often than that), quick rounds every ``quick`` seconds skip step (1) and the backfill query,
so a backlog that appears gets its pilots within a second, not a poll later (the policy's
stagger and caps still apply). Being a client, one server can feed many sites. After
``MAX_FAILURES`` submissions in a row fail, provisioning pauses with the error reported to the
server (``pilotfish site status``) instead of looping; it tries again after ``resume_after``.
"""
from __future__ import annotations

import logging
import math
import os
import secrets
import signal
import socket
import sys
import time
from pathlib import Path

from pilotfish.client import Client
from pilotfish.errors import PilotfishError
from pilotfish.pilotstate import PilotState
from pilotfish.site_configs.schema import Site

from .batch import get as get_batch
from .batch.base import BatchError, BatchSystem, PilotSpec, Submitted
from .batch_poll import poll, unsettled
from .provision import Plan, Policy, decide

log = logging.getLogger("pilotfish.site")
MAX_FAILURES = 3


def cpus_per_node(site: Site) -> int:
    if site.node is None and site.scheduler == "local":
        return len(os.sched_getaffinity(0))  # the node is this machine
    if site.node is None:
        raise PilotfishError(f"site {site.name}: the profile has no node shape (node.cores); "
                             "pilots cannot be sized")
    return site.node.cores * site.node.threads_per_core


def new_pilot_id(site: Site) -> str:
    return f"{site.name}-{time.strftime('%m%d%H%M%S')}-{secrets.token_hex(2)}"


def build_spec(site: Site, *, nodes: int, walltime_minutes: float, home: Path, server: str,
               queue: str | None = None, project: str | None = None,
               pilot_id: str | None = None, image: str | None = None,
               runtime: str | None = None, leave_when_no_work: str | None = None) -> PilotSpec:
    """The batch job of one pilot of ``site``: its head command and the profile's extras.

    With ``image`` the whole pilot (head and agents) runs inside that image, with ``runtime``
    (default: the site's), as the LIGO glideins ran inside Shifter on Blue Waters.
    ``leave_when_no_work`` (default: the profile's) is handed to the agents.
    """
    pid = pilot_id or new_pilot_id(site)
    head = [sys.executable, "-m", "pilotfish", "--home", str(home), "pilot", "run",
            "--server", site.server_address or server, "--pilot", pid,
            "--launcher", site.launcher]
    if site.mpi:
        head += ["--mpi", site.mpi]
    if site.pilot.relay:
        head += ["--relay", site.pilot.relay]
    head += ["--", "--site", site.name, "--idle-timeout", f"{site.pilot.idle_timeout:g}",
             "--leave-when-no-work", leave_when_no_work or site.pilot.leave_when_no_work]
    # $SCRATCH-style variables are the compute node's: the agent expands them there
    scratch = site.scratch
    if scratch:
        head += ["--work-root", scratch]
    for root in site.data_roots:  # expanded by each agent on its node, like scratch
        head += ["--data-root", root]
    if site.staging is not None and site.staging.timeout is not None:
        head += ["--stage-timeout", f"{site.staging.timeout:g}"]
    if site.staging is not None and site.staging.max_bytes is not None:
        head += ["--stage-max-bytes", str(site.staging.max_bytes)]
    if site.transfers is not None:  # where the site stager puts inputs, as nodes see it
        head += ["--staging-dir", site.transfers.staging_dir or
                 (f"{scratch}/pilotfish-staging" if scratch else str(home / "staging"))]
    if site.container != "none":  # apps that name an image run in it with the site's runtime
        head += ["--container-runtime", site.container]
        for bind in ([scratch] if scratch else []) + list(site.binds):
            head += ["--bind", bind]
    pilot_env: tuple[tuple[str, str], ...] = ()
    pilot_directives: tuple[str, ...] = ()
    if image:
        from pilotfish.container import pilot_level
        pc = pilot_level(runtime or site.container, image, site.scheduler)
        head = list(pc.head_prefix) + head
        pilot_env, pilot_directives = tuple(pc.env), tuple(pc.directives)
    # a Slurm QOS "queue" (NERSC regular/debug) is asked for with --qos, not as a partition
    q, queue_extra = site.queue_request(queue or site.queue_for(nodes, walltime_minutes))
    extra = list(site.batch.directives) + queue_extra + list(pilot_directives)
    node = site.node
    return PilotSpec(
        name=pid, nodes=nodes, walltime_minutes=math.ceil(walltime_minutes),
        cores_per_node=cpus_per_node(site), workdir=home / "pilots" / pid,
        head_argv=tuple(head), queue=q, project=project or site.account,
        gpus_per_node=node.gpus if node else 0,
        memory_mb=int(node.memory_gb * 1024) if node and node.memory_gb else None,
        directives=tuple(extra),
        setup=tuple([f"module load {m}" for m in site.batch.modules] + site.batch.setup),
        env=tuple(site.batch.env.items()) + pilot_env)


def submit(site: Site, batch: BatchSystem, client: Client, spec: PilotSpec,
           why: str = "by hand") -> Submitted:
    """Submit one pilot and record it with the server (script, output and id kept on disk)."""
    spec.workdir.mkdir(parents=True, exist_ok=True)
    sub = batch.submit(spec)
    client.add_pilot(id=spec.name, site=site.name, scheduler=batch.name,
                     batch_id=sub.batch_id, nodes=spec.nodes,
                     walltime_minutes=float(spec.walltime_minutes), queue=spec.queue,
                     project=spec.project, state="QUEUED", reason=why,
                     workdir=str(spec.workdir))
    log.info("site %s: submitted pilot %s (batch id %s, %d nodes, %d min): %s", site.name,
             spec.name, sub.batch_id, spec.nodes, spec.walltime_minutes, why)
    return sub


def policy_of(site: Site) -> Policy:
    p = site.pilot
    caps = [q.max_nodes for q in site.queues.values() if q.max_nodes]
    return Policy(cpus_per_node=cpus_per_node(site), nodes=p.nodes, min_walltime=p.min_walltime,
                  max_walltime=p.max_walltime, max_queued=p.max_queued,
                  max_nodes=p.max_nodes or 10**6, submit_interval=p.submit_interval,
                  max_submits_per_interval=p.max_submits_per_interval,
                  prefer_backfill=p.prefer_backfill,
                  max_nodes_per_pilot=max(caps) if caps else None)


class SiteAgent:
    def __init__(self, site: Site, client: Client, home: Path, server: str,
                 batch: BatchSystem | None = None, poll: float = 5.0,
                 resume_after: float = 1800.0, stager=None, provision: bool = True,
                 quick: float = 1.0) -> None:
        self.site = site
        #: the site stager (pilot/site_stager.py), a thread of its own; None: no staging here
        self.stager = stager
        self.provision = provision
        self.client = client
        self.home = home
        self.server = server
        self.batch = batch or get_batch(site.scheduler)
        self.policy = policy_of(site)
        self.poll = poll
        self.quick = quick
        self.windows: list = []
        self.resume_after = resume_after
        self.recent: list[float] = []
        self.failures = 0
        self.paused_at: float | None = None
        self.error: str | None = None
        self.stopping = False
        self.submitted = 0

    # -- one round --------------------------------------------------------------------------
    def refresh(self) -> list[dict]:
        """Ask the scheduler about our recorded pilots; tell the server what changed. Returns
        the pilots that have not ended (by their agents' or the scheduler's word)."""
        mine = [p for p in self.client.pilots(all=True, site=self.site.name)
                if p["batch_id"] and p["scheduler"] == self.batch.name]
        if not unsettled(mine):
            return []
        if poll(self.client, mine, lambda _name: self.batch, warn=True):
            mine = [p for p in self.client.pilots(all=True, site=self.site.name)
                    if p["batch_id"] and p["scheduler"] == self.batch.name]
        return [p for p in mine if not PilotState(p["state"]).final]

    def live_known(self) -> list[dict]:
        """This site's pilots that have not ended, by the server's word alone (quick rounds)."""
        return [p for p in self.client.pilots(site=self.site.name)
                if p["batch_id"] and p["scheduler"] == self.batch.name
                and not PilotState(p["state"]).final]

    def round(self, now: float | None = None, scheduler: bool = True) -> Plan:
        """One round; ``scheduler=False``: a quick one (no scheduler query, no report)."""
        now = now or time.time()
        if not self.provision:
            if scheduler:
                self.report()
            return Plan()
        if not scheduler:
            backlog = self.client.site_backlog(self.site.name)
            live = self.live_known()
            if not backlog["queued"] and not any(p["state"] == PilotState.QUEUED.value
                                                 for p in live):
                return Plan()  # nothing to submit, nothing to cancel
        else:
            live = self.refresh()
            backlog = self.client.site_backlog(self.site.name)
        windows = self.windows if not scheduler else []
        if scheduler and self.policy.prefer_backfill and backlog["queued"]:
            try:
                windows = self.windows = self.batch.windows()
            except BatchError as exc:
                log.warning("site %s: no backfill windows: %s", self.site.name, exc)
        self.recent = [t for t in self.recent if now - t < self.policy.submit_interval]
        plan = decide(self.policy, backlog, live, windows, self.recent, now)
        for note in plan.notes:
            log.info("site %s: %s", self.site.name, note)
        for c in plan.cancels:
            p = next(p for p in live if p["id"] == c.pilot)
            try:
                self.batch.cancel(p["batch_id"])
                self.client.update_pilot(p["id"], state="CANCELLED", reason=c.why)
                log.info("site %s: cancelled queued pilot %s: %s", self.site.name, p["id"],
                         c.why)
            except BatchError as exc:
                log.warning("site %s: cannot cancel pilot %s: %s", self.site.name, p["id"], exc)
        if self.paused_at is not None:
            if now - self.paused_at < self.resume_after:
                plan.submits = []
            else:
                log.info("site %s: trying to submit again after the pause", self.site.name)
                self.paused_at = None
        for s in plan.submits:
            try:
                spec = build_spec(self.site, nodes=s.nodes, walltime_minutes=s.walltime_minutes,
                                  home=self.home, server=self.server)
                submit(self.site, self.batch, self.client, spec, s.why)
            except PilotfishError as exc:  # BatchError, or a queue limit of the profile
                self.failures += 1
                self.error = str(exc)
                log.error("site %s: submission failed (%d in a row): %s", self.site.name,
                          self.failures, exc)
                if self.failures >= MAX_FAILURES:
                    self.paused_at = now
                    log.error("site %s: provisioning PAUSED after %d failed submissions; "
                              "fix the cause (see `pilotfish site status`); retrying in %.0f s",
                              self.site.name, self.failures, self.resume_after)
                break
            self.failures = 0
            self.error = None
            self.recent.append(now)
            self.submitted += 1
        if scheduler:
            self.report()
        return plan

    def report(self) -> None:
        self.client.site_report(self.site.name, host=socket.gethostname(), pid=os.getpid(),
                                paused=self.paused_at is not None, error=self.error)

    # -- the loop ---------------------------------------------------------------------------
    def _on_signal(self, signum, _frame) -> None:
        self.stopping = True

    def run(self, once: bool = False, max_rounds: int | None = None) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        log.info("site agent for %s (%s, launcher %s): %d-node pilots, at most %d queued, "
                 "%s nodes in all, a round every %g s", self.site.name, self.batch.name,
                 self.site.launcher, self.policy.nodes, self.policy.max_queued,
                 self.policy.max_nodes, self.poll)
        thread = None
        if self.stager is not None:
            from .site_stager import start_thread
            thread = start_thread(self.stager)
        rounds = 0
        while not self.stopping:
            try:
                self.round()
            except PilotfishError as exc:
                log.warning("site %s: round failed: %s", self.site.name, exc)
            rounds += 1
            if once or (max_rounds is not None and rounds >= max_rounds):
                break
            deadline = time.time() + self.poll
            quick = time.time() + self.quick if self.quick else deadline
            while not self.stopping and time.time() < deadline:
                time.sleep(max(0.0, min(0.2, self.poll, deadline - time.time(),
                                        quick - time.time())))
                if self.quick and time.time() >= quick and time.time() < deadline:
                    quick = time.time() + self.quick
                    try:
                        self.round(scheduler=False)
                    except PilotfishError as exc:
                        log.warning("site %s: quick round failed: %s", self.site.name, exc)
        if thread is not None:
            self.stager.stop()
            thread.join(10)
        log.info("site agent for %s stops after %d rounds, %d pilots submitted",
                 self.site.name, rounds, self.submitted)
        return 0
