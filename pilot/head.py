"""The pilot head: what a pilot's batch script runs (``pilotfish pilot run``).

It finds the allocation's nodes, starts ONE node agent per node through the site's launcher
with full-node depth and binding off (so no agent is pinned to one core: the BOSS-LDG lesson),
supervises them, and leaves cleanly: the agents go at their idle timeout or before the
allocation ends (they get ``PILOTFISH_END_TIME`` a margin ahead of the batch system's kill), and
SIGTERM/SIGINT to the head reaches every agent, which hands its tasks back to the server.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

from pilotfish.errors import PilotfishError, ValidationError
from pilotfish.launcher import LaunchRequest, build

from .launch import PASS_ENV, hosts_for, resolve
from .nodes import discover
from .resources import detect_end_time, node_cpus

log = logging.getLogger("pilotfish.pilot")
#: Agents are told to end this long before the allocation does (at most 5% of it), so their
#: goodbyes and hand-backs reach the server before the batch system kills the job.
END_MARGIN = 60.0
#: After asking the agents to stop, wait this long before killing the launcher.
STOP_GRACE = 15.0

_JOB_IDS = (("SLURM_JOB_ID", "slurm"), ("PBS_JOBID", "pbs"), ("COBALT_JOBID", "cobalt"),
            ("LSB_JOBID", "lsf"), ("_CONDOR_JOB_AD", "condor"))


@dataclass
class HeadPlan:
    """Everything the head will do, decided before anything starts (``--dry-run`` prints it)."""
    pilot: str
    nodes: list[str]
    node_source: str
    cpus_per_node: int
    launcher: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    end_time: float | None = None

    def to_dict(self) -> dict:
        return {"pilot": self.pilot, "nodes": self.nodes, "node_source": self.node_source,
                "cpus_per_node": self.cpus_per_node, "launcher": self.launcher,
                "argv": self.argv, "end_time": self.end_time}


def pilot_id(environ: dict[str, str]) -> str:
    """``slurm-1234`` from the batch job's id, else ``local-<host>-<pid>``."""
    for var, kind in _JOB_IDS:
        if environ.get(var) and var != "_CONDOR_JOB_AD":
            return f"{kind}-{environ[var].split('.')[0]}"
    return f"local-{socket.gethostname().split('.')[0]}-{os.getpid()}"


def default_launcher(environ: dict[str, str], nnodes: int) -> str:
    """The site's launcher as the batch environment tells it (a site profile overrides)."""
    if environ.get("SLURM_JOB_ID"):
        return "srun"
    if environ.get("COBALT_JOBID"):
        return "aprun"
    if environ.get("LSB_JOBID"):
        return "jsrun"
    if environ.get("PBS_JOBID"):
        return "pals" if os.path.exists("/opt/cray/pals") else "mpiexec"
    return "local" if nnodes == 1 else "mpiexec"


def plan(agent_args: list[str], *, environ: dict[str, str], server: str,
         home: str | None = None, nodes: str | None = None, launcher: str | None = None,
         mpi: str | None = None, cpus_per_node: int | None = None,
         walltime: float | None = None, relay: str | None = None,
         pilot: str | None = None, server_key: str | None = None,
         client_key: str | None = None) -> HeadPlan:
    """Decide the agents' launch: nodes, launcher, argv and environment. Pure but for lookups
    of the launcher program and the batch job's end time. ``server_key``/``client_key``: key
    files (on a file system the nodes share) handed to every agent, or to the relay."""
    hosts, source = discover(environ, nodes)
    launcher = launcher or default_launcher(environ, len(hosts))
    program = resolve(launcher, environ.get("PATH"))
    if launcher == "local" and len(hosts) > 1:
        raise ValidationError(f"{len(hosts)} nodes ({source}) but launcher 'local' starts "
                              "agents on this node only; pick srun, aprun, mpiexec, ...")
    cpus = cpus_per_node or len(node_cpus())
    if cpus < 1:
        raise ValidationError("--cpus-per-node must be at least 1")
    pid = pilot or pilot_id(environ)
    end = detect_end_time(walltime)
    if end is not None:
        end -= min(END_MARGIN, 0.05 * max(0.0, end - time.time()))
    base = [sys.executable, "-m", "pilotfish"] + (["--home", home] if home else [])
    agent = ["--pilot", pid, "--launcher", launcher] + (["--mpi", mpi] if mpi else []) \
        + list(agent_args)
    keys = (["--server-key", server_key] if server_key else []) + \
        (["--client-key", client_key] if client_key else [])
    if relay == "mpi":
        cmd = base + ["pilot", "relay", "--server", server] + keys + ["--"] + agent
    elif relay is None:
        cmd = base + ["pilot", "agent", "--server", server] + keys + agent
    else:
        raise ValidationError(f"--relay {relay!r}: the only relay is 'mpi'")
    env = {k: environ[k] for k in PASS_ENV if k in environ}
    env.update({k: v for k, v in environ.items()
                if k.startswith("PILOTFISH_") and k != "PILOTFISH_END_TIME"})
    if end is not None:
        env["PILOTFISH_END_TIME"] = f"{end:.0f}"
    if launcher == "local":
        argv = cmd
    else:
        req = LaunchRequest(nodes=len(hosts), ranks_per_node=1, cpus_per_rank=cpus,
                            argv=tuple(cmd), cpu_bind="none",
                            hosts=hosts_for(launcher, hosts),
                            env=tuple(env.items()),
                            mpi=mpi if relay == "mpi" else None)
        argv = build(launcher, req)
        argv[0] = program or argv[0]
    return HeadPlan(pid, hosts, source, cpus, launcher, argv, env, end)


class Head:
    def __init__(self, p: HeadPlan) -> None:
        self.plan = p
        self.proc: subprocess.Popen | None = None
        self.stop_asked: float | None = None

    def _on_signal(self, signum, _frame) -> None:
        log.info("pilot %s: %s: stopping the agents", self.plan.pilot,
                 signal.Signals(signum).name)
        self.stop()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None and self.stop_asked is None:
            self.stop_asked = time.time()
            self.proc.send_signal(signal.SIGTERM)

    def run(self) -> int:
        p = self.plan
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        log.info("pilot %s: %d nodes from %s (%s), %d CPUs each, launcher %s", p.pilot,
                 len(p.nodes), p.node_source, _short(p.nodes), p.cpus_per_node, p.launcher)
        log.info("pilot %s: starting agents: %s", p.pilot, " ".join(p.argv))
        env = dict(os.environ)
        if p.end_time is not None:
            env["PILOTFISH_END_TIME"] = p.env["PILOTFISH_END_TIME"]
        started = time.time()
        try:
            self.proc = subprocess.Popen(p.argv, env=env, stdin=subprocess.DEVNULL)
        except OSError as exc:
            raise PilotfishError(f"cannot start {p.argv[0]}: {exc.strerror or exc}") from None
        while True:
            try:
                rc = self.proc.wait(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                pass
            now = time.time()
            if p.end_time is not None and now > p.end_time + STOP_GRACE:
                self.stop()  # agents should have left by themselves: make sure
            if self.stop_asked is not None and now > self.stop_asked + STOP_GRACE:
                log.warning("pilot %s: agents still running %.0f s after SIGTERM: killing",
                            p.pilot, STOP_GRACE)
                self.proc.kill()
        log.info("pilot %s: agents ended (exit %d) after %.1f s", p.pilot, rc,
                 time.time() - started)
        return rc if rc >= 0 else 128 - rc


def _short(hosts: list[str]) -> str:
    return ",".join(hosts) if len(hosts) <= 8 else f"{','.join(hosts[:4])},...,{hosts[-1]}"
