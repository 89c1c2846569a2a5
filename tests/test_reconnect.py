"""The user's day across server restarts and stops: real server and agent processes, judged by
their log files. One hello per reconnect (one line each side), no false 'lease gone' warnings
for jobs the server recorded before it went down; an agent leaves soon after its server is
stopped on purpose, rides out a crash, and stays through a stop + start within its grace."""
from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ServerHandle, pilotfish_cmd, wait_for
from pilotfish import settings

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_partition import add_task_app, attempts_of, two_cores  # noqa: E402

#: The stop grace these tests' servers tell their agents ($PILOTFISH_AGENT_STOP_GRACE; the
#: default, 10 s, made these the suite's slowest tests): at least 3 heartbeats.
GRACE = 3.0


@pytest.fixture(autouse=True)
def short_grace(monkeypatch):
    monkeypatch.setenv(settings.AGENT_STOP_GRACE_ENV, f"{GRACE:g}")  # the servers inherit it


def test_the_stop_grace_setting_is_checked():
    assert settings.agent_stop_grace({}) == settings.AGENT_STOP_GRACE
    assert settings.agent_stop_grace({settings.AGENT_STOP_GRACE_ENV: "2.5"}) == 2.5
    for bad in ("0", "-3", "nan", "inf", "1e9", "10s", "--x"):
        with pytest.raises(ValueError, match="give seconds"):
            settings.agent_stop_grace({settings.AGENT_STOP_GRACE_ENV: bad})

N_JOBS = 400


def count(path, pattern: str) -> int:
    return len(re.findall(pattern, path.read_text(errors="replace"))) if path.exists() else 0


def counts(alog, slog) -> dict:
    return {"agent_say_hello": count(alog, r"(INFO|WARNING|ERROR) pilotfish.agent: server says"),
            "agent_welcomed": count(alog, r"welcomed agent"),
            "agent_lease_gone": count(alog, r"lease gone"),
            "server_hello_again": count(slog, r"said hello again")}


def finished(c) -> int:
    return c.status()["counts"].get("JOB_FINISHED", 0)


#: The grace of tests whose agents must stay through a restart: it costs them nothing (a
#: welcome ends it), and 3 s left a loaded machine too little time to start the server again.
LONG_GRACE = 10.0


@pytest.mark.parametrize("how", ["kill9", "stop"])
def test_restart_under_short_jobs_says_hello_once(tmp_path, home, db_url, how, monkeypatch):
    monkeypatch.setenv(settings.AGENT_STOP_GRACE_ENV, f"{LONG_GRACE:g}")
    server = ServerHandle(home, db_url, heartbeat=1.0).start()
    c = server.client()
    c.add_app({"name": "t", "executable": "/bin/true", "args": []})
    alog = tmp_path / "agent.log"
    slog = settings.log_path(home)
    agent = server.agent(log=alog, work_root=tmp_path / "work")
    try:
        wait_for(lambda: len(c.agents()) == 1, 30, what="the agent")
        c.add_jobs([{"name": f"j{i}", "application": "t"} for i in range(N_JOBS)])
        wait_for(lambda: finished(c) >= N_JOBS // 4, 60, what="some jobs done")
        before = counts(alog, slog)
        if how == "kill9":
            server.kill9()
        else:
            server.stop()
        time.sleep(1.5)   # the agent keeps running and reporting into the void
        server.start()
        c = server.client()
        wait_for(lambda: finished(c) == N_JOBS, 120, what="all jobs done")
        time.sleep(1.0)
        after = counts(alog, slog)
        assert agent.poll() is None, "the agent left"
        assert c.status()["counts"].get("JOB_FINISHED") == N_JOBS
    finally:
        server.stop_agents()
        server.stop()
    diff = {k: after[k] - before[k] for k in after}
    print(how, "log lines after the restart:", diff)
    assert diff["agent_welcomed"] == 1, diff
    assert diff["server_hello_again"] == 1, diff
    assert diff["agent_say_hello"] == 0, diff
    assert diff["agent_lease_gone"] == 0, diff


def test_server_stop_agent_leaves_within_the_grace(tmp_path, home, db_url):
    """`server stop`: the server tells its agents; an idle agent and one with a running task
    leave within the grace (the task stopped, nothing left running); the tour's case."""
    server = ServerHandle(home, db_url, heartbeat=1.0).start()
    c = server.client()
    tlog = tmp_path / "tasks.log"
    add_task_app(c, tlog)
    idle = server.agent(log=tmp_path / "idle.log", work_root=tmp_path / "w1")
    busy = server.agent(log=tmp_path / "busy.log", work_root=tmp_path / "w2")
    try:
        wait_for(lambda: len(c.agents()) == 2, 30, what="the agents")
        job = c.add_job(name="long", application="long", parameters={"d": 60.0})
        wait_for(lambda: attempts_of(tlog, job).get(1, {}).get("start"), 30, what="started")
        t0 = time.time()
        server.stop()
        rcs = [p.wait(GRACE + 10) for p in (idle, busy)]
        took = time.time() - t0
    finally:
        server.stop_agents()
        server.stop()
    print("agents left %.1f s after `server stop` (grace %.0f s)" % (took, GRACE))
    assert rcs == [0, 0] and GRACE - 1 <= took <= GRACE + 8
    assert "leaving" in (tmp_path / "idle.log").read_text()
    att = attempts_of(tlog, job)[1]
    assert "end" in att and att["how"] == "term", att   # the task is not left running
    assert "told 2 agents we are stopping" in settings.log_path(home).read_text()


def test_server_kill9_agent_stays_and_is_readopted(tmp_path, home, db_url):
    """A crash tells nothing: the agent outlives the grace and a restarted server welcomes it."""
    server = ServerHandle(home, db_url, heartbeat=1.0).start()
    c = server.client()
    alog = tmp_path / "agent.log"
    agent = server.agent(log=alog, work_root=tmp_path / "w")
    try:
        wait_for(lambda: len(c.agents()) == 1, 30, what="the agent")
        server.kill9()
        time.sleep(GRACE + 2)
        alive = agent.poll() is None
        server.start()
        c = server.client()
        c.add_app({"name": "t", "executable": "/bin/true", "args": []})
        job = c.add_job(name="after", application="t")
        wait_for(lambda: c.job(job)["state"] == "JOB_FINISHED", 30, what="a job after the crash")
    finally:
        server.stop_agents()
        server.stop()
    assert alive
    assert "the server restarted (epoch 1 -> 2)" in alog.read_text()
    assert "stopping on purpose" not in alog.read_text()


def test_server_stop_then_start_within_the_grace_keeps_the_agent_and_its_task(tmp_path, home,
                                                                             db_url, monkeypatch):
    """`server stop; server start`: the agent stays, its running task is re-adopted (attempt 1,
    run once to its end), and it leaves no sooner than asked afterwards."""
    grace = 3 * 2.0  # (the test waits this long anyway: three 2 s heartbeats)
    monkeypatch.setenv(settings.AGENT_STOP_GRACE_ENV, f"{grace:g}")
    server = ServerHandle(home, db_url, heartbeat=2.0).start()
    c = server.client()
    tlog = tmp_path / "tasks.log"
    add_task_app(c, tlog)
    alog = tmp_path / "agent.log"
    agent = server.agent(log=alog, cores=two_cores()[0], work_root=tmp_path / "w")
    try:
        wait_for(lambda: len(c.agents()) == 1, 30, what="the agent")
        job = c.add_job(name="long", application="long", parameters={"d": 6.0})
        wait_for(lambda: attempts_of(tlog, job).get(1, {}).get("start"), 30, what="started")
        t0 = time.time()
        server.stop()
        server.start()
        print("stop + start took %.2f s" % (time.time() - t0))
        c = server.client()
        wait_for(lambda: c.job(job)["state"] == "JOB_FINISHED", 60, what="the job finished")
        time.sleep(max(0.0, t0 + grace + 2 - time.time()))
        alive = agent.poll() is None
        d = c.job(job)
    finally:
        server.stop_agents()
        server.stop()
    text = alog.read_text()
    assert alive, text[-2000:]
    assert "a server is back after it said it was stopping: staying" in text
    atts = attempts_of(tlog, job)
    assert set(atts) == {1} and atts[1]["how"] == "end", atts
    assert d["attempts"] == 1 and d["retries"] == 0


def test_replayed_final_update_is_acknowledged_and_stale_ones_stay_refused(tmp_path, home,
                                                                          db_url):
    """An agent whose acknowledgement was lost (the server was killed after it committed the
    job's end) sends the same final update to the restarted server: answered as applied, not
    refused. Updates that do not match what is stored (another attempt, another end time,
    another end) are still refused, and nothing of them is stored."""
    import zmq
    from conftest import curve_socket
    from pilotfish import protocol as P
    server = ServerHandle(home, db_url, heartbeat=1.0).start()
    c = server.client()
    c.add_app({"name": "t", "executable": "/bin/true", "args": []})
    aid = "b" * 32
    hello = dict(agent=aid, host="h", pid=1, cores=[0], gpus=[], memory=1, ack=0)
    demand = {"cores": 1, "gpus": 0, "max_cores": 1, "max_gpus": 0, "time_left": None}
    ctx = zmq.Context.instance()

    def connect():
        s = curve_socket(ctx.socket(zmq.DEALER), server.address)
        s.setsockopt(zmq.ROUTING_ID, aid.encode())
        s.setsockopt(zmq.LINGER, 0)
        s.connect(server.address)
        return s

    def ask(s, kind, want, **fields):
        s.send(P.encode(kind, **fields))
        while True:
            assert s.poll(10_000), f"no {want}"
            k, m = P.decode(s.recv())
            if k == want:
                return m

    def update(s, useq, epoch, *items):
        return ask(s, P.UPDATE, P.TASKS, agent=aid, useq=useq, updates=list(items),
                   demand=dict(demand, cores=0), ack=0, epoch=epoch)

    def done(job, attempt, end, last="JOB_FINISHED", code=0):
        path = (["STAGED_IN", "PREPROCESSED", "RUNNING", "EXECUTION_FINISHED", "POSTPROCESSED",
                 "STAGED_OUT", last] if last == "JOB_FINISHED"
                else ["STAGED_IN", "PREPROCESSED", last])
        return {"job": job, "attempt": attempt, "states": path, "exit": code,
                "start": end - 0.5, "end": end, "msg": None}

    s = connect()
    try:
        w = ask(s, P.HELLO, P.WELCOME, **hello, running=[], useq=1)
        job = c.add_job(name="j", application="t")
        t = ask(s, P.UPDATE, P.TASKS, agent=aid, useq=2, updates=[], demand=demand, ack=0,
                epoch=w["epoch"])
        while not t["tasks"]:
            t = update(s, 3, w["epoch"])
        assert t["tasks"][0]["job"] == job and t["tasks"][0]["attempt"] == 1
        end = time.time()
        final = done(job, 1, end)
        assert update(s, 4, w["epoch"], final)["refused"] == []
        assert c.job(job)["state"] == "JOB_FINISHED"
        # the ack is lost: kill -9, restart, the agent says hello and sends it again
        s.close()
        server.kill9()
        server.start()
        c = server.client()
        s = connect()
        w = ask(s, P.HELLO, P.WELCOME, **hello, running=[{"job": job, "attempt": 1}], useq=5)
        before = c.job(job)
        assert update(s, 6, w["epoch"], final)["refused"] == []
        # resent as two batches in one: its progress report, then its end
        progress = dict(final, states=final["states"][:3], end=None)
        assert update(s, 7, w["epoch"], progress, final)["refused"] == []
        # genuinely stale: another attempt, another end time, another end -- all refused
        for stale in (done(job, 2, end), done(job, 1, end + 1.0),
                      done(job, 1, end, "RUN_FAILED", 1), dict(final, end=None)):
            assert update(s, 7, w["epoch"], stale)["refused"] == [
                {"job": job, "attempt": stale["attempt"]}], stale
        after = c.job(job)
    finally:
        s.close()
        server.stop()
    assert after["state"] == "JOB_FINISHED" and after["events"] == before["events"]
    assert after["attempts"] == 1
