"""How a node agent starts a task of several ranks (an MPI job) with its pilot's launcher.

The server sends such a task with a ``launch`` map (nodes, ranks per node, depth, GPUs, hosts);
this module turns it into the launcher's argv with :mod:`pilotfish.launcher`. Single-node
multi-rank tasks are pinned to exactly the cores the agent gave them (``cpu_bind="list"``), so
small MPI jobs can share a node; multi-node ones get whole nodes and depth binding.
"""
from __future__ import annotations

import os
import shutil
from typing import Mapping

from pilotfish import protocol as P
#: PASS_ENV: the only variables of the agent's own environment that reach the ranks (launchers
#: are told exactly what to pass; the whole environment never is).
from pilotfish.envpolicy import PASS_ENV, refused_env_name
from pilotfish.errors import PilotfishError, ProtocolError, ValidationError
from pilotfish.launcher import LAUNCHERS, LaunchRequest, build

#: The program each launcher runs (PALS is Cray's mpiexec); ``local`` runs none.
PROGRAMS = {"srun": "srun", "aprun": "aprun", "mpiexec": "mpiexec", "pals": "mpiexec",
            "mpirun": "mpirun", "jsrun": "jsrun", "local": None}


def hosts_for(launcher: str, hosts: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Node names as the launcher takes them: aprun -L wants ALPS nids (``nid03835`` ->
    ``3835``), jsrun picks hosts through resource sets; others take the names."""
    if launcher == "jsrun":
        return ()
    if launcher == "aprun":
        nids = [h[3:].lstrip("0") or "0" for h in hosts if h.startswith("nid") and h[3:].isdigit()]
        return tuple(nids) if len(nids) == len(hosts) else ()
    return tuple(hosts)


def resolve(launcher: str, path: str | None = None) -> str | None:
    """The launcher's program as an absolute path (None for ``local``), or a one-line error."""
    if launcher not in LAUNCHERS:
        raise PilotfishError(f"unknown launcher {launcher!r}; known: "
                             f"{', '.join(sorted(LAUNCHERS))}")
    program = PROGRAMS[launcher]
    if program is None:
        return None
    found = shutil.which(program, path=path)
    if not found:
        raise PilotfishError(f"launcher {launcher!r} needs `{program}`, which is not on this "
                             "node's PATH; pick the launcher this site has (--launcher)")
    return found


class TaskLauncher:
    """Callable given to the executor: a task with ``launch`` -> the argv to spawn."""

    def __init__(self, launcher: str, node: str, mpi: str | None = None,
                 overlap: bool = False, environ: Mapping[str, str] | None = None) -> None:
        self.launcher = launcher
        self.program = resolve(launcher, (environ or os.environ).get("PATH"))
        self.node = node
        self.mpi = mpi
        self.overlap = overlap
        env = os.environ if environ is None else environ
        self.base_env = tuple((k, env[k]) for k in PASS_ENV if k in env)

    def request(self, spec: dict, cores: list[int], argv: list[str] | None = None
                ) -> LaunchRequest:
        try:
            lm = P.check_fields(P.LAUNCH, spec["launch"], "launch")
        except ProtocolError as exc:
            raise ValidationError(str(exc)) from None
        nodes = lm["nodes"]
        hosts = hosts_for(self.launcher, tuple(lm["hosts"]) or (self.node,))
        single = nodes == 1
        env = dict(self.base_env)
        # names refused at `app add` (pilotfish.envpolicy) are dropped here too
        env.update({k: v for k, v in (spec.get("env") or {}).items()
                    if refused_env_name(k) is None})
        env.update(PILOTFISH_JOB_ID=str(spec["job"]), PILOTFISH_ATTEMPT=str(spec["attempt"]),
                   PILOTFISH_JOB_NAME=spec["name"], OMP_NUM_THREADS=str(lm["cpus_per_rank"]))
        return LaunchRequest(
            nodes=nodes, ranks_per_node=lm["ranks_per_node"], cpus_per_rank=lm["cpus_per_rank"],
            gpus_per_rank=lm["gpus_per_rank"], argv=tuple(argv or spec["argv"]),
            cpu_bind="list" if single else "cores",
            cpu_list=tuple(cores) if single else (), hosts=hosts,
            env=tuple(env.items()), mpi=self.mpi, overlap=self.overlap)

    def argv(self, spec: dict, cores: list[int], inner: list[str] | None = None) -> list[str]:
        if self.program is None:
            raise ValidationError("this pilot's launcher is 'local', which runs one rank; "
                                  "a multi-rank job needs srun, aprun, mpiexec, ...")
        argv = build(self.launcher, self.request(spec, cores, inner))
        argv[0] = self.program  # posix_spawn takes a path, not a name to look up
        return argv

    def __call__(self, task, argv: list[str]) -> list[str]:
        return self.argv(task.spec, task.cores, argv)
