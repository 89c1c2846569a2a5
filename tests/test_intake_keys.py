"""What a production system sends with its jobs is stored and checked at the door (argo_job_id,
scheduler_config, job_status_routing_key), and intake keys make adding the same jobs again a
no-op (what the AMQP bridge's redeliveries rely on): on the server, across its restarts."""
from __future__ import annotations

import pytest

from conftest import run_cli
from pilotfish.client import Client
from pilotfish.errors import Forbidden, ValidationError

ECHO = {"name": "echo", "executable": "/bin/echo", "args": ["{msg}"],
        "parameters": {"msg": {"type": "str"}}}


def job(name: str, **more) -> dict:
    return {"name": name, "application": "echo", "parameters": {"msg": "x"}, **more}


@pytest.fixture
def c(server):
    with server.client() as cl:
        cl.add_app(ECHO)
        yield cl


def test_production_fields_are_stored_and_listed(c):
    [i] = c.add_jobs([job("p", argo_job_id=12, scheduler_config="cfg one",
                          job_status_routing_key="argo.status.x")])
    j = c.job(i)
    assert (j["argo_job_id"], j["scheduler_config"], j["job_status_routing_key"]) == \
        ("12", "cfg one", "argo.status.x")
    [row] = c.jobs({"ids": [i]})
    assert row["argo_job_id"] == "12" and row["job_status_routing_key"] == "argo.status.x"


@pytest.mark.parametrize("field,value,words", [
    ("argo_job_id", "a b", "argo_job_id must be a string of 1..128"),
    ("argo_job_id", "x" * 129, "argo_job_id"),
    ("argo_job_id", 2**70, "past 64 bits"),
    ("argo_job_id", -2**63 - 1, "past 64 bits"),
    ("argo_job_id", 1.5, "argo_job_id"),
    ("argo_job_id", "", "argo_job_id"),
    ("scheduler_config", "a\nb", "scheduler_config"),
    ("scheduler_config", "x" * 1025, "at most 1024"),
    ("scheduler_config", {"a": 1}, "scheduler_config"),
    ("job_status_routing_key", "a.*.b", "letters, digits and '_.:/@+-'"),
    ("job_status_routing_key", "k" * 256, "1..255"),
    ("job_status_routing_key", "<script>", "job_status_routing_key"),
    ("intake_key", "white space", "intake_key"),
    ("intake_key", "k" * 256, "intake_key"),
    ("intake_key", 5, "intake_key"),
])
def test_bad_production_fields_are_refused_with_one_line(c, field, value, words):
    with pytest.raises(ValidationError) as e:
        c.add_jobs([job("bad", **{field: value})])
    msg = str(e.value)
    assert words in msg and "\n" not in msg and len(msg) < 400, msg
    assert c.jobs() == []


def test_an_intake_key_adds_a_job_once_across_requests_and_restarts(server, c):
    ids = c.add_jobs([job("a", intake_key="k-a"), job("b", intake_key="k-b"), job("free")])
    again = c.call("job_add", jobs=[job("b2", intake_key="k-b"), job("c", intake_key="k-c"),
                                    job("a2", intake_key="k-a")])
    assert again["known"] == 2
    assert again["ids"][0] == ids[1] and again["ids"][2] == ids[0]
    server.stop()
    server.start()
    with server.client() as c2:
        third = c2.call("job_add", jobs=[job("x", intake_key="k-c")])
        assert third == {"ids": [again["ids"][1]], "known": 1}
        assert sorted(j["name"] for j in c2.jobs()) == ["a", "b", "c", "free"]


def test_an_intake_key_twice_in_one_request_or_in_an_array_is_refused(c):
    with pytest.raises(ValidationError, match="given to two jobs of one request"):
        c.add_jobs([job("a", intake_key="same"), job("b", intake_key="same")])
    with pytest.raises(ValidationError, match="cannot share one intake_key"):
        c.add_array(job("arr{index}", intake_key="one"), "1-3")
    assert c.jobs() == []


def test_another_keys_intake_key_is_refused_not_revealed(server, c):
    run_cli(server.home, "keys", "init", "--client", "alice", check=True)
    run_cli(server.home, "keys", "init", "--client", "bob", check=True)

    def as_(name):
        return Client(server.address, server.home, timeout=15,
                      client_key=server.home / "keys" / f"{name}.key_secret")
    with as_("alice") as a:
        [mine] = a.add_jobs([job("alice-job", intake_key="shared-key")])
        assert a.add_jobs([job("again", intake_key="shared-key")]) == [mine]
    with as_("bob") as b:
        with pytest.raises(Forbidden, match="belongs to a job of another key"):
            b.add_jobs([job("bob-job", intake_key="shared-key"), job("other")])
    assert sorted(j["name"] for j in c.jobs()) == ["alice-job"]  # nothing of bob's added


def test_job_add_says_when_an_intake_key_was_there_already(server, c, tmp_path):
    """The CLI says what happened: a job sent again under its intake_key is not added again."""
    import json
    f = tmp_path / "j.json"
    f.write_text(json.dumps(job("once", intake_key="k-cli")))
    first = run_cli(server.home, "job", "add", "-f", str(f), check=True).stdout
    again = run_cli(server.home, "job", "add", "-f", str(f), check=True).stdout
    assert first.startswith("job ") and first.strip().endswith("added")
    assert "was there already (same intake_key): not added again" in again
    f.write_text(json.dumps([job("once", intake_key="k-cli"), job("new", intake_key="k-new")]))
    r = json.loads(run_cli(server.home, "job", "add", "-f", str(f), "--json", check=True).stdout)
    assert r["known"] == 1 and len(r["ids"]) == 2
    assert sorted(j["name"] for j in c.jobs()) == ["new", "once"]
