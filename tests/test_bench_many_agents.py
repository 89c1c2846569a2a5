"""bench/many_agents.py at a tiny scale, so the thousand-node harness does not rot: twenty
simulated agents in two processes against a real server (CurveZMQ), every figure printed, every
task received and finished, no agent lost.

Once per database (SQLite, PostgreSQL). Takes ~5 s each, over the 3 s budget: it is a whole
benchmark run (a server start, two worker processes that import the agent, half a second of
steady window, the idle heartbeats, the teardown); each of those is what the test is for."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import pg_available, require

BENCH = Path(__file__).resolve().parent.parent / "bench" / "many_agents.py"


@pytest.mark.parametrize("db", ["sqlite", "postgres"])
def test_many_agents_tiny(tmp_path, db):
    if db == "postgres":
        require(pg_available(), "PostgreSQL on localhost:5432")
    r = subprocess.run([sys.executable, str(BENCH), "--tmp", str(tmp_path), "--db", db,
                        "--agents", "20",
                        "--procs", "2", "--cores", "2", "--task-seconds", "0.2", "--rate", "100",
                        "--warmup", "0.1", "--seconds", "0.5", "--idle", "0.6", "--poll", "0.1",
                        "--heartbeat", "0.5"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-3000:]
    figs = {(d["figure"], d.get("phase")): d for d in map(json.loads, r.stdout.splitlines())}
    assert set(figs) == {("dispatch_tasks_per_second", None), ("agents_lost", None),
                         ("heartbeat_rtt_p99_ms", "connect"), ("heartbeat_rtt_p99_ms", "busy"),
                         ("heartbeat_rtt_p99_ms", "idle"), ("server_rss_mb", None)}
    lost = figs["agents_lost", None]
    assert lost["value"] == 0 and lost["hellos"] == 20 and lost["protocol_errors"] == 0
    rss = figs["server_rss_mb", None]
    assert rss["received"] == rss["finished"] > 0
    assert figs["dispatch_tasks_per_second", None]["value"] > 0
    assert rss["value"] > 10
    assert figs["heartbeat_rtt_p99_ms", "busy"]["samples"] > 0
    assert figs["heartbeat_rtt_p99_ms", "idle"]["value"] is not None
    d = figs["dispatch_tasks_per_second", None]
    assert d["db"] == db
    # the window's CPU by part, in cores: the server's loop and libzmq I/O threads are its
    # whole process between them (with the ZAP thread), the harness is ours, idle the rest
    for k in ("server_busy", "server_loop_busy", "server_zmq_io_busy", "harness_busy",
              "machine_idle_cores"):
        assert 0 <= d[k] <= 2.5, (k, d[k])
    parts = d["server_loop_busy"] + d["server_zmq_io_busy"] + d["server_other_busy"]
    # (each thread's time is counted in clock ticks of 10 ms, over a window of ~0.5 s)
    assert parts == pytest.approx(d["server_busy"], abs=0.3)
    assert d["harness_busy"] > 0
    assert ("postgres_busy" in d) == (db == "postgres")
