"""Where pilotfish keeps things, and the few tunables every room agrees on.

One place for each path: the server, the agents and the CLI all ask here.
"""
from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

#: Seconds between agent heartbeats; the server expires an agent's leases after
#: ``LEASE_HEARTBEATS`` missed periods.
HEARTBEAT_SECONDS = 2.0
LEASE_HEARTBEATS = 3.0
#: Seconds an agent stays after its server said it stops on purpose (at least three heartbeats):
#: a restart within them (``server stop; server start``) keeps it and its tasks.
AGENT_STOP_GRACE = 10.0
AGENT_STOP_GRACE_ENV = "PILOTFISH_AGENT_STOP_GRACE"


def agent_stop_grace(environ: dict | None = None) -> float:
    """The stop grace the server tells its agents: $PILOTFISH_AGENT_STOP_GRACE (seconds, 1 to
    a day), else AGENT_STOP_GRACE; ValueError with what is expected for anything else."""
    text = (os.environ if environ is None else environ).get(AGENT_STOP_GRACE_ENV, "").strip()
    if not text:
        return AGENT_STOP_GRACE
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not 1 <= v <= 86400:  # (nan fails too)
        raise ValueError(f"{AGENT_STOP_GRACE_ENV}={text[:40]!r}: give seconds, 1 to 86400")
    return v


#: Stage-in and stage-out (one child process per step, see pilotfish.pilot.stage): a step is
#: stopped after this many seconds, and after copying this many bytes. An hour moves ~100 GB at
#: the 30 MB/s a busy shared file system gives one client; both are per job and per step.
#: Overridden by PILOTFISH_STAGE_TIMEOUT / PILOTFISH_STAGE_MAX_BYTES, the agent's
#: --stage-timeout / --stage-max-bytes and a site profile's ``staging``.
STAGE_TIMEOUT = 3600.0
STAGE_MAX_BYTES = 100 * 2**30
STAGE_TIMEOUT_ENV = "PILOTFISH_STAGE_TIMEOUT"
STAGE_MAX_BYTES_ENV = "PILOTFISH_STAGE_MAX_BYTES"
_SIZE_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40, "P": 2**50}


def parse_size(value: object, what: str = "size") -> int:
    """Bytes from ``123``, ``10K``, ``5MiB``, ``100G``, ``1TB`` (binary units); ValueError with
    what is expected otherwise."""
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    elif isinstance(value, str):
        text = value.strip().upper()
        for suffix in ("IB", "B"):
            if text.endswith(suffix) and text[:-len(suffix)][-1:].isalpha():
                text = text[:-len(suffix)]
                break
        text = text[:-1] if text.endswith("B") and text[:-1].isdigit() else text
        unit = text[-1:] if text[-1:].isalpha() else ""
        digits = text[:-1] if unit else text
        if unit not in _SIZE_UNITS or not digits.isdigit():
            raise ValueError(f"{what} {value!r}: expected bytes as a whole number, optionally "
                             "with K, M, G, T or P (binary units), such as 100G")
        n = int(digits) * _SIZE_UNITS[unit]
    else:
        raise ValueError(f"{what} {value!r}: expected bytes, such as 100G")
    if n < 1:
        raise ValueError(f"{what} {value!r}: expected at least 1 byte")
    return n


def stage_limits(timeout: float | None = None, max_bytes: int | str | None = None,
                 environ: dict | None = None) -> tuple[float, int]:
    """(seconds, bytes) for stage steps: the arguments, else the environment, else defaults."""
    env = os.environ if environ is None else environ
    if timeout is None and env.get(STAGE_TIMEOUT_ENV):
        try:
            timeout = float(env[STAGE_TIMEOUT_ENV])
        except ValueError:
            raise ValueError(f"{STAGE_TIMEOUT_ENV}={env[STAGE_TIMEOUT_ENV]!r}: expected "
                             "seconds") from None
    if max_bytes is None and env.get(STAGE_MAX_BYTES_ENV):
        max_bytes = env[STAGE_MAX_BYTES_ENV]
    timeout = STAGE_TIMEOUT if timeout is None else timeout
    if not timeout > 0 or timeout == float("inf"):
        raise ValueError(f"stage timeout {timeout!r}: expected a positive number of seconds")
    size = STAGE_MAX_BYTES if max_bytes is None else parse_size(max_bytes, "stage max bytes")
    return float(timeout), size


#: Task output shipped through the server (``pilotfish job log``): at most OUTPUT_CAP bytes of
#: each of a task's job.out and job.err per attempt are kept by the server (the rest stays in
#: the workdir), shipped at most OUTPUT_RATE bytes a second per agent. The server decides both
#: (PILOTFISH_OUTPUT_CAP / PILOTFISH_OUTPUT_RATE, or `server start --output-cap/--output-rate`)
#: and tells its agents in the welcome; a cap of 0 ships nothing.
OUTPUT_CAP = 2**20
OUTPUT_RATE = 256 * 2**10
OUTPUT_CAP_ENV = "PILOTFISH_OUTPUT_CAP"
OUTPUT_RATE_ENV = "PILOTFISH_OUTPUT_RATE"
#: The largest cap and rate accepted (a reply must fit a message: MAX_MESSAGE_BYTES is 64 MiB).
OUTPUT_MAX = 16 * 2**20


def output_limits(environ: dict | None = None) -> tuple[int, int]:
    """(cap, rate) in bytes for shipped task output: the environment, else the defaults."""
    env = os.environ if environ is None else environ
    out = []
    for name, default in ((OUTPUT_CAP_ENV, OUTPUT_CAP), (OUTPUT_RATE_ENV, OUTPUT_RATE)):
        text = env.get(name, "").strip()
        n = default if not text else 0 if text == "0" else parse_size(text, name)
        if n > OUTPUT_MAX:
            raise ValueError(f"{name}={text!r}: at most {OUTPUT_MAX // 2**20}M")
        out.append(n)
    if out[0] and not out[1]:
        raise ValueError(f"{OUTPUT_RATE_ENV}=0: give a rate, or set {OUTPUT_CAP_ENV}=0 to ship "
                         "no output")
    return out[0], out[1]


def fence_timing(heartbeat: float, lease: float) -> tuple[float, float, float]:
    """(bound, grace, lag) for fencing: ``bound`` seconds after sending the newest message whose
    receipt the server acknowledged (a lease renewal), an agent that has had no newer renewal
    -- cut off, paused, hung -- stops its tasks (SIGTERM, SIGKILL ``grace`` later). Its guard
    does the same ``lag`` later, so that a live agent always stops them first and knows why;
    the guard acts for an agent that cannot. Even the guard's SIGKILL comes before the server
    may count the ``lease`` out (it counts from the receipt, which is after the send) and hand
    those jobs to another agent. Only durations on the agent's own monotonic clock: no clock
    is shared."""
    grace, lag = heartbeat / 4, heartbeat / 8
    return max(heartbeat, lease - heartbeat / 2 - grace), grace, lag


def home(path: str | os.PathLike | None = None) -> Path:
    """``$PILOTFISH_HOME`` (default ``~/.pilotfish``), created owner-only on first use."""
    p = Path(path or os.environ.get("PILOTFISH_HOME") or Path.home() / ".pilotfish").expanduser()
    if not p.is_dir():
        p.mkdir(mode=0o700, parents=True, exist_ok=True)
        make_private(p)
    return p.resolve()


def make_private(path: Path) -> bool:
    """Take group and other permissions off ``path`` (a file: 0600, a directory: 0700) when we
    own it; True when that changed anything. The home holds the database and the secret keys."""
    try:
        st = path.stat()
    except OSError:
        return False
    if st.st_uid != os.geteuid() or not stat.S_IMODE(st.st_mode) & 0o077:
        return False
    os.chmod(path, stat.S_IMODE(st.st_mode) & 0o700)
    logging.getLogger("pilotfish").info("made %s owner-only (was %04o)", path,
                                        stat.S_IMODE(st.st_mode))
    return True


def private_sqlite(db_url: str) -> Path | None:
    """Create the SQLite file of ``db_url`` owner-only (0600), or make an existing one (and its
    -wal/-shm files) so; SQLite gives the files it adds the database file's mode. Returns the
    file, or None for another database."""
    if not db_url.startswith("sqlite:///"):
        return None
    name = db_url[len("sqlite:///"):].split("?", 1)[0]
    if not name or name == ":memory:":
        return None
    path = Path(name)
    if not path.exists():
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        except OSError:
            return None  # the database layer reports a bad path in its own words
    for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm"), Path(f"{path}-journal")):
        if p.exists():
            make_private(p)
    return path


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
