"""Hostile and malformed input: every bad message gets a clear refusal, changes nothing, and the
server keeps serving (real server processes, raw pyzmq DEALER sockets, real agents; no mocks).

Most cases share one module-scoped server, which is itself part of the claim: the same process
must survive the whole barrage. Tests that need agents or a clean queue use the `server` fixture.
"""
from __future__ import annotations

import os
import random
import re
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import msgpack
import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from conftest import ServerHandle, curve_socket, run_cli, wait_for
from pilotfish import protocol as P
from pilotfish.errors import (IllegalTransition, NotFound, PilotfishError, ProtocolError,
                              ValidationError)
from pilotfish.server.apps import SAFE_STRING as SAFE_DEFAULT
from pilotfish.server.apps import SAFE_STRING_WORDS as SAFE_WORDS

APPS = [
    {"name": "echo", "executable": "/bin/echo", "args": ["{msg}"],
     "parameters": {"msg": {"type": "str"}}},
    {"name": "typed", "executable": "/bin/echo", "args": ["{n}", "{x}", "{p}", "{c}"],
     "parameters": {"n": {"type": "int", "min": 0, "max": 10, "default": 1},
                    "x": {"type": "float", "default": 0.5},
                    "p": {"type": "path", "default": "in.dat"},
                    "c": {"type": "choice", "choices": ["a", "b"], "default": "a"}}},
    {"name": "anything", "executable": "/bin/echo", "args": ["{v}"],
     "parameters": {"v": {"type": "str", "pattern": "(?s).*"}}},
]


# -- helpers ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """One real server shared by the cheap cases of this module (with the APPS registered)."""
    home = tmp_path_factory.mktemp("bad_input") / "home"
    home.mkdir()
    s = ServerHandle(home, f"sqlite:///{home / 'pilotfish.db'}").start()
    try:
        with s.client(timeout=10) as c:
            for spec in APPS:
                c.add_app(spec)
        yield s
    finally:
        s.stop()


def dealer(address: str, identity: bytes | None = None) -> zmq.Socket:
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    if identity is not None:
        s.setsockopt(zmq.ROUTING_ID, identity)
    curve_socket(s, address)
    s.connect(address)
    return s


def recv_msg(s: zmq.Socket, timeout: float = 5.0) -> tuple[str, dict] | None:
    """The next message from the server, checked against the protocol's own schemas."""
    if not s.poll(int(timeout * 1000)):
        return None
    frames = s.recv_multipart()
    assert len(frames) == 1, f"server sent {len(frames)} frames"
    return P.decode(frames[0], (P.ERROR, P.REPLY, P.WELCOME, P.TASKS, P.CANCEL))


def exchange(address: str, frames: list[bytes], timeout: float = 5.0,
             identity: bytes | None = None) -> tuple[str, dict] | None:
    """Send raw frames on a fresh DEALER and return the one answer (or None)."""
    s = dealer(address, identity)
    try:
        s.send_multipart(frames)
        return recv_msg(s, timeout)
    finally:
        s.close(linger=0)


def pack(**fields) -> bytes:
    return msgpack.packb(fields, use_bin_type=True)


def req(**fields) -> bytes:
    return pack(v=P.VERSION, k=P.REQUEST, **fields)


def snapshot(c) -> dict:
    """Everything a refused request must leave alone: job counts, every job row, every app."""
    return {"counts": c.counts(), "jobs": c.jobs(limit=0), "apps": c.apps()}


@contextmanager
def unchanged(server: ServerHandle):
    """Assert the database is the same afterwards and that the server still answers a ping."""
    with server.client(timeout=10) as c:
        before = snapshot(c)
    yield
    with server.client(timeout=10) as c:
        assert c.ping()["version"]
        assert snapshot(c) == before


def assert_error_reply(answer, pattern: str) -> str:
    assert answer is not None, "no answer from the server"
    kind, m = answer
    assert kind == P.ERROR, f"expected an error message, got {kind}: {m}"
    text = m["error"]
    assert text and "\n" not in text, f"error is not one line: {text!r}"
    assert re.search(pattern, text), f"{text!r} does not match {pattern!r}"
    assert "internal server error" not in text
    return text


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert text and "\n" not in text, f"error is not one line: {text!r}"
    assert "internal server error" not in text, text
    return text


HELLO = dict(host="evil-host", pid=4242, site=None, pilot=None, cores=[0], gpus=[],
             memory=2**30, time_left=None, running=[], ack=0)
NO_DEMAND = {"cores": 0, "gpus": 0, "max_cores": 1, "max_gpus": 0, "time_left": None}


def _random(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


_PING = P.encode(P.REQUEST, rid=1, op="ping", args={})

# (frames after the routing id, regex the one-line error must match)
RAW_CASES = [
    pytest.param([_random(1, 1)], r".", id="random-1-byte"),
    pytest.param([_random(17, 2)], r".", id="random-17-bytes"),
    pytest.param([_random(4096, 3)], r".", id="random-4k"),
    pytest.param([b"\xc1" + _random(64, 4)], r"undecodable", id="msgpack-reserved-byte"),
    pytest.param([b""], r"undecodable", id="empty-frame"),
    pytest.param([_PING[:1]], r"undecodable", id="truncated-1-byte"),
    pytest.param([_PING[:len(_PING) // 2]], r"undecodable", id="truncated-half"),
    pytest.param([_PING[:-1]], r"undecodable", id="truncated-last-byte"),
    pytest.param([_PING, _PING], r"expected one message frame, got 2", id="two-frames"),
    pytest.param([_PING, b"", b"x"], r"expected one message frame, got 3", id="three-frames"),
    pytest.param([msgpack.packb([1, "request", {}])], r"not a map", id="array"),
    pytest.param([msgpack.packb(7)], r"not a map", id="int"),
    pytest.param([msgpack.packb("request")], r"not a map", id="str"),
    pytest.param([msgpack.packb(None)], r"not a map", id="nil"),
    pytest.param([msgpack.packb(b"\x81\xa1v\x01", use_bin_type=True)], r"not a map", id="bin"),
    pytest.param([msgpack.packb({1: 2, "v": 1})], r"undecodable", id="int-map-key"),
    pytest.param([pack(v=1, k="bogus", rid=1)], r"unknown message kind 'bogus'",
                 id="unknown-kind"),
    pytest.param([pack(v=1, rid=1, op="ping", args={})], r"unknown message kind None",
                 id="no-kind"),
    pytest.param([pack(v=1, k=["request"], rid=1, op="ping", args={})],
                 r"unknown message kind", id="kind-as-list"),
    pytest.param([pack(v=1, k={"k": "request"}, rid=1, op="ping", args={})],
                 r"unknown message kind", id="kind-as-map"),
    pytest.param([pack(v=1, k="welcome", agent="a", heartbeat=1, revoke=[])],
                 r"unexpected message kind 'welcome'", id="server-only-kind"),
    pytest.param([pack(v=1, k="reply", rid=1, ok=True, result=None, error=None, code=None)],
                 r"unexpected message kind 'reply'", id="reply-to-server"),
    pytest.param([pack(v=2, k="request", rid=1, op="ping", args={})],
                 r"protocol version 2 not supported", id="version-2"),
    pytest.param([pack(v=0, k="request", rid=1, op="ping", args={})],
                 r"protocol version 0 not supported", id="version-0"),
    pytest.param([pack(v="1", k="request", rid=1, op="ping", args={})],
                 r"protocol version '1' not supported", id="version-as-str"),
    pytest.param([pack(k="request", rid=1, op="ping", args={})],
                 r"protocol version None not supported", id="no-version"),
    pytest.param([req(rid=1, op="ping")], r"missing field 'args'", id="missing-args"),
    pytest.param([req(op="ping", args={})], r"missing field 'rid'", id="missing-rid"),
    pytest.param([req(rid=1, op="ping", args={}, sudo=True)], r"unknown field 'sudo'",
                 id="extra-field"),
    pytest.param([req(rid="1", op="ping", args={})], r"'rid' must be int, got str",
                 id="rid-as-str"),
    pytest.param([req(rid=True, op="ping", args={})], r"'rid' must be int, got bool",
                 id="rid-as-bool"),
    pytest.param([req(rid=1.5, op="ping", args={})], r"'rid' must be int, got float",
                 id="rid-as-float"),
    pytest.param([req(rid=1, op=b"ping", args={})], r"'op' must be str, got bytes",
                 id="op-as-bytes"),
    pytest.param([req(rid=1, op=None, args={})], r"'op' must be str", id="op-as-nil"),
    pytest.param([req(rid=1, op="ping", args=[])], r"'args' must be dict, got list",
                 id="args-as-list"),
    pytest.param([pack(v=1, k="hello", agent="x", host="h")], r"hello: missing field",
                 id="hello-missing-fields"),
    pytest.param([pack(v=1, k="hello", **HELLO, agent=7)], r"'agent' must be str",
                 id="hello-agent-as-int"),
    pytest.param([pack(v=1, k="hello", **{**HELLO, "running": {"job": 1}}, agent="x")],
                 r"'running' must be list", id="hello-running-as-map"),
    pytest.param([pack(v=1, k="hello", **{**HELLO, "running": [1, "x", None]}, agent="x")],
                 r"running\[0\]: expected a map, got int", id="hello-running-garbage"),
    pytest.param([pack(v=1, k="hello", **{**HELLO, "running": [{"job": "1", "attempt": 1}]},
                       agent="x")],
                 r"running\[0\]: field 'job' must be int", id="hello-running-job-as-str"),
    pytest.param([pack(v=1, k="hello", **{**HELLO, "running": [{"job": 1}]}, agent="x")],
                 r"running\[0\]: missing field 'attempt'", id="hello-running-no-attempt"),
    pytest.param([pack(v=1, k="hello",
                       **{**HELLO, "running": [{"job": 1, "attempt": 1}, {"job": 2, "attempt": 1,
                                                                         "rm": "-rf"}]},
                       agent="x")],
                 r"running\[1\]: unknown field 'rm'", id="hello-running-extra-field"),
    pytest.param([pack(v=1, k="update", agent="never-said-hello", useq=1, updates=[],
                       demand=NO_DEMAND, ack=0)],
                 r"unknown agent: say hello", id="update-without-hello"),
    pytest.param([pack(v=1, k="update", agent="never-said-hello", useq=1,
                       updates=[{"job": 1, "attempt": 1, "states": ["JOB_FINISHED"]}],
                       demand={"cores": 64, "gpus": 0, "max_cores": 64, "max_gpus": 0}, ack=0)],
                 r"unknown agent: say hello", id="update-without-hello-claims-finished"),
    pytest.param([pack(v=1, k="bye", agent="never-said-hello", useq=1, updates=[],
                       released=[{"job": 1, "attempt": 1}])],
                 r"unknown agent: say hello", id="bye-without-hello"),
]


# -- protocol level --------------------------------------------------------------------------
@pytest.mark.parametrize("frames, pattern", RAW_CASES)
def test_malformed_message_gets_error_and_changes_nothing(live, frames, pattern):
    """A malformed, mistyped or out-of-turn raw message gets a one-line error and no effect."""
    with unchanged(live):
        assert_error_reply(exchange(live.address, frames), pattern)


def test_unknown_op_gets_failed_reply(live):
    """An unknown request op gets a reply with ok=False, code 'protocol' and its own rid."""
    with unchanged(live):
        answer = exchange(live.address, [req(rid=77, op="drop_all_tables", args={})])
        assert answer is not None
        kind, m = answer
        assert kind == P.REPLY
        assert m["ok"] is False and m["rid"] == 77 and m["code"] == "protocol"
        assert m["error"] == "unknown op 'drop_all_tables'"
        with live.client() as c, pytest.raises(ProtocolError, match="unknown op 'shutdown_now'"):
            c.call("shutdown_now")


def test_large_garbage_below_limit_gets_error(live):
    """A 2 MiB undecodable message (below the size limit) is read and refused with an error."""
    with unchanged(live):
        assert_error_reply(exchange(live.address, [b"\xc1" * (2 * 2**20)]), r"undecodable")


def test_oversized_message_drops_connection_and_server_keeps_serving(live):
    """A message above MAX_MESSAGE_BYTES gets its connection dropped; others are still served."""
    with unchanged(live):
        s = dealer(live.address)
        mon = s.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        try:
            # a valid ping header would not matter: libzmq refuses the frame by its size alone
            big = b"\x00" * (P.MAX_MESSAGE_BYTES + 1)
            s.send(big, copy=False)
            del big
            events = []
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and zmq.EVENT_DISCONNECTED not in events:
                if mon.poll(500):
                    events.append(recv_monitor_message(mon)["event"])
            assert zmq.EVENT_DISCONNECTED in events, f"not disconnected; events {events}"
            # and nothing ever answers it
            assert not s.poll(300)
        finally:
            s.disable_monitor()
            mon.close(linger=0)
            s.close(linger=0)
        # a well-behaved client on its own connection is served as before
        with live.client(timeout=10) as c:
            assert c.ping()["version"]


def test_update_bound_to_hello_connection(live):
    """An update using a real agent's id from another connection is refused ('say hello')."""
    aid = f"victim-{uuid.uuid4().hex[:8]}"
    ident = aid.encode()
    s = dealer(live.address, ident)
    try:
        s.send(P.encode(P.HELLO, agent=aid, **HELLO))
        kind, m = recv_msg(s)
        assert kind == P.WELCOME and m["agent"] == aid
        with unchanged(live):
            answer = exchange(live.address, [P.encode(
                P.UPDATE, agent=aid, useq=1, ack=0, demand=NO_DEMAND,
                updates=[{"job": 1, "attempt": 1, "states": ["JOB_FINISHED"]}])],
                identity=b"intruder-" + uuid.uuid4().hex[:8].encode())
            assert_error_reply(answer, r"unknown agent: say hello")
    finally:
        s.send(P.encode(P.BYE, agent=aid, useq=1, updates=[], released=[]))
        recv_msg(s, 2)
        s.close(linger=0)


BAD_UPDATES = [
    pytest.param({"updates": [1]}, r"updates\[0\]: expected a map, got int", id="item-int"),
    pytest.param({"updates": ["JOB_FINISHED"]}, r"updates\[0\]: expected a map, got str",
                 id="item-str"),
    pytest.param({"updates": [{"job": 1}]}, r"updates\[0\]: missing field 'attempt'",
                 id="item-missing-attempt"),
    pytest.param({"updates": [{"job": "1", "attempt": 1, "states": []}]},
                 r"updates\[0\]: field 'job' must be int, got str", id="job-as-str"),
    pytest.param({"updates": [{"job": True, "attempt": 1, "states": []}]},
                 r"updates\[0\]: field 'job' must be int, got bool", id="job-as-bool"),
    pytest.param({"updates": [{"job": 1, "attempt": 1, "states": "JOB_FINISHED"}]},
                 r"updates\[0\]: field 'states' must be list, got str", id="states-as-str"),
    pytest.param({"updates": [{"job": 1, "attempt": 1, "states": [], "exit": "0"}]},
                 r"updates\[0\]: field 'exit' must be int or null, got str", id="exit-as-str"),
    pytest.param({"updates": [{"job": 1, "attempt": 1, "states": [], "msg": ["x"]}]},
                 r"updates\[0\]: field 'msg' must be str or null, got list", id="msg-as-list"),
    pytest.param({"updates": [{"job": 1, "attempt": 1, "states": []},
                              {"job": 2, "attempt": 1, "states": [], "shell": "sh -c id"}]},
                 r"updates\[1\]: unknown field 'shell'", id="second-item-extra-field"),
    pytest.param({"updates": {"job": 1}}, r"field 'updates' must be list", id="updates-as-map"),
    pytest.param({"demand": {}}, r"demand: missing field", id="demand-empty"),
    pytest.param({"demand": {**NO_DEMAND, "cores": "all"}},
                 r"demand: field 'cores' must be int, got str", id="demand-cores-as-str"),
    pytest.param({"demand": [1, 2]}, r"field 'demand' must be dict", id="demand-as-list"),
]


@pytest.fixture
def greeted(live):
    """A raw DEALER that said a valid hello (as an agent) to the live server."""
    aid = f"hostile-{uuid.uuid4().hex[:8]}"
    s = dealer(live.address, aid.encode())
    s.send(P.encode(P.HELLO, agent=aid, **HELLO))
    kind, m = recv_msg(s)
    assert kind == P.WELCOME
    yield aid, s
    s.send(P.encode(P.BYE, agent=aid, useq=99, updates=[], released=[]))
    recv_msg(s, 2)
    s.close(linger=0)


@pytest.mark.parametrize("change, pattern", BAD_UPDATES)
def test_update_with_bad_nested_fields_is_refused(live, greeted, change, pattern):
    """An update from a greeted agent whose nested items are mistyped gets an error, no effect."""
    aid, s = greeted
    fields = {"agent": aid, "useq": 1, "updates": [], "demand": NO_DEMAND, "ack": 0, **change}
    with unchanged(live):
        s.send(P.encode(P.UPDATE, **fields))
        assert_error_reply(recv_msg(s), pattern)
        # the connection is still usable afterwards: a valid heartbeat is answered
        s.send(P.encode(P.UPDATE, agent=aid, useq=2, updates=[], demand=NO_DEMAND, ack=0))
        kind, m = recv_msg(s)
        assert kind == P.TASKS and m["uack"] == 2 and m["tasks"] == []


def test_update_with_garbage_states_is_refused_not_applied(live, greeted):
    """Garbage states, illegal jumps, wrong attempts and unheld jobs in updates are refused."""
    aid, s = greeted
    with live.client() as c:
        jid = c.add_job(name="held-by-hostile", application="echo", parameters={"msg": "x"})
        assert c.counts() == {"READY": 1}
    try:
        s.send(P.encode(P.UPDATE, agent=aid, useq=1, updates=[], ack=0,
                        demand={**NO_DEMAND, "cores": 1}))
        tasks, seq = [], 0
        deadline = time.monotonic() + 10
        while not tasks and time.monotonic() < deadline:
            kind, m = recv_msg(s)
            if kind == P.TASKS and m["tasks"]:
                tasks, seq = m["tasks"], m["seq"]
        assert [t["job"] for t in tasks] == [jid]
        attempt = tasks[0]["attempt"]
        items = [{"job": jid, "attempt": attempt, "states": [5, None, ["x"], {"a": 1}]},
                 {"job": jid, "attempt": attempt, "states": ["STAGED_IN", "BOGUS"]},
                 {"job": jid, "attempt": attempt, "states": ["JOB_FINISHED"], "exit": 0},
                 {"job": jid, "attempt": attempt + 1, "states": ["STAGED_IN"]},
                 {"job": 10**12, "attempt": 1, "states": ["JOB_FINISHED"]}]
        with unchanged(live):
            s.send(P.encode(P.UPDATE, agent=aid, useq=2, updates=items, demand=NO_DEMAND,
                            ack=seq))
            kind, m = recv_msg(s)
            assert kind == P.TASKS and m["uack"] == 2
            assert m["refused"] == [{"job": it["job"], "attempt": it["attempt"]}
                                    for it in items]
        with live.client() as c:
            job = c.job(jid)
            assert (job["state"], job["agent"], job["attempts"]) == ("READY", aid, 1)
        # handing it back returns it to the queue untouched
        s.send(P.encode(P.BYE, agent=aid, useq=3, updates=[],
                        released=[{"job": jid, "attempt": attempt}]))
        kind, m = recv_msg(s)
        assert kind == P.TASKS and m["uack"] == 3
        with live.client() as c:
            job = c.job(jid)
            assert (job["state"], job["agent"]) == ("READY", None)
    finally:
        with live.client() as c:
            c.remove_jobs({"ids": [jid]})


def test_bye_with_garbage_released_is_refused(live, greeted):
    """A bye whose `released` list holds garbage is refused and the agent stays connected."""
    aid, s = greeted
    with unchanged(live):
        s.send(P.encode(P.BYE, agent=aid, useq=1, updates=[], released=[7, "x"]))
        assert_error_reply(recv_msg(s), r"released\[0\]: expected a map")
        with live.client() as c:
            alive = [a["id"] for a in c.agents()]
        assert aid in alive


# -- request arguments -------------------------------------------------------------------------
BAD_ARGS = [
    pytest.param("job_ls", {"limit": "all"}, ValidationError, r"argument 'limit'",
                 id="limit-as-str"),
    pytest.param("job_ls", {"newest": "yes"}, ValidationError, r"argument 'newest'",
                 id="newest-as-str"),
    pytest.param("job_ls", {"filter": [1]}, ValidationError, r"filter must be a map",
                 id="filter-as-list"),
    pytest.param("job_ls", {"filter": {"owners": "root"}}, ValidationError,
                 r"unknown filter key\(s\) owners", id="filter-unknown-key"),
    pytest.param("job_ls", {"filter": {"ids": "1,2"}}, ValidationError,
                 r"ids must be a list", id="filter-ids-as-str"),
    pytest.param("job_ls", {"filter": {"ids": [True]}}, ValidationError,
                 r"ids must be a list", id="filter-ids-bool"),
    pytest.param("job_ls", {"filter": {"state": "DONE"}}, IllegalTransition,
                 r"unknown state 'DONE'", id="filter-unknown-state"),
    pytest.param("job_ls", {"filter": {"tag": "../x"}}, ValidationError,
                 r"tag '\.\./x' is not a valid name", id="filter-tag-dotdot"),
    pytest.param("job_ls", {"filter": {"app": "nope"}}, NotFound, r"no app named 'nope'",
                 id="filter-unknown-app"),
    pytest.param("job_show", {"id": "1"}, ValidationError, r"argument 'id'", id="show-id-str"),
    pytest.param("job_show", {}, ValidationError, r"missing argument 'id'", id="show-no-id"),
    pytest.param("job_add", {"jobs": {"name": "x"}}, ValidationError, r"argument 'jobs'",
                 id="jobs-as-map"),
    pytest.param("job_add", {}, ValidationError, r"missing argument 'jobs'", id="no-jobs"),
    pytest.param("job_kill", {"filter": {}}, ValidationError, r"empty filter",
                 id="kill-everything-by-empty-filter"),
    pytest.param("job_rm", {}, ValidationError, r"empty filter", id="rm-without-filter"),
    pytest.param("job_alter", {"filter": {"ids": [1]}}, ValidationError,
                 r"missing argument 'changes'", id="alter-no-changes"),
    pytest.param("app_add", {"spec": ["echo"]}, ValidationError, r"argument 'spec'",
                 id="spec-as-list"),
    pytest.param("app_rm", {"name": 5}, ValidationError, r"argument 'name'", id="app-name-int"),
    pytest.param("app_show", {"name": "../echo"}, NotFound, r"no app named", id="app-dotdot"),
]


@pytest.mark.parametrize("op, args, exc, pattern", BAD_ARGS)
def test_bad_request_arguments_are_refused(live, op, args, exc, pattern):
    """Mistyped or dangerous request arguments get a typed one-line error and change nothing."""
    with unchanged(live), live.client() as c:
        with pytest.raises(exc, match=pattern) as info:
            c.call(op, **args)
        one_line(info.value)


HOSTILE_ARGS = [
    pytest.param("job_ls", {"filter": {"name": ["a", "b"]}}, id="filter-name-as-list"),
    pytest.param("job_ls", {"filter": {"group": {"$ne": ""}}}, id="filter-group-as-map"),
    pytest.param("job_ls", {"filter": {"app": ["echo"]}}, id="filter-app-as-list"),
    pytest.param("job_ls", {"filter": {"ids": [2**63]}}, id="filter-id-above-int64"),
    pytest.param("job_ls", {"offset": 2**63}, id="offset-above-int64"),
    pytest.param("job_show", {"id": 2**64 - 1}, id="show-id-above-int64"),
    pytest.param("job_add", {"jobs": [{"name": "p", "application": "echo",
                                       "parameters": {"msg": "x"}, "parents": [2**63]}]},
                 id="parent-id-above-int64"),
]


@pytest.mark.parametrize("op, args", HOSTILE_ARGS)
def test_hostile_argument_values_get_validation_error(live, op, args):
    """Wrong-typed filter values and out-of-range ids are a validation error, not a crash."""
    with unchanged(live), live.client() as c:
        with pytest.raises((ValidationError, NotFound)) as info:
            c.call(op, **args)
        one_line(info.value)


# -- apps --------------------------------------------------------------------------------------
def _app(**over):
    spec = {"name": "newapp", "executable": "/bin/echo", "args": ["{m}"],
            "parameters": {"m": {"type": "str"}}}
    spec.update(over)
    return {k: v for k, v in spec.items() if v is not ...}


BAD_APPS = [
    pytest.param(_app(command="rm -rf /"), r"unknown app key\(s\) command", id="unknown-key"),
    pytest.param(_app(shell=True), r"unknown app key\(s\) shell", id="shell-key"),
    pytest.param(_app(executable="echo"), r"executable must be an absolute path",
                 id="exe-bare-name"),
    pytest.param(_app(executable="bin/echo"), r"executable must be an absolute path",
                 id="exe-relative"),
    pytest.param(_app(executable="./echo"), r"executable must be an absolute path",
                 id="exe-dot-relative"),
    pytest.param(_app(executable=""), r"executable must be an absolute path", id="exe-empty"),
    pytest.param(_app(executable=...), r"executable must be an absolute path", id="exe-missing"),
    pytest.param(_app(executable=["/bin/sh", "-c"]), r"executable must be an absolute path",
                 id="exe-list"),
    pytest.param(_app(executable="/bin/echo\x00x"), r"executable must be an absolute path",
                 id="exe-nul"),
    pytest.param(_app(args=["{m}", "{missing}"]),
                 r"args use \{missing\} but no parameter 'missing' is declared",
                 id="placeholder-undeclared"),
    pytest.param(_app(args=["--out={out}"], parameters={}),
                 r"args use \{out\} but no parameter", id="placeholder-no-params"),
    pytest.param(_app(args="{m}"), r"args must be a list of strings", id="args-as-str"),
    pytest.param(_app(args=["a\x00b"]), r"args must be a list of strings", id="args-nul"),
    pytest.param(_app(parameters={"m": {"type": "shell"}}), r"type must be one of",
                 id="param-bad-type"),
    pytest.param(_app(parameters={"m": {"type": "str", "eval": True}}),
                 r"unknown key\(s\) eval", id="param-unknown-key"),
    pytest.param(_app(parameters={"m": "str"}), r"declaration must be a map", id="param-as-str"),
    pytest.param(_app(parameters={"m": {"type": "str", "pattern": "("}}), r"bad pattern",
                 id="param-bad-regex"),
    pytest.param(_app(parameters={"m": {"type": "str", "default": "a;b"}}),
                 r"value 'a;b' is refused: ; is not allowed \(a str parameter without a "
                 r"pattern of its own takes", id="param-unsafe-default"),
    pytest.param(_app(args=["{m-x}"], parameters={"m-x": {"type": "str"}}),
                 r"must be an identifier", id="param-name-not-identifier"),
    pytest.param(_app(name="../evil"), r"app name '\.\./evil' is not a valid name",
                 id="name-dotdot"),
    pytest.param(_app(name="/abs"), r"is not a valid name", id="name-absolute"),
    pytest.param(_app(name="a b;rm"), r"is not a valid name", id="name-metachar"),
    pytest.param(_app(environment={"LD_PRELOAD=x": "y"}), r"environment must map",
                 id="env-bad-key"),
    pytest.param(_app(environment={"X": 1}), r"environment must map", id="env-int-value"),
    pytest.param(_app(preprocess=["setup.sh"]), r"absolute executable path",
                 id="pre-relative"),
    pytest.param(_app(postprocess="/bin/true"), r"non-empty list of strings",
                 id="post-as-str"),
    pytest.param(_app(resources={"num_nodes": 0}), r"num_nodes must be a positive integer",
                 id="resources-zero-nodes"),
    pytest.param(_app(resources={"memory": 5}), r"unknown resource 'memory'",
                 id="resources-unknown"),
    pytest.param(_app(name="echo"), r"an app named 'echo' exists", id="duplicate-name"),
]


@pytest.mark.parametrize("spec, pattern", BAD_APPS)
def test_bad_app_definition_is_refused(live, spec, pattern):
    """An app definition with unknown keys, relative executables, etc. is refused; no app added."""
    with unchanged(live), live.client() as c:
        with pytest.raises(ValidationError, match=pattern) as info:
            c.add_app(spec)
        one_line(info.value)


@pytest.mark.parametrize("changes, pattern", [
    pytest.param({"executable": "echo"}, r"executable must be an absolute path", id="exe"),
    pytest.param({"args": ["{nope}"]}, r"no parameter 'nope' is declared", id="placeholder"),
    pytest.param({"sudo": True}, r"unknown app key\(s\) sudo", id="unknown-key"),
])
def test_bad_app_alter_is_refused(live, changes, pattern):
    """Altering an app into an invalid definition is refused and leaves the app as it was."""
    with unchanged(live), live.client() as c:
        with pytest.raises(ValidationError, match=pattern):
            c.alter_app("echo", **changes)


# -- jobs --------------------------------------------------------------------------------------
def _job(app="echo", params=None, **over):
    j = {"name": "j", "application": app,
         "parameters": {"msg": "ok"} if params is None and app == "echo" else (params or {})}
    j.update(over)
    return j


METACHARS = ["a;b", "$(id)", "${HOME}", "`id`", "a|b", "a&&b", "a&b", "a\nb", "a b", "'q'",
             '"q"', "a>b", "a<b", "a*", "~root", "!1", "a#b", "a\tb", "a\\b", "a/b", "(a)"]
BAD_PATHS = ["../x", "..", "a/../../b", "a/..", "/etc/passwd", "/", "", ".", "a//b", "a/./b",
             "a b", "a;b", "a\x00b"]
BAD_NAMES = ["../x", "..", "a..b", "/abs", "a/b", "", ".hidden", "-rf", "a b", "x;y", "$(id)",
             "`id`", "a\nb", "a\x00b", "x" * 129, "ü"]

BAD_JOBS = [
    pytest.param(_job(app="nope"), NotFound, r"no app named 'nope'", id="unknown-app"),
    pytest.param(_job(app=None), ValidationError, r"'application' must name", id="no-app"),
    pytest.param(_job(app=["echo"]), ValidationError, r"'application' must name",
                 id="app-as-list"),
    pytest.param(_job("typed", {"n": "abc"}), ValidationError, r"parameter 'n' must be int",
                 id="int-as-word"),
    pytest.param(_job("typed", {"n": [1]}), ValidationError, r"parameter 'n' must be int",
                 id="int-as-list"),
    pytest.param(_job("typed", {"n": True}), ValidationError, r"'n' must be int, got a boolean",
                 id="int-as-bool"),
    pytest.param(_job("typed", {"n": 1.5}), ValidationError, r"parameter 'n' must be int",
                 id="int-as-fraction"),
    pytest.param(_job("typed", {"n": 11}), ValidationError, r"'n' must be <= 10",
                 id="int-above-max"),
    pytest.param(_job("typed", {"n": -1}), ValidationError, r"'n' must be >= 0",
                 id="int-below-min"),
    pytest.param(_job("typed", {"x": "nan"}), ValidationError, r"'x' must be a finite float",
                 id="float-nan"),
    pytest.param(_job("typed", {"x": float("inf")}), ValidationError, r"finite float",
                 id="float-inf"),
    pytest.param(_job("typed", {"x": "1;id"}), ValidationError, r"'x' must be float",
                 id="float-with-command"),
    pytest.param(_job("typed", {"c": "c"}), ValidationError, r"'c' must be one of a, b",
                 id="choice-not-listed"),
    pytest.param(_job("typed", {"p": 5}), ValidationError, r"'p' must be a string",
                 id="path-as-int"),
    pytest.param(_job(params={"msg": 5}), ValidationError, r"'msg' must be a string, got int",
                 id="str-as-int"),
    pytest.param(_job(params={"msg": {"$(id)": 1}}), ValidationError,
                 r"'msg' must be a string, got dict", id="str-as-map"),
    pytest.param(_job(params={"msg": "x", "evil": "y"}), ValidationError,
                 r"has no parameter 'evil'", id="undeclared-param"),
    pytest.param(_job(params={}), ValidationError, r"needs parameter 'msg'",
                 id="missing-param"),
    pytest.param(_job(params=["x"]), ValidationError, r"parameters .* must be a map",
                 id="params-as-list"),
    pytest.param(_job("anything", {"v": "a\x00b"}), ValidationError, r"must not contain NUL",
                 id="nul-in-permissive-str"),
    pytest.param(_job("anything", {"v": "x" * 4097}), ValidationError, r"at most 4096",
                 id="str-too-long"),
    pytest.param(_job(command="rm -rf /"), ValidationError, r"unknown job key\(s\) command",
                 id="unknown-key"),
    pytest.param(_job(argv=["/bin/sh", "-c", "id"], env={"X": "1"}), ValidationError,
                 r"unknown job key\(s\) argv, env", id="unknown-keys-argv-env"),
    pytest.param("rm -rf /", ValidationError, r"a job must be a map", id="not-a-map"),
    pytest.param(_job(config_file={"msg": "a"}, parameters={"msg": "a"}), ValidationError,
                 r"not both", id="params-and-alias"),
    pytest.param(_job(config_file={"msg": "a;b"}, parameters=...), ValidationError,
                 r"value 'a;b' is refused: ; is not allowed", id="alias-metachar"),
    pytest.param(_job(tags="a,../b"), ValidationError, r"tag '\.\./b' is not a valid name",
                 id="tags-as-str-dotdot"),
    pytest.param(_job(tags=[["a"]]), ValidationError, r"is not a valid name",
                 id="tags-nested-list"),
    pytest.param(_job(tags={"a": 1}), ValidationError, r"tags must be a list",
                 id="tags-as-map"),
    pytest.param(_job(input_url="../data"), ValidationError, r"must be an absolute path",
                 id="input-relative"),
    pytest.param(_job(input_url="/data/../etc"), ValidationError,
                 r"may not contain a '\.\.' part", id="input-dotdot"),
    pytest.param(_job(output_url="weird://evil.example/x"), ValidationError,
                 r"unknown scheme 'weird'; supported schemes: file, local, scp", id="output-weird"),
    pytest.param(_job(output_url="/out\x00"), ValidationError, r"must be a URL string",
                 id="output-nul"),
    pytest.param(_job(output_url="/tmp/x"), ValidationError, r"not under a data root",
                 id="output-outside-roots"),
    pytest.param(_job(output_url="/out\n"), ValidationError, r"must be a URL string",
                 id="output-newline"),
    pytest.param(_job(priority="9"), ValidationError, r"priority must be an integer",
                 id="priority-as-str"),
    pytest.param(_job(priority=10**7), ValidationError, r"priority must be an integer",
                 id="priority-too-big"),
    pytest.param(_job(max_retries=-1), ValidationError, r"max_retries must be an integer",
                 id="retries-negative"),
    pytest.param(_job(num_nodes=0), ValidationError, r"num_nodes must be a positive",
                 id="zero-nodes"),
    pytest.param(_job(cpus_per_process="4"), ValidationError, r"cpus_per_process must be",
                 id="cpus-as-str"),
    pytest.param(_job(gpus_per_process=65), ValidationError, r"gpus_per_process must be",
                 id="too-many-gpus"),
    pytest.param(_job(wall_time_minutes=-5), ValidationError, r"wall_time_minutes must be",
                 id="negative-walltime"),
    pytest.param(_job(parents="1"), ValidationError, r"parents must be a list of job ids",
                 id="parents-as-str"),
    pytest.param(_job(parents=[0]), ValidationError, r"parents must be a list of job ids",
                 id="parent-zero"),
    pytest.param(_job(parents=[10**9]), NotFound, r"parent job\(s\) 1000000000 do not exist",
                 id="parent-missing"),
    pytest.param(_job(description=["x"]), ValidationError, r"description must be a string",
                 id="description-as-list"),
]
BAD_JOBS += [pytest.param(_job(params={"msg": v}), ValidationError,
                          r"'msg' value .* is refused: .* not allowed \(" + re.escape(
                              SAFE_WORDS) + r"\)$", id=f"metachar-{v!r}") for v in METACHARS]
BAD_JOBS += [pytest.param(_job("typed", {"p": v}), ValidationError, r"parameter 'p'",
                          id=f"path-param-{v!r}") for v in BAD_PATHS]
BAD_JOBS += [pytest.param(_job(name=v), ValidationError, r"job name .* is not a valid name",
                          id=f"job-name-{v[:12]!r}") for v in BAD_NAMES]
BAD_JOBS += [pytest.param(_job(group_identifier=v), ValidationError,
                          r"group_identifier .* is not a valid name", id=f"group-{v[:12]!r}")
             for v in BAD_NAMES]
BAD_JOBS += [pytest.param(_job(tags=["ok", v]), ValidationError, r"tag .* is not a valid name",
                          id=f"tag-{v[:12]!r}") for v in BAD_NAMES if v and "," not in v]
BAD_JOBS += [pytest.param(_job(**{k: "../x"}), ValidationError, rf"{k} '\.\./x' is not a valid",
                          id=f"{k}-dotdot") for k in ("site", "queue", "project")]


@pytest.mark.parametrize("job, exc, pattern", BAD_JOBS)
def test_bad_job_is_refused(live, job, exc, pattern):
    """An invalid job message is refused with an error naming the problem, and adds nothing."""
    job = {k: v for k, v in job.items() if v is not ...} if isinstance(job, dict) else job
    with unchanged(live), live.client() as c:
        with pytest.raises(exc, match=pattern) as info:
            c.add_jobs([job])
        one_line(info.value)


@pytest.mark.parametrize("bad, pattern", [
    pytest.param(_job(params={"msg": "$(reboot)"}), r"\$ \( \) are not allowed",
                 id="metachar"),
    pytest.param(_job(app="nope"), r"no app named 'nope'", id="unknown-app"),
    pytest.param(_job(extra=1), r"unknown job key\(s\) extra", id="unknown-key"),
    pytest.param(_job(name="../up"), r"job name '\.\./up' is not a valid name", id="name"),
])
def test_bulk_add_is_all_or_nothing(live, bad, pattern):
    """A bulk add whose job #3 of 5 is invalid adds none of them; the error names job #3."""
    good = [_job(name=f"bulk{i}", tags=["bulk"]) for i in range(5)]
    batch = good[:2] + [bad] + good[3:]
    with unchanged(live), live.client() as c:
        with pytest.raises(PilotfishError, match=r"^job #3: .*" + pattern) as info:
            c.add_jobs(batch)
        one_line(info.value)
        assert c.jobs({"tag": "bulk"}) == []
    # the same batch with #3 fixed goes in whole, with consecutive ids
    with live.client() as c:
        ids = c.add_jobs(good)
        assert ids == list(range(ids[0], ids[0] + 5))
        assert [j["name"] for j in c.jobs({"tag": "bulk"})] == [f"bulk{i}" for i in range(5)]
        assert c.remove_jobs({"tag": "bulk"}) == {"removed": 5}


# -- state changes -----------------------------------------------------------------------------
@pytest.fixture
def ready_job(live):
    with live.client() as c:
        jid = c.add_job(name="ready-one", application="echo", parameters={"msg": "x"})
        assert c.job(jid)["state"] == "READY"
    yield jid
    with live.client() as c:
        c.remove_jobs({"ids": [jid]})


@pytest.mark.parametrize("target, pattern", [
    ("JOB_FINISHED", r"illegal state change READY -> JOB_FINISHED"),
    ("RUNNING", r"illegal state change READY -> RUNNING"),
    ("FAILED", r"illegal state change READY -> FAILED"),
    ("RESTART_READY", r"illegal state change READY -> RESTART_READY"),
    ("CREATED", r"illegal state change READY -> CREATED"),
    ("DONE", r"unknown state 'DONE'"),
])
def test_illegal_state_change_is_refused(live, ready_job, target, pattern):
    """alter_jobs(state=...) that the state machine forbids is refused; the job stays READY."""
    with unchanged(live), live.client() as c:
        with pytest.raises(IllegalTransition, match=pattern) as info:
            c.alter_jobs({"ids": [ready_job]}, state=target)
        one_line(info.value)


def test_state_change_with_other_fields_is_refused(live, ready_job):
    """A state change mixed with a field change, or a non-alterable field, changes nothing."""
    with unchanged(live), live.client() as c:
        with pytest.raises(ValidationError, match=r"change the state alone"):
            c.alter_jobs({"ids": [ready_job]}, state="USER_KILLED", priority=3)
        with pytest.raises(ValidationError, match=r"cannot alter application, workdir"):
            c.alter_jobs({"ids": [ready_job]}, application="typed", workdir="/etc")
        with pytest.raises(ValidationError, match=r"value '\$\(id\)' is refused"):
            c.alter_jobs({"ids": [ready_job]}, parameters={"msg": "$(id)"})
        with pytest.raises(ValidationError, match=r"group_identifier '\.\./g' is not a valid"):
            c.alter_jobs({"ids": [ready_job]}, group_identifier="../g")


@pytest.mark.parametrize("target", ["STAGED_IN", "STAGE_IN_FAILED"])
def test_user_cannot_set_agent_only_state(live, ready_job, target):
    """A user may not put a queued job into a state only an agent holding it can reach."""
    with unchanged(live), live.client() as c:
        with pytest.raises(IllegalTransition):
            c.alter_jobs({"ids": [ready_job]}, state=target)


def test_cli_illegal_state_change(live, ready_job):
    """`job alter --set state=JOB_FINISHED` on a READY job exits non-zero with a one-line error."""
    with unchanged(live):
        r = run_cli(live.home, "job", "alter", str(ready_job), "--set", "state=JOB_FINISHED")
        assert r.returncode != 0
        assert r.stderr == ("pilotfish: error: illegal state change READY -> JOB_FINISHED: a "
                            "user may only kill (USER_KILLED) or retry (RESTART_READY) a job\n")
        assert r.stdout == ""


# -- found bugs at the database boundary -------------------------------------------------------
def test_hello_with_out_of_range_int_gets_error(live):
    """A hello whose pid does not fit 64 bits gets an error reply instead of silence."""
    aid = f"huge-{uuid.uuid4().hex[:8]}"
    with unchanged(live):
        answer = exchange(live.address, [P.encode(P.HELLO, agent=aid,
                                                  **{**HELLO, "pid": 2**64 - 1})],
                          timeout=3, identity=aid.encode())
        assert_error_reply(answer, r"pid")


def test_update_with_out_of_range_exit_code_gets_answer(server):
    """An update with an exit code beyond 64 bits is answered (refused) instead of silence."""
    with server.client() as c:
        c.add_app(APPS[0])
        jid = c.add_job(name="one", application="echo", parameters={"msg": "x"})
    aid = f"huge-{uuid.uuid4().hex[:8]}"
    s = dealer(server.address, aid.encode())
    try:
        s.send(P.encode(P.HELLO, agent=aid, **HELLO))
        assert recv_msg(s)[0] == P.WELCOME
        s.send(P.encode(P.UPDATE, agent=aid, useq=1, updates=[], ack=0,
                        demand={**NO_DEMAND, "cores": 1}))
        tasks = []
        deadline = time.monotonic() + 10
        while not tasks and time.monotonic() < deadline:
            kind, m = recv_msg(s)
            if kind == P.TASKS:
                tasks = m["tasks"]
        assert [t["job"] for t in tasks] == [jid]
        s.send(P.encode(P.UPDATE, agent=aid, useq=2, ack=m["seq"], demand=NO_DEMAND,
                        updates=[{"job": jid, "attempt": tasks[0]["attempt"],
                                  "states": ["STAGED_IN", "PREPROCESSED", "RUNNING",
                                             "RUN_FAILED"], "exit": 2**64 - 1}]))
        answer = recv_msg(s, timeout=3)
        assert answer is not None, "update never answered"
        with server.client() as c:
            assert c.ping()
    finally:
        s.close(linger=0)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
@pytest.mark.parametrize("what", ["job", "app"])
def test_nul_in_description_is_refused(request, tmp_path, backend, what):
    """A NUL byte in a job's or an app's description is refused the same on every database."""
    if backend == "postgresql":
        url = request.getfixturevalue("pg_url")  # skips (or fails in CI) without PostgreSQL
    else:
        url = f"sqlite:///{tmp_path / 'pilotfish.db'}"
    home = tmp_path / "home"
    home.mkdir()
    s = ServerHandle(home, url).start()
    try:
        with s.client(timeout=3) as c:
            c.add_app(APPS[0])
        with unchanged(s), s.client(timeout=3) as c:
            with pytest.raises(ValidationError, match=r"description") as info:
                if what == "job":
                    c.add_jobs([_job(description="before\x00after")])
                else:
                    c.add_app(_app(description="before\x00after"))
            one_line(info.value)
    finally:
        s.stop()


# -- end to end: nothing reaches a shell -------------------------------------------------------
def test_metacharacters_never_reach_a_shell(server, tmp_path, monkeypatch):
    """Shell syntax in a permissive str parameter reaches /bin/echo literally; no canary appears."""
    canaries = tmp_path / "canaries"
    canaries.mkdir()
    work = tmp_path / "work"
    monkeypatch.chdir(tmp_path)
    value = (f"$(touch {canaries}/C1); touch {canaries}/C2 `touch {canaries}/C3` "
             f"| touch {canaries}/C4 && touch C5 || touch C6 > C7 < /dev/null & "
             f"'touch C8' \"$(touch C9)\" ${{IFS}}touch${{IFS}}C10\ntouch C11; #")
    with server.client() as c:
        c.add_app({"name": "loud", "executable": "/bin/echo", "args": ["{v}"],
                   "parameters": {"v": {"type": "str", "pattern": "(?s).*"}}})
        jid = c.add_job(name="inject", application="loud", parameters={"v": value})
        job = c.job(jid)
        assert job["argv"] == ["/bin/echo", value]
        server.agent(work_root=work, cores="0")
        assert c.wait({"ids": [jid]}, timeout=60) == {"JOB_FINISHED": 1}
        job = c.job(jid)
    assert job["exit_code"] == 0
    out = work / job["workdir"] / "job.out"
    assert out.read_text() == value + "\n"
    assert list(canaries.iterdir()) == []
    names = {f"C{i}" for i in range(1, 12)}
    assert Path(os.getcwd()) == tmp_path  # the agent's cwd; the work root and home are below it
    found = [p for p in tmp_path.rglob("*") if p.name in names]
    assert found == [], f"canary files created: {found}"


# -- the barrage, while a real agent works -----------------------------------------------------
def test_barrage_while_agent_finishes_jobs(server, tmp_path):
    """Bad messages of every kind while a real agent works: each refused, every job finishes."""
    n_jobs = 40
    with server.client() as c:
        c.add_app({"name": "nap", "executable": "/bin/sleep", "args": ["{s}"],
                   "parameters": {"s": {"type": "float", "min": 0, "max": 5}}})
        c.add_jobs([{"name": f"nap{i}", "application": "nap", "parameters": {"s": 0.1}}
                    for i in range(n_jobs)])
        apps_before = c.apps()
        bad_before = c.status()["stats"]["bad_messages"]
    agent = server.agent(work_root=tmp_path / "work")
    with server.client() as c:
        wait_for(lambda: c.counts().get("JOB_FINISHED", 0) > 0, 30, what="a first finished job")
        assert c.counts().get("JOB_FINISHED", 0) < n_jobs, "agent finished before the barrage"
    counted = 0  # 'say hello' answers are not protocol errors and are not counted as bad
    for _ in range(3):
        for p in RAW_CASES:
            frames, pattern = p.values
            assert_error_reply(exchange(server.address, frames), pattern)
            counted += "say hello" not in pattern
    # an oversized frame in the middle of it all: dropped by libzmq, not counted, not answered
    s = dealer(server.address)
    s.send(b"\x00" * (P.MAX_MESSAGE_BYTES + 1))
    assert not s.poll(500)
    s.close(linger=0)
    with server.client() as c:
        assert c.wait({"app": "nap"}, timeout=60) == {"JOB_FINISHED": n_jobs}
        assert c.apps() == apps_before
        st = c.status()
        assert st["stats"]["bad_messages"] - bad_before == counted
        assert st["agents_alive"] == 1
        assert c.ping()["version"]
    assert agent.poll() is None, "the agent died during the barrage"
