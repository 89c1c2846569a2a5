"""Federation, the rest of issue 15: a kill at the central cancels the job at its site; the
fence against double runs (a forwarded job is held at its site until the central says start);
a forward the site refuses comes back as a failure. Over the real RabbitMQ with real servers
(tests/fed_world.py).
"""
from __future__ import annotations

import json
import time

import pytest

from pilotfish.bridge.receiver import check_control, control_of

NAP_APP = {"name": "nap", "executable": "/bin/sleep", "args": ["{secs}"],
           "parameters": {"secs": {"type": "str", "default": "30"}}}
#: registered at the central only: site B's intake refuses a job of it
CENTRAL_ONLY = {"name": "central_only", "executable": "/bin/true"}
#: registered at the central and site A, not B: B refuses it, A runs it
NOT_AT_B = {"name": "not_at_b", "executable": "/bin/true"}


def test_control_messages_are_checked():
    good = {"pilotfish_control": "cancel", "argo_job_id": "fwd:central:7:1",
            "job_status_routing_key": "fed.status.B"}
    assert control_of(json.dumps(good).encode()) == good
    assert control_of(b'{"name": "j", "application": "a"}') is None  # a job message
    assert control_of(b'{"pilotfish_control": ') is None              # not JSON: poison later
    assert control_of(b"x" * 5000 + b"pilotfish_control") is None
    assert check_control(good, "central", None) is None
    assert check_control(good, "central", "central") is None
    for change, user, central, words in [
        ({}, None, None, "user_id"),
        ({}, "mallory", "central", "not the central's"),
        ({"pilotfish_control": "rm"}, "u", None, "start or cancel"),
        ({"argo_job_id": "amqp:x:0"}, "u", None, "forwarded job"),
        ({"argo_job_id": "fwd:a b"}, "u", None, "forwarded job"),
        ({"job_status_routing_key": "fed.#"}, "u", None, "routing_key"),
        ({"extra": 1}, "u", None, "unknown keys"),
    ]:
        assert words in check_control({**good, **change}, user, central), change


@pytest.fixture
def fed(tmp_path):
    from conftest import require
    from externals import rabbitmq_available
    require(rabbitmq_available(), "RabbitMQ at 127.0.0.1:5672 (guest/guest)")
    from fed_world import Federation
    f = Federation(tmp_path)
    try:
        yield f
    finally:
        f.close()


def _site_job(fed, site: str, name: str) -> dict | None:
    with fed.sites[site]["server"].client() as sc:
        mine = [j for j in sc.jobs(limit=1000) if j["name"] == name]
    if not mine:
        return None
    with fed.sites[site]["server"].client() as sc:
        return sc.job(mine[0]["id"])


def _amqp():
    import pika
    return pika.BlockingConnection(pika.ConnectionParameters(
        "127.0.0.1", 5672, credentials=pika.PlainCredentials("guest", "guest"), heartbeat=0))


@pytest.mark.slow
def test_refusal_kill_cancel_and_the_fence_against_double_runs(fed):
    """One federation for three phases (a federation costs ~9 s to start and stop; the phases
    take ~10 s together, most of it the 3 s of silence before re-routing):
    1. a forward site B's intake refuses (an app B lacks) fails the central job with B's reason,
       or, when the job names A as its alternative, goes to A and runs there;
    2. a kill (job kill, workflow kill) at the central of a job running at B kills it at B
       (cancel, confirmed), kills
       again and cancels of jobs B does not hold are harmless, a control message without a
       validated user is dead-lettered;
    3. the race: B stores a forwarded job and is killed -9 before its first status reaches
       the central (its status key is unbound meanwhile: those messages are lost, as if B
       died before publishing them); the central routes the job to A; B, restarted, never
       runs it (it was held) and kills it on the central's cancel."""
    from fed_world import until
    c = fed.central.client()
    for app in (NAP_APP, CENTRAL_ONLY, NOT_AT_B):
        c.add_app(app)
    with fed.sites["B"]["server"].client() as sc:
        sc.add_app(NAP_APP)
    with fed.sites["A"]["server"].client() as sa:
        sa.add_app(NOT_AT_B)
    fed.wait_healthy(["A", "B"])

    # 1. refused at B's intake: the central job fails with the reason, not retried
    bad = c.add_job(name="refused", application="central_only", site="B")
    # refused by B, with A as its alternative: it goes to A and runs there
    alt = c.add_job(name="alt", application="not_at_b", site=["B", "A"])
    nap = c.add_job(name="nap1", application="nap", parameters={"secs": "60"}, site="B")
    until(lambda: c.job(bad)["state"] == "FAILED", 20, "the refused job FAILED")
    j = c.job(bad)
    assert j["attempts"] == 1 and j["retries"] == 0
    why = j["events"][-1]["message"]
    assert "refused by site B" in why and "central_only" in why, why
    until(lambda: c.job(alt)["state"] == "JOB_FINISHED", 20, "alt routed to A, finished")
    a = c.job(alt)
    assert a["site"] == "A" and a["attempts"] == 2, a
    first = a["runs"][0]  # its attempt at B: handed back with B's reason
    assert first["agent"] == "site:B" and first["state"] == "HANDED_BACK", first
    assert "refused by site B" in first["message"] and "not_at_b" in first["message"]

    # 2. kill at the central of a job running at B
    until(lambda: c.job(nap)["state"] == "RUNNING", 20, "nap1 running at B")
    assert _site_job(fed, "B", "nap1")["fenced"] is None  # started by the central's start
    t0 = time.monotonic()
    assert c.kill_jobs({"ids": [nap]})["changed"] == [nap]
    until(lambda: _site_job(fed, "B", "nap1")["state"] == "USER_KILLED", 20,
          "nap1 killed at B")
    kill_s = time.monotonic() - t0
    until(lambda: c.job(nap)["remote_cancel"] is None, 20, "the cancel confirmed")
    assert c.job(nap)["state"] == "USER_KILLED"
    assert c.kill_jobs({"ids": [nap]})["changed"] == []  # again: nothing to do
    conn = _amqp()
    ch = conn.channel()
    import pika
    for mid in (f"fwd:central:{nap}:1", "fwd:central:999999:1"):  # final there; unknown
        ch.basic_publish("", fed.queues["B"], json.dumps(
            {"pilotfish_control": "cancel", "argo_job_id": mid,
             "job_status_routing_key": f"{fed.tag}.status.B"}).encode(),
            pika.BasicProperties(user_id="guest", delivery_mode=2))
    ch.basic_publish("", fed.queues["B"], json.dumps(  # no validated user: dead-lettered
        {"pilotfish_control": "start", "argo_job_id": f"fwd:central:{nap}:1",
         "job_status_routing_key": f"{fed.tag}.status.B"}).encode())
    until(lambda: ch.queue_declare(fed.queues["B"] + ".dead", passive=True)
          .method.message_count >= 2, 20, "the refused forward and the bad control dead")
    assert _site_job(fed, "B", "nap1")["state"] == "USER_KILLED"
    # `workflow kill` of a workflow whose subjob runs at B: killed at B too
    wf = c.add_workflow({"name": "wfnap", "subjobs": [
        {"name": "nap2", "application": "nap", "parameters": {"secs": "60"}, "site": "B"}]})
    sub = c.workflow(wf["id"])["subjob_list"][0]["job"]
    until(lambda: c.job(sub)["state"] == "RUNNING", 20, "nap2 running at B")
    c.kill_workflows([wf["id"]])
    until(lambda: _site_job(fed, "B", "nap2")["state"] == "USER_KILLED", 20,
          "nap2 killed at B")

    # 3. the race: stored at B, B killed -9 before its first status reached the central
    status_q, status_key = f"{fed.tag}.central.status", f"{fed.tag}.status.*"
    ch.queue_unbind(status_q, fed.exchange, status_key)
    race = c.add_job(name="race", application="stamp", parameters={"msg": "race"},
                     site=["B", "A"])
    until(lambda: _site_job(fed, "B", "race") is not None, 20, "race stored at B")
    held = _site_job(fed, "B", "race")
    assert held["state"] == "READY" and held["fenced"] is not None  # held, not queued
    b = fed.sites["B"]["server"]
    b.kill9()
    ch.queue_bind(status_q, fed.exchange, status_key)
    assert c.job(race)["remote_accepted"] is None  # the central never heard B had it
    until(lambda: c.job(race)["state"] == "JOB_FINISHED", 30, "race routed to A, finished")
    r = c.job(race)
    assert r["site"] == "A" and r["attempts"] == 2
    assert r["remote_cancel"] == [["B", 1]]  # B is down: its cancel waits
    b.start()
    until(lambda: c.job(race)["remote_cancel"] is None, 30, "B confirmed the cancel")
    at_b = _site_job(fed, "B", "race")
    ran = [e["to_state"] for e in at_b["events"]]
    assert at_b["state"] == "USER_KILLED" and "STAGED_IN" not in ran, ran  # never started
    assert at_b["attempts"] == 0
    at_a = _site_job(fed, "A", "race")
    assert at_a["state"] == "JOB_FINISHED" and at_a["attempts"] == 1
    conn.close()
    c.close()
    print(f"kill at the central -> killed at site B: {kill_s:.2f} s")


# -- the central's and the site's sides alone, on real servers (no broker) -------------------
STAMP = {"name": "stamp", "executable": "/bin/true"}


def test_central_starts_accepted_cancels_killed_across_a_restart(server):
    """The central's fence bookkeeping through the forwarder's ops: a start is handed out
    once the site says it has the job (and again until confirmed, only while the site beats);
    a kill hands out a cancel, kept across a server restart until the site confirms; the
    status of a cancelled attempt is ignored, not refused; a refusal fails the job, once.
    (~3 s: a server restart.)"""
    c = server.client()
    c.add_app(STAMP)
    take = lambda: c.call("forward_take", sites=["B"], silent_after=60,  # noqa: E731
                          resend_after=0.2)
    j1 = c.add_job(name="j1", application="stamp", site="B")
    j2 = c.add_job(name="j2", application="stamp", site="B")
    j3 = c.add_job(name="j3", application="stamp", site="B")
    c.call("site_beat", site="B", backlog=0, capacity=4)
    r = take()
    assert {f["job"] for f in r["forwards"]} == {j1, j2, j3} and r["controls"] == []
    # j1: B has it -> a start; the start again until B's bridge confirms it
    c.call("forward_report", site="B", updates=[{"job": j1, "attempt": 1, "to": "READY"}])
    assert take()["controls"] == [{"action": "start", "job": j1, "attempt": 1, "site": "B"}]
    time.sleep(0.25)
    assert [x["action"] for x in take()["controls"]] == ["start"]
    c.call("forward_report", site="B", updates=[
        {"job": j1, "attempt": 1, "control": "start", "result": "started"}])
    time.sleep(0.25)
    assert take()["controls"] == []
    # j3: B's intake refused it: FAILED here with B's reason, not retried; a second refusal
    # (a redelivered one) changes nothing
    bad = {"job": j3, "attempt": 1, "to": "FAILED", "refused": True,
           "msg": "refused at site B's intake: no app named 'stamp'"}
    assert c.call("forward_report", site="B", updates=[bad])["applied"] == 1
    d = c.job(j3)
    assert d["state"] == "FAILED" and "no app named" in d["events"][-1]["message"]
    assert c.call("forward_report", site="B", updates=[bad])["refused"]  # no longer B's
    # kill j1 and j2 here: cancels for B
    assert set(c.kill_jobs({"ids": [j1, j2]})["changed"]) == {j1, j2}
    got = take()["controls"]
    assert sorted((x["action"], x["job"]) for x in got) == [("cancel", j1), ("cancel", j2)]
    assert c.job(j1)["remote_cancel"] == [["B", 1]]
    # B's late status of a killed attempt: ignored (its cancel is on the way), not refused
    r = c.call("forward_report", site="B", updates=[{"job": j2, "attempt": 1, "to": "READY"}])
    assert r == {"applied": 1, "refused": []}
    # the server restarts: the unconfirmed cancels are handed out again
    c.close()
    server.stop()
    server.start()
    c = server.client()
    c.call("site_beat", site="B", backlog=0, capacity=4)
    got = take()["controls"]
    assert sorted((x["action"], x["job"]) for x in got) == [("cancel", j1), ("cancel", j2)]
    c.call("forward_report", site="B", updates=[
        {"job": j1, "attempt": 1, "control": "cancel", "result": "killed"},
        {"job": j2, "attempt": 1, "control": "cancel", "result": "unknown"}])
    assert c.job(j1)["remote_cancel"] is None and c.job(j2)["remote_cancel"] is None
    time.sleep(0.25)
    assert take()["controls"] == []
    with pytest.raises(Exception, match="control must be"):
        c.call("forward_report", site="B", updates=[{"job": j1, "attempt": 1,
                                                     "control": "rm"}])
    c.close()


def test_site_holds_a_forwarded_job_until_started(server):
    """At a site: a job added ``held`` is READY but not dispatched (also after a restart)
    until ``forward_control`` starts it; a cancel kills it; both idempotent; an unknown key
    is no error; bad input refused in one line."""
    from conftest import wait_for
    c = server.client()
    c.add_app(STAMP)
    ids = c.add_jobs([{"name": f"h{i}", "application": "stamp", "held": True,
                       "intake_key": f"fwd:central:{i}:1"} for i in range(2)])
    server.agent(cores="0")
    wait_for(lambda: c.agents(), 10, 0.05, "the agent")
    time.sleep(0.3)  # (it asked for work: none of these)
    assert [c.job(j)["state"] for j in ids] == ["READY", "READY"]
    c.close()
    server.stop_agents()
    server.stop()
    server.start()
    c = server.client()
    server.agent(cores="0")
    wait_for(lambda: c.agents(), 10, 0.05, "the agent")
    time.sleep(0.3)
    assert c.job(ids[0])["state"] == "READY" and c.job(ids[0])["fenced"] is not None
    r = c.call("forward_control", action="start", intake_key="fwd:central:0:1")
    assert r["result"] == "started" and r["job"] == ids[0]
    wait_for(lambda: c.job(ids[0])["state"] == "JOB_FINISHED", 20, 0.1, "h0 ran")
    assert c.call("forward_control", action="start",
                  intake_key="fwd:central:0:1")["result"] == "not held"
    assert c.call("forward_control", action="cancel",
                  intake_key="fwd:central:0:1")["result"] == "final"
    assert c.call("forward_control", action="cancel",
                  intake_key="fwd:central:1:1")["result"] == "killed"
    assert c.job(ids[1])["state"] == "USER_KILLED" and c.job(ids[1])["fenced"] is None
    assert c.call("forward_control", action="cancel",
                  intake_key="fwd:central:9:1")["result"] == "unknown"
    for args, words in (({"action": "rm", "intake_key": "k"}, "one of start, cancel"),
                        ({"action": "start", "intake_key": "a b"}, "intake_key"),
                        ({"action": "start"}, "intake_key")):
        with pytest.raises(Exception, match=words):
            c.call("forward_control", **args)
    with pytest.raises(Exception, match="held must be true or false"):
        c.add_job(name="x", application="stamp", held="yes")
    c.close()
