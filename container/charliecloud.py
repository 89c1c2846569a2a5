"""Charliecloud ``ch-run`` argv builder.

Form (``ch-run --help`` and ch-run(1) of Charliecloud 0.31, checked on this machine)::

    ch-run [-b SRC:DST ...] [--env-no-expand --set-env=NAME=VALUE ...] [-c DIR] IMAGE -- ARGV...

IMAGE is an image directory, a SquashFS file or an image in ch-image's storage.

Choices:
- One ``-b SRC:DST`` per bind. Without ``--write`` the destination must already exist in the
  image (ch-run(1)).
- ``--set-env=NAME=VALUE`` per variable, preceded by ``--env-no-expand``: without it ch-run
  expands ``$NAME`` items in values that look like search paths. ch-run also strips single
  quotes around a value, so values starting or ending with ``'`` are refused. The host
  environment passes into the container (ch-run's default).
- ``-c DIR`` (``--cd``) when ``workdir`` is set.
- GPUs are refused: Charliecloud has no run-time GPU flag; inject the driver libraries into
  the image once with ``ch-fromhost --nvidia``. ``mpi`` needs no flag (ch-run keeps the
  launcher's PMI variables).
- ``--`` separates ch-run's options from the argv, as in ch-run's own usage line.
"""
from __future__ import annotations

from pilotfish.errors import ValidationError

from ._common import pairs, refuse_gpus
from .request import ContainerRequest


def options(req: ContainerRequest) -> list[str]:
    refuse_gpus(req, "Charliecloud", hint="inject the GPU libraries with ch-fromhost --nvidia "
                "when the image is built and set gpus=None")
    cmd: list[str] = []
    for src, dst in req.binds:
        cmd += ["-b", f"{src}:{dst}"]
    if req.env:
        cmd.append("--env-no-expand")
        for name, value in req.env:
            if value.startswith("'") or value.endswith("'"):
                raise ValidationError(f"ch-run --set-env strips single quotes around a value; "
                                      f"the value of {name} starts or ends with one")
        cmd += [f"--set-env={item}" for item in pairs(req.env)]
    if req.workdir is not None:
        cmd += ["-c", req.workdir]
    return cmd


def build(req: ContainerRequest) -> list[str]:
    req.validate()
    return ["ch-run", *options(req), req.image, "--", *req.argv]
