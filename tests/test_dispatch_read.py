"""The dispatch read on PostgreSQL (JobServer._dispatch_rows): jobs the turn has not touched are
read as committed on a second connection, while the first is still writing what the turn
streamed (Batch.stream); a job the turn added is leased from its inserted row; a job the turn
changed (a failed attempt queued again, a modified job) is read on the turn's own connection,
with its changes.

The jobs are made by a real server process on a scratch PostgreSQL database; the reads are then
watched in a JobServer of this process on the same database.
"""
from __future__ import annotations

import pytest

from sqlalchemy import select

from pilotfish import dataroots
from pilotfish.server import store
from pilotfish.server.core import JobServer
from pilotfish.server.db import jobs, make_engine

from conftest import ServerHandle


@pytest.fixture
def srv(pg_url, home):
    s = ServerHandle(home, pg_url).start()
    with s.client() as c:
        c.add_app({"name": "a", "executable": "/bin/echo", "args": ["{x}"],
                   "parameters": {"x": {"type": "int"}}})
        c.add_jobs([{"name": f"j{i}", "application": "a", "parameters": {"x": i}}
                    for i in range(3)])
    s.stop()
    srv = JobServer(make_engine(pg_url), 1.0, 3.0, dataroots.make(home))
    srv.load()
    srv.commit()
    yield srv
    srv.close()
    srv.engine.dispose()


def test_untouched_jobs_are_read_as_committed_touched_ones_with_the_turns_changes(srv,
                                                                                 monkeypatch):
    monkeypatch.setattr(store, "STREAM_MIN", 1)  # two rows are streamed too
    first, second, third = sorted(r.id for r in srv.conn.execute(select(jobs.c.id)))
    # this turn: the second job is changed as a new attempt would change it, the third as a
    # modify does, and both are streamed (sent, not waited for)
    srv.batch.update_job(third, parameters={"x": 99})  # (JSON: written through SQLAlchemy)
    srv.batch.update_job(second, attempts=4, retries=2)  # streamed: in flight after it
    srv.batch.stream(srv._conn)
    assert srv.batch.streaming
    rows = srv._dispatch_rows([first, second, third])
    assert srv._reader is not None and srv._reader.autocommit  # the first job's read
    assert rows[first].parameters == {"x": 0} and rows[first].attempts == 0
    assert rows[second].attempts == 4 and rows[second].retries == 2
    assert rows[third].parameters == {"x": 99}
    srv.commit()
    # the next turn touched nothing: all three from the second connection, as committed
    assert not srv.batch.touched
    rows = srv._dispatch_rows([first, second, third])
    assert srv._reader is not None and srv._reader.autocommit
    assert rows[second].attempts == 4 and rows[third].parameters == {"x": 99}
    assert rows[first].parameters == {"x": 0}


def test_jobs_added_this_turn_are_leased_as_inserted_equal_to_their_read(srv, monkeypatch):
    """A turn that adds jobs and leases them at once (the usual way under a steady stream of
    submits) takes their rows from its own inserts: no read, and no wait for the writes it
    streamed; each such row equals what the database gives back once they are in."""
    from pilotfish.server.core import _DISPATCH_COLS, _DISPATCH_SELECT
    from pilotfish.server.ops import job_add
    job_add(srv, {"jobs": [
        {"name": "plain", "application": "a", "parameters": {"x": 7}},
        {"name": "full", "application": "a", "parameters": {"x": -1}, "priority": 5,
         "wall_time_minutes": 3, "max_retries": 1, "tags": ["t1"]}]}, 0.0)
    fresh = sorted(srv.batch.fresh)
    assert len(fresh) == 2
    srv.batch.update_job(fresh[1], priority=6)  # changed after it was added: read instead

    def no_read(*a, **k):
        raise AssertionError("a job added this turn was read")
    monkeypatch.setattr(srv.batch, "execute_and_read", no_read)
    rows = srv._dispatch_rows([fresh[0]])
    assert srv.batch.job_inserts  # not even written yet: the row came from the insert
    monkeypatch.undo()
    changed = srv._dispatch_rows([fresh[1]])[fresh[1]]
    assert changed.priority == 6
    srv.commit()
    read = {r.id: r for r in srv.conn.execute(_DISPATCH_SELECT, {"ids": fresh})}
    assert rows[fresh[0]] == tuple(read[fresh[0]])
    assert [type(v) for v in rows[fresh[0]]] == [type(v) for v in read[fresh[0]]]
    # and for a job with every optional column set, from a fresh turn's insert alone
    job_add(srv, {"jobs": [{"name": "again", "application": "a", "parameters": {"x": 3},
                            "priority": 2, "wall_time_minutes": 1, "tags": ["t"]}]}, 0.0)
    (new,) = srv.batch.fresh
    mine = srv.batch.fresh_row(_DISPATCH_COLS, new)
    srv.commit()
    (theirs,) = srv.conn.execute(_DISPATCH_SELECT, {"ids": [new]})
    assert mine == tuple(theirs)
    assert [type(v) for v in mine] == [type(v) for v in theirs]
    assert not srv.batch.fresh
