"""Elastic provisioning for real: a site agent keeps pilots queued on the local 4-node Slurm
(scripts/slurm_up) for a backlog, within its profile's policy, and pauses on failing sbatch."""
from __future__ import annotations

import signal
import subprocess
import sys

import pytest
from conftest import pilotfish_cmd, run_cli, slurm_job_state, wait_for

pytestmark = pytest.mark.slow


def profile(home, name: str, text: str) -> None:
    (home / "sites").mkdir(exist_ok=True)
    (home / "sites" / f"{name}.yaml").write_text(text)


def start_site_agent(server, site: str, *args: str) -> subprocess.Popen:
    log = open(server.home / f"site-{site}.log", "ab")
    p = subprocess.Popen(pilotfish_cmd(server.home, "site", "agent", "--site", site, "-v",
                                       *args), stdout=log, stderr=log)
    log.close()
    server.agents.append(p)  # stopped with the server's agents at teardown
    return p


def test_site_agent_provisions_pilots_for_a_backlog_within_policy(slurm, server):
    c = server.client()
    profile(server.home, "testslurm", "extends: localslurm\n"
            "pilot: {idle_timeout: 3, submit_interval: 2, max_submits_per_interval: 1}\n")
    c.add_app({"name": "nap", "executable": "/bin/sleep", "args": ["0.05"]})
    ids = c.add_jobs([{"name": f"j{i}", "application": "nap"} for i in range(500)])
    agent = start_site_agent(server, "testslurm", "--poll", "0.5")
    seen_nodes = seen_queued = 0
    samples = []

    def done() -> bool:
        nonlocal seen_nodes, seen_queued
        ps = [p for p in c.pilots(site="testslurm") if p["batch_id"]]
        seen_nodes = max(seen_nodes, sum(p["nodes"] for p in ps))
        seen_queued = max(seen_queued, sum(1 for p in ps if p["state"] == "QUEUED"))
        samples.append(len(ps))
        return c.counts({"ids": ids}).get("JOB_FINISHED") == len(ids)

    wait_for(done, 180, 0.2, "all jobs to finish under provisioned pilots")
    assert seen_nodes <= 4 and seen_queued <= 2, (seen_nodes, seen_queued)
    pilots = [p for p in c.pilots(all=True, site="testslurm")]
    assert pilots and all(p["batch_id"] and p["scheduler"] == "slurm" for p in pilots)
    assert all(p["nodes"] == 2 and p["queue"] == "debug" for p in pilots)
    # pilots leave at their idle timeout; the site agent sees them finish; the queue empties
    wait_for(lambda: all(p["state"] == "FINISHED" for p in c.pilots(all=True, site="testslurm")),
             90, 0.5, "every pilot FINISHED")
    pilots = c.pilots(all=True, site="testslurm")
    # FINISHED as soon as the agents left; the batch jobs end a moment later
    wait_for(lambda: all(slurm_job_state(p["batch_id"]) is None for p in pilots), 30, 0.2,
             "the batch jobs to end")
    wait_for(lambda: all(p["batch_state"] in ("FINISHED", "MISSING")
                         for p in c.pilots(all=True, site="testslurm")), 30, 0.5,
             "the site agent to record how they ended")
    pilots = c.pilots(all=True, site="testslurm")
    for p in pilots:  # the script, its output and the batch id are kept for debugging
        wd = server.home / "pilots" / p["id"]
        assert (wd / "batch_id").read_text().strip() == p["batch_id"]
        assert any(f.name.endswith(".sh") for f in wd.iterdir())
    summary = c.summary({"ids": ids})
    alloc = sum((p["state_time"] - p["submitted"]) * p["nodes"] * 2 for p in pilots)
    print(f"\nallocation efficiency (busy core-s / pilot core-s incl. queue wait): "
          f"{summary['core_seconds']:.1f} / {alloc:.1f} = {summary['core_seconds'] / alloc:.3f}"
          f"; {len(pilots)} pilots")
    agent.send_signal(signal.SIGTERM)
    assert agent.wait(30) == 0
    r = run_cli(server.home, "pilot", "ls", "-a", "--site", "testslurm")
    assert r.returncode == 0 and "FINISHED" in r.stdout


def test_failing_sbatch_pauses_provisioning_with_the_error(slurm, server):
    c = server.client()
    profile(server.home, "badslurm", "extends: localslurm\n"
            "queues:\n  debug: {default: false}\n"
            "  nosuch: {default: true, max_nodes: 4, max_walltime: 60}\n")
    c.add_app({"name": "t", "executable": "/bin/true"})
    c.add_jobs([{"name": f"j{i}", "application": "t"} for i in range(10)])
    agent = start_site_agent(server, "badslurm", "--poll", "0.3", "--resume-after", "3600")
    site = wait_for(lambda: next((s for s in c.sites() if s["paused"]), None), 60, 0.2,
                    "the site to pause")
    assert "sbatch" in site["error"] and "nosuch" in site["error"].lower(), site["error"]
    assert c.pilots(all=True, site="badslurm") == []
    r = run_cli(server.home, "site", "status")
    assert r.returncode == 1 and "PAUSED" in r.stdout and "badslurm" in r.stderr
    log = (server.home / "site-badslurm.log").read_text()
    assert log.count("submission failed (") == 3 and "PAUSED" in log
    assert agent.poll() is None  # still polling, not looping on sbatch
    agent.send_signal(signal.SIGTERM)
    assert agent.wait(30) == 0


def test_pilot_submit_ls_cancel_by_hand(slurm, server):
    r = run_cli(server.home, "pilot", "submit", "--site", "localslurm", "--nodes", "1",
                "--walltime", "0:05:00", "--dry-run")
    assert r.returncode == 0, r.stderr
    script = r.stdout
    assert script.startswith("#!/bin/bash") and "#SBATCH --nodes=1" in script
    assert "--partition=debug" in script and "pilot run" in script
    assert "--launcher srun --mpi pmi2" in script and "--site localslurm" in script
    r = run_cli(server.home, "pilot", "submit", "--site", "localslurm", "--nodes", "1",
                "--walltime", "5", "--json")
    assert r.returncode == 0, r.stderr
    import json
    sub = json.loads(r.stdout)
    pid, batch_id = sub["pilot"], sub["batch_id"]
    assert (server.home / "pilots" / pid / "batch_id").read_text().strip() == batch_id
    c = server.client()
    wait_for(lambda: any(a["pilot"] == pid for a in c.agents()), 60, 0.2, "the pilot's agent")
    r = run_cli(server.home, "pilot", "ls")
    assert pid in r.stdout and batch_id in r.stdout
    r = run_cli(server.home, "pilot", "cancel", pid)
    assert r.returncode == 0 and "cancelled" in r.stdout, r.stderr
    wait_for(lambda: slurm_job_state(batch_id) is None, 60, 0.2, "the batch job to end")
    p = next(p for p in c.pilots(all=True) if p["id"] == pid)
    assert p["state"] == "CANCELLED" and p["reason"] == "cancelled by user"
    r = run_cli(server.home, "pilot", "cancel", pid)
    assert r.returncode == 1 and "has ended already (CANCELLED" in r.stderr


def test_a_hand_submitted_pilot_shows_what_it_is(slurm, server):
    """No site agent: `pilot ls` says RUNNING as soon as the agents said hello, hides the pilot
    once its agents left and its batch job ended (`-a` shows it FINISHED with how, and its DONE
    count); `pilot cancel` then refuses and changes nothing; a server restart keeps the count."""
    import json
    profile(server.home, "quick", "extends: localslurm\npilot: {idle_timeout: 2}\n")
    c = server.client()
    c.add_app({"name": "nap", "executable": "/bin/sleep", "args": ["0.1"]})
    ids = c.add_jobs([{"name": f"j{i}", "application": "nap"} for i in range(40)])
    r = run_cli(server.home, "pilot", "submit", "--site", "quick", "--nodes", "2",
                "--walltime", "5", "--json")
    assert r.returncode == 0, r.stderr
    pid, batch_id = json.loads(r.stdout)["pilot"], json.loads(r.stdout)["batch_id"]

    def row() -> dict | None:
        out = run_cli(server.home, "pilot", "ls", "-a", "--json")
        assert out.returncode == 0, out.stderr
        return next((p for p in json.loads(out.stdout) if p["id"] == pid), None)

    seen = wait_for(lambda: (p := row()) and p["agents_alive"] == 2 and p, 60, 0.2,
                    "both agents said hello")
    assert seen["state"] == "RUNNING", seen
    r = run_cli(server.home, "pilot", "ls")
    assert pid in r.stdout and "RUNNING" in r.stdout and "2/2" in r.stdout, r.stdout
    wait_for(lambda: c.counts({"ids": ids}).get("JOB_FINISHED") == 40, 60, 0.2, "jobs done")
    wait_for(lambda: slurm_job_state(batch_id) is None, 60, 0.2, "the batch job to end")
    ended = wait_for(lambda: (p := row()) and p["agents_alive"] == 0 and p, 30, 0.2,
                     "agents gone")
    assert ended["state"] == "FINISHED" and ended["tasks_done"] == 40, ended
    assert ended["batch_state"] in ("FINISHED", "MISSING"), ended  # sacct, if it keeps jobs
    assert "agents left" in ended["reason"] or ended["batch_state"] == "FINISHED", ended
    r = run_cli(server.home, "pilot", "ls")
    assert pid not in r.stdout, r.stdout
    r = run_cli(server.home, "pilot", "cancel", pid)
    assert r.returncode == 1 and "has ended already (FINISHED" in r.stderr, r.stderr
    assert "cancelled" not in r.stdout
    after = row()
    assert after["state"] == "FINISHED" and after["tasks_done"] == 40, after
    server.stop()
    server.start()
    assert row()["tasks_done"] == 40


@pytest.mark.parametrize("args, message", [
    (["--site", "nosuchsite"], "nosuchsite"),
    (["--site", "localslurm", "--nodes", "9"], "no queue takes a pilot of 9 nodes"),
    (["--site", "localslurm", "--walltime", "1:2:3:4"], "--walltime: expected a walltime"),
    (["--site", "localslurm", "--walltime", "600"], "no queue takes a pilot"),
    (["--site", "localslurm", "--queue", "gpu"], "has no queue 'gpu'"),
])
def test_pilot_submit_refuses_bad_requests_and_submits_nothing(server, args, message):
    r = run_cli(server.home, "pilot", "submit", *args)
    assert r.returncode != 0 and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (server.home / "pilots").exists()
    assert server.client().pilots(all=True) == []


def test_pilot_cancel_of_unknown_or_hand_started_pilots(server):
    r = run_cli(server.home, "pilot", "cancel", "nope")
    assert r.returncode == 1 and "no pilot 'nope'" in r.stderr


def test_server_start_with_a_site_runs_its_site_agent_and_stops_it(tmp_path):
    """`server start --site S` starts S's site agent beside the server: a backlog turns into a
    local pilot whose agent runs the jobs; `server stop` stops the site agent too. An unknown
    site is refused before anything starts. (The local scheduler: no Slurm needed.)"""
    import psutil
    from pilotfish.client import Client
    home = tmp_path / "home"
    home.mkdir()
    profile(home, "quick", "name: quick\nextends: local\npilot:\n  idle_timeout: 2\n")
    r = run_cli(home, "server", "start", "--site", "nosuch")
    assert r.returncode == 1 and "no site profile named 'nosuch'" in r.stderr
    assert r.stderr.count("\n") == 1 and not (home / "server.json").exists()
    r = run_cli(home, "server", "start", "--site", "quick", "--site-poll", "0.5")
    assert r.returncode == 0, r.stderr
    assert "site agent for quick: log" in r.stdout
    try:
        c = Client(home=home)
        [agent] = wait_for(lambda: [p for p in psutil.process_iter(["cmdline"]) if
                                    " site agent " in " ".join(p.info["cmdline"] or []) and
                                    str(home) in p.info["cmdline"]], 20, 0.2, "the site agent")
        c.add_app({"name": "echo", "executable": "/bin/echo", "args": ["{word}"],
                   "parameters": {"word": {"type": "str"}}})
        ids = c.add_jobs([{"name": f"e{i}", "application": "echo",
                           "parameters": {"word": f"w{i}"}} for i in range(3)])
        wait_for(lambda: c.counts({"ids": ids}) == {"JOB_FINISHED": 3}, 60, 0.2,
                 "the jobs to run on a pilot the site agent submitted")
        # (all: the pilot may have left already, on the server's word that no work is left)
        assert {p["site"] for p in c.pilots(all=True)} == {"quick"}
        c.close()
    finally:
        r = run_cli(home, "server", "stop")
    assert r.returncode == 0, r.stderr
    psutil.wait_procs([agent], timeout=15)
    assert not agent.is_running()
    log = (home / "logs" / "site-agent-quick.log").read_text()
    assert "submitted" in log, log
