"""Issue 10 (trust), the smaller holes: integers past 64 bits and non-finite floats, errors that
echo a huge input whole, `server status`/`start` after a kill -9 or beside a zombie, dangerous
variables in an app's environment and app changes under queued jobs, and what environment a task
inherits. Real servers, real agents, the real CLI; no mocks.
"""
from __future__ import annotations

import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ServerHandle, pilotfish_cmd, run_cli, wait_for
from pilotfish.errors import PilotfishError, ValidationError
from pilotfish.envpolicy import REFUSED_ENV, refused_env_name, task_base_env

INT64_MAX = 2**63 - 1
APPS = [
    {"name": "num", "executable": "/bin/echo", "args": ["{n}", "{x}"],
     "parameters": {"n": {"type": "int"}, "x": {"type": "float", "default": 0.5}}},
    {"name": "word", "executable": "/bin/echo", "args": ["{w}"],
     "parameters": {"w": {"type": "str"}}},
]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """One real server for the cheap refusal cases, with APPS registered."""
    home = tmp_path_factory.mktemp("trust") / "home"
    home.mkdir()
    s = ServerHandle(home, f"sqlite:///{home / 'pilotfish.db'}").start()
    try:
        with s.client(timeout=10) as c:
            for spec in APPS:
                c.add_app(spec)
        yield s
    finally:
        s.stop()


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text[:2000]
    return lines[0]


def refused_cli(home: Path, *args: str, code: int = 1) -> str:
    r = run_cli(home, *args)
    assert r.returncode == code, (r.returncode, r.stdout[:500], r.stderr[:500])
    return one_line(r.stderr)


def job(**kw) -> dict:
    d = {"name": "j", "application": "num", "parameters": {"n": 1}}
    d.update(kw)
    return d


# -- 4. integers past 64 bits, non-finite floats -----------------------------------------------
def test_int_parameter_is_64_bit_without_min_max(live):
    with live.client() as c:
        before = c.counts()
        # as a number the client itself refuses it (msgpack cannot carry it): one line, the limit
        with pytest.raises(ValidationError, match=r"jobs\[0\]\.parameters\.n = .* past 64 bits: "
                                                  r"pilotfish integers are -9223372036854775808"
                                                  r"\.\.9223372036854775807"):
            c.add_jobs([job(parameters={"n": 10**30})])
        # as a string or a uint64 it reaches the server, which refuses it
        for n in ("99999999999999999999999999", 2**63, "-9223372036854775809"):
            with pytest.raises(ValidationError, match="must be int in .*64 bits"):
                c.add_jobs([job(parameters={"n": n})])
        assert c.counts() == before
        # the limits themselves are fine, and `job show` answers
        for n in (INT64_MAX, -2**63, str(INT64_MAX)):
            jid = c.add_job(**job(parameters={"n": n}))
            assert c.job(jid)["parameters"]["n"] == int(n)
            assert c.job(jid)["argv"][1] == str(int(n))
    r = refused_cli(live.home, "job", "add", "--name", "j", "--app", "num",
                    "--param", "n=99999999999999999999999999")
    assert "must be int in -9223372036854775808..9223372036854775807" in r
    r = refused_cli(live.home, "job", "add", "--name", "j", "--app", "num",
                    "--param", "n=" + "9" * 100_000)
    assert "(100000 characters)" in r and len(r) < 400


@pytest.mark.parametrize("x", ["nan", "NaN", "inf", "-inf", "Infinity", "1e400"])
def test_float_parameter_must_be_finite(live, x):
    with live.client() as c:
        with pytest.raises(ValidationError, match="finite float"):
            c.add_jobs([job(parameters={"n": 1, "x": x})])
        if x != "1e400":
            with pytest.raises(ValidationError, match="finite float"):
                c.add_jobs([job(parameters={"n": 1, "x": float(x)})])
    r = refused_cli(live.home, "job", "add", "--name", "j", "--app", "num", "--param", "n=1",
                    "--param", f"x={x}")
    assert "finite float" in r


@pytest.mark.parametrize("decl, why", [
    ({"type": "int", "max": 2**64 - 1}, "max must be an integer -9223372036854775808"),
    ({"type": "int", "min": 2**63}, "min must be an integer"),
    ({"type": "float", "max": math.inf}, "max must be a finite number"),
    ({"type": "float", "min": math.nan}, "min must be a finite number"),
    ({"type": "int", "min": 5, "max": 1}, "min 5 is above max 1"),
])
def test_app_bounds_must_fit(live, decl, why):
    with live.client() as c:
        with pytest.raises(ValidationError, match=why):
            c.add_app({"name": "bounded", "executable": "/bin/echo", "args": ["{n}"],
                       "parameters": {"n": decl}})
        assert "bounded" not in [a["name"] for a in c.apps()]


def test_app_bounds_must_fit_cli(live, tmp_path):
    spec = tmp_path / "app.yaml"
    spec.write_text("name: inf\nexecutable: /bin/echo\nargs: ['{x}']\n"
                    "parameters: {x: {type: float, max: .inf}}\n")
    assert "max must be a finite number" in refused_cli(live.home, "app", "add", "-f", str(spec))


BAD_JOB_INTS = [
    ("priority", 2**31), ("priority", -2**40), ("priority", 1_000_001),
    ("max_retries", 10**6), ("max_retries", -1), ("max_retries", 2**64 - 1),
    ("num_nodes", 2**40), ("num_nodes", 0), ("processes_per_node", 2**31),
    ("cpus_per_process", -1), ("gpus_per_process", 65), ("gpus_per_process", 2**63),
    ("wall_time_minutes", math.inf), ("wall_time_minutes", math.nan),
    ("wall_time_minutes", 10**12), ("wall_time_minutes", 0),
    ("parents", [2**63]), ("parents", [0]), ("parents", [-5]),
]


@pytest.mark.parametrize("key, value", BAD_JOB_INTS)
def test_job_integers_are_range_checked(live, key, value):
    with live.client() as c:
        before = c.counts()
        with pytest.raises(ValidationError) as info:
            c.add_jobs([job(**{key: value})])
        assert key in str(info.value) and "\n" not in str(info.value)
        assert c.counts() == before


@pytest.mark.parametrize("key, value", [k for k in BAD_JOB_INTS if k[0] != "parents"])
def test_job_alter_checks_the_same_ranges(live, key, value):
    with live.client() as c:
        jid = c.add_job(**job(name="alter-me", parameters={"n": 3}))
        before = c.job(jid)
        with pytest.raises(ValidationError, match=key):
            c.alter_jobs({"ids": [jid]}, **{key: value})
        after = c.job(jid)
        assert {k: after[k] for k in before if k != "waiting"} == \
            {k: before[k] for k in before if k != "waiting"}


def test_job_alter_cli_priority_past_32_bits(live):
    with live.client() as c:
        jid = c.add_job(**job(name="alter-cli"))
    r = refused_cli(live.home, "job", "alter", str(jid), "--set", f"priority={2**40}")
    assert "priority must be an integer -1000000..1000000" in r
    r = refused_cli(live.home, "job", "alter", str(jid), "--set", "priority=1" + "0" * 30)
    assert "past 64 bits" in r
    r = refused_cli(live.home, "job", "alter", str(jid), "--set", "wall_time_minutes=NaN")
    assert "wall_time_minutes" in r


def test_rows_of_older_versions_still_show(live):
    """A job whose stored parameters hold an integer past 64 bits (an older version let it in)
    and an app whose stored bounds do: `job show`, `job ls`, `app ls`, `app show` answer."""
    with live.client() as c:
        c.add_app({"name": "legacy", "executable": "/bin/echo", "args": ["{n}"],
                   "parameters": {"n": {"type": "int", "max": 10}}})
        jid = c.add_job(name="old", application="legacy", parameters={"n": 5})
    big = 10**30
    db = sqlite3.connect(live.home / "pilotfish.db", timeout=30)
    with db:
        db.execute("UPDATE jobs SET parameters = ? WHERE id = ?", (json.dumps({"n": big}), jid))
    db.close()
    with live.client() as c:
        d = c.job(jid)
        assert d["parameters"]["n"] == str(big) and d["argv"] == ["/bin/echo", str(big)]
        assert [j["id"] for j in c.jobs({"ids": [jid]})] == [jid]
    r = run_cli(live.home, "job", "show", str(jid))
    assert r.returncode == 0 and str(big) in r.stdout, r.stderr
    r = run_cli(live.home, "job", "ls", "--json")
    assert r.returncode == 0 and jid in [j["id"] for j in json.loads(r.stdout)]


def test_legacy_app_loads_answers_and_asks_for_a_fix(tmp_path):
    """An app row written by an older version with bounds past 64 bits and LD_PRELOAD in its
    environment: the server starts, lists it, refuses `app alter` until the environment is
    fixed, and an agent does not pass LD_PRELOAD to its tasks."""
    home = tmp_path / "home"
    home.mkdir()
    url = f"sqlite:///{home / 'pilotfish.db'}"
    s = ServerHandle(home, url).start()
    try:
        with s.client() as c:
            c.add_app({"name": "old", "executable": "/usr/bin/env", "args": ["{n}"],
                       "parameters": {"n": {"type": "int", "default": 0}},
                       "environment": {"KEEP_ME": "1"}})
    finally:
        s.stop()
    db = sqlite3.connect(home / "pilotfish.db")
    with db:
        db.execute("UPDATE apps SET parameters = ?, environment = ?, args = '[]' "
                   "WHERE name = 'old'",
                   (json.dumps({"n": {"type": "int", "max": 10**30, "default": 0},
                                "big": {"type": "int", "default": 10**30}}),
                    json.dumps({"KEEP_ME": "1", "LD_PRELOAD": "/nonexistent/evil.so"})))
    db.close()
    s = ServerHandle(home, url).start()
    try:
        with s.client() as c:
            app = next(a for a in c.apps() if a["name"] == "old")
            assert app["parameters"]["n"]["max"] == str(10**30)
            assert c.app("old")["environment"]["LD_PRELOAD"]
            with pytest.raises(ValidationError, match="must be int in"):
                c.add_job(name="big", application="old", parameters={"n": 2**63})
            jid = c.add_job(name="runs", application="old")
            s.agent(work_root=tmp_path / "work")
            assert c.wait({"ids": [jid]}, timeout=60) == {"JOB_FINISHED": 1}
            out = (tmp_path / "work" / c.job(jid)["workdir"] / "job.out").read_text()
            assert "KEEP_ME=1" in out and "LD_PRELOAD" not in out
            assert c.job(jid)["parameters"] == {"n": 0, "big": str(10**30)}
            # `app alter` asks for what is refused now to be fixed, one thing at a time
            with pytest.raises(ValidationError, match="max must be an integer"):
                c.alter_app("old", description="x")
            fixed = {"n": {"type": "int", "max": 10, "default": 0},
                     "big": {"type": "int", "default": 1}}
            with pytest.raises(ValidationError, match="environment may not set LD_PRELOAD"):
                c.alter_app("old", parameters=fixed)
            c.alter_app("old", parameters=fixed, environment={"KEEP_ME": "2"})
    finally:
        s.stop_agents()
        s.stop()


def test_wire_floats_must_be_finite(live):
    """nan and inf off the wire (an agent's hello or update, a pilot's walltime) are refused."""
    import zmq
    from conftest import curve_socket
    from pilotfish import protocol as P
    from pilotfish.errors import ProtocolError
    with pytest.raises(ProtocolError, match="'start' must be a finite number"):
        P.check_fields(P.TASK_UPDATE, {"job": 1, "attempt": 1, "states": [], "start": math.nan},
                       "update")
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    curve_socket(s, live.address)
    s.connect(live.address)
    try:
        s.send(P.encode(P.HELLO, agent="a-inf", host="h", pid=1, cores=[0], gpus=[], memory=1,
                        time_left=math.inf, running=[], ack=0))
        assert s.poll(5000)
        kind, m = P.decode(s.recv(), (P.ERROR, P.WELCOME))
        assert kind == P.ERROR and "'time_left' must be a finite number" in m["error"]
    finally:
        s.close()
    with live.client() as c:
        for wall in (math.inf, math.nan, -1):
            with pytest.raises(ValidationError, match="walltime_minutes"):
                c.add_pilot(id="p-inf", nodes=1, walltime_minutes=wall)
        assert all(a["id"] != "a-inf" for a in c.agents(all=True))


# -- 6. errors never echo a huge input whole ---------------------------------------------------
BIG = "x" * 10_000_000
HUGE_CASES = [
    ("job name", lambda c: c.add_jobs([job(name=BIG)])),
    ("str parameter", lambda c: c.add_jobs([{"name": "j", "application": "word",
                                             "parameters": {"w": "-" + BIG}}])),
    ("unknown parameter", lambda c: c.add_jobs([job(parameters={"n": 1, BIG: 1})])),
    ("int parameter", lambda c: c.add_jobs([job(parameters={"n": BIG})])),
    ("unknown job key", lambda c: c.add_jobs([dict(job(), **{BIG: 1})])),
    ("application", lambda c: c.add_jobs([job(application=BIG)])),
    ("input_url", lambda c: c.add_jobs([job(input_url="http://" + BIG)])),
    ("site", lambda c: c.add_jobs([job(site=BIG)])),
    ("tag", lambda c: c.add_jobs([job(tags=[BIG])])),
    ("filter app", lambda c: c.jobs({"app": BIG})),
    ("filter state", lambda c: c.jobs({"state": BIG})),
    ("filter key", lambda c: c.jobs({BIG: 1})),
    ("app name", lambda c: c.add_app({"name": BIG, "executable": "/bin/true"})),
    ("app executable", lambda c: c.add_app({"name": "a", "executable": BIG})),
    ("app key", lambda c: c.add_app({"name": "a", "executable": "/bin/true", BIG: 1})),
    ("app show", lambda c: c.app(BIG)),
    ("image", lambda c: c.add_jobs([job(image=BIG)])),
]


@pytest.mark.parametrize("what, call", HUGE_CASES, ids=[c[0] for c in HUGE_CASES])
def test_errors_quote_a_huge_value_shortened(live, what, call):
    with live.client() as c:
        with pytest.raises(PilotfishError) as info:
            call(c)
    msg = str(info.value)
    assert len(msg) < 600 and "\n" not in msg, msg[:1000]
    assert "characters)" in msg or "xxxx" not in msg, msg


def test_cli_error_and_server_log_stay_small(live, tmp_path):
    f = tmp_path / "big.json"
    f.write_text(json.dumps({"name": BIG, "application": "num", "parameters": {"n": 1}}))
    r = refused_cli(live.home, "job", "add", "-f", str(f))
    assert len(r) < 400 and "(10000000 characters)" in r
    # a malformed frame quoting input is logged capped too
    assert (live.home / "server.log").stat().st_size < 1_000_000


def test_every_server_error_is_capped():
    from pilotfish.validate import MAX_ERROR_CHARS, cap, echo
    assert cap("a" * 10) == "a" * 10
    long = cap("a" * 10**6)
    assert len(long) < MAX_ERROR_CHARS + 40 and long.endswith("… (1000000 characters)")
    assert echo("b" * 10**6) == repr("b" * 80) + "… (1000000 characters)"
    assert len(echo(list(range(10**5)))) < 200


# -- 7. server status/start after kill -9 and beside a zombie ----------------------------------
def timed_cli(home: Path, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    r = run_cli(home, *args)
    return r, time.monotonic() - t0


def python_start_seconds() -> float:
    t0 = time.monotonic()
    run_cli(Path("/nonexistent"), "-h")
    return time.monotonic() - t0


def test_status_after_kill9_is_quick_and_right(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    s = ServerHandle(home, f"sqlite:///{home / 'pilotfish.db'}").start()
    s.kill9()
    assert (home / "server.json").exists()  # left behind, as a kill -9 leaves it
    base = python_start_seconds()
    r, dt = timed_cli(home, "server", "status")
    assert r.returncode == 1 and r.stdout.startswith("not running: no server is running"), r
    assert f"pid {s.pid}" in r.stdout and dt < base + 1.0, (dt, base)
    for cmd in (("job", "ls"), ("app", "ls"), ("job", "wait")):  # every client command
        r, dt = timed_cli(home, *cmd)
        assert r.returncode == 1 and dt < base + 1.0, (cmd, dt, r.stderr)
        assert one_line(r.stderr).endswith("start one with `pilotfish server start`")
    r, dt = timed_cli(home, "server", "stop")
    assert r.returncode == 0 and r.stdout == "no server running\n" and dt < base + 1.0
    r, dt = timed_cli(home, "server", "start")
    try:
        assert r.returncode == 0, r.stderr
    finally:
        run_cli(home, "server", "stop")


ZOMBIE_PARENT = r"""
import subprocess, sys, time
p = subprocess.Popen(sys.argv[1:], stdin=subprocess.DEVNULL)
print(p.pid, flush=True)
time.sleep(600)   # never waits for it: once killed, it stays a zombie
"""


def test_zombie_server_is_not_running(tmp_path):
    """A server killed with kill -9 whose parent does not reap it (state Z) is not running:
    status says so at once and start starts a new one."""
    home = tmp_path / "home"
    home.mkdir()
    cmd = pilotfish_cmd(home, "server", "start", "--foreground", "--bind", "tcp://127.0.0.1:*")
    parent = subprocess.Popen([sys.executable, "-c", ZOMBIE_PARENT, *cmd],
                              stdout=subprocess.PIPE, text=True)
    try:
        pid = int(parent.stdout.readline())
        wait_for(lambda: run_cli(home, "server", "status").returncode == 0, 30,
                 what="the server answers")
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
                 == "Z", 10, what="a zombie")
        base = python_start_seconds()
        r, dt = timed_cli(home, "server", "status")
        assert r.returncode == 1 and r.stdout.startswith("not running"), r
        assert dt < base + 1.0, (dt, base)
        r, dt = timed_cli(home, "server", "start")
        assert r.returncode == 0 and "server started" in r.stdout, r.stderr
        assert Path(f"/proc/{pid}/stat").exists()  # still a zombie: it was never the answer
        r = run_cli(home, "server", "status")
        assert r.returncode == 0 and r.stdout.startswith("running"), r
    finally:
        run_cli(home, "server", "stop")
        parent.kill()
        parent.wait()


@pytest.mark.parametrize("started", [None, "before"])
def test_reused_pid_is_not_the_server(tmp_path, started):
    """server.json naming a live process that is not a pilotfish server (its pid was reused):
    not running, start works, and stop never signals that process. With the server's start
    time in server.json, the process's own start time tells; without, its command line."""
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    other = subprocess.Popen(["sleep", "300"])
    try:
        info = {"address": "tcp://127.0.0.1:9", "pid": other.pid, "curve": False,
                "secure": False}
        if started:
            info["started"] = time.time() - 60  # the "server" wrote it a minute ago
        (home / "server.json").write_text(json.dumps(info))
        (home / "server.pid").write_text(f"{other.pid}\n")
        base = python_start_seconds()
        r, dt = timed_cli(home, "server", "status")
        assert r.returncode == 1 and "is gone or is not a pilotfish server" in r.stdout, r
        assert dt < base + 1.0
        r = run_cli(home, "server", "stop")
        assert r.stdout == "no server running\n" and other.poll() is None
        r = run_cli(home, "server", "start")
        assert r.returncode == 0, r.stderr
        run_cli(home, "server", "stop", check=True)
        assert other.poll() is None  # never signalled
    finally:
        other.kill()
        other.wait()


def test_live_server_that_does_not_answer(tmp_path):
    """A stopped (SIGSTOP) server: status waits a bounded time and says it is alive but silent."""
    home = tmp_path / "home"
    home.mkdir()
    s = ServerHandle(home, f"sqlite:///{home / 'pilotfish.db'}").start()
    try:
        os.kill(s.pid, signal.SIGSTOP)
        r, dt = timed_cli(home, "server", "status", "--json", "--wait", "1.5")
        d = json.loads(r.stdout)
        assert r.returncode == 1 and d["running"] is False and d["pid"] == s.pid
        assert "alive but did not answer within 1.5 s" in d["error"] and dt < 10
    finally:
        os.kill(s.pid, signal.SIGCONT)
        s.stop()


# -- 8. dangerous environment names; app changes under queued jobs ----------------------------
DANGEROUS = ["LD_PRELOAD", "LD_AUDIT", "LD_DEBUG", "GCONV_PATH", "GLIBC_TUNABLES", "LOCPATH",
             "BASH_ENV", "ENV", "SHELLOPTS", "BASHOPTS", "PS4", "PROMPT_COMMAND", "IFS",
             "PYTHONSTARTUP", "PYTHONINSPECT", "PERL5OPT", "PERL5DB", "RUBYOPT",
             "NODE_OPTIONS", "JAVA_TOOL_OPTIONS", "_JAVA_OPTIONS", "JDK_JAVA_OPTIONS",
             "PILOTFISH_JOB_ID", "PILOTFISH_SERVER_KEY", "BASH_FUNC_ls"]


def test_refused_names_list():
    for name in DANGEROUS:
        assert refused_env_name(name), name
    for name in ("LD_LIBRARY_PATH", "PYTHONPATH", "OMP_NUM_THREADS", "SIM_DATA", "PATH"):
        assert refused_env_name(name) is None, name
    assert all(REFUSED_ENV.values())


@pytest.mark.parametrize("name", DANGEROUS)
def test_dangerous_environment_is_refused(live, name):
    with live.client() as c:
        with pytest.raises(ValidationError, match=f"environment may not set {name}: "):
            c.add_app({"name": "envy", "executable": "/bin/true",
                       "environment": {name: "/tmp/x"}})
        with pytest.raises(ValidationError, match=f"environment may not set {name}"):
            c.alter_app("word", environment={name: "/tmp/x"})
        assert c.app("word")["environment"] == {}


def test_dangerous_environment_cli(live):
    r = refused_cli(live.home, "app", "add", "envy", "--exec", "/bin/true",
                    "--env", "LD_PRELOAD=/tmp/evil.so")
    assert "environment may not set LD_PRELOAD: the dynamic loader" in r
    r = refused_cli(live.home, "app", "alter", "word", "--set", 'environment={"BASH_ENV": "/x"}')
    assert "environment may not set BASH_ENV" in r
    r = run_cli(live.home, "app", "add", "fine", "--exec", "/bin/true",
                "--env", "LD_LIBRARY_PATH=/opt/lib", "--env", "PYTHONPATH=/opt/py")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("change", [
    {"executable": "/bin/false"}, {"args": ["{n}"]}, {"preprocess": ["/bin/true"]},
    {"postprocess": ["/bin/true"]}, {"environment": {"A": "1"}},
    {"container": {"image": "/images/x.sif"}},
    {"parameters": {"n": {"type": "int"}, "x": {"type": "float", "default": 1.5}}},
])
def test_what_runs_is_locked_while_jobs_wait(server, change):
    with server.client() as c:
        c.add_app(APPS[0])
        jid = c.add_job(**job())
        before = c.app("num")
        with pytest.raises(ValidationError, match=r"has 1 unfinished jobs; what decides what "
                                                  r"they run .* asked to change: "
                                                  + next(iter(change))):
            c.alter_app("num", **change)
        assert c.app("num") == before
        # what does not decide what runs may change; and once no job waits, anything may
        c.alter_app("num", description="still fine", resources={"cpus_per_process": 1})
        c.kill_jobs({"ids": [jid]})
        c.alter_app("num", **change)
    r = run_cli(server.home, "job", "add", "--name", "k", "--app", "num", "--param", "n=1")
    assert r.returncode == 0, r.stderr
    r = refused_cli(server.home, "app", "alter", "num", "--set", "executable=/bin/true")
    assert "unfinished jobs; what decides what they run" in r


# -- 9. plain numerals in the CLI; the environment a task inherits ------------------------------
@pytest.mark.parametrize("args", [
    ("--param", "n=1_0"), ("--param", "n= 5"), ("--param", "n=٥"),
    ("--param", "n=1", "--param", "x=1_0.5"),
])
def test_cli_parameters_are_plain_numerals(live, args):
    r = refused_cli(live.home, "job", "add", "--name", "j", "--app", "num", *args)
    assert "(plain digits)" in r


@pytest.mark.parametrize("flag, value", [("--priority", "1_0"), ("--nodes", "1_0"),
                                         ("--wall-time", "nan"), ("--wall-time", "1_0"),
                                         ("--max-retries", " 3")])
def test_cli_numeric_flags_are_plain(live, flag, value):
    r = run_cli(live.home, "job", "add", "--name", "j", "--app", "num", "--param", "n=1",
                flag, value)
    assert r.returncode == 2 and "is not a valid" in r.stderr and "plain digits" in r.stderr


@pytest.mark.parametrize("args", [("pilot", "agent", "--walltime", "nan"),
                                  ("pilot", "agent", "--max-tasks", "1_0"),
                                  ("pilot", "run", "--walltime", "inf", "--dry-run"),
                                  ("demo", "--jobs", "1_0"), ("server", "start", "--heartbeat",
                                                             "nan")])
def test_cli_numeric_flags_elsewhere_are_plain(tmp_path, args):
    r = run_cli(tmp_path / "home", *args)
    assert r.returncode == 2 and "is not a valid" in r.stderr and "plain digits" in r.stderr


def test_cli_set_values_are_plain(live):
    with live.client() as c:
        jid = c.add_job(**job(name="setme", priority=3))
    for value in ("1_0", "NaN", "Infinity"):
        r = refused_cli(live.home, "job", "alter", str(jid), "--set", f"priority={value}")
        assert "priority must be an integer" in r
    with live.client() as c:
        assert c.job(jid)["priority"] == 3


def test_task_base_env_is_declared():
    env = {"PATH": "/bin", "HOME": "/h", "LC_CTYPE": "C", "TERM": "xterm", "SLURM_JOB_ID": "1",
           "MPICH_GPU_SUPPORT_ENABLED": "1", "CUDA_HOME": "/c", "OMP_PLACES": "cores",
           "PILOTFISH_RELAY_RANK": "2", "PILOTFISH_CLIENT_KEY": "/k",
           "PILOTFISH_SERVER_KEY": "/s", "PILOTFISH_HOME": "/p", "AWS_SECRET_ACCESS_KEY": "s",
           "LD_PRELOAD": "/x.so", "SSH_AUTH_SOCK": "/tmp/agent",
           # the launcher's per-rank identity of an agent started as a rank
           "PMI_RANK": "0", "PMI_FD": "5", "PMIX_RANK": "0", "OMPI_COMM_WORLD_RANK": "0",
           "HYDRA_CONTROL_FD": "7", "PALS_RANKID": "0", "MPI_LOCALRANKID": "0"}
    got = task_base_env(env)
    assert set(got) == {"PATH", "HOME", "LC_CTYPE", "TERM", "SLURM_JOB_ID",
                        "MPICH_GPU_SUPPORT_ENABLED", "CUDA_HOME", "OMP_PLACES",
                        "PILOTFISH_RELAY_RANK"}


def test_task_inherits_a_declared_environment(server, tmp_path):
    """A real agent started with secrets in its environment: its task sees the declared set,
    the app's environment and the PILOTFISH_* task variables, and none of the secrets."""
    keys = server.home / "keys"
    env = dict(os.environ, PILOTFISH_SERVER_KEY=str(keys / "server.key"),
               PILOTFISH_CLIENT_KEY=str(keys / "client.key_secret"),
               MY_SECRET_TOKEN="hunter2", SLURM_FAKE_VAR="slurm", OMP_PROC_BIND="close",
               LC_FAKE="lc", LD_PRELOAD="", PMI_RANK="7")
    with server.client() as c:
        c.add_app({"name": "env", "executable": "/usr/bin/env",
                   "environment": {"APP_VAR": "app", "PATH": "/usr/bin:/bin"}})
        jid = c.add_job(name="e", application="env")
        cmd = pilotfish_cmd(server.home, "pilot", "agent", "--server", server.address,
                            "--idle-timeout", "0", "--work-root", str(tmp_path / "work"))
        with open(tmp_path / "agent.log", "wb") as log:
            agent = subprocess.Popen(cmd, env=env, stdout=log, stderr=log)
        server.agents.append(agent)
        assert c.wait({"ids": [jid]}, timeout=60) == {"JOB_FINISHED": 1}
        out = (tmp_path / "work" / c.job(jid)["workdir"] / "job.out").read_text()
    seen = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    assert "MY_SECRET_TOKEN" not in seen and "PILOTFISH_SERVER_KEY" not in seen
    assert "PILOTFISH_CLIENT_KEY" not in seen and "LD_PRELOAD" not in seen
    assert "PMI_RANK" not in seen
    assert seen["SLURM_FAKE_VAR"] == "slurm" and seen["OMP_PROC_BIND"] == "close"
    assert seen["LC_FAKE"] == "lc" and seen["APP_VAR"] == "app"
    assert seen["PATH"] == "/usr/bin:/bin" and seen["PILOTFISH_JOB_ID"] == str(jid)
    assert seen["HOME"] == os.environ["HOME"]
    server.stop_agents()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_largest_accepted_values_are_stored_and_summed(request, tmp_path, backend):
    """Every integer at the edge of what is accepted is written, read and summed on both
    databases (PostgreSQL INTEGER is 32-bit: the resource product used to overflow it)."""
    home = tmp_path / "home"
    home.mkdir()
    url = request.getfixturevalue("pg_url") if backend == "postgresql" \
        else f"sqlite:///{home / 'pilotfish.db'}"
    s = ServerHandle(home, url).start()
    try:
        with s.client() as c:
            c.add_app(APPS[0])
            edge = dict(priority=1_000_000, max_retries=1000, num_nodes=1_000_000,
                        processes_per_node=1_000_000, cpus_per_process=1_000_000,
                        gpus_per_process=64, wall_time_minutes=525_600)
            jid = c.add_job(**job(parameters={"n": INT64_MAX, "x": -1.5e308}, **edge))
            low = c.add_job(**job(name="low", parameters={"n": -2**63}, priority=-1_000_000,
                                  parents=[jid]))
            c.alter_jobs({"ids": [low]}, priority=-1_000_000, max_retries=0)
            d = c.job(jid)
            assert {k: d[k] for k in edge} == edge and d["parameters"]["n"] == INT64_MAX
            assert c.summary({"ids": [jid, low]})["jobs"] == 2
            assert c.job(low)["parents"] == [jid]
            assert c.ping()
    finally:
        s.stop()


# -- files a user names: a device or a FIFO is refused at once, never read -----------------------
FILE_COMMANDS = [
    ("job", "add", "-f", "{f}"),
    ("app", "add", "-f", "{f}"),
    ("source", "pg", "--dsn", "postgresql://postgres@127.0.0.1/postgres", "--channel", "c",
     "--template", "{f}", "--check"),
    ("bridge", "amqp", "--config", "{f}", "--check"),
    ("container", "build", "{f}", "--dry-run"),
]


@pytest.mark.parametrize("kind", ["device", "fifo"])
@pytest.mark.parametrize("cmd", FILE_COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_a_named_file_that_is_a_device_or_fifo_is_refused_not_read(server: ServerHandle,
                                                                   tmp_path, cmd, kind):
    """``--template /dev/zero`` once read 16 GB in 8 s; a FIFO blocked forever. Every command
    that reads a file a user names takes only a regular file (pilotfish.textfile)."""
    if kind == "device":
        f = "/dev/zero"
    else:
        f = str(tmp_path / "fifo")
        os.mkfifo(f)
    t = time.monotonic()
    r = run_cli(server.home, *(a.replace("{f}", f) for a in cmd), timeout=30)
    assert r.returncode != 0 and time.monotonic() - t < 25
    assert "not a regular file" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
