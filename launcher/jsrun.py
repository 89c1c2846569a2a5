"""jsrun (IBM Job Step Manager, OLCF Summit under LSF) argv builder.

Follows the OLCF Summit user guide / jsrun quick start and IBM's jsrun(1): ``--nrs``,
``--tasks_per_rs``, ``--cpu_per_rs``, ``--gpu_per_rs``, ``--rs_per_host``,
``--bind packed:<n>|none`` and ``-E VAR=value``. OLCF form:
``jsrun -n12 -r6 -c7 -g1 -a1 -bpacked:7 <cmd>`` (here in long options).

Choices:
- One resource set per rank: ``--nrs`` = ranks, ``--tasks_per_rs 1``, ``--cpu_per_rs`` =
  ``cpus_per_rank`` (jsrun counts physical cores), ``--rs_per_host`` = ``ranks_per_node``.
- ``--gpu_per_rs`` is always given (0 included) so a resource set never picks up a default.
- jsrun places ranks inside the LSF allocation itself: a host list and a CPU list are refused;
  so is ``mpi``. jsrun forwards the caller's environment by itself; the builder adds only the
  requested ``-E`` variables.
"""
from __future__ import annotations

from ._common import refuse, refuse_mpmd_separator
from .request import LaunchRequest


def build(req: LaunchRequest) -> list[str]:
    req.validate()
    refuse_mpmd_separator(req, "jsrun")
    refuse(req, "jsrun", hosts=True, bind_list=True, mpi=True)
    bind = "none" if req.cpu_bind == "none" else f"packed:{req.cpus_per_rank}"
    cmd = ["jsrun", "--nrs", str(req.ranks), "--tasks_per_rs", "1",
           "--cpu_per_rs", str(req.cpus_per_rank), "--gpu_per_rs", str(req.gpus_per_rank),
           "--rs_per_host", str(req.ranks_per_node), "--bind", bind]
    for name, value in req.env:
        cmd += ["-E", f"{name}={value}"]
    return cmd + list(req.argv)
