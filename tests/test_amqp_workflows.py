"""Workflows over the real RabbitMQ: the seed's Argo job message on the jobs queue becomes a
workflow (once, however often it is delivered), its state messages arrive on its routing key in
order, and a bad one goes to the dead-letter queue naming the subjob. A real server, bridge and
agent."""
from __future__ import annotations

import json

import pytest

from amqp_world import SEED_JOB, until, world_of

pytestmark = pytest.mark.slow


@pytest.fixture
def world(server, tmp_path):
    with world_of(server, tmp_path) as w:
        yield w


def argo_job(tag: str, key: str, n: int = 2) -> dict:
    """The seed's Argo job message: its keys, and subjobs in the seed's Balsam job format."""
    return {"user_id": 42, "name": f"argo-{tag}", "description": "an ATLAS job",
            "group_identifier": "atlas", "username": "prodsys", "email": "prod@example.org",
            "input_url": None, "output_url": None, "job_status_routing_key": key,
            "subjobs": [{**SEED_JOB, "name": f"{tag}-{i}", "job_status_routing_key": None}
                        for i in range(n)]}


def test_argo_messages_become_workflows_with_status_in_order(world):
    key = f"{world.tag}.argo.wf"
    watch = world.status_queue(key)
    world.bridge()
    world.publish(argo_job("a", key), message_id="wf-a")
    world.publish(argo_job("b", key, 3), message_id="wf-b")
    world.publish(argo_job("a", key), message_id="wf-a")  # redelivered: nothing new
    bad = argo_job("c", key)
    bad["subjobs"][1]["application"] = "nope"
    world.publish(bad, message_id="wf-c")
    world.publish([argo_job("d", key)], message_id="wf-d")  # a workflow in a list: poison
    until(lambda: world.ready(world.dead_queue) == 2, 60, "the two bad messages dead-lettered")
    dead = world.drain(world.dead_queue)
    errors = sorted(p.headers["x-pilotfish-error"] for _m, p, _b in dead)
    assert "subjobs[1]" in errors[1] and "no app named 'nope'" in errors[1], errors
    assert "a workflow is sent alone" in errors[0], errors
    with world.server.client() as c:
        until(lambda: len(c.workflows()) == 2 and world.ready(world.jobs_queue) == 0, 60,
              "two workflows")
        wfs = {w["name"]: w for w in c.workflows()}
        assert wfs["argo-a"]["intake_key"] == "amqp:id:wf-a:workflow"
        assert wfs["argo-b"]["user_id"] == 42 and wfs["argo-b"]["email"] == ["prod@example.org"]
        assert sum(c.counts().values()) == 5  # 2 + 3 subjobs, none twice
    world.server.agent(cores="0")
    got: list[dict] = []

    def history() -> bool:
        got.extend(json.loads(b) for _m, _p, b in world.drain(watch))
        return sum(m["to"] == "HISTORY" for m in got) == 2
    until(history, 90, "both workflows in HISTORY on the routing key")
    with world.server.client() as c:
        for name, w in wfs.items():
            mine = [m for m in got if m["workflow_id"] == w["id"]]
            assert all(m["kind"] == "workflow" and m["name"] == name for m in mine)
            assert [m["event_id"] for m in mine] == [e["id"] for e in c.workflow(w["id"])
                                                     ["events"]]
            for a, b in zip(mine, mine[1:]):
                assert b["from"] == a["to"]
            assert mine[0]["to"] == "CREATED" and mine[-1]["to"] == "HISTORY"
            assert mine[-1]["user_id"] == 42 and mine[-1]["username"] == "prodsys"
            assert [m["to"] for m in mine].count("SUBJOB_INCREMENTED") == w["subjobs"] - 1
