"""The AMQP bridge against the real RabbitMQ on 127.0.0.1:5672 and a real server: job messages
in (single and lists, idempotent across redeliveries, poison to the dead-letter queue), the
server going away, and its command line's refusals."""
from __future__ import annotations

import json
import subprocess
import time
import uuid

import pytest

from amqp_world import ECHO_APP, SEED_JOB, URL, until, world_of
from conftest import require, run_cli
from externals import rabbitmq_available

pytestmark = pytest.mark.slow


@pytest.fixture
def world(server, tmp_path):
    with world_of(server, tmp_path) as w:
        yield w


def seed(name: str, **more) -> dict:
    return {**SEED_JOB, "name": name, **more}


def test_single_and_list_messages_become_jobs_with_the_seed_fields(world):
    b = world.bridge(status=False)
    world.publish(seed("one", site="theta"), message_id="m-one")
    world.publish([seed(f"list{i}", argo_job_id=f"argo-{i}") for i in range(3)],
                  message_id="m-list")
    jobs = world.wait_jobs(4)
    assert sorted(j["name"] for j in jobs) == ["list0", "list1", "list2", "one"]
    with world.server.client() as c:
        one = c.job(next(j["id"] for j in jobs if j["name"] == "one"))
        l1 = c.job(next(j["id"] for j in jobs if j["name"] == "list1"))
    # stored, not refused: the seed's argo_job_id (an integer kept as its digits) and
    # scheduler_config, and where the status goes
    assert one["argo_job_id"] == "4711" and l1["argo_job_id"] == "argo-1"
    assert one["scheduler_config"] == "theta-default"
    assert one["job_status_routing_key"] == "argo.status.test"
    assert one["site"] == "theta" and one["queue"] == "default" and one["project"] == "atlas"
    assert one["wall_time_minutes"] == 10 and one["parameters"] == {"msg": "hello"}
    assert one["description"] == "from a production system"
    assert one["owner"] == "bridge"  # the bridge's own submitter key
    assert one["intake_key"] == "amqp:id:m-one:0"
    assert world.stop(b) == 0
    assert world.ready(world.jobs_queue) == 0  # every message acknowledged
    assert world.ready(world.dead_queue) == 0


def test_the_same_message_again_adds_nothing(world):
    """A redelivered message (same message_id, or the same body without one) and a job whose
    producer gave its own intake_key add no second job; the bridge says so in its log."""
    world.bridge(status=False)
    world.publish([seed("a"), seed("b")], message_id="again")
    world.publish(seed("c"))  # no message_id: the body's digest is its key
    world.publish(seed("d", intake_key="producer-key-1"), message_id="d1")
    world.wait_jobs(4)
    world.publish([seed("a"), seed("b")], message_id="again")
    world.publish(seed("c"))
    world.publish(seed("d", intake_key="producer-key-1"), message_id="d2")
    world.publish(seed("e"), message_id="e")  # a new one, after the repeats
    world.wait_jobs(5)
    until(lambda: world.ready(world.jobs_queue) == 0, what="the queue drained")
    until(lambda: "already added" in world.log_text(), what="the bridge's note")
    time.sleep(1)
    with world.server.client() as c:
        names = sorted(j["name"] for j in c.jobs(limit=0))
    assert names == ["a", "b", "c", "d", "e"]


def test_a_redelivery_after_kill9_adds_no_duplicate(world):
    """2,000 jobs in 100 messages; the bridge is killed with SIGKILL twice while it takes
    them (messages it had not acknowledged are redelivered, some of them already committed):
    exactly 2,000 jobs in the end, each intake key once. (bench/amqp_chaos.py does the same
    with 10,000 jobs that also run, 5 kills and a closed connection.)"""
    for m in range(100):
        world.publish([seed(f"k{m}-{i}") for i in range(20)], message_id=f"kill-{m}")
    for round_ in range(2):
        b = world.bridge("--prefetch", "64", status=False)
        target = (round_ + 1) * 500
        until(lambda: world.job_count() >= target or b.poll() is not None, 120,
              f"{target} jobs")
        world.kill9(b)
    world.bridge(status=False)
    until(lambda: world.ready(world.jobs_queue) == 0 and world.job_count() >= 2_000, 180,
          "every message taken")
    time.sleep(2)  # nothing more arrives
    with world.server.client() as c:
        jobs = c.jobs(limit=0)
    assert len(jobs) == 2_000
    assert len({j["name"] for j in jobs}) == 2_000


@pytest.mark.parametrize("case", ["garbage", "unknown_app", "huge_int", "past_64_bits",
                                  "outside_data_roots", "unknown_key", "too_many_jobs",
                                  "too_big", "not_a_map"])
def test_poison_goes_to_the_dead_letter_queue_with_its_error(world, case):
    """Each poison message goes to the dead-letter queue with a one-line reason in the
    x-pilotfish-error header; good messages around it are added; the bridge lives on."""
    bodies = {
        "garbage": (b"\x00\xffnot json{", "not JSON"),
        "unknown_app": (seed("x", application="nope"), "no app named 'nope'"),
        "huge_int": (seed("x", num_nodes=2**40), "num_nodes"),
        "past_64_bits": (seed("x", wall_time_minutes=10**30), "past 64 bits"),
        "outside_data_roots": (seed("x", input_url="file:///etc/passwd"), "input_url"),
        "unknown_key": (seed("x", rm_rf="/"), "unknown job key"),
        "too_many_jobs": (b"[" + b"{}," * 199_999 + b"{}]", "200,000 jobs"),
        "too_big": (b'"' + b"x" * (50 * 2**20) + b'"', "bytes; the bridge takes at most"),
        "not_a_map": ([seed("ok-in-list"), 5], "job #2 is a JSON int"),
    }
    body, expect = bodies[case]
    b = world.bridge(status=False)
    world.publish(seed("before"), message_id="before")
    world.publish(body, message_id=f"poison-{case}", raw=isinstance(body, bytes))
    world.publish(seed("after"), message_id="after")
    world.publish([seed("after2"), seed("after3")], message_id="after-list")
    until(lambda: world.ready(world.dead_queue) == 1, 120, "the dead letter")
    dead = world.drain(world.dead_queue)
    assert len(dead) == 1
    _m, props, dead_body = dead[0]
    err = props.headers["x-pilotfish-error"]
    assert expect in err, err
    assert "\n" not in err and len(err) <= 1000
    assert props.message_id == f"poison-{case}"
    assert props.headers["x-pilotfish-queue"] == world.jobs_queue
    if case != "too_big":  # the body is kept for whoever looks into it
        assert dead_body == (body if isinstance(body, bytes) else json.dumps(body).encode())
    jobs = world.wait_jobs(4)
    assert sorted(j["name"] for j in jobs) == ["after", "after2", "after3", "before"]
    assert b.poll() is None  # the bridge lives on
    until(lambda: world.ready(world.jobs_queue) == 0, what="the queue drained")
    assert f"to {world.dead_queue}: " in world.log_text()  # one log line says why


def test_server_down_pauses_intake_and_it_resumes(world):
    """The server stops while messages arrive: the bridge adds and acknowledges nothing, holds
    the messages in the queue, and takes them all once a server (at a new address) is back."""
    world.bridge("--server-timeout", "2", status=False)  # pause after 2 s, not the default 30
    world.publish(seed("first"), message_id="first")
    world.wait_jobs(1)
    world.server.stop()
    for i in range(5):
        world.publish(seed(f"while-down-{i}"), message_id=f"down-{i}")
    until(lambda: "intake paused" in world.log_text(), 90, "the bridge to pause")
    until(lambda: world.ready(world.jobs_queue) == 5, 60, "the messages given back")
    world.server.start()  # a new port: the bridge finds it in the home's server.json
    jobs = world.wait_jobs(6, 120)
    until(lambda: world.ready(world.jobs_queue) == 0, what="the queue drained")
    assert len(jobs) == 6 and world.ready(world.dead_queue) == 0
    assert "intake resumed" in world.log_text()


def test_a_closed_broker_connection_is_reopened(world):
    """`rabbitmqctl close_connection` on the bridge's connections: it reconnects (with a
    growing wait) and goes on taking messages."""
    from amqp_world import close_bridge_connections
    b = world.bridge(status=False)
    world.publish(seed("before"), message_id="before")
    world.wait_jobs(1)
    assert close_bridge_connections(b.pid) == 1
    until(lambda: "reconnecting" in world.log_text(), 60, "the bridge to see it")
    world.publish(seed("after"), message_id="after")
    world.wait_jobs(2, 120)
    until(lambda: world.log_text().count("receiver: consuming") == 2, 60, "a new consumer")
    assert b.poll() is None


def test_the_password_comes_from_a_file_never_the_command_line_nor_the_log(world, tmp_path):
    """A vhost and a user of this test's own (rabbitmqctl): the password is read from
    --password-file; it is on no command line and in no log line. A URL with a password is
    refused."""
    vhost, user, secret = world.tag, f"{world.tag}-user", uuid.uuid4().hex
    ctl = ["rabbitmqctl", "-q"]
    subprocess.run(ctl + ["add_vhost", vhost], check=True, capture_output=True, timeout=60)
    try:
        subprocess.run(ctl + ["add_user", user, secret], check=True, capture_output=True,
                       timeout=60)
        subprocess.run(ctl + ["set_permissions", "-p", vhost, user, ".*", ".*", ".*"],
                       check=True, capture_output=True, timeout=60)
        pw = tmp_path / "amqp.password"
        pw.write_text(secret + "\n")
        r = run_cli(world.home, "bridge", "amqp", "--url", f"amqp://{user}:{secret}@127.0.0.1/",
                    "--jobs-queue", "q")
        assert r.returncode == 1 and "carries a password" in r.stderr
        assert secret not in r.stderr + r.stdout
        r = run_cli(world.home, "bridge", "amqp", "--url", f"amqp://{user}@127.0.0.1/{vhost}",
                    "--jobs-queue", "q")
        assert r.returncode == 1 and "no password for AMQP user" in r.stderr
        b = world.bridge("--url", f"amqp://{user}@127.0.0.1:5672/{vhost}", "--password-file",
                         str(pw), status=False)
        until(lambda: "consuming" in world.log_text(), 60, "the bridge to connect")
        assert secret not in open(f"/proc/{b.pid}/cmdline", "rb").read().decode()
        world.stop(b)
        assert secret not in world.log_text()
    finally:
        subprocess.run(ctl + ["delete_user", user], capture_output=True, timeout=60)
        subprocess.run(ctl + ["delete_vhost", vhost], capture_output=True, timeout=60)


def test_the_command_line_refuses_bad_settings(home, tmp_path):
    cases = [
        (["--jobs-queue", "q q"], "jobs_queue"),
        (["--url", "http://x/", "--jobs-queue", "q"], "amqp://"),
        ([], "give --jobs-queue"),
        (["--jobs-queue", "q", "--password-file", str(tmp_path / "none")], "cannot read"),
        (["--exchange", "x", "--routing-key", "a b"], "routing_key"),
    ]
    for args, expect in cases:
        r = run_cli(home, "bridge", "amqp", *args)
        assert r.returncode != 0 and expect in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("url: amqp://guest@127.0.0.1/\njobs_queue: q\nsecret: 1\n")
    r = run_cli(home, "server", "start", "--amqp", str(cfg))
    assert r.returncode == 1 and "unknown key(s) secret" in r.stderr, r.stderr
    assert not (home / "server.json").exists()


def test_server_start_amqp_runs_the_bridge_beside_the_server(home, tmp_path):
    """`server start --amqp CONFIG.yaml`: the bridge runs with a submitter key of its own
    (amqp-bridge), is restarted like a site agent, and stops with the server."""
    require(rabbitmq_available(), "RabbitMQ at 127.0.0.1:5672 (guest/guest)")
    from amqp_world import broker_connection
    from conftest import ServerHandle
    from pilotfish.server import daemon
    tag = f"pftest.{uuid.uuid4().hex[:10]}"
    cfg = tmp_path / "amqp.yaml"
    cfg.write_text(f"url: {URL}\njobs_queue: {tag}.jobs\nexchange: {tag}.status\n")
    conn = broker_connection()
    ch = conn.channel()
    try:
        s = ServerHandle(home, f"sqlite:///{home / 'pilotfish.db'}")
        s.info = daemon.start_background(home, s.db_url, "tcp://127.0.0.1:*", 1.0,
                                         amqp=str(cfg))
        try:
            with s.client() as c:
                c.add_app(ECHO_APP)
            ch.queue_declare(f"{tag}.jobs", durable=True)
            ch.basic_publish("", f"{tag}.jobs", json.dumps(seed("beside")).encode())
            with s.client() as c:
                until(lambda: c.jobs(), 120, "the job")
                job = c.job(c.jobs()[0]["id"])
            assert job["owner"] == "amqp-bridge"
            log = (home / "logs" / "amqp-bridge.log").read_text()
            assert "consuming" in log
        finally:
            s.stop()
        until(lambda: "AMQP bridge stopped" in (home / "logs" / "amqp-bridge.log").read_text(),
              30, "the bridge to stop with the server")
    finally:
        for q in (f"{tag}.jobs", f"{tag}.jobs.dead"):
            ch.queue_delete(q)
        ch.exchange_delete(f"{tag}.status")
        conn.close()
