"""The queue read at start a range of ids at a time (JobServer.load_more): the same queue and the
same dispatch order as reading it at once; what changes between ranges is kept; no dispatch,
and whole counts for the provisioner, while it reads.

The jobs are made by a real server process; the reading is then watched step by step in a
JobServer of this process on the same database (ranges of 25 ids instead of 20,000).
"""
from __future__ import annotations

import time

import pytest

from pilotfish import dataroots
from pilotfish.server import core, ops
from pilotfish.server.core import JobServer
from pilotfish.server.db import make_engine

N = 200


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, home):
    """Both databases. (Setting up a PostgreSQL database and a server on it takes ~2-3 s on a
    busy machine.)"""
    if request.param == "sqlite":
        return f"sqlite:///{home / 'pilotfish.db'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def opened():
    """JobServers of this process, closed after the test (before its database is dropped)."""
    srvs: list[JobServer] = []
    yield srvs
    for srv in srvs:
        srv.conn.close()
        srv.engine.dispose()


@pytest.fixture
def filled(server, home):
    """N READY jobs of several priorities and shapes (some for site s1), every 17th killed."""
    with server.client() as c:
        c.add_app({"name": "a", "executable": "/bin/true"})
        jobs = []
        for i in range(N):
            j = {"name": f"j{i}", "application": "a", "priority": (i * 7) % 5}
            if i % 3 == 0:
                j["cpus_per_process"] = 2
            if i % 10 == 0:
                j["site"] = "s1"
            jobs.append(j)
        ids = c.add_jobs(jobs)
        c.kill_jobs({"ids": ids[::17]})
    server.stop()
    return ids


def open_srv(server, home, opened) -> JobServer:
    srv = JobServer(make_engine(server.db_url), 1.0, 3.0, dataroots.make(home))
    opened.append(srv)
    return srv


def drain(srv: JobServer, site: str | None) -> list[int]:
    """Every job an agent of ``site`` with 4 cores would be handed, in order."""
    out = []
    while True:
        got = srv.queue.pick(site, 4, 0, None, 4, 0, 1000)
        if not got:
            return out
        out += [j for j, _ in got]


def read_all(srv: JobServer) -> int:
    steps = 0
    while srv.loading is not None:
        srv.load_more()
        srv.commit()
        steps += 1
    return steps


def full_load(server, home, opened) -> JobServer:
    """The queue read at once (as before ranges)."""
    srv = open_srv(server, home, opened)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(core, "LOAD_FIRST_IDS", 10**9)
        srv.load()
    assert srv.loading is None
    return srv


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # PostgreSQL: the next test
def test_ranges_give_the_same_queue_and_order(filled, server, home, monkeypatch, opened):
    monkeypatch.setattr(core, "LOAD_FIRST_IDS", 40)
    monkeypatch.setattr(core, "LOAD_PAGE_IDS", 25)
    srv = open_srv(server, home, opened)
    srv.load()
    assert srv.loading is not None and 0 < len(srv.queue) < N
    whole = full_load(server, home, opened).queued_shapes()
    assert srv.queued_shapes() == whole  # the ids not yet read are counted in the database
    assert srv.dispatch(time.time()) == 0
    assert read_all(srv) == 7  # ids 41..200 in ranges of 25
    assert srv.queued_shapes() == whole
    ref = full_load(server, home, opened)
    assert sorted(srv.queue.items()) == sorted(ref.queue.items())
    assert len(srv.queue) == N - len(range(0, N, 17))
    for site in ("s1", None):
        assert drain(srv, site) == drain(ref, site)
    assert len(srv.queue) == len(ref.queue) == 0


def test_changes_between_ranges_are_kept(filled, server, home, monkeypatch, opened):
    """A job killed, retried or altered before its range is read is read as it is now, and
    read once."""
    monkeypatch.setattr(core, "LOAD_FIRST_IDS", 40)
    monkeypatch.setattr(core, "LOAD_PAGE_IDS", 25)
    ids = filled
    srv = open_srv(server, home, opened)
    srv.load()
    now = time.time()
    killed, retried, altered = ids[150], ids[153], ids[161]   # not yet read
    assert retried in ids[::17] and killed not in srv.queue
    ops.job_kill(srv, {"filter": {"ids": [killed]}}, now)
    ops.job_retry(srv, {"filter": {"ids": [retried]}}, now)
    ops.job_alter(srv, {"filter": {"ids": [altered]}, "changes": {"priority": 99}}, now)
    srv.commit()
    assert retried in srv.queue  # queued again now; its range must not add it twice
    read_all(srv)
    assert killed not in srv.queue and retried in srv.queue
    ref = full_load(server, home, opened)
    assert sorted(srv.queue.items()) == sorted(ref.queue.items())
    order = drain(srv, None)
    assert order == drain(ref, None)
    assert order[0] == altered and len(order) == len(set(order))
