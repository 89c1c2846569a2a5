"""Shared helpers for the pilotfish benchmarks: servers, agents, databases, timing, output.

Every benchmark builds its world from scratch in a temporary home (a fresh server, a fresh
SQLite file or PostgreSQL database, fresh agents) and tears it all down afterwards, also on
Ctrl-C or SIGTERM. Results go to standard output as one JSON object per line; progress and
diagnostics go to standard error.

Clocks: intervals are measured with ``time.perf_counter()`` in the benchmark process. Task
start/end times reported by agents (``Client.summary()``) are ``time.time()`` on the agents;
all processes run on this one machine, so they share the clock.
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run from a checkout without the package installed
    sys.path.insert(0, str(REPO))

from pilotfish.server import daemon  # noqa: E402
from pilotfish.client import FINAL_STATES, Client  # noqa: E402

#: Where scratch PostgreSQL databases are created (trust auth, a database we may connect to).
PG_ADMIN_URL = os.environ.get("PILOTFISH_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test")

_BENCH = "bench"
#: Temporary homes to remove when the benchmark ends (see ``Env.close``).
_DEFERRED_RM: list[Path] = []


#: Seconds after a benchmark removed its temporary homes during which the next one waits
#: before it measures (see :func:`wait_for_removals`) at least; then it waits on until the
#: create probe reads at most REMOVAL_QUIET_US, or REMOVAL_MOST seconds have passed.
REMOVAL_SETTLE = 310.0
REMOVAL_QUIET_US = 150.0
REMOVAL_MOST = 420.0
REMOVAL_POLL = 10.0
#: Its stamp file, in the directory of the homes: modified when they were removed.
_REMOVED_STAMP = "pilotfish-bench-removed"
#: How :func:`create_probe`'s directories are named (their 300 inodes mark nothing).
PROBE_PREFIX = "pilotfish-bench-probe-"


def _remove_deferred() -> None:
    # the create probe's 300 inodes slow nothing: only homes with workdirs mark the directory
    parents = {str(p.parent) for p in _DEFERRED_RM if not p.name.startswith(PROBE_PREFIX)}
    while _DEFERRED_RM:
        shutil.rmtree(_DEFERRED_RM.pop(), ignore_errors=True)
    for parent in parents:  # the next benchmark on this disk waits (wait_for_removals)
        try:
            Path(parent, _REMOVED_STAMP).touch()
        except OSError:
            pass


def wait_for_removals(tmp: str) -> float:
    """Wait until an earlier benchmark's removal of its homes under ``tmp`` no longer slows
    inode creation there; the seconds waited.

    On an ext4 file system without a journal (this machine's disk), the inode allocator skips
    inodes freed in the last 60 s -- 360 s while their inode-table block is dirty, and creating
    new inodes next to them keeps it dirty -- testing each one in turn. After a W2 run removed
    its 30,000 workdir inodes, a workdir and its two files cost 0.7-2 ms instead of 0.1 ms for
    about two minutes, and the next run measured the disk, not pilotfish (W2 swung 2x between
    back-to-back runs). How long that lasts depends on how many were removed: after 50,000-80,000
    the probe still read 445-558 us at 90 s and 79 us later, and two W2 runs that started at
    150 s measured 0.6 x xargs where others measured 0.86; on 2026-12-07 one run started at
    150 s with a quiet probe and still ran at 0.60 (the agent a whole core busy in the kernel's
    inode allocation) where the runs before and after gave 0.97 and 0.91. The kernel's rule
    (fs/ext4/ialloc.c ``recently_deleted``, no-journal mode): an inode deleted in the last
    RECENTCY_MIN = 60 s is skipped, or in the last RECENTCY_DIRTY = 300 s while its
    inode-table block is dirty -- and a run creating inodes in that block keeps it dirty, so a
    probe on a freshly synced disk can read quiet while the run itself will not be. So: at
    least REMOVAL_SETTLE seconds (300 and a margin),
    then until :func:`create_probe` reads at most REMOVAL_QUIET_US (every REMOVAL_POLL s), at most
    REMOVAL_MOST seconds after the removal. Within one benchmark process, homes are removed
    only at its end. ``PILOTFISH_BENCH_REMOVAL_WAIT=0`` skips the wait (``before_after.py``
    sets it: its runs alternate, so what one run's removal costs the next falls on both
    sides)."""
    if fs_type(tmp) in ("tmpfs", "ramfs") or os.environ.get("PILOTFISH_BENCH_REMOVAL_WAIT") == "0":
        return 0.0
    try:
        removed = Path(tmp, _REMOVED_STAMP).stat().st_mtime
    except OSError:
        return 0.0
    now = time.time()
    if now - removed >= REMOVAL_MOST:
        return 0.0
    waited = 0.0
    wait = REMOVAL_SETTLE - (now - removed)
    if wait > 0:
        log(f"waiting {wait:.0f} s at least: an earlier benchmark removed its homes under "
            f"{tmp} {now - removed:.0f} s ago, and inode creation there is slow for minutes "
            "after that (ext4 without a journal; see bench/common.py wait_for_removals)")
        time.sleep(wait)
        waited += wait
    while True:
        us = create_probe(tmp)
        since = time.time() - removed
        if us is None or us <= REMOVAL_QUIET_US or since >= REMOVAL_MOST:
            return round(waited, 1)
        log(f"creating a workdir there still costs {us:.0f} us ({since:.0f} s after the "
            f"removal); waiting for <= {REMOVAL_QUIET_US:.0f} us, at most "
            f"{REMOVAL_MOST - since:.0f} s more")
        time.sleep(REMOVAL_POLL)
        waited += REMOVAL_POLL


atexit.register(_remove_deferred)


# -- output ----------------------------------------------------------------------------------
def set_bench(name: str) -> None:
    global _BENCH
    _BENCH = name


def log(msg: str) -> None:
    """Progress for people, on standard error (standard output is for JSON lines only)."""
    print(f"[{_BENCH} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def emit(figure: str, value: Any, **fields: Any) -> dict:
    """Print one result line: ``{"bench": ..., "figure": ..., "value": ..., ...}``."""
    d = {"bench": _BENCH, "figure": figure, "value": _round(value)}
    d.update({k: _round(v) for k, v in fields.items()})
    print(json.dumps(d), flush=True)
    return d


def _round(v: Any) -> Any:
    if isinstance(v, float):
        return float(f"{v:.5g}") if abs(v) < 1000 else round(v, 1)
    if isinstance(v, list):
        return [_round(x) for x in v]
    if isinstance(v, dict):
        return {k: _round(x) for k, x in v.items()}
    return v


def median(xs: Sequence[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


#: Per-run measurements that every throughput benchmark reports as medians.
RUN_MEDIANS = ("server_busy", "server_loop_busy", "server_zmq_io_busy", "agents_busy",
               "postgres_busy", "machine_idle_cores", "machine_iowait_cores",
               "machine_steal_cores")


def run_fields(runs: Sequence[dict]) -> dict:
    """The fields shared by throughput figures: per-run seconds, submit figures, CPU medians."""
    out = {"seconds": [x["seconds"] for x in runs],
           "incl_submit_tasks_per_second": median([x["tps_incl_submit"] for x in runs]),
           "submit_seconds": [x["submit_seconds"] for x in runs],
           "finished": [x["finished"] for x in runs]}
    out.update({k: median([x.get(k) for x in runs]) for k in RUN_MEDIANS})
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


# -- command line ----------------------------------------------------------------------------
def parser(description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=3,
                   help="Runs per configuration; the median is reported with every value "
                        "(default: %(default)s).")
    p.add_argument("--tmp", help="Directory for the temporary homes, which hold the SQLite "
                                 "file and the task workdirs (default: the system's temporary "
                                 "directory; /dev/shm takes the disk out of the picture).")
    p.add_argument("--keep", action="store_true",
                   help="Keep the temporary homes (logs, databases) for inspection.")
    p.add_argument("--py-spy", dest="py_spy", metavar="DIR",
                   help="Record py-spy flame graphs of the server and agents during the timed "
                        "phase into DIR (changes the timings a little).")
    p.add_argument("--py-spy-format", dest="py_spy_format", default="flamegraph",
                   choices=("flamegraph", "raw", "speedscope"),
                   help="py-spy output format (raw: collapsed stacks, for scripts).")
    p.add_argument("--heartbeat", type=float, default=2.0,
                   help="Server heartbeat in seconds (default: %(default)s).")
    return p


def add_sweep_args(p: argparse.ArgumentParser) -> None:
    """The options of the benchmarks that sweep agent layouts and prefetch settings."""
    p.add_argument("--cores", help="Cores to use: a count or a list like 0,1 (default: all in "
                                   "our affinity mask). xargs gets -P <that many>.")
    p.add_argument("--agents", default="1",
                   help="Comma list of agent layouts to try: 1 (one agent with all cores), "
                        "per-core (one agent per core), or K agents (default: %(default)s).")
    p.add_argument("--prefetch", default="default",
                   help="Comma list of agent --prefetch values to try; 'default' = no "
                        "--prefetch flag, the agent's own choice (default: %(default)s).")


def sweep(a: argparse.Namespace) -> tuple[list[int], list[tuple[str, list[list[int]], Any]]]:
    """The cores and the (layout name, agent core sets, prefetch) configurations to run."""
    cores = cores_arg(a.cores)
    return cores, [(mode, agent_layout(mode, cores), pf)
                   for mode in str_list(a.agents) for pf in prefetch_list(a.prefetch)]


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def str_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def prefetch_list(text: str) -> list[int | None]:
    """``default,8,256`` -> [None, 8, 256] (None: no --prefetch flag, the agent chooses)."""
    out: list[int | None] = []
    for x in str_list(text):
        out.append(None if x in ("default", "none", "-") else int(x))
    return out


def cores_arg(text: str | None) -> list[int]:
    """``--cores``: a count (``2``) or a list of ids (``0,1``, ``0-3``); default: our affinity
    mask (all the cores we may use)."""
    mine = sorted(os.sched_getaffinity(0))
    if not text:
        return mine
    if text.isdigit():  # a count; a single core id is written "3-3" or "3,"
        if not 1 <= int(text) <= len(mine):
            raise ValueError(f"--cores {text}: we may use {len(mine)} cores")
        return mine[:int(text)]
    out: list[int] = []
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def install_signal_handlers() -> None:
    """SIGTERM, SIGHUP and Ctrl-C end the benchmark through its ``finally`` clauses; further
    signals are ignored while it cleans up (stops agents and server, drops databases), so an
    impatient second Ctrl-C cannot leave processes or databases behind."""
    def _exit(signum, _frame):
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        log(f"signal {signum}: cleaning up (further signals are ignored)")
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, _exit)


def run(main: Callable[[], int]) -> None:
    """``sys.exit(main())`` with a one-line message instead of a traceback on Ctrl-C."""
    try:
        code = main()
    except KeyboardInterrupt:
        log("interrupted")
        code = 130
    sys.exit(code)


def pilotfish_cmd() -> list[str]:
    """The installed ``pilotfish`` console script (what users run), else ``python -m``."""
    exe = Path(sys.executable).parent / "pilotfish"
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-m", "pilotfish"]


# -- databases -------------------------------------------------------------------------------
class ScratchDB:
    """A database for one server: an SQLite file in the home or a fresh PostgreSQL database."""

    def __init__(self, kind: str, home: Path) -> None:
        if kind not in ("sqlite", "postgres"):
            raise ValueError(f"unknown database kind {kind!r}")
        self.kind = kind
        self.name: str | None = None
        if kind == "sqlite":
            self.url = f"sqlite:///{home / 'pilotfish.db'}"
            return
        import psycopg
        self.name = f"pilotfish_bench_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{self.name}"')
        base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
        self.url = f"{base}/{self.name}"

    def drop(self) -> None:
        if self.name is None:
            return
        import psycopg
        try:
            with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        except Exception as exc:  # report, never hide a leftover
            log(f"WARNING: could not drop PostgreSQL database {self.name}: {exc}")
        self.name = None


# -- a server with its agents ----------------------------------------------------------------
class Env:
    """One server in a temporary home with its database and agents; a context manager.

    ``with Env("sqlite") as env: env.client.add_app(...); env.start_agents(...)`` -- on exit
    the agents get SIGTERM (then SIGKILL), the server is stopped, a PostgreSQL database is
    dropped and the home is removed (unless ``keep``).
    """

    def __init__(self, db: str = "sqlite", heartbeat: float = 2.0, tmp: str | None = None,
                 keep: bool = False, label: str = "run") -> None:
        self.db_kind = db
        self.heartbeat = heartbeat
        self.tmp = tmp
        self.keep = keep
        self.label = label
        self.home: Path | None = None
        self.db: ScratchDB | None = None
        self.info: dict = {}
        self.client: Client | None = None
        self.agents: list[subprocess.Popen] = []
        self._agent_logs: list[Path] = []

    def __enter__(self) -> "Env":
        try:
            self.home = Path(tempfile.mkdtemp(prefix=f"pilotfish-bench-{self.label}-",
                                              dir=self.tmp)).resolve()
            self.db = ScratchDB(self.db_kind, self.home)
            self.info = daemon.start_background(self.home, self.db.url, "tcp://127.0.0.1:*",
                                                self.heartbeat)
            self.client = Client(self.info["address"], self.home, timeout=600)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def address(self) -> str:
        return self.info["address"]

    @property
    def server_pid(self) -> int:
        return self.info["pid"]

    # -- agents -------------------------------------------------------------------------
    def start_agent(self, cores: Iterable[int] | None = None, prefetch: int | None = None,
                    fake: bool = False, extra: Sequence[str] = ()) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "pilotfish", "--home", str(self.home), "pilot", "agent",
               "--server", self.address, "--idle-timeout", "0"]
        if cores is not None:
            cmd += ["--cores", ",".join(map(str, cores))]
        if prefetch is not None:
            cmd += ["--prefetch", str(prefetch)]
        if fake:
            cmd.append("--fake-exec")
        cmd += list(extra)
        path = self.home / f"agent-{len(self.agents)}.log"
        with open(path, "ab") as out:
            p = subprocess.Popen(cmd, stdout=out, stderr=out, stdin=subprocess.DEVNULL,
                                 cwd=self.home)
        self.agents.append(p)
        self._agent_logs.append(path)
        return p

    def start_agents(self, layout: list[list[int]], prefetch: int | None = None,
                     fake: bool = False) -> list[subprocess.Popen]:
        """One agent per core list in ``layout``."""
        return [self.start_agent(cores, prefetch, fake) for cores in layout]

    def wait_agents(self, n: int, timeout: float = 60.0) -> None:
        """Until ``n`` agents are connected and have told the server their demand."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for p, path in zip(self.agents, self._agent_logs):
                if p.poll() is not None:
                    raise RuntimeError(f"agent exited with code {p.returncode}:\n"
                                       f"{_tail(path)}")
            alive = [a for a in self.client.agents() if a["state"] == "ALIVE"]
            if len(alive) >= n:
                # the hello is answered by a welcome, and the agent then sends its demand;
                # give that one round trip
                time.sleep(0.05)
                return
            time.sleep(0.02)
        raise RuntimeError(f"only {len(self.client.agents())} of {n} agents connected within "
                           f"{timeout:.0f} s")

    def check_agents(self) -> None:
        """Raise if an agent process has exited (it would never finish its work)."""
        for p, path in zip(self.agents, self._agent_logs):
            if p.poll() is not None:
                raise RuntimeError(f"agent {p.pid} exited with code {p.returncode}:\n"
                                   f"{_tail(path)}")

    def stop_agents(self, wait: float = 20.0) -> None:
        for p in self.agents:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + wait
        for p in self.agents:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log(f"agent {p.pid} did not stop on SIGTERM: killing it")
                p.kill()
                p.wait()
        self.agents = []

    def agent_logs(self) -> str:
        return "\n".join(f"--- {p}\n{_tail(p)}" for p in self._agent_logs)

    def server_log(self) -> str:
        return _tail(self.home / "server.log") if self.home else ""

    # -- teardown ----------------------------------------------------------------------
    def close(self) -> None:
        try:
            self.stop_agents()
        finally:
            if self.client is not None:
                self.client.close()
                self.client = None
            if self.home is not None:
                try:
                    daemon.stop(self.home, wait=30)
                except Exception as exc:
                    log(f"WARNING: stopping the server failed: {exc}")
                    pid = self.info.get("pid")
                    if pid and daemon.alive(pid):
                        os.kill(pid, signal.SIGKILL)
            if self.db is not None:
                self.db.drop()
            if self.home is not None and not self.keep:
                # Removed when the benchmark ends, not now: on ext4, creating files and
                # directories right after tens of thousands were deleted is several times
                # slower (inode allocation skips recently deleted inodes; kernel
                # ``recently_deleted``), which would tax the next run of a W2 sweep.
                _DEFERRED_RM.append(self.home)
            elif self.home is not None:
                log(f"kept {self.home}")


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def agent_layout(mode: str, cores: list[int]) -> list[list[int]]:
    """Cores per agent: ``1`` (one agent, all cores), ``per-core``, or ``K`` agents."""
    if mode in ("per-core", "percore"):
        return [[c] for c in cores]
    k = int(mode)
    if k < 1 or k > len(cores):
        raise ValueError(f"--agents {mode}: need 1..{len(cores)} agents for {len(cores)} cores")
    return [cores[i::k] for i in range(k)]


# -- waiting ---------------------------------------------------------------------------------
def wait_final(client: Client, n: int, timeout: float = 3600.0, min_poll: float = 0.01,
               max_poll: float = 0.25, filter: dict | None = None,
               on_progress: Callable[[int], None] | None = None,
               check: Callable[[], None] | None = None) -> tuple[float, dict]:
    """Poll ``Client.counts`` until ``n`` jobs are final; return (perf_counter time, counts).

    The poll interval adapts to the observed rate so that most polls come near the end: a
    count is a request the single-threaded server answers between turns, so polling too often
    would slow what we measure, and too rarely would blur the end time. The returned time is
    when the poll that saw all jobs final was *sent*... answered, so the error is at most one
    poll interval (<= ``min_poll`` near the end when the rate estimate is good).
    """
    t0 = time.perf_counter()
    deadline = t0 + timeout
    last_report = t0
    while True:
        counts = client.counts(filter)
        now = time.perf_counter()
        done = sum(v for k, v in counts.items() if k in FINAL_STATES)
        if done >= n:
            return now, counts
        if now > deadline:
            raise TimeoutError(f"only {done} of {n} jobs final after {timeout:.0f} s: {counts}")
        if check is not None:
            check()
        if on_progress and now - last_report > 5:
            last_report = now
            on_progress(done)
        elapsed = now - t0
        if done > 0 and elapsed > 0:
            eta = (n - done) * elapsed / done
            pause = min(max_poll, max(min_poll, eta / 3))
        else:
            pause = min_poll * 5
        time.sleep(pause)


def counts_line(counts: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))


# -- baselines -------------------------------------------------------------------------------
def run_xargs(argv: Sequence[str], items: Sequence[str], procs: int,
              cwd: str | None = None) -> float:
    """Seconds for ``xargs -P procs -n 1 argv...`` over ``items`` (one process per item)."""
    data = ("\n".join(items) + "\n").encode()
    t0 = time.perf_counter()
    r = subprocess.run(["xargs", "-P", str(procs), "-n", "1", *argv], input=data,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=cwd)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"xargs failed ({r.returncode}): {r.stderr.decode()[-500:]}")
    return dt


def timed_cli(args: Sequence[str], env: dict | None = None) -> tuple[float, str]:
    """Run a command to completion; return (wall seconds, stdout). Raises on failure."""
    t0 = time.perf_counter()
    r = subprocess.run(list(args), capture_output=True, text=True, env=env,
                       stdin=subprocess.DEVNULL)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({r.returncode}):\n{r.stdout[-2000:]}\n"
                           f"{r.stderr[-2000:]}")
    return dt, r.stdout


# -- profiling -------------------------------------------------------------------------------
class PySpy:
    """``py-spy record`` of some processes for the duration of a ``with`` block (or nothing)."""

    def __init__(self, outdir: str | None, label: str, pids: dict[str, int],
                 rate: int | None = None, fmt: str | None = None) -> None:
        self.procs: list[subprocess.Popen] = []
        if not outdir:
            return
        exe = Path(sys.executable).parent / "py-spy"
        exe = str(exe) if exe.exists() else shutil.which("py-spy")
        if not exe:
            log("WARNING: py-spy not found (pip install py-spy); not profiling")
            return
        fmt = fmt or os.environ.get("PILOTFISH_BENCH_PYSPY_FORMAT", "flamegraph")
        # samples per second: 100 by default; 1000 to compare two versions function by function
        rate = rate or int(os.environ.get("PILOTFISH_BENCH_PYSPY_RATE", "100"))
        ext = {"flamegraph": "svg", "raw": "txt", "speedscope": "json"}[fmt]
        Path(outdir).mkdir(parents=True, exist_ok=True)
        for role, pid in pids.items():
            out = Path(outdir) / f"{label}-{role}.{ext}"
            self.procs.append(subprocess.Popen(
                [exe, "record", "-o", str(out), "-f", fmt, "--pid", str(pid), "-r", str(rate),
                 "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(0.5)  # attaching takes a moment

    def __enter__(self) -> "PySpy":
        return self

    def __exit__(self, *exc) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def profile(a, label: str, pids: dict[str, int]) -> PySpy:
    """The ``--py-spy`` recorder for parsed benchmark arguments ``a`` (a no-op without it)."""
    return PySpy(a.py_spy, label, pids, fmt=a.py_spy_format)


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of a process's threads by kind: ``loop`` (the main
    thread: the server's turns), ``zmq_io`` (libzmq's I/O threads, ``ZMQbg/IO/*``: sockets,
    CurveZMQ) and ``other`` (the ZAP handler and any other thread). Threads that ended
    before the call are not counted; {} when the process is gone."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {"loop": 0.0, "zmq_io": 0.0, "other": 0.0}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return {}
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # "tid (comm) state ..." -- comm may hold spaces and parentheses: split at the last ")"
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        cpu = (int(fields[11]) + int(fields[12])) / tick  # utime, stime (fields 14, 15)
        kind = ("loop" if int(tid) == pid else
                "zmq_io" if comm.startswith("ZMQbg/IO") else "other")
        out[kind] += cpu
    return out


class CpuMeter:
    """CPU seconds (user + system) that the server and the agents use during a ``with`` block:
    tells which process is the bottleneck (a single-threaded server near 1.0 s per second of
    wall time is saturated). The server's is also split by thread (:func:`thread_cpu`): its
    loop can be saturated while the process as a whole shows more than one core. ``others``:
    more processes by role; those whose role starts with ``harness`` are summed as
    ``harness_busy`` (a bench's simulated agents and drivers, on the same cores)."""

    def __init__(self, env: Env, others: dict[str, int] | None = None) -> None:
        import psutil
        self.procs = {}
        self.server_pid = env.server_pid
        self.threads_start: dict[str, float] = {}
        self.threads_used: dict[str, float] = {}
        for role, pid in {**env_pids(env), **(others or {})}.items():
            try:
                self.procs[role] = psutil.Process(pid)
            except psutil.Error:
                pass
        #: with PostgreSQL, also every ``postgres`` process on this machine (the server's
        #: backend does part of the work; other users' backends are counted too)
        self.pg = env.db_kind == "postgres"
        self.pg_start: dict[int, float] = {}
        self.pg_used: float | None = None
        self.start: dict[str, float] = {}
        self.used: dict[str, float] = {}
        self.wall = 0.0
        self.sys_start = None
        self.sys_idle: float | None = None
        self.sys_iowait: float | None = None
        self.sys_steal: float | None = None

    def _postgres(self) -> dict[int, float]:
        import psutil
        out = {}
        for p in psutil.process_iter(["name"]):
            if (p.info.get("name") or "").startswith("postgres"):
                cpu = self._cpu(p)
                if cpu is not None:
                    out[p.pid] = cpu
        return out

    def _cpu(self, p) -> float | None:
        try:
            t = p.cpu_times()
            return t.user + t.system
        except Exception:
            return None

    def __enter__(self) -> "CpuMeter":
        import psutil
        self.start = {r: self._cpu(p) for r, p in self.procs.items()}
        self.threads_start = thread_cpu(self.server_pid)
        self.writer_start = {w.pid: self._cpu(w) or 0.0 for w in server_writers(self.server_pid)}
        if self.pg:
            self.pg_start = self._postgres()
        self.sys_start = psutil.cpu_times()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        import psutil
        self.wall = time.perf_counter() - self.t0
        a, b = self.sys_start, psutil.cpu_times()
        self.sys_idle = (b.idle - a.idle) / self.wall if self.wall else None
        self.sys_iowait = (getattr(b, "iowait", 0) - getattr(a, "iowait", 0)) / self.wall \
            if self.wall else None
        self.sys_steal = (getattr(b, "steal", 0) - getattr(a, "steal", 0)) / self.wall \
            if self.wall else None
        end_threads = thread_cpu(self.server_pid)
        # the SQLite writer process (server/sqlite_remote.py): one, or a new one per reload
        self.writer_used = sum((self._cpu(w) or 0.0) - self.writer_start.get(w.pid, 0.0)
                               for w in server_writers(self.server_pid)) \
            if self.writer_start or server_writers(self.server_pid) else None
        if self.threads_start and end_threads:
            self.threads_used = {k: end_threads[k] - self.threads_start[k] for k in end_threads}
        for r, p in self.procs.items():
            end = self._cpu(p)
            if end is not None and self.start.get(r) is not None:
                self.used[r] = end - self.start[r]
        if self.pg:
            self.pg_used = sum(v - self.pg_start.get(pid, 0.0)
                               for pid, v in self._postgres().items())

    def summary(self) -> dict:
        """CPU seconds and busy fractions (CPU seconds per wall second) of the server (and of
        its loop, libzmq I/O and other threads: ``server_loop_busy`` ...), of all agents, of
        the ``harness`` processes and, with PostgreSQL, of all postgres processes
        (``postgres_busy``); and the machine's idle and I/O-wait time in cores
        (``machine_idle_cores``: 0 = saturated)."""
        mine = [v for k, v in self.used.items() if k.startswith("agent")]
        agents = sum(mine) if mine else None  # None: no agent was running at the start
        server = self.used.get("server")
        out = {"server_cpu_s": server, "agents_cpu_s": agents,
               "server_busy": server / self.wall if server is not None and self.wall else None,
               "agents_busy": agents / self.wall if agents is not None and self.wall else None}
        if self.threads_used and self.wall:
            for kind, used in self.threads_used.items():
                out[f"server_{kind}_busy"] = used / self.wall
        if getattr(self, "writer_used", None) is not None and self.wall:
            # the server's SQLite writer process, beside server_busy (the server's own)
            out["server_writer_busy"] = self.writer_used / self.wall
        harness = [v for k, v in self.used.items() if k.startswith("harness")]
        if harness and self.wall:
            out["harness_busy"] = sum(harness) / self.wall
        if self.pg_used is not None and self.wall:
            out["postgres_busy"] = self.pg_used / self.wall
        # the whole machine: cores' worth of idle and of I/O wait during the interval
        out["machine_idle_cores"] = self.sys_idle
        out["machine_iowait_cores"] = self.sys_iowait
        out["machine_steal_cores"] = self.sys_steal  # taken by the hypervisor (noisy VM)
        return out


def server_writers(pid: int | None) -> list:
    """The server's SQLite writer processes (server/sqlite_remote.py): part of the server as a
    user runs it, so its CPU and memory are reported with the server's."""
    import psutil
    if not pid:
        return []
    try:
        kids = psutil.Process(pid).children()
    except psutil.Error:
        return []
    out = []
    for k in kids:
        try:
            if any("sqlite_writer_main" in a for a in k.cmdline()):
                out.append(k)
        except psutil.Error:
            pass
    return out


def server_rss(proc) -> tuple[int, int]:
    """(RSS of the server process plus its SQLite writer's, the writer's), in bytes."""
    import psutil
    total = proc.memory_info().rss
    writer = 0
    for w in server_writers(proc.pid):
        try:
            writer += w.memory_info().rss
        except psutil.Error:
            pass
    return total + writer, writer


def env_pids(env: Env) -> dict[str, int]:
    pids = {"server": env.server_pid}
    for i, p in enumerate(env.agents):
        pids[f"agent{i}"] = p.pid
    return pids


def settle_disk(timeout: float = 20.0) -> None:
    """Write back what earlier runs left dirty before a timed run starts: the kernel flushing
    a previous run's tens of thousands of workdir inodes during the next one made W2 swing
    2-3x between repeats. (``sync`` and wait for Dirty + Writeback in /proc/meminfo to fall.)"""
    t0 = time.monotonic()
    os.sync()
    while time.monotonic() - t0 < timeout:
        kb = 0
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith(("Dirty:", "Writeback:")):
                        kb += int(line.split()[1])
        except OSError:
            return
        if kb < 4096:
            return
        time.sleep(0.1)


def machine(tmp: str | None = None, workdirs: bool = False) -> dict:
    """Context for the result lines: the code measured, the cores we may use, the load, and the
    file system of the temporary homes (which hold the SQLite file and the task workdirs).
    ``workdirs``: the benchmark times thousands of tasks' workdirs on that disk; wait out an
    earlier benchmark's removals first (:func:`wait_for_removals`)."""
    tmp = tmp or tempfile.gettempdir()
    waited = wait_for_removals(tmp) if workdirs else 0.0
    return {"git": git_version(), "cores_available": len(os.sched_getaffinity(0)),
            "loadavg_1m": round(os.getloadavg()[0], 2), "tmp_fs": fs_type(tmp),
            "tmp_create_us": create_probe(tmp), "waited_for_removals_s": waited}


def create_probe(tmp: str, n: int = 300) -> float | None:
    """Microseconds to create one directory with one file in it under ``tmp`` -- what every
    task's workdir costs the agent. Tens of microseconds is normal; hundreds mean a file system
    slowed by many recent deletions (ext4 inode allocation), which shows in W2."""
    try:
        base = tempfile.mkdtemp(prefix=PROBE_PREFIX, dir=tmp)
    except OSError:
        return None
    try:
        t0 = time.perf_counter()
        for i in range(n):
            os.mkdir(f"{base}/{i}")
            os.close(os.open(f"{base}/{i}/job.out", os.O_CREAT | os.O_WRONLY, 0o644))
        return round((time.perf_counter() - t0) / n * 1e6, 1)
    finally:
        _DEFERRED_RM.append(Path(base))


def fs_type(path: str) -> str | None:
    try:
        return subprocess.run(["stat", "-f", "-c", "%T", path], capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def git_version() -> str | None:
    """``<short commit>`` of the checkout, with ``+dirty`` when the code has local changes
    (benchmarks measure the working tree, which may be ahead of the commit)."""
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--",
                                "pilotfish", "server", "pilot", "launcher", "container"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+dirty" if dirty else "")) or None


# -- Slurm (pilot_rampup, launch_overhead, allocation) ---------------------------------------
#: Lines ``PFBENCH <name> <epoch seconds> [...]`` that our batch scripts print (``date +%s.%N``).
MARK = "PFBENCH"


def slurm_nodes() -> list[str]:
    """Names of the Slurm nodes that are up (idle/mix/alloc), or [] without a Slurm."""
    if not shutil.which("sinfo") or not shutil.which("sbatch"):
        return []
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True,
                             text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return sorted({n for n, t in (line.split() for line in out.splitlines() if line.strip())
                   if t.rstrip("*") in ("idle", "mix", "alloc", "comp")})


def start_slurm_bench(name: str, a, n_nodes: int) -> tuple[list[str], dict]:
    """What every Slurm benchmark does first: name itself, take ``n_nodes`` nodes (exit 2
    when Slurm has fewer), install the cleanup signal handlers; the nodes and the machine
    context."""
    set_bench(name)
    nodes = require_slurm(n_nodes)[:n_nodes]
    install_signal_handlers()
    if a.py_spy:
        log("note: --py-spy is not supported by the Slurm benchmarks (the agents run under "
            "srun); ignored")
    return nodes, machine(a.tmp)


def require_slurm(nodes: int) -> list[str]:
    """The Slurm nodes that are up, or exit 2 with a one-line message (a skip, not a failure)."""
    up = slurm_nodes()
    if len(up) < nodes:
        why = ("no Slurm here (sbatch/sinfo not found)" if not shutil.which("sbatch")
               else f"{len(up)} Slurm nodes up, {nodes} needed")
        print(f"[{_BENCH}] skipped: {why}; scripts/slurm_up starts one with 4 fake nodes",
              file=sys.stderr, flush=True)
        sys.exit(2)
    return up


def wait_nodes_idle(nodes: Sequence[str], timeout: float = 60.0) -> None:
    """Until every node is idle again (a finished job's nodes stay 'completing' briefly), so
    the next job's submit -> start does not include the last one's clean-up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(["sinfo", "-h", "-N", "-n", ",".join(nodes), "-o", "%N %t"],
                             capture_output=True, text=True, timeout=20).stdout.split()
        if out and all(s.rstrip("*") == "idle" for s in out[1::2]):
            return
        time.sleep(0.05)
    log(f"WARNING: nodes not idle after {timeout:.0f} s")


def batch_script(body: str, *, nodes: int, out: Path, name: str = "pilotfish-bench",
                 minutes: int = 10) -> str:
    """A batch script on ``nodes`` whole nodes whose first line marks its start (``PFBENCH
    start <epoch>``); ``body`` follows, and its last line marks its end with body's status."""
    return f"""#!/bin/bash
#SBATCH -N {nodes}
#SBATCH --exclusive
#SBATCH -t {minutes}
#SBATCH -J {name}
#SBATCH -o {out}
echo "{MARK} start $(date +%s.%N)"
{body}
rc=$?
echo "{MARK} end $(date +%s.%N) $rc"
exit $rc
"""


def pilot_body(home: Path, address: str, agent_args: str, head_args: str = "") -> str:
    """The pilot head as a batch script runs it (not exec'd, so the script can mark its end)."""
    return (f"{sys.executable} -m pilotfish --home {home} pilot run --server {address} "
            f"--mpi pmi2 {head_args} -- {agent_args}")


def read_marks(path: Path) -> dict[str, list[float]]:
    """``PFBENCH name t [x ...]`` lines of a batch job's output: name -> [t, x, ...] (the
    first line of each name)."""
    out: dict[str, list[float]] = {}
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return out
    for line in text.splitlines():
        f = line.split()
        if len(f) >= 3 and f[0] == MARK and f[1] not in out:
            out[f[1]] = [float(x) for x in f[2:]]
    return out


class SlurmJobs:
    """Batch jobs submitted by a benchmark; a context manager: the ones still queued or running
    when the block ends are cancelled and waited for, also on Ctrl-C."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        #: job id -> other users' jobs in squeue when it was submitted (they may delay it)
        self.others: dict[str, int] = {}

    def __enter__(self) -> "SlurmJobs":
        return self

    def __exit__(self, *exc) -> None:
        for jid in self.ids:
            if self.state(jid) is not None:
                log(f"cancelling Slurm job {jid}")
                subprocess.run(["scancel", jid], capture_output=True, timeout=20)
        for jid in self.ids:
            try:
                self.wait_gone(jid, timeout=60)
            except TimeoutError as e:
                log(f"WARNING: {e}")

    def submit(self, script: str) -> tuple[str, float, float]:
        """sbatch the script; (job id, time.time() just before sbatch, seconds sbatch took)."""
        queued = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True,
                                timeout=20).stdout.split()
        others = len([j for j in queued if j not in self.ids])
        t0 = time.time()
        r = subprocess.run(["sbatch", "--parsable"], input=script, capture_output=True,
                           text=True, timeout=60)
        dt = time.time() - t0
        if r.returncode != 0:
            raise RuntimeError(f"sbatch failed ({r.returncode}): {r.stderr.strip()}")
        jid = r.stdout.strip().split(";")[0]
        self.ids.append(jid)
        self.others[jid] = others
        if others:
            log(f"note: {others} other Slurm job(s) queued or running when job {jid} was "
                "submitted")
        return jid, t0, dt

    @staticmethod
    def state(jid: str) -> str | None:
        """The job's state from squeue, or None once it has left the queue."""
        out = subprocess.run(["squeue", "-h", "-j", jid, "-o", "%T"], capture_output=True,
                             text=True, timeout=20).stdout.strip()
        return out or None

    def wait_gone(self, jid: str, timeout: float = 120.0, poll: float = 0.05) -> float:
        """Until the job has left squeue; the time.time() of the first poll that saw it gone."""
        deadline = time.monotonic() + timeout
        while True:
            if self.state(jid) is None:
                return time.time()
            if time.monotonic() > deadline:
                raise TimeoutError(f"Slurm job {jid} still {self.state(jid)} after "
                                   f"{timeout:.0f} s")
            time.sleep(poll)
