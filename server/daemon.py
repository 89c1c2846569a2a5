"""Starting and stopping a server in the background: pid file, log file, readiness wait."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from pilotfish import keys, settings
from pilotfish.errors import PilotfishError, ServerUnavailable

from pilotfish.client import Client


def running_pid(home: Path) -> int | None:
    """The pid of this home's server if it is alive, else None (stale files are ignored)."""
    info = settings.read_server_info(home) or {}
    pid = info.get("pid")
    if not pid:
        try:
            pid = int(settings.pid_path(home).read_text().strip())
        except (OSError, ValueError):
            return None
    return pid if alive(pid) else None


def alive(pid: int) -> bool:
    """Is the process running? Reaps it if it is our own child that exited (a zombie)."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def run_foreground(home: Path, db_url: str, bind: str, heartbeat: float,
                   insecure: bool = False, sites: Sequence[str] = (),
                   site_poll: float = 10.0, data_roots: Sequence[str] = ()) -> None:
    from .service import Service  # pulls in the database layer only when serving
    os.umask(0o077)  # everything the server writes (database, logs, ipc socket) is owner-only
    Service(db_url, bind, home, heartbeat=heartbeat, insecure=insecure, sites=list(sites),
            site_poll=site_poll, data_roots=list(data_roots)).run()


def open_log(home: Path):
    """The server's log file for appending, owner-only."""
    path = settings.log_path(home)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    settings.make_private(path)
    return os.fdopen(fd, "ab")


def start_background(home: Path, db_url: str, bind: str, heartbeat: float,
                     wait: float = 30.0, insecure: bool = False, sites: Sequence[str] = (),
                     site_poll: float = 10.0, data_roots: Sequence[str] = ()) -> dict:
    """Start a detached server; return its server.json once it answers a ping.

    A tcp:// server uses CurveZMQ unless ``insecure`` (loopback binds only); it makes the
    home's keys when they are missing, so clients of the same home find them."""
    if running_pid(home):
        raise PilotfishError(f"a server is already running for {home} (pid {running_pid(home)});"
                             " `pilotfish server stop` first")
    for p in (settings.server_info_path(home), settings.pid_path(home)):
        p.unlink(missing_ok=True)
    log = open_log(home)
    cmd = [sys.executable, "-m", "pilotfish", "--home", str(home), "server", "start",
           "--foreground", "--db", db_url,
           "--bind", bind, "--heartbeat", str(heartbeat)] + (["--insecure"] if insecure else [])
    for site in sites:
        cmd += ["--site", site]
    if sites:
        cmd += ["--site-poll", f"{site_poll:g}"]
    for root in data_roots:
        cmd += ["--data-root", root]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                            start_new_session=True, close_fds=True)
    log.close()
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = settings.log_path(home).read_text(errors="replace").strip().splitlines()[-1:]
            raise PilotfishError(f"the server exited at start (code {proc.returncode}): "
                                 f"{tail[0] if tail else 'see ' + str(settings.log_path(home))}")
        info = settings.read_server_info(home)
        if info and info.get("pid") == proc.pid:
            try:
                with Client(info["address"], home, timeout=2) as c:
                    c.ping()
                return info
            except keys.Refused as exc:  # it is up; this home's own client key is not admitted
                logging.getLogger("pilotfish").warning("%s", exc)
                return info
            except ServerUnavailable:
                pass
        time.sleep(0.05)
    proc.terminate()
    raise PilotfishError(f"the server did not answer within {wait:.0f} s; see "
                         f"{settings.log_path(home)}")


def stop(home: Path, wait: float = 30.0) -> int | None:
    """Ask the server to stop (then SIGTERM, then SIGKILL); return the pid stopped, if any."""
    pid = running_pid(home)
    if pid is None:
        return None
    try:
        with Client(home=home, timeout=5) as c:
            c.shutdown()
    except PilotfishError:
        logging.getLogger("pilotfish").info("server did not answer; sending SIGTERM")
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if not alive(pid):
            return pid
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    return pid
