"""Pilots as real Slurm batch jobs on 4 fake nodes of one machine (scripts/slurm_up).

Real sbatch, srun, slurmd and MPICH (pip wheel, ``srun --mpi=pmi2``); skipped without Slurm
locally, failed in CI (PILOTFISH_REQUIRE_EXTERNAL=1).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import (ServerHandle, sbatch, scancel, slurm_job_state, wait_for)

APPS = Path(__file__).parent / "apps"
pytestmark = pytest.mark.slow


def pilot_script(server: ServerHandle, nodes: int = 4, head_args: str = "",
                 agent_args: str = "--idle-timeout 3") -> str:
    return f"""#!/bin/bash
#SBATCH -N {nodes}
#SBATCH --exclusive
#SBATCH -t 10
#SBATCH -J pilotfish-test
#SBATCH -o {server.home}/pilot-%j.out
exec {sys.executable} -m pilotfish --home {server.home} pilot run --server {server.address} \\
    --mpi pmi2 {head_args} -- {agent_args}
"""


def counts(c, ids) -> dict:
    got: dict[str, int] = {}
    for j in c.jobs({"ids": ids}, limit=0):
        got[j["state"]] = got.get(j["state"], 0) + 1
    return got


def pilot_log(server: ServerHandle, jid: str) -> str:
    f = server.home / f"pilot-{jid}.out"
    return f.read_text() if f.exists() else "(no pilot output)"


@pytest.fixture
def pilot_jobs():
    """Slurm jobs submitted by a test; cancelled if the test leaves them behind."""
    ids: list[str] = []
    yield ids
    for jid in ids:
        if slurm_job_state(jid) is not None:
            scancel(jid)
            wait_for(lambda: slurm_job_state(jid) is None, 30, 0.2, f"job {jid} to leave")


def test_four_node_pilot_runs_single_core_tasks_and_two_node_mpi_jobs(slurm, server,
                                                                      pilot_jobs):
    """200 single-core tasks, 5 two-node MPI jobs and 3 two-rank one-node MPI jobs on a 4-node
    pilot: every task pinned to exactly its core, every MPI job of the right size."""
    c = server.client()
    c.add_app({"name": "probe", "executable": sys.executable,
               "args": [str(APPS / "probe_task.py")]})
    c.add_app({"name": "mpi", "executable": sys.executable,
               "args": [str(APPS / "mpi_hello.py")]})
    singles = c.add_jobs([{"name": f"s{i}", "application": "probe"} for i in range(200)])
    mpis = c.add_jobs([{"name": f"m{i}", "application": "mpi", "num_nodes": 2,
                        "processes_per_node": 2} for i in range(5)])
    packed = c.add_jobs([{"name": f"p{i}", "application": "mpi", "processes_per_node": 2}
                         for i in range(3)])
    big = c.add_job(name="big", application="mpi", num_nodes=8)
    jid = sbatch(pilot_script(server))
    pilot_jobs.append(jid)
    pilot = f"slurm-{jid}"
    wait_for(lambda: len([a for a in c.agents() if a["pilot"] == pilot]) == 4, 60, 0.1,
             "4 agents of the pilot")
    # A job larger than every pilot stays queued, with the reason, and hangs nothing.
    # (an agent counts once its first update has said what it offers: a moment after its
    # hello, so the reason may first say fewer nodes)
    reason = wait_for(lambda: (r := c.job(big)["waiting"]) and "pilot has 4" in r and r, 10,
                      0.1, "a waiting reason that counts the pilot's 4 nodes")
    assert "needs 8 nodes" in reason and "largest connected pilot has 4" in reason, reason
    ids = singles + mpis + packed
    wait_for(lambda: counts(c, ids).get("JOB_FINISHED") == len(ids), 180, 0.2,
             f"all jobs to finish ({pilot_log(server, jid)})")
    agents = [a for a in c.agents(all=True) if a["pilot"] == pilot]
    assert sorted(a["node"] for a in agents) == ["node1", "node2", "node3", "node4"]
    assert all(a["affinity_ok"] and a["launcher"] == "srun" for a in agents), agents
    work = server.home / "work"
    used = set()
    for j in map(c.job, singles):
        probe = json.loads((work / j["workdir"] / "probe.json").read_text())
        # exactly its one assigned core, not the agent's whole mask
        assert probe["mask"] == probe["cores"] and len(probe["cores"]) == 1, (j["id"], probe)
        used.add(probe["node"])
    assert len(used) >= 2 and used <= {"node1", "node2", "node3", "node4"}, used
    for j in map(c.job, mpis):
        lines = (work / j["workdir"] / "ranks.txt").read_text().split("\n")[:-1]
        rows = [line.split() for line in lines]
        # a wrong PMI gives every rank "0 of 1": the size is the proof MPI wired up
        assert sorted(int(r[0]) for r in rows) == [0, 1, 2, 3], rows
        assert {int(r[1]) for r in rows} == {4}, rows
        hosts = [r[2] for r in rows]
        assert len(set(hosts)) == 2 and all(hosts.count(h) == 2 for h in hosts), rows
        assert all(len(r[3].split(",")) == 1 for r in rows), rows  # one core per rank
    for j in map(c.job, packed):  # two ranks on one node, each on its own assigned core
        rows = [line.split() for line in
                (work / j["workdir"] / "ranks.txt").read_text().split("\n")[:-1]]
        assert sorted((int(r[0]), int(r[1])) for r in rows) == [(0, 2), (1, 2)], rows
        assert len({r[2] for r in rows}) == 1 and len({r[3] for r in rows}) == 2, rows
    # the pilot leaves by itself at the agents' idle timeout; the big job is still queued
    wait_for(lambda: slurm_job_state(jid) is None, 60, 0.2, "the pilot to end")
    assert "agents ended (exit 0)" in pilot_log(server, jid)
    assert c.job(big)["state"] == "READY"
    assert all(a["state"] == "EXITED" for a in c.agents(all=True) if a["pilot"] == pilot)


def test_scancel_hands_running_tasks_back_without_using_retries(slurm, server, pilot_jobs):
    c = server.client()
    c.add_app({"name": "sleep", "executable": "/bin/sleep", "args": ["60"]})
    ids = c.add_jobs([{"name": f"z{i}", "application": "sleep"} for i in range(4)])
    jid = sbatch(pilot_script(server, nodes=2, agent_args="--idle-timeout 0 --prefetch 0"))
    pilot_jobs.append(jid)
    wait_for(lambda: counts(c, ids).get("RUNNING") == 4, 60, 0.1, "4 running tasks")
    scancel(jid)
    wait_for(lambda: slurm_job_state(jid) is None, 60, 0.2, "the pilot to end")
    wait_for(lambda: counts(c, ids).get("RESTART_READY") == 4, 30, 0.2, "the hand-back")
    jobs = [c.job(j) for j in ids]
    assert all(j["retries"] == 0 and j["agent"] is None for j in jobs), [
        (j["id"], j["retries"], j["agent"], [(e["to_state"], e["message"]) for e in j["events"]])
        for j in jobs]
    agents = [a for a in c.agents(all=True) if a["pilot"] == f"slurm-{jid}"]
    assert len(agents) == 2 and all(a["state"] == "EXITED" for a in agents), agents


def test_pilot_leaves_before_its_walltime_ends(slurm, server, pilot_jobs):
    c = server.client()
    c.add_app({"name": "sleep", "executable": "/bin/sleep", "args": ["60"]})
    ids = c.add_jobs([{"name": f"w{i}", "application": "sleep"} for i in range(2)])
    jid = sbatch(pilot_script(server, nodes=1, head_args="--walltime 0.1",
                              agent_args="--idle-timeout 0 --prefetch 0"))
    pilot_jobs.append(jid)
    wait_for(lambda: counts(c, ids).get("RUNNING") == 2, 60, 0.1, "2 running tasks")
    wait_for(lambda: slurm_job_state(jid) is None, 30, 0.2, "the pilot to end at its walltime")
    assert counts(c, ids) == {"RESTART_READY": 2}
    assert "agents ended (exit 0)" in pilot_log(server, jid)


def test_relay_pilot_runs_tasks_through_rank_0(slurm, server, pilot_jobs):
    """`pilot run --relay mpi`: agents are MPI ranks under srun --mpi=pmi2; only rank 0 talks
    to the server. Every node's agent still registers (through the relay) and runs work."""
    c = server.client()
    c.add_app({"name": "probe", "executable": sys.executable,
               "args": [str(APPS / "probe_task.py")]})
    ids = c.add_jobs([{"name": f"r{i}", "application": "probe"} for i in range(40)])
    jid = sbatch(pilot_script(server, nodes=3, head_args="--relay mpi"))
    pilot_jobs.append(jid)
    wait_for(lambda: counts(c, ids).get("JOB_FINISHED") == len(ids), 120, 0.2,
             f"all jobs to finish ({pilot_log(server, jid)})")
    wait_for(lambda: slurm_job_state(jid) is None, 60, 0.2, "the pilot to end")
    agents = [a for a in c.agents(all=True) if a["pilot"] == f"slurm-{jid}"]
    assert sorted(a["node"] for a in agents) == ["node1", "node2", "node3"], agents
    assert all(a["state"] == "EXITED" for a in agents), agents  # goodbyes came through
    assert sum(a["tasks_done"] for a in agents) == len(ids)
    assert "agents ended (exit 0)" in pilot_log(server, jid)
