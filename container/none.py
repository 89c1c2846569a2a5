"""The ``none`` runtime: run the argv natively, unchanged.

Choices:
- No env: the argv itself, item for item. With env: ``env NAME=VALUE ... ARGV`` (env(1) adds
  the variables to the caller's environment, like the runtimes that pass the host environment
  on); an argv[0] containing ``=`` would be read by env as one more assignment and is refused.
- ``binds`` are refused: a task that asked for ``/data`` to be the host's ``/scratch/x`` would
  otherwise read or write the wrong path without a word.
- ``workdir`` is refused for the same reason: set the process's cwd instead.
- ``gpus`` and ``mpi`` need nothing: the node's GPUs and the launcher's environment are
  already there.
- ``image`` must be empty (``ContainerRequest.validate``): a job that needs an image must not
  silently run on the host's software.
"""
from __future__ import annotations

from pilotfish.errors import ValidationError

from ._common import pairs
from .request import ContainerRequest


def build(req: ContainerRequest) -> list[str]:
    req.validate()
    if req.binds:
        raise ValidationError("runtime 'none' cannot bind paths; without a container the task "
                              "would use the host paths as they are. Drop the binds or choose "
                              "a container runtime")
    if req.workdir is not None:
        raise ValidationError("runtime 'none' cannot set a working directory; start the task "
                              "in that directory instead")
    if not req.env:
        return list(req.argv)
    if "=" in req.argv[0]:
        raise ValidationError("runtime 'none' with env would pass an argv[0] containing '=' to "
                              "env(1) as one more assignment")
    return ["env", *pairs(req.env), *req.argv]
