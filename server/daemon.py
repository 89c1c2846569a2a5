"""Starting and stopping a server in the background: pid file, log file, readiness wait."""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from pilotfish import keys, settings
from pilotfish.errors import PilotfishError, ServerUnavailable

from pilotfish.client import Client


def running_pid(home: Path) -> int | None:
    """The pid of this home's server if it runs on this machine, else None.

    Answers at once from /proc, without asking the server: a pid that is gone, a zombie, or a
    pid reused by another process (one that began after the server wrote server.json, or,
    with only server.pid to go by, one that is not ``pilotfish ... server start``) is not
    running. Stale server.json and server.pid files are ignored."""
    info = settings.read_server_info(home) or {}
    pid = info.get("pid")
    if info.get("host") not in (None, socket.gethostname()) and isinstance(pid, int):
        return pid  # a server on another machine of a shared home: /proc here cannot tell
    if not isinstance(pid, int) or isinstance(pid, bool):
        try:
            pid = int(settings.pid_path(home).read_text().strip())
        except (OSError, ValueError):
            return None
    if pid <= 0 or not alive(pid):
        return None
    started = info.get("started") if info.get("pid") == pid else None
    born = _start_time(pid) if isinstance(started, (int, float)) else None
    if born is not None:
        # a process that began before the server wrote server.json with its pid IS that
        # server (a pid is not reused while its process lives); one that began later has
        # the pid of a dead server. Slack: /proc's boot time has whole seconds.
        return pid if born <= started + 2.0 else None
    return pid if is_server(pid, home) else None


def _start_time(pid: int) -> float | None:
    """When the process began (seconds since the epoch) from /proc, or None if unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        ticks = int(stat[stat.rfind(b")") + 2:].split()[19])  # field 22: starttime
        with open("/proc/stat", "rb") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith(b"btime "))
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _proc_state(pid: int) -> str | None:
    """The state letter of /proc/PID/stat (R, S, D, Z, ...); None if the process is gone,
    "?" if /proc cannot tell (no /proc here)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return None if os.path.isdir("/proc/self") else "?"
    except OSError:
        return "?"
    # "pid (comm) S ...": comm may hold spaces and parentheses; the state follows the last ')'
    tail = stat[stat.rfind(b")") + 2:]
    return tail[:1].decode("ascii", "replace") or "?"


def alive(pid: int) -> bool:
    """Is the process running? A zombie (exited, not reaped by its parent) is not; one that is
    our own child is reaped here."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    except ChildProcessError:
        pass
    state = _proc_state(pid)
    if state is None or state in ("Z", "X", "x"):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def is_server(pid: int, home: Path) -> bool:
    """Is ``pid`` a pilotfish server (``pilotfish ... server start``) of ``home``? A pid the
    kernel gave to another program since, or another home's server, is not. Where /proc
    cannot tell (not Linux), any live process is taken for it."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except FileNotFoundError:
        return not os.path.isdir("/proc/self")
    except OSError:  # another user's process (hidepid, ...): not our server
        return False
    if not any(a == "pilotfish" or a.endswith("/pilotfish") for a in argv[:3]):
        return False
    if "server" not in argv or "start" not in argv[argv.index("server"):]:
        return False
    if "--home" in argv[:-1]:
        given = argv[argv.index("--home") + 1]
        try:
            return Path(given).resolve() == Path(home).resolve()
        except OSError:
            return False
    return True


def run_foreground(home: Path, db_url: str, bind: str, heartbeat: float,
                   insecure: bool = False, sites: Sequence[str] = (),
                   site_poll: float = 10.0, data_roots: Sequence[str] = (),
                   events_keep: str | None = None,
                   amqp: str | None = None, mail: str | None = None,
                   web: str | None = None, federate: str | None = None) -> None:
    from .service import Service  # pulls in the database layer only when serving
    from .gc_files import parse_duration
    os.umask(0o077)  # everything the server writes (database, logs, ipc socket) is owner-only
    Service(db_url, bind, home, heartbeat=heartbeat, insecure=insecure, sites=list(sites),
            site_poll=site_poll, data_roots=list(data_roots), amqp=amqp, mail=mail, web=web,
            federate=federate,
            events_keep=parse_duration(events_keep) if events_keep else None).run()
    # The server has stopped cleanly (database closed, sockets closed, site agents stopped):
    # leave now. Tearing down the interpreter's modules (sqlalchemy, zmq, ...) took 0.3 s, which
    # `server stop` waited for on every call.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def open_log(home: Path):
    """The server's log file for appending, owner-only."""
    path = settings.log_path(home)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    settings.make_private(path)
    return os.fdopen(fd, "ab")


def start_background(home: Path, db_url: str, bind: str, heartbeat: float,
                     wait: float = 30.0, insecure: bool = False, sites: Sequence[str] = (),
                     site_poll: float = 10.0, data_roots: Sequence[str] = (),
                     events_keep: str | None = None,
                     amqp: str | None = None, mail: str | None = None,
                     web: str | None = None, federate: str | None = None) -> dict:
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
    if events_keep:
        cmd += ["--events-keep", events_keep]
    if amqp:
        cmd += ["--amqp", amqp]
    if mail:
        cmd += ["--mail", mail]
    if federate:
        cmd += ["--federate", federate]
    if web:
        cmd += ["--web", web]
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
    info = settings.read_server_info(home) or {}
    remote = info.get("host") not in (None, socket.gethostname())
    try:
        with Client(home=home, timeout=5) as c:
            c.shutdown()
    except PilotfishError:
        if remote:
            raise PilotfishError(f"the server of {home} runs on {info['host']} (pid {pid}) and "
                                 "did not answer within 5 s; stop it there") from None
        logging.getLogger("pilotfish").info("server did not answer; sending SIGTERM")
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if (settings.read_server_info(home) or {}).get("pid") != pid if remote \
                else exited(pid):
            return pid
        time.sleep(0.02)
    if not remote:
        _signal(pid, signal.SIGKILL)
    return pid


def exited(pid: int) -> bool:
    """Has the server exited? A detached server's parent is init, which may take seconds to
    reap it: an exited process waiting to be reaped (a zombie) has exited (see :func:`alive`)."""
    return not alive(pid)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:  # it ended meanwhile
        pass
