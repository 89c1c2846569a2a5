"""One bad request fails alone: it never rolls back other clients' work in the same turn.

The outside battery found that a request which made the server fail internally rolled back the
whole turn: of three requests pipelined on one connection (add A, the bad one, add B), A was
neither answered nor stored. These tests make one request fail for real, inside the database, with
a trigger that refuses one value -- as a full disk, a constraint or a driver bug would -- once
while its handler runs (an app insert is written at once) and once at the turn's commit (job
inserts are batched), pipeline it between good requests on one connection and beside a working
agent, and check that every other request is answered and stored and that no job loses work.
"""
from __future__ import annotations

import sqlite3
import time

import pytest

from conftest import wait_for
from pilotfish import protocol as P
from test_bad_input import dealer, recv_msg, req

POISON_JOB = ("CREATE TRIGGER poison_job BEFORE INSERT ON jobs WHEN NEW.name = 'poison' "
              "BEGIN SELECT RAISE(ABORT, 'injected write failure'); END")
POISON_APP = ("CREATE TRIGGER poison_app BEFORE INSERT ON apps WHEN NEW.name = 'poison' "
              "BEGIN SELECT RAISE(ABORT, 'injected write failure'); END")


def _db(server) -> sqlite3.Connection:
    return sqlite3.connect(server.db_url[len("sqlite:///"):], timeout=10)


def _pipeline(address: str, requests: list[tuple[str, dict]]) -> dict[int, tuple[str, dict]]:
    """Send every request on one connection before reading any answer; answers by rid."""
    s = dealer(address)
    try:
        for rid, (op, args) in enumerate(requests, 1):
            s.send(req(rid=rid, op=op, args=args))
        answers = {}
        while len(answers) < len(requests):
            got = recv_msg(s, timeout=10)
            assert got is not None, f"only {len(answers)} of {len(requests)} answered"
            answers[got[1]["rid"]] = got
        return answers
    finally:
        s.close(linger=0)


def _job(name: str) -> dict:
    return {"jobs": [{"name": name, "application": "hello"}]}


@pytest.fixture
def hello(server):
    with server.client() as c:
        c.add_app({"name": "hello", "executable": "/bin/true"})
    with _db(server) as db:
        db.execute(POISON_JOB)
        db.execute(POISON_APP)
    return server


@pytest.mark.parametrize("poison", [
    ("job_add", _job("poison")),                                     # fails at the commit
    ("app_add", {"spec": {"name": "poison", "executable": "/bin/true"}}),  # in its handler
])
def test_a_failing_request_between_two_good_ones_fails_alone(hello, poison):
    answers = _pipeline(hello.address, [("job_add", _job("a")), poison, ("job_add", _job("b"))])
    ok_a, ok_b = answers[1], answers[3]
    assert ok_a[0] == P.REPLY and ok_a[1]["ok"], ok_a
    assert ok_b[0] == P.REPLY and ok_b[1]["ok"], ok_b
    kind, bad = answers[2]
    assert kind == P.ERROR and "nothing of this request was stored" in bad["error"], bad
    assert "\n" not in bad["error"]
    with hello.client() as c:
        names = sorted(j["name"] for j in c.jobs(limit=0))
        assert names == ["a", "b"]
        assert [a["name"] for a in c.apps()] == ["hello"]
        # ids handed out are the ones stored, and counting stays right
        ids = [ok_a[1]["result"]["ids"][0], ok_b[1]["result"]["ids"][0]]
        assert sorted(j["id"] for j in c.jobs(limit=0)) == sorted(ids)
        assert sum(c.counts().values()) == 2
        assert c.add_jobs([{"name": "c", "application": "hello"}])  # and it goes on serving


def test_failing_requests_do_not_cost_a_working_agent_anything(hello, tmp_path):
    """Poisoned requests keep arriving while an agent runs 300 jobs: every job finishes on its
    first attempt (no update of the agent's was dropped with a rolled-back turn)."""
    with hello.client() as c:
        ids = c.add_jobs([{"name": f"j{i}", "application": "hello"} for i in range(300)])
    hello.agent(cores="0", work_root=tmp_path / "work")
    refused = 0
    deadline = time.time() + 60
    while time.time() < deadline:
        answers = _pipeline(hello.address, [("job_add", _job("poison")), ("job_counts", {})])
        refused += answers[1][0] == P.ERROR
        assert answers[2][0] == P.REPLY and answers[2][1]["ok"]
        if answers[2][1]["result"].get("JOB_FINISHED", 0) == len(ids):
            break
        time.sleep(0.02)
    assert refused >= 3
    with hello.client() as c:
        wait_for(lambda: c.counts({"ids": ids}).get("JOB_FINISHED") == len(ids), 30,
                 what="all jobs finished")
        jobs = c.jobs({"ids": ids}, limit=0)
        assert all(j["attempts"] == 1 for j in jobs), [j for j in jobs if j["attempts"] != 1][:3]
