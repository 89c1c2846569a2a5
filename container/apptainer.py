"""Apptainer and SingularityCE argv builder (one builder; the program name differs).

Form (``apptainer exec --help``; Apptainer user guide: Bind Paths and Mounts, Environment and
Metadata, GPU Support)::

    apptainer exec [--bind SRC:DST[,SRC:DST...]] [--nv | --rocm] [--cleanenv]
                   [--env NAME=VALUE ...] [--pwd DIR] IMAGE ARGV...

``singularity exec`` (SingularityCE 3.6+) takes the same options.

Choices:
- One ``--bind`` with the comma-joined ``SRC:DST`` list (which is why paths may not contain
  ``,`` or ``:``).
- ``--nv`` for NVIDIA, ``--rocm`` for AMD GPUs.
- ``--cleanenv`` unless ``mpi``: host variables such as PYTHONPATH or LD_LIBRARY_PATH break
  images, so a task sees only the image's environment plus ``env``. MPI ranks keep the host
  environment, because the PMI variables the launcher sets (PMI_*, SLURM_*, PALS_*) must reach
  them.
- ``--env NAME=VALUE`` per variable. Apptainer parses the flag as a key=value map (pflag's
  StringToString): an item with more than one ``=`` is read as CSV, so a value holding both
  ``=`` and ``,`` would be split, and ``"`` is stripped or misread; such values are refused.
- ``--pwd DIR`` when ``workdir`` is set.
- Apptainer stops reading options at the image, so argv items that look like options stay
  argv.
"""
from __future__ import annotations

from pilotfish.errors import ValidationError

from ._common import bind_specs, pairs
from .request import ContainerRequest


def check_env(req: ContainerRequest, program: str) -> None:
    for name, value in req.env:
        if '"' in value or ("=" in value and "," in value):
            raise ValidationError(f"{program} --env cannot carry the value of {name} (a '\"', or "
                                  "both '=' and ',', would be re-parsed); set it in the image")


def options(req: ContainerRequest, program: str, *, clean_env: bool) -> list[str]:
    check_env(req, program)
    cmd: list[str] = []
    if req.binds:
        cmd += ["--bind", ",".join(bind_specs(req))]
    if req.gpus == "nvidia":
        cmd.append("--nv")
    elif req.gpus == "amd":
        cmd.append("--rocm")
    if clean_env:
        cmd.append("--cleanenv")
    for item in pairs(req.env):
        cmd += ["--env", item]
    if req.workdir is not None:
        cmd += ["--pwd", req.workdir]
    return cmd


def build_with(program: str):
    def build(req: ContainerRequest) -> list[str]:
        req.validate()
        return [program, "exec", *options(req, program, clean_env=not req.mpi), req.image,
                *req.argv]
    build.__doc__ = f"``{program} exec ...`` for ``req`` (see the module docstring)."
    return build


build = build_with("apptainer")
build_singularity = build_with("singularity")
