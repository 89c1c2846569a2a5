"""The attack battery, by class: what a job message, a request or a key can try, and what it got.

An outside battery, using only the README, the CLI, the Python API and the wire, found eight
harmful outcomes where our own said "119 of 119 blocked". This one is written the same way --
from the outside, against one real server (CurveZMQ on loopback) and one real agent -- and it
judges each attempt by its outcome, not by whether an error came back:

- refused: a clear one-line error at the door, or the job ended in a failure state saying why;
- harmless: accepted, and nothing the detectors watch changed;
- harmful: a file appeared or changed outside the job's own places (the home's keys, a victim
  folder outside the data roots, /tmp), a key was admitted, the server or the agent stopped
  answering, another request's work was lost, or a refused request changed the database.

Classes: paths, devices, sizes, integers, echoes, pipelining, roles, agent ids, admin tier.
The summary (attempts, refused, harmless, harmful per class) is printed and written to
``battery.json`` in the test's temporary folder; every class must have 0 harmful.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import sqlite3
import stat
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import zmq

from conftest import ServerHandle, run_cli, wait_for
from pilotfish import keys as K
from pilotfish import protocol as P
from pilotfish.client import Client
from pilotfish.errors import PilotfishError
from test_bad_input import dealer, recv_msg, req

FINAL = {"JOB_FINISHED", "FAILED", "USER_KILLED"}
TOKEN = f"pfbat{uuid.uuid4().hex[:6]}"
STAGE_CAP = 1 << 20  # the agent's byte cap for this battery


class Tally:
    def __init__(self) -> None:
        self.rows: dict[str, dict] = {}

    def add(self, cls: str, outcome: str, what: str) -> None:
        r = self.rows.setdefault(cls, {"attempts": 0, "refused": 0, "harmless": 0,
                                       "harmful": 0, "harmful_examples": []})
        r["attempts"] += 1
        r[outcome] += 1
        if outcome == "harmful":
            r["harmful_examples"].append(what[:300])


def tree_state(*roots: Path, skip: tuple[Path, ...] = ()) -> dict[str, str]:
    """Every path under ``roots`` (not under ``skip``) with a hash of its content."""
    out = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            if any(dirpath.startswith(str(s)) for s in skip):
                dirnames[:] = []
                continue
            for n in filenames:
                p = os.path.join(dirpath, n)
                try:
                    st = os.lstat(p)
                    if stat.S_ISREG(st.st_mode) and st.st_size < 1 << 20:
                        out[p] = hashlib.sha1(Path(p).read_bytes()).hexdigest()
                    else:
                        out[p] = f"{stat.S_IFMT(st.st_mode)}:{st.st_size}"
                except OSError:
                    pass
            for n in dirnames:
                out[os.path.join(dirpath, n) + "/"] = "dir"
    return out


class World:
    """One server, one agent, a data root, and the things an attacker would like to touch."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.home = root / "home"
        self.data = root / "data"
        self.outside = root / "outside"
        self.work = root / "work"
        for d in (self.home, self.data, self.outside, self.work):
            d.mkdir(parents=True)
        (self.outside / "victim.txt").write_text("precious\n")
        (self.data / "in.txt").write_text("input\n")
        (self.data / "existing").mkdir()
        (self.data / "existing" / "job.out").write_text("someone else's output\n")
        self.env = {"PILOTFISH_DATA_ROOTS": str(self.data),
                    "PILOTFISH_STAGE_MAX_BYTES": str(STAGE_CAP),
                    "PILOTFISH_STAGE_TIMEOUT": "20"}
        self.server: ServerHandle | None = None
        self.agent: subprocess.Popen | None = None

    def start(self) -> "World":
        self.server = ServerHandle(self.home, f"sqlite:///{self.home / 'pilotfish.db'}").start()
        with self.client() as c:
            c.add_app({"name": "sim", "executable": "/bin/echo",
                       "args": ["{n}", "{x}", "{s}"],
                       "parameters": {"n": {"type": "int", "default": 1},
                                      "x": {"type": "float", "default": 0.5},
                                      "s": {"type": "str", "default": "a"}}})
            c.add_app({"name": "writer", "executable": "/bin/sh",
                       "args": ["-c", "echo out > result.txt"]})
            # a job no agent here can hold (two nodes, no launcher): it stays queued, so jobs
            # that wait for it stay unfinished and unheld for as long as the battery needs
            self.gate = c.add_jobs([{"name": "gate", "application": "sim", "num_nodes": 2}])[0]
        # links an attacker planted inside the data root, pointing out of it
        (self.data / "to-keys").symlink_to(self.home / "keys")
        (self.data / "to-secret").symlink_to(self.home / "keys" / "server.key_secret")
        (self.data / "to-outside").symlink_to(self.outside)
        (self.data / "to-zero").symlink_to("/dev/zero")
        os.mkfifo(self.data / "fifo")
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(str(self.data / "sock"))
        (self.data / "tree-with-fifo").mkdir()
        (self.data / "tree-with-fifo" / "ok.txt").write_text("ok\n")
        os.mkfifo(self.data / "tree-with-fifo" / "pipe")
        with open(self.data / "big.bin", "wb") as f:  # over the cap, sparse
            f.truncate(STAGE_CAP * 4)
        (self.data / "bigtree").mkdir()
        for i in range(3):
            (self.data / "bigtree" / f"part{i}").write_bytes(b"x" * (STAGE_CAP // 2))
        self.agent = self.server.agent(cores="0", work_root=self.work)
        wait_for(lambda: self.client().call("agent_ls"), 20, what="the agent joined")
        return self

    def client(self, key: Path | None = None) -> Client:
        return Client(self.server.address, self.home, timeout=20, client_key=key) \
            if key else self.server.client(timeout=20)

    def protected(self) -> dict[str, str]:
        """What no job may create or change: the home (but its database, log and job
        bookkeeping), the victim folder, and our own names in /tmp."""
        state = tree_state(self.home, self.outside)
        # in the data root, new folders of jobs' own are the point; what was there must stay
        for f in (self.data / "existing" / "job.out", self.data / "in.txt"):
            state[str(f)] = hashlib.sha1(f.read_bytes()).hexdigest() if f.exists() else "gone"
        state = {k: v for k, v in state.items()
                 if not k.startswith((str(self.home / "pilotfish.db"), str(self.home / "server"),
                                      str(self.home / "agent-"), str(self.home / "logs")))}
        state.update({str(p): "tmp" for p in Path("/tmp").glob(f"{TOKEN}*")})
        return state

    def alive(self) -> bool:
        try:
            with self.client() as c:
                agents = c.call("agent_ls")
                return bool(c.ping(timeout=5)) and self.agent.poll() is None and agents
        except PilotfishError:
            return False

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop_agents()
            self.server.stop()
        self.sock.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("battery").resolve()
    mp = pytest.MonkeyPatch()
    w = World(root)
    for k, v in w.env.items():
        mp.setenv(k, v)
    try:
        yield w.start()
    finally:
        w.stop()
        mp.undo()


@pytest.fixture(scope="module")
def tally(world):
    t = Tally()
    yield t
    print("\nattack battery: class, attempts, refused, harmless, harmful")
    for cls, r in t.rows.items():
        print(f"  {cls:12} {r['attempts']:4} {r['refused']:4} {r['harmless']:4} "
              f"{r['harmful']:4} {r['harmful_examples'][:3] or ''}")
    (world.root / "battery.json").write_text(json.dumps(t.rows, indent=1))


def refusal(fn) -> str | None:
    """The one-line error of a refused call, or None if it was accepted."""
    try:
        fn()
    except PilotfishError as exc:
        text = str(exc)
        assert text and "\n" not in text and len(text) < 2000, text[:300]
        return text
    return None


def run_jobs(world: World, cls: str, tally: Tally, jobs: list[tuple[str, dict]],
             timeout: float = 90) -> None:
    """Submit each job message alone; a refused one is 'refused'. The accepted ones run; each
    that ends in a failure state with a reason is 'refused' by the agent, one that finishes is
    'harmless' -- unless the protected places changed, the server or agent stopped answering:
    then every accepted attempt of the class counts as harmful."""
    before = world.protected()
    accepted: list[tuple[str, int]] = []
    with world.client() as c:
        for what, job in jobs:
            job = {"application": "sim", **job, "name": f"b{len(accepted)}x{uuid.uuid4().hex[:4]}"}
            err = refusal(lambda: accepted.append((what, c.add_jobs([job])[0])))
            if err is not None:
                tally.add(cls, "refused", what)
        ids = [j for _, j in accepted]
        if ids:
            wait_for(lambda: sum(n for s, n in c.counts({"ids": ids}).items() if s in FINAL)
                     == len(ids), timeout, what=f"{cls}: accepted jobs final")
    after = world.protected()
    changed = sorted(set(after.items()) ^ set(before.items()))
    healthy = world.alive()
    with world.client() as c:
        for what, j in accepted:
            job = c.job(j)
            if changed or not healthy:
                tally.add(cls, "harmful", f"{what}: changed {changed[:4]}, healthy {healthy}")
            elif job["state"] == "JOB_FINISHED":
                tally.add(cls, "harmless", what)
            elif job["message"]:
                tally.add(cls, "refused", what)
            else:
                tally.add(cls, "harmful", f"{what}: {job['state']} without a reason")


# -- paths -----------------------------------------------------------------------------------
def test_paths(world, tally):
    h, d, o = world.home, world.data, world.outside
    outputs = [f"/tmp/{TOKEN}-x", f"file:///tmp/{TOKEN}-y", f"{h}/keys/authorized",
               f"file://{h}/keys/authorized", str(h), f"{h}/keys", f"{h}/work", f"{h}/sites",
               f"{d}/../outside", f"{d}/a/../../outside", "relative/out", "out",
               f"file://otherhost{d}/x", f"file://{d}/%2e%2e/outside", f"{d}/to-keys",
               f"{d}/to-keys/authorized", f"{d}/to-outside", str(o), f"{o}/victim.txt",
               "//etc", f"{d}\n/x", "-rf", "--output=/etc", "file:", "file://", "weird://x/y",
               f"{d}/existing", f"{d}/in.txt", "/proc/self/cwd", "/dev/shm/" + TOKEN,
               "~/.ssh", "$HOME/.ssh", f"{d}/./../outside"]
    inputs = [f"{h}/keys/server.key_secret", f"{h}/keys/client.key_secret", f"{h}/pilotfish.db",
              f"{h}/server.json", f"{h}/keys", str(h), "/etc/shadow", "/etc/passwd",
              f"{d}/to-secret", f"{d}/to-keys", f"{d}/../home/keys", "/proc/self/environ",
              "/proc/1/mem", f"file://{h}/keys/server.key_secret", "relative.txt", f"{o}/victim.txt",
              f"{d}/to-outside", "file://otherhost/etc/passwd", "~root", f"{d}/%2e%2e/home"]
    jobs = [(f"output_url={u!r}", {"application": "writer", "output_url": u}) for u in outputs]
    jobs += [(f"input_url={u!r}", {"input_url": u}) for u in inputs]
    jobs += [("good input and output", {"application": "writer", "input_url": f"{d}/in.txt",
                                        "output_url": f"{d}/results"}),
             ("output into an existing folder", {"application": "writer",
                                                 "output_url": f"{d}/existing"})]
    run_jobs(world, "paths", tally, jobs)
    # job alter onto the same targets: refused at the door, nothing changed
    with world.client() as c:
        jid = c.add_jobs([{"name": "alterme", "application": "writer",
                           "parents": [world.gate]}])[0]
        before = c.job(jid)  # waits for its parent: no agent holds it, so it may be altered
        # the door is lexical (the server never waits on a file system); what only symlinks make
        # bad is the node's to refuse, and the jobs above showed it does
        lexically_bad = [u for u in outputs if not (u.startswith(f"{d}/") and ".." not in u
                                                     and "%" not in u and "\n" not in u)]
        for u in lexically_bad:
            for key in ("output_url", "input_url"):
                err = refusal(lambda: c.alter_jobs({"ids": [jid]}, **{key: u}))
                after = c.job(jid)
                ok = err is not None and after[key] == before[key]
                tally.add("paths", "refused" if ok else "harmful", f"alter {key}={u!r}: {err}")
    r = run_cli(world.home, "job", "add", "--name", "cli", "--app", "writer", "--output-url",
                f"/tmp/{TOKEN}-cli")
    tally.add("paths", "refused" if r.returncode and len(r.stderr.splitlines()) == 1
              else "harmful", f"CLI --output-url /tmp: {r.stderr}")
    assert not any(r["harmful"] for r in tally.rows.values()), tally.rows
    assert (world.data / "existing" / "job.out").read_text() == "someone else's output\n"
    assert not list(Path("/tmp").glob(f"{TOKEN}*"))


# -- devices and sizes -----------------------------------------------------------------------
def test_devices(world, tally):
    d = world.data
    jobs = [(f"input_url={u!r}", {"input_url": u}) for u in
            ["/dev/zero", "file:///dev/zero", "/dev/ptmx", "/dev/urandom", "/dev/null",
             "/dev/stdin", "/dev/tty", "/proc/self/fd/0", "/dev/full", f"{d}/fifo", f"{d}/sock",
             f"{d}/tree-with-fifo", f"{d}/to-zero"]]
    t0 = time.time()
    run_jobs(world, "devices", tally, jobs, timeout=60)
    assert time.time() - t0 < 60
    assert not any(r["harmful"] for r in tally.rows.values()), tally.rows


def test_sizes(world, tally):
    d = world.data
    run_jobs(world, "sizes", tally, [
        ("input file over the byte cap", {"input_url": f"{d}/big.bin"}),
        ("input tree over the byte cap", {"input_url": f"{d}/bigtree"})])
    free = {p: sum(f.stat().st_size for f in world.work.rglob("*") if f.is_file())
            for p in [world.work]}
    assert free[world.work] <= 2 * STAGE_CAP, free
    with world.client() as c:
        for what, job in [
                ("10 MB job name", {"name": "n" * 10_000_000}),
                ("10 MB description", {"name": "d", "description": "d" * 10_000_000}),
                ("1 MB str parameter", {"name": "p", "parameters": {"s": "a" * 1_000_000}}),
                ("100k tags", {"name": "t", "tags": [f"t{i}" for i in range(100_000)]}),
                ("deep nesting", {"name": "x", "parameters": {"s": [[[[[[[]]]]]]]}})]:
            err = refusal(lambda: c.add_jobs([{"application": "sim", **job}]))
            ok = err is not None and len(err) < 1000
            tally.add("sizes", "refused" if ok else "harmful", f"{what}: {len(err or '')}")
    assert not any(r["harmful"] for r in tally.rows.values()), tally.rows


# -- integers and echoes -----------------------------------------------------------------------
BIG = [10**26, -10**26, 2**63, -2**63 - 1, 2**64, 2**31, -2**31 - 1, 10**30]


def test_integers(world, tally):
    jobs = [(f"int parameter {v}", {"parameters": {"n": v}}) for v in BIG]
    jobs += [(f"float parameter {v}", {"parameters": {"x": v}})
             for v in (float("inf"), float("-inf"), float("nan"), 1e308 * 10)]
    for key in ("priority", "max_retries", "wall_time_minutes", "num_nodes",
                "processes_per_node", "cpus_per_process", "gpus_per_process"):
        jobs += [(f"{key}={v}", {key: v}) for v in (2**31, 2**63, 10**30, -1, -2**63 - 1)]
    jobs += [(f"parents=[{v}]", {"parents": [v]}) for v in (2**63, 10**30, -1, 0)]
    run_jobs(world, "integers", tally, jobs)
    with world.client() as c:
        for v in (10**30, 2**64, -2**64):  # the Python API: a pilotfish error, not msgpack's
            err = refusal(lambda: c.add_jobs([{"name": "i", "application": "sim",
                                               "parameters": {"n": v}}]))
            tally.add("integers", "refused" if err else "harmful", f"Client {v}: {err}")
            err = refusal(lambda: c.jobs({"ids": [v]}))
            tally.add("integers", "refused" if err else "harmful", f"filter id {v}: {err}")
        for args in ({"id": 2**63}, {"id": 10**30}, {"id": -1}):
            err = refusal(lambda: c.call("job_show", **args))
            tally.add("integers", "refused" if err else "harmful", f"job_show {args}: {err}")
        assert c.ping()
    for v in ("1_0", "99999999999999999999999", "1e400", "0x10", "١٢"):  # on the CLI
        r = run_cli(world.home, "job", "add", "--name", "cli", "--app", "sim", "--param",
                    f"n={v}")
        ok = r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1
        tally.add("integers", "refused" if ok else "harmful", f"CLI n={v}: {r.stderr.strip()}")
    assert not any(r["harmful"] for r in tally.rows.values()), tally.rows


def test_echoes(world, tally):
    """A refused value is never echoed whole: errors stay short whatever was sent."""
    huge = "n" * 5_000_000
    with world.client() as c:
        for what, fn in [
                ("job name", lambda: c.add_jobs([{"name": huge, "application": "sim"}])),
                ("app name", lambda: c.add_jobs([{"name": "a", "application": huge}])),
                ("str parameter", lambda: c.add_jobs([{"name": "a", "application": "sim",
                                                       "parameters": {"s": "$" + huge}}])),
                ("unknown key", lambda: c.add_jobs([{"name": "a", "application": "sim",
                                                     huge: 1}])),
                ("site", lambda: c.add_jobs([{"name": "a", "application": "sim",
                                              "site": huge}])),
                ("filter", lambda: c.jobs({"name": "x", "state": huge})),
                ("output_url", lambda: c.add_jobs([{"name": "a", "application": "sim",
                                                    "output_url": "/" + huge}])),
                ("op name", lambda: c.call(huge)),
                ("app spec", lambda: c.add_app({"name": "e", "executable": huge}))]:
            err = refusal(fn)
            ok = err is not None and len(err) <= 1000
            tally.add("echoes", "refused" if ok else "harmful", f"{what}: {len(err or '')}")
        assert c.ping()
    assert not any(r["harmful"] for r in tally.rows.values()), tally.rows


# -- pipelining ------------------------------------------------------------------------------
def test_pipelining(world, tally):
    """Good requests pipelined around bad ones on one connection (and a row an older version
    stored with a 26-digit integer): every good one is answered and stored."""
    db = world.home / "pilotfish.db"
    with world.client() as c:
        old = c.add_jobs([{"name": "old", "application": "sim"}])[0]
    with sqlite3.connect(db, timeout=10) as conn:  # as an unchecked older version wrote it
        conn.execute("UPDATE jobs SET parameters = ? WHERE id = ?",
                     (json.dumps({"n": 10**26, "x": 0.5, "s": "a"}), old))
    bad_requests = [("job_show", {"id": old}), ("job_ls", {"filter": {"ids": [old]}}),
                    ("job_add", {"jobs": [{"name": "x", "application": "sim",
                                           "parameters": {"n": 10**20}}]}),
                    ("job_show", {"id": 2**63}), ("no_such_op", {}),
                    ("job_add", {"jobs": "not a list"}), ("job_ls", {"filter": [1]})]
    for op, args in bad_requests:
        tag = uuid.uuid4().hex[:6]
        s = dealer(world.server.address)
        try:
            try:
                s.send(req(rid=1, op="job_add", args={"jobs": [{"name": f"A{tag}",
                                                                "application": "sim"}]}))
                s.send(req(rid=2, op=op, args=args))
            except Exception:  # could not even be encoded here: that is a refusal too
                pass
            s.send(req(rid=3, op="job_add", args={"jobs": [{"name": f"B{tag}",
                                                            "application": "sim"}]}))
            answers = {}
            while True:
                got = recv_msg(s, timeout=10)
                if got is None:
                    break
                answers[got[1]["rid"]] = got
                if {1, 3} <= answers.keys() and (2 in answers or len(answers) == 2):
                    if 2 in answers or recv_msg(s, timeout=1) is None:
                        break
        finally:
            s.close(linger=0)
        with world.client() as c:
            stored = {j["name"] for j in c.jobs({"name": f"A{tag}"}, limit=0)} | \
                {j["name"] for j in c.jobs({"name": f"B{tag}"}, limit=0)}
        ok = (stored == {f"A{tag}", f"B{tag}"} and answers.get(1, (None,))[0] == P.REPLY
              and answers.get(3, (None,))[0] == P.REPLY)
        tally.add("pipelining", "refused" if ok else "harmful",
                  f"{op} {str(args)[:60]}: stored {stored}, answered {sorted(answers)}")
    with world.client() as c:
        assert c.job(old)["id"] == old  # the odd row answers too
    assert not any(r["harmful"] for r in tally.rows.values()), tally.rows


# -- roles and agent ids ---------------------------------------------------------------------
def _key(world: World, name: str, role: str) -> Path:
    run_cli(world.home, "keys", "init", "--client", name, "--role", role, check=True)
    return world.home / "keys" / f"{name}.key_secret"


def test_roles(world, tally):
    with world.client() as admin:
        admins_job = admin.add_jobs([{"name": "admins", "application": "sim",
                                      "parents": [world.gate]}])[0]
        snapshot = lambda: (admin.counts(), admin.jobs(limit=0), admin.apps())  # noqa: E731
    tries = {
        "reader": [("job_add", {"jobs": [{"name": "r", "application": "sim"}]}),
                   ("app_add", {"spec": {"name": "r", "executable": "/bin/true"}}),
                   ("job_kill", {"filter": {"ids": [admins_job]}}),
                   ("job_rm", {"filter": {"ids": [admins_job]}}),
                   ("job_alter", {"filter": {"ids": [admins_job]}, "changes": {"priority": 9}}),
                   ("app_alter", {"name": "sim", "changes": {"executable": "/bin/sh"}}),
                   ("pilot_add", {"id": "p-reader", "nodes": 1}),
                   ("shutdown", {})],
        "submitter": [("app_add", {"spec": {"name": "s", "executable": "/bin/sh"}}),
                      ("app_alter", {"name": "sim", "changes": {"executable": "/bin/sh"}}),
                      ("app_rm", {"name": "sim"}),
                      ("job_kill", {"filter": {"ids": [admins_job]}}),
                      ("job_retry", {"filter": {"ids": [admins_job]}}),
                      ("job_rm", {"filter": {"ids": [admins_job]}}),
                      ("job_alter", {"filter": {"ids": [admins_job]},
                                     "changes": {"priority": 9}}),
                      ("job_kill", {"filter": {"app": "sim"}}),
                      ("shutdown", {})],
        "agent": [("job_add", {"jobs": [{"name": "g", "application": "sim"}]}),
                  ("job_ls", {}), ("job_show", {"id": admins_job}),
                  ("app_add", {"spec": {"name": "g", "executable": "/bin/sh"}}),
                  ("job_kill", {"filter": {"ids": [admins_job]}}), ("shutdown", {})]}
    for role, calls in tries.items():
        key = _key(world, f"{role}{TOKEN}", role)
        with world.client() as admin:
            before = snapshot()
        with world.client(key) as c:
            for op, args in calls:
                err = refusal(lambda: c.call(op, **args))
                tally.add("roles", "refused" if err else "harmful", f"{role} {op}: accepted")
        with world.client() as admin:
            ok = snapshot() == before and admin.ping()
        tally.add("roles", "refused" if ok else "harmful", f"{role}: database changed")
    # a submitter manages its own jobs, not others'
    sub = _key(world, f"sub2{TOKEN}", "submitter")
    with world.client(sub) as c:
        mine = c.add_jobs([{"name": "mine", "application": "sim", "parents": [admins_job]}])[0]
        ok = c.kill_jobs({"ids": [mine]})["changed"] == [mine]
        err = refusal(lambda: c.kill_jobs({"ids": [mine, admins_job]}))
        tally.add("roles", "refused" if ok and err else "harmful", f"mixed kill: {err}")
    with world.client() as admin:
        assert admin.job(admins_job)["state"] == "AWAITING_PARENTS"
    assert not any(r["harmful"] for r in tally.rows.values()), tally.rows


def test_agent_ids(world, tally):
    """Another key -- a submitter's, even another agent's -- cannot speak for an agent id."""
    with world.client() as c:
        real = c.call("agent_ls")[0]["id"]
    hello = dict(agent=real, host="evil", pid=1, site=None, pilot=None, cores=[0], gpus=[],
                 memory=2**30, time_left=None, running=[], ack=0)
    for role in ("submitter", "agent", "reader"):
        key = _key(world, f"imp{role}{TOKEN}", role)
        s = zmq.Context.instance().socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.ROUTING_ID, real.encode())
        K.apply_client(s, K.client_curve(world.home, world.server.address, None, key))
        s.connect(world.server.address)
        try:
            s.send(P.encode(P.HELLO, **hello))
            got = recv_msg(s, timeout=5)
            s.send(P.encode(P.UPDATE, agent=real, useq=1, updates=[], demand={
                "cores": 1, "gpus": 0, "max_cores": 1, "max_gpus": 0, "time_left": None},
                ack=0))
            got2 = recv_msg(s, timeout=3)
        finally:
            s.close(linger=0)
        ok = (got is not None and got[0] == P.ERROR
              and (got2 is None or got2[0] == P.ERROR))
        tally.add("agent ids", "refused" if ok else "harmful", f"{role} as {real}: {got} {got2}")
    # the real agent still works
    with world.client() as c:
        j = c.add_jobs([{"name": "after", "application": "sim"}])[0]
        wait_for(lambda: c.job(j)["state"] == "JOB_FINISHED", 30, what="the agent still works")
    assert not any(r["harmful"] for r in tally.rows.values()), tally.rows


# -- the admin tier --------------------------------------------------------------------------
def test_admin_tier(world, tally):
    with world.client() as c:
        for k in ("LD_PRELOAD", "LD_AUDIT", "BASH_ENV", "ENV", "BASH_FUNC_x%%", "PYTHONSTARTUP",
                  "NODE_OPTIONS", "PERL5OPT", "GCONV_PATH", "GLIBC_TUNABLES",
                  "PILOTFISH_JOB_ID", "JAVA_TOOL_OPTIONS"):
            for how in ("add", "alter"):
                if how == "add":
                    fn = lambda: c.add_app({"name": "envy", "executable": "/bin/true",  # noqa
                                            "environment": {k: "/tmp/evil.so"}})
                else:
                    fn = lambda: c.alter_app("sim", environment={k: "/tmp/evil.so"})  # noqa
                err = refusal(fn)
                tally.add("admin tier", "refused" if err else "harmful", f"{how} env {k}")
        waiting = c.add_jobs([{"name": "q", "application": "sim", "parents": [world.gate]}])
        for change in ({"executable": "/bin/sh"}, {"preprocess": ["/bin/sh"]},
                       {"postprocess": ["/bin/sh"]}, {"environment": {"X": "1"}},
                       {"args": ["-c", "id"]}):
            before = c.app("sim")
            err = refusal(lambda: c.alter_app("sim", **change))
            same = {k: v for k, v in c.app("sim").items() if k != "jobs"} == \
                {k: v for k, v in before.items() if k != "jobs"}
            tally.add("admin tier", "refused" if err and same else "harmful",
                      f"alter {change} with jobs queued: {err}")
        c.kill_jobs({"ids": waiting})
        for op, args in [("job_ls", {"bogus": 1}), ("job_show", {"id": 1, "extra": True}),
                         ("ping", {"x": 1}), ("job_add", {"jobs": [], "owner": "admin"})]:
            err = refusal(lambda: c.call(op, **args))
            tally.add("admin tier", "refused" if err else "harmful", f"{op} extra args {args}")
    assert not any(r["harmful"] for r in tally.rows.values()), tally.rows


def test_summary(world, tally):
    """Last: the whole battery left the server, the agent and the protected places sound."""
    assert world.alive()
    assert sum(r["attempts"] for r in tally.rows.values()) >= 200
    assert not any(r["harmful"] for r in tally.rows.values()), tally.rows
