"""Roles per CurveZMQ key: every op checks the caller's role, submitters change only their own
jobs, agent ids belong to the key of their first hello, and unknown request arguments are
refused.

Real server processes, real keys, CurveZMQ on tcp://127.0.0.1, real agents where it matters.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import zmq

from conftest import ServerHandle, run_cli, wait_for
from pilotfish import keys
from pilotfish import protocol as P
from pilotfish.client import Client
from pilotfish.errors import Forbidden, PilotfishError, ValidationError
from pilotfish.server import events, gc_ops, output_ops, pilot_ops, staging_ops  # noqa: F401
from pilotfish.server import workflow_ops  # noqa: F401  (registers the workflow ops)
from pilotfish.server import federation_ops  # noqa: F401  (registers the federation ops)
from pilotfish.server.ops import OPS
from pilotfish.server import pilot_ops  # noqa: F401  (registers the pilot ops)
# every op the server registers, whatever other tests in this process imported before (the
# usage ops were missing from the matrix until a test imported the service module first)
from pilotfish.server import service  # noqa: F401

ECHO = {"name": "echo", "executable": "/bin/echo", "args": ["{x}"],
        "parameters": {"x": {"type": "str"}}}
HELLO = dict(host="h", pid=4242, site=None, pilot=None, cores=[0], gpus=[], memory=2**30,
             time_left=None, running=[], ack=0)
NO_DEMAND = {"cores": 0, "gpus": 0, "max_cores": 1, "max_gpus": 0, "time_left": None}
ROLES = ("admin", "submitter", "agent", "reader", "site")

READ = {"ping", "status", "agent_ls", "app_ls", "app_show", "job_ls", "job_counts", "job_groups",
        "job_summary", "job_show", "job_log", "pilot_ls", "site_status", "events",
        "workflow_ls", "workflow_show", "transfer_ls", "remote_sites", "utilization", "usage",
        "usage_days"}
SUBMIT = READ | {"workflow_add", "workflow_check", "workflow_kill", "workflow_retry",
                 "job_add", "job_add_array", "job_check", "job_kill", "job_retry", "job_alter",
                 "job_rm", "forward_control",
                 "pilot_add", "pilot_update", "site_backlog", "site_report"}
ADMIN_ONLY = {"app_add", "app_alter", "app_rm", "shutdown", "gc", "events_prune",
              "forward_take", "forward_report", "site_beat"}
#: What each role may call: written out here, not read from the server's declarations.
#: The site stager's op: a site agent's key (role site) or an admin's.
STAGE = {"stage_poll"}
ALLOWED = {"admin": SUBMIT | ADMIN_ONLY | STAGE, "submitter": SUBMIT, "reader": READ,
           "agent": set(), "site": SUBMIT | STAGE}


def one_line_error(r: subprocess.CompletedProcess, words: str) -> None:
    assert r.returncode != 0, r.stdout
    assert r.stderr.count("\n") == 1 and words in r.stderr, r.stderr


def make_key(s: ServerHandle, name: str, role: str | None) -> Path:
    extra = ["--role", role] if role else []
    run_cli(s.home, "keys", "init", "--client", name, *extra, check=True)
    return s.home / "keys" / f"{name}.key_secret"


def client(s: ServerHandle, name: str, timeout: float = 15) -> Client:
    return Client(s.address, s.home, timeout=timeout,
                  client_key=s.home / "keys" / f"{name}.key_secret")


def dealer(s: ServerHandle, name: str, identity: bytes | None = None) -> zmq.Socket:
    d = zmq.Context.instance().socket(zmq.DEALER)
    d.setsockopt(zmq.LINGER, 0)
    d.setsockopt(zmq.RECONNECT_IVL, 50)
    if identity is not None:
        d.setsockopt(zmq.ROUTING_ID, identity)
    keys.apply_client(d, keys.client_curve(s.home, s.address,
                                           client_key=s.home / "keys" / f"{name}.key_secret"))
    d.connect(s.address)
    return d


def recv(d: zmq.Socket, timeout: float = 5.0):
    if not d.poll(int(timeout * 1000)):
        return None
    return P.decode(d.recv(), (P.ERROR, P.REPLY, P.WELCOME, P.TASKS, P.CANCEL))


def server_log(s: ServerHandle) -> str:
    return (s.home / "server.log").read_text(errors="replace")


def cli_as(s: ServerHandle, name: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PILOTFISH_CLIENT_KEY=str(s.home / "keys" / f"{name}.key_secret"))
    return subprocess.run([sys.executable, "-m", "pilotfish", "--home", str(s.home), *args],
                          capture_output=True, text=True, env=env, timeout=60)


# -- keys on disk ------------------------------------------------------------------------------
def test_roles_on_disk_and_the_keys_cli(tmp_path):
    home = tmp_path / "h"
    run_cli(home, "keys", "init", check=True)
    kd = home / "keys"
    assert json.loads((kd / "roles.json").read_text()) == {"client": "admin"}
    assert oct((kd / "roles.json").stat().st_mode & 0o777) == "0o600"
    out = json.loads(run_cli(home, "keys", "init", "--client", "sub", "--json",
                             check=True).stdout)
    assert out["client"]["role"] == "submitter"  # the least-privilege default
    assert "authorized as agent" in run_cli(home, "keys", "init", "--client", "node",
                                            "--role", "agent", check=True).stdout
    ext = tmp_path / "ext"
    run_cli(ext, "keys", "init", "--client", "far", check=True)
    r = run_cli(home, "keys", "authorize", str(ext / "keys" / "far.key"), "--role", "reader",
                check=True)
    assert "authorized 'far' as reader" in r.stdout
    r = run_cli(home, "keys", "authorize", str(ext / "keys" / "client.key"), "--name", "dflt",
                check=True)
    assert "as submitter" in r.stdout
    listed = json.loads(run_cli(home, "keys", "ls", "--json", check=True).stdout)
    assert {e["name"]: e["role"] for e in listed} == {
        "client": "admin", "sub": "submitter", "node": "agent", "far": "reader",
        "dflt": "submitter"}
    table = run_cli(home, "keys", "ls", check=True).stdout
    assert "ROLE" in table and re.search(r"node\s+agent", table), table
    assert run_cli(home, "keys", "role", "far", "submitter", check=True).stdout == \
        "'far': reader -> submitter\n"
    assert json.loads((kd / "roles.json").read_text())["far"] == "submitter"
    assert oct((kd / "roles.json").stat().st_mode & 0o777) == "0o600"
    # one-line errors that change nothing
    before = (kd / "roles.json").read_text()
    one_line_error(run_cli(home, "keys", "role", "nobody", "admin"),
                   "no authorized key named 'nobody'")
    one_line_error(run_cli(home, "keys", "role", "far", "root"),
                   "role 'root': expected one of admin, submitter, agent, reader")
    one_line_error(run_cli(home, "keys", "role", "../x", "admin"), "key name '../x'")
    one_line_error(run_cli(home, "keys", "init", "--role", "agent"), "--role needs --client")
    one_line_error(run_cli(home, "keys", "init", "--client", "y", "--role", "god"),
                   "role 'god': expected one of")
    one_line_error(run_cli(home, "keys", "authorize", str(ext / "keys" / "far.key"),
                           "--name", "again"), "already authorized as 'far'")
    one_line_error(run_cli(home, "keys", "authorize", str(ext / "keys" / "far.key"),
                           "--name", "sub"), "already authorized")
    assert (kd / "roles.json").read_text() == before
    assert not (kd / "y.key").exists()
    for cmd in (["init"], ["ls"], ["authorize"], ["role"], ["revoke"]):
        r = run_cli(home, "keys", *cmd, "-h", check=True)
        assert "Usage:" in r.stdout
    assert "reader" in run_cli(home, "keys", "role", "-h", check=True).stdout
    # a revoked name forgets its role: a new key of that name starts from the default
    run_cli(home, "keys", "revoke", "node", check=True)
    assert "node" not in json.loads((kd / "roles.json").read_text())
    run_cli(home, "keys", "authorize", str(kd / "node.key"), check=True)
    assert json.loads((kd / "roles.json").read_text())["node"] == "submitter"
    # a broken roles.json: `keys ls` says so (the server then refuses everything)
    (kd / "roles.json").write_text('{"far": "emperor"}')
    listed = json.loads(run_cli(home, "keys", "ls", "--json", check=True).stdout)
    assert {e["role"] for e in listed} == {None}
    one_line_error(run_cli(home, "keys", "role", "far", "admin"), "unknown role(s) far=emperor")


# -- every op by every role ----------------------------------------------------------------------
def _args(op: str, role: str) -> dict:
    """Arguments each op accepts; what they name may not exist (NotFound is 'allowed')."""
    return {
        "ping": {}, "status": {}, "agent_ls": {"all": True}, "app_ls": {},
        "app_show": {"name": "echo"}, "app_add": {"spec": {**ECHO, "name": f"e-{role}"}},
        "app_alter": {"name": "echo", "changes": {"description": role}},
        "app_rm": {"name": "no-such-app"},
        "job_add": {"jobs": [{"name": f"j-{role}", "application": "echo",
                              "parameters": {"x": "1"}}]},
        "job_add_array": {"job": {"name": f"a-{role}-{{index}}", "application": "echo",
                                  "parameters": {"x": "{index}"}}, "array": "1-2"},
        "job_check": {"jobs": [{"name": f"c-{role}", "application": "echo",
                                "parameters": {"x": "1"}}]},
        "gc": {"before": 1.0}, "events": {"since": 0, "limit": 5},
        "events_prune": {"before": 1.0},
        "job_ls": {"filter": {}, "limit": 5}, "job_counts": {"filter": {}},
        "job_groups": {"limit": 5},
        "job_summary": {"filter": {}}, "job_show": {"id": 1}, "job_log": {"id": 1},
        "job_kill": {"filter": {"ids": [999999]}}, "job_retry": {"filter": {"ids": [999999]}},
        "job_alter": {"filter": {"ids": [999999]}, "changes": {"priority": 1}},
        "job_rm": {"filter": {"ids": [999999]}},
        "pilot_add": {"id": f"p-{role}", "nodes": 1, "site": "s"},
        "pilot_update": {"id": f"p-{role}", "state": "RUNNING"},
        "pilot_ls": {"all": True}, "site_backlog": {"site": "s"},
        "site_report": {"site": "s", "pid": 1, "paused": False}, "site_status": {},
        "stage_poll": {"stager": f"st-{role}", "site": "s", "want": 0}, "transfer_ls": {},
        "shutdown": {},
        "workflow_add": {"workflow": {"name": f"w-{role}", "subjobs": [
            {"name": f"s-{role}", "application": "echo", "parameters": {"x": "1"}}]}},
        "workflow_check": {"workflow": {"name": f"w-{role}", "subjobs": [
            {"name": "s", "application": "echo", "parameters": {"x": "1"}}]}},
        "workflow_ls": {"filter": {}}, "workflow_show": {"id": 1},
        "workflow_kill": {"ids": [999999]}, "workflow_retry": {"ids": [999999]},
        "forward_take": {"sites": ["far"], "limit": 0},
        "forward_report": {"site": "far", "updates": []},
        "forward_control": {"action": "cancel", "intake_key": "fwd:central:9:1"},
        "site_beat": {"site": "far", "backlog": 0, "capacity": 1}, "remote_sites": {},
        "utilization": {}, "usage": {}, "usage_days": {},
    }[op]


def test_every_op_by_every_role(server):
    assert set(OPS) == SUBMIT | ADMIN_ONLY | STAGE, "a new op needs its place in this matrix"
    for role in ("submitter", "agent", "reader", "site"):
        make_key(server, role, role)
    make_key(server, "boss", "admin")
    with server.client() as c:
        c.add_app(ECHO)
        c.add_job(name="first", application="echo", parameters={"x": "0"})
    refused = {}
    ops = sorted(OPS, key=lambda o: o == "shutdown")  # the admin's shutdown last
    for role, name in (("agent", "agent"), ("reader", "reader"), ("submitter", "submitter"),
                       ("site", "site"), ("admin", "boss")):
        with client(server, name) as c:
            for op in ops:
                if op == "shutdown" and role == "admin":
                    continue
                try:
                    c.call(op, **_args(op, role))
                    ok = True
                except Forbidden as exc:
                    ok = False
                    msg = str(exc)
                    assert "\n" not in msg and f"may not {op}" in msg and f"({role})" in msg, msg
                    refused[(role, op)] = msg
                except PilotfishError as exc:  # allowed, but what it names is not there
                    ok = "may not" not in str(exc)
                assert ok == (op in ALLOWED[role]), (role, op)
    assert refused[("reader", "job_add")] == \
        "key 'reader' (reader) may not job_add: it needs the role submitter or admin"
    assert refused[("submitter", "app_add")] == \
        "key 'submitter' (submitter) may not app_add: it needs the role admin"
    assert refused[("submitter", "stage_poll")] == \
        "key 'submitter' (submitter) may not stage_poll: it needs the role site or admin"
    # refusals changed nothing: only the admin's, the submitter's and the site's jobs and
    # pilots exist
    with client(server, "boss") as c:
        assert sorted(j["name"] for j in c.jobs()) == [
            "a-admin-1", "a-admin-2", "a-site-1", "a-site-2", "a-submitter-1", "a-submitter-2",
            "first", "j-admin", "j-site", "j-submitter", "s-admin", "s-site", "s-submitter"]
        assert sorted(w["name"] for w in c.workflows()) == ["w-admin", "w-site", "w-submitter"]
        assert sorted(p["id"] for p in c.pilots(all=True)) == ["p-admin", "p-site",
                                                              "p-submitter"]
        assert sorted(a["name"] for a in c.apps()) == ["e-admin", "echo"]
        assert c.app("echo")["description"] == "admin"
    # refusals are logged, once a minute per key and op
    log = server_log(server)
    assert log.count("refused job_add from key reader (reader)") == 1, log
    with client(server, "boss") as c:
        assert c.call("shutdown")["stopping"] is True
    wait_for(lambda: not (server.home / "server.json").exists(), what="server stopped")


def test_agent_messages_by_role(server):
    """hello (and so update and bye) only from agent and admin keys."""
    for role in ("submitter", "agent", "reader"):
        make_key(server, role, role)
    for name, ok in (("agent", True), ("client", True), ("submitter", False),
                     ("reader", False)):
        aid = f"{name}-{uuid.uuid4().hex[:8]}"
        d = dealer(server, name)
        try:
            d.send(P.encode(P.HELLO, agent=aid, **HELLO))
            kind, m = recv(d)
            if ok:
                assert kind == P.WELCOME and m["agent"] == aid
                d.send(P.encode(P.BYE, agent=aid, useq=1, updates=[], released=[]))
                assert recv(d)[0] == P.TASKS
            else:
                assert kind == P.ERROR and m["error"] == (
                    f"key '{name}' ({name}) may not speak as a node agent: give the agent a "
                    "key with the role agent"), m
                d.send(P.encode(P.UPDATE, agent=aid, useq=1, updates=[], demand=NO_DEMAND,
                                ack=0))
                assert recv(d)[0] == P.ERROR
        finally:
            d.close(linger=0)
    with server.client() as c:
        assert {a["id"].split("-")[0] for a in c.agents(all=True)} == {"agent", "client"}


# -- ownership ---------------------------------------------------------------------------------
def test_submitters_change_only_their_own_jobs(server):
    make_key(server, "alice", None)  # the default role: submitter
    make_key(server, "bob", "submitter")
    make_key(server, "rita", "reader")
    job = {"application": "echo", "parameters": {"x": "1"}}
    with server.client() as c:
        c.add_app(ECHO)
        old = c.add_jobs([{**job, "name": "admins"}])
    with client(server, "alice") as a, client(server, "bob") as b, \
            client(server, "rita") as r, server.client() as adm:
        mine = a.add_jobs([{**job, "name": f"a{i}", "tags": ["t"]} for i in range(3)])
        theirs = b.add_jobs([{**job, "name": f"b{i}", "tags": ["t"]} for i in range(2)])
        assert a.job(mine[0])["owner"] == "alice" and r.job(theirs[0])["owner"] == "bob"
        assert adm.job(old[0])["owner"] == "client"
        assert {j["id"]: j["owner"] for j in r.jobs()} == {
            old[0]: "client", **{i: "alice" for i in mine}, **{i: "bob" for i in theirs}}
        with pytest.raises(Forbidden, match="may not job_add"):
            r.add_job(name="no", **job)

        def snapshot():
            return adm.jobs(limit=0), adm.counts()
        before = snapshot()
        calls = [lambda f: a.kill_jobs(f), lambda f: a.retry_jobs(f),
                 lambda f: a.alter_jobs(f, priority=7), lambda f: a.remove_jobs(f),
                 lambda f: a.alter_jobs(f, state="USER_KILLED")]
        for call in calls:
            for f in ({"ids": [theirs[0]]}, {"ids": [mine[0], theirs[1]]}, {"tag": "t"},
                      {"ids": old}):
                with pytest.raises(Forbidden) as exc:
                    call(f)
                msg = str(exc.value)
                assert "\n" not in msg and msg.startswith(
                    "key 'alice' (submitter) may change only the jobs it added: "), msg
                assert msg.endswith("nothing changed"), msg
        with pytest.raises(Forbidden, match=r"2 of the 5 matching jobs are not its own "
                                             rf"\({theirs[0]}, {theirs[1]}\)"):
            a.kill_jobs({"tag": "t"})
        for op in ("job_kill", "job_retry", "job_rm"):
            with pytest.raises(Forbidden, match=f"may not {op}"):
                r.call(op, filter={"ids": mine})
        assert snapshot() == before  # nothing changed by any of those
        # its own: yes (a tag filter that matches only its own jobs too)
        assert a.alter_jobs({"ids": mine}, priority=3)["changed"] == mine
        assert a.kill_jobs({"ids": mine[:1]})["changed"] == mine[:1]
        assert a.retry_jobs({"ids": mine[:1]})["changed"] == mine[:1]
        assert a.remove_jobs({"ids": mine[2:]}) == {"removed": 1}
        assert b.kill_jobs({"tag": "t", "name": "b1"})["changed"] == [theirs[1]]
        assert b.retry_jobs({"tag": "t", "owner": "bob"})["changed"] == [theirs[1]]
        assert [j["id"] for j in r.jobs({"owner": "bob"})] == theirs
        # the admin changes anything, old ownerless jobs included
        assert adm.kill_jobs({"tag": "t"})["matched"] == 4
        assert adm.remove_jobs({"ids": old + theirs}) == {"removed": 3}
    # the owner in `job show` and `job ls --json`
    r = cli_as(server, "rita", "job", "show", str(mine[0]))
    assert r.returncode == 0 and "owner: alice" in r.stdout, r.stdout + r.stderr
    r = cli_as(server, "rita", "job", "ls", "--json")
    assert r.returncode == 0 and {j["owner"] for j in json.loads(r.stdout)} == {"alice"}
    r = cli_as(server, "alice", "job", "kill", "--owner", "alice", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["matched"] == 2, r.stderr
    r = cli_as(server, "rita", "job", "ls", "--owner", "bob", "--json")
    assert r.returncode == 0 and json.loads(r.stdout) == [], r.stdout
    one_line_error(cli_as(server, "rita", "job", "kill", str(mine[0])),
                   "may not job_kill: it needs the role submitter or admin")
    one_line_error(cli_as(server, "bob", "job", "rm", str(mine[0])),
                   "may change only the jobs it added")


def test_role_change_and_revocation_apply_to_the_next_message(server):
    make_key(server, "carol", "reader")
    with server.client() as adm:
        adm.add_app(ECHO)
    with client(server, "carol") as c:  # one connection throughout
        with pytest.raises(Forbidden, match="may not job_add"):
            c.add_job(name="x", application="echo", parameters={"x": "1"})
        run_cli(server.home, "keys", "role", "carol", "submitter", check=True)
        (jid,) = c.add_jobs([{"name": "x", "application": "echo", "parameters": {"x": "1"}}])
        assert c.job(jid)["owner"] == "carol"
        run_cli(server.home, "keys", "role", "carol", "agent", check=True)
        with pytest.raises(Forbidden, match=r"key 'carol' \(agent\) may not job_show"):
            c.job(jid)
        # a broken roles.json: no key may do anything (not even the admin) until it is fixed
        path = server.home / "keys" / "roles.json"
        good = path.read_text()
        path.write_text("{not json")
        with pytest.raises(Forbidden, match="may do nothing: .*roles.json: not JSON"):
            c.ping()
        with server.client() as adm, pytest.raises(Forbidden, match="key 'client' may do "
                                                                   "nothing"):
            adm.ping()
        path.write_text(good)
        with pytest.raises(Forbidden, match=r"\(agent\) may not ping"):
            c.ping()
        run_cli(server.home, "keys", "role", "carol", "reader", check=True)
        assert c.ping()
        run_cli(server.home, "keys", "revoke", "carol", check=True)
        with pytest.raises(Forbidden, match="this key may do nothing: its key is no longer "
                                            "authorized"):
            c.ping()
    assert "roles: " in server_log(server) and "every request is refused" in server_log(server)


def test_unknown_request_arguments_are_refused(server):
    with server.client() as c:
        c.add_app(ECHO)
        for op, args, bad in (
                ("job_ls", {"filter": {}, "limt": 5}, "limt"),
                ("ping", {"x": 1}, "x"),
                ("job_add", {"jobs": [{"name": "j", "application": "echo",
                                       "parameters": {"x": "1"}}], "owner": "bob"}, "owner"),
                ("job_kill", {"filter": {"ids": [1]}, "force": True, "user": "x"},
                 "force, user"),
                ("pilot_update", {"id": "p", "nodes": 3}, "nodes")):
            with pytest.raises(ValidationError) as exc:
                c.call(op, **args)
            msg = str(exc.value)
            assert msg.startswith(f"{op}: unknown argument(s) {bad}; it takes "), msg
            assert "\n" not in msg
        assert c.jobs() == []  # the refused job_add added nothing
    make_key(server, "rita", "reader")
    with client(server, "rita") as r:  # the role is checked first: no argument list leaks
        with pytest.raises(Forbidden):
            r.call("job_add", jobs=[], bogus=1)


# -- agents and their keys ---------------------------------------------------------------------
def test_an_agent_key_runs_agents_and_nothing_else(server, tmp_path):
    pair = make_key(server, "nodes", "agent")
    with client(server, "nodes") as c:
        for op, kw in (("job_add", {"jobs": []}), ("job_ls", {}), ("ping", {}),
                       ("agent_ls", {})):
            with pytest.raises(Forbidden, match=rf"key 'nodes' \(agent\) may not {op}"):
                c.call(op, **kw)
    with server.client() as c:
        c.add_app(ECHO)
        ids = c.add_jobs([{"name": f"j{i}", "application": "echo", "parameters": {"x": "1"}}
                          for i in range(5)])
    server.agent("--client-key", str(pair), "--idle-timeout", "2",
                 work_root=tmp_path / "w")
    with server.client() as c:
        c.wait({"ids": ids}, timeout=60)
        assert c.counts({"ids": ids}) == {"JOB_FINISHED": 5}
    # a submitter's key cannot run an agent: it is refused and says why
    sub = make_key(server, "sub", "submitter")
    log = tmp_path / "sub-agent.log"
    p = server.agent("--client-key", str(sub), "--idle-timeout", "2", log=log,
                     work_root=tmp_path / "w2")
    wait_for(lambda: "may not speak as a node agent" in log.read_text(errors="replace"),
             what="the agent says why it is refused")
    p.terminate()
    p.wait(15)


def _hello(d: zmq.Socket, aid: str, **kw):
    d.send(P.encode(P.HELLO, agent=aid, **{**HELLO, **kw}))
    return recv(d)


def test_an_agent_id_belongs_to_its_key(server, tmp_path):
    """Another key cannot say hello as an agent, nor speak for it over a takeover of its
    routing id (ROUTER_HANDOVER), and the agent keeps working; the binding survives a server
    restart, and the agent's own key re-adopts it."""
    make_key(server, "n1", "agent")
    make_key(server, "n2", "agent")
    with server.client() as c:
        c.add_app(ECHO)
        (jid,) = c.add_jobs([{"name": "j", "application": "echo", "parameters": {"x": "1"}}])
    aid, route = f"victim-{uuid.uuid4().hex[:8]}", f"r-{uuid.uuid4().hex}".encode()
    victim = dealer(server, "n1", route)
    intruders = []
    try:
        assert _hello(victim, aid)[0] == P.WELCOME
        victim.send(P.encode(P.UPDATE, agent=aid, useq=1, updates=[], ack=0,
                             demand={**NO_DEMAND, "cores": 1}))
        kind, m = recv(victim)
        assert kind == P.TASKS and [t["job"] for t in m["tasks"]] == [jid]
        attempt = m["tasks"][0]["attempt"]
        seq = m["seq"]
        # another key, its own connection: hello as the victim is refused (also by an admin)
        for name in ("n2", "client"):
            d = dealer(server, name)
            intruders.append(d)
            kind, m = _hello(d, aid)
            assert kind == P.ERROR and m["error"] == (
                f"agent id {aid} belongs to another key; key '{name}' may not say hello as it")
        # another key takes the routing id over (handover): its update and bye are refused,
        # and so are a hello as the victim and a hello of a new id on that routing id
        thief = dealer(server, "n2", route)
        intruders.append(thief)
        thief.send(P.encode(P.UPDATE, agent=aid, useq=2, ack=seq, demand=NO_DEMAND,
                            updates=[{"job": jid, "attempt": attempt,
                                      "states": ["RUNNING", "RUN_FAILED"]}]))
        kind, m = recv(thief)
        assert kind == P.ERROR and m["error"] == \
            f"agent {aid} belongs to another key; key 'n2' may not update for it"
        thief.send(P.encode(P.BYE, agent=aid, useq=3, updates=[], released=[
            {"job": jid, "attempt": attempt}]))
        kind, m = recv(thief)
        assert kind == P.ERROR and "may not bye for it" in m["error"]
        kind, m = _hello(thief, aid)
        assert kind == P.ERROR and "belongs to another key" in m["error"]
        kind, m = _hello(thief, f"new-{uuid.uuid4().hex[:8]}")
        assert kind == P.ERROR and m["error"] == (
            f"agent {aid} of another key uses this routing id; key 'n2' may not take it over")
        with server.client() as c:  # the lease is untouched
            j = c.job(jid)
            assert j["agent"] == aid and j["state"] == "READY", j
            assert [a["id"] for a in c.agents() if a["id"] == aid] == [aid]
        thief.close(linger=0)
        # the handover left the victim's connection dead (libzmq drops what it sends): it
        # connects again, as an agent does, with its key and routing id, and carries on
        victim.close(linger=0)
        victim = dealer(server, "n1", route)
        victim.send(P.encode(P.UPDATE, agent=aid, useq=2, ack=seq, demand=NO_DEMAND,
                             updates=[{"job": jid, "attempt": attempt, "start": time.time(),
                                       "end": time.time(), "exit": 0,
                                       "states": ["STAGED_IN", "PREPROCESSED", "RUNNING",
                                                  "EXECUTION_FINISHED", "POSTPROCESSED",
                                                  "STAGED_OUT", "JOB_FINISHED"]}]))
        kind, m = recv(victim, 10)
        assert kind == P.TASKS and m["uack"] == 2 and m["refused"] == [], (kind, m)
        with server.client() as c:
            assert c.job(jid)["state"] == "JOB_FINISHED"
        log = server_log(server)
        assert re.search(rf"refused hello as agent {aid} from key n2 \(agent\): agent id "
                         rf"{aid} belongs to another key", log), log
        assert f"refused update as agent {aid} from key n2" in log
        # throttled: the same refusal again within a minute adds no line
        d = dealer(server, "n2")
        intruders.append(d)
        assert _hello(d, aid)[0] == P.ERROR
        assert server_log(server).count(f"refused hello as agent {aid} from key n2") == 1
    finally:
        for d in intruders:
            d.close(linger=0)
        victim.close(linger=0)
    # the binding outlives a server restart; the agent's own key re-adopts its id
    server.stop()
    server.start()
    d = dealer(server, "n2")
    try:
        kind, m = _hello(d, aid)
        assert kind == P.ERROR and "belongs to another key" in m["error"]
    finally:
        d.close(linger=0)
    again = dealer(server, "n1", f"r-{uuid.uuid4().hex}".encode())
    try:
        kind, m = _hello(again, aid)
        assert kind == P.WELCOME and m["agent"] == aid
    finally:
        again.close(linger=0)


def test_a_real_agents_id_cannot_be_taken_by_another_key(server, tmp_path):
    """A real agent process (the home's admin pair) keeps its jobs while another key says
    hello with its id: refused, logged, and the agent's jobs all finish."""
    make_key(server, "mallory", "agent")
    with server.client() as c:
        c.add_app({"name": "slow", "executable": "/bin/sleep", "args": ["{t}"],
                   "parameters": {"t": {"type": "str"}}})
        ids = c.add_jobs([{"name": f"s{i}", "application": "slow", "parameters": {"t": "0.3"}}
                          for i in range(6)])
    server.agent("--idle-timeout", "3", cores="0", work_root=tmp_path / "w")
    with server.client() as c:
        agent = wait_for(lambda: [a for a in c.agents()], what="the agent")[0]
    d = dealer(server, "mallory")
    try:
        kind, m = _hello(d, agent["id"])
        assert kind == P.ERROR and "belongs to another key" in m["error"]
    finally:
        d.close(linger=0)
    with server.client() as c:
        c.wait({"ids": ids}, timeout=60)
        assert c.counts({"ids": ids}) == {"JOB_FINISHED": 6}
        assert {j["agent"] for j in c.jobs()} == {None}
    assert f"refused hello as agent {agent['id']} from key mallory" in server_log(server)


def test_without_curve_every_caller_is_admin(tmp_path):
    """`server start --insecure` (loopback only) has no keys: whoever connects is admin, and
    the jobs it adds have no owner (so only admins change them: every caller here)."""
    home = tmp_path / "h"
    try:
        run_cli(home, "server", "start", "--insecure", check=True)
        with Client(home=home) as c:
            c.add_app(ECHO)
            (jid,) = c.add_jobs([{"name": "j", "application": "echo",
                                  "parameters": {"x": "1"}}])
            assert c.job(jid)["owner"] is None
            assert c.kill_jobs({"ids": [jid]})["changed"] == [jid]
            with pytest.raises(ValidationError, match="unknown argument"):
                c.call("ping", x=1)
    finally:
        run_cli(home, "server", "stop")


def test_a_key_file_with_a_bad_name_gets_no_role(server, tmp_path):
    """A key copied into authorized/ by hand under a name `keys` would refuse (too long, odd
    characters) is admitted by ZAP but may do nothing: its name would be stored as an owner."""
    ext = tmp_path / "ext"
    run_cli(ext, "keys", "init", "--client", "odd", check=True)
    for bad in ("x" * 80, "has space"):
        target = server.home / "keys" / "authorized" / f"{bad}.key"
        target.write_bytes((ext / "keys" / "odd.key").read_bytes())
        os.chmod(target, 0o600)
        with Client(server.address, ext, server_key=server.home / "keys" / "server.key",
                    client_key=ext / "keys" / "odd.key_secret", timeout=10) as c:
            with pytest.raises(Forbidden, match="not a valid key name"):
                c.add_job(name="j", application="echo", parameters={"x": "1"})
        target.unlink()
