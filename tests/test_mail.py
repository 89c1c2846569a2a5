"""E-mail on workflows' final states: `pilotfish mail` (beside the server with `server start
--mail`, or alone) against a real SMTP server (aiosmtpd, in a thread of this test) with a
login, a real server and agent running the workflows."""
from __future__ import annotations

import os
import socket
import subprocess
import time
from email import message_from_bytes
from email.policy import default as default_policy
from pathlib import Path

import pytest

from conftest import ServerHandle, pilotfish_cmd, require, run_cli, wait_for
from pilotfish.server import daemon

PASSWORD = "s3cret-smtp-pw"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Inbox:
    """What the SMTP server accepted: (envelope from, recipients, parsed message)."""

    def __init__(self) -> None:
        self.got: list[tuple[str, list[str], object]] = []
        self.logins: list[str] = []

    async def handle_DATA(self, server, session, envelope):
        msg = message_from_bytes(envelope.content, policy=default_policy)
        self.got.append((envelope.mail_from, list(envelope.rcpt_tos), msg))
        return "250 OK"


@pytest.fixture
def smtp():
    try:
        from aiosmtpd.controller import Controller
        from aiosmtpd.smtp import AuthResult
    except ImportError:
        require(False, "aiosmtpd (pip: the test extra)")
    inbox = Inbox()

    def auth(server, session, envelope, mechanism, data):
        ok = data.login == b"pilot" and data.password == PASSWORD.encode()
        if ok:
            inbox.logins.append(data.login.decode())
        return AuthResult(success=ok)
    port = _free_port()
    import warnings
    warnings.filterwarnings("ignore", "Requiring AUTH while not requiring TLS")
    ctl = Controller(inbox, hostname="127.0.0.1", port=port, authenticator=auth,
                     auth_required=True, auth_require_tls=False)
    ctl.start()
    inbox.port = port
    yield inbox
    ctl.stop()


def config(tmp: Path, port: int, **more) -> Path:
    pw = tmp / "smtp-password"
    pw.write_text(PASSWORD + "\n")
    lines = {"sender": "pilotfish@example.org", "host": "127.0.0.1", "port": port,
             "username": "pilot", "password_file": str(pw), **more}
    p = tmp / f"mail-{len(list(tmp.glob('mail-*.yaml')))}.yaml"
    import yaml
    p.write_text(yaml.safe_dump(lines))
    return p


STEP = {"name": "step", "executable": "/bin/sh", "args": ["-c", "exit {code}"],
        "parameters": {"code": {"type": "int", "default": 0}}}


def workflow(name: str, code: int, email) -> dict:
    return {"name": name, "email": email, "username": "alice",
            "subjobs": [{"name": f"{name}-1", "application": "step", "max_retries": 0},
                        {"name": f"{name}-2", "application": "step", "max_retries": 0,
                         "parameters": {"code": code}}]}


def test_mail_on_final_states_and_on_failure_only(home, db_url, smtp, tmp_path):
    cfg = config(tmp_path, smtp.port)
    info = daemon.start_background(home, db_url, "tcp://127.0.0.1:*", 1.0, mail=str(cfg))
    s = ServerHandle(home, db_url)
    s.info = info
    from conftest import SERVER_HOMES
    SERVER_HOMES[info["address"]] = home
    failure_only = None
    try:
        c = s.client()
        c.add_app(STEP)
        # a second mail process, alone, for failures only (its own state directory)
        cfg2 = config(tmp_path, smtp.port, notify="failure", sender="alerts@example.org",
                      state_dir=str(tmp_path / "mail2"))
        failure_only = subprocess.Popen(
            pilotfish_cmd(home, "--server", info["address"], "mail", "--config", str(cfg2)),
            stdout=open(tmp_path / "mail2.log", "ab"), stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL)
        ok = c.add_workflow(workflow("good", 0, ["alice@example.org", "bob@example.org"]))
        bad = c.add_workflow(workflow("bad", 3, "carol@example.org"))
        quiet = c.add_workflow(workflow("quiet", 0, None))  # no addresses: no mail
        s.agent(work_root=tmp_path / "work")
        wait_for(lambda: all(c.workflow(w["id"])["state"] in ("HISTORY", "SUBJOB_RUN_FAILED")
                             for w in (ok, bad, quiet)), 60, what="the workflows to end")
        wait_for(lambda: len(smtp.got) >= 3, 30, what="three mails")
        time.sleep(1.0)  # nothing more comes
        assert len(smtp.got) == 3, [m["Subject"] for _f, _t, m in smtp.got]
        by = {(m["From"], m["Subject"]): (rcpt, m) for _f, rcpt, m in smtp.got}
        rcpt, m = by[("pilotfish@example.org",
                      f"[pilotfish] workflow {ok['id']} good: HISTORY")]
        assert sorted(rcpt) == ["alice@example.org", "bob@example.org"]
        body = m.get_content()
        assert "reached HISTORY" in body and "all 2 subjobs completed" in body
        assert f"job {ok['jobs'][1]} good-2 (step): JOB_FINISHED" in body
        rcpt, m = by[("pilotfish@example.org",
                      f"[pilotfish] workflow {bad['id']} bad: SUBJOB_RUN_FAILED")]
        assert rcpt == ["carol@example.org"] and "RUN_FAILED" in m.get_content()
        rcpt, m = by[("alerts@example.org",
                      f"[pilotfish] workflow {bad['id']} bad: SUBJOB_RUN_FAILED")]
        assert rcpt == ["carol@example.org"]
        assert smtp.logins == ["pilot"] * 3
        # the password is in no process's command line
        for pid in (failure_only.pid, *_children_named(b"mail")):
            assert PASSWORD.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
        # the supervised one keeps its cursor under the home
        assert (home / "mail" / "mail.cursor").exists()
        assert "sent to alice@example.org" in (home / "logs" / "mail.log").read_text()
    finally:
        if failure_only is not None:
            failure_only.terminate()
            failure_only.wait(15)
        s.stop_agents()
        s.stop()


def _children_named(word: bytes) -> list[int]:
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"pilotfish" in cmd and word in cmd:
                out.append(int(pid))
    return out


def test_bad_mail_configs_are_refused_in_one_line(home, tmp_path):
    from pilotfish.bridge.mail import from_yaml, password
    from pilotfish.errors import ValidationError
    cases = [({"password": "x"}, "no password here"),
             ({"sender": "not an address"}, "sender"),
             ({"notify": "always"}, "notify must be final or failure"),
             ({"port": 10**12}, "port must be an integer"),
             ({"tls": "maybe"}, "tls must be"),
             ({"subject_prefix": "a\r\nBcc: x@evil.org"}, "subject_prefix"),
             ({"host": "-oProxyCommand=x"}, "not a host name"),
             ({"colour": "red"}, "unknown key"),
             ({"password_file": "/dev/zero"}, "cannot read the password file")]
    for more, words in cases:
        p = config(tmp_path, more.pop("port", 25), **more)
        with pytest.raises(ValidationError) as e:
            password(from_yaml(str(p)))
        assert words in str(e.value) and "\n" not in str(e.value), (more, e.value)
    # the command says it in one line
    p = config(tmp_path, 25, notify="always")
    r = run_cli(home, "mail", "--config", str(p), "--check")
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    # server start --mail checks it before anything starts
    r = run_cli(home, "server", "start", "--mail", str(p))
    assert r.returncode != 0 and "--mail" in r.stderr and "notify" in r.stderr
    assert not (home / "server.json").exists()
    ok = config(tmp_path, 25)
    assert run_cli(home, "mail", "--config", str(ok), "--check").returncode == 0


def test_failed_states_known_to_clients_are_the_servers():
    from pilotfish.client import WORKFLOW_FAILED_STATES, WORKFLOW_FINAL_STATES
    from pilotfish.server import states
    assert set(WORKFLOW_FAILED_STATES) == {s.value for s in states.WF_FAILURES}
    assert set(WORKFLOW_FINAL_STATES) == {s.value for s in states.WF_FINAL}
