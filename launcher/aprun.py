"""aprun (Cray ALPS) argv builder.

Follows the Cray "Run Applications Using the aprun Command" guide (HPE) and the Blue Waters /
ALCF Theta pages: ``-n`` PEs, ``-N`` PEs per node, ``-d`` depth (CPUs per PE), ``-j`` CPUs per
compute unit, ``-cc depth|none|<cpu list>``, ``-L`` node list, ``-e VAR=value`` per variable.
Golden forms: Blue Waters pilot ``aprun -n 1 -N 1 -d 32 <cmd>``; Theta
``aprun -n 128 -N 64 -d 1 -j 1 -cc depth <cmd>``.

Choices:
- ``-d`` is ``cpus_per_rank * threads_per_core`` (ALPS counts CPUs, which are hardware threads
  once ``-j`` > 1).
- ``cpu_bind="cores"`` keeps aprun's default binding (``-cc cpu``: each PE and its threads on
  its own depth CPUs), so no ``-cc`` and no ``-j`` are emitted: the Blue Waters form.
  ``-j`` is emitted whenever it matters: ``threads_per_core`` > 1, or ``-cc depth``, whose
  spacing is in CPUs and so depends on ``-j`` (the Theta form pins ``-j 1``).
- ``cpu_bind="list"`` gives ``-cc a,b:c,d`` (one colon-separated CPU set per PE on a node).
- ``-L`` takes ALPS node ids (nids), so hosts must be numbers here.
- ALPS forwards the login-node environment by itself and has no switch to stop it; the builder
  adds only the requested ``-e`` variables. Sites that need a clean environment must clear it
  before calling aprun.
"""
from __future__ import annotations

from pilotfish.errors import ValidationError

from ._common import csv, refuse, refuse_gpus, refuse_mpmd_separator
from .request import LaunchRequest


def build(req: LaunchRequest) -> list[str]:
    req.validate()
    refuse_mpmd_separator(req, "aprun")
    refuse_gpus(req, "aprun")
    refuse(req, "aprun", mpi=True)
    cmd = ["aprun", "-n", str(req.ranks), "-N", str(req.ranks_per_node),
           "-d", str(req.cpus_per_rank * req.threads_per_core)]
    if req.threads_per_core > 1 or req.cpu_bind == "depth":
        cmd += ["-j", str(req.threads_per_core)]
    if req.cpu_bind == "none":
        cmd += ["-cc", "none"]
    elif req.cpu_bind == "depth":
        cmd += ["-cc", "depth"]
    elif req.cpu_bind == "list":
        cmd += ["-cc", ":".join(csv(g) for g in req.cpu_groups())]
    if req.hosts:
        if not all(h.isdigit() for h in req.hosts):
            raise ValidationError("aprun -L takes numeric node ids (nids), not host names")
        cmd += ["-L", csv(req.hosts)]
    for name, value in req.env:
        cmd += ["-e", f"{name}={value}"]
    return cmd + list(req.argv)
