"""Where each attempt of a job ran: agent, node, pilot, times and how it ended (job_attempts),
shown by `job show`, `job ls` and Client.job(), with real servers and agents."""
from __future__ import annotations

import json
import re
import signal
import time

import pytest

from conftest import ServerHandle, run_cli, wait_for


def finished(c, ids):
    counts = c.counts({"ids": ids})
    return all(s in ("JOB_FINISHED", "FAILED", "USER_KILLED") for s in counts) and counts


def _fail_once_app(c, marker):
    """Fails (exit 5) the first time it runs anywhere, then succeeds."""
    c.add_app({"name": "once", "executable": "/bin/sh",
               "args": ["-c", f"if [ -e {marker} ]; then echo fine; else touch {marker}; "
                              "echo first-time >&2; exit 5; fi"]})


def _run_across_two_agents(server: ServerHandle, tmp_path) -> int:
    c = server.client()
    _fail_once_app(c, tmp_path / "marker")
    [job] = c.add_jobs([{"name": "once", "application": "once", "max_retries": 2}])
    first = server.agent("--max-tasks", "1", "--node-name", "nodeA", "--pilot", "p1",
                         work_root=tmp_path / "w1")
    assert first.wait(30) == 0  # it ran its one task (the failure) and left
    assert c.job(job)["state"] == "RESTART_READY"
    server.agent("--node-name", "nodeB", "--pilot", "p2", work_root=tmp_path / "w2")
    assert wait_for(lambda: finished(c, [job]), 30) == {"JOB_FINISHED": 1}
    return job


def _check_two_attempts(c, job) -> list[dict]:
    d = c.job(job)
    assert d["attempts"] == 2 and d["agent"] is None
    runs = d["runs"]
    assert [r["attempt"] for r in runs] == [1, 2]
    assert [r["state"] for r in runs] == ["RUN_FAILED", "JOB_FINISHED"]
    assert [r["node"] for r in runs] == ["nodeA", "nodeB"]
    assert [r["pilot"] for r in runs] == ["p1", "p2"]
    assert [r["exit_code"] for r in runs] == [5, 0]
    assert runs[0]["agent"] != runs[1]["agent"]
    agents = {a["id"]: a for a in c.agents(all=True)}
    assert {r["agent"] for r in runs} == set(agents)
    assert all(agents[r["agent"]]["node"] == r["node"] for r in runs)
    for r in runs:
        # (start and end are the agent's clock, a turn's time: within a second of ours here)
        assert r["leased"] - 1 <= r["started"] <= r["ended"] <= time.time() + 1, r
        assert r["hosts"] is None
    assert "first-time" in runs[0]["message"] and "exit code 5" in runs[0]["message"]
    assert runs[1]["started"] == d["started"] and runs[1]["ended"] == d["ended"]
    return runs


def test_a_job_failed_on_one_agent_and_finished_on_another_shows_both(server: ServerHandle,
                                                                       tmp_path):
    job = _run_across_two_agents(server, tmp_path)
    c = server.client()
    runs = _check_two_attempts(c, job)
    # job show, for people: an attempts section with short agent ids, nodes, pilots, times
    out = run_cli(server.home, "job", "show", str(job)).stdout
    lines = out[out.index("attempts:"):out.index("history:")].splitlines()
    assert re.match(rf"  #1  RUN_FAILED  agent {runs[0]['agent'][:8]}  node nodeA \(.*\)  "
                    r"pilot p1  started \d{4}-\d\d-\d\d \d\d:\d\d:\d\d  ended .*  took \d",
                    lines[1]), lines
    assert "first-time" in lines[2] or "exit code 5" in lines[2], lines
    assert re.match(rf"  #2  JOB_FINISHED  agent {runs[1]['agent'][:8]}  node nodeB", lines[3])
    assert "\nattempts: 2\n" not in out  # the section replaces the bare count
    # --json: the same list, times in ISO 8601
    js = json.loads(run_cli(server.home, "job", "show", str(job), "--json").stdout)
    assert js["attempts"] == 2 and [r["node"] for r in js["runs"]] == ["nodeA", "nodeB"]
    assert all(re.match(r"\d{4}-\d\d-\d\dT.*\+00:00$", r[k])
               for r in js["runs"] for k in ("leased", "started", "ended"))
    # job ls: AGENT and NODE of the last attempt for a job no agent holds
    rows = json.loads(run_cli(server.home, "job", "ls", "--json").stdout)
    assert [(r["agent"], r["last_agent"], r["last_node"]) for r in rows] == [
        (None, runs[1]["agent"], "nodeB")]
    table = run_cli(server.home, "job", "ls").stdout
    header, row = table.splitlines()[:2]
    assert "AGENT" in header and "NODE" in header
    assert runs[1]["agent"][:8] in row and "nodeB" in row


def test_attempts_on_postgresql(pg_url, home, tmp_path):
    s = ServerHandle(home, pg_url).start()
    try:
        job = _run_across_two_agents(s, tmp_path)
        _check_two_attempts(s.client(), job)
        rows = s.client().jobs({"ids": [job]})
        assert rows[0]["last_node"] == "nodeB"
    finally:
        s.stop_agents()
        s.stop()


def test_lost_handed_back_and_killed_attempts(server: ServerHandle, tmp_path):
    """kill -9 of the agent: LOST with the reason; SIGTERM of the next: HANDED_BACK; a user
    kill of the third's: USER_KILLED; a job never leased shows no attempt."""
    c = server.client()
    c.add_app({"name": "sleep", "executable": "/bin/sleep", "args": ["{s}"],
               "parameters": {"s": {"type": "float"}}})
    [job, never] = c.add_jobs([{"name": "s", "application": "sleep", "parameters": {"s": 60},
                                "priority": 1},
                               {"name": "n", "application": "sleep", "parameters": {"s": 1},
                                "site": "nowhere"}])
    running = lambda: c.job(job)["state"] == "RUNNING"  # noqa: E731
    victim = server.agent("--node-name", "n1", "--cores", "0", work_root=tmp_path / "w1")
    wait_for(running, 30, what="RUNNING on n1")
    victim.kill()
    wait_for(lambda: c.job(job)["state"] == "RESTART_READY", 20, what="the lease lost")
    second = server.agent("--node-name", "n2", "--cores", "0", work_root=tmp_path / "w2")
    wait_for(lambda: running() and c.job(job)["attempts"] == 2, 30, what="RUNNING on n2")
    d = c.job(job)
    live = d["runs"][-1]
    assert live["state"] is None and live["ended"] is None and live["node"] == "n2"
    assert live["started"] is not None  # from the RUNNING update, before the attempt ends
    out = run_cli(server.home, "job", "show", str(job)).stdout
    assert re.search(r"#2  RUNNING  agent \w{8}  node n2 .* ended -  took running", out), out
    second.send_signal(signal.SIGTERM)
    assert second.wait(20) == 0
    server.agent("--node-name", "n3", "--cores", "0", work_root=tmp_path / "w3")
    wait_for(lambda: running() and c.job(job)["attempts"] == 3, 30, what="RUNNING on n3")
    assert c.kill_jobs({"ids": [job]})["changed"] == [job]
    runs = c.job(job)["runs"]
    assert [(r["attempt"], r["node"], r["state"]) for r in runs] == [
        (1, "n1", "LOST"), (2, "n2", "HANDED_BACK"), (3, "n3", "USER_KILLED")]
    assert "lost" in runs[0]["message"] and "silent" in runs[0]["message"]
    assert "stopped" in runs[1]["message"]
    assert runs[2]["message"] == "killed by user"
    assert all(r["started"] is not None and r["ended"] >= r["started"] for r in runs)
    assert c.job(never)["runs"] == []
    assert "attempts: none" in run_cli(server.home, "job", "show", str(never)).stdout
    rows = {r["id"]: r for r in c.jobs({"ids": [job, never]})}
    assert rows[job]["last_node"] == "n3" and rows[never]["last_agent"] is None
    # removed jobs take their attempts with them
    c.remove_jobs({"ids": [job]})
    import sqlite3
    con = sqlite3.connect(server.home / "pilotfish.db")
    assert con.execute("SELECT COUNT(*) FROM job_attempts WHERE job_id=?", (job,)
                       ).fetchone()[0] == 0


def test_a_server_restart_keeps_the_running_attempt(home, db_url, tmp_path):
    """kill -9 of the server while a task runs: the restarted server rebuilds the lease with
    its start time; the attempt ends once, finished, with the start the agent reported.
    (3 s heartbeats: a restart on a loaded machine stays well inside the fencing bound.)"""
    server = ServerHandle(home, db_url, heartbeat=3.0).start()
    try:
        _restart_keeps_the_attempt(server, tmp_path)
    finally:
        server.stop_agents()
        server.stop()


def _restart_keeps_the_attempt(server: ServerHandle, tmp_path) -> None:
    c = server.client()
    c.add_app({"name": "sleep", "executable": "/bin/sleep", "args": ["{s}"],
               "parameters": {"s": {"type": "float"}}})
    [job] = c.add_jobs([{"name": "s", "application": "sleep", "parameters": {"s": 3}}])
    server.agent("--node-name", "nr", work_root=tmp_path / "w")
    wait_for(lambda: c.job(job)["state"] == "RUNNING", 30, what="RUNNING")
    started = c.job(job)["runs"][0]["started"]
    server.kill9()
    server.start()
    c = server.client()
    assert wait_for(lambda: finished(c, [job]), 40) == {"JOB_FINISHED": 1}
    [run] = c.job(job)["runs"]
    assert (run["state"], run["node"], run["started"]) == ("JOB_FINISHED", "nr", started)


@pytest.mark.parametrize("n", [300])
def test_many_tiny_tasks_each_get_one_attempt_row(server: ServerHandle, tmp_path, n):
    """Batched writes: every one of many quick tasks has its attempt, started and ended -- in
    its own row (a job that ran once costs no job_attempts row: the latest attempt lives in
    the jobs row, with the writes the server makes anyway)."""
    c = server.client()
    c.add_app({"name": "true", "executable": "/bin/true"})
    ids = c.add_jobs([{"name": f"t{i}", "application": "true"} for i in range(n)])
    server.agent("--node-name", "nt", work_root=tmp_path / "w")
    assert wait_for(lambda: finished(c, ids), 60) == {"JOB_FINISHED": n}
    import sqlite3
    con = sqlite3.connect(server.home / "pilotfish.db")
    rows = con.execute("SELECT run_state, node, jobs.started IS NOT NULL, "
                       "jobs.ended >= jobs.started, "
                       "attempts FROM jobs JOIN agents ON agents.id = jobs.run_agent").fetchall()
    assert len(rows) == n and set(rows) == {("JOB_FINISHED", "nt", 1, 1, 1)}
    assert con.execute("SELECT COUNT(*) FROM job_attempts").fetchone() == (0,)
    runs = [c.job(j)["runs"] for j in ids[:3]]
    assert all(len(r) == 1 and r[0]["state"] == "JOB_FINISHED" and r[0]["node"] == "nt"
               for r in runs), runs


def test_a_multi_node_job_records_its_first_agent_and_all_its_nodes(server: ServerHandle,
                                                                     tmp_path, monkeypatch):
    """A gang: the attempt names the agent it was leased to (the first node's) and every node
    (a stand-in mpiexec that succeeds runs the job)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "mpiexec").write_text("#!/bin/sh\nexit 0\n")
    (bindir / "mpiexec").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{__import__('os').environ['PATH']}")
    c = server.client()
    c.add_app({"name": "t", "executable": "/bin/true"})
    job = c.add_job(name="multi", application="t", num_nodes=2)
    for node in ("ga", "gb"):
        server.agent("--pilot", "g1", "--launcher", "mpiexec", "--node-name", node,
                     "--cores", "0", work_root=tmp_path / node)
    assert wait_for(lambda: finished(c, [job]), 40) == {"JOB_FINISHED": 1}
    [run] = c.job(job)["runs"]
    assert run["state"] == "JOB_FINISHED" and run["pilot"] == "g1"
    assert sorted(run["hosts"]) == ["ga", "gb"] and run["node"] == run["hosts"][0]
    out = run_cli(server.home, "job", "show", str(job)).stdout
    assert re.search(rf"#1  JOB_FINISHED  agent \w{{8}}  node {','.join(run['hosts'])}  pilot g1",
                     out), out


def test_agent_and_task_text_is_shown_never_acted_on(server: ServerHandle, tmp_path):
    """A node name (from the agent's hello) and a task's stderr with terminal escapes and a
    comma: `job show` and `job ls` print them escaped; --json keeps them as they came."""
    c = server.client()
    c.add_app({"name": "esc", "executable": "/bin/sh",
               "args": ["-c", "printf 'bad\\033]0;owned\\007\\033[2J' >&2; exit 4"]})
    [job] = c.add_jobs([{"name": "e", "application": "esc", "max_retries": 0}])
    node = "n\x1b[31m,x"
    server.agent("--node-name", node, work_root=tmp_path / "w")
    assert wait_for(lambda: finished(c, [job]), 30) == {"FAILED": 1}
    [run] = c.job(job)["runs"]
    assert run["node"] == node and "\x1b]0;owned" in run["message"]
    for args in (("job", "show", str(job)), ("job", "ls")):
        out = run_cli(server.home, *args).stdout
        assert "\x1b" not in out and "\x07" not in out, args
        assert "n\\x1b[31m,x" in out, (args, out)
    assert "\\x1b]0;owned\\x07" in run_cli(server.home, "job", "show", str(job)).stdout
    js = json.loads(run_cli(server.home, "job", "show", str(job), "--json").stdout)
    assert js["runs"][0]["node"] == node
