"""The server's SQLite connection in a writer process of its own (server/sqlite_remote.py).

Against the real thing: a real server process, whose writer is a real child process, and the
driver used directly on a SQLite file. What is checked: writes sent without waiting are in
order and in the turn's transaction; an error among them fails the next statement that waits
and is rolled back with the turn; a writer that dies takes no acknowledged work with it (the
server starts another and goes on); the writer outlives a signal to the server's process
group until the server's last commit.
"""
from __future__ import annotations

import os
import signal
import sqlite3
import time

import psutil
import pytest
from sqlalchemy import create_engine, text

from pilotfish.server import sqlite_remote
from pilotfish.server.db import make_engine

from conftest import wait_for


def gone(pid: int) -> bool:
    """Exited (a zombie its parent has not reaped yet counts)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def writers(pid: int) -> list[psutil.Process]:
    return [k for k in psutil.Process(pid).children()
            if any("sqlite_writer_main" in a for a in k.cmdline())]


@pytest.fixture
def dbfile(tmp_path):
    url = f"sqlite:///{tmp_path / 'w.db'}"
    make_engine(url).dispose()  # made at the current schema, as the server does first
    return tmp_path / "w.db", url


@pytest.fixture
def remote(dbfile):
    """A writer process's connection to a fresh database, with a table ``t`` committed (``v``
    a column of any type); closed after the test."""
    c = sqlite_remote.RemoteConnection(str(dbfile[0]))
    c.cursor().execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v)")
    c.commit()
    yield c
    c.close()


def test_writes_sent_without_waiting_are_in_order_in_one_transaction(dbfile, remote):
    c, cur = remote, remote.cursor()
    cur.executemany("INSERT INTO t VALUES (?, ?)", [(i, f"v{i}") for i in range(1000)])
    cur.executemany("UPDATE t SET v = ? WHERE id = ?", [("new", 7)])
    # not committed: another connection sees nothing yet
    other = sqlite3.connect(dbfile[0])
    assert other.execute("SELECT count(*) FROM t").fetchone() == (0,)
    # a read on the same connection sees both, in order
    assert cur.execute("SELECT count(*), max(v) FROM t").fetchall() == [(1000, "v999")]
    assert cur.execute("SELECT v FROM t WHERE id = 7").fetchone() == ("new",)
    c.rollback()
    assert cur.execute("SELECT count(*) FROM t").fetchone() == (0,)
    cur.executemany("INSERT INTO t VALUES (?, ?)", [(1, b"\x00\xff"), (2, None)])
    c.commit()
    assert other.execute("SELECT v FROM t ORDER BY id").fetchall() == [(b"\x00\xff",), (None,)]
    other.close()


def test_an_error_among_unanswered_writes_fails_the_next_wait_and_nothing_of_the_turn_stays(
        remote):
    c, cur = remote, remote.cursor()
    cur.executemany("INSERT INTO t (id) VALUES (?)", [(1,), (2,)])
    cur.executemany("INSERT INTO t (id) VALUES (?)", [(2,)])  # a duplicate key: not raised here
    cur.executemany("INSERT INTO t (id) VALUES (?)", [(3,)])  # skipped after the error
    with pytest.raises(sqlite3.IntegrityError):
        c.commit()
    # until the rollback, nothing more may be committed (the turn's first writes with it)
    with pytest.raises(sqlite3.IntegrityError):
        c.commit()
    with pytest.raises(sqlite3.IntegrityError):
        cur.execute("SELECT id FROM t")
    c.rollback()  # as the server does after a failed turn
    assert cur.execute("SELECT id FROM t").fetchall() == []
    cur.executemany("INSERT INTO t (id) VALUES (?)", [(4,)])
    c.commit()
    assert cur.execute("SELECT id FROM t").fetchall() == [(4,)]
    c.close()
    with pytest.raises(sqlite3.ProgrammingError):
        c.cursor().execute("SELECT 1")


def test_sqlalchemy_sees_a_driver_it_knows(dbfile):
    """Through SQLAlchemy, as the server uses it: results, rowcount, lastrowid, the driver's
    own error classes, and a connection that goes with its writer when closed."""
    _, url = dbfile
    eng = sqlite_remote.engine(url)
    with eng.connect() as conn:
        conn.execute(text("CREATE TABLE u (id INTEGER PRIMARY KEY, name TEXT UNIQUE)"))
        r = conn.execute(text("INSERT INTO u (name) VALUES ('a')"))
        assert r.lastrowid == 1
        conn.execute(text("INSERT INTO u (name) VALUES (:n)"), [{"n": "b"}, {"n": "c"}])
        assert conn.execute(text("UPDATE u SET name = name || '!' WHERE id > 1")).rowcount == 2
        assert [tuple(r) for r in conn.execute(text("SELECT * FROM u ORDER BY id"))] == [
            (1, "a"), (2, "b!"), (3, "c!")]
        from sqlalchemy.exc import IntegrityError
        with pytest.raises(IntegrityError):
            conn.execute(text("INSERT INTO u (name) VALUES ('a')"))
        conn.rollback()
        proc = conn.connection.dbapi_connection._proc
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
    assert proc.wait(10) == 0  # closed with the connection
    eng.dispose()
    assert create_engine(url).connect().execute(text("SELECT count(*) FROM u")).scalar() == 0


def test_the_server_writes_through_its_writer_and_survives_its_death(server):
    """A server on SQLite has one writer child; kill -9 it in the middle of a stream of
    submits: the turn that needed it fails and is handled again with a new writer, every job
    acknowledged is there, and the server goes on."""
    (w,) = wait_for(lambda: writers(server.pid), 10, what="the writer process")
    ids = []
    with server.client() as c:
        c.add_app({"name": "noop", "executable": "/bin/true"})
        ids += c.add_jobs([{"name": f"a{i}", "application": "noop"} for i in range(200)])
        os.kill(w.pid, signal.SIGKILL)
        wait_for(lambda: gone(w.pid), 10, what="the writer to die")
        for k in range(5):
            ids += c.add_jobs([{"name": f"b{k}.{i}", "application": "noop"}
                               for i in range(100)])
        (w2,) = wait_for(lambda: writers(server.pid), 10, what="a new writer")
        assert w2.pid != w.pid
        assert c.status()["counts"].get("READY") == 700
        listed = {j["id"] for j in c.jobs(limit=1000)}
    assert set(ids) <= listed and len(ids) == 700
    server.stop()
    assert gone(w2.pid)


def test_a_signal_to_the_process_group_leaves_the_writer_to_the_server(server):
    """Ctrl-C or a TERM to the server's whole process group: the writer stays until the
    server has said it is stopping and committed its last turn, then goes with it."""
    (w,) = wait_for(lambda: writers(server.pid), 10, what="the writer process")
    with server.client() as c:
        c.add_app({"name": "noop", "executable": "/bin/true"})
        c.add_jobs([{"name": "x", "application": "noop"}])
    os.kill(w.pid, signal.SIGTERM)  # as the group signal reaches it, before the server
    os.kill(w.pid, signal.SIGINT)
    time.sleep(0.3)
    assert w.is_running() and w.status() != psutil.STATUS_ZOMBIE
    os.kill(server.pid, signal.SIGTERM)
    wait_for(lambda: gone(server.pid), 15, what="the server to stop")
    wait_for(lambda: gone(w.pid), 10, what="the writer to stop")
    log = (server.home / "server.log").read_text()
    assert "database write failed" not in log and "writer process is gone" not in log
    assert "stopped" in log


def test_without_the_writer_process_the_server_writes_in_its_own(home, monkeypatch):
    """PILOTFISH_SQLITE_WRITER=off keeps the connection in the server's process (the path of
    a server before the writer process): no child, and jobs run to the end as before."""
    from conftest import ServerHandle
    monkeypatch.setenv("PILOTFISH_SQLITE_WRITER", "off")
    s = ServerHandle(home, f"sqlite:///{home / 'pilotfish.db'}").start()
    try:
        time.sleep(0.3)
        assert writers(s.pid) == []
        with s.client() as c:
            c.add_app({"name": "noop", "executable": "/bin/true"})
            c.add_jobs([{"name": f"j{i}", "application": "noop"} for i in range(20)])
            s.agent()
            wait_for(lambda: c.counts().get("JOB_FINISHED") == 20, 30, what="20 jobs done")
    finally:
        s.stop_agents()
        s.stop()
