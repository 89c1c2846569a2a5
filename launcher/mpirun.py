"""mpirun of Open MPI argv builder.

Follows the Open MPI mpirun(1) man page (docs.open-mpi.org, v4/v5): ``-np``,
``--map-by ppr:<n>:node:PE=<d>``, ``--bind-to core|none``, ``-H host:slots,...`` and
``-x VAR=value`` (always with ``=``: a bare ``-x VAR`` would copy the caller's value).

Choices:
- ``PE=`` counts cores, so it is ``cpus_per_rank`` whatever ``threads_per_core`` is.
- ``cores`` and ``depth`` both bind to cores (each rank to its ``PE`` cores).
- Open MPI forwards only its own variables by default, so ``-x`` alone keeps the environment
  to what was asked.
- No per-rank CPU list and no GPU option here: those requests are refused.
"""
from __future__ import annotations

from ._common import refuse, refuse_gpus, refuse_mpmd_separator
from .request import LaunchRequest


def build(req: LaunchRequest) -> list[str]:
    req.validate()
    refuse_mpmd_separator(req, "mpirun")
    refuse_gpus(req, "mpirun")
    refuse(req, "mpirun", bind_list=True, mpi=True)
    cmd = ["mpirun", "-np", str(req.ranks),
           "--map-by", f"ppr:{req.ranks_per_node}:node:PE={req.cpus_per_rank}",
           "--bind-to", "none" if req.cpu_bind == "none" else "core"]
    if req.hosts:
        cmd += ["-H", ",".join(f"{h}:{req.ranks_per_node}" for h in req.hosts)]
    for name, value in req.env:
        cmd += ["-x", f"{name}={value}"]
    return cmd + list(req.argv)
