"""Small helpers shared by the wrappers (kept private: the public API is ``wrap``)."""
from __future__ import annotations

from pilotfish.errors import ValidationError

from .request import ContainerRequest


def refuse_gpus(req: ContainerRequest, runtime: str, *, allowed: tuple[str, ...] = (),
                hint: str = "") -> None:
    # A task that asked for GPUs and silently got none would run on the CPU or fail late.
    if req.gpus is not None and req.gpus not in allowed:
        kinds = f"only {', '.join(allowed)} GPUs" if allowed else "no GPU option"
        raise ValidationError(f"{runtime} has {kinds} here, not {req.gpus!r}"
                              + (f"; {hint}" if hint else ""))


def pairs(items: tuple[tuple[str, str], ...]) -> list[str]:
    """``NAME=value`` / ``src:dst`` items, in request order."""
    return [f"{a}={b}" for a, b in items]


def bind_specs(req: ContainerRequest) -> list[str]:
    return [f"{src}:{dst}" for src, dst in req.binds]
