"""Where pilotfish keeps things, and the few tunables every room agrees on.

One place for each path: the server, the agents and the CLI all ask here.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

#: Seconds between agent heartbeats; the server expires an agent's leases after
#: ``LEASE_HEARTBEATS`` missed periods.
HEARTBEAT_SECONDS = 2.0
LEASE_HEARTBEATS = 3.0


def home(path: str | os.PathLike | None = None) -> Path:
    """``$PILOTFISH_HOME`` (default ``~/.pilotfish``), created owner-only on first use."""
    p = Path(path or os.environ.get("PILOTFISH_HOME") or Path.home() / ".pilotfish").expanduser()
    p.mkdir(mode=0o700, parents=True, exist_ok=True)
    return p.resolve()


def default_db_url(home_dir: Path) -> str:
    """``$PILOTFISH_DB`` or an SQLite file in the home."""
    return os.environ.get("PILOTFISH_DB") or f"sqlite:///{home_dir / 'pilotfish.db'}"


def server_info_path(home_dir: Path) -> Path:
    """The file a running server writes so clients and agents can find it."""
    return home_dir / "server.json"


def pid_path(home_dir: Path) -> Path:
    return home_dir / "server.pid"


def last_port_path(home_dir: Path) -> Path:
    """The port this home's server last listened on; reused after a restart."""
    return home_dir / "server.port"


def log_path(home_dir: Path) -> Path:
    return home_dir / "server.log"


def work_root(home_dir: Path) -> Path:
    """Default root of job working directories for agents on this file system."""
    return home_dir / "work"


def read_server_info(home_dir: Path) -> dict | None:
    try:
        return json.loads(server_info_path(home_dir).read_text())
    except (OSError, ValueError):
        return None


def server_address(home_dir: Path, explicit: str | None = None) -> str | None:
    """The address to reach the server: explicit, ``$PILOTFISH_SERVER``, or server.json."""
    if explicit:
        return explicit
    if os.environ.get("PILOTFISH_SERVER"):
        return os.environ["PILOTFISH_SERVER"]
    info = read_server_info(home_dir)
    return info.get("address") if info else None
