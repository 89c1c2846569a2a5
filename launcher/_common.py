"""Small helpers shared by the builders (kept private: the public API is ``build``)."""
from __future__ import annotations

from pilotfish.errors import ValidationError

from .request import LaunchRequest


def refuse_gpus(req: LaunchRequest, launcher: str) -> None:
    # Silently dropping a GPU request would start ranks that find no device; say so instead.
    if req.gpus_per_rank:
        raise ValidationError(f"{launcher} has no per-rank GPU option here; set gpus_per_rank=0 "
                              "and hand GPUs out with CUDA_VISIBLE_DEVICES or a wrapper")


def refuse(req: LaunchRequest, launcher: str, *, hosts: bool = False, bind_list: bool = False,
           mpi: bool = False) -> None:
    """Refuse request fields this launcher cannot express, rather than ignoring them."""
    if hosts and req.hosts:
        raise ValidationError(f"{launcher} cannot be given a host list; it runs on its allocation")
    if bind_list and req.cpu_bind == "list":
        raise ValidationError(f"{launcher} has no per-rank CPU list binding; "
                              "use cpu_bind='cores' or 'none'")
    if mpi and req.mpi is not None:
        raise ValidationError(f"{launcher} takes no --mpi plugin; leave mpi unset")


def refuse_mpmd_separator(req: LaunchRequest, launcher: str) -> None:
    # srun (heterogeneous steps), aprun, Hydra, PALS and Open MPI all read a lone ":" anywhere on
    # their command line, even after the program, as the start of another MPMD section with its
    # own options: an argv item ":" would let job arguments add launcher options. jsrun is
    # treated the same way to be safe.
    if ":" in req.argv:
        raise ValidationError(f"{launcher} would read the argv item ':' as an MPMD separator; "
                              "pass it joined to a neighbour or through a wrapper")


def csv(items: object) -> str:
    return ",".join(str(i) for i in items)  # type: ignore[attr-defined]
