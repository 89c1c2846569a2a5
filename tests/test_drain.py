"""Pilots leave when the server says no work is left for them (server/drain.py), not at their
idle timeout, and stay while work that fits them is queued or pending (a workflow subjob
waiting on its parent)."""
from __future__ import annotations

import json
import time
import uuid

import pytest
import zmq
from conftest import curve_socket, run_cli, slurm_job_state, wait_for

from pilotfish import protocol as P


def _exited(c, pilot: str | None = None) -> list[dict]:
    return [a for a in c.agents(all=True) if a["state"] == "EXITED"
            and (pilot is None or a["pilot"] == pilot)]


@pytest.mark.slow
def test_a_slurm_pilot_leaves_once_no_work_fits_and_stays_while_some_is_pending(slurm, server):
    """Real Slurm, a 1-node pilot: 4 short jobs, and a child job waiting for a parent only
    another site can run. The pilot runs the 4 and stays while the child may still come (its
    parent is queued); once the parent is killed (so the child fails), the agent leaves within
    a second and the batch job ends. Takes ~4 s (a Slurm scheduling pass, the pilot's start)."""
    (server.home / "sites").mkdir(exist_ok=True)
    (server.home / "sites" / "quick.yaml").write_text(
        "extends: localslurm\npilot: {idle_timeout: 60}\n")
    c = server.client()
    c.add_app({"name": "nap", "executable": "/bin/sleep", "args": ["0.2"]})
    quick = c.add_jobs([{"name": f"j{i}", "application": "nap"} for i in range(4)])
    parent = c.add_job(name="far", application="nap", site="elsewhere")
    child = c.add_job(name="child", application="nap", parents=[parent])
    r = run_cli(server.home, "pilot", "submit", "--site", "quick", "--nodes", "1",
                "--walltime", "5", "--leave-when-no-work", "always", "--json")
    assert r.returncode == 0, r.stderr
    pid, batch_id = json.loads(r.stdout)["pilot"], json.loads(r.stdout)["batch_id"]
    try:
        wait_for(lambda: c.counts({"ids": quick}).get("JOB_FINISHED") == 4, 60, 0.1,
                 "the 4 jobs to finish on the pilot")
        time.sleep(1.0)  # the child may still come: the agent stays
        alive = [a for a in c.agents() if a["pilot"] == pid]
        assert len(alive) == 1 and not _exited(c, pid), c.agents(all=True)
        c.kill_jobs({"ids": [parent]})
        wait_for(lambda: c.job(child)["state"] == "FAILED", 10, 0.05, "the child to fail")
        failed = time.time()
        gone = wait_for(lambda: _exited(c, pid), 10, 0.05, "the agent to leave")
        assert gone[0]["last_seen"] - failed < 1.0, (gone, failed)
        wait_for(lambda: slurm_job_state(batch_id) is None, 20, 0.1, "the batch job to end")
        assert c.counts({"ids": quick}) == {"JOB_FINISHED": 4}
    finally:
        run_cli(server.home, "pilot", "cancel", pid)


def test_an_agent_that_waits_for_work_leaves_after_it_has_run_some(server):
    """``after-work``: an agent started before its jobs waits for them (idle timeout aside);
    once it has run them and nothing else fits, it leaves at once; jobs it cannot run (another
    site's) do not keep it."""
    c = server.client()
    c.add_app({"name": "nap", "executable": "/bin/sleep", "args": ["0.1"]})
    c.add_job(name="other", application="nap", site="elsewhere")
    waits = server.agent("--leave-when-no-work", "after-work", "--idle-timeout", "60",
                         "--cores", "0")
    wait_for(lambda: len(c.agents()) == 1, 10, 0.05, "the agent")
    time.sleep(0.6)  # told no work fits (every 0.2 s), but it has run nothing yet
    assert waits.poll() is None
    ids = c.add_jobs([{"name": f"j{i}", "application": "nap"} for i in range(4)])
    wait_for(lambda: c.counts({"ids": ids}).get("JOB_FINISHED") == 4, 20, 0.05, "jobs done")
    done = time.time()
    waits.wait(5)
    assert time.time() - done < 1.5
    assert [a["tasks_done"] for a in _exited(c)] == [4], c.agents(all=True)


def _recv(s, kinds: tuple, timeout: float = 3.0):
    """The next message of one of ``kinds`` (bare acknowledgements skipped), or None."""
    deadline = time.monotonic() + timeout
    while s.poll(max(0, int((deadline - time.monotonic()) * 1000))):
        kind, m = P.decode(s.recv(), (P.WELCOME, P.TASKS, P.NOWORK, P.ERROR, P.CANCEL))
        if kind in kinds and not (kind == P.TASKS and not m["tasks"]):
            return kind, m
    return None


def test_nowork_on_the_wire_and_a_batch_sent_as_the_agent_left_is_not_counted(server):
    """A raw agent (the protocol itself): told ``nowork`` naming the last batch when nothing
    fits it, and only if its hello asked; a batch it never saw (its bye says so with ``ack``)
    goes back to the queue without counting an attempt."""
    c = server.client()
    c.add_app({"name": "nap", "executable": "/bin/sleep", "args": ["0.1"]})
    hello = dict(host="h", pid=1, site=None, pilot=None, cores=[0], gpus=[], memory=2**30,
                 time_left=None, running=[], ack=0)
    idle = {"cores": 0, "gpus": 0, "max_cores": 1, "max_gpus": 0, "time_left": None}
    socks = []
    for asks in (True, False):
        s = zmq.Context.instance().socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        curve_socket(s, server.address)
        s.connect(server.address)
        aid = uuid.uuid4().hex
        s.send(P.encode(P.HELLO, agent=aid, **hello, **({"leave_idle": True} if asks else {})))
        assert _recv(s, (P.WELCOME,))[0] == P.WELCOME
        s.send(P.encode(P.UPDATE, agent=aid, useq=2, updates=[], demand=idle, ack=0))
        socks.append((aid, s))
    (aid, s), (_, deaf) = socks
    kind, m = _recv(s, (P.NOWORK,))
    assert m["seq"] == 0
    assert _recv(deaf, (P.NOWORK,), 0.6) is None  # it did not ask
    deaf.close()
    [job] = c.add_jobs([{"name": "j", "application": "nap"}])
    s.send(P.encode(P.UPDATE, agent=aid, useq=3, updates=[], ack=0,
                    demand={**idle, "cores": 1}))
    kind, m = _recv(s, (P.TASKS,))
    assert [t["job"] for t in m["tasks"]] == [job] and m["seq"] == 1
    s.send(P.encode(P.BYE, agent=aid, useq=4, updates=[], released=[], ack=0))
    wait_for(lambda: c.job(job)["state"] in ("READY", "RESTART_READY"), 5, 0.05, "requeued")
    d = c.job(job)
    assert d["retries"] == 0 and d["runs"][-1]["state"] == "HANDED_BACK", d
    s.close()
