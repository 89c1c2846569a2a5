"""Edge processes run beside the server: site agents (``server start --site S``, for a
single-site setup), the AMQP bridge (``server start --amqp CONFIG.yaml``), the mail process
(``server start --mail CONFIG.yaml``) and the web dashboard (``server start --web HOST:PORT``).

Each is an ordinary command (``pilotfish site agent``, ``pilotfish bridge amqp``), a client of
this server like any other (so the server room imports neither the pilot room nor the bridge),
started once the server serves, restarted if it dies (at most once per ``RESTART_EVERY``
seconds, so a profile or config that fails at once does not spin), and stopped with the server.
Their output goes to ``HOME/logs/site-agent-<site>.log``, ``HOME/logs/amqp-bridge.log`` and
``HOME/logs/web.log``. The web makes its own reader key at its first start (``web``) and, open
on loopback, acts with the home's client key like the CLI; with tokens, with each token's key.
"""
from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from pilotfish import settings

log = logging.getLogger("pilotfish.server")

RESTART_EVERY = 30.0
STOP_GRACE = 10.0
#: The client key the AMQP bridge started beside the server uses (made at its first start,
#: role submitter: it adds jobs and reads events, nothing more).
BRIDGE_KEY = "amqp-bridge"
#: The client key of the mail process started beside the server (role reader: it reads
#: events and workflows, nothing more).
MAIL_KEY = "mail"
#: The client key of the federation forwarder (role admin: it leases jobs to remote sites and
#: reports their states, as agents do).
FEDERATE_KEY = "federate"


def site_agent_argv(home: Path, address: str, site: str, poll: float) -> list[str]:
    return [sys.executable, "-m", "pilotfish", "--home", str(home), "--server", address,
            "site", "agent", "--site", site, "--poll", f"{poll:g}"]


def bridge_argv(home: Path, address: str, config: str, client_key: Path | None) -> list[str]:
    """The bridge's command line: its settings and password stay in files."""
    key = ["--client-key", str(client_key)] if client_key else []
    return [sys.executable, "-m", "pilotfish", "--home", str(home), "--server", address, *key,
            "bridge", "amqp", "--config", config]


def mail_argv(home: Path, address: str, config: str, client_key: Path | None) -> list[str]:
    """The mail process's command line: its settings and password stay in files."""
    key = ["--client-key", str(client_key)] if client_key else []
    return [sys.executable, "-m", "pilotfish", "--home", str(home), "--server", address, *key,
            "mail", "--config", config]


def federate_argv(home: Path, address: str, config: str, client_key: Path | None) -> list[str]:
    key = ["--client-key", str(client_key)] if client_key else []
    return [sys.executable, "-m", "pilotfish", "--home", str(home), "--server", address, *key,
            "federate", "--config", config]


def federate_log_path(home: Path) -> Path:
    return settings.home(home) / "logs" / "federate.log"


def federate_key(home: Path) -> Path:
    """The forwarder's key pair (made with the role admin when missing)."""
    from pilotfish import keys
    secret = keys.keys_dir(home) / f"{FEDERATE_KEY}{keys.SECRET}"
    if not secret.exists():
        keys.new_client(home, FEDERATE_KEY, keys.ADMIN)
    return secret


def mail_log_path(home: Path) -> Path:
    return settings.home(home) / "logs" / "mail.log"


def mail_key(home: Path) -> Path:
    """The mail process's key pair (made with the role reader when missing)."""
    from pilotfish import keys
    secret = keys.keys_dir(home) / f"{MAIL_KEY}{keys.SECRET}"
    if not secret.exists():
        keys.new_client(home, MAIL_KEY, keys.READER)
    return secret


def web_argv(home: Path, address: str, bind: str) -> list[str]:
    return [sys.executable, "-m", "pilotfish", "--home", str(home), "--server", address,
            "web", "--bind", bind]


def web_log_path(home: Path) -> Path:
    return settings.home(home) / "logs" / "web.log"


def log_path(home: Path, site: str) -> Path:
    return settings.home(home) / "logs" / f"site-agent-{site}.log"


def bridge_log_path(home: Path) -> Path:
    return settings.home(home) / "logs" / "amqp-bridge.log"


def bridge_key(home: Path) -> Path:
    """The bridge's key pair (made with the role submitter when missing)."""
    from pilotfish import keys
    secret = keys.keys_dir(home) / f"{BRIDGE_KEY}{keys.SECRET}"
    if not secret.exists():
        keys.new_client(home, BRIDGE_KEY, keys.SUBMITTER)
    return secret


class SiteAgents:
    """The edge processes of one server: ``name -> (argv for an address, log file)``."""

    def __init__(self, home: Path, sites: list[str], poll: float,
                 amqp: str | None = None, bridge_client_key: Path | None = None,
                 mail: str | None = None, mail_client_key: Path | None = None,
                 web: str | None = None, federate: str | None = None,
                 federate_client_key: Path | None = None) -> None:
        self.home = home
        self.children: dict[str, tuple[Callable[[str], list[str]], Path]] = {
            f"site agent for {s}": (lambda a, s=s: site_agent_argv(home, a, s, poll),
                                    log_path(home, s)) for s in sites}
        if amqp:
            self.children["AMQP bridge"] = (
                lambda a: bridge_argv(home, a, amqp, bridge_client_key), bridge_log_path(home))
        if mail:
            self.children["mail"] = (
                lambda a: mail_argv(home, a, mail, mail_client_key), mail_log_path(home))
        if federate:
            self.children["federate"] = (
                lambda a: federate_argv(home, a, federate, federate_client_key),
                federate_log_path(home))
        if web:
            self.children["web dashboard"] = (lambda a: web_argv(home, a, web),
                                              web_log_path(home))
        self.procs: dict[str, subprocess.Popen] = {}
        self.started: dict[str, float] = {}

    def start(self, address: str) -> None:
        self.address = address
        for name in self.children:
            self._start(name)

    def _start(self, name: str) -> None:
        argv, path = self.children[name]
        path.parent.mkdir(mode=0o700, exist_ok=True)
        with open(path, "ab") as out:
            self.procs[name] = subprocess.Popen(
                argv(self.address), stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                start_new_session=True)
        self.started[name] = time.monotonic()
        log.info("%s started: pid %d, log %s", name, self.procs[name].pid, path)

    def check(self) -> None:
        """Restart the processes that ended (their logs say why)."""
        for name, proc in list(self.procs.items()):
            if proc.poll() is None:
                continue
            if time.monotonic() - self.started[name] < RESTART_EVERY:
                continue
            log.warning("%s ended (exit %s; see %s): starting it again", name,
                        proc.returncode, self.children[name][1])
            self._start(name)

    def stop(self) -> None:
        live = [p for p in self.procs.values() if p.poll() is None]
        for p in live:
            p.terminate()
        deadline = time.monotonic() + STOP_GRACE
        for p in live:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for name, p in self.procs.items():
            log.info("%s stopped (exit %s)", name, p.returncode)
