"""Shifter (NERSC Cori/Perlmutter, NCSA Blue Waters) argv builder.

Form (``shifter`` usage text and the NERSC/shifter docs ``doc/command/shifter.rst``,
``doc/wlm/slurm.rst``; Blue Waters job scripts ``shifter --image=... --volume=...
--workdir=... -- cmd``)::

    shifter --image=docker:repo:tag [--volume=SRC:DST ...] [--module=gpu,mpich]
            [--env=NAME=VALUE ...] [--workdir=DIR] -- ARGV...

Choices:
- The image is ``type:specifier``; a name without a type (``repo:tag``) gets ``docker:``
  (``--image=docker:ubuntu:14.04`` in shifter's own error text). ``id:`` and ``docker:`` are
  kept as given.
- One ``--volume=SRC:DST`` per bind. Shifter refuses destinations at or under ``/dev``,
  ``/etc``, ``/opt/udiImage``, ``/proc`` and ``/var`` (its usage text), so they are refused
  here first with a clear message.
- ``--env=NAME=VALUE`` per variable: the form NERSC's deployed Shifter takes (Perlmutter job
  scripts, e.g. ``--env=MPICH_GPU_SUPPORT_ENABLED=1``). The 18.03 open-source ``shifter.c``
  declares ``--env`` without an argument; a site with that build refuses the option, so
  leave ``env`` empty there. Shifter passes the caller's whole environment into the container
  (usage text: "All the environment variables defined in the calling processes's environment
  will be transferred"), image ENV winning.
- ``--workdir=DIR`` (``-w``) when ``workdir`` is set; otherwise Shifter uses the image's
  WORKDIR, else the caller's current directory.
- GPUs: ``--module=gpu`` (NVIDIA only: Perlmutter); MPI: ``--module=mpich`` (Perlmutter's
  Cray MPICH injection; Cori called it ``mpich-cle6``). Modules are one comma list, and naming
  any replaces the site's default module list.
- ``--`` ends Shifter's options (getopt with POSIXLY_CORRECT); the argv follows item for item.
"""
from __future__ import annotations

from pilotfish.errors import ValidationError

from ._common import pairs, refuse_gpus
from .request import ContainerRequest

#: Image types Shifter knows; anything else is a docker name.
IMAGE_TYPES = ("docker", "id")
#: Destinations shifter's usage text says a volume may not enter.
FORBIDDEN_DESTINATIONS = ("/dev", "/etc", "/opt/udiImage", "/proc", "/var")


def image_spec(image: str) -> str:
    """``repo:tag`` -> ``docker:repo:tag``; ``docker:...`` and ``id:...`` unchanged."""
    kind = image.split(":", 1)[0]
    return image if kind in IMAGE_TYPES and ":" in image else f"docker:{image}"


def check_volumes(req: ContainerRequest) -> None:
    for _, dst in req.binds:
        for bad in FORBIDDEN_DESTINATIONS:
            if dst == bad or dst.startswith(bad + "/"):
                raise ValidationError(f"Shifter cannot bind into {dst!r}: volumes may not enter "
                                      f"{', '.join(FORBIDDEN_DESTINATIONS)}")


def options(req: ContainerRequest) -> list[str]:
    """The options before ``--`` (also the pilot-level prefix off Slurm)."""
    refuse_gpus(req, "Shifter", allowed=("nvidia",),
                hint="its gpu module injects NVIDIA drivers")
    check_volumes(req)
    cmd = [f"--image={image_spec(req.image)}"]
    cmd += [f"--volume={src}:{dst}" for src, dst in req.binds]
    modules = (["gpu"] if req.gpus else []) + (["mpich"] if req.mpi else [])
    if modules:
        cmd.append("--module=" + ",".join(modules))
    cmd += [f"--env={item}" for item in pairs(req.env)]
    if req.workdir is not None:
        cmd.append(f"--workdir={req.workdir}")
    return cmd


def build(req: ContainerRequest) -> list[str]:
    req.validate()
    return ["shifter", *options(req), "--", *req.argv]
