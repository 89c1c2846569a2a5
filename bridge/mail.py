"""``pilotfish mail``: e-mail to a workflow's ``email`` addresses when it reaches a final state
(HISTORY or a failure), or on failures only (``notify: failure``).

An edge process, a client of the server with a reader key: it reads the event stream (workflow
events into the chosen states) from its own saved cursor and sends through the SMTP server of
its config, so the server never waits on SMTP. At least once: the cursor moves past an event
only once its message was accepted by the SMTP server (or refused for good: a 5xx answer), so a
mail process killed at any moment sends again at most the message it was sending. The SMTP
password comes from a file or $PILOTFISH_SMTP_PASSWORD, never from a command line or the YAML.
"""
from __future__ import annotations

import logging
import os
import re
import signal
import smtplib
import ssl
import threading
import time
from dataclasses import dataclass, fields
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import Callable

from pilotfish.client import WORKFLOW_FAILED_STATES, WORKFLOW_FINAL_STATES, Client
from pilotfish.errors import NotFound, PilotfishError, Pruned, ServerUnavailable, ValidationError
from pilotfish.textfile import read_text
from pilotfish.validate import cap, echo

from .backoff import Backoff
from .cursor import CursorFile

log = logging.getLogger("pilotfish.mail")
PASSWORD_ENV = "PILOTFISH_SMTP_PASSWORD"
_HOST = re.compile(r"[A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\]")
_ADDRESS = re.compile(r"[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]{1,63}(\.[A-Za-z0-9-]{1,63})*")
#: Events asked for at once, and how long one request may wait at the server.
PAGE = 200
WAIT = 10.0
#: Seconds the mailer gets to finish a message once asked to stop.
STOP_GRACE = 3.0


@dataclass
class MailConfig:
    sender: str | None = None              # the From address (required)
    host: str = "127.0.0.1"
    port: int = 25
    tls: str = "none"                      # none, starttls or ssl
    username: str | None = None            # log in when given
    password_file: str | None = None       # else $PILOTFISH_SMTP_PASSWORD
    notify: str = "final"                  # final: HISTORY and failures; failure: failures only
    state_dir: str | None = None           # default: HOME/mail
    timeout: float = 30.0                  # seconds for one SMTP conversation
    subject_prefix: str = "[pilotfish]"

    def check(self) -> "MailConfig":
        if not isinstance(self.sender, str) or not _ADDRESS.fullmatch(self.sender):
            raise ValidationError(f"sender {echo(self.sender)}: give the From address "
                                  "(local@domain)")
        if not isinstance(self.host, str) or not _HOST.fullmatch(self.host):
            raise ValidationError(f"host {echo(self.host)} is not a host name or address")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or \
                not 0 < self.port < 65536:
            raise ValidationError(f"port must be an integer 1..65535, got {echo(self.port)}")
        if self.tls not in ("none", "starttls", "ssl"):
            raise ValidationError(f"tls must be none, starttls or ssl, got {echo(self.tls)}")
        if self.notify not in ("final", "failure"):
            raise ValidationError(f"notify must be final or failure, got {echo(self.notify)}")
        if self.username is not None and (not isinstance(self.username, str) or not 0 < len(
                self.username) <= 255 or any(c < " " for c in self.username)):
            raise ValidationError("username must be a string without control characters")
        if isinstance(self.timeout, bool) or not isinstance(self.timeout, (int, float)) or \
                not 0 < self.timeout <= 600:
            raise ValidationError(f"timeout must be seconds 0..600, got {echo(self.timeout)}")
        if not isinstance(self.subject_prefix, str) or len(self.subject_prefix) > 64 or any(
                c < " " for c in self.subject_prefix):
            raise ValidationError("subject_prefix must be at most 64 printable characters")
        return self

    def states(self) -> list[str]:
        return list(WORKFLOW_FAILED_STATES if self.notify == "failure"
                    else WORKFLOW_FINAL_STATES)

    def state_path(self, home: Path) -> Path:
        return Path(self.state_dir) if self.state_dir else home / "mail"


def from_yaml(path: str) -> MailConfig:
    import yaml
    try:
        data = yaml.safe_load(read_text(path, 1 << 20))
    except OSError as exc:
        raise ValidationError(f"cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ValidationError(f"{path}: not YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ValidationError(f"{path}: must be a map of mail settings")
    if "password" in data:
        raise ValidationError(f"{path}: no password here; password_file or ${PASSWORD_ENV}")
    names = {f.name for f in fields(MailConfig)}
    unknown = set(data) - names
    if unknown:
        raise ValidationError(f"{path}: unknown key(s) {', '.join(sorted(map(str, unknown)))}; "
                              f"expected {', '.join(sorted(names))}")
    if data.get("password_file"):  # relative to the YAML file
        data["password_file"] = str((Path(path).parent / data["password_file"]).resolve())
    try:
        return MailConfig(**data).check()
    except TypeError as exc:
        raise ValidationError(f"{path}: {exc}") from None


def password(cfg: MailConfig) -> str | None:
    """The SMTP password (only with a username): password_file's first line, else the
    environment."""
    if cfg.username is None:
        return None
    if cfg.password_file:
        try:
            lines = read_text(cfg.password_file, 1 << 16).splitlines()
        except OSError as exc:
            raise ValidationError(f"cannot read the password file {cfg.password_file}: "
                                  f"{exc.strerror}") from None
        if not lines or not lines[0]:
            raise ValidationError(f"the password file {cfg.password_file} is empty")
        return lines[0]
    if os.environ.get(PASSWORD_ENV):
        return os.environ[PASSWORD_ENV]
    raise ValidationError(f"no SMTP password for user {cfg.username!r}: give password_file or "
                          f"${PASSWORD_ENV}")


def compose(cfg: MailConfig, wf: dict, event: dict) -> EmailMessage:
    """The message for one workflow event. Headers hold only checked values (addresses, the
    workflow's id, name and state); free text (messages) goes to the body only."""
    m = EmailMessage()
    m["From"] = cfg.sender
    m["To"] = ", ".join(wf["email"])
    m["Subject"] = f"{cfg.subject_prefix} workflow {wf['id']} {wf['name']}: {event['to']}"
    m["Date"] = formatdate(event["time"], usegmt=True)
    m["Message-ID"] = make_msgid(f"wf{wf['id']}.ev{event['id']}")
    lines = [f"Workflow {wf['id']} ({wf['name']}) reached {event['to']} at "
             f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(event['time']))}.", ""]
    if event.get("message"):
        lines += [cap(event["message"], 2000), ""]
    for k in ("description", "username", "user_id", "group_identifier", "input_url",
              "output_url"):
        if wf.get(k) not in (None, ""):
            lines.append(f"{k}: {cap(str(wf[k]), 500)}")
    lines += ["", f"subjobs ({wf['done']} of {wf['subjobs']} completed):"]
    for s in wf.get("subjob_list", []):
        lines.append(f"  [{s['index']}] job {s['job']} {s['name']} ({s['application']}): "
                     f"{s['state']}")
    m.set_content("\n".join(lines) + "\n")
    return m


class Permanent(Exception):
    """The SMTP server refused the message for good (5xx): sending it again would not help."""


def send(cfg: MailConfig, msg: EmailMessage, pw: str | None) -> None:
    """One SMTP conversation; Permanent on a 5xx refusal, OSError/SMTPException otherwise."""
    ctx = ssl.create_default_context()
    cls = smtplib.SMTP_SSL if cfg.tls == "ssl" else smtplib.SMTP
    kw = {"context": ctx} if cfg.tls == "ssl" else {}
    with cls(cfg.host, cfg.port, timeout=cfg.timeout, **kw) as s:
        if cfg.tls == "starttls":
            s.starttls(context=ctx)
        if cfg.username is not None:
            s.login(cfg.username, pw or "")
        try:
            s.send_message(msg)
        except smtplib.SMTPRecipientsRefused as exc:
            raise Permanent(f"every recipient refused: {cap(str(exc.recipients), 300)}") from None
        except smtplib.SMTPResponseException as exc:
            if exc.smtp_code >= 500:
                raise Permanent(f"{exc.smtp_code} {cap(str(exc.smtp_error), 300)}") from None
            raise


class Mailer:
    def __init__(self, cfg: MailConfig, home: Path, new_client: Callable[[], Client],
                 stop: threading.Event) -> None:
        self.cfg, self.new_client, self.stop = cfg, new_client, stop
        self.pw = password(cfg)
        self.cursor_file = CursorFile(cfg.state_path(home) / "mail.cursor")
        self.client: Client | None = None
        self.stats = {"sent": 0, "refused": 0}
        #: set while a message is being sent (a stop waits for it; else it leaves at once)
        self.sending = threading.Event()

    def run(self) -> None:
        states = self.cfg.states()
        backoff = Backoff()
        cursor = self.cursor_file.load()
        while not self.stop.is_set():
            try:
                c = self._client()
                if cursor is None:  # never ran: from the oldest event the server keeps
                    cursor = c.status()["events"]["oldest"] - 1
                page = c.events(since=cursor, wait=WAIT, limit=PAGE, kind="workflow",
                                state=states)
                for e in page["events"]:
                    if self.stop.is_set():
                        return
                    self._mail(c, e)
                    cursor = e["id"]
                    self.cursor_file.save(cursor)
                if page["cursor"] != cursor:
                    cursor = page["cursor"]
                    self.cursor_file.save(cursor)
                backoff.reset()
            except Pruned as exc:
                log.error("mail: %s; going on from the oldest event kept (mails for the "
                          "events in between are LOST)", exc)
                cursor = None
            except (ServerUnavailable, OSError, smtplib.SMTPException) as exc:
                if isinstance(exc, ServerUnavailable):
                    self._drop()
                wait = backoff.next()
                log.warning("mail: %s; trying again in %.1f s from cursor %s",
                            cap(str(exc) or type(exc).__name__, 300), wait, cursor)
                self.stop.wait(wait)
            except PilotfishError as exc:  # the server refuses us (a key's role): say, retry
                wait = backoff.next()
                log.error("mail: the server refused: %s; trying again in %.1f s", exc, wait)
                self.stop.wait(wait)

    def _mail(self, c: Client, e: dict) -> None:
        try:
            wf = c.workflow(e["workflow"])
        except NotFound:
            return  # removed since
        if not wf.get("email"):
            return
        msg = compose(self.cfg, wf, e)
        self.sending.set()
        try:
            send(self.cfg, msg, self.pw)
        except Permanent as exc:
            self.stats["refused"] += 1
            log.error("mail: workflow %s %s to %s refused for good: %s", wf["id"], e["to"],
                      msg["To"], exc)
            return
        finally:
            self.sending.clear()
        self.stats["sent"] += 1
        log.info("mail: workflow %s %s sent to %s", wf["id"], e["to"], msg["To"])

    def _client(self) -> Client:
        if self.client is None:
            self.client = self.new_client()
        return self.client

    def _drop(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None


def run(cfg: MailConfig, home: Path, new_client: Callable[[], Client]) -> int:
    """Run until SIGTERM/SIGINT."""
    from .amqp import lock_state_dir
    state = cfg.state_path(home)
    fd = lock_state_dir(state, "mail process")
    stop = threading.Event()

    def on_signal(signum, _frame) -> None:
        log.info("signal %d: stopping", signum)
        stop.set()
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    m = Mailer(cfg, home, new_client, stop)
    log.info("mail (pid %d): workflows in %s to SMTP %s:%d; state in %s", os.getpid(),
             "final states" if cfg.notify == "final" else "failure states", cfg.host, cfg.port,
             state)
    # the mailer waits in long event requests: it runs in a thread, so a stop does not wait
    # for the server's answer (its cursor is saved after every message, nothing is lost)
    t = threading.Thread(target=m.run, name="mailer", daemon=True)
    t.start()
    while t.is_alive() and not stop.is_set():
        stop.wait(0.5)
    if m.sending.is_set():  # else it waits on the server: nothing to finish
        t.join(STOP_GRACE)
    os.close(fd)
    return 0
