"""The node's GPUs -- NVIDIA, AMD or Intel -- and the variables that give a task its share.

Vendors name the same idea differently. A batch system often sets several of these variables on
a GPU node whatever its vendor (Slurm's gres sets CUDA_VISIBLE_DEVICES, ROCR_VISIBLE_DEVICES
and ZE_AFFINITY_MASK alike), so the vendor comes from the hardware first -- NVIDIA's driver,
AMD's kfd topology, Intel's DRM devices, or their tools -- and the ids from that vendor's own
variable when it is set (the allocation's subset), else from the hardware:

=========  ============================================  =============================================
vendor     found by                                      a task gets
=========  ============================================  =============================================
nvidia     /proc/driver/nvidia/gpus, ``nvidia-smi -L``   CUDA_VISIBLE_DEVICES=<its ids>
amd        /sys/class/kfd/kfd/topology/nodes/*/           ROCR_VISIBLE_DEVICES=<its ids> (HIP and CUDA
           properties with ``simd_count`` > 0             variables removed: HIP counts within ROCR's
           (CPU nodes have 0), ``rocm-smi --showid``      set); HIP_VISIBLE_DEVICES when the ids came
                                                          from it
intel      /sys/class/drm/card*/device: vendor 0x8086,   ZE_AFFINITY_MASK=<its ids>
           class 0x0380xx (a data-center GPU, not the
           VGA-class integrated graphics), or
           ``xpu-smi discovery``
=========  ============================================  =============================================

Every function takes the environment, the sysfs root and a command runner, so tests run on
recorded trees and outputs (tests/data/gpus/).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

#: The variable that lists a vendor's visible devices, as this module reads and writes it.
VARIABLE = {"nvidia": "CUDA_VISIBLE_DEVICES", "amd": "ROCR_VISIBLE_DEVICES",
            "intel": "ZE_AFFINITY_MASK"}
#: Variables that also select devices for a vendor's runtimes; a task's share must not be
#: filtered again by values the agent inherited.
_ALSO = {"amd": ("HIP_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES", "GPU_DEVICE_ORDINAL")}

Runner = Callable[[list[str]], str]


@dataclass(frozen=True)
class Gpus:
    vendor: str | None   # "nvidia", "amd", "intel"; None: no GPUs
    ids: tuple[str, ...]
    variable: str | None  # where a task's ids go

    def task_env(self, ids: list[str]) -> dict[str, str | None]:
        """The variables to set (None: remove) for a task given ``ids`` of this node's GPUs."""
        if self.vendor is None:
            return {}
        env: dict[str, str | None] = {self.variable: ",".join(ids)}
        for other in _ALSO.get(self.vendor, ()):
            if other != self.variable:
                env[other] = None
        return env


NONE = Gpus(None, (), None)


def _run(argv: list[str]) -> str:
    if not shutil.which(argv[0]):
        return ""
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _listed(value: str) -> tuple[str, ...]:
    """Ids from a visible-devices variable: an empty value or -1 means none."""
    return tuple(g.strip() for g in value.split(",") if g.strip() and g.strip() != "-1")


def nvidia_ids(sys_root: Path, run: Runner) -> tuple[str, ...]:
    out = run(["nvidia-smi", "-L"])
    ids = tuple(m.group(1) for m in re.finditer(r"^GPU (\d+):", out, re.M))
    if ids:
        return ids
    gpus = Path(sys_root).parent / "proc/driver/nvidia/gpus"  # /sys -> /proc; trees alike
    try:
        return tuple(str(i) for i in range(len(list(gpus.iterdir()))))
    except OSError:
        return ()


def amd_ids(sys_root: Path, run: Runner) -> tuple[str, ...]:
    """GPU agents of the kfd topology in node order (how ROCm numbers them), else rocm-smi."""
    nodes = Path(sys_root, "class/kfd/kfd/topology/nodes")
    found = []
    try:
        entries = sorted(nodes.iterdir(), key=lambda p: int(p.name) if p.name.isdigit() else 0)
    except OSError:
        entries = []
    for node in entries:
        try:
            props = (node / "properties").read_text()
        except OSError:
            continue
        m = re.search(r"^simd_count\s+(\d+)", props, re.M)
        if m and int(m.group(1)) > 0:
            found.append(str(len(found)))
    if found:
        return tuple(found)
    out = run(["rocm-smi", "--showid"])
    return tuple(sorted({m.group(1) for m in re.finditer(r"^GPU\[(\d+)\]", out, re.M)}, key=int))


def intel_ids(sys_root: Path, run: Runner) -> tuple[str, ...]:
    """Intel data-center GPUs (PCI class 0x0380xx) in card order, else xpu-smi's device ids."""
    drm = Path(sys_root, "class/drm")
    found = []
    try:
        cards = sorted((p for p in drm.iterdir() if re.fullmatch(r"card\d+", p.name)),
                       key=lambda p: int(p.name[4:]))
    except OSError:
        cards = []
    for card in cards:
        try:
            vendor = (card / "device/vendor").read_text().strip().lower()
            cls = (card / "device/class").read_text().strip().lower()
        except OSError:
            continue
        if vendor == "0x8086" and cls.startswith("0x0380"):
            found.append(str(len(found)))
    if found:
        return tuple(found)
    out = run(["xpu-smi", "discovery"])
    return tuple(m.group(1) for m in re.finditer(r"^\|\s*(\d+)\s*\|\s*Device Name", out, re.M))


_PROBES = {"nvidia": nvidia_ids, "amd": amd_ids, "intel": intel_ids}


def detect(env: Mapping[str, str] | None = None, sys_root: str | Path = "/sys",
           run: Runner = _run) -> Gpus:
    """This node's GPUs as this process may use them (see the module doc)."""
    env = os.environ if env is None else env
    for vendor, probe in _PROBES.items():
        ids = probe(Path(sys_root), run)
        if not ids:
            continue
        var = VARIABLE[vendor]
        if vendor == "amd" and var not in env and "HIP_VISIBLE_DEVICES" in env:
            var = "HIP_VISIBLE_DEVICES"
        if var in env:  # the allocation's subset
            return Gpus(vendor, _listed(env[var]), var)
        return Gpus(vendor, ids, var)
    # no hardware seen (a container, a test): a vendor variable alone still says what is given
    for vendor, var in VARIABLE.items():
        if env.get(var) is not None:
            ids = _listed(env[var])
            return Gpus(vendor if ids else None, ids, var if ids else None)
    if env.get("HIP_VISIBLE_DEVICES"):
        return Gpus("amd", _listed(env["HIP_VISIBLE_DEVICES"]), "HIP_VISIBLE_DEVICES")
    return NONE
