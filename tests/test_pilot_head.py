"""The pilot head's plan on each kind of machine, and what it and the agents refuse.

The launch lines are golden: they follow the forms the sites document for starting ONE process
per node with the whole node's CPUs and binding off (Slurm/NERSC ``srun -N n --ntasks-per-node=1
-c CPUS --cpu-bind=none``; ALCF Theta/Blue Waters ``aprun -n n -N 1 -d CPUS -cc none``; MPICH
Hydra ``mpiexec -n n -ppn 1 -bind-to none -hosts ...``; Cray PALS ``mpiexec -n n --ppn 1 --depth
CPUS --cpu-bind none``; OLCF Summit ``jsrun --nrs n --rs_per_host 1 --cpu_per_rs CPUS --bind
none``). aprun, PALS and jsrun cannot run here: their programs are stand-in files on a private
PATH, found but never run.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import run_cli, wait_for

from pilotfish.errors import PilotfishError, ValidationError
from pilotfish.pilot.head import plan
from pilotfish.pilot.launch import hosts_for

SERVER = "tcp://login1:5555"


@pytest.fixture
def bindir(tmp_path):
    d = tmp_path / "bin"
    d.mkdir()
    for name in ("srun", "aprun", "mpiexec", "jsrun", "mpirun"):
        p = d / name
        p.write_text("#!/bin/sh\nexit 99\n")
        p.chmod(0o755)
    return d


def agent_tail(pilot: str, launcher: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pilotfish", "pilot", "agent", "--server", SERVER,
            "--pilot", pilot, "--launcher", launcher, *extra, "--idle-timeout", "60"]


def make(env: dict, **kw):
    return plan(["--idle-timeout", "60"], environ=env, server=SERVER, **kw)


def test_slurm_four_nodes(bindir):
    env = {"PATH": str(bindir), "HOME": "/home/u", "SLURM_JOB_ID": "77",
           "SLURM_JOB_NODELIST": "nid[001-004]", "PILOTFISH_HOME": "/home/u/.pf",
           "SECRET_TOKEN": "must-not-pass"}
    p = make(env, cpus_per_node=64, mpi="pmi2")
    assert p.pilot == "slurm-77" and p.node_source == "SLURM_JOB_NODELIST"
    assert p.argv == [str(bindir / "srun"), "-N", "4", "-n", "4", "--ntasks-per-node=1",
                      "-c", "64", "--cpu-bind=none", "-w", "nid001,nid002,nid003,nid004",
                      f"--export=PATH={bindir},HOME=/home/u,PILOTFISH_HOME=/home/u/.pf",
                      *agent_tail("slurm-77", "srun", "--mpi", "pmi2")]


def test_theta_cobalt_aprun_uses_nids_and_full_depth(bindir):
    env = {"PATH": str(bindir), "COBALT_JOBID": "4242", "COBALT_PARTNAME": "3835-3836"}
    p = make(env, cpus_per_node=64)
    assert p.launcher == "aprun" and p.nodes == ["nid03835", "nid03836"]
    # the BOSS-LDG lesson: -d is the whole node, never the default of 1
    assert p.argv == [str(bindir / "aprun"), "-n", "2", "-N", "1", "-d", "64", "-cc", "none",
                      "-L", "3835,3836", "-e", f"PATH={bindir}",
                      *agent_tail("cobalt-4242", "aprun")]


def test_pbs_hydra_mpiexec(bindir, tmp_path):
    nodefile = tmp_path / "nodes"
    nodefile.write_text("x1\nx1\nx2\nx2\n")
    env = {"PATH": str(bindir), "PBS_JOBID": "99.server", "PBS_NODEFILE": str(nodefile)}
    p = make(env, cpus_per_node=32, launcher="mpiexec")
    assert p.pilot == "pbs-99" and p.nodes == ["x1", "x2"]
    assert p.argv[:p.argv.index(sys.executable)] == [
        str(bindir / "mpiexec"), "-n", "2", "-ppn", "1", "-bind-to", "none", "-hosts", "x1,x2",
        "-genvnone", "-genv", "PATH", str(bindir)]


def test_polaris_pals(bindir, tmp_path):
    nodefile = tmp_path / "nodes"
    nodefile.write_text("x3001c0s1b0n0\nx3001c0s1b1n0\n")
    env = {"PATH": str(bindir), "PBS_JOBID": "5.polaris", "PBS_NODEFILE": str(nodefile)}
    p = make(env, cpus_per_node=64, launcher="pals")
    assert p.argv[:p.argv.index(sys.executable)] == [
        str(bindir / "mpiexec"), "-n", "2", "--ppn", "1", "--depth", "64", "--cpu-bind", "none",
        "--hosts", "x3001c0s1b0n0,x3001c0s1b1n0", "--envnone", "--env", f"PATH={bindir}"]


def test_summit_jsrun(bindir, tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("batch1\n" + "a01n01\n" * 42 + "a01n02\n" * 42)
    env = {"PATH": str(bindir), "LSB_JOBID": "31", "LSB_DJOB_HOSTFILE": str(hostfile)}
    p = make(env, cpus_per_node=42)
    assert p.launcher == "jsrun" and p.nodes == ["a01n01", "a01n02"]
    assert p.argv[:p.argv.index(sys.executable)] == [
        str(bindir / "jsrun"), "--nrs", "2", "--tasks_per_rs", "1", "--cpu_per_rs", "42",
        "--gpu_per_rs", "0", "--rs_per_host", "1", "--bind", "none", "-E", f"PATH={bindir}"]


def test_relay_mode_starts_relay_ranks_with_pmi(bindir):
    env = {"PATH": str(bindir), "SLURM_JOB_ID": "8", "SLURM_JOB_NODELIST": "n[1-2]"}
    p = make(env, cpus_per_node=2, mpi="pmi2", relay="mpi")
    assert "--mpi=pmi2" in p.argv
    i = p.argv.index(sys.executable)
    assert p.argv[i:i + 8] == [sys.executable, "-m", "pilotfish", "pilot", "relay", "--server",
                               SERVER, "--"]


def test_one_node_without_batch_system_runs_the_agent_directly(bindir):
    p = make({"PATH": str(bindir)}, cpus_per_node=2, nodes="localhost")
    assert p.launcher == "local" and p.argv[0] == sys.executable


def test_walltime_gives_agents_an_end_before_the_allocation_ends(bindir):
    import time
    p = make({"PATH": str(bindir)}, nodes="localhost", walltime=100.0)
    left = p.end_time - time.time()
    assert 100 * 60 - 61 <= left <= 100 * 60 - 59  # a 60 s margin
    assert p.env["PILOTFISH_END_TIME"]


@pytest.mark.parametrize("kw, env, message", [
    ({"launcher": "aprun"}, {"PATH": "/nonexistent"}, "needs `aprun`, which is not on this"),
    ({"nodes": "node[1-"}, {}, "node[1-"),
    ({"nodes": "a;rm -rf /"}, {}, ""),
    ({"nodes": "node[1-3]", "launcher": "local"}, {}, "launcher 'local' starts agents on this"),
    ({"relay": "smoke"}, {}, "the only relay is 'mpi'"),
    ({"launcher": "qsub"}, {}, "unknown launcher 'qsub'"),
])
def test_bad_head_input_is_refused(bindir, kw, env, message):
    env = {"PATH": str(bindir), **env}
    with pytest.raises((ValidationError, PilotfishError)) as e:
        make(env, **kw)
    assert message in str(e.value)


def test_hosts_for_launchers():
    assert hosts_for("aprun", ["nid00012", "nid00100"]) == ("12", "100")
    assert hosts_for("aprun", ["login1"]) == ()
    assert hosts_for("jsrun", ["a", "b"]) == ()
    assert hosts_for("srun", ["a", "b"]) == ("a", "b")


def test_cli_dry_run_json_and_one_line_errors(home, bindir):
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "SLURM_JOB_ID": "3",
           "SLURM_JOB_NODELIST": "node[1-2]"}
    cmd = [sys.executable, "-m", "pilotfish", "pilot", "run", "--server", SERVER, "--dry-run",
           "--json", "--cpus-per-node", "4", "--", "--idle-timeout", "5"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["nodes"] == ["node1", "node2"] and d["pilot"] == "slurm-3"
    assert d["argv"][-2:] == ["--idle-timeout", "5"]
    env["SLURM_JOB_NODELIST"] = "node[2-1]"
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "SLURM_JOB_NODELIST" in r.stderr
    r = run_cli(home, "pilot", "run", "--launcher", "nope", "--server", SERVER)
    assert r.returncode == 2 and "nope" in r.stderr


# -- the affinity self-check -------------------------------------------------------------------
needs_two_cpus = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2 or not shutil.which("taskset"),
                                    reason="needs 2 CPUs and taskset")


@needs_two_cpus
def test_strict_affinity_refuses_an_agent_pinned_to_part_of_the_node(server):
    cmd = ["taskset", "-c", "0", sys.executable, "-m", "pilotfish", "--home", str(server.home),
           "pilot", "agent", "--server", server.address, "--strict-affinity"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "--strict-affinity: this agent may use only 1 of the node's" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert server.client().agents(all=True) == []


@needs_two_cpus
def test_pinned_agent_is_flagged_loudly_and_in_pilot_ls(server, tmp_path):
    log = tmp_path / "agent.log"
    cmd = ["taskset", "-c", "0", sys.executable, "-m", "pilotfish", "--home", str(server.home),
           "pilot", "agent", "--server", server.address, "--idle-timeout", "0",
           "--pilot", "p1"]
    with open(log, "w") as out:
        p = subprocess.Popen(cmd, stdout=out, stderr=out)
    server.agents.append(p)
    agents = wait_for(lambda: server.client().agents(), 30, what="the agent")
    assert agents[0]["affinity_ok"] is False and agents[0]["node_cores"] >= 2
    assert "AFFINITY: this agent may use only 1" in log.read_text()
    r = run_cli(server.home, "pilot", "ls", "--agents")
    assert r.returncode == 0 and "PINNED 1/" in r.stdout, r.stdout
    assert "pinned to part of their node" in r.stderr
    r = run_cli(server.home, "pilot", "ls", "--agents", "--json")
    assert json.loads(r.stdout)[0]["pilot"] == "p1"
    r = run_cli(server.home, "pilot", "ls", "--json")
    p1 = json.loads(r.stdout)[0]
    assert (p1["id"], p1["state"], p1["agents_alive"], p1["pinned"]) == ("p1", "RUNNING", 1, 1)
    r = run_cli(server.home, "pilot", "ls")
    assert "PINNED 1" in r.stdout and "p1" in r.stdout
    assert "WARNING" in (server.home / "server.log").read_text()


def test_unpinned_agent_passes_the_check(server):
    server.agent()
    agents = wait_for(lambda: server.client().agents(), 30, what="the agent")
    assert agents[0]["affinity_ok"] is True


# -- jobs no agent can run stay queued with the reason -----------------------------------------
def test_too_deep_or_gpu_jobs_wait_with_a_reason(server):
    c = server.client()
    c.add_app({"name": "t", "executable": "/bin/true"})
    deep = c.add_job(name="deep", application="t", cpus_per_process=4096)
    gpu = c.add_job(name="gpu", application="t", gpus_per_process=1)
    ranks = c.add_job(name="ranks", application="t", processes_per_node=2)
    multi = c.add_job(name="multi", application="t", num_nodes=2)
    ok = c.add_job(name="ok", application="t")
    server.agent("--launcher", "local")
    wait_for(lambda: c.job(ok)["state"] == "JOB_FINISHED", 30, what="the small job")
    assert "no connected agent can run it: 4096 cores on one node" in c.job(deep)["waiting"]
    assert "1 cores and 1 GPUs on one node" in c.job(gpu)["waiting"]
    assert "no connected agent can run it" in c.job(ranks)["waiting"]
    assert "no pilot with a multi-node launcher is connected" in wait_for(
        lambda: c.job(multi)["waiting"], 10, what="the multi-node reason")
    assert {c.job(j)["state"] for j in (deep, gpu, ranks, multi)} == {"READY"}
    r = run_cli(server.home, "job", "show", str(deep))
    assert "waiting: 'no connected agent can run it" in r.stdout


# -- how an agent launches a multi-rank task ------------------------------------------------------
def _spec(**launch) -> dict:
    return {"job": 7, "attempt": 1, "name": "m", "argv": ["/usr/bin/app", "x"],
            "env": {"A": "1"}, "launch": {"nodes": 1, "ranks_per_node": 2, "cpus_per_rank": 1,
                                          "gpus_per_rank": 0, "hosts": [], **launch}}


def test_task_launch_srun_golden(bindir):
    from pilotfish.pilot.launch import TaskLauncher
    tl = TaskLauncher("srun", "node3", mpi="pmi2", overlap=True,
                      environ={"PATH": str(bindir), "HOME": "/h", "SECRET": "x"})
    env = f"--export=PATH={bindir},HOME=/h,A=1,PILOTFISH_JOB_ID=7,PILOTFISH_ATTEMPT=1," \
          "PILOTFISH_JOB_NAME=m,OMP_NUM_THREADS=1"
    # one node: exactly the cores the agent gave the task, so small MPI jobs can share a node
    assert tl.argv(_spec(), [4, 5]) == [
        str(bindir / "srun"), "-N", "1", "-n", "2", "--ntasks-per-node=2", "-c", "1",
        "--cpu-bind=map_cpu:4,5", "-w", "node3", "--mpi=pmi2", "--overlap", env,
        "/usr/bin/app", "x"]
    # several nodes: whole reserved nodes, depth binding
    assert tl.argv(_spec(nodes=2, hosts=["node3", "node4"], cpus_per_rank=2, ranks_per_node=1),
                   [0, 1]) == [
        str(bindir / "srun"), "-N", "2", "-n", "2", "--ntasks-per-node=1", "-c", "2",
        "--cpu-bind=cores", "-w", "node3,node4", "--mpi=pmi2", "--overlap",
        env.replace("OMP_NUM_THREADS=1", "OMP_NUM_THREADS=2"), "/usr/bin/app", "x"]


def test_task_launch_refusals(bindir):
    from pilotfish.pilot.launch import TaskLauncher
    local = TaskLauncher("local", "n", environ={"PATH": str(bindir)})
    with pytest.raises(ValidationError, match="launcher is 'local'"):
        local.argv(_spec(), [0, 1])
    tl = TaskLauncher("srun", "n", environ={"PATH": str(bindir)})
    with pytest.raises(ValidationError, match="launch"):
        tl.argv({**_spec(), "launch": {"nodes": "2"}}, [0])
    with pytest.raises(ValidationError, match="comma"):
        tl.argv({**_spec(), "env": {"B": "a,b"}}, [0, 1])
    with pytest.raises(PilotfishError, match="not on this node's PATH"):
        TaskLauncher("srun", "n", environ={"PATH": "/nonexistent"})
