"""What a node agent has to offer: cores from its affinity mask, GPUs, memory and time left."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field

import psutil

from . import gpus as gpu_probe


@dataclass
class Resources:
    cores: list[int]
    gpus: list[str]
    memory: int
    end_time: float | None  # epoch seconds when the allocation ends, None: no limit
    #: the GPUs' vendor and the variable that hands a task its share (pilot/gpus.py)
    gpu_kind: gpu_probe.Gpus = field(default=gpu_probe.NONE)

    def time_left(self, now: float | None = None) -> float | None:
        if self.end_time is None:
            return None
        return max(0.0, self.end_time - (now or time.time()))


def detect_cores() -> list[int]:
    """The cores this process may run on: its affinity mask, not the node's core count."""
    return sorted(os.sched_getaffinity(0))


def parse_cpu_list(text: str) -> list[int]:
    """CPU ids from the kernel's list format (``0-3,8,10-11``)."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if part:
            lo, _, hi = part.partition("-")
            cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


def node_cpus() -> list[int]:
    """Every CPU online on this node, whatever this process's affinity mask says."""
    try:
        with open("/sys/devices/system/cpu/online") as f:
            return parse_cpu_list(f.read())
    except (OSError, ValueError):
        return list(range(os.cpu_count() or 1))


def affinity_warning(mask: list[int], node: list[int]) -> str | None:
    """The BOSS-LDG check: a mask smaller than the node means the launcher pinned this agent
    (``aprun`` without ``-d``, ``srun`` without ``-c``), and every task would share its cores."""
    missing = sorted(set(node) - set(mask))
    if not missing:
        return None
    return (f"this agent may use only {len(mask)} of the node's {len(node)} CPUs "
            f"(affinity mask {_ranges(mask)}; node {_ranges(node)}): the launcher that started "
            "it bound it to part of the node, so every task would share those CPUs. Start "
            "node agents with full-node depth and binding off, e.g. `srun --ntasks-per-node=1 "
            "-c <cpus> --cpu-bind=none` or `aprun -N 1 -d <cpus> -cc none`")


def _ranges(cpus: list[int]) -> str:
    out, cpus = [], sorted(cpus)
    i = 0
    while i < len(cpus):
        j = i
        while j + 1 < len(cpus) and cpus[j + 1] == cpus[j] + 1:
            j += 1
        out.append(str(cpus[i]) if i == j else f"{cpus[i]}-{cpus[j]}")
        i = j + 1
    return ",".join(out)


def parse_slurm_time(text: str) -> float | None:
    """Seconds in a Slurm time: ``[days-]hours:minutes:seconds``, ``MM:SS``, ``UNLIMITED``."""
    text = text.strip()
    if not text or text.upper() in ("UNLIMITED", "NOT_SET", "INVALID"):
        return None
    days = 0
    if "-" in text:
        d, text = text.split("-", 1)
        days = int(d)
    parts = [int(p) for p in text.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    h, m, s = parts
    return days * 86400 + h * 3600 + m * 60 + s


def detect_end_time(walltime_minutes: float | None) -> float | None:
    """When this agent must be done: ``--walltime``, ``$PILOTFISH_END_TIME``, or Slurm's job."""
    now = time.time()
    if walltime_minutes:
        return now + walltime_minutes * 60
    if os.environ.get("PILOTFISH_END_TIME"):
        return float(os.environ["PILOTFISH_END_TIME"])
    job = os.environ.get("SLURM_JOB_ID")
    if job and shutil.which("squeue"):
        try:
            out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%L"], capture_output=True,
                                 text=True, timeout=10).stdout
            left = parse_slurm_time(out)
            return None if left is None else now + left
        except (OSError, subprocess.SubprocessError, ValueError):
            return None
    return None


def detect(walltime_minutes: float | None = None, cores: list[int] | None = None) -> Resources:
    found = gpu_probe.detect()
    return Resources(cores=cores or detect_cores(), gpus=list(found.ids),
                     memory=psutil.virtual_memory().total,
                     end_time=detect_end_time(walltime_minutes), gpu_kind=found)
