"""`pilotfish source pg`: a real PostgreSQL (a scratch database per test) NOTIFYs, a real source
process LISTENs and adds jobs to a real server with a submitter key."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import pilotfish_cmd, run_cli, wait_for

SOURCE = "diiid-efit"
CHANNEL = "pulse_end"
EFIT = {"name": "efit", "executable": "/bin/echo", "args": ["{shot}", "{tmax}", "{tree}"],
        "parameters": {"shot": {"type": "int", "min": 0},
                       "tmax": {"type": "float", "default": 0.0},
                       "tree": {"type": "str", "default": "EFIT01"}}}
TABLE_SQL = """
CREATE TABLE pulses (shot bigint PRIMARY KEY, tmax double precision, run text, note text,
                     recorded timestamptz DEFAULT now());
CREATE FUNCTION pulse_notify() RETURNS trigger LANGUAGE plpgsql AS $$
  BEGIN PERFORM pg_notify('pulse_end', row_to_json(NEW)::text); RETURN NEW; END $$;
CREATE TRIGGER pulse_end AFTER INSERT ON pulses FOR EACH ROW EXECUTE FUNCTION pulse_notify();
"""


def template(home: Path, table: bool = True, **changes) -> dict:
    t = {"source": SOURCE, "id": "shot",
         "fields": {"shot": "shot", "tmax": {"parameter": "tmax"},
                    "run": {"job": "input_url"}, "note": None},
         "example": {"shot": 1, "tmax": 1.5, "run": str(home / "data" / "example"),
                     "note": "x"},
         "job": {"application": "efit", "name": "efit-{shot}",
                 "description": "pulse {shot}: {note}", "group_identifier": "diiid",
                 "parameters": {"tree": "EFIT05"}}}
    if table:
        t["catch_up_table"] = "pulses"
    t.update(changes)
    return t


def write_template(home: Path, t: dict, name: str = "efit.yaml") -> Path:
    p = home.parent / name
    p.write_text(json.dumps(t))  # JSON is YAML
    return p


@pytest.fixture
def pg(pg_url):
    """The scratch database of this test (conftest makes and drops it): a libpq DSN."""
    import psycopg
    dsn = pg_url.replace("postgresql+psycopg://", "postgresql://", 1)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(TABLE_SQL)
    return dsn


def sql(dsn: str, query: str, *args):
    import psycopg
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(query, args or None)
        return cur.fetchall() if cur.description else None


def pulse(dsn: str, shot: int, tmax: float | None = 2.5, run: str | None = None,
          note: str | None = "ok") -> None:
    sql(dsn, "INSERT INTO pulses (shot, tmax, run, note) VALUES (%s, %s, %s, %s)",
        shot, tmax, run, note)


def notify(dsn: str, payload: str) -> None:
    sql(dsn, "SELECT pg_notify(%s, %s)", CHANNEL, payload)


class SourceProc:
    """A real `pilotfish source pg` process with the submitter key 'pulses'."""

    def __init__(self, home: Path, dsn: str, tmpl: Path, *extra: str,
                 env: dict | None = None) -> None:
        self.home, self.dsn, self.tmpl, self.extra, self.env = home, dsn, tmpl, extra, env
        self.log = home.parent / "source.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "SourceProc":
        cmd = pilotfish_cmd(self.home, "--client-key",
                            str(self.home / "keys" / "pulses.key_secret"), "source", "pg",
                            "--dsn", self.dsn, "--channel", CHANNEL, "--template",
                            str(self.tmpl), "--json", *self.extra)
        self.mark = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=out, stdin=subprocess.DEVNULL,
                                         env={**os.environ, **(self.env or {})})
        wait_for(lambda: "listening on channel" in self.text() or self.proc.poll() is not None,
                 60, what="the source to listen")
        assert self.proc.poll() is None, self.text()
        return self

    def text(self) -> str:
        if not self.log.exists():
            return ""
        return self.log.read_bytes()[self.mark:].decode(errors="replace")

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


class Sources(list):
    """The source processes of one test: each is stopped when the test ends, also when it
    failed to start."""

    def start(self, *args, **kwargs) -> SourceProc:
        src = SourceProc(*args, **kwargs)
        self.append(src)
        return src.start()


@pytest.fixture
def sources():
    started = Sources()
    yield started
    for s in started:
        s.stop()


@pytest.fixture
def efit(server):
    with server.client() as c:
        c.add_app(EFIT)
    run_cli(server.home, "keys", "init", "--client", "pulses", check=True)  # a submitter
    return server


def jobs_of(server, tag: str | None = None) -> list[dict]:
    with server.client() as c:
        return c.jobs({"app": "efit", **({"tag": tag} if tag else {})}, limit=0)


def tag(shot: int) -> str:
    return f"pg.{SOURCE}.{shot}"


def refused(home: Path) -> list[dict]:
    p = home / "sources" / f"pg-{SOURCE}.refused.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []


def state(home: Path) -> dict:
    return json.loads((home / "sources" / f"pg-{SOURCE}.json").read_text())


# -- the pulse becomes a job ---------------------------------------------------------------------
def test_a_pulse_row_makes_a_job_with_its_fields(efit, pg, sources):
    home = efit.home
    pulse(pg, 190000)  # before the first start: old pulses are not flooded in
    src = sources.start(home, pg, write_template(home, template(home)))
    pulse(pg, 190001, tmax=5.5, run=str(home / "data" / "190001"), note="first")
    [job] = wait_for(lambda: jobs_of(efit, tag(190001)), 60, what="the pulse's job")
    with efit.client() as c:
        full = c.job(job["id"])
    assert full["name"] == "efit-190001" and full["group"] == "diiid"
    assert full["parameters"] == {"shot": 190001, "tmax": 5.5, "tree": "EFIT05"}
    assert full["description"] == "pulse 190001: first"
    assert full["input_url"] == str(home / "data" / "190001")
    assert full["owner"] == "pulses" and full["tags"] == [tag(190001)]
    # a NOTIFY that names no row, and garbage, are refused alone; the next pulse still counts
    notify(pg, json.dumps({"shot": 999999}))
    notify(pg, "this is not json")
    pulse(pg, 190002, tmax=None, note=None)
    wait_for(lambda: jobs_of(efit, tag(190002)), 60, what="the next pulse's job")
    wait_for(lambda: len(refused(home)) == 2, 30, what="two refusals")
    errors = sorted(r["error"] for r in refused(home))
    assert "has no row in pulses" in errors[1] and errors[0].startswith("payload is not JSON")
    assert sorted(j["name"] for j in jobs_of(efit)) == ["efit-190001", "efit-190002"]
    assert state(home)["cursor"] == 190002 and src.proc.poll() is None
    assert '"job": ' in src.text() and "refused: payload is not JSON" in src.text()
    assert src.stop() == 0


def test_pulses_while_the_source_is_down_are_caught_up(efit, pg, sources):
    home = efit.home
    tpath = write_template(home, template(home))
    src = sources.start(home, pg, tpath)
    pulse(pg, 1)
    wait_for(lambda: jobs_of(efit, tag(1)), 60, what="pulse 1")
    assert src.stop() == 0
    for shot in (2, 3, 4):  # their NOTIFYs reach no one
        pulse(pg, shot, run="/etc" if shot == 3 else None)  # 3 names a path outside the roots
    assert len(jobs_of(efit)) == 1
    src2 = sources.start(home, pg, tpath)
    wait_for(lambda: len(jobs_of(efit)) == 3, 60, what="the caught-up pulses")
    pulse(pg, 5)
    wait_for(lambda: len(jobs_of(efit)) == 4, 60, what="pulse 5")
    assert sorted(j["name"] for j in jobs_of(efit)) == ["efit-1", "efit-2", "efit-4", "efit-5"]
    assert "caught up 3 row(s)" in src2.text()
    [r] = refused(home)  # the bad row is refused alone, kept, and passed by the cursor
    assert r["id"] == 3 and r["origin"] == "catch-up" and "input_url '/etc'" in r["error"]
    assert state(home)["cursor"] == 5 and state(home)["refused"] == 1


@pytest.mark.parametrize("mode", ["table", "notify"])
def test_kill9_between_submit_and_cursor_save_makes_no_second_job(efit, pg, sources, mode):
    home = efit.home
    tpath = write_template(home, template(home, table=mode == "table"))
    crash = sources.start(home, pg, tpath, env={"PILOTFISH_PG_SOURCE_FAULT": "kill-after-submit"})
    if mode == "table":
        pulse(pg, 7, tmax=7.0)
    else:
        notify(pg, json.dumps({"shot": 7, "tmax": 7.0}))
    assert crash.proc.wait(60) == -signal.SIGKILL
    assert len(jobs_of(efit, tag(7))) == 1  # the job was added ...
    s = state(home)
    assert s["pending"]["id"] == 7 and s["cursor"] != 7  # ... the cursor never moved
    again = sources.start(home, pg, tpath)
    wait_for(lambda: "job" in again.text() and "already added" in again.text(), 60,
             what="the pending pulse settled")
    if mode == "table":
        pulse(pg, 8)
    else:
        notify(pg, json.dumps({"shot": 8}))
    wait_for(lambda: jobs_of(efit, tag(8)), 60, what="pulse 8")
    assert sorted(j["name"] for j in jobs_of(efit)) == ["efit-7", "efit-8"]
    assert state(home)["pending"] is None and state(home)["cursor"] == 8


# -- bad input -----------------------------------------------------------------------------------
def test_bad_payloads_are_refused_alone(efit, pg, sources):
    home = efit.home
    src = sources.start(home, pg, write_template(home, template(home, table=False)))
    bad = [
        ("not json {", "payload is not JSON"),
        ("NaN", "payload is not JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"tmax": 1.0}', "id field 'shot' must be an integer"),
        ('{"shot": "12"}', "id field 'shot' must be an integer"),
        ('{"shot": 99999999999999999999999}', "id field 'shot' must be an integer"),
        ('{"shot": 11, "bogus": 1, "application": "rm"}',
         "unknown field(s) 'application', 'bogus'"),
        ('{"shot": 12, "shot": 13}', "given twice"),
        ('{"shot": 14, "tmax": 123456789012345678901234567890}', "past 64 bits"),
        ('{"shot": 15, "tmax": 1e999}', "finite"),
        ('{"shot": 16, "tmax": [1]}', "must be a number, a string or a boolean"),
        ('{"shot": 17, "tmax": "fast"}', "parameter 'tmax' must be float"),
        ('{"shot": 18, "tmax": true}', "parameter 'tmax' must be float, got a boolean"),
        ('{"shot": 19, "run": "/etc/passwd"}', "input_url"),
        ('{"shot": 20, "run": "' + str(home / "data" / ".." / "keys") + '"}', "input_url"),
        ('{"shot": 21, "note": "' + "x" * 5000 + '"}', "payload is 5,"),
    ]
    for payload, _ in bad:
        notify(pg, payload)
    good = {"shot": 22, "tmax": 2.0, "run": str(home / "data" / "p22"), "note": "<b>hi</b>"}
    notify(pg, json.dumps(good))
    wait_for(lambda: jobs_of(efit, tag(22)), 60, what="the good pulse's job")
    wait_for(lambda: len(refused(home)) == len(bad), 30, what="every refusal recorded")
    got = refused(home)
    for (payload, words), r in zip(bad, got):
        assert words in r["error"], (payload, r)
        assert r["origin"] == "notify" and "\n" not in r["error"]
        assert r["payload"] == payload[:4096]
    assert got[-1]["payload_chars"] > 5000
    assert [j["name"] for j in jobs_of(efit)] == ["efit-22"]  # nothing else was added
    log = src.text()
    assert log.count("ERROR pilotfish.source: ") == len(bad) and "Traceback" not in log
    assert src.proc.poll() is None
    assert state(home)["refused"] == len(bad)


# -- the command line ----------------------------------------------------------------------------
def check(home: Path, dsn: str, t: dict | Path, *extra: str) -> subprocess.CompletedProcess:
    path = t if isinstance(t, Path) else write_template(home, t, "check.yaml")
    return run_cli(home, "--client-key", str(home / "keys" / "pulses.key_secret"), "source",
                   "pg", "--dsn", dsn, "--channel", CHANNEL, "--template", str(path), "--check",
                   *extra, timeout=120)


def one_line(r: subprocess.CompletedProcess, words: str) -> None:
    assert r.returncode == 1, (r.stdout, r.stderr)
    errors = [line for line in r.stderr.splitlines() if line.startswith("pilotfish: error:")]
    assert len(errors) == 1 and words in errors[0], r.stderr
    assert "Traceback" not in r.stderr


def test_the_template_is_checked_at_start(efit, pg):
    home = efit.home
    r = check(home, pg, template(home))
    assert r.returncode == 0 and "are fine" in r.stdout, r.stderr
    one_line(check(home, pg, {**template(home), "feilds": {}}), "unknown key(s) 'feilds'")
    t = template(home)
    t["fields"]["tmax"] = {"parameter": "t_max"}
    one_line(check(home, pg, t), "fields.tmax: fills parameter 't_max', which app 'efit' "
             "does not declare")
    t = template(home)
    t["fields"]["run"] = {"job": "application"}
    one_line(check(home, pg, t), "fields.run.job: a payload may never fill 'application'")
    t = template(home)
    t["job"]["group_id"] = "x"  # the server's own job check names it
    one_line(check(home, pg, t), "unknown job key(s) group_id")
    t = template(home)
    t["job"]["application"] = "nope"
    one_line(check(home, pg, t), "job.application")
    t = template(home)
    t["job"]["name"] = "efit-{shott}"
    one_line(check(home, pg, t), "job.name: unknown placeholder(s) {shott}")
    t = template(home)
    t["example"] = {"shot": 1}
    one_line(check(home, pg, t), "example: gives no value for 'note', 'run', 'tmax'")
    t = template(home)
    t["example"]["run"] = "/etc"
    one_line(check(home, pg, t), "refused by the server")
    t = template(home)
    t["fields"]["extra"] = None
    t["example"]["extra"] = 1
    one_line(check(home, pg, t), "catch-up table 'pulses': column \"extra\" does not exist")
    path = home.parent / "broken.yaml"
    path.write_text("source: [unclosed\n")
    one_line(check(home, pg, path), "not valid YAML")
    one_line(check(home, pg, template(home), "--catch-up-table", "pulses; drop table x"),
             "--catch-up-table")


def test_dsn_passwords_and_help(efit, pg, tmp_path):
    home = efit.home
    secret = "s3cr3t-pw"
    with_pw = pg.replace("postgres@", f"postgres:{secret}@", 1)
    r = check(home, with_pw, template(home))
    one_line(r, "--dsn carries a password")
    assert secret not in r.stderr + r.stdout
    r = check(home, f"dbname=x password={secret}", template(home))
    one_line(r, "--dsn carries a password")
    # from a file (mode 600) a password is fine; trust auth ignores it
    f = tmp_path / "dsn"
    f.write_text(with_pw + "\n")
    f.chmod(0o600)
    r = run_cli(home, "--client-key", str(home / "keys" / "pulses.key_secret"), "source", "pg",
                "--dsn-file", str(f), "--channel", CHANNEL, "--template",
                str(write_template(home, template(home))), "--check", timeout=120)
    assert r.returncode == 0, r.stderr
    assert secret not in r.stderr + r.stdout
    r = run_cli(home, "source", "pg", "-h")
    assert r.returncode == 0 and "--catch-up-table" in r.stdout and "pg_notify" in r.stdout
    assert run_cli(home, "source", "-h").returncode == 0
    # without psycopg: a plain error, not a traceback
    code = ("import sys; sys.modules['psycopg'] = None; from pilotfish.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", code, "source", "pg", "--dsn", "dbname=x",
                        "--channel", "c", "--template", "t.yaml"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1 and "needs psycopg 3" in r.stderr and "Traceback" not in r.stderr


# -- outages -------------------------------------------------------------------------------------
def test_server_down_and_database_gone_lose_nothing(efit, pg, sources):
    home = efit.home
    src = sources.start(home, pg, write_template(home, template(home)))
    pulse(pg, 1)
    wait_for(lambda: jobs_of(efit, tag(1)), 60, what="pulse 1")
    efit.stop()
    pulse(pg, 2)  # the source waits for the server, holding the pulse
    wait_for(lambda: "not added yet" in src.text(), 90, what="the source to wait")
    efit.start()
    wait_for(lambda: jobs_of(efit, tag(2)), 90, what="pulse 2 after the server came back")
    # the database drops the source's connection; a pulse arrives meanwhile
    sql(pg, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = %s AND datname = current_database()",
        f"pilotfish-source-{SOURCE}")
    pulse(pg, 3)
    wait_for(lambda: jobs_of(efit, tag(3)), 90, what="pulse 3 after the reconnect")
    assert "reconnecting" in src.text()
    assert sorted(j["name"] for j in jobs_of(efit)) == ["efit-1", "efit-2", "efit-3"]
    assert src.proc.poll() is None and src.stop() == 0


def test_the_bridge_room_keeps_its_arrows():
    """bridge imports the core and the client, never the server or the pilot; psycopg waits
    until a source runs."""
    import ast

    import pilotfish.bridge
    room = Path(pilotfish.bridge.__file__).resolve().parent
    for f in room.glob("*.py"):
        tree = ast.parse(f.read_text())
        mods = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        mods |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        bad = [m for m in mods if m.startswith(("pilotfish.server", "pilotfish.pilot"))]
        assert not bad, f"bridge/{f.name} imports {bad}"
    out = subprocess.run([sys.executable, "-c", "import pilotfish.cli, sys; "
                          "print('psycopg' in sys.modules)"], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "False"
