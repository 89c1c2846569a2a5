"""`pilotfish job log`: tasks' output shipped by real agents through a real server, with no
shared file system assumed (the CLI reads only what the server stored)."""
from __future__ import annotations

import json
import os
import queue
import signal
import sqlite3
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest
import zmq

from pilotfish import keys
from pilotfish import protocol as P

from conftest import ServerHandle, pilotfish_cmd, run_cli, wait_for

PRINTER = Path(__file__).parent / "apps" / "printer.py"
FINAL = ("JOB_FINISHED", "FAILED", "USER_KILLED")


def _app(c) -> None:
    c.add_app({"name": "printer", "executable": sys.executable,
               "args": ["-S", "-I", str(PRINTER), "{mode}", "{arg}"],
               "parameters": {"mode": {"type": "str"},
                              "arg": {"type": "str", "pattern": "[A-Za-z0-9_./-]{1,400}"}}})


def _job(c, mode: str, arg: str = "none", **kw) -> int:
    [job] = c.add_jobs([{"name": f"p-{mode}", "application": "printer",
                         "parameters": {"mode": mode, "arg": arg}, **kw}])
    return job


def _final(c, job: int) -> bool:
    return c.job(job)["state"] in FINAL


def _stored(c, job: int, stream: str = "out") -> bytes:
    return b"".join(d for _, d in c.job_log(job, stream)["pieces"])


def _rows(home: Path, job: int | None = None) -> int:
    con = sqlite3.connect(home / "pilotfish.db")
    try:
        q = "SELECT COUNT(*) FROM job_output" + (" WHERE job_id = ?" if job else "")
        return con.execute(q, (job,) if job else ()).fetchone()[0]
    finally:
        con.close()


class _Lines:
    """A child process's standard output, line by line, with timeouts (a reader thread)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.q: queue.Queue = queue.Queue()
        self.t = threading.Thread(target=self._read, args=(proc.stdout,), daemon=True)
        self.t.start()

    def _read(self, f) -> None:
        for line in iter(f.readline, b""):
            self.q.put(line)
        self.q.put(None)

    def next(self, timeout: float = 60) -> bytes | None:
        return self.q.get(timeout=timeout)


def test_follow_sees_lines_while_the_job_runs_then_log_err_and_tail_after(
        server: ServerHandle, tmp_path):
    c = server.client()
    _app(c)
    gate = tmp_path / "gate"
    job = _job(c, "gate", str(gate))
    server.agent("--node-name", "nodeL", work_root=tmp_path / "w")
    wait_for(lambda: c.job(job)["state"] == "RUNNING", 60, what="RUNNING")
    follow = subprocess.Popen(pilotfish_cmd(server.home, "job", "log", str(job), "-f"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        lines = _Lines(follow)
        assert lines.next() == b"first line\n"
        # the task is still running (it waits for the gate): -f showed it while it runs
        assert c.job(job)["state"] == "RUNNING"
        assert follow.poll() is None
        gate.touch()
        assert lines.next() == b"second line\n"
        assert lines.next() is None  # the job is final: -f printed the rest and ended
        assert follow.wait(30) == 0
        assert follow.stderr.read() == b""
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.wait()
    assert c.job(job)["state"] == "JOB_FINISHED"
    r = run_cli(server.home, "job", "log", str(job), check=True)
    assert r.stdout == "first line\nsecond line\n" and r.stderr == ""
    assert run_cli(server.home, "job", "log", str(job), "--err", check=True).stdout == \
        "first err\n"
    assert run_cli(server.home, "job", "log", str(job), "--tail", "1",
                   check=True).stdout == "second line\n"
    assert run_cli(server.home, "job", "log", str(job), "--tail", "0", check=True).stdout == ""
    # a huge --tail is all of it (past 64 bits too), never an error
    for n in ("99999999999", str(10**30)):
        assert run_cli(server.home, "job", "log", str(job), "--tail", n,
                       check=True).stdout == "first line\nsecond line\n"
    # -f of a final job prints it all and ends
    assert run_cli(server.home, "job", "log", str(job), "-f", "--tail", "1",
                   check=True).stdout == "second line\n"
    d = json.loads(run_cli(server.home, "job", "log", str(job), "--json", check=True).stdout)
    assert d["text"] == "first line\nsecond line\n" and d["complete"] and not d["capped"]
    assert d["node"] == "nodeL" and d["path"].endswith("/job.out") and d["attempt"] == 1
    # the Python API: from an offset on
    r = c.job_log(job, after=len(b"first line\n"))
    assert r["pieces"] == [[11, b"second line\n"]] and r["next"] == 23


def test_a_job_that_never_ran_and_one_that_does_not_exist(server: ServerHandle, tmp_path):
    c = server.client()
    _app(c)
    job = _job(c, "lines", "3")  # no agent: it waits in the queue
    state = c.job(job)["state"]
    r = run_cli(server.home, "job", "log", str(job))
    assert r.returncode == 0 and r.stdout == ""
    assert r.stderr.strip() == f"job {job} has not run yet ({state}): no output yet"
    c.kill_jobs({"ids": [job]})
    r = run_cli(server.home, "job", "log", str(job), "-f")  # final: -f does not wait
    assert r.returncode == 0 and r.stdout == ""
    assert r.stderr.strip() == f"job {job} never ran (USER_KILLED): it has no output"
    r = run_cli(server.home, "job", "log", "424242")
    assert r.returncode != 0 and "no job 424242" in r.stderr and r.stderr.count("\n") == 1
    r = run_cli(server.home, "job", "log", str(job), "--json", "-f")
    assert r.returncode != 0 and "--json" in r.stderr
    # bad arguments at the door: one-line errors
    for args, words in (({"stream": "../etc"}, "'stream'"), ({"after": -1}, "'after'"),
                        ({"tail": -5}, "'tail'"), ({"tail": "9"}, "'tail'"),
                        ({"id": job, "follow": True}, "unknown argument")):
        with pytest.raises(Exception) as exc:
            c.call("job_log", **{"id": job, **args})
        assert words in str(exc.value) and "\n" not in str(exc.value)
    # a job that ran and printed nothing
    job2 = _job(c, "lines", "0")
    server.agent(work_root=tmp_path / "w")
    wait_for(lambda: _final(c, job2), 60, what="job final")
    r = run_cli(server.home, "job", "log", str(job2), check=True)
    assert r.stdout == "" and r.stderr.strip() == f"job {job2} wrote nothing to job.out"


def test_escape_sequences_are_shown_not_acted_on_and_raw_gives_the_bytes(
        server: ServerHandle, tmp_path):
    c = server.client()
    _app(c)
    job = _job(c, "escapes")
    server.agent(work_root=tmp_path / "w")
    wait_for(lambda: _final(c, job), 60, what="job final")
    r = subprocess.run(pilotfish_cmd(server.home, "job", "log", str(job)),
                       capture_output=True, timeout=60, env=dict(os.environ, LC_ALL="C.UTF-8"))
    assert r.returncode == 0
    out = r.stdout.decode()
    assert "\x1b" not in out and "\x07" not in out and "\r" not in out and "\x9b" not in out
    assert out == ("\\x1b[31mred\\x1b[0m \\x1b]0;title\\x07 bell\\x07 cr\\x0dX\n"
                   "bad utf8: \ufffd\ufffd end\n\\x9b[2J tab\there\n")
    raw = subprocess.run(pilotfish_cmd(server.home, "job", "log", str(job), "--raw"),
                         capture_output=True, timeout=60)
    assert raw.returncode == 0
    assert raw.stdout == (b"\x1b[31mred\x1b[0m \x1b]0;title\x07 bell\x07 cr\rX\n"
                          b"bad utf8: \xff\xfe end\n\xc2\x9b[2J tab\there\n")


@pytest.fixture
def small_cap_server(home, db_url, monkeypatch):
    """A server that keeps at most 64 KiB of each output, shipped at 256 KiB/s."""
    monkeypatch.setenv("PILOTFISH_OUTPUT_CAP", "64K")
    monkeypatch.setenv("PILOTFISH_OUTPUT_RATE", "256K")
    s = ServerHandle(home, db_url).start()
    try:
        yield s
    finally:
        s.stop_agents()
        s.stop()


def test_past_the_cap_the_rest_stays_in_the_workdir_and_the_cli_says_where(
        small_cap_server: ServerHandle, tmp_path):
    server = small_cap_server
    c = server.client()
    _app(c)
    size = 5 * 2**20  # a task writing 5 MiB at once: 64 KiB of it reach the server
    job = _job(c, "bytes", str(size))
    server.agent("--node-name", "nodeCap", work_root=tmp_path / "w")
    wait_for(lambda: _final(c, job), 60, what="job final")
    r = c.job_log(job)
    assert r["state"] == "JOB_FINISHED" and r["capped"] and r["complete"]
    assert r["stored"] == 64 * 2**10 == len(_stored(c, job)) and r["size"] == size
    path = Path(r["path"])
    assert path.stat().st_size == size and (tmp_path / "w") in path.parents
    assert _rows(server.home, job) <= 8  # a few pieces, never one per line
    cli = run_cli(server.home, "job", "log", str(job), check=True)
    assert cli.stdout == (("x" * 99 + "\n") * 700)[:64 * 2**10]
    note = cli.stderr.strip()
    assert note.startswith("[job.out is longer than the 64.0 KiB the server keeps of it: the "
                           "rest (4.9 MiB more) is in ") and note.endswith(
        f"{path} on node nodeCap]"), note
    # the follower says it too, and ends
    r = run_cli(server.home, "job", "log", str(job), "-f", "--tail", "2", check=True)
    # (the last line is cut at the cap)
    assert r.stdout == "".join(cli.stdout.splitlines(keepends=True)[-2:])
    assert r.stdout.count("\n") == 1 and "on node nodeCap" in r.stderr


def _agent_dealer(server: ServerHandle, name: str) -> zmq.Socket:
    run_cli(server.home, "keys", "init", "--client", name, "--role", "agent", check=True)
    d = zmq.Context.instance().socket(zmq.DEALER)
    d.setsockopt(zmq.LINGER, 0)
    keys.apply_client(d, keys.client_curve(
        server.home, server.address, client_key=server.home / "keys" / f"{name}.key_secret"))
    d.connect(server.address)
    return d


def _recv(d: zmq.Socket, timeout: float = 10.0):
    assert d.poll(int(timeout * 1000)), "no answer"
    return P.decode(d.recv(), (P.ERROR, P.REPLY, P.WELCOME, P.TASKS, P.CANCEL))


def test_output_from_an_agent_that_holds_no_lease_is_dropped(server: ServerHandle, tmp_path):
    """An agent (its own valid agent key) claims another agent's job, its attempt or the
    next one: its pieces are dropped, its update still answered, the real output unharmed."""
    c = server.client()
    _app(c)
    gate = tmp_path / "gate"
    job = _job(c, "gate", str(gate))
    server.agent(work_root=tmp_path / "w")
    wait_for(lambda: _stored(c, job) == b"first line\n", 60, what="first line stored")
    d = _agent_dealer(server, "intruder")
    try:
        aid = f"intruder-{uuid.uuid4().hex[:8]}"
        d.send(P.encode(P.HELLO, agent=aid, host="h", pid=1, site=None, pilot=None,
                        cores=[0], gpus=[], memory=2**30, time_left=None, running=[], ack=0))
        kind, m = _recv(d)
        assert kind == P.WELCOME and m["output_cap"] == 2**20
        fake = [{"job": job, "attempt": a, "stream": s, "offset": o, "data": b"EVIL\x1b[2J\n",
                 "size": 10**9, "eof": True, "path": "/etc/passwd"}
                for a in (1, 2) for s in ("out", "err") for o in (0, 11)]
        d.send(P.encode(P.UPDATE, agent=aid, useq=1, updates=[], ack=0, epoch=m["epoch"],
                        demand={"cores": 0, "gpus": 0, "max_cores": 1, "max_gpus": 0,
                                "time_left": None}, output=fake))
        kind, m2 = _recv(d)
        assert kind == P.TASKS and m2["uack"] == 1  # answered: the update itself is fine
        # a malformed piece is a bad message: refused whole, nothing stored
        bad = [dict(fake[0], stream="../../x")]
        d.send(P.encode(P.UPDATE, agent=aid, useq=2, updates=[], ack=0, epoch=m["epoch"],
                        demand={"cores": 0, "gpus": 0, "max_cores": 1, "max_gpus": 0,
                                "time_left": None}, output=bad))
        kind, m3 = _recv(d)
        assert kind == P.ERROR and "output" in m3["error"]
    finally:
        d.close(linger=0)
    gate.touch()
    wait_for(lambda: _final(c, job), 60, what="job final")
    assert _stored(c, job) == b"first line\nsecond line\n"
    assert _stored(c, job, "err") == b"first err\n"
    r = c.job_log(job)
    assert r["size"] < 10**9 and "passwd" not in r["path"] and r["complete"]
    assert "dropped output from agent intruder-" in (server.home / "server.log").read_text()


def test_job_rm_and_gc_remove_the_stored_output(server: ServerHandle, tmp_path):
    c = server.client()
    _app(c)
    jobs = [_job(c, "lines", "5") for _ in range(3)]
    server.agent(work_root=tmp_path / "w")
    wait_for(lambda: all(_final(c, j) for j in jobs), 60, what="jobs final")
    assert all(_stored(c, j) == b"".join(b"line %d\n" % i for i in range(1, 6)) for j in jobs)
    # job.out's pieces (one, or two when a look caught the task running), job.err's eof
    assert all(2 <= _rows(server.home, j) <= 3 for j in jobs)
    run_cli(server.home, "job", "rm", str(jobs[0]), check=True)
    assert _rows(server.home, jobs[0]) == 0
    left = _rows(server.home)
    assert left == _rows(server.home, jobs[1]) + _rows(server.home, jobs[2])
    dry = json.loads(run_cli(server.home, "gc", "--finished-before", "0s", "--dry-run",
                             "--work-root", str(tmp_path / "w"), "--json", check=True).stdout)
    assert dry["outputs"] == left and _rows(server.home) == left  # a dry run changes nothing
    r = json.loads(run_cli(server.home, "gc", "--finished-before", "0s", "--work-root",
                           str(tmp_path / "w"), "--json", check=True).stdout)
    assert r["outputs"] == left and r["workdirs"] == 2
    assert _rows(server.home) == 0
    r = run_cli(server.home, "job", "log", str(jobs[1]), check=True)
    assert r.stdout == "" and "wrote nothing" in r.stderr


def test_output_survives_a_server_restart_and_an_agent_restart(server: ServerHandle,
                                                               tmp_path):
    """kill -9 of the server while the task runs: what was stored stays, what comes after is
    stored once (the agent reads again from its last acknowledged offset). Then the agent is
    stopped (its job handed back) and another runs the job again: attempt 2's output replaces
    attempt 1's."""
    c = server.client()
    _app(c)
    gate = tmp_path / "gate"
    job = _job(c, "gate", str(gate), max_retries=3)
    a1 = server.agent("--node-name", "n1", work_root=tmp_path / "w1")
    wait_for(lambda: _stored(c, job) == b"first line\n", 60, what="first line stored")
    server.kill9()
    server.start()
    c = server.client()
    assert _stored(c, job) == b"first line\n"
    wait_for(lambda: any(a["state"] == "ALIVE" for a in c.agents()), 60, what="reconnect")
    gate.touch()
    wait_for(lambda: _final(c, job), 60, what="job final")
    assert _stored(c, job) == b"first line\nsecond line\n"
    assert _stored(c, job, "err") == b"first err\n"
    # agent restart: a second job, handed back by a stopped agent, run again elsewhere
    gate2 = tmp_path / "gate2"
    job2 = _job(c, "gate", str(gate2), max_retries=3)
    wait_for(lambda: _stored(c, job2) == b"first line\n", 60, what="first line of job 2")
    a1.send_signal(signal.SIGTERM)
    assert a1.wait(30) == 0
    wait_for(lambda: c.job(job2)["state"] == "RESTART_READY", 30, what="handed back")
    assert c.job_log(job2)["attempt"] == 1
    gate2.touch()
    server.agent("--node-name", "n2", work_root=tmp_path / "w2")
    wait_for(lambda: _final(c, job2), 60, what="job 2 final")
    r = c.job_log(job2)
    assert (r["attempt"], r["node"], r["complete"]) == (2, "n2", True)
    assert _stored(c, job2) == b"first line\nsecond line\n"
    con = sqlite3.connect(server.home / "pilotfish.db")
    try:  # attempt 1's output is gone
        assert con.execute("SELECT DISTINCT attempt FROM job_output WHERE job_id = ?",
                           (job2,)).fetchall() == [(2,)]
    finally:
        con.close()


def test_any_reader_may_read_any_jobs_output_an_agent_key_may_not(server: ServerHandle,
                                                                   tmp_path):
    """Reading output is a job read, like `job show`: every key with the role reader or above,
    whoever added the job; an agent key makes no requests."""
    from pilotfish.client import Client
    from pilotfish.errors import Forbidden
    c = server.client()
    _app(c)
    job = _job(c, "lines", "2")
    server.agent(work_root=tmp_path / "w")
    wait_for(lambda: _final(c, job), 60, what="job final")
    for name, role in (("rd", "reader"), ("sub", "submitter"), ("ag", "agent")):
        run_cli(server.home, "keys", "init", "--client", name, "--role", role, check=True)
    for name in ("rd", "sub"):
        with Client(server.address, server.home, timeout=30,
                    client_key=server.home / "keys" / f"{name}.key_secret") as k:
            assert b"".join(d for _, d in k.job_log(job)["pieces"]) == b"line 1\nline 2\n"
    with Client(server.address, server.home, timeout=30,
                client_key=server.home / "keys" / "ag.key_secret") as k:
        with pytest.raises(Forbidden) as exc:
            k.job_log(job)
        assert "may not job_log: it needs the role reader" in str(exc.value)


def test_job_log_on_postgresql(pg_url, home, tmp_path):
    """The same pieces, offsets and tail on PostgreSQL (bytea); job rm removes them."""
    s = ServerHandle(home, pg_url).start()
    try:
        c = s.client()
        _app(c)
        job = _job(c, "escapes")
        s.agent(work_root=tmp_path / "w")
        wait_for(lambda: _final(c, job), 60, what="job final")
        raw = (b"\x1b[31mred\x1b[0m \x1b]0;title\x07 bell\x07 cr\rX\n"
               b"bad utf8: \xff\xfe end\n\xc2\x9b[2J tab\there\n")
        assert _stored(c, job) == raw
        r = c.job_log(job, tail=1)
        last = raw.splitlines(keepends=True)[-1]
        assert r["pieces"] == [[len(raw) - len(last), last]] and r["eof"]
        run_cli(s.home, "job", "rm", str(job), check=True)
        import psycopg
        with psycopg.connect(pg_url.replace("postgresql+psycopg", "postgresql")) as con:
            assert con.execute("SELECT COUNT(*) FROM job_output").fetchone()[0] == 0
    finally:
        s.stop_agents()
        s.stop()


def test_bad_output_limits_stop_the_server_start_with_one_line(home):
    for args, words in ((("--output-cap", "1T"), "at most 16M"),
                        (("--output-cap", "lots"), "expected bytes"),
                        (("--output-rate", "0"), "give a rate")):
        r = run_cli(home, "server", "start", *args)
        assert r.returncode != 0 and words in r.stderr and r.stderr.count("\n") == 1, r.stderr
        assert not (home / "server.json").exists()


def test_a_flooding_task_fills_its_cap_and_nothing_else(server: ServerHandle, tmp_path):
    """A task writing 200 MiB as fast as it can, beside short jobs on the same agent: 1 MiB
    (the default cap) is stored in a bounded number of pieces, the short jobs' output is all
    there, and the agent keeps working."""
    c = server.client()
    _app(c)
    flood = _job(c, "flood", "200")
    server.agent("--cores", "0,1", work_root=tmp_path / "w")
    wait_for(lambda: c.job(flood)["state"] in ("RUNNING",) + FINAL, 60, what="flood runs")
    small = [_job(c, "lines", "3") for _ in range(20)]
    wait_for(lambda: all(_final(c, j) for j in small + [flood]), 120, what="all final")
    assert {c.job(j)["state"] for j in small + [flood]} == {"JOB_FINISHED"}
    for j in small:
        assert _stored(c, j) == b"line 1\nline 2\nline 3\n"
    # the flood's 1 MiB follows its end at the agent's rate: -f waits for the last piece
    f = run_cli(server.home, "job", "log", str(flood), "-f", "--raw", timeout=120, check=True)
    assert len(f.stdout) == 2**20 and "longer than the 1.0 MiB" in f.stderr
    r = c.job_log(flood)
    assert r["stored"] == 2**20 and r["size"] == 200 * 2**20 and r["capped"] and r["eof"]
    assert _rows(server.home, flood) <= 64  # pieces of up to 64 KiB at 0.5 s looks
