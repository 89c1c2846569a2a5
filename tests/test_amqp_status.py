"""The AMQP bridge's status publisher against the real RabbitMQ and a real server with a real
agent: every job state change arrives on the job's routing key, in order per job, with its
fields; killing the bridge or closing its broker connections loses none (at least once:
consumers dedupe by event_id)."""
from __future__ import annotations

import json
from datetime import datetime

import pytest

from amqp_world import SEED_JOB, close_bridge_connections, until, world_of

pytestmark = pytest.mark.slow
FINAL = ("JOB_FINISHED", "FAILED", "USER_KILLED")
FIELDS = {"event_id", "job_id", "name", "group_identifier", "argo_job_id", "from", "to", "time",
          "message"}


@pytest.fixture
def world(server, tmp_path):
    with world_of(server, tmp_path) as w:
        yield w


class Watch:
    """What arrived on a status queue, in arrival order: (routing key, message)."""

    def __init__(self, world, queue: str) -> None:
        self.world, self.queue = world, queue
        self.got: list[tuple[str, dict]] = []

    def poll(self) -> list[tuple[str, dict]]:
        for method, _props, body in self.world.drain(self.queue):
            self.got.append((method.routing_key, json.loads(body)))
        return self.got

    def by_job(self) -> dict[int, list[dict]]:
        out: dict[int, list[dict]] = {}
        for _rk, m in self.got:
            out.setdefault(m["job_id"], []).append(m)
        return out

    def finals(self) -> set[int]:
        return {m["job_id"] for _rk, m in self.poll() if m["to"] in FINAL}


def server_events(world, ids: set[int]) -> dict[int, list[int]]:
    """The server's own event ids per job (the stream the bridge reads)."""
    out: dict[int, list[int]] = {}
    with world.server.client() as c:
        since = 0
        while True:
            page = c.events(since=since, limit=1000)
            for e in page["events"]:
                if e.get("job") in ids and e.get("kind", "job") == "job":
                    out.setdefault(e["job"], []).append(e["id"])
            if not page["events"]:
                return out
            since = page["cursor"]


def check_chains(watch: Watch, expected: dict[int, list[int]]) -> None:
    """Per job: deduped by event_id, the messages are the server's events, in order, each
    one's 'from' the previous one's 'to'; a repeat (at least once) only ever repeats."""
    for job, msgs in watch.by_job().items():
        if job not in expected:
            continue
        seen: list[dict] = []
        for m in msgs:
            if seen and m["event_id"] <= seen[-1]["event_id"]:
                # a message published again after a crash: an old one, never a gap
                assert m["event_id"] in {x["event_id"] for x in seen}, (job, m)
                continue
            seen.append(m)
        assert [m["event_id"] for m in seen] == expected[job], job
        for a, b in zip(seen, seen[1:]):
            assert b["from"] == a["to"], (job, a, b)
        assert seen[-1]["to"] in FINAL


def test_status_messages_in_order_per_job_on_their_routing_keys(world):
    watch = Watch(world, world.status_queue("#"))
    world.bridge()
    key = f"{world.tag}.argo.status"
    jobs = [{**SEED_JOB, "name": f"s{i}", "job_status_routing_key": key,
             "argo_job_id": f"argo-{i}", "group_identifier": "grp"} for i in range(6)]
    jobs.append({**SEED_JOB, "name": "default-key", "job_status_routing_key": None})
    world.publish(jobs, message_id="status-1")
    world.wait_jobs(7)
    world.server.agent(cores="0")
    until(lambda: len(watch.finals()) == 7, 180, "every job's final status")
    with world.server.client() as c:
        ids = {j["name"]: j["id"] for j in c.jobs(limit=0)}
    check_chains(watch, server_events(world, set(ids.values())))
    for rk, m in watch.got:
        assert FIELDS <= set(m), m
        datetime.fromisoformat(m["time"])  # ISO 8601
        if m["name"] == "default-key":
            assert rk == world.default_key and m["argo_job_id"] == "4711"
        else:
            assert rk == key and m["argo_job_id"] == f"argo-{m['name'][1:]}"
            assert m["group_identifier"] == "grp"
        assert m["job_id"] == ids[m["name"]]
    first = watch.by_job()[ids["s0"]][0]
    assert first["from"] is None and first["to"] == "READY"


def test_kill9_of_the_bridge_loses_no_status_message(world):
    """300 jobs run while the bridge is killed (SIGKILL) twice and started again: every job's
    every state change arrives at least once, in order (its cursor moved only past what the
    broker confirmed)."""
    watch = Watch(world, world.status_queue("#"))
    b = world.bridge()
    world.publish([{**SEED_JOB, "name": f"k{i}", "job_status_routing_key": None}
                   for i in range(300)], message_id="kill-status")
    world.wait_jobs(300)
    world.server.agent(cores="0")
    for n in (60, 150):
        until(lambda: len(watch.finals()) >= n, 240, f"{n} final statuses")
        world.kill9(b)
        b = world.bridge()
    until(lambda: len(watch.finals()) == 300, 300, "every job's final status")
    with world.server.client() as c:
        ids = {j["id"] for j in c.jobs(limit=0)}
    check_chains(watch, server_events(world, ids))
    assert len(watch.by_job()) == 300


def test_a_closed_broker_connection_mid_stream_loses_nothing(world):
    """`rabbitmqctl close_connection` on both of the bridge's connections while jobs run: it
    reconnects; every status arrives; a message sent afterwards becomes a job."""
    watch = Watch(world, world.status_queue("#"))
    b = world.bridge()
    world.publish([{**SEED_JOB, "name": f"c{i}", "job_status_routing_key": None}
                   for i in range(200)], message_id="close-1")
    world.wait_jobs(200)
    world.server.agent(cores="0")
    until(lambda: len(watch.finals()) >= 50, 240, "50 final statuses")
    assert close_bridge_connections(b.pid) == 2
    world.publish({**SEED_JOB, "name": "after-close"}, message_id="close-2")
    until(lambda: len(watch.finals()) == 201, 300, "every job's final status")
    with world.server.client() as c:
        ids = {j["id"] for j in c.jobs(limit=0)}
    check_chains(watch, server_events(world, ids))
    assert "reconnecting" in world.log_text() and b.poll() is None
