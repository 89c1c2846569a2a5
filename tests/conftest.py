"""Shared fixtures: real servers and real agents as separate processes on loopback sockets.

``PILOTFISH_REQUIRE_EXTERNAL=1`` (set by .ci/run) turns every skip for a missing external system
(PostgreSQL, ...) into a failure, so CI never passes by skipping.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from pilotfish import keys
from pilotfish.server import daemon
from pilotfish.client import Client

# the external systems' checks live in externals.py, which scripts/test also runs for its report
from externals import PG_ADMIN_URL, pg_available, slurm_nodes  # noqa: E402,F401


def require(ok: bool, what: str) -> None:
    """Skip when an external system is missing, or fail when CI requires it."""
    if ok:
        return
    if os.environ.get("PILOTFISH_REQUIRE_EXTERNAL") == "1":
        pytest.fail(f"required external system missing: {what}")
    pytest.skip(f"external system missing: {what}")


def pilotfish_cmd(home: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "pilotfish", "--home", str(home), *args]


def run_cli(home: Path, *args: str, input: str | None = None, timeout: float = 60,
            check: bool = False) -> subprocess.CompletedProcess:
    r = subprocess.run(pilotfish_cmd(home, *args), capture_output=True, text=True, input=input,
                       timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"pilotfish {' '.join(args)} failed ({r.returncode}):\n"
                             f"{r.stdout}\n{r.stderr}")
    return r


#: The home of each test server by address: raw sockets of tests find its CurveZMQ keys there.
SERVER_HOMES: dict[str, Path] = {}


def curve_socket(sock, address: str):
    """Give a raw test socket (before it connects) the CurveZMQ client keys of the test server
    at ``address`` (the ones its home's Client and agents use)."""
    return keys.apply_client(sock, keys.client_curve(SERVER_HOMES[address], address))


class ServerHandle:
    def __init__(self, home: Path, db_url: str, heartbeat: float = 1.0,
                 data_roots: tuple[str, ...] = ()) -> None:
        self.home = home
        self.db_url = db_url
        self.heartbeat = heartbeat
        self.data_roots = tuple(data_roots)  # --data-root of the server (default: HOME/data)
        self.info: dict = {}
        self.agents: list[subprocess.Popen] = []

    def start(self) -> "ServerHandle":
        self.info = daemon.start_background(self.home, self.db_url, "tcp://127.0.0.1:*",
                                            self.heartbeat, data_roots=self.data_roots)
        SERVER_HOMES[self.info["address"]] = self.home
        return self

    @property
    def address(self) -> str:
        return self.info["address"]

    @property
    def pid(self) -> int:
        return self.info["pid"]

    def client(self, timeout: float = 30) -> Client:
        return Client(self.address, self.home, timeout=timeout)

    def stop(self) -> None:
        daemon.stop(self.home, wait=15)

    def kill9(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        while daemon.alive(self.pid):
            time.sleep(0.02)

    def agent(self, *args: str, cores: str | None = None, log: Path | None = None,
              work_root: Path | None = None) -> subprocess.Popen:
        """Start a real node agent process for this server."""
        cmd = pilotfish_cmd(self.home, "pilot", "agent", "--server", self.address,
                            "--idle-timeout", "0", *args)
        if cores:
            cmd += ["--cores", cores]
        if work_root:
            cmd += ["--work-root", str(work_root)]
        out = open(log or self.home / f"agent-{len(self.agents)}.log", "ab")
        p = subprocess.Popen(cmd, stdout=out, stderr=out, stdin=subprocess.DEVNULL)
        out.close()
        self.agents.append(p)
        return p

    def stop_agents(self) -> None:
        for p in self.agents:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.agents:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@pytest.fixture
def pg_url():
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    require(pg_available(), f"PostgreSQL at {PG_ADMIN_URL}")
    import psycopg
    name = f"pilotfish_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    yield f"{base}/{name}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def home(tmp_path) -> Path:
    h = tmp_path / "home"
    h.mkdir()
    return h


@pytest.fixture(params=["sqlite"])
def db_url(request, home):
    return f"sqlite:///{home / 'pilotfish.db'}"


@pytest.fixture
def server(home, db_url):
    """A real job server process (SQLite in a temporary home, 1 s heartbeats)."""
    s = ServerHandle(home, db_url).start()
    yield s
    s.stop_agents()
    s.stop()


def wait_for(pred, timeout: float = 30, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


# -- Slurm (started by scripts/slurm_up: 4 fake nodes node[1-4] on this machine) ----------------
@pytest.fixture(scope="session")
def slurm() -> list[str]:
    """A real Slurm with at least 4 nodes up (scripts/slurm_up starts one)."""
    nodes = slurm_nodes()
    require(len(nodes) >= 4, "Slurm with 4 nodes up (run scripts/slurm_up as root)")
    return nodes


def sbatch(script: str, *args: str) -> str:
    """Submit a batch script; its Slurm job id."""
    r = subprocess.run(["sbatch", "--parsable", *args], input=script, capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().split(";")[0]


def slurm_job_state(job_id: str) -> str | None:
    """The job's state from squeue, or None once it has left the queue."""
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True,
                         text=True, timeout=20).stdout.strip()
    return out or None


def scancel(job_id: str) -> None:
    subprocess.run(["scancel", job_id], capture_output=True, timeout=20)


#: Test files that submit to the one local Slurm (4 fake nodes). With two test processes
#: (scripts/test: --dist loadfile, each file's tests in one process), their tests take turns:
#: a lock file held for each such test (jobs of the other process would take the nodes).
SLURM_FILES = {"test_slurm.py", "test_relay.py", "test_site_agent.py", "test_batch.py",
               "test_container_jobs.py"}
SLURM_LOCK = Path(tempfile.gettempdir()) / "pilotfish-tests-slurm.lock"


@pytest.fixture(autouse=True)
def _one_slurm_user_at_a_time(request):
    if request.node.path.name not in SLURM_FILES and "slurm" not in request.fixturenames:
        yield
        return
    import fcntl
    with open(SLURM_LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
        yield
