"""The event stream: increasing ids, pushed to followers, resumed after a reconnect and a server
restart (kill -9) with nothing missed or twice, filters, refused arguments, pruning, parked
requests that hurt no one, roles, and `job wait` on the stream.

Real server processes (SQLite and PostgreSQL), real agents, real sockets.
"""
from __future__ import annotations

import json
import os
import select
import subprocess
import threading
import time

import pytest
import zmq

from conftest import ServerHandle, curve_socket, pilotfish_cmd, run_cli, wait_for
from pilotfish import protocol as P
from pilotfish.client import Client
from pilotfish.errors import Forbidden, Pruned, ValidationError
from pilotfish.server import daemon
from pilotfish.server.events import SCAN_IDS

TRUE = {"name": "true", "executable": "/bin/true", "args": [], "parameters": {}}
FINAL = {"JOB_FINISHED", "FAILED", "USER_KILLED"}
FIELDS = {"id", "time", "kind", "job", "name", "group", "from", "to", "via", "message", "agent",
          "host", "pilot", "site", "workflow", "argo_job_id", "routing_key"}


def all_events(c: Client, since: int = 0, **filters) -> list[dict]:
    out = []
    newest = c.status()["events"]["newest"]
    while since < newest:
        r = c.events(since=since, limit=1000, **filters)
        out += r["events"]
        if r["cursor"] == since:
            break
        since = r["cursor"]
    return out


def add(c: Client, n: int, group: str | None = None, prefix: str = "j") -> list[int]:
    return c.add_jobs([{"name": f"{prefix}{i}", "application": "true",
                        **({"group_identifier": group} if group else {})} for i in range(n)])


class Follower(threading.Thread):
    """Client.follow in a thread of its own (its own Client and socket)."""

    def __init__(self, home, since: int, address: str | None = None, **filters) -> None:
        super().__init__(daemon=True)
        self.client = Client(address, home, timeout=20)
        self.since, self.filters = since, filters
        self.got: list[dict] = []
        self.error: BaseException | None = None
        self.stopping = threading.Event()

    def run(self) -> None:
        try:
            for e in self.client.follow(self.since, **self.filters):
                if self.stopping.is_set():
                    break
                self.got.append(e)
        except BaseException as exc:  # noqa: BLE001 (shown by the test)
            self.error = exc
        finally:
            self.client.close()

    def finish(self, server: ServerHandle) -> None:
        """Stop following: one more event wakes the follower, which then leaves."""
        self.stopping.set()
        if self.is_alive():
            with server.client() as c:
                c.add_pilot(id=f"wake-{time.monotonic_ns()}", nodes=1)
            self.join(30)

    def ids(self) -> list[int]:
        return [e["id"] for e in self.got]


@pytest.fixture(params=["sqlite", "postgres"])
def any_db(request, home):
    if request.param == "sqlite":
        return f"sqlite:///{home / 'pilotfish.db'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def srv(home, any_db):
    s = ServerHandle(home, any_db).start()
    try:
        yield s
    finally:
        s.stop_agents()
        try:
            s.stop()
        except Exception:  # noqa: BLE001 (a test killed it)
            pass


# -- ids and what the stream carries ---------------------------------------------------------------
def test_ids_increase_over_jobs_and_agents(srv, tmp_path):
    with srv.client() as c:
        c.add_app(TRUE)
        ids = add(c, 20, group="g")
        srv.agent(work_root=tmp_path / "work")
        assert c.wait({"ids": ids}, timeout=120) == {"JOB_FINISHED": 20}
        evs = all_events(c)
    got = [e["id"] for e in evs]
    assert got == sorted(set(got)) and got[0] >= 1
    assert all(set(e) == FIELDS for e in evs)
    for j in ids:  # each job: entered READY, ended JOB_FINISHED, in order
        mine = [e for e in evs if e["kind"] == "job" and e["job"] == j]
        assert mine[0]["to"] == "READY" and mine[0]["via"] == ["CREATED"]
        assert mine[-1]["to"] == "JOB_FINISHED" and mine[0]["group"] == "g"
        assert mine[-1]["name"].startswith("j")
    joined = [e for e in evs if e["kind"] == "agent"]
    assert joined and joined[0]["from"] is None and joined[0]["to"] == "ALIVE"
    assert joined[0]["agent"] and joined[0]["host"]
    # the agent leaves: its event comes after everything it ran
    srv.stop_agents()
    with srv.client() as c:
        left = wait_for(lambda: [e for e in all_events(c, got[-1], kind="agent")
                                 if e["to"] == "EXITED"], what="agent left event")
    assert left[0]["from"] == "ALIVE" and left[0]["id"] > got[-1]


def test_plain_and_filtered_reads_agree(srv, tmp_path):
    """An unfiltered read runs the driver's SQL (server/events.py _plain_rows), a filtered one
    SQLAlchemy's: every kind of event comes out the same both ways, in pages of any size."""
    with srv.client() as c:
        c.add_app(TRUE)
        ids = add(c, 6, group="g")
        c.kill_jobs({"ids": [ids[0]]})
        c.remove_jobs({"ids": [ids[1]]})
        c.add_pilot(id="p1", nodes=1, site="s1")
        srv.agent(work_root=tmp_path / "work")
        assert c.wait({"ids": ids[2:]}, timeout=120) == {"JOB_FINISHED": 4}
        plain = all_events(c)
        assert {e["kind"] for e in plain} == {"job", "agent", "pilot"}
        assert plain == all_events(c, kind=["job", "agent", "pilot", "workflow"])
        assert any(e["via"] for e in plain) and any(e["to"] == "REMOVED" for e in plain)
        paged, since = [], 0
        while True:
            r = c.events(since=since, limit=3)
            if not r["events"]:
                break
            assert len(r["events"]) <= 3
            paged += r["events"]
            since = r["cursor"]
        assert paged == plain


# -- pushed, not polled --------------------------------------------------------------------------
def test_a_parked_request_is_answered_by_the_commit(server):
    with server.client() as c:
        c.add_app(TRUE)
        newest = c.status()["events"]["newest"]
        out: dict = {}

        def ask():
            with server.client() as w:
                t = time.monotonic()
                out["r"] = w.events(since=newest, wait=50)
                out["took"] = time.monotonic() - t

        t = threading.Thread(target=ask)
        t.start()
        time.sleep(0.5)  # parked by now (not asserted: only what comes back is)
        [j] = add(c, 1)
        t.join(60)
    assert [e["job"] for e in out["r"]["events"]] == [j]
    assert out["r"]["cursor"] == out["r"]["events"][-1]["id"]
    assert out["took"] < 45  # answered by the event, not by the timeout
    # and a request that finds nothing is answered empty at its timeout
    with server.client() as c:
        r = c.events(since=out["r"]["cursor"], wait=0.3)
    assert r == {"events": [], "cursor": out["r"]["cursor"], "oldest": 1}


def test_follow_gets_events_as_they_commit(server):
    with server.client() as c:
        c.add_app(TRUE)
        f = Follower(server.home, c.status()["events"]["newest"], server.address)
        f.start()
        try:
            ids = []
            for _ in range(5):
                ids += add(c, 3)
                time.sleep(0.05)
            c.kill_jobs({"ids": ids[:4]})
            c.remove_jobs({"ids": [ids[-1]]})
            want = all_events(c)
            wait_for(lambda: len(f.got) >= len(want) + 1, what="the follower to catch up")
            time.sleep(0.3)
        finally:
            f.finish(server)
    assert f.error is None
    # the same events, in order, once; but the removed job's history went with it (the
    # follower saw its READY before the job rm; the REMOVED event says what became of it)
    gone = ids[-1]
    assert [e for e in f.got if e["job"] != gone or e["to"] == "REMOVED"] == want
    assert [e["to"] for e in f.got if e["job"] == gone] == ["READY", "REMOVED"]
    assert [e["to"] for e in f.got[-5:]] == ["USER_KILLED"] * 4 + ["REMOVED"]


# -- resume: reconnect and restart ---------------------------------------------------------------
def test_resume_after_reconnect_and_server_kill9(srv, home):
    with srv.client() as c:
        c.add_app(TRUE)
        add(c, 5)
        start = c.status()["events"]["newest"]
    # a reader that reconnects with its cursor: nothing missed, nothing twice
    seen, cursor = [], 0
    for _ in range(3):
        with srv.client() as c:
            r = c.events(since=cursor, limit=2)
        seen += r["events"]
        cursor = r["cursor"]
    with srv.client() as c:
        seen += c.events(since=cursor)["events"]
        assert seen == all_events(c)
    # a follower (no address given: it finds the restarted server in the home) rides out kill -9
    f = Follower(home, start)
    f.start()
    try:
        with srv.client() as c:
            add(c, 5, prefix="before")
        wait_for(lambda: len(f.got) >= 5, what="events before the kill")
        for round_ in range(2):
            srv.kill9()
            srv.start()
            with srv.client() as c:
                add(c, 5, prefix=f"after{round_}-")
                c.kill_jobs({"state": ["READY"]})
        with srv.client() as c:
            want = all_events(c, start)
        wait_for(lambda: len(f.got) >= len(want), timeout=90,
                 what="the follower after restarts")
        time.sleep(0.3)
    finally:
        f.finish(srv)
    assert f.error is None
    assert f.ids() == [e["id"] for e in want] and f.got == want
    assert len([e for e in want if e["to"] == "USER_KILLED"]) == 20


def test_ids_never_come_back_after_the_newest_rows_go(srv):
    """job rm deletes a job's events (its removal event is newer); a prune may delete the newest
    rows: a restart goes on after the highest id ever given, so no cursor ever skips one."""
    with srv.client() as c:
        c.add_app(TRUE)
        ids = add(c, 3)
        c.remove_jobs({"ids": ids})
        c.call("events_prune", before=time.time() + 1)
        top = c.status()["events"]
    assert top["oldest"] == top["newest"] + 1  # everything pruned
    srv.stop()
    srv.start()
    with srv.client() as c:
        assert c.status()["events"]["newest"] == top["newest"]
        [j] = add(c, 1)
        r = c.events(since=top["newest"])
    assert [(e["id"], e["job"]) for e in r["events"]] == [(top["newest"] + 1, j)]


# -- filters -------------------------------------------------------------------------------------
def test_filters(server, tmp_path):
    with server.client() as c:
        c.add_app(TRUE)
        a = add(c, 3, group="alpha")
        b = add(c, 2, group="beta")
        c.kill_jobs({"ids": [a[0], b[0]]})
        c.remove_jobs({"ids": [b[1]]})
        c.add_pilot(id="p1", nodes=2, site="s1")
        c.update_pilot("p1", state="RUNNING")
        server.agent(work_root=tmp_path / "work")
        wait_for(lambda: all_events(c, kind="agent"), what="the agent's event")
        assert {e["job"] for e in all_events(c, job=a[1])} == {a[1]}
        assert {e["job"] for e in all_events(c, job=[a[1], b[0]])} == {a[1], b[0]}
        alpha = all_events(c, group="alpha")
        assert {e["job"] for e in alpha} == set(a) and all(e["group"] == "alpha" for e in alpha)
        assert {e["job"] for e in all_events(c, group="beta")} == set(b)  # removal included
        killed = all_events(c, state="killed")  # a unique word of USER_KILLED
        assert sorted(e["job"] for e in killed) == sorted([a[0], b[0]])
        # a state passed through (via) matches too
        assert {e["job"] for e in all_events(c, state="CREATED")} == set(a) | {b[0]}
        assert [e["job"] for e in all_events(c, state="REMOVED")] == [b[1]]
        pilots = all_events(c, kind="pilot")
        assert [(e["pilot"], e["from"], e["to"]) for e in pilots] == [
            ("p1", None, "QUEUED"), ("p1", "QUEUED", "RUNNING")]
        assert all(e["kind"] == "agent" for e in all_events(c, kind="agent"))
        both = all_events(c, kind=["pilot", "agent"])
        assert {e["kind"] for e in both} == {"pilot", "agent"}
        assert [e["job"] for e in all_events(c, group="beta", state="killed")] == [b[0]]
        assert all_events(c, group="nobody") == []


def test_a_filtered_reader_is_never_stuck_on_a_long_history(server):
    """A rare state over many events: each request reads a bounded window and says where to go
    on; the reader gets there in several short requests."""
    with server.client() as c:
        c.add_app(TRUE)
        ids = add(c, SCAN_IDS + 100)
        c.kill_jobs({"ids": [ids[-1]]})
        r = c.events(since=0, state="USER_KILLED")
        assert r["events"] == [] and 0 < r["cursor"] < ids[-1]  # not there yet: go on
        assert [e["job"] for e in all_events(c, state="USER_KILLED")] == [ids[-1]]


# -- bad arguments -------------------------------------------------------------------------------
BAD = [
    ({"since": -1}, "since"), ({"since": 2**64 - 1}, "since"), ({"since": "5"}, "since"),
    ({"since": 1.5}, "since"), ({"since": True}, "since"), ({"limit": 0}, "limit"),
    ({"limit": 10_001}, "limit"), ({"limit": [1]}, "limit"), ({"wait": -1}, "wait"),
    ({"wait": 61}, "wait"), ({"wait": float("nan")}, "wait"), ({"wait": float("inf")}, "wait"),
    ({"wait": "1"}, "wait"), ({"job": 0}, "job"), ({"job": "1"}, "job"),
    ({"job": list(range(1, 1002))}, "job"), ({"job": [1, -2]}, "job"), ({"job": []}, "job"),
    ({"group": ""}, "group"), ({"group": "g" * 129}, "group"), ({"group": 5}, "group"),
    ({"group": "a\x00b"}, "group"), ({"state": "nope"}, "state"), ({"state": 7}, "state"),
    ({"state": ["READY"] * 65}, "state"), ({"kind": "jobs"}, "kind"), ({"kind": [None]}, "kind"),
    ({"colour": "red"}, "unknown argument"), ({"since": 10**6}, "past the newest"),
]


def test_bad_arguments_are_refused_alone(server):
    with server.client() as c:
        c.add_app(TRUE)
        add(c, 2)
        newest = c.status()["events"]["newest"]
    # a parked request of someone else, which no refusal may disturb
    out: dict = {}

    def park():
        with server.client() as w:
            out["r"] = w.events(since=newest, wait=50)

    t = threading.Thread(target=park)
    t.start()
    with server.client() as c:
        for args, words in BAD:
            with pytest.raises(ValidationError) as exc:
                c.call("events", **args)
            msg = str(exc.value)
            assert words in msg and "\n" not in msg and len(msg) < 2000, (args, msg)
        with pytest.raises(ValidationError, match="past 64 bits"):  # refused before it is sent
            c.events(since=2**70)
        for wait in (float("nan"), float("inf"), 1e308, -1, "5"):  # the server's refusal, as is
            with pytest.raises(ValidationError, match="argument 'wait'"):
                c.events(wait=wait)
        assert c.ping()["version"]
        assert len(c.events()["events"]) == 2
        [j] = add(c, 1)
    t.join(60)
    assert [e["job"] for e in out["r"]["events"]] == [j]


# -- pruning -------------------------------------------------------------------------------------
def test_a_pruned_cursor_gets_a_clear_error(server):
    with server.client() as c:
        c.add_app(TRUE)
        ids = add(c, 4)
        c.kill_jobs({"ids": ids})
        newest = c.status()["events"]["newest"]
    r = run_cli(server.home, "events", "prune", "--older-than", "0s", "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["pruned"] == 4 and rep["oldest"] == newest + 1  # each job keeps its last event
    with server.client() as c:
        with pytest.raises(Pruned, match=f"events before {newest + 1} were pruned"):
            c.events(since=0)
        with pytest.raises(Pruned):
            next(c.follow(since=3))
        assert c.events(since=newest) == {"events": [], "cursor": newest, "oldest": newest + 1}
        assert [e["to_state"] for e in c.job(ids[0])["events"]] == ["USER_KILLED"]
    r = run_cli(server.home, "events", "--since", "0")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "were pruned" in r.stderr
    # gc's pruning moves the mark too: the events it drops are never skipped silently
    with server.client() as c:
        more = add(c, 2)
        c.kill_jobs({"ids": more})
        mark = c.status()["events"]["newest"]
        time.sleep(0.05)
        c.call("gc", before=time.time(), prune=True)
        with pytest.raises(Pruned):
            c.events(since=mark - 4)
        assert c.status()["events"]["oldest"] > mark - 4


def test_the_server_prunes_by_itself(home):
    """server start --events-keep: old events go as the server runs, in bounded chunks."""
    s = ServerHandle(home, f"sqlite:///{home / 'pilotfish.db'}")
    s.info = daemon.start_background(home, s.db_url, "tcp://127.0.0.1:*", 1.0,
                                     events_keep="1s")
    try:
        with s.client() as c:
            c.add_app(TRUE)
            ids = add(c, 3)
            c.kill_jobs({"ids": ids})
            wait_for(lambda: c.status()["events"]["oldest"] > 1, timeout=60,
                     what="the server's own pruning")
            with pytest.raises(Pruned):
                c.events(since=0)
            assert c.job(ids[0])["events"][-1]["to_state"] == "USER_KILLED"  # the last is kept
        assert "events older than 1 s; the stream starts at id" in \
            (home / "server.log").read_text()
    finally:
        s.stop()


def test_a_bad_keep_duration_stops_the_start(home):
    r = run_cli(home, "server", "start", "--events-keep", "30x")
    assert r.returncode == 1 and "duration '30x' must look like 7d" in r.stderr
    assert r.stderr.count("\n") == 1 and not (home / "server.json").exists()


# -- many parked requests ------------------------------------------------------------------------
def test_many_parked_requests_block_no_one(server):
    with server.client() as c:
        c.add_app(TRUE)
        newest = c.status()["events"]["newest"]
    socks = []
    ctx = zmq.Context.instance()
    n_socks, per_sock = 5, 200
    try:
        for _ in range(n_socks):
            s = curve_socket(ctx.socket(zmq.DEALER), server.address)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(server.address)
            socks.append(s)
        for s in socks:
            for rid in range(per_sock):
                s.send(P.encode(P.REQUEST, rid=rid + 1, op="events",
                                args={"since": newest, "wait": 55}))
        time.sleep(0.5)
        # 1,000 parked requests: every other request is answered as usual
        with server.client(timeout=20) as c:
            for _ in range(20):
                assert c.ping()
            [j] = add(c, 1)
            assert c.jobs()[0]["id"] == j
            assert c.status()["counts"] == {"READY": 1}
        # and that one event answers all of them
        got = 0
        deadline = time.monotonic() + 60
        while got < n_socks * per_sock and time.monotonic() < deadline:
            for s in socks:
                while s.poll(10):
                    kind, m = P.decode(s.recv(), (P.REPLY, P.ERROR))
                    assert kind == P.REPLY and m["ok"], m
                    assert [e["job"] for e in m["result"]["events"]] == [j]
                    got += 1
        assert got == n_socks * per_sock
    finally:
        for s in socks:
            s.close(linger=0)


# -- roles ---------------------------------------------------------------------------------------
def test_readers_read_agents_cannot_admins_prune(server):
    for name, role in (("rd", "reader"), ("ag", "agent"), ("sub", "submitter")):
        run_cli(server.home, "keys", "init", "--client", name, "--role", role, check=True)

    def as_key(name):
        return Client(server.address, server.home, timeout=15,
                      client_key=server.home / "keys" / f"{name}.key_secret")

    with server.client() as c:
        c.add_app(TRUE)
        add(c, 2)
    with as_key("rd") as c:
        assert len(c.events(wait=0.1)["events"]) == 2
        with pytest.raises(Forbidden, match="may not events_prune"):
            c.call("events_prune", before=time.time())
    with as_key("sub") as c:
        with pytest.raises(Forbidden, match="needs the role admin"):
            c.call("events_prune", before=time.time())
    with as_key("ag") as c:
        with pytest.raises(Forbidden, match="may not events"):
            c.events()
    env = dict(os.environ, PILOTFISH_CLIENT_KEY=str(server.home / "keys" / "rd.key_secret"))
    r = subprocess.run(pilotfish_cmd(server.home, "events", "prune", "--older-than", "1d"),
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 1 and "may not events_prune" in r.stderr


# -- the CLI -------------------------------------------------------------------------------------
def test_cli_lines_json_and_follow(server):
    with server.client() as c:
        c.add_app(TRUE)
        [a, b] = add(c, 2, group="grp")
        c.kill_jobs({"ids": [a]})
    r = run_cli(server.home, "events", check=True)
    lines = r.stdout.splitlines()
    assert len(lines) == 3 and f"job {a} j0 [grp]" in lines[0] and "- -> READY (via CREATED)" \
        in lines[0] and "READY -> USER_KILLED: killed by user" in lines[2], r.stdout
    assert lines[0][:4].isdigit() and "#1 " in lines[0]  # a readable time, then the id
    r = run_cli(server.home, "events", "--json", "--state", "killed", check=True)
    [one] = [json.loads(x) for x in r.stdout.splitlines()]
    assert one["job"] == a and one["to"] == "USER_KILLED"
    r = run_cli(server.home, "events", "--since", "2", "--job", str(a), "--json", check=True)
    assert [json.loads(x)["id"] for x in r.stdout.splitlines()] == [3]
    p = subprocess.Popen(pilotfish_cmd(server.home, "events", "-f", "--since", "3", "--json"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with server.client() as c:
            c.kill_jobs({"ids": [b]})
        assert select.select([p.stdout], [], [], 60)[0], "no line from events -f"
        line = p.stdout.readline()
        assert json.loads(line)["to"] == "USER_KILLED" and json.loads(line)["job"] == b
    finally:
        p.terminate()
        p.wait(15)
    r = run_cli(server.home, "events", "--kind", "nope")
    assert r.returncode == 2 and "nope" in r.stderr


# -- job wait on the stream ----------------------------------------------------------------------
def test_job_wait_returns_on_the_stream(server, tmp_path):
    with server.client() as c:
        c.add_app(TRUE)
        ids = add(c, 30, group="w")
        held = c.add_jobs([{"name": "held", "application": "true", "site": "nowhere"}])
        with pytest.raises(TimeoutError, match="not final after 0.5 s"):
            c.wait({"ids": held}, timeout=0.5)
    server.agent(work_root=tmp_path / "work")
    r = run_cli(server.home, "job", "wait", "--group", "w", "--json", timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"JOB_FINISHED": 30}
    with server.client() as c:
        assert c.wait({"ids": ids}) == {"JOB_FINISHED": 30}
        # a wait ended by the agent or by a kill from elsewhere, whichever comes first
        more = add(c, 3)
        out: dict = {}

        def wait():
            with server.client() as w:
                out["counts"] = w.wait({"ids": more}, timeout=60)

        # the agent runs them at once; whatever is left is killed
        t = threading.Thread(target=wait)
        t.start()
        c.kill_jobs({"ids": more})
        t.join(70)
    assert sum(out["counts"].values()) == 3 and set(out["counts"]) <= FINAL
    r = run_cli(server.home, "job", "wait", str(held[0]), "--timeout", "0.5", "-q")
    assert r.returncode == 2 and "not final after 0.5 s" in r.stderr


def test_wait_sees_jobs_removed_under_it(server):
    with server.client() as c:
        c.add_app(TRUE)
        ids = add(c, 2)
        out: dict = {}

        def wait():
            with server.client() as w:
                out["counts"] = w.wait({"ids": ids}, timeout=60)
        t = threading.Thread(target=wait)
        t.start()
        time.sleep(0.5)
        c.kill_jobs({"ids": [ids[0]]})
        c.remove_jobs({"ids": [ids[1]]})
        t.join(70)
    assert out["counts"] == {"USER_KILLED": 1}
