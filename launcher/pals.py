"""mpiexec of Cray PALS (ALCF Polaris, Aurora) argv builder.

Follows the ALCF Polaris "Running Jobs" page and the PALS mpiexec options: ``-n``, ``--ppn``,
``--depth``, ``--cpu-bind depth|core|none|list:<a,b>:<c,d>``, ``--hosts a,b``, ``--envnone``
(do not export the caller's environment) and ``--env VAR=value``. Golden Polaris form:
``mpiexec -n 8 --ppn 4 --depth 8 --cpu-bind depth <cmd>``.

Choices:
- ``--depth`` is ``cpus_per_rank * threads_per_core``: PALS depth counts logical CPUs.
- ``--envnone`` is ALWAYS emitted (PALS exports everything by default), before any ``--env``:
  PALS reads these as stateful options, so the suppressor must come first.
- GPUs: PALS has no per-rank GPU option on Polaris (ALCF uses an affinity wrapper script), so
  ``gpus_per_rank`` > 0 is refused rather than ignored.
"""
from __future__ import annotations

from ._common import csv, refuse, refuse_gpus, refuse_mpmd_separator
from .request import LaunchRequest

_BIND = {"none": "none", "cores": "core", "depth": "depth"}


def build(req: LaunchRequest) -> list[str]:
    req.validate()
    refuse_mpmd_separator(req, "PALS mpiexec")
    refuse_gpus(req, "PALS mpiexec")
    refuse(req, "PALS mpiexec", mpi=True)
    if req.cpu_bind == "list":
        bind = "list:" + ":".join(csv(g) for g in req.cpu_groups())
    else:
        bind = _BIND[req.cpu_bind]
    cmd = ["mpiexec", "-n", str(req.ranks), "--ppn", str(req.ranks_per_node),
           "--depth", str(req.cpus_per_rank * req.threads_per_core), "--cpu-bind", bind]
    if req.hosts:
        cmd += ["--hosts", csv(req.hosts)]
    cmd.append("--envnone")
    for name, value in req.env:
        cmd += ["--env", f"{name}={value}"]
    return cmd + list(req.argv)
