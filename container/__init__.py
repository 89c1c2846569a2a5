"""Container runtimes: pure argv wrappers for Shifter, Apptainer/Singularity, Charliecloud and
podman-hpc, the pilot-level forms, and image specs and builds (``build``, ``cli``).

One request shape (:class:`ContainerRequest`), one wrapper per runtime; every wrapper returns an
argv list (never a shell string) ending with the request's argv, item for item.
:func:`pilot_level` gives the forms that put a whole pilot (head and agents) inside an image.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from pilotfish.errors import ValidationError

from . import apptainer, charliecloud, none, podman_hpc, shifter
from .request import GPU_KINDS, RUNTIMES, ContainerRequest, check_image, validate_binds

WRAPPERS: dict[str, Callable[[ContainerRequest], list[str]]] = {
    "none": none.build,
    "shifter": shifter.build,
    "singularity": apptainer.build_singularity,
    "apptainer": apptainer.build,
    "charliecloud": charliecloud.build,
    "podman-hpc": podman_hpc.build,
}

PROGRAMS: dict[str, str | None] = {
    "none": None,
    "shifter": "shifter",
    "singularity": "singularity",
    "apptainer": "apptainer",
    "charliecloud": "ch-run",
    "podman-hpc": "podman-hpc",
}

#: The batch systems pilotfish.pilot.batch knows (kept here too: this room imports no room).
SCHEDULERS = ("slurm", "pbs", "torque", "cobalt", "htcondor", "lsf", "local")


def wrap(req: ContainerRequest) -> list[str]:
    """The argv that runs ``req.argv`` inside ``req.image`` with ``req.runtime``."""
    if not isinstance(req, ContainerRequest):
        raise ValidationError("a container wrapper needs a ContainerRequest")
    req.validate()
    return WRAPPERS[req.runtime](req)


def program(runtime: str) -> str | None:
    """The executable to look up on PATH for ``runtime`` (None for ``none``)."""
    _check_runtime(runtime)
    return PROGRAMS[runtime]


@dataclass(frozen=True)
class PilotContainer:
    """How a whole pilot runs inside an image.

    ``directives`` go after the scheduler's directive prefix (``#SBATCH``, ``#PBS``), like
    :attr:`PilotSpec.directives`; ``env`` is exported before the head starts; ``head_prefix``
    goes in front of the head's argv.
    """

    directives: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    head_prefix: tuple[str, ...] = ()


def pilot_level(runtime: str, image: str, scheduler: str, *,
                binds: tuple[tuple[str, str], ...] = ()) -> PilotContainer:
    """The pilot-level form of ``runtime`` on ``scheduler``.

    - Shifter on Slurm (Shifter's Slurm integration, ``doc/wlm/slurm.rst``): directives
      ``--image=docker:repo:tag`` and one ``--volume=SRC:DST`` per bind, so the image is set up
      on every node at allocation time, and the head runs as ``shifter <head argv>``; tasks are
      then started as ``srun ... shifter ...`` in the job's prepared image.
    - Shifter on Torque (Cray, NCSA Blue Waters; the LIGO glideins and Blue Waters job scripts):
      directive ``-v UDI=docker:repo:tag`` (``#PBS -v UDI=...``) and ``CRAY_ROOTFS=UDI`` in the
      environment; the head is unchanged, because ``aprun`` starts every program inside the
      image (with ``aprun -b``, so the binary is not copied from the host). Binds cannot be
      given this way and are refused. Site needs such as ``-l gres=shifter16`` belong to the
      site profile.
    - Shifter on the other schedulers: ``shifter --image=... [--volume=...] --`` as the head
      prefix (shifter sets the image up itself, without a batch-system integration).
    - Apptainer/Singularity, Charliecloud, podman-hpc: the runtime's exec form with the binds as
      the head prefix, so the head and the agents it starts run inside the image; the image
      must provide pilotfish (and the launcher's client for multi-node pilots, or bind it in).
      The head keeps the batch job's environment: no ``--cleanenv`` for Apptainer, podman's
      ``--env-host`` for podman-hpc (ch-run keeps it by default).
    - ``none``: nothing (``image`` must be empty).
    """
    _check_runtime(runtime)
    if not isinstance(scheduler, str) or scheduler not in SCHEDULERS:
        raise ValidationError(f"unknown scheduler {scheduler!r}; known: {', '.join(SCHEDULERS)}")
    validate_binds(binds)
    if runtime == "none":
        if image != "":
            raise ValidationError(f"runtime 'none' runs no image; give image='' (got {image!r})")
        if binds:
            raise ValidationError("runtime 'none' cannot bind paths; choose a container runtime")
        return PilotContainer()
    check_image(image)
    req = ContainerRequest(runtime, image, ("_",), binds=binds)
    if runtime == "shifter":
        shifter.check_volumes(req)
        spec = shifter.image_spec(image)
        if scheduler == "slurm":
            return PilotContainer(
                directives=(f"--image={spec}",
                            *(f"--volume={src}:{dst}" for src, dst in binds)),
                head_prefix=("shifter",))
        if scheduler == "torque":
            if binds:
                raise ValidationError("Shifter on Torque (#PBS -v UDI=...) takes no volumes; "
                                      "wrap each task with its binds instead")
            if "," in spec:  # qsub -v is a comma-separated list
                raise ValidationError(f"image {image!r} cannot go into qsub -v")
            return PilotContainer(directives=(f"-v UDI={spec}",),
                                  env=(("CRAY_ROOTFS", "UDI"),))
        return PilotContainer(head_prefix=("shifter", f"--image={spec}",
                                           *(f"--volume={s}:{d}" for s, d in binds), "--"))
    if runtime in ("apptainer", "singularity"):
        prefix = [runtime, "exec", *apptainer.options(req, runtime, clean_env=False), image]
    elif runtime == "charliecloud":
        prefix = ["ch-run", *charliecloud.options(req), image, "--"]
    else:  # podman-hpc
        opts = podman_hpc.options(ContainerRequest(runtime, image, ("_",), binds=binds))
        prefix = ["podman-hpc", "run", opts[0], "--env-host", *opts[1:], image]
    return PilotContainer(head_prefix=tuple(prefix))


def _check_runtime(runtime: object) -> None:
    if not isinstance(runtime, str) or runtime not in RUNTIMES:
        raise ValidationError(f"unknown container runtime {runtime!r}; known: "
                              f"{', '.join(RUNTIMES)}")


__all__ = ["GPU_KINDS", "PROGRAMS", "RUNTIMES", "SCHEDULERS", "WRAPPERS", "ContainerRequest",
           "PilotContainer", "pilot_level", "program", "wrap"]
