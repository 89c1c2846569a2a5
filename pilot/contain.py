"""How a node agent runs a task inside its container image.

The task's argv is wrapped by the runtime (:func:`pilotfish.container.wrap`) with the job's
workdir bound at the same path (so its cwd and outputs are where the host expects them), plus
the node's binds (the site's scratch, ...). For an MPI job the launcher wraps the container, not
the other way round (``srun ... apptainer exec ...``), so binding and depth apply to the
containerized ranks.
"""
from __future__ import annotations

import os
import shutil
from typing import Mapping

from pilotfish import protocol as P
from pilotfish.container import GPU_KINDS, ContainerRequest, RUNTIMES, program, wrap
from pilotfish.errors import PilotfishError, ProtocolError, ValidationError

from .gpus import NONE, Gpus


def parse_bind(text: str) -> tuple[str, str]:
    """``SRC`` or ``SRC:DST`` (absolute paths) from ``--bind``."""
    src, _, dst = text.partition(":")
    return src, dst or src


class TaskContainer:
    """Callable given to the executor: (task, argv) -> the argv that runs it in its image."""

    def __init__(self, runtime: str | None = None, binds: tuple[tuple[str, str], ...] = (),
                 environ: Mapping[str, str] | None = None, gpus: Gpus = NONE) -> None:
        if runtime is not None and runtime not in RUNTIMES:
            raise PilotfishError(f"unknown container runtime {runtime!r}; known: "
                                 f"{', '.join(RUNTIMES)}")
        self.runtime = runtime
        self.binds = binds
        self.gpus = gpus  # the node's GPU vendor: which runtime option and variables apply
        self.path = (environ or os.environ).get("PATH")
        self._programs: dict[str, str] = {}

    def _program(self, runtime: str) -> str:
        found = self._programs.get(runtime)
        if found is None:
            name = program(runtime)
            found = shutil.which(name, path=self.path) if name else None
            if not found:
                raise ValidationError(f"container runtime {runtime}: `{name}` is not on this "
                                      "node's PATH")
            self._programs[runtime] = found
        return found

    def argv(self, spec: dict, argv: list[str], workdir: str, gpus: list[str],
             cores: int = 1) -> list[str]:
        try:
            c = P.check_fields(P.CONTAINER, spec["container"], "container")
        except ProtocolError as exc:
            raise ValidationError(str(exc)) from None
        runtime = c["runtime"] or self.runtime
        if runtime is None or runtime == "none":
            raise ValidationError(f"the app runs in image {c['image']} but this node has no "
                                  "container runtime (site profile `container`, or "
                                  "`pilot agent --container-runtime`)")
        image = c["image"]
        if image.startswith("/") and not os.path.exists(image):
            raise ValidationError(f"image {image} does not exist on this node")
        env = dict(spec.get("env") or {})
        env.update(PILOTFISH_JOB_ID=str(spec["job"]), PILOTFISH_ATTEMPT=str(spec["attempt"]),
                   PILOTFISH_JOB_NAME=spec["name"], PILOTFISH_WORKDIR=workdir,
                   OMP_NUM_THREADS=str(cores))
        vendor = self.gpus.vendor or "nvidia"
        if gpus:  # runtimes that clean the environment must still see the task's GPUs
            kind = self.gpus if self.gpus.vendor else Gpus("nvidia", (), "CUDA_VISIBLE_DEVICES")
            env.update((k, v) for k, v in kind.task_env(gpus).items() if v is not None)
        # Charliecloud has no GPU switch: drivers are injected into the image (ch-fromhost);
        # Intel GPUs need none either (their /dev/dri nodes are seen like other devices)
        gpu_kind = vendor if gpus and runtime != "charliecloud" and vendor in GPU_KINDS \
            else None
        req = ContainerRequest(runtime=runtime, image=image, argv=tuple(argv),
                               binds=((workdir, workdir), *self.binds), env=tuple(env.items()),
                               gpus=gpu_kind, workdir=workdir, mpi=bool(spec.get("launch")))
        out = wrap(req)
        if runtime != "none":
            out[0] = self._program(runtime)
        return out

    def __call__(self, task, argv: list[str]) -> list[str]:
        return self.argv(task.spec, argv, str(task.workdir), task.gpus, len(task.cores))
