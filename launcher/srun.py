"""srun (Slurm) argv builder.

Follows the srun(1) man page (slurm.schedmd.com/srun.html): ``-N``, ``-n``,
``--ntasks-per-node=``, ``-c`` (``--cpus-per-task``, counted in Slurm CPUs, i.e. hardware threads
on SMT nodes), ``--cpu-bind=none|cores|map_cpu:<list>|mask_cpu:<list>``, ``--gpus-per-task=``,
``-w`` (``--nodelist``), ``--mpi=`` and ``--export=``; NERSC Cori/Perlmutter form
``srun -N 2 -n 8 --ntasks-per-node=4 -c 16 --cpu-bind=cores <cmd>``.

Choices:
- ``-c`` is ``cpus_per_rank * threads_per_core``: Slurm counts logical CPUs.
- ``--export=`` is ALWAYS given: ``--export=NONE`` when ``env`` is empty, else
  ``--export=A=1,B=2`` (without ``ALL``, srun exports only the listed variables plus Slurm's own
  ``SLURM_*``). The list is comma-separated with no escape, so values with commas are refused.
- ``--overlap`` only when the request says ``overlap``: a pilot's node agents hold every CPU of
  the allocation as one step, and a job step started beside them must share those CPUs (Slurm
  20.11+ otherwise queues the step until the agents end). ``--exact`` is never emitted.
- ``cpu_bind="depth"`` becomes ``cores``: with ``-c`` Slurm binds each task to its own
  ``-c`` CPUs, which is what depth binding means elsewhere.
"""
from __future__ import annotations

from pilotfish.errors import ValidationError

from ._common import csv, refuse_mpmd_separator
from .request import LaunchRequest


def build(req: LaunchRequest) -> list[str]:
    req.validate()
    refuse_mpmd_separator(req, "srun")
    cmd = ["srun", "-N", str(req.nodes), "-n", str(req.ranks),
           f"--ntasks-per-node={req.ranks_per_node}",
           "-c", str(req.cpus_per_rank * req.threads_per_core),
           f"--cpu-bind={_bind(req)}"]
    if req.gpus_per_rank:
        cmd.append(f"--gpus-per-task={req.gpus_per_rank}")
    if req.hosts:
        cmd += ["-w", csv(req.hosts)]
    if req.mpi is not None:
        cmd.append(f"--mpi={req.mpi}")
    if req.overlap:
        cmd.append("--overlap")
    cmd.append(f"--export={_export(req)}")
    return cmd + list(req.argv)


def _bind(req: LaunchRequest) -> str:
    if req.cpu_bind == "none":
        return "none"
    if req.cpu_bind in ("cores", "depth"):
        return "cores"
    groups = req.cpu_groups()
    if req.cpus_per_rank == 1:
        return "map_cpu:" + csv(g[0] for g in groups)
    return "mask_cpu:" + csv(hex(sum(1 << c for c in g)) for g in groups)


def _export(req: LaunchRequest) -> str:
    if not req.env:
        return "NONE"
    for name, value in req.env:
        if "," in value:
            raise ValidationError(f"srun --export cannot carry a comma in the value of {name}")
    return ",".join(f"{name}={value}" for name, value in req.env)
