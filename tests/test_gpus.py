"""GPUs beyond NVIDIA: AMD (Frontier) and Intel (Aurora) nodes are found and shared per task.

No GPU is on this machine, so detection runs on sysfs trees and tool outputs recorded from such
nodes (tests/data/gpus/: Frontier's kfd topology with one CPU node and eight MI250X GCDs,
Aurora's DRM devices with the BMC's VGA and six Data Center GPU Max 1550, a workstation whose
integrated Intel graphics is no compute GPU, an NVIDIA node's /proc/driver/nvidia; rocm-smi,
xpu-smi and nvidia-smi outputs). The hand-out runs end to end: a real agent, given the
variables a batch system sets on such a node, hands each task its own devices in its vendor's
variable.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from conftest import wait_for
from pilotfish.container import wrap
from pilotfish.pilot.contain import TaskContainer
from pilotfish.pilot.gpus import NONE, Gpus, detect

DATA = Path(__file__).parent / "data" / "gpus"


def tools(**outputs: str):
    """A command runner that answers from recorded outputs (and knows no other tool)."""
    files = {"rocm-smi": "rocm-smi-showid.txt", "xpu-smi": "xpu-smi-discovery.txt",
             "nvidia-smi": "nvidia-smi-L.txt"}
    return lambda argv: (DATA / files[argv[0]]).read_text() if argv[0] in outputs else ""


NO_TOOLS = tools()


def test_frontier_amd_gcds_from_the_kfd_topology():
    g = detect({}, DATA / "frontier/sys", NO_TOOLS)
    assert g == Gpus("amd", tuple(str(i) for i in range(8)), "ROCR_VISIBLE_DEVICES")


def test_aurora_intel_gpus_from_drm_and_not_the_bmc_vga():
    g = detect({}, DATA / "aurora/sys", NO_TOOLS)
    assert g == Gpus("intel", tuple(str(i) for i in range(6)), "ZE_AFFINITY_MASK")


def test_integrated_graphics_is_no_gpu(tmp_path):
    assert detect({}, DATA / "igpu/sys", NO_TOOLS) == NONE
    assert detect({}, tmp_path, NO_TOOLS) == NONE


def test_nvidia_from_its_driver_or_nvidia_smi(tmp_path):
    assert detect({}, DATA / "nvidia/sys", NO_TOOLS) == Gpus(
        "nvidia", ("0", "1", "2", "3"), "CUDA_VISIBLE_DEVICES")
    assert detect({}, tmp_path, tools(**{"nvidia-smi": 1})).ids == ("0", "1")


def test_tools_when_sysfs_says_nothing(tmp_path):
    assert detect({}, tmp_path, tools(**{"rocm-smi": 1})) == Gpus(
        "amd", ("0", "1"), "ROCR_VISIBLE_DEVICES")
    assert detect({}, tmp_path, tools(**{"xpu-smi": 1})) == Gpus(
        "intel", ("0", "1"), "ZE_AFFINITY_MASK")


def test_the_allocations_subset_comes_from_the_vendors_variable():
    """Slurm's gres sets CUDA_VISIBLE_DEVICES, ROCR_VISIBLE_DEVICES and ZE_AFFINITY_MASK alike;
    the hardware says which one counts."""
    slurm = {"CUDA_VISIBLE_DEVICES": "0,1", "ROCR_VISIBLE_DEVICES": "4,5",
             "ZE_AFFINITY_MASK": "2,3", "GPU_DEVICE_ORDINAL": "0,1"}
    assert detect(slurm, DATA / "frontier/sys", NO_TOOLS).ids == ("4", "5")
    assert detect(slurm, DATA / "aurora/sys", NO_TOOLS).ids == ("2", "3")
    assert detect(slurm, DATA / "nvidia/sys", NO_TOOLS).ids == ("0", "1")
    hip = detect({"HIP_VISIBLE_DEVICES": "1"}, DATA / "frontier/sys", NO_TOOLS)
    assert hip == Gpus("amd", ("1",), "HIP_VISIBLE_DEVICES")
    assert detect({"ROCR_VISIBLE_DEVICES": ""}, DATA / "frontier/sys", NO_TOOLS).ids == ()


def test_a_vendor_variable_alone(tmp_path):
    """No hardware visible (a container, this machine): the variable set says what is given."""
    assert detect({"ROCR_VISIBLE_DEVICES": "0,1"}, tmp_path, NO_TOOLS).vendor == "amd"
    assert detect({"ZE_AFFINITY_MASK": "0.0,0.1"}, tmp_path, NO_TOOLS) == Gpus(
        "intel", ("0.0", "0.1"), "ZE_AFFINITY_MASK")
    assert detect({"CUDA_VISIBLE_DEVICES": "-1"}, tmp_path, NO_TOOLS) == NONE


def test_task_variables_per_vendor():
    amd = Gpus("amd", ("4", "5", "6"), "ROCR_VISIBLE_DEVICES")
    # HIP counts within ROCR's set, and HIP also reads CUDA_VISIBLE_DEVICES: inherited values
    # of either would filter the task's share a second time
    assert amd.task_env(["5"]) == {"ROCR_VISIBLE_DEVICES": "5", "HIP_VISIBLE_DEVICES": None,
                                   "CUDA_VISIBLE_DEVICES": None, "GPU_DEVICE_ORDINAL": None}
    assert Gpus("intel", ("0", "1"), "ZE_AFFINITY_MASK").task_env(["1"]) == {
        "ZE_AFFINITY_MASK": "1"}
    assert Gpus("nvidia", ("0",), "CUDA_VISIBLE_DEVICES").task_env([]) == {
        "CUDA_VISIBLE_DEVICES": ""}
    assert NONE.task_env([]) == {}


def test_apptainer_gets_rocm_on_amd_nodes(tmp_path):
    """A containerized GPU task on Frontier runs `apptainer exec --rocm`, on NVIDIA `--nv`;
    its share rides along in the container's environment (golden argv, Apptainer's docs)."""
    spec = {"job": 1, "attempt": 1, "name": "j", "env": {},
            "container": {"runtime": "apptainer", "image": "docker://lab/sim:1"}}
    env = {"PATH": str(tmp_path)}
    (tmp_path / "apptainer").write_text("#!/bin/sh\n")
    (tmp_path / "apptainer").chmod(0o755)
    amd = TaskContainer(None, (), env, gpus=Gpus("amd", ("0", "1"), "ROCR_VISIBLE_DEVICES"))
    argv = amd.argv(spec, ["/sim"], "/w", ["1"])
    assert "--rocm" in argv and "--nv" not in argv
    assert "ROCR_VISIBLE_DEVICES=1" in argv
    nv = TaskContainer(None, (), env).argv(spec, ["/sim"], "/w", ["1"])
    assert "--nv" in nv and "CUDA_VISIBLE_DEVICES=1" in nv
    intel = TaskContainer(None, (), env, gpus=Gpus("intel", ("0", "1"), "ZE_AFFINITY_MASK"))
    argv = intel.argv(spec, ["/sim"], "/w", ["0"])
    assert "--nv" not in argv and "--rocm" not in argv and "ZE_AFFINITY_MASK=0" in argv
    assert wrap  # the same wrapper builds every runtime's argv


@pytest.mark.parametrize("variables,var,others", [
    ({"ROCR_VISIBLE_DEVICES": "2,3", "HIP_VISIBLE_DEVICES": "0,1"}, "ROCR_VISIBLE_DEVICES",
     ("HIP_VISIBLE_DEVICES",)),
    ({"ZE_AFFINITY_MASK": "4,5"}, "ZE_AFFINITY_MASK", ()),
])
def test_an_agent_hands_each_task_its_own_devices(server, tmp_path, variables, var, others):
    """A real agent on an AMD or Intel node (as Slurm leaves the variables) runs two one-GPU
    tasks at once: each sees one device of the allocation's, in its vendor's variable."""
    probe = tmp_path / "probe.py"
    probe.write_text("import json, os, time\n"
                     f"json.dump({{k: os.environ.get(k) for k in {[var, *others]!r}}}, "
                     "open('gpu.json', 'w'))\ntime.sleep(0.5)\n")
    with server.client() as c:
        c.add_app({"name": "g", "executable": sys.executable, "args": ["-S", str(probe)],
                   "resources": {"gpus_per_process": 1}})
        ids = c.add_jobs([{"name": f"g{i}", "application": "g"} for i in range(2)])
    env = {k: v for k, v in os.environ.items()
           if k not in ("CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES",
                        "ZE_AFFINITY_MASK")}
    old = dict(os.environ)
    os.environ.clear()
    os.environ.update(env, **variables)
    try:
        server.agent(work_root=tmp_path / "work")
    finally:
        os.environ.clear()
        os.environ.update(old)
    with server.client() as c:
        wait_for(lambda: c.counts({"ids": ids}).get("JOB_FINISHED") == 2, 30,
                 what="both GPU jobs finished")
        seen = [json.loads((tmp_path / "work" / c.job(j)["workdir"] / "gpu.json").read_text())
                for j in ids]
    given = sorted(s[var] for s in seen)
    assert given == sorted(variables[var].split(",")), seen
    assert all(s[o] is None for s in seen for o in others), seen
