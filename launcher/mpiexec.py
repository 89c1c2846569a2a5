"""mpiexec of MPICH's Hydra process manager argv builder.

Follows the MPICH mpiexec(1) / Hydra man page ("Using the Hydra Process Manager"): ``-n``,
``-ppn``, ``-hosts a,b``, ``-bind-to none|core:<n>|user:<a+b>,<c+d>``, ``-genvnone`` (propagate
no environment) and ``-genv VAR value`` (two items, no ``=``).

Choices:
- Hydra has no ``--depth``: depth binding is ``-bind-to core:<cpus_per_rank>`` (each rank bound
  to that many cores), the same for ``cores`` and ``depth``.
- ``-genvnone`` is ALWAYS emitted: Hydra propagates the whole environment by default.
- No per-rank GPU option in Hydra: ``gpus_per_rank`` > 0 is refused.
"""
from __future__ import annotations

from ._common import csv, refuse, refuse_gpus, refuse_mpmd_separator
from .request import LaunchRequest


def build(req: LaunchRequest) -> list[str]:
    req.validate()
    refuse_mpmd_separator(req, "Hydra mpiexec")
    refuse_gpus(req, "Hydra mpiexec")
    refuse(req, "Hydra mpiexec", mpi=True)
    if req.cpu_bind == "none":
        bind = "none"
    elif req.cpu_bind == "list":
        bind = "user:" + ",".join("+".join(str(c) for c in g) for g in req.cpu_groups())
    else:
        bind = f"core:{req.cpus_per_rank}"
    cmd = ["mpiexec", "-n", str(req.ranks), "-ppn", str(req.ranks_per_node), "-bind-to", bind]
    if req.hosts:
        cmd += ["-hosts", csv(req.hosts)]
    cmd.append("-genvnone")
    for name, value in req.env:
        cmd += ["-genv", name, value]
    return cmd + list(req.argv)
