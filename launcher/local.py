"""The ``local`` launcher: one rank on this node, no launcher program at all.

With no ``env`` the argv is returned as is (the executor decides the child's environment).
With ``env`` it is ``env -i VAR=value ... <argv>`` (POSIX env(1): ``-i`` starts from an empty
environment), so only the requested variables reach the program. env(1) would read a leading
``NAME=value`` program name as one more assignment, so such an argv[0] is refused then.
"""
from __future__ import annotations

from pilotfish.errors import ValidationError

from ._common import refuse, refuse_gpus
from .request import LaunchRequest


def build(req: LaunchRequest) -> list[str]:
    req.validate()
    if req.nodes != 1 or req.ranks_per_node != 1:
        raise ValidationError("the local launcher runs one rank on this node; "
                              "use srun/aprun/mpiexec for more")
    refuse_gpus(req, "the local launcher")
    refuse(req, "the local launcher", hosts=True, bind_list=True, mpi=True)
    if not req.env:
        return list(req.argv)
    if "=" in req.argv[0]:
        raise ValidationError("argv[0] may not contain '=' when env is given (env(1) would "
                              "take it for a variable)")
    return ["env", "-i", *(f"{n}={v}" for n, v in req.env), *req.argv]
