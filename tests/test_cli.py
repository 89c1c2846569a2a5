"""The `pilotfish` command as a user runs it: real subprocesses against real servers and agents
(plus an in-process walk of the whole click tree for -h, for speed)."""
from __future__ import annotations

import json
import re
import subprocess
import time

import click
import pytest
import yaml
from click.testing import CliRunner

from conftest import ServerHandle, run_cli
from pilotfish import __version__
from pilotfish.cli import cli
from pilotfish.server import daemon

PREFIX = "pilotfish: error: "


@pytest.fixture(autouse=True)
def _default_terminal(monkeypatch):
    """Subprocesses see no terminal size from the environment running the tests."""
    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.delenv("LINES", raising=False)


def ok(home, *args, input=None) -> str:
    """Run a command that must succeed; return its stdout."""
    r = run_cli(home, *args, input=input)
    assert r.returncode == 0, f"pilotfish {' '.join(args)} -> {r.returncode}\n{r.stdout}{r.stderr}"
    assert "Traceback" not in r.stderr
    return r.stdout


def ok_json(home, *args, input=None):
    return json.loads(ok(home, *args, "--json", input=input))


def error_text(r: subprocess.CompletedProcess, code: int = 1) -> str:
    """Check a failed command's exit code and error prefix; return the message.

    Wrapped lines are joined here: that long messages wrap at all is a known bug with its own
    test (test_error_fits_on_one_line), so the other tests can check what the error says.
    """
    assert r.returncode == code, f"exit {r.returncode}\n{r.stdout}{r.stderr}"
    assert "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith(PREFIX), r.stderr
    return " ".join(r.stderr[len(PREFIX):].split())


def ids_of(rows) -> list[int]:
    return [row["id"] for row in rows]


# -- -h everywhere ---------------------------------------------------------------------------
def _walk(cmd: click.Command, path: tuple[str, ...] = ()):
    yield path, cmd
    if isinstance(cmd, click.Group):  # (the umbrella imports its commands when asked)
        ctx = click.Context(cmd)
        for name in cmd.list_commands(ctx):
            yield from _walk(cmd.get_command(ctx, name), path + (name,))


COMMANDS = list(_walk(cli))


def test_walk_finds_every_command():
    """The -h walk covers the whole tree (so the parametrized help test is not vacuous)."""
    paths = {" ".join(p) for p, _ in COMMANDS}
    expected = {"", "server", "server start", "server stop", "server status", "app", "app add",
                "app ls", "app show", "app alter", "app rm", "job", "job add", "job ls",
                "job show", "job alter", "job kill", "job retry", "job rm", "job rm-all",
                "job wait", "pilot", "pilot agent", "demo"}
    assert expected <= paths


@pytest.mark.parametrize("path, cmd", COMMANDS, ids=[" ".join(p) or "pilotfish"
                                                     for p, _ in COMMANDS])
def test_help_on_every_command(path, cmd):
    """`pilotfish <path> -h` prints usage, the command's help and its options, and exits 0."""
    runner = CliRunner()
    r = runner.invoke(cli, [*path, "-h"], prog_name="pilotfish")
    assert r.exit_code == 0, r.output
    assert r.exception is None
    out = r.output
    assert out.startswith("Usage: " + " ".join(["pilotfish", *path]))
    assert "-h, --help" in out
    first = (cmd.help or "").strip().splitlines()[0]
    assert first and " ".join(first.split()) in " ".join(out.split())  # help text is re-wrapped
    for p in cmd.params:
        for opt in p.opts if isinstance(p, click.Option) else ():
            assert opt in out, f"{opt} missing from the help of {path}"
    if isinstance(cmd, click.Group):
        for name in cmd.commands:
            assert re.search(rf"^\s+{re.escape(name)}\b", out, re.M), f"{name} not listed"
    assert runner.invoke(cli, [*path, "--help"], prog_name="pilotfish").output == out


@pytest.mark.parametrize("args", [(), ("job",), ("job", "add"), ("server", "start"),
                                  ("pilot", "agent"), ("app", "alter")])
def test_help_in_a_real_process(tmp_path, args):
    """-h works in a real `python -m pilotfish` process, needs no server and writes nothing."""
    home = tmp_path / "home"
    home.mkdir()
    r = run_cli(home, *args, "-h")
    assert r.returncode == 0 and r.stderr == ""
    assert r.stdout.startswith("Usage: " + " ".join(["pilotfish", *args]))
    assert list(home.iterdir()) == []


def test_version(tmp_path):
    """`pilotfish -V` prints the version."""
    r = run_cli(tmp_path, "-V")
    assert r.returncode == 0 and __version__ in r.stdout


# -- apps --------------------------------------------------------------------------------------
def test_app_add_ls_show_alter_rm(server, tmp_path):
    """Apps from flags and from YAML; ls, show, alter; rm refused while jobs exist."""
    home = server.home
    out = ok(home, "app", "add", "hello", "--exec", "/bin/echo", "--arg", "hi", "--arg",
             "{who}", "--param", "who:str", "--param", "n:int=3", "--env", "GREETING=1",
             "--description", "says hi")
    assert re.fullmatch(r"app hello registered \(id \d+\)\n", out)
    spec = tmp_path / "sim.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "sim", "executable": "/bin/echo", "args": ["--steps", "{steps}", "{mode}"],
        "description": "from a file",
        "parameters": {"steps": {"type": "int", "min": 1, "max": 100, "default": 10},
                       "mode": {"type": "choice", "choices": ["fast", "slow"]}},
        "resources": {"cpus_per_process": 2}}))
    assert "app sim registered" in ok(home, "app", "add", "-f", str(spec))
    # NAME given with -f overrides the file's name
    assert "app sim2 registered" in ok(home, "app", "add", "sim2", "-f", str(spec))

    table = ok(home, "app", "ls")
    assert re.search(r"^NAME\s+ARGV TEMPLATE\s+PARAMETERS", table, re.M)
    assert re.search(r"^hello\s+/bin/echo hi \{who\}\s+who,n\s+says hi", table, re.M)
    apps = ok_json(home, "app", "ls")
    assert [a["name"] for a in apps] == ["hello", "sim", "sim2"]

    hello = ok_json(home, "app", "show", "hello")
    assert hello["args"] == ["hi", "{who}"]
    assert hello["parameters"]["who"]["type"] == "str"
    assert hello["parameters"]["n"] == {"type": "int", "default": 3}
    assert hello["environment"] == {"GREETING": "1"}
    assert hello["jobs"] == {}
    sim = yaml.safe_load(ok(home, "app", "show", "sim"))
    assert sim["parameters"]["steps"] == {"type": "int", "default": 10, "min": 1, "max": 100}
    assert sim["resources"]["cpus_per_process"] == 2

    assert ok(home, "app", "alter", "hello", "--set", "description=changed") == \
        "app hello updated\n"
    ok(home, "app", "alter", "hello", "--set", 'args=["hey", "{who}"]')
    hello = ok_json(home, "app", "show", "hello")
    assert (hello["description"], hello["args"]) == ("changed", ["hey", "{who}"])
    bad = run_cli(home, "app", "alter", "hello", "--set", 'args=["{nobody}"]')
    assert "no parameter 'nobody' is declared" in error_text(bad)

    ok(home, "job", "add", "--name", "j1", "--app", "hello", "--param", "who=you")
    r = run_cli(home, "app", "rm", "hello")
    assert error_text(r) == ("app 'hello' still has 1 jobs; remove them first "
                             "(`pilotfish job rm-all --app hello`)")
    assert "hello" in [a["name"] for a in ok_json(home, "app", "ls")]
    # args can change only when no unfinished job is left
    r = run_cli(home, "app", "alter", "hello", "--set", 'args=["{who}"]')
    assert "has 1 unfinished jobs" in error_text(r)
    ok(home, "job", "rm-all", "--app", "hello", "--yes")
    assert ok(home, "app", "rm", "hello") == "app hello removed\n"
    assert [a["name"] for a in ok_json(home, "app", "ls")] == ["sim", "sim2"]
    assert "no app named 'hello'" in error_text(run_cli(home, "app", "show", "hello"))


def test_app_alter_rename(server):
    """`app alter OLD --set name=NEW` renames an app (the server's app_alter supports it)."""
    home = server.home
    _echo_app(home)
    assert ok(home, "app", "alter", "echo", "--set", "name=shout") == "app shout updated\n"
    assert [a["name"] for a in ok_json(home, "app", "ls")] == ["shout"]


# -- jobs: add ----------------------------------------------------------------------------------
def _echo_app(home):
    ok(home, "app", "add", "echo", "--exec", "/bin/echo", "--arg", "{msg}", "--param",
       "msg:str=hi")


def test_job_add_from_flags_file_and_stdin(server, tmp_path):
    """job add from flags, from a JSON list file, from a YAML file and from stdin (-f -)."""
    home = server.home
    _echo_app(home)
    assert ok(home, "job", "add", "--name", "a1", "--app", "echo", "--param", "msg=one",
              "--tag", "t1", "--tag", "t2", "--group", "g1", "--priority", "7",
              "--max-retries", "1", "--wall-time", "2.5", "--depth", "1") == "job 1 added\n"

    listing = tmp_path / "jobs.json"
    listing.write_text(json.dumps([{"name": f"f{i}", "application": "echo",
                                    "parameters": {"msg": f"m{i}"}, "tags": ["file"]}
                                   for i in range(3)]))
    out = ok(home, "job", "add", "-f", str(listing))
    assert out.startswith("3 jobs added (ids 2..4) in ")

    single = tmp_path / "one.yaml"
    single.write_text("name: y1\napplication: echo\nparameters: {msg: yaml}\n"
                      "group_identifier: g2\n")
    assert ok(home, "job", "add", "-f", str(single)) == "job 5 added\n"

    stdin = json.dumps([{"name": "s1", "application": "echo", "config_file": {"msg": "in"}},
                        {"name": "s2", "application": "echo"}])
    assert ok_json(home, "job", "add", "-f", "-", input=stdin) == {"ids": [6, 7], "known": 0}
    out = ok(home, "job", "add", "-f", "-", input="- name: s3\n  application: echo\n")
    assert out == "job 8 added\n"

    with server.client() as c:
        jobs = {j["name"]: j for j in c.jobs(limit=0)}
        assert list(jobs) == ["a1", "f0", "f1", "f2", "y1", "s1", "s2", "s3"]
        a1 = c.job(1)
    assert (a1["tags"], a1["group"], a1["priority"], a1["max_retries"]) == \
        (["t1", "t2"], "g1", 7, 1)
    assert a1["wall_time_minutes"] == 2.5
    assert a1["argv"] == ["/bin/echo", "one"]
    assert jobs["f2"]["tags"] == ["file"] and jobs["y1"]["group"] == "g2"
    with server.client() as c:
        assert c.job(6)["argv"] == ["/bin/echo", "in"]
        assert c.job(7)["argv"] == ["/bin/echo", "hi"]  # the declared default


def test_job_add_file_all_or_nothing(server, tmp_path):
    """A job file with one bad job adds nothing, and the error names the job's position."""
    home = server.home
    _echo_app(home)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"name": "ok1", "application": "echo"},
                               {"name": "bad", "application": "echo",
                                "parameters": {"msg": "$(reboot)"}}]))
    assert error_text(run_cli(home, "job", "add", "-f", str(bad))).startswith(
        "job #2: app 'echo' parameter 'msg' value '$(reboot)' is refused: $ ( ) are not")
    assert error_text(run_cli(home, "job", "add", "-f", "-", input="[{]")).startswith(
        "-: neither JSON nor YAML")
    with server.client() as c:
        assert c.counts() == {}


# -- jobs: list, show, change -------------------------------------------------------------------
@pytest.fixture
def populated(server):
    """Six READY jobs over two apps, groups, tags and names (no agent, so they stay put)."""
    home = server.home
    _echo_app(home)
    ok(home, "app", "add", "other", "--exec", "/bin/true")
    with server.client() as c:
        ids = c.add_jobs([
            {"name": "a1", "application": "echo", "group_identifier": "g1", "tags": ["red"]},
            {"name": "a2", "application": "echo", "group_identifier": "g1",
             "tags": ["red", "blue"]},
            {"name": "a3", "application": "echo", "group_identifier": "g2", "tags": ["blue"]},
            {"name": "b1", "application": "other", "group_identifier": "g2"},
            {"name": "b2", "application": "other"},
            {"name": "a2", "application": "other", "tags": ["reddish"]},
        ])
    assert ids == [1, 2, 3, 4, 5, 6]
    return server


def test_job_ls_filters_and_json(populated):
    """job ls filters by state, app, group, tag, name and limit; --json parses as JSON."""
    home = populated.home
    ok(home, "job", "kill", "3")
    rows = ok_json(home, "job", "ls", "--oldest")
    assert ids_of(rows) == [1, 2, 3, 4, 5, 6]
    assert {k for k in rows[0]} >= {"id", "name", "application", "state", "group", "tags"}
    assert ids_of(ok_json(home, "job", "ls", "--oldest", "--state", "USER_KILLED")) == [3]
    assert ids_of(ok_json(home, "job", "ls", "--oldest", "--state", "ready")) == [1, 2, 4, 5, 6]
    assert ids_of(ok_json(home, "job", "ls", "--oldest", "--state", "USER_KILLED", "--state",
                          "READY")) == [1, 2, 3, 4, 5, 6]
    assert ids_of(ok_json(home, "job", "ls", "--oldest", "--app", "other")) == [4, 5, 6]
    assert ids_of(ok_json(home, "job", "ls", "--oldest", "--group", "g2")) == [3, 4]
    assert ids_of(ok_json(home, "job", "ls", "--oldest", "--tag", "red")) == [1, 2]  # not "reddish"
    assert ids_of(ok_json(home, "job", "ls", "--oldest", "--tag", "blue", "--app",
                          "echo")) == [2, 3]
    assert ids_of(ok_json(home, "job", "ls", "--oldest", "--name", "a2")) == [2, 6]
    assert ids_of(ok_json(home, "job", "ls", "--oldest", "--name", "a2", "--app", "echo")) == [2]
    assert ids_of(ok_json(home, "job", "ls", "--limit", "2")) == [6, 5]  # newest first
    assert ids_of(ok_json(home, "job", "ls", "--limit", "2", "--offset", "2")) == [4, 3]
    assert ids_of(ok_json(home, "job", "ls", "--oldest", "--limit", "2", "--page", "2")) \
        == [3, 4]
    assert ids_of(ok_json(home, "job", "ls", "--newest", "--limit", "1")) == [6]
    assert ok_json(home, "job", "ls", "--oldest", "--group", "nosuch") == []

    r = run_cli(home, "job", "ls", "--limit", "2")
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    assert re.match(r"ID\s+NAME\s+APP\s+STATE\s+TRIES\s+GROUP\s+TAGS\s+PRIO", lines[0])
    assert re.match(r"6\s+a2\s+other\s+READY\s+0\s+-\s+reddish\s+0", lines[1])
    assert len(lines) == 3
    assert "showing 1-2 of 6 (newest first); --page 2 for the next 2" in r.stderr
    r = run_cli(home, "job", "ls", "--state", "USER_KILLED")
    assert re.search(r"^3\s+a3\s+echo\s+USER_KILLED", r.stdout, re.M) and r.stderr == ""
    assert "state 'FINISHED' is ambiguous: it could be EXECUTION_FINISHED, JOB_FINISHED" in \
        error_text(run_cli(home, "job", "ls", "--state", "FINISHED"))
    assert "no app named 'nope'" in error_text(run_cli(home, "job", "ls", "--app", "nope"))


def test_job_show_alter_kill_retry_rm(populated):
    """show (with history), alter --set priority=5, kill, retry and rm, each as a user would."""
    home = populated.home
    out = ok(home, "job", "show", "1")
    head, _, history = out.partition("history:\n")
    d = yaml.safe_load(head)
    assert (d["id"], d["name"], d["state"], d["argv"]) == (1, "a1", "READY", ["/bin/echo", "hi"])
    assert re.fullmatch(r"  \S+ \S+  · -> CREATED -> READY\n", history)

    assert ok(home, "job", "alter", "1", "--set", "priority=5") == \
        "1 of 1 matching jobs altered\n"
    assert ok(home, "job", "alter", "--group", "g2", "--set", 'tags=["x","y"]',
              "--set", "max_retries=0") == "2 of 2 matching jobs altered\n"
    with populated.client() as c:
        assert c.job(1)["priority"] == 5
        assert [(j["id"], j["tags"]) for j in c.jobs({"group": "g2"})] == [(3, ["x", "y"]),
                                                                           (4, ["x", "y"])]
        assert c.job(3)["max_retries"] == 0
    assert "cannot alter name" in error_text(run_cli(home, "job", "alter", "1", "--set",
                                                     "name=z"))
    assert "give job ids or filter options" in run_cli(home, "job", "alter", "--set",
                                                       "priority=1").stderr

    assert ok(home, "job", "kill", "1", "2") == "2 of 2 matching jobs killed\n"
    # killing again changes nothing: they are final
    assert ok(home, "job", "kill", "--group", "g1") == "0 of 2 matching jobs killed\n"
    shown = ok_json(home, "job", "show", "1")
    assert shown["state"] == "USER_KILLED"
    assert [(e["from_state"], e["to_state"], e["message"]) for e in shown["events"]] == [
        (None, "READY", None), ("READY", "USER_KILLED", "killed by user")]
    assert "READY -> USER_KILLED  (killed by user)" in ok(home, "job", "show", "1")

    assert ok(home, "job", "retry", "--state", "USER_KILLED") == \
        "2 of 2 matching jobs queued again\n"
    assert ok(home, "job", "retry", "3") == "0 of 1 matching jobs queued again\n"
    with populated.client() as c:
        assert c.counts() == {"RESTART_READY": 2, "READY": 4}

    assert ok(home, "job", "rm", "2", "5") == "2 jobs removed\n"
    assert "no job 2" in error_text(run_cli(home, "job", "show", "2"))
    with populated.client() as c:
        assert ids_of(c.jobs(limit=0)) == [1, 3, 4, 6]


def test_job_rm_all(populated):
    """rm-all --yes with a filter removes only matching jobs; without --yes, 'n' keeps them."""
    home = populated.home
    r = run_cli(home, "job", "rm-all", "--group", "g1", input="n\n")
    assert r.returncode == 1 and "remove 2 jobs?" in r.stdout and "aborted" in r.stderr
    with populated.client() as c:
        assert len(c.jobs(limit=0)) == 6
    assert ok(home, "job", "rm-all", "--group", "g1", "--yes") == "2 jobs removed\n"
    assert ok_json(home, "job", "rm-all", "--app", "other", "--yes") == {"removed": 3}
    with populated.client() as c:
        assert ids_of(c.jobs(limit=0)) == [3]
    r = run_cli(home, "job", "rm-all", input="y\n")
    assert r.returncode == 0 and "remove ALL 1 jobs?" in r.stdout
    with populated.client() as c:
        assert c.jobs(limit=0) == []


# -- wait, with a real agent --------------------------------------------------------------------
def test_job_wait_exit_codes(server, tmp_path):
    """job wait exits 0 when all finished, 1 when some failed, 2 on --timeout."""
    home = server.home
    ok(home, "app", "add", "good", "--exec", "/bin/true")
    ok(home, "app", "add", "bad", "--exec", "/bin/false")
    with server.client() as c:
        c.add_jobs([{"name": f"g{i}", "application": "good", "group_identifier": "ok"}
                    for i in range(3)])
        c.add_jobs([{"name": "b0", "application": "bad", "group_identifier": "ko",
                     "max_retries": 0}])
    # a job no agent here can take (it wants more cores than this machine has)
    ok(home, "job", "add", "--name", "huge", "--app", "good", "--group", "never",
       "--depth", "4096")
    server.agent(work_root=tmp_path / "work")

    r = run_cli(home, "job", "wait", "--group", "ok", "-q")
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
    r = run_cli(home, "job", "wait", "--group", "ko", "-q")
    assert (r.returncode, r.stdout) == (1, "")
    r = run_cli(home, "job", "wait", "--json", "--app", "bad")
    assert r.returncode == 1 and json.loads(r.stdout) == {"FAILED": 1}
    r = run_cli(home, "job", "wait", "--app", "good", "--group", "ok", "--json")
    assert r.returncode == 0 and json.loads(r.stdout) == {"JOB_FINISHED": 3}
    r = run_cli(home, "job", "wait", "--group", "never", "--timeout", "0.5", "-q")
    assert r.returncode == 2 and "not final after 0.5 s" in r.stderr
    with server.client() as c:
        bad = c.jobs({"app": "bad"})[0]
        assert (bad["state"], bad["exit_code"]) == ("FAILED", 1)


# -- errors -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def error_runs(tmp_path_factory):
    """Each error case run once, for the two error tests below."""
    base = tmp_path_factory.mktemp("cli_errors")
    fresh = base / "fresh-home"
    home = base / "home"
    home.mkdir()
    s = ServerHandle(home, f"sqlite:///{home / 'pilotfish.db'}").start()
    empty = base / "empty.yaml"
    empty.write_text("")
    listing = base / "list.yaml"
    listing.write_text("- a\n- b\n")
    try:
        _echo_app(home)
        cases = {
            "no-server": run_cli(fresh, "job", "ls"),
            "no-server-app-add": run_cli(fresh, "app", "add", "x", "--exec", "/bin/true"),
            "unknown-app": run_cli(home, "job", "add", "--name", "x", "--app", "nope"),
            "param-not-kv": run_cli(home, "job", "add", "--name", "x", "--app", "echo",
                                    "--param", "oops"),
            "param-undeclared": run_cli(home, "job", "add", "--name", "x", "--app", "echo",
                                        "--param", "loud=1"),
            "param-metachar": run_cli(home, "job", "add", "--name", "x", "--app", "echo",
                                      "--param", "msg=a;b"),
            "name-dotdot": run_cli(home, "job", "add", "--name", "../x", "--app", "echo"),
            "unknown-state": run_cli(home, "job", "ls", "--state", "DONE"),
            "no-such-job": run_cli(home, "job", "show", "12345"),
            "missing-file": run_cli(home, "job", "add", "-f", str(base / "nope.json")),
            "app-relative-exec": run_cli(home, "app", "add", "x", "--exec", "true"),
            "app-bad-param-type": run_cli(home, "app", "add", "x", "--exec", "/bin/echo",
                                          "--param", "n:shell"),
            "app-alter-empty-file": run_cli(home, "app", "alter", "echo", "-f", str(empty)),
            "app-alter-list-file": run_cli(home, "app", "alter", "echo", "-f", str(listing)),
        }
        yield cases
    finally:
        s.stop()


ERRORS = {  # case -> what the (one) error line says
    "no-server": r"no server is running for .*fresh-home \(start one with `pilotfish server "
                 r"start`\)",
    "no-server-app-add": r"no server is running for",
    "unknown-app": r"no app named 'nope'; registered: echo",
    "param-not-kv": r"--param 'oops' must look like key=value",
    "param-undeclared": r"app 'echo' has no parameter 'loud'",
    "param-metachar": r"parameter 'msg' value 'a;b' is refused: ; is not allowed \(a str "
                      r"parameter without a pattern of its own takes letters, digits",
    "name-dotdot": r"job name '\.\./x' is not a valid name",
    "unknown-state": r"unknown state 'DONE'; states are: CREATED, ",
    "no-such-job": r"no job 12345",
    "missing-file": r"cannot read .*nope\.json: No such file or directory",
    "app-relative-exec": r"app 'x': executable must be an absolute path, got 'true'",
    "app-bad-param-type": r"parameter 'n': type must be one of",
    "app-alter-empty-file": r"nothing to change|must be a map",
    "app-alter-list-file": r"must be a map",
}
@pytest.mark.parametrize("case", list(ERRORS))
def test_error_is_clean(error_runs, case):
    """A failing command exits 1 with `pilotfish: error: <reason>`, no traceback, empty stdout."""
    r = error_runs[case]
    assert r.stdout == ""
    assert re.search(ERRORS[case], error_text(r))


@pytest.mark.parametrize("case", list(ERRORS))
def test_error_fits_on_one_line(error_runs, case):
    """The error is exactly one line on stderr, however long the message."""
    r = error_runs[case]
    assert r.returncode == 1
    assert r.stderr.startswith(PREFIX) and r.stderr.endswith("\n")
    assert r.stderr.count("\n") == 1, r.stderr


def test_usage_errors_exit_2(server):
    """Missing required flags are usage errors: exit 2 with click's usage message."""
    r = run_cli(server.home, "job", "add", "--name", "x")
    assert r.returncode == 2 and "give --name and --app, or -f FILE" in r.stderr
    r = run_cli(server.home, "app", "add", "x")
    assert r.returncode == 2 and "give NAME and --exec, or -f FILE" in r.stderr
    r = run_cli(server.home, "job", "show", "one")
    assert r.returncode == 2 and "'one' is not a valid integer" in r.stderr
    r = run_cli(server.home, "job", "frobnicate")
    assert r.returncode == 2 and "No such command 'frobnicate'" in r.stderr


# -- the server ---------------------------------------------------------------------------------
def test_server_status_without_server(home):
    """`server status` exits 1 and says so when no server runs; --json says running: false."""
    r = run_cli(home, "server", "status")
    assert r.returncode == 1
    assert " ".join(r.stdout.split()).startswith(f"not running: no server is running for {home}")
    r = run_cli(home, "server", "status", "--json")
    assert r.returncode == 1
    d = json.loads(r.stdout)
    assert d["running"] is False and "no server is running" in d["error"]
    r = run_cli(home, "server", "stop")
    assert (r.returncode, r.stdout) == (0, "no server running\n")


def test_server_start_status_stop_round_trip(tmp_path):
    """server start, status (text and --json), a second start refused, stop, status again."""
    home = tmp_path / "fresh"
    try:
        r = run_cli(home, "server", "start")
        assert r.returncode == 0, r.stderr
        text = " ".join(r.stdout.split())
        m = re.match(r"server started: pid (\d+), (tcp://127\.0\.0\.1:\d+), db sqlite:///", text)
        assert m, text
        pid, address = int(m.group(1)), m.group(2)
        assert daemon.alive(pid)
        info = json.loads((home / "server.json").read_text())
        assert (info["pid"], info["address"]) == (pid, address)

        st = ok_json(home, "server", "status")
        assert st["running"] is True and st["pid"] == pid and st["address"] == address
        assert st["counts"] == {} and st["agents_alive"] == 0 and st["version"] == __version__
        out = ok(home, "server", "status")
        assert out.startswith(f"running: pid {pid} at {address}")
        assert "agents alive: 0 (0 cores); queued: 0; leased: 0" in out

        again = run_cli(home, "server", "start")
        assert f"a server is already running for {home} (pid {pid})" in error_text(again)

        assert ok(home, "server", "stop") == f"server {pid} stopped\n"
        assert daemon.exited(pid)  # exited (a zombie until init reaps it)
        assert not (home / "server.json").exists()
        r = run_cli(home, "server", "status")
        assert r.returncode == 1 and r.stdout.startswith("not running")
    finally:
        daemon.stop(home, wait=10)


def test_db_status_reads_the_database_the_running_server_was_given(tmp_path):
    """`server start --db X` then `server db-status` without --db: the running server's database
    (it said "no database yet" about the home's SQLite file); once stopped, the home's file."""
    home = tmp_path / "fresh"
    other = tmp_path / "elsewhere.db"
    try:
        r = run_cli(home, "server", "start", "--db", f"sqlite:///{other}")
        assert r.returncode == 0, r.stderr
        pid = daemon.running_pid(home)
        st = ok_json(home, "server", "db-status")
        assert st["up_to_date"] and str(other) in st["db"], st
        assert st["source"] == f"the running server's, pid {pid}"
        assert f"({st['source']})" in ok(home, "server", "db-status")
        ok(home, "server", "stop")
        st = json.loads(run_cli(home, "server", "db-status", "--json").stdout)
        assert st["version"] is None and "source" not in st and "pilotfish.db" in st["db"]
    finally:
        daemon.stop(home, wait=10)


def test_server_stop_returns_once_the_server_has_exited(tmp_path):
    """`server stop` of an idle server returns in well under a second (it took 2.2 s: it waited
    for init to reap the exited server, and for the interpreter to tear its modules down)."""
    home = tmp_path / "fresh"
    try:
        r = run_cli(home, "server", "start")  # detached: its parent is init, not this process
        assert r.returncode == 0, r.stderr
        pid = daemon.running_pid(home)
        times = []
        for _ in range(2):
            t0 = time.monotonic()
            assert daemon.stop(home) == pid
            times.append(time.monotonic() - t0)
            assert daemon.exited(pid) and not (home / "server.json").exists()
            assert settings_log_tail(home).endswith("stopped")
            if len(times) < 2:
                r = run_cli(home, "server", "start")
                assert r.returncode == 0, r.stderr
                pid = daemon.running_pid(home)
        assert min(times) < 0.5, times  # measured 0.02-0.1 s idle (was 2.2 s with the CLI)
    finally:
        daemon.stop(home, wait=10)


def settings_log_tail(home) -> str:
    return (home / "server.log").read_text().strip().splitlines()[-1]


def test_top_level_help_names_the_home(tmp_path):
    r = run_cli(tmp_path, "-h")
    assert r.returncode == 0 and "$PILOTFISH_HOME" in r.stdout and "~/.pilotfish" in r.stdout


@pytest.mark.parametrize("cores, words", [("0,999", "not in this process's affinity mask"),
                                          ("x", "expected a list like 0-3,8")])
def test_agent_refuses_cores_it_cannot_use(tmp_path, cores, words):
    """`pilot agent --cores` naming cores outside the affinity mask fails at start, one line."""
    r = run_cli(tmp_path, "pilot", "agent", "--server", "tcp://127.0.0.1:9", "--cores", cores)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and words in r.stderr, r.stderr


def test_job_file_over_the_atomic_limit_is_refused_whole(server: ServerHandle, tmp_path):
    """A job file above the per-request limit adds nothing and says how to split it."""
    from pilotfish.server.ops import MAX_JOBS_PER_REQUEST
    c = server.client()
    c.add_app({"name": "ok", "executable": "/bin/true"})
    path = tmp_path / "many.json"
    path.write_text(json.dumps([{"name": f"j{i}", "application": "ok"}
                                for i in range(MAX_JOBS_PER_REQUEST + 1)]))
    r = run_cli(server.home, "job", "add", "-f", str(path), timeout=120)
    assert r.returncode == 1 and "split them" in r.stderr and r.stderr.count("\n") == 1
    assert c.counts() == {}


def test_app_add_warns_when_its_program_is_not_here(server):
    """An executable missing on this machine may exist only on the compute nodes: a warning on
    stderr, the app registered all the same; a present one gets no warning."""
    r = run_cli(server.home, "app", "add", "far", "--exec", "/opt/nowhere/sim")
    assert r.returncode == 0 and "registered" in r.stdout, r.stderr
    assert "warning: /opt/nowhere/sim does not exist on this machine" in r.stderr
    assert "compute nodes" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_cli(server.home, "app", "add", "near", "--exec", "/bin/true")
    assert r.returncode == 0 and r.stderr == ""
    r = run_cli(server.home, "app", "add", "dir", "--exec", "/tmp")
    assert "is not an executable file" in r.stderr
    r = run_cli(server.home, "app", "alter", "near", "--set", "executable=/opt/gone")
    assert r.returncode == 0 and "/opt/gone does not exist" in r.stderr


def test_choice_parameters_on_the_command_line(server):
    """`--param mode:choice` alone says how to give the choices; `mode:choice:a,b=a` works."""
    r = run_cli(server.home, "app", "add", "c1", "--exec", "/bin/echo", "--param", "mode:choice")
    assert r.returncode == 1 and "--param NAME:choice:a,b,c[=DEFAULT]" in r.stderr, r.stderr
    r = run_cli(server.home, "app", "add", "c2", "--exec", "/bin/echo", "--arg", "{mode}",
                "--param", "mode:choice:fast,exact=fast", "--json", check=True)
    assert json.loads(r.stdout)["parameters"]["mode"] == {"type": "choice", "default": "fast",
                                                          "choices": ["fast", "exact"]}
    r = run_cli(server.home, "job", "add", "--name", "j", "--app", "c2", "--param", "mode=slow")
    assert r.returncode == 1 and "must be one of fast, exact" in r.stderr
    r = run_cli(server.home, "app", "add", "c3", "--exec", "/bin/echo", "--param", "n:int:1,2")
    assert r.returncode != 0 and "only a choice parameter" in r.stderr


def test_refused_str_values_are_explained_in_words(server):
    run_cli(server.home, "app", "add", "e", "--exec", "/bin/echo", "--arg", "{msg}",
            "--param", "msg:str", check=True)
    for value, words in [("a b", "space is not allowed"), ("x;y|z", "; | are not allowed"),
                         ("-rf", "starts with '-', which the program would read as an option"),
                         ("a/b", "/ is not allowed")]:
        r = run_cli(server.home, "job", "add", "--name", "j", "--app", "e", "--param",
                    f"msg={value}")
        assert r.returncode == 1 and words in r.stderr, r.stderr
        assert "(?!" not in r.stderr and "declare a pattern to allow more" in r.stderr


@pytest.mark.parametrize("args, option", [
    (["server", "status", "--wait", "nan"], "--wait"),
    (["server", "status", "--wait", "0.01"], "--wait"),
    (["site", "agent", "--site", "local", "--quick", "inf"], "--quick"),
    (["site", "agent", "--site", "local", "--resume-after", "-1"], "--resume-after"),
    (["bridge", "amqp", "--jobs-queue", "q", "--server-timeout", "nan", "--check"],
     "--server-timeout"),
])
def test_seconds_options_take_plain_finite_numbers_in_range(tmp_path, args, option):
    """click's FloatRange takes nan and inf (every comparison with nan is false): these
    options use clitypes.plain_float, refused in one line before anything runs."""
    r = run_cli(tmp_path, *args)
    assert r.returncode == 2 and f"Invalid value for '{option}'" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
