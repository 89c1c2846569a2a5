"""Launchers: pure argv builders for srun, aprun, mpiexec, mpirun, jsrun (issue: multi-node pilots).

One request shape (:class:`LaunchRequest`), one builder per launcher; every builder returns an
argv list (never a shell string) ending with the request's argv, item for item.
"""
from __future__ import annotations

from typing import Callable

from pilotfish.errors import ValidationError

from . import aprun, jsrun, local, mpiexec, mpirun, pals, srun
from .request import BIND_MODES, LaunchRequest

LAUNCHERS: dict[str, Callable[[LaunchRequest], list[str]]] = {
    "srun": srun.build,
    "aprun": aprun.build,
    "mpiexec": mpiexec.build,  # MPICH Hydra
    "pals": pals.build,  # Cray PALS mpiexec (Polaris, Aurora)
    "mpirun": mpirun.build,  # Open MPI
    "jsrun": jsrun.build,
    "local": local.build,
}


def build(launcher: str, req: LaunchRequest) -> list[str]:
    """The argv that starts ``req`` with ``launcher`` (a key of :data:`LAUNCHERS`)."""
    try:
        builder = LAUNCHERS[launcher]
    except (KeyError, TypeError):
        raise ValidationError(f"unknown launcher {launcher!r}; known: "
                              f"{', '.join(sorted(LAUNCHERS))}") from None
    if not isinstance(req, LaunchRequest):
        raise ValidationError("a launcher needs a LaunchRequest")
    return builder(req)


__all__ = ["BIND_MODES", "LAUNCHERS", "LaunchRequest", "build"]
