"""server/store.py Batch: a turn with thousands of changes writes exactly the same rows on
SQLite (row-by-row executemany) and PostgreSQL (new jobs by COPY, one ``UPDATE ... FROM
unnest`` per run of updates, one ``INSERT ... SELECT FROM unnest`` for the events, all in one
pipeline; or sent while the turn is recorded, Batch.stream)."""
from __future__ import annotations

import time

import pytest
from sqlalchemy import select

from pilotfish.server import core, db, store
from pilotfish.server.states import State as S
from pilotfish.server.store import Batch

N = 2000
DONE = [S.STAGED_IN, S.PREPROCESSED, S.RUNNING, S.EXECUTION_FINISHED, S.POSTPROCESSED,
        S.STAGED_OUT, S.JOB_FINISHED]
FAIL = [S.STAGED_IN, S.PREPROCESSED, S.RUNNING, S.RUN_FAILED, S.RESTART_READY]


def job_row(i: int, now: float) -> dict:
    return {"id": i, "name": f"j{i}", "description": f"tab\t back\\slash \\N\nline {i}",
            "app_id": 1, "num_nodes": 1,
            "processes_per_node": 1, "cpus_per_process": 1, "gpus_per_process": 0,
            "parameters": {"x": i, "s": "it's \"q\""}, "tags": "", "priority": i % 3,
            "max_retries": 2, "retries": 0, "attempts": 0, "state_time": now,
            "created": now, "workdir": f"w/{i}"}


def agent_row(aid: str, now: float) -> dict:
    return {"id": aid, "host": "h", "pid": 1, "cores": 4, "gpus": 0, "memory": 1 << 40,
            "started": now, "last_seen": now, "state": "ALIVE", "tasks_done": 0}


def turns(engine, stream_every: int = 0) -> dict[str, list[tuple]]:
    """Three turns through one Batch: add N jobs and two agents; lease all, run half to the
    end (a job updated twice in one run of updates, ints where floats go, a job's second
    attempt archived); then every table's rows, sorted. ``stream_every``: the writes are
    also streamed (Batch.stream) after every that many changes, as the server does on
    PostgreSQL while it handles a turn (a no-op on SQLite)."""
    b = Batch()
    if stream_every:
        record = b.update_job

        def update_job(job_id, **cols):  # every change of a job's row comes through here
            record(job_id, **cols)
            update_job.n += 1
            if not update_job.n % stream_every:
                b.stream(conn)
                update_job.sent += b.streaming
        update_job.n = update_job.sent = 0
        b.update_job = update_job
    now = 1_700_000_000.25
    with engine.connect() as conn:
        # new jobs: on PostgreSQL one COPY per turn (an int where a float goes)
        for i in range(1, N + 1):
            b.insert_job(job_row(i, now if i % 3 else int(now)), [S.CREATED, S.READY], None)
        b.agent_inserts += [agent_row("a1", now), agent_row("a2", now)]
        b.execute(conn)
        conn.commit()
        # turn 2: every job leased (an update of its row), half of them through to the end as
        # an agent's update does it (the whole path, the attempt's end in the same update)
        for i in range(1, N + 1):
            b.lease_job(i, 1, "a1" if i % 2 else "a2", None, now + 1)
        for i in range(1, N + 1, 2):
            b.transition(i, S.READY, DONE, now + 2, None if i % 4 else "done: 'ok'",
                         started=now + 1, ended=int(now) + 3, exit_code=0, agent=None,
                         run_state=S.JOB_FINISHED, run_message=None)  # a str subclass
        for i in range(1, N + 1, 2):
            b.update_job(i, run_message="first")
            b.update_job(i, run_message=f"last {i}")  # twice in one run: the last wins
        b.update_agent("a1", last_seen=now + 2, tasks_done=N // 2)
        b.update_agent("a1", last_seen=int(now) + 3, tasks_done=N // 2)
        b.update_agent("a2", last_seen=now + 2.5, tasks_done=0)
        b.server_event("agent", "ALIVE", now + 2, agent="a2", host="h")
        b.execute(conn)
        conn.commit()
        # turn 3: the other half fail and are leased again (attempt 2: attempt 1 archived,
        # with the agent's host from its row), one of them ended as lost by hand
        for i in range(2, N + 1, 2):
            b.transition(i, S.READY, FAIL, now + 3, "exit 1", ended=now + 3, exit_code=1,
                         agent=None, retries=1, run_state="RUN_FAILED", run_message="exit 1")
        b.end_attempt(2, "LOST", now + 3, "gone")
        # as the server's dispatch before it leases: the writes so far, then the rows to
        # lease read in the same transaction (on PostgreSQL in the same pipeline)
        read = b.execute_and_read(conn, core._DISPATCH_SELECT, core._DISPATCH_COLS,
                                  list(range(2, N + 1, 2)) + [N + 7])
        assert len(read) == N // 2 and read[2].state == "RESTART_READY"
        assert read[4].parameters == {"x": 4, "s": "it's \"q\""}
        for i in range(2, N + 1, 2):
            b.lease_job(i, 2, "a1", '["n1", "n2"]', now + 4)
        b.execute(conn, commit=True)  # as the server's commit(): PostgreSQL's in the pipeline
        conn.commit()
    out = {"read": sorted(tuple(r) for r in read.values())}
    with engine.connect() as conn:  # another connection: what was committed
        for t in (db.jobs, db.job_events, db.job_attempts, db.agents, db.server_events):
            out[t.name] = sorted(tuple(r) for r in conn.execute(select(t)))
    assert b.counts == {"READY": 0, "JOB_FINISHED": N // 2, "RESTART_READY": N // 2}
    if stream_every and engine.dialect.name == "postgresql":
        assert b.update_job.sent == b.update_job.n // stream_every  # each piece went out
    return out


@pytest.mark.parametrize("stream_every", [0, 7])
def test_a_big_turn_writes_the_same_rows_on_sqlite_and_postgresql(home, pg_url, stream_every,
                                                                    monkeypatch):
    """~2 s: the same three turns (2,000 jobs, ~10,000 row changes) on both databases; with
    ``stream_every``, PostgreSQL's are also sent in pieces of 7 changes while the turn is
    recorded (runs split anywhere, a row's two updates in two statements: the last wins)."""
    monkeypatch.setattr(store, "STREAM_MIN", 1)  # every piece goes out, however small
    lite = turns(db.make_engine(f"sqlite:///{home / 'x.db'}"))
    pg_engine = db.make_engine(pg_url)
    try:
        pg = turns(pg_engine, stream_every)
    finally:
        pg_engine.dispose()
    for name, rows in lite.items():
        assert pg[name] == rows, name
    jobs = {r[0]: r for r in lite["jobs"]}
    assert len(jobs) == N and len(lite["job_events"]) == N * 2
    assert len(lite["job_attempts"]) == N // 2  # every even job's first attempt
    assert len(lite["server_events"]) == 1
    cols = [c.name for c in db.jobs.columns]
    assert jobs[3][cols.index("run_message")] == "last 3"
    assert jobs[1][cols.index("run_state")] == "JOB_FINISHED"
    assert jobs[2][cols.index("attempts")] == 2 and jobs[2][cols.index("run_state")] is None
    acols = [c.name for c in db.job_attempts.columns]
    first = {r[0]: dict(zip(acols, r)) for r in lite["job_attempts"]}
    assert first[2]["state"] == "LOST" and first[2]["host"] == "h"
    assert first[4]["state"] == "RUN_FAILED" and first[4]["message"] == "exit 1"


def test_a_bad_row_fails_the_whole_turn_on_postgresql(pg_url):
    """An error anywhere in the pipelined statements raises and nothing of the turn stays."""
    engine = db.make_engine(pg_url)
    try:
        b = Batch()
        with engine.connect() as conn:
            b.insert_job(job_row(1, 1.0), [S.CREATED, S.READY], None)
            b.execute(conn)
            conn.commit()
            b.lease_job(1, 1, "a1", None, 2.0)
            b.transition(1, S.READY, DONE, 2.0)
            b.update_job(1, exit_code=1 << 70)  # past 64 bits: PostgreSQL refuses it
            with pytest.raises(Exception):
                b.execute(conn, commit=True)  # the COMMIT in the pipeline is skipped too
                conn.commit()
            conn.rollback()
            assert conn.execute(select(db.jobs.c.state)).scalar_one() == "READY"
            assert len(conn.execute(select(db.job_events)).all()) == 1
    finally:
        engine.dispose()


def test_a_bad_streamed_row_fails_the_turn_at_the_next_use_of_the_connection(pg_url,
                                                                             monkeypatch):
    """Streamed writes (Batch.stream) are not waited for: PostgreSQL's refusal of one raises
    when the connection is next used (the turn's read or commit, or whatever the server's
    ``conn`` is asked for), nothing of the turn stays, and the connection works after the
    rollback (pipeline mode left). (Fewer rows than STREAM_MIN wait for the next write.)"""
    engine = db.make_engine(pg_url)
    try:
        b = Batch()
        with engine.connect() as conn:
            b.insert_job(job_row(1, 1.0), [S.CREATED, S.READY], None)
            b.insert_job(job_row(2, 1.0), [S.CREATED, S.READY], None)
            b.execute(conn)
            conn.commit()
            b.lease_job(1, 1, "a1", None, 2.0)
            b.stream(conn)  # one row: held back
            assert not b.streaming and b
            monkeypatch.setattr(store, "STREAM_MIN", 1)
            b.stream(conn)  # good: sent, not waited for
            assert b.streaming
            b.update_job(1, exit_code=1 << 70)  # past 64 bits: PostgreSQL refuses it
            with pytest.raises(Exception):
                b.stream(conn)
                time.sleep(0.3)  # its error is back before the next statement goes out,
                b.update_job(2, attempts=1)
                b.stream(conn)   # which raises it (else the settle does)
                b.settle()
            assert not b.streaming  # pipeline mode left either way
            conn.rollback()
            assert [r.attempts for r in conn.execute(select(db.jobs.c.attempts))] == [0, 0]
            # the next turn on the same connection: streamed, read back, committed
            b.lease_job(2, 1, "a1", None, 3.0)
            b.transition(2, S.READY, DONE, 3.0)
            b.stream(conn)
            read = b.execute_and_read(conn, core._DISPATCH_SELECT, core._DISPATCH_COLS, [2])
            assert read[2].state == "JOB_FINISHED" and not b.streaming
            b.execute(conn, commit=True)
            conn.commit()
        with engine.connect() as conn:
            assert dict(conn.execute(select(db.jobs.c.id, db.jobs.c.state)).all()) == {
                1: "READY", 2: "JOB_FINISHED"}
    finally:
        engine.dispose()


def test_a_lease_is_a_hot_update_on_postgresql(pg_url):
    """Schema 17's fillfactor: a lease changes no indexed column, and its row's page has room
    for the new version, so PostgreSQL updates it HOT (no new entry in any index of jobs),
    also when a turn leases every job of a page. Counted by PostgreSQL for this transaction."""
    from sqlalchemy import text
    engine = db.make_engine(pg_url)
    try:
        b = Batch()
        with engine.connect() as conn:
            for i in range(1, 501):
                b.insert_job(job_row(i, 1.0), [S.CREATED, S.READY], None)
            b.execute(conn, commit=True)
            conn.commit()
            for i in range(1, 501):
                b.lease_job(i, 1, f"agent-{i % 7}", None, 2.0)
            b.execute(conn)
            updated, hot = conn.execute(text(
                "SELECT pg_stat_get_xact_tuples_updated('jobs'::regclass), "
                "pg_stat_get_xact_tuples_hot_updated('jobs'::regclass)")).one()
            conn.rollback()
        assert updated == 500 and hot >= 450, (updated, hot)
    finally:
        engine.dispose()


def test_postgresql_keeps_synchronous_commit_unless_the_url_says_otherwise(pg_url):
    """Acknowledged means durable on PostgreSQL too (synchronous_commit on, its default); a URL
    may choose speed instead."""
    from sqlalchemy import text
    for url, want in ((pg_url, "on"), (pg_url + "?options=-csynchronous_commit%3Doff", "off")):
        engine = db.make_engine(url)
        try:
            with engine.connect() as conn:
                assert conn.execute(text("SHOW synchronous_commit")).scalar_one() == want
        finally:
            engine.dispose()
