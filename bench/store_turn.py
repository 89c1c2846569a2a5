#!/usr/bin/env python3
"""The database-writing layer alone: what one busy server loop turn costs to write through
server/store.py's Batch (no server, no agents, no sockets), on SQLite and PostgreSQL.

Each timed turn does what a turn of a busy server with fake agents writes: K jobs leased
(the lease: one update of its row), the K jobs leased the turn before finished (READY ->
STAGED_IN ... JOB_FINISHED with start, end, exit code, the attempt's end, lease cleared, in one
update of the row, and its event), and
the agent's row touched; then ``Batch.execute`` and the commit. Reported per configuration
(medians over --repeat runs of --turns turns): tasks/s (K per turn), the writer's CPU and, on
PostgreSQL, its backend's CPU per task (from /proc: robust on a loaded machine, where wall
time is not), and the round trips of one turn (libpq's protocol trace: each burst of
messages to the server followed by a wait for its answer).
"""
from __future__ import annotations

import inspect
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402

from sqlalchemy import text  # noqa: E402

from pilotfish.server import db  # noqa: E402
from pilotfish.server.states import State as S  # noqa: E402
from pilotfish.server.store import Batch  # noqa: E402

DONE = [S.STAGED_IN, S.PREPROCESSED, S.RUNNING, S.EXECUTION_FINISHED, S.POSTPROCESSED,
        S.STAGED_OUT, S.JOB_FINISHED]
_TICK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int) -> float:
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / _TICK


def job_row(i: int, now: float) -> dict:
    return {"id": i, "name": f"j{i}", "description": "", "app_id": 1, "num_nodes": 1,
            "processes_per_node": 1, "cpus_per_process": 1, "gpus_per_process": 0,
            "parameters": {}, "tags": "", "priority": 0, "max_retries": 0, "retries": 0,
            "attempts": 0, "state_time": now, "created": now, "workdir": f"w/{i}"}


def one_run(url: str, k: int, turns: int) -> dict:
    engine = db.make_engine(url)
    try:
        b = Batch()
        now = time.time()
        with engine.connect() as conn:
            for i in range(1, k * (turns + 1) + 1):
                b.insert_job(job_row(i, now), [S.CREATED, S.READY], None)
            b.agent_inserts.append({"id": "a1", "host": "h", "pid": 1, "cores": 64, "gpus": 0,
                                    "memory": 1, "started": now, "last_seen": now,
                                    "state": "ALIVE", "tasks_done": 0})
            b.execute(conn)
            conn.commit()
            pg = conn.dialect.name == "postgresql"
            backend = conn.execute(text("SELECT pg_backend_pid()")).scalar_one() if pg else None
            conn.commit()
            trace = None
            nxt = 1
            # (a Batch older than execute(commit=...) measures without it)
            commit_kw = ({"commit": True} if "commit" in
                         inspect.signature(Batch.execute).parameters else {})
            cpu0, wall0 = time.process_time(), time.perf_counter()
            be0 = proc_cpu(backend) if pg else 0.0
            for t in range(turns + 1):
                if t == turns and pg:  # the last turn, traced: its round trips
                    trace = tempfile.TemporaryFile("w+")
                    conn.connection.dbapi_connection.pgconn.trace(trace.fileno())
                for i in range(nxt - k, nxt) if t else ():
                    b.transition(i, S.READY, DONE, now, started=now, ended=now,
                                 exit_code=0, agent=None, run_state="JOB_FINISHED",
                                 run_message=None)
                for i in range(nxt, nxt + k):
                    b.lease_job(i, 1, "a1", None, now)
                nxt += k
                b.update_agent("a1", last_seen=now, tasks_done=nxt)
                b.execute(conn, **commit_kw)  # as the server's commit() does
                conn.commit()
            wall = time.perf_counter() - wall0
            cpu = time.process_time() - cpu0
            be = proc_cpu(backend) - be0 if pg else None
            trips = None
            if trace is not None:
                conn.connection.dbapi_connection.pgconn.untrace()
                trace.seek(0)
                lines = [ln.split("\t")[1:4] for ln in trace if ln.count("\t") >= 3]
                if os.environ.get("STORE_TURN_TRACE"):
                    sys.stderr.write("".join(" ".join(x)[:150] + "\n" for x in lines))
                # a round trip: a burst of messages to the server, then its answer awaited
                # (pipelined statements are one burst however many Syncs they carry)
                trips = sum(1 for prev, cur in zip([["B"]] + lines, lines)
                            if cur[0] == "F" and prev[0] == "B")
        tasks = k * (turns + 1)
        return {"tps": tasks / wall, "client_us_per_task": cpu / tasks * 1e6,
                "backend_us_per_task": be / tasks * 1e6 if be is not None else None,
                "round_trips_per_turn": trips}
    finally:
        engine.dispose()


def main() -> int:
    p = C.parser(__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--db", choices=("sqlite", "postgres", "both"), default="both")
    p.add_argument("--k", type=int, default=500, help="Jobs leased (and finished) per turn "
                                                      "(default: %(default)s).")
    p.add_argument("--turns", type=int, default=20, help="Timed turns (default: %(default)s).")
    a = p.parse_args()
    if a.k < 1 or a.turns < 1 or a.k * a.turns > 1_000_000:
        p.error("--k and --turns must be >= 1 and k * turns <= 1,000,000")
    C.set_bench("store_turn")
    ctx = C.machine(a.tmp)
    for kind in (["sqlite", "postgres"] if a.db == "both" else [a.db]):
        runs = []
        for r in range(a.repeat):
            with tempfile.TemporaryDirectory(dir=a.tmp, prefix="pf-store-turn-") as tmp:
                sdb = C.ScratchDB(kind, Path(tmp))
                try:
                    runs.append(one_run(sdb.url, a.k, a.turns))
                finally:
                    sdb.drop()
            C.log(f"{kind} run {r + 1}: {runs[-1]['tps']:,.0f} tasks/s, "
                  f"{runs[-1]['client_us_per_task']:.1f} us client CPU per task")
        med = {key: C.median([x[key] for x in runs]) for key in runs[0]}
        C.emit("tasks_per_second", med["tps"], unit="tasks/s", values=[x["tps"] for x in runs],
               client_us_per_task=med["client_us_per_task"],
               backend_us_per_task=med["backend_us_per_task"],
               round_trips_per_turn=med["round_trips_per_turn"], db=kind, k=a.k,
               turns=a.turns, repeat=a.repeat, **ctx)
    return 0


if __name__ == "__main__":
    C.run(main)
