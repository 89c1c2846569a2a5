"""Federation (issue 15 parts 3-4): sites served by other pilotfish servers over RabbitMQ, and
health-aware routing among a job's alternative sites.

The routing choice and the forwarded message are pure functions, checked against golden
values. The federation test runs a central server and two site servers (each its own home,
database, agent and AMQP bridge) over the real RabbitMQ (see fed_world.py).
"""
from __future__ import annotations

import json
import subprocess
import time

import pytest

from pilotfish.bridge.federate import (FederateConfig, Site, check_config, control_body,
                                       forward_body, parse_argo_id, to_url)
from pilotfish.bridge.site_beat import beat_message
from pilotfish.errors import ValidationError
from pilotfish.server.remote_sites import mirror_path
from pilotfish.server.routing import Health, choose
from pilotfish.server.states import State as S


# -- pure parts ------------------------------------------------------------------------------
def test_routing_golden():
    now = 1000.0
    h = {"mira": Health(995.0, 40, 10), "edison": Health(999.0, 10, 10),
         "theta": Health(900.0, 0, 10),       # silent: last beat 100 s ago
         "cori": Health(999.0, 0, 0),         # no capacity
         "summit": Health(None, 0, 100)}      # never heard
    cases = [
        (["mira", "edison"], "edison"),       # 4.0 vs 1.0 jobs ahead per slot
        (["edison", "mira"], "edison"),
        (["mira"], "mira"),
        (["theta", "mira"], "mira"),          # theta is silent
        (["theta"], None),                    # nothing healthy: wait
        (["cori", "summit"], None),
        (["nowhere", "mira"], "mira"),        # an unknown site is never healthy
        ([], None),
    ]
    for choices, want in cases:
        assert choose(choices, h, now, 30.0) == want, choices
    # a tie goes to the earlier alternative (the user's preference)
    tie = {"a": Health(999.0, 5, 10), "b": Health(999.0, 10, 20)}
    assert choose(["b", "a"], tie, now, 30.0) == "b"
    assert choose(["a", "b"], tie, now, 30.0) == "a"
    assert choose(["mira", "edison"], h, now, 0.5) is None  # both older than 0.5 s


def test_mirror_path_golden():
    assert mirror_path(S.READY, S.RUNNING) == [S.STAGED_IN, S.PREPROCESSED, S.RUNNING]
    assert mirror_path(S.RUNNING, S.JOB_FINISHED) == [S.EXECUTION_FINISHED, S.POSTPROCESSED,
                                                      S.STAGED_OUT, S.JOB_FINISHED]
    assert mirror_path(S.RUNNING, S.STAGED_IN) is None        # older news: nothing
    assert mirror_path(S.RUNNING, S.RUNNING) is None          # a repeat
    assert mirror_path(S.READY, S.RUN_FAILED) == [S.STAGED_IN, S.PREPROCESSED, S.RUN_FAILED]
    assert mirror_path(S.RUNNING, S.RUN_TIMEOUT) == [S.RUN_TIMEOUT]
    assert mirror_path(S.READY, S.FAILED) == [S.STAGE_IN_FAILED]
    assert mirror_path(S.EXECUTION_FINISHED, S.USER_KILLED) == [S.POSTPROCESS_FAILED]
    assert mirror_path(S.FAILED, S.RUNNING) is None


def test_forward_message_golden():
    cfg = FederateConfig(name="central", exchange="x", status_queue="q",
                         status_routing_key="fed.status", site_beat_routing_key="fed.beat",
                         sites={"mira": Site("mira", "mira.jobs", "mira-user")},
                         data_url="sftp://central.example.org")
    f = {"job": 17, "attempt": 2, "site": "mira",
         "message": {"name": "sim", "application": "sim", "parameters": {"n": 1},
                     "num_nodes": 1, "processes_per_node": 1, "cpus_per_process": 1,
                     "gpus_per_process": 0, "input_url": "/data/in.tgz",
                     "output_url": "file:///data/out", "max_retries": 0}}
    assert forward_body(cfg, f) == {
        "name": "sim", "application": "sim", "parameters": {"n": 1}, "num_nodes": 1,
        "processes_per_node": 1, "cpus_per_process": 1, "gpus_per_process": 0,
        "input_url": "sftp://central.example.org/data/in.tgz",
        "output_url": "sftp://central.example.org/data/out/sim.17", "max_retries": 0,
        "argo_job_id": "fwd:central:17:2", "intake_key": "fwd:central:17:2", "held": True,
        "job_status_routing_key": "fed.status.mira"}
    assert control_body(cfg, {"action": "cancel", "job": 17, "attempt": 2, "site": "mira"}) \
        == {"pilotfish_control": "cancel", "argo_job_id": "fwd:central:17:2",
            "job_status_routing_key": "fed.status.mira"}
    assert parse_argo_id("central", "fwd:central:17:2") == (17, 2)
    for bad in ("fwd:other:17:2", "fwd:central:x:2", "fwd:central:0:1", 4711, None,
                "fwd:central:17:2:3", f"fwd:central:{2**63}:1"):
        assert parse_argo_id("central", bad) is None, bad
    assert to_url(None, "/data/x") == "/data/x"
    assert to_url("sftp://h", "https://elsewhere/x") == "https://elsewhere/x"
    assert beat_message("mira", {"queued": 7, "cores_alive": 64}, 5.0) == {
        "kind": "heartbeat", "site": "mira", "backlog": 7, "capacity": 64, "time": 5.0}


def test_federate_config_refusals(tmp_path):
    good = {"name": "central", "exchange": "x", "status_queue": "q",
            "status_routing_key": "fed.status", "site_beat_routing_key": "fed.beat",
            "sites": {"A": {"jobs_queue": "a.jobs", "user": "a"}}}
    check_config(good, tmp_path)
    for change, words in [
        ({"sites": {}}, "sites"),
        ({"sites": {"A": {"jobs_queue": "a.jobs"}}}, "give jobs_queue and user"),
        ({"sites": {"A": {"jobs_queue": "a.jobs", "user": "u"},
                    "B": {"jobs_queue": "b.jobs", "user": "u"}}}, "another site's too"),
        ({"sites": {"-oProxy": {"jobs_queue": "a", "user": "a"}}}, "not a valid name"),
        ({"exchange": "x y"}, "exchange"),
        ({"status_routing_key": "fed.#"}, "status_routing_key"),
        ({"silent_after": 0}, "silent_after"),
        ({"url": "amqp://u:secret@h/"}, "carries a password"),
        ({"data_url": "file:///x"}, "data_url"),
        ({"password": "x"}, "unknown key"),
    ]:
        with pytest.raises(ValidationError, match=words):
            check_config({**good, **change}, tmp_path)


# -- the federation over the real RabbitMQ ---------------------------------------------------
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


def workflow(f, i: int, sites=("A", "B")) -> dict:
    (f.data / f"in{i}").mkdir(parents=True, exist_ok=True)
    (f.data / f"in{i}" / "input.dat").write_text(f"input {i}\n")
    return {"name": f"argo-{i}", "user_id": 7, "group_identifier": "atlas",
            "job_status_routing_key": f.argo_key,
            "input_url": str(f.data / f"in{i}"), "output_url": str(f.data / f"out{i}"),
            "subjobs": [{"name": f"step{k}", "application": "stamp",
                         "parameters": {"msg": f"w{i}s{k}"}, "site": s}
                        for k, s in enumerate(sites)]}


@pytest.fixture
def fed_slurm(tmp_path, slurm):
    """The federation with site B's agents a pilot of the local Slurm (4 fake nodes)."""
    from conftest import require
    from externals import rabbitmq_available
    require(rabbitmq_available(), "RabbitMQ at 127.0.0.1:5672 (guest/guest)")
    from fed_world import Federation
    f = Federation(tmp_path, slurm_b=True)
    try:
        yield f
    finally:
        f.close()


@pytest.mark.slow
def test_federation_two_sites_kill_and_reroute(fed_slurm):
    """The paper's Figure 1: site B is the local Slurm (a 4-node pilot), site A local agents.
    ~15 s with Slurm idle (the pilot's start, B's kill -9 and restart, 3 s of silence)."""
    from fed_world import until
    fed = fed_slurm
    from conftest import wait_for
    with fed.sites["B"]["server"].client() as sc:
        wait_for(lambda: len(sc.agents()) >= fed.slurm_nodes, 120, 0.2,
                 "the Slurm pilot's agents at site B")
        assert all(a["pilot"] == f"slurm-{fed.sites['B']['slurm_job']}"
                   for a in sc.agents())
    fed.wait_healthy(["A", "B"])
    c = fed.central.client()
    wf_ids = [c.add_workflow(workflow(fed, i))["id"] for i in range(4)]

    # site B's server killed -9 and restarted once a subjob is at B
    until(lambda: fed.remote()["B"]["forwarded"] > 0, 60, "a subjob forwarded to B")
    b = fed.sites["B"]["server"]
    b.kill9()
    b.start()
    until(lambda: all(c.workflow(w)["state"] == "HISTORY" for w in wf_ids), 90,
          "the workflows in HISTORY")
    for w in wf_ids:
        d = c.workflow(w)
        states = [e["to"] for e in d["events"]]
        assert states[0] == "CREATED" and states[-1] == "HISTORY", states
        assert states.count("SUBJOB_INCREMENTED") == 1
        for a, e in zip(d["events"], d["events"][1:]):
            assert e["from"] == a["to"]
        assert [s["site"] for s in d["subjob_list"]] == ["A", "B"]
        for s in d["subjob_list"]:
            job = c.job(s["job"])
            assert job["attempts"] == 1, job  # forwarded once, run once
            # the mirrored states are event rows, chained, ending at JOB_FINISHED, each
            # saying where it happened
            ev = job["events"]
            assert ev[-1]["to_state"] == "JOB_FINISHED"
            for x, y in zip(ev, ev[1:]):
                assert y["from_state"] == x["to_state"]
            assert any("at site" in (x["message"] or "") for x in ev), ev
        out = list((fed.data / f"out{wf_ids.index(w)}").rglob(f"w{wf_ids.index(w)}s1.out"))
        assert out, "the last subjob's output in output_url"
        # the second subjob (at B) was handed the first one's workdir (from A), with the input
        listing = list((fed.data / f"out{wf_ids.index(w)}").rglob("listing-*s1.txt"))
        assert listing and "input.dat" in listing[0].read_text()
    # the central's workflow status messages on their routing key, in order per workflow
    got: list[dict] = []

    def all_history() -> bool:
        got.extend(m for m in fed.drain_watch() if m.get("kind") == "workflow")
        return sum(m["to"] == "HISTORY" for m in got) == len(wf_ids)
    until(all_history, 30, "every workflow's HISTORY on the routing key")
    for w in wf_ids:
        mine = [m for m in got if m["workflow_id"] == w]
        assert [m["to"] for m in mine] == [e["to"] for e in c.workflow(w)["events"]]
        for a, b in zip(mine, mine[1:]):
            assert b["from"] == a["to"] and b["event_id"] > a["event_id"]
    # each site ran each of its subjobs once: one job per forwarded message
    for name in ("A", "B"):
        with fed.sites[name]["server"].client() as sc:
            jobs = sc.jobs(limit=1000)
            assert len(jobs) == 4, (name, [j["name"] for j in jobs])
            assert all(j["state"] == "JOB_FINISHED" for j in jobs)

    # a duplicate forward (the same message id) adds nothing at the site
    import pika
    conn = pika.BlockingConnection(pika.ConnectionParameters(
        "127.0.0.1", 5672, credentials=pika.PlainCredentials("guest", "guest"), heartbeat=0))
    ch = conn.channel()
    sub0 = c.workflow(wf_ids[0])["subjob_list"][0]["job"]
    dup = {"name": "step0", "application": "stamp", "parameters": {"msg": "dup"},
           "argo_job_id": f"fwd:central:{sub0}:1", "intake_key": f"fwd:central:{sub0}:1",
           "job_status_routing_key": f"{fed.tag}.status.A"}
    ch.basic_publish("", fed.queues["A"], json.dumps(dup).encode(),
                     pika.BasicProperties(message_id=f"fwd:central:{sub0}:1", delivery_mode=2))
    # forged status: site A's user (guest) reporting B's job; and a sender of no site
    sub1 = c.workflow(wf_ids[0])["subjob_list"][1]["job"]
    forged = {"kind": "job", "argo_job_id": f"fwd:central:{sub1}:1", "to": "RUN_FAILED",
              "from": "RUNNING", "time": None}
    ch.basic_publish(fed.exchange, f"{fed.tag}.status.B", json.dumps(forged).encode(),
                     pika.BasicProperties(user_id="guest"))
    ch.basic_publish(fed.exchange, f"{fed.tag}.status.B", json.dumps(forged).encode())
    until(lambda: "no site's user" in fed.fed_log()
          and f"job {sub1} attempt 1 is not forwarded to site A" in fed.fed_log(), 30,
          "both forged status messages refused and logged")
    assert c.job(sub1)["state"] == "JOB_FINISHED"
    until(lambda: ch.queue_declare(fed.queues["A"], passive=True).method.message_count == 0,
          30, "the duplicate consumed")
    with fed.sites["A"]["server"].client() as sc:
        assert len(sc.jobs(limit=1000)) == 4  # the duplicate added nothing
    conn.close()

    # site B down (its bridge: no heartbeats, no intake): jobs naming [B, A] go to A
    fed.kill9(fed.sites["B"]["bridge"])
    until(lambda: not fed.remote()["B"]["healthy"], 30, "site B silent")
    ids = [c.add_job(name=f"alt{i}", application="stamp", parameters={"msg": f"alt{i}"},
                     site=["B", "A"]) for i in range(3)]
    # and a workflow that can only run at B waits, saying where and since when
    waiting = c.add_workflow(workflow(fed, 9, sites=("B",)))["id"]
    until(lambda: all(c.job(j)["state"] == "JOB_FINISHED" for j in ids), 60,
          "the [B, A] jobs finished at A")
    assert {c.job(j)["site"] for j in ids} == {"A"}
    show = subprocess.run(["pilotfish" if False else __import__("sys").executable, "-m",
                           "pilotfish", "--home", str(fed.central_home), "--server",
                           fed.central.address, "workflow", "show", str(waiting)],
                          capture_output=True, text=True, timeout=60)
    assert "waits for remote site B since" in show.stdout, show.stdout + show.stderr
    assert "not forwarded: no healthy site" in show.stdout
    ls = subprocess.run([__import__("sys").executable, "-m", "pilotfish", "--home",
                         str(fed.central_home), "--server", fed.central.address, "site", "ls",
                         "--remote"], capture_output=True, text=True, timeout=60)
    assert "SILENT" in ls.stdout and "healthy" in ls.stdout, ls.stdout + ls.stderr
    c.close()


# -- the server's side alone: the ops the forwarder calls, on a real server ------------------
STAMP = {"name": "stamp", "executable": "/bin/true"}


def test_forward_ops_route_resend_refuse_and_reroute(server):
    """forward_take routes by health and hands an unacknowledged job out again under the same
    attempt; a report from the wrong site is refused; a silent site's unaccepted job goes to
    the other site (a new attempt), its accepted one stays; mirrored states are event rows."""
    from conftest import wait_for
    c = server.client()
    c.add_app(STAMP)
    take = lambda **kw: c.call("forward_take", sites=["A", "B"], silent_after=1.5,  # noqa
                               resend_after=kw.pop("resend", 60), **kw)["forwards"]
    assert take() == []  # no site heard yet: nothing routed
    j1 = c.add_job(name="j1", application="stamp", site=["B", "A"])
    j2 = c.add_job(name="j2", application="stamp", site="B")
    assert take() == []  # j1, j2 wait: no healthy site
    c.call("site_beat", site="A", backlog=30, capacity=10)
    c.call("site_beat", site="B", backlog=5, capacity=10)
    got = {f["job"]: f for f in take()}
    assert {j: (f["site"], f["attempt"]) for j, f in got.items()} == {j1: ("B", 1),
                                                                     j2: ("B", 1)}
    assert got[j1]["message"]["max_retries"] == 0 and got[j1]["message"]["application"] \
        == "stamp"
    time.sleep(0.01)  # a request's turn can follow the last one's within 1 ms on loopback
    again = {f["job"]: (f["site"], f["attempt"]) for f in take(resend=0.001)}
    assert again == {j1: ("B", 1), j2: ("B", 1)}  # unacknowledged: the same message again
    # the wrong site, a wrong attempt, an unknown site: refused
    r = c.call("forward_report", site="A", updates=[{"job": j1, "attempt": 1, "to": "READY"}])
    assert r["applied"] == 0 and "not forwarded to site A" in r["refused"][0]["why"]
    r = c.call("forward_report", site="B", updates=[{"job": j1, "attempt": 7, "to": "READY"}])
    assert r["refused"]
    r = c.call("forward_report", site="B", updates=[
        {"job": j1, "attempt": 1, "to": bad} for bad in (["READY"], {"a": 1}, "NOPE", None)])
    assert r["applied"] == 0 and len(r["refused"]) == 4  # no state: refused, nothing else
    with pytest.raises(Exception, match="no remote site"):
        c.call("forward_report", site="C", updates=[])
    # B has j2 (accepted) and starts it; then B goes silent: j1 (never acknowledged) goes to
    # A as attempt 2, j2 stays with B
    r = c.call("forward_report", site="B", updates=[
        {"job": j2, "attempt": 1, "to": "READY"}, {"job": j2, "attempt": 1, "to": "RUNNING",
                                                   "msg": "<b>x</b>"}])
    assert r == {"applied": 2, "refused": []}
    assert c.job(j2)["state"] == "RUNNING"
    moved: dict = {}

    def rerouted() -> bool:  # A keeps beating, B does not; the forwarder keeps calling
        c.call("site_beat", site="A", backlog=30, capacity=10)
        moved.update({f["job"]: f for f in take()})
        return j1 in moved
    wait_for(rerouted, 15, 0.3, what="j1 routed again")
    assert (moved[j1]["site"], moved[j1]["attempt"]) == ("A", 2)
    assert c.job(j2)["agent"] == "site:B" and c.job(j2)["state"] == "RUNNING"
    sites = {s["site"]: s for s in c.call("remote_sites")["sites"]}
    assert not sites["B"]["healthy"] and sites["A"]["healthy"] and sites["B"]["forwarded"] == 1
    # B comes back and finishes j2; A fails j1 (it is retried here: a new attempt)
    c.call("site_beat", site="B", backlog=0, capacity=10)
    c.call("forward_report", site="B", updates=[{"job": j2, "attempt": 1, "to": "JOB_FINISHED"}])
    c.call("forward_report", site="A", updates=[{"job": j1, "attempt": 2, "to": "RUN_FAILED"}])
    assert c.job(j2)["state"] == "JOB_FINISHED"
    ev = [(e["from_state"], e["to_state"]) for e in c.job(j2)["events"]]
    assert ev[-1][1] == "JOB_FINISHED" and all(b[0] == a[1] for a, b in zip(ev, ev[1:]))
    j1d = c.job(j1)
    assert j1d["state"] == "RESTART_READY" and j1d["retries"] == 1
    c.close()


def test_federate_cli_checks_its_config(tmp_path):
    """`pilotfish federate --check` and `server start --federate` refuse a bad config in one
    line, before anything starts; the password never comes from the config itself."""
    from conftest import run_cli
    home = tmp_path / "home"
    good = {"name": "central", "exchange": "x", "status_queue": "q",
            "status_routing_key": "fed.status", "site_beat_routing_key": "fed.beat",
            "sites": {"A": {"jobs_queue": "a.jobs", "user": "a"}}}
    (tmp_path / "good.yaml").write_text(json.dumps(good))
    r = run_cli(home, "federate", "--config", str(tmp_path / "good.yaml"), "--check")
    assert r.returncode == 0 and "ok: amqp://guest@127.0.0.1:5672/; sites A" in r.stdout, r
    (tmp_path / "bad.yaml").write_text(json.dumps({**good, "password": "secret"}))
    r = run_cli(home, "federate", "--config", str(tmp_path / "bad.yaml"), "--check")
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "unknown key" in r.stderr
    assert "secret" not in r.stderr
    r = run_cli(home, "server", "start", "--federate", str(tmp_path / "bad.yaml"))
    assert r.returncode != 0 and "--federate" in r.stderr and "unknown key" in r.stderr, r
    assert not (home / "server.json").exists()


def test_job_add_site_alternatives(server):
    """`job add --site B,A` stores the alternatives; a bad list is refused whole."""
    from conftest import run_cli
    with server.client() as c:
        c.add_app(STAMP)
    args = ("--server", server.address, "job", "add", "--name", "j", "--app", "stamp")
    r = run_cli(server.home, *args, "--site", "B,A", check=True)
    assert "added" in r.stdout
    for bad, words in (("B,B", "named twice"), ("B,-oX", "not a valid name"),
                       (",".join("s%d" % i for i in range(9)), "1..8")):
        r = run_cli(server.home, *args, "--site", bad)
        assert r.returncode != 0 and words in r.stderr, r.stderr
    with server.client() as c:
        jobs = c.jobs()
        assert len(jobs) == 1 and jobs[0]["site"] == "B"
