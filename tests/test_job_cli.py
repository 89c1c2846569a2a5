"""`job ls` and `job show` as a user reads them: times, workdirs, pages, state names."""
from __future__ import annotations

import json
import re
import time
from datetime import datetime

import pytest
import yaml

from conftest import run_cli, wait_for

PREFIX = "pilotfish: error: "
ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00")
LOCAL = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"
EPOCH = re.compile(r"\b1\d{9}(\.\d+)?\b")  # what people must not see


def ok(home, *args) -> str:
    r = run_cli(home, *args)
    assert r.returncode == 0, f"{args} -> {r.returncode}\n{r.stdout}{r.stderr}"
    return r.stdout


def error_line(r) -> str:
    assert r.returncode == 1, f"exit {r.returncode}\n{r.stdout}{r.stderr}"
    assert r.stderr.startswith(PREFIX) and r.stderr.count("\n") == 1, r.stderr
    return r.stderr[len(PREFIX):]


@pytest.fixture
def app(server):
    with server.client() as c:
        c.add_app({"name": "echo", "executable": "/bin/echo", "args": ["{time}"],
                   "parameters": {"time": {"type": "float"}}})
    return server


def test_show_for_people_and_scripts(app):
    """People get local times and no epoch numbers; --json gets ISO 8601 with the offset, for
    every time field and every event; a parameter called `time` stays a number; the workdir is
    whole once an agent of this home has made it, else relative with what it is relative to."""
    home = app.home
    with app.client() as c:
        t0 = time.time()
        jid = c.add_job(name="j", application="echo", parameters={"time": 1234567890.5})
    out = ok(home, "job", "show", str(jid))
    head, _, history = out.partition("history:\n")
    assert not EPOCH.search(out.replace("1234567890.5", "")), out
    for k in ("created", "state_time"):
        assert re.search(rf"^{k}: {LOCAL}$", head, re.M), head
    created = re.search(rf"^created: ({LOCAL})$", head, re.M).group(1)
    assert abs(datetime.strptime(created, "%Y-%m-%d %H:%M:%S").timestamp() - t0) < 5
    assert re.search(r"^started: null$", head, re.M) and re.search(r"^ended: null$", head, re.M)
    assert re.search(r"^workdir: default/j\.1  # relative to the work root of the agent that "
                     r"ran it \(by default \$PILOTFISH_HOME/work, or its --work-root\)$",
                     head, re.M), head
    d = yaml.safe_load(head)
    assert d["parameters"] == {"time": 1234567890.5} and d["argv"][1] == "1234567890.5"
    assert re.fullmatch(rf"  {LOCAL}  · -> CREATED -> READY\n", history)

    app.agent()
    with app.client() as c:
        c.wait({"ids": [jid]}, timeout=30)
    out = ok(home, "job", "show", str(jid))
    head = out.partition("history:\n")[0]
    assert f"workdir: {home / 'work' / 'default' / 'j.1'}\n" in head
    assert re.search(rf"^started: {LOCAL}$", head, re.M) and \
        re.search(rf"^ended: {LOCAL}$", head, re.M)
    assert not EPOCH.search(out.replace("1234567890.5", "")), out

    d = json.loads(ok(home, "job", "show", str(jid), "--json"))
    for k in ("created", "started", "ended", "state_time"):
        assert ISO.fullmatch(d[k]), (k, d[k])
    assert all(ISO.fullmatch(e["time"]) for e in d["events"]) and len(d["events"]) >= 2
    assert d["parameters"] == {"time": 1234567890.5}
    assert d["workdir"] == "default/j.1"  # scripts get the stored, relative form
    created = datetime.fromisoformat(d["created"]).timestamp()
    assert abs(created - t0) < 5
    with app.client() as c:  # the Python API keeps epoch seconds
        assert abs(c.job(jid)["created"] - created) < 0.001
        assert isinstance(c.jobs()[0]["ended"], float)

    rows = json.loads(ok(home, "job", "ls", "--json"))
    assert {"created", "started", "ended", "state_time", "array"} <= rows[0].keys()
    assert all(ISO.fullmatch(rows[0][k]) for k in ("created", "started", "ended", "state_time"))


def test_ls_newest_first_pages_and_footer(app):
    home = app.home
    with app.client() as c:
        c.add_array({"name": "j{index}", "application": "echo",
                     "parameters": {"time": "{index}"}}, "1-1234")
    r = run_cli(home, "job", "ls")
    lines = r.stdout.splitlines()
    assert len(lines) == 101 and lines[1].split()[:2] == ["1234", "j1234"]
    assert r.stderr == "showing 1-100 of 1,234 (newest first); --page 2 for the next 100, " \
                       "--all for all\n"
    r = run_cli(home, "job", "ls", "--page", "13")
    assert [ln.split()[0] for ln in r.stdout.splitlines()[1:]] == [str(i) for i in
                                                                    range(34, 0, -1)]
    assert r.stderr == "showing 1,201-1,234 of 1,234 (newest first)\n"
    r = run_cli(home, "job", "ls", "--page", "14")
    assert r.stdout.splitlines()[1:] == [] and r.stderr == "no jobs past the first 1,234: " \
                                                            "1,234 match\n"
    r = run_cli(home, "job", "ls", "--oldest", "--limit", "5", "--state", "rEaDy")
    assert [ln.split()[0] for ln in r.stdout.splitlines()[1:]] == ["1", "2", "3", "4", "5"]
    assert "(oldest first); --page 2 for the next 5" in r.stderr
    r = run_cli(home, "job", "ls", "--all")
    assert len(r.stdout.splitlines()) == 1235 and r.stderr == ""
    assert len(json.loads(ok(home, "job", "ls", "--limit", "0", "--json"))) == 1234
    r = run_cli(home, "job", "ls", "--limit", "5", "--offset", "3")
    assert r.stderr == "showing 4-8 of 1,234 (newest first); --all for all\n"
    assert run_cli(home, "job", "ls", "--array", "1", "--limit", "1234").stderr == ""
    for args in (("--page", "2", "--offset", "3"), ("--page", "2", "--all"), ("--page", "0"),
                 ("--limit", "-1")):
        r = run_cli(home, "job", "ls", *args)
        assert r.returncode == 2 and "Traceback" not in r.stderr, (args, r.stderr)


def test_state_names_any_case_and_prefix(app):
    """--state takes any case and unique prefixes of names or of their words; an ambiguous one
    lists the candidates; the same in the Python API's filter and in job alter."""
    home = app.home
    with app.client() as c:
        ids = [c.add_job(name=f"j{i}", application="echo", parameters={"time": 1})
               for i in range(3)]
        c.kill_jobs({"ids": [ids[0]]})
        for name in ("user_killed", "User_K", "killed", "KILL", "user-killed"):
            assert [j["id"] for j in c.jobs({"state": [name]})] == [ids[0]], name
        assert c.counts({"state": "rea"}) == {"READY": 2}  # counted from memory
        assert c.counts({"state": ["ready", "killed", "failed"]}) == {"READY": 2,
                                                                       "USER_KILLED": 1}
        assert c.counts({"state": ["ready"], "name": "j1"}) == {"READY": 1}  # from the table
        with pytest.raises(Exception, match="unknown state 'done'"):
            c.counts({"state": ["ready", "done"]})
        with pytest.raises(Exception, match="state 'run' is ambiguous: it could be RUNNING, "
                                            "RUN_FAILED, RUN_TIMEOUT"):
            c.jobs({"state": ["run"]})
    for name, state in (("killed", "USER_KILLED"), ("job_f", None), ("READY", "READY"),
                        ("restart", None), ("fail", None)):  # a whole-name prefix wins
        rows = json.loads(ok(home, "job", "ls", "--state", name, "--json"))
        assert all(r["state"] == state for r in rows) and (rows or state is None)
    for name, why in (("finished", "state 'finished' is ambiguous: it could be "
                                   "EXECUTION_FINISHED, JOB_FINISHED"),
                      ("stage", "is ambiguous: it could be STAGED_IN, STAGED_OUT, "
                                "STAGE_IN_FAILED, STAGE_OUT_FAILED"),
                      ("done", "unknown state 'done'; states are: CREATED, "),
                      ("", "unknown state ''"), ("x" * 500, "unknown state 'xxxx")):
        assert why in error_line(run_cli(home, "job", "ls", "--state", name)), name
    # job alter --set state= takes the same names
    assert ok(home, "job", "alter", str(ids[0]), "--set", "state=restart") == \
        "1 of 1 matching jobs altered\n"
    with app.client() as c:
        wait_for(lambda: c.job(ids[0])["state"] == "RESTART_READY", 5)


def test_job_text_is_never_markup(app):
    """A description with rich markup (an unbalanced "[/x]" made rich raise) prints as text."""
    home = app.home
    with app.client() as c:
        jid = c.add_job(name="m", application="echo", parameters={"time": 1},
                        description="[/bad] [bold]x[/bold] [link=file:///etc]y[/link]")
    out = ok(home, "job", "show", str(jid))
    assert "description: '[/bad] [bold]x[/bold] [link=file:///etc]y[/link]'\n" in out
    assert yaml.safe_load(out.partition("history:\n")[0])["description"].startswith("[/bad]")
    with app.client() as c:
        c.alter_app("echo", description="[/oops]")
    assert yaml.safe_load(ok(home, "app", "show", "echo"))["description"] == "[/oops]"
