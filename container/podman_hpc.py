"""podman-hpc (NERSC Perlmutter) argv builder.

Form (NERSC podman-hpc documentation: ``podman-hpc run --rm --gpu IMAGE``,
``srun podman-hpc run --rm --mpi IMAGE ./app``; podman-run(1) for ``-v``, ``-e``, ``-w``)::

    podman-hpc run --rm [--mpi] [--gpu] [-v SRC:DST ...] [-e NAME=VALUE ...] [-w DIR]
                   IMAGE ARGV...

Choices:
- ``--rm`` always: a pilot starts thousands of tasks and must not leave a stopped container
  behind for each.
- ``--mpi`` with ``mpi`` (podman-hpc's module that brings in Cray MPICH and the PMI setup);
  ``--gpu`` for NVIDIA GPUs, the only kind podman-hpc's module supports; AMD is refused.
- ``-v SRC:DST`` per bind, ``-e NAME=VALUE`` per variable (always with ``=``: a bare
  ``-e NAME`` would copy the host's value). Podman passes no other host variable.
- ``-w DIR`` when ``workdir`` is set.
- Podman stops reading options at the image; argv items follow it unchanged.
"""
from __future__ import annotations

from ._common import pairs, refuse_gpus
from .request import ContainerRequest


def options(req: ContainerRequest) -> list[str]:
    refuse_gpus(req, "podman-hpc", allowed=("nvidia",),
                hint="its --gpu module is NVIDIA's")
    cmd = ["--rm"]
    if req.mpi:
        cmd.append("--mpi")
    if req.gpus:
        cmd.append("--gpu")
    for src, dst in req.binds:
        cmd += ["-v", f"{src}:{dst}"]
    for item in pairs(req.env):
        cmd += ["-e", item]
    if req.workdir is not None:
        cmd += ["-w", req.workdir]
    return cmd


def build(req: ContainerRequest) -> list[str]:
    req.validate()
    return ["podman-hpc", "run", *options(req), req.image, *req.argv]
